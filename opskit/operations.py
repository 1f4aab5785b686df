"""What the commands do: glue between the catalog, the store and the targets.

Each function takes a Store, performs one user-level operation and returns plain data for the
CLI to print. No printing here (progress goes through an optional `on_event` callback).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from opskit import catalog, planning, states
from opskit import queue as Q
from opskit.errors import OpsError, unknown_name
from opskit.store import Store
from opskit.targets import Target, TargetUnreachable, open_target
from train import contract as C

Notify = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


# ------------------------------------------------------------------ targets


def _workdir_beside_store(store: Store, target: str) -> str:
    """A target on this machine keeps its runs in .opskit/<target>/ beside state.db."""
    return str(store.path.resolve().parent / ".opskit" / target)


def local_target_record(store: Store) -> dict:
    """The `local` target, created on first use with its workdir beside state.db."""
    rec = store.get_target("local")
    if rec is None:
        store.add_target("local", "local", {"workdir": _workdir_beside_store(store, "local"), "gpus": 0}, replace=True)
        rec = store.get_target("local")
    return rec


def add_target(store: Store, name: str, kind: str, options: dict, replace: bool = False) -> dict:
    """Validate a target's options through its kind's class and store it (no secrets: keys by path)."""
    if name == "local":
        raise OpsError("'local' is the built-in local target; pick another name")
    from opskit.targets import target_class
    options = dict(options)
    if kind == "slurm" and not options.get("login") and not options.get("workdir"):
        options["workdir"] = _workdir_beside_store(store, name)  # this machine is the cluster's
    stall_after_s = options.pop("stall_after_s", None)
    config = target_class(kind).config_from_options({**options, "name": name})
    if stall_after_s is not None:  # every kind: when a live run counts as stalled (docs/states.md)
        if float(stall_after_s) < 30:
            raise OpsError(f"--stall-after {stall_after_s}: at least 30 s (the trainer beats every 10-30 s)")
        config["stall_after_s"] = float(stall_after_s)
    store.add_target(name, kind, config, replace=replace)
    return store.get_target(name)


def get_target(store: Store, name: str) -> Target:
    if name == "local":
        return open_target(local_target_record(store))
    rec = store.get_target(name)
    if rec is None:
        raise unknown_name("target", name, ["local", *[t["name"] for t in store.list_targets() if t["name"] != "local"]])
    return open_target(rec)


# ------------------------------------------------------------------ launch


def launch(store: Store, phase: str, configs: list[str] | None = None, seeds: list[int] | None = None,
           target: str = "local", matrix: str | None = None, rerun: bool = False, dry_run: bool = False,
           on_event: Notify = _quiet, after: list[str] | None = None) -> list[dict]:
    """Expand the phase, refuse duplicates, prepare/sync the target once, then queue each run on the
    target (local/SSH: its supervisor starts it when GPUs free up) or start it (SLURM).
    `after`: runs on the same target that must be done before these start."""
    m, ph = catalog.resolve_phase(phase, matrix)
    if not configs and ph.from_gate:
        from opskit.results.gate import phase_configs
        configs = phase_configs(store, ph.name, m.name)
    planned = catalog.expand(m, ph, configs, seeds)
    tgt = get_target(store, target)
    after = list(after or [])
    with store.transaction():  # decide and claim at once: two launches of one run never both start it
        existing = {p.name: store.get_run(p.name) for p in planned}
        decisions = planning.decide_launches(planned, {k: v for k, v in existing.items() if v}, rerun)
        waits = {d.run.name: _check_after(store, tgt, after + _sources(store, ph, d.run))
                 for d in decisions if d.start}
        if dry_run:
            return _dry_run_plan(tgt, decisions, waits)
        to_start = [d for d in decisions if d.start]
        for d in to_start:
            store.upsert_run({"name": d.run.name, "matrix": m.name, "phase": d.run.phase, "config": d.run.config,
                              "seed": d.run.seed, "target": target, "attempt": d.attempt, "state": states.QUEUED,
                              "run_dir": tgt.run_dir(d.run.name),
                              "after": json.dumps(waits[d.run.name]) if waits[d.run.name] else None,
                              "spec": planning.build_spec(d.run, tgt.workdir, d.attempt)}, reason=d.reason)
    out = [{"run": d.run.name, "started": False, "reason": d.reason} for d in decisions if not d.start]
    if not to_start:
        return out
    names = [d.run.name for d in to_start]
    handed: set[str] = set()
    try:
        _set_state(store, names, states.PREPARING, "preparing target")
        tgt.prepare(on_line=on_event)
        _set_state(store, names, states.SYNCING, "syncing code")
        tgt.sync()
        for d in to_start:
            out.append(_start_one(store, tgt, d.run.name, d.attempt, fresh=d.attempt > 1, on_event=on_event,
                                  after=waits[d.run.name]))
            handed.add(d.run.name)
    except BaseException as e:  # Ctrl-C or an error halfway: no run may stay "preparing" for ever
        _end_unhanded(store, [n for n in names if n not in handed], e, target)
        raise
    return out


def _end_unhanded(store: Store, runs: list[str], error: BaseException, target: str) -> None:
    """Runs that launch had not handed to the target yet end cancelled (Ctrl-C) or failed (an error)."""
    if isinstance(error, KeyboardInterrupt):
        state, reason = states.CANCELLED, "launch interrupted before the run reached the target"
    else:
        state, reason = states.FAILED, f"target {target}: {error or type(error).__name__}"
    for name in runs:
        store.update_run(name, state=state, reason=reason, ended_at=time.time())


def _dry_run_plan(tgt: Target, decisions: list[planning.LaunchDecision], waits: dict[str, list[str]]) -> list[dict]:
    out = []
    for d in decisions:
        spec = planning.build_spec(d.run, tgt.workdir, d.attempt)
        out.append({"run": d.run.name, "start": d.start, "reason": d.reason, "target": tgt.name, "spec": spec,
                    "after": waits.get(d.run.name, []), "command": _command(tgt, d.run.name, spec)})
        if hasattr(tgt, "dry_run_script"):  # SLURM: the sbatch script that would be submitted
            out[-1]["sbatch"] = tgt.dry_run_script(d.run.name, out[-1]["command"], d.attempt)
    return out


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
    if after and not tgt.has_queue:
        raise OpsError(f"--after needs a target with an opskit queue (local, ssh); {tgt.name} is {tgt.kind}")
    return list(after)


def _command(tgt: Target, run: str, spec: dict) -> list[str]:
    spec_path = f"{tgt.run_dir(run)}/{C.SPEC}"
    if "downstream" in spec:
        return planning.downstream_command(tgt.python, spec_path)
    port = Q.PORT_PLACEHOLDER if tgt.has_queue else None  # the supervisor gives each run its own port
    return planning.trainer_command(tgt.python, planning.procs_per_run(tgt.config), spec_path, port=port)


def _set_state(store: Store, runs: list[str], state: str, reason: str) -> None:
    for r in runs:
        store.update_run(r, state=state, reason=reason)


def _start_one(store: Store, tgt: Target, run: str, attempt: int, fresh: bool, on_event: Notify,
               after: list[str] | None = None) -> dict:
    """Write the spec and queue (or start) the trainer; a failure marks only this run failed."""
    row = store.require_run(run)
    spec = {**row["spec"], "attempt": attempt}
    try:
        if fresh:
            tgt.agent_json(["reset", "--workdir", tgt.workdir, "--run", run])
        tgt.write_spec(run, spec)
        command = _command(tgt, run, spec)
        if tgt.has_queue:
            gpus = (1 if "downstream" in spec else planning.procs_per_run(tgt.config)) if tgt.gpus else None
            queued = tgt.enqueue(run, command, attempt, gpus=gpus, after=after or [])
        else:
            started = tgt.start(run, command, attempt)
    except OpsError as e:
        store.update_run(run, state=states.FAILED, reason=f"start failed: {e}", ended_at=time.time())
        return {"run": run, "started": False, "reason": str(e)}
    if tgt.has_queue:
        store.update_run(run, state=states.QUEUED, reason=f"queued on {tgt.name} (attempt {attempt})",
                         attempt=attempt, spec=spec, queue_pos=queued["position"], pid=None, job_id=None,
                         started_at=None, ended_at=None, exit_code=None, cancel_requested=0, stale=0)
        return {"run": run, "started": False, "queued": True, "attempt": attempt, "target": tgt.name,
                "position": queued["position"], "seq": queued["seq"], "supervisor": queued["supervisor"]}
    store.update_run(run, state=states.STARTING, reason=f"started attempt {attempt}", attempt=attempt,
                     spec=spec, pid=started.get("pid"), job_id=started.get("job_id"), started_at=time.time(),
                     ended_at=None, exit_code=None, cancel_requested=0, stale=0)
    return {"run": run, "started": True, "attempt": attempt, "target": tgt.name, **started}


# ------------------------------------------------------------------ status


def refresh(store: Store, phase: str | None = None, runs: list[str] | None = None) -> dict[str, str | None]:
    """Observe every unfinished run on its target (targets in parallel) and store derived states.

    Returns {target: None if it answered, else the reason it did not}."""
    rows = [store.require_run(r) for r in runs] if runs else store.list_runs(phase=phase)
    by_target: dict[str, list[dict]] = {}
    for r in rows:
        if r["state"] not in states.ENDED or r["stale"]:
            by_target.setdefault(r["target"], []).append(r)
    if not by_target:
        return {}

    resolved: dict[str, Target | str] = {}
    for name in by_target:  # in this thread: the store's connection belongs to it
        try:
            resolved[name] = get_target(store, name)
        except OpsError as e:
            resolved[name] = str(e)

    def observe(name: str):
        try:
            tgt = resolved[name]
            if isinstance(tgt, str):
                raise OpsError(tgt)
            observations, queue = tgt.observe_with_queue([r["name"] for r in by_target[name]])
            return tgt, observations, queue, None
        except (TargetUnreachable, OpsError) as e:
            return None, None, None, str(e)
        except Exception as e:  # one broken target must not take `status` of the others down
            return None, None, None, f"{type(e).__name__}: {e}"

    health: dict[str, str | None] = {}
    with ThreadPoolExecutor(max_workers=min(16, len(by_target))) as pool:
        results = list(pool.map(observe, by_target))
    for name, (tgt, observations, queue, error) in zip(by_target, results):
        health[name] = error
        for r in by_target[name]:
            if error is not None:
                if not r["stale"]:
                    store.update_run(r["name"], stale=1)
                continue
            _apply(store, r, observations[r["name"]], tgt, _queue_fields(queue, r["name"], r["attempt"]))
    return health


def _queue_fields(queue: dict | None, run: str, attempt: int) -> dict:
    """queue_pos / gpus / started_at of this attempt of a run from its target's queue state."""
    if queue is None:
        return {}
    for e in queue["pending"]:
        if e["run"] == run:
            return {"queue_pos": e["position"], "message": e["waiting"]}
    for e in queue["running"] + queue["finished"][::-1]:  # newest finished first
        if e["run"] == run and e.get("attempt", attempt) == attempt:
            return {"queue_pos": None, "gpus": e.get("cuda_visible_devices"), "started_at": e.get("started_at"),
                    "start_error": e.get("error")}
    return {"queue_pos": None}


