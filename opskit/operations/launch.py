"""launch and the submission of one run (shared with resume): expand a phase, validate every spec
here, claim the runs in the store, prepare and sync the target once, submit each run."""
from __future__ import annotations

import json
import time
from typing import Callable

from opskit import catalog, planning, states
from opskit.code_record import CodeRecord, environment_argv, record_code
from opskit.errors import OpsError
from opskit.operations import disk_check, preflight
from opskit.operations.targets import get_target
from opskit.store import Store
from opskit.targets import Target
from opskit.targets.base import PROJECT_ROOT
from opskit.transport.rsync import CODE_PATHS
from train import contract as C

Notify = Callable[[str], None]


def quiet(_msg: str) -> None:
    pass


def launch(store: Store, phase: str, configs: list[str] | None = None, seeds: list[int] | None = None,
           target: str = "local", matrix: str | None = None, rerun: bool = False, dry_run: bool = False,
           on_event: Notify = quiet, after: list[str] | None = None, trackers: list[str] | None = None,
           force: bool = False) -> list[dict]:
    """Expand the phase, refuse duplicates, bad specs, runs the target cannot run (preflight.py) and
    runs whose checkpoints and token cache would not fit on its disk (disk_check.py); `force` launches
    those anyway. Then prepare/sync the target once and submit each run (local/SSH: its queue's
    supervisor starts it when GPUs free up; SLURM: sbatch).
    `after`: runs on the same target that must be done before these start; `trackers`: added to the
    matrix's `tracking` (docs/trackers.md). Each run records the code it was launched with."""
    m, ph = catalog.resolve_phase(phase, matrix)
    if not configs and ph.from_gate:
        from opskit.results.gate import phase_configs
        configs = phase_configs(store, ph.name, m.name)
    planned = catalog.expand(m, ph, configs, seeds)
    tgt = get_target(store, target)
    after = list(after or [])
    code = record_code(PROJECT_ROOT, CODE_PATHS)
    checks = {}  # before the write transaction: the hub check may wait on the network
    for p in planned:
        spec = planning.build_spec(p, tgt.workdir, 1)
        need = preflight.needs(tgt, spec)
        checks[p.name] = (need, preflight.problems(tgt, spec, need))
    disk = None
    if not force and any(d.start for d in planning.decide_launches(planned, _existing(store, planned), rerun)):
        disk = disk_check.target_disk(tgt)  # asked before the store is locked: it is a round trip
    with store.transaction():  # decide and claim at once: two launches of one run never both start it
        decisions = planning.decide_launches(planned, _existing(store, planned), rerun)
        specs = {d.run.name: validated_spec(d.run, tgt.workdir, d.attempt, trackers, code)
                 for d in decisions if d.start}
        refused = [(d.run.name, checks[d.run.name][1]) for d in decisions if d.start and checks[d.run.name][1]]
        if refused and not force and not dry_run:
            raise OpsError(preflight.refusal(refused, target))
        decisions = disk_check.refuse_what_does_not_fit(tgt, decisions, specs, disk)
        waits = {d.run.name: _check_after(store, tgt, after + _sources(store, ph, d.run))
                 for d in decisions if d.start}
        if dry_run:
            return [_dry_run_plan(tgt, d, specs.get(d.run.name), waits.get(d.run.name, []), code, *checks[d.run.name])
                    for d in decisions]
        to_start = [d for d in decisions if d.start]
        for d in to_start:
            store.upsert_run({"name": d.run.name, "matrix": m.name, "phase": d.run.phase, "config": d.run.config,
                              "seed": d.run.seed, "target": target, "attempt": d.attempt, "state": states.QUEUED,
                              "run_dir": tgt.run_dir(d.run.name),
                              "after": json.dumps(waits[d.run.name]) if waits[d.run.name] else None,
                              "spec": specs[d.run.name]}, reason=d.reason)
    out = [{"run": d.run.name, "started": False, "reason": d.reason} for d in decisions if not d.start]
    if not to_start:
        return out
    names = [d.run.name for d in to_start]
    handed: set[str] = set()
    try:
        with tgt.setting_up():  # the box's idle action waits while opskit prepares it
            _set_state(store, names, states.PREPARING, "preparing target")
            tgt.prepare(on_line=on_event)
            _set_state(store, names, states.SYNCING, "syncing code")
            tgt.sync()
            files = code_files(tgt, code)
            for d in to_start:
                out.append(submit_one(store, tgt, d.run.name, d.attempt, fresh=d.attempt > 1,
                                      after=waits[d.run.name], files=files))
                handed.add(d.run.name)
    except BaseException as e:  # Ctrl-C or an error halfway: no run may stay "preparing" for ever
        _end_unhanded(store, [n for n in names if n not in handed], e, target)
        raise
    return out


def _existing(store: Store, planned: list[catalog.PlannedRun]) -> dict[str, dict]:
    rows = {p.name: store.get_run(p.name) for p in planned}
    return {k: v for k, v in rows.items() if v}