def _apply(store: Store, row: dict, obs: states.Observation, tgt: Target, queue_fields: dict | None = None) -> None:
    hb_attempt = (obs.status or {}).get("attempt")
    if row.get("spec") and hb_attempt is not None and hb_attempt != row["spec"]["attempt"]:
        obs = dataclasses.replace(obs, status=None)  # an earlier attempt's heartbeat says nothing of this one
    queue_fields = dict(queue_fields or {})
    start_error = queue_fields.pop("start_error", None)
    state, reason = states.derive_state(obs, float(tgt.config.get("stall_after_s", states.DEFAULT_STALL_AFTER_S)),
                                        (row.get("spec") or {}).get("log_every"))
    if row["state"] in states.NOT_HANDED and not obs.started:
        state = row["state"]  # not handed to the trainer yet
    if start_error and not obs.started:  # the target's supervisor could not start it
        state, reason = states.FAILED, f"the target's queue could not start it: {start_error}"
    requeued = row.get("spec") and row["spec"]["attempt"] + obs.restarts > row["attempt"]
    if row["state"] in states.ENDED and state not in states.ENDED and not requeued:
        state, reason = row["state"], None  # an ended run stays ended until a new attempt starts
    fields = {**queue_fields, **states.progress_fields(obs.status), "stale": 0, "exit_code": obs.exit_code}
    if not obs.started:
        fields.pop("started_at", None)
    elif not row.get("started_at") and not fields.get("started_at"):
        fields["started_at"] = time.time()
    if state in states.ENDED and row["state"] not in states.ENDED:
        fields["ended_at"] = time.time()
    if getattr(obs, "restarts", None) and row.get("spec"):  # SLURM requeues count as attempts
        fields["attempt"] = row["spec"]["attempt"] + obs.restarts
    store.update_run(row["name"], state=state, reason=reason, **fields)