def validated_spec(run: catalog.PlannedRun, workdir: str, attempt: int, trackers=(),
                   code: CodeRecord | None = None) -> dict:
    """The run's spec.json, checked here with the trainer's own schema (train/spec.py; a p2 job's
    downstream part with train/p2.py), so a bad field fails before any box is touched."""
    from train.p2 import parse_spec as parse_downstream_spec
    from train.spec import SpecError, validate
    spec = planning.build_spec(run, workdir, attempt, trackers)
    if code is not None:  # the box's synced code has no .git: results.json names the commit from here
        spec.update(code_commit=code.commit, code_dirty=code.dirty)
    try:
        validate(spec)
        if "downstream" in spec:
            parse_downstream_spec(spec)
    except SpecError as e:
        raise OpsError(f"{run.name}: {e} (fix matrix {run.matrix} in configs/)") from None
    return spec


def _end_unhanded(store: Store, runs: list[str], error: BaseException, target: str) -> None:
    """Runs that launch had not handed to the target yet end cancelled (Ctrl-C) or failed (an error)."""
    if isinstance(error, KeyboardInterrupt):
        state, reason = states.CANCELLED, "launch interrupted before the run reached the target"
    else:
        state, reason = states.FAILED, f"target {target}: {error or type(error).__name__}"
    for name in runs:
        store.update_run(name, state=state, reason=reason, ended_at=time.time())


def _dry_run_plan(tgt: Target, d: planning.LaunchDecision, spec: dict | None, after: list[str],
                  code: CodeRecord, need: dict, problems: list[str]) -> dict:
    spec = spec or planning.build_spec(d.run, tgt.workdir, d.attempt)
    command = tgt.command(d.run.name, spec)
    return {"run": d.run.name, "start": d.start, "reason": d.reason, "target": tgt.name, "spec": spec,
            "after": after, "needs": need, "problems": problems, "command": command,
            "code": {"commit": code.commit, "dirty": code.dirty},
            **tgt.plan(d.run.name, command, d.attempt)}


def code_files(tgt: Target, code: CodeRecord) -> dict[str, str]:
    """What each attempt records of its code (docs/run-directory.md): the uncommitted changes of this
    checkout and the packages of the target's trainer python."""
    res = tgt.shell.run(environment_argv(tgt.python), timeout=180, label="pip freeze")
    why = (res.stderr.strip().splitlines() or [f"exit {res.exit_code}"])[-1]
    packages = res.stdout if res.exit_code == 0 else f"# {tgt.python} could not list its packages: {why}\n"
    return {C.CODE_DIFF: code.diff, C.ENVIRONMENT: packages}


def _sources(store: Store, ph: catalog.Phase, run: catalog.PlannedRun) -> list[str]:
    """A downstream run waits for the run it evaluates (p2/<config>/s<seed> after p1/<config>/s<seed>)."""
    if ph.kind != "downstream":
        return []
    source = catalog.run_name(ph.after, run.config, run.seed)
    row = store.get_run(source)
    if row is None:
        raise OpsError(f"{run.name} evaluates {source}, which was never launched: launch {ph.after} first")
    return [] if row["state"] == states.DONE else [source]


def _check_after(store: Store, tgt: Target, after: list[str]) -> list[str]:
    for dep in after:
        row = store.require_run(dep)
        if row["target"] != tgt.name:
            raise OpsError(f"--after {dep}: it runs on {row['target']}, not {tgt.name}; "
                           f"a run can only wait for runs on its own target")
    tgt.check_after(after)
    return list(after)


def _set_state(store: Store, runs: list[str], state: str, reason: str) -> None:
    for r in runs:
        store.update_run(r, state=state, reason=reason)


def submit_one(store: Store, tgt: Target, run: str, attempt: int, fresh: bool,
               after: list[str] | None = None, files: dict[str, str] | None = None,
               keep_row_on_error: bool = False) -> dict:
    """Write the spec (and `files`: name -> text, into the run directory) and submit the run; a failure
    marks only this run failed. `keep_row_on_error` (resume): the run's row stays as it was (the ended
    attempt is not rewritten) and the error is raised instead, as one line."""
    row = store.require_run(run)
    spec = {**row["spec"], "attempt": attempt}
    try:
        if fresh:
            tgt.reset(run)
        tgt.write_spec(run, spec)
        for name, text in (files or {}).items():
            tgt.write_file(C.run_rel(run, name), text)
        gpus = (1 if "downstream" in spec else planning.procs_per_run(tgt.config)) if tgt.gpus else None
        sub = tgt.submit(run, tgt.command(run, spec), attempt, gpus=gpus, after=after or [])
    except OpsError as e:
        if keep_row_on_error:
            raise type(e)(f"{run} not resumed: {e}") from None
        store.update_run(run, state=states.FAILED, reason=f"start failed: {e}", ended_at=time.time())
        return {"run": run, "started": False, "reason": str(e)}
    fields = {"attempt": attempt, "spec": spec, "pid": sub.pid, "job_id": sub.job_id, "ended_at": None,
              "exit_code": None, "cancel_requested": 0, "stale": 0}
    if sub.queued:
        store.update_run(run, state=states.QUEUED, reason=f"queued on {tgt.name} (attempt {attempt})",
                         queue_pos=sub.position, started_at=None, **fields)
        return {"run": run, "started": False, "queued": True, "attempt": attempt, "target": tgt.name,
                "position": sub.position, "seq": sub.seq, "supervisor": sub.supervisor}
    store.update_run(run, state=states.STARTING, reason=f"started attempt {attempt}", started_at=time.time(),
                     **fields)
    return {"run": run, "started": True, "attempt": attempt, "target": tgt.name, "job_id": sub.job_id}