def status_rows(store: Store, phase: str | None = None) -> list[dict]:
    """Rows for `status`: the store's runs with the fields scripts rely on."""
    out = []
    rows = store.list_runs(phase=phase)
    starts = _estimated_starts(store, {r["target"] for r in rows if r["state"] == states.QUEUED})
    for r in rows:
        out.append({"run": r["name"], "phase": r["phase"], "config": r["config"], "seed": r["seed"],
                    "target": r["target"], "attempt": r["attempt"], "state": r["state"], "stale": r["stale"],
                    "step": r["step"], "total_steps": r["total_steps"], "loss": r["loss"],
                    "tokens_per_s": r["tokens_per_s"], "eta_s": r["eta_s"], "cache_bytes": r["cache_bytes"],
                    "cache_tokens": r["cache_tokens"], "updated_at": r["updated_at"], "heartbeat_at": r["heartbeat_at"],
                    "message": r["message"], "exit_code": r["exit_code"], "job_id": r["job_id"],
                    "queue_pos": r["queue_pos"] if r["state"] == states.QUEUED else None, "gpus": r["gpus"],
                    "starts_in_s": starts.get(r["name"])})
    return out


def _estimated_starts(store: Store, targets: set[str]) -> dict[str, float | None]:
    """Seconds until each queued run starts, from its target's running runs' ETAs (docs/queue.md)."""
    out: dict[str, float | None] = {}
    now = time.time()
    for name in targets:
        rec = local_target_record(store) if name == "local" else store.get_target(name)
        if rec is None or rec["kind"] == "slurm":
            continue
        config = rec["config"]
        rows = store.list_runs(target=name)
        running = [(len(r["gpus"].split(",")) if r["gpus"] else Q.units_per_run(config),
                    Q.remaining_s(r["eta_s"], r["heartbeat_at"], now))
                   for r in rows if r["state"] in states.ACTIVE]
        queued = sorted((r for r in rows if r["state"] == states.QUEUED and r["queue_pos"]),
                        key=lambda r: r["queue_pos"])
        durations = Q.durations_by_phase(rows, now)
        out.update(Q.estimate_start_times(Q.slot_count(config), running,
                                          [(r["name"], Q.units_per_run(config), durations.get(r["phase"]))
                                           for r in queued]))
    return out


# ------------------------------------------------------------------ cancel / resume / logs


def cancel(store: Store, runs: list[str], now: bool = False) -> list[dict]:
    """Ask each run's trainer to checkpoint and stop (SIGTERM through the launcher). `now`: SIGKILL its
    whole process group instead, with no checkpoint (a hung run); resume continues from its last one.

    Each answer has `outcome`: removed-from-queue, signalled, killed, cancelled-before-start or not-running."""
    out = []
    for name in runs:
        row = store.require_run(name)
        if row["state"] in states.ENDED:
            out.append({"run": name, "cancelled": False, "outcome": "ended", "reason": f"already {row['state']}"})
            continue
        tgt = get_target(store, row["target"])
        store.update_run(name, cancel_requested=1)
        if tgt.has_queue and tgt.dequeue(name)["removed"]:
            _mark_cancelled(store, name, "removed from the target's queue", queue_pos=None)
            out.append({"run": name, "cancelled": True, "outcome": "removed-from-queue", "removed_from_queue": True})
            continue
        answer = tgt.signal(name, "KILL" if now else "TERM")
        if now:
            ckpt = row.get("checkpoint_step")
            _mark_cancelled(store, name, "killed by `cancel --now`, no checkpoint taken; resume continues from "
                            + (f"step {ckpt}" if ckpt is not None else "its last checkpoint"))
            outcome = "killed"
        elif answer.get("signalled"):
            outcome = "signalled"  # the trainer checkpoints and exits; refresh derives `cancelled`
        elif answer.get("scancelled") or row["state"] in states.NOT_HANDED:
            _mark_cancelled(store, name, "cancelled before it started")
            outcome = "cancelled-before-start"
        else:  # its process is gone already: the next refresh says how it ended
            out.append({"run": name, "cancelled": False, "outcome": "not-running", **answer})
            continue
        out.append({"run": name, "cancelled": True, "outcome": outcome, **answer})
    return out


def _mark_cancelled(store: Store, run: str, reason: str, **fields) -> None:
    store.update_run(run, state=states.CANCELLED, reason=reason, ended_at=time.time(), stale=0, **fields)


# ------------------------------------------------------------------ queues


def queue_view(store: Store, target: str | None = None) -> list[dict]:
    """Each target's queue: what runs (with its GPUs) and what waits, in order (SLURM: its own queue).

    A dead supervisor with work left is restarted on the way."""
    names = [target] if target else ["local", *[t["name"] for t in store.list_targets() if t["name"] != "local"]]
    out = []
    for name in names:
        tgt = get_target(store, name)
        try:
            state = tgt.queue_state(ensure=True)
        except (TargetUnreachable, OpsError, OSError) as e:
            out.append({"target": name, "kind": tgt.kind, "error": str(e)})
            continue
        out.append({"target": name, "kind": tgt.kind, **state})
    return out


def queue_move_top(store: Store, run: str) -> dict:
    """Put a queued run first in its target's queue."""
    row = store.require_run(run)
    tgt = get_target(store, row["target"])
    if not tgt.has_queue:
        raise OpsError(f"{run} is on {tgt.name} ({tgt.kind}), whose queue opskit does not order")
    answer = tgt.queue_move_top(run)
    store.update_run(run, queue_pos=answer["position"])
    return answer


def resume(store: Store, run: str, target: str | None = None, on_event: Notify = _quiet) -> dict:
    """Start a new attempt that continues from the run's last complete checkpoint."""
    refresh(store, runs=[run])
    row = store.require_run(run)
    if row["state"] not in states.ENDED and row["state"] != states.STALLED:
        raise OpsError(f"{run} is {row['state']}; only a failed, lost, cancelled or stalled run can be resumed")
    if row["state"] == states.DONE:
        raise OpsError(f"{run} is done; use `opskit launch ... --rerun` to train it again")
    tgt = get_target(store, row["target"])
    moving_to = get_target(store, target) if target and target != row["target"] else None
    if moving_to is not None:  # refuse before a stalled run is killed
        tgt.check_movable()
        moving_to.check_movable()
    if row["state"] == states.STALLED:
        tgt.signal(run, "KILL")
    if moving_to is not None:
        tgt = _move_run(store, row, tgt, moving_to, on_event)
    tgt.prepare(on_line=on_event)
    tgt.sync()
    return _start_one(store, tgt, run, row["attempt"] + 1, fresh=False, on_event=on_event)


def _move_run(store: Store, row: dict, src: Target, dst: Target, on_event: Notify) -> Target:
    """Copy the run's newest complete checkpoint to `dst` (through this machine) and point the run there."""
    import tempfile

    from opskit import rsync
    with tempfile.TemporaryDirectory(prefix="opskit-move-") as scratch:
        step = rsync.copy_run_for_resume(src, dst, row["name"], Path(scratch))
    spec = {**row["spec"], "cache_dir": f"{dst.workdir}/cache", "out_dir": dst.run_dir(row["name"])}
    store.update_run(row["name"], target=dst.name, run_dir=dst.run_dir(row["name"]), spec=spec)
    on_event(f"copied {row['name']} {step} from {src.name} to {dst.name}")
    return dst


def logs(store: Store, run: str, lines: int = 50, follow: bool = False):
    row = store.require_run(run)
    return get_target(store, row["target"]).logs(run, lines=lines, follow=follow)


# ------------------------------------------------------------------ pull


def pull(store: Store, runs: list[str] | None = None, results_dir: str = "results",
         on_event: Notify = _quiet) -> list[dict]:
    """Fetch each run's allowed artifacts into results/raw/<phase>/<config>/seed<k>/ with a manifest.

    A file an earlier attempt's pull brought that the run no longer has (a rerun started afresh) is
    removed, so no report reads an earlier attempt's results; one the box lost within the same attempt
    (cleaned up after a pull) is kept."""
    rows = [store.require_run(r) for r in runs] if runs else store.list_runs()
    out = []
    for r in rows:
        try:
            out.append(_pull_one(store, r, results_dir, on_event))
        except (TargetUnreachable, OpsError, OSError) as e:  # one run's failure must not stop the others
            out.append({"run": r["name"], "pulled": 0, "error": str(e)})
    return out


def _pull_one(store: Store, r: dict, results_dir: str, on_event: Notify) -> dict:
    tgt = get_target(store, r["target"])
    files = tgt.manifest(r["name"])
    dest = Path(planning.pull_dest(results_dir, r["phase"], r["config"], r["seed"]))
    dest.mkdir(parents=True, exist_ok=True)
    wanted = [f for f in files if _needs_fetch(dest / f["path"], f)]
    if wanted:
        tgt.fetch(r["name"], [f["path"] for f in wanted], dest)
    recorded = []
    for f in files:
        got = _sha256(dest / f["path"])
        if got != f["sha256"]:  # the file changed between manifest and copy (a live log): record what we have
            f = {**f, "sha256": got, "size": (dest / f["path"]).stat().st_size}
        store.record_artifact(r["name"], f["path"], f["size"], f["sha256"])
        recorded.append(f)
    previous_attempt, previous = _previously_pulled(dest)
    missing = [f for f in previous if f["path"] not in {g["path"] for g in files}]
    gone, kept = [], []
    for f in missing:
        if previous_attempt != r["attempt"]:  # superseded by a new attempt (a rerun started afresh)
            (dest / f["path"]).unlink(missing_ok=True)
            gone.append(f["path"])
        elif (dest / f["path"]).exists():  # same attempt, gone from the box (cleaned up): ours to keep
            kept.append(f)
    store.forget_artifacts(r["name"], gone)
    C.atomic_write_json(dest / "manifest.json", {"run": r["name"], "target": r["target"],
                                                 "attempt": r["attempt"], "state": r["state"],
                                                 "pulled_at": time.time(), "files": recorded + kept})
    removed = f", {len(gone)} of an earlier attempt removed" if gone else ""
    on_event(f"pulled {r['name']}: {len(wanted)} new of {len(files)} files{removed} -> {dest}")
    return {"run": r["name"], "pulled": len(wanted), "files": [f["path"] for f in files], "removed": gone,
            "dest": str(dest)}


def _previously_pulled(dest: Path) -> tuple[int | None, list[dict]]:
    """Attempt and files of the last pull into `dest` (its manifest.json), files confined to `dest`."""
    try:
        manifest = json.loads((dest / "manifest.json").read_text())
        files, attempt = list(manifest["files"]), manifest.get("attempt")
    except (OSError, ValueError, KeyError, TypeError):
        return None, []
    root = dest.resolve()
    return attempt, [f for f in files if (dest / f["path"]).resolve().is_relative_to(root)]


def _sha256(path: Path) -> str | None:
    if not path.exists():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _needs_fetch(local: Path, remote: dict) -> bool:
    return not local.exists() or local.stat().st_size != remote["size"] or _sha256(local) != remote["sha256"]


def run_details(store: Store, run: str) -> dict:
    row = store.require_run(run)
    return {**row, "events": store.events(run), "artifacts": store.artifacts(run)}


def to_json(obj) -> str:
    return json.dumps(obj, indent=1, default=str)
