"""status: observe every unfinished run on its target (targets in parallel), store the states the
state machine (opskit/states.py) derives, and the rows `opskit status` shows. Both select in SQL:
history that is not shown costs nothing (opskit/operations/selection.py says what is shown)."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from opskit import queue as Q
from opskit import states
from opskit.errors import OpsError, TargetUnreachable
from opskit.operations.selection import RECENT_ENDED, Selection
from opskit.operations.targets import get_target, local_target_record
from opskit.store import Store
from opskit.targets import Target

# What a status row is made of (never the spec: it is large and status does not show it).
STATUS_COLUMNS = ("name", "phase", "config", "seed", "target", "attempt", "state", "stale", "step", "total_steps",
                  "loss", "tokens_per_s", "eta_s", "cache_bytes", "cache_tokens", "created_at", "updated_at",
                  "started_at", "ended_at", "heartbeat_at", "message", "reason", "exit_code", "job_id", "queue_pos",
                  "gpus", "gpu_util", "gpu_mem_mb", "gpu_power_w")


def refresh(store: Store, phase: str | None = None, runs: list[str] | None = None,
            sel: Selection | None = None, notes: dict[str, list[str]] | None = None) -> dict[str, str | None]:
    """Observe every unfinished run (of `phase`, of the selection's phases and targets, or the named
    `runs`) on its target and store derived states; ended runs are never looked at again. A run
    another command changed meanwhile (a launch, a cancel) keeps what that command wrote.

    Returns {target: None if it answered, else the reason it did not}; `notes` collects, per target,
    what `status` shows beside the table (low disk, a bad queue config, torn queue entries)."""
    if runs:
        rows = [r for r in (store.require_run(r) for r in runs) if r["state"] not in states.ENDED or r["stale"]]
    else:
        phases = sel.phases if sel else ([phase] if phase else ())
        rows = store.select_runs(phases=phases, targets=sel.targets if sel else (), unfinished=True)
    by_target: dict[str, list[dict]] = {}
    for r in rows:
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
            observations, queue = tgt.observe([r["name"] for r in by_target[name]])
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
        rules = states.stall_rules(tgt.config if tgt else {})
        for r in by_target[name]:
            if error is not None:
                if not r["stale"]:
                    store.update_run(r["name"], stale=1)
                continue
            state, reason, fields = states.next_state(r, observations[r["name"]], queue_fields=Q.queue_fields(
                queue, r["name"], r["attempt"]), now=time.time(), **rules)
            with store.transaction():
                now_row = store.get_run(r["name"])
                if now_row and (now_row["state"], now_row["attempt"]) == (r["state"], r["attempt"]):
                    store.update_run(r["name"], state=state, reason=reason, **fields)
        if notes is not None and error is None:
            notes[name] = target_notes(observations, queue)
    return health


def target_notes(observations: dict, queue: dict | None) -> list[str]:
    """One line each: the target's disk when low, its queue's config problem, torn queue entries."""
    out = []
    disk = next((o.disk for o in observations.values() if o.disk), None)
    if states.disk_low(disk):
        out.append(f"low disk: {disk['free_bytes'] / 1e6:,.0f} MB free on {disk['where']}")
    queue = queue or {}
    if queue.get("config_error"):
        out.append(queue["config_error"])
    broken = queue.get("broken") or []
    if broken:
        out.append(f"{len(broken)} torn queue entry file(s) moved to queue/broken/ ("
                   + ", ".join(f"{b['file']}: {b.get('run') or 'run unreadable'}" for b in broken[:3])
                   + "); their runs do not start: launch them again, then delete the files")
    return out


def status_view(store: Store, sel: Selection = Selection(), recent: int = RECENT_ENDED,
                capped: bool | None = None) -> dict:
    """The runs `status` shows and a count per phase and state of every run the selection matches.

    Capped (the default view): every unfinished run and the `recent` runs that ended last; else every
    selected run. `hidden`: selected runs not shown."""
    capped = sel.capped if capped is None else capped
    filters = {"phases": sel.phases, "targets": sel.targets, "since": sel.since}
    if capped:
        rows = store.select_runs(**filters, unfinished=True, columns=STATUS_COLUMNS)
        rows += store.recent_ended(recent, **filters, columns=STATUS_COLUMNS)
        rows.sort(key=lambda r: (r["created_at"] or 0, r["name"]))
    else:
        rows = store.select_runs(**filters, states=sel.states, columns=STATUS_COLUMNS)
    counts = store.state_counts(**filters, states=sel.states)
    total = sum(n for per_state in counts.values() for n in per_state.values())
    return {"runs": status_rows(store, rows), "counts": counts, "total": total, "hidden": total - len(rows),
            "capped": capped}


def status_of(store: Store, runs: list[str]) -> list[dict]:
    """Status rows of the named runs (launch --wait)."""
    return status_rows(store, store.select_runs(names=runs, columns=STATUS_COLUMNS))


def status_rows(store: Store, rows: list[dict]) -> list[dict]:
    """Rows for `status` (and scripts: `status --json`) from the store's rows."""
    starts = _estimated_starts(store, {r["target"] for r in rows if r["state"] == states.QUEUED})
    return [{"run": r["name"], "phase": r["phase"], "config": r["config"], "seed": r["seed"],
             "target": r["target"], "attempt": r["attempt"], "state": r["state"], "stale": r["stale"],
             "reason": r["reason"], "step": r["step"], "total_steps": r["total_steps"], "loss": r["loss"],
             "tokens_per_s": r["tokens_per_s"], "eta_s": r["eta_s"], "cache_bytes": r["cache_bytes"],
             "cache_tokens": r["cache_tokens"], "updated_at": r["updated_at"], "heartbeat_at": r["heartbeat_at"],
             "ended_at": r["ended_at"], "message": r["message"], "exit_code": r["exit_code"], "job_id": r["job_id"],
             "queue_pos": r["queue_pos"] if r["state"] == states.QUEUED else None, "gpus": r["gpus"],
             "starts_in_s": starts.get(r["name"]), "gpu_util": r["gpu_util"], "gpu_mem_mb": r["gpu_mem_mb"],
             "gpu_power_w": r["gpu_power_w"]} for r in rows]


def _estimated_starts(store: Store, targets: set[str]) -> dict[str, float | None]:
    """Seconds until each queued run starts, from its target's running runs' ETAs (docs/queue.md)."""
    out: dict[str, float | None] = {}
    now = time.time()
    for name in targets:
        rec = local_target_record(store) if name == "local" else store.get_target(name)
        if rec is None:
            continue
        config = rec["config"]
        live = store.select_runs(targets=[name], states=sorted(states.ACTIVE | {states.QUEUED}),
                                 columns=("name", "phase", "state", "gpus", "eta_s", "heartbeat_at", "started_at",
                                          "ended_at", "queue_pos"))
        running = [(len(r["gpus"].split(",")) if r["gpus"] else Q.units_per_run(config),
                    Q.remaining_s(r["eta_s"], r["heartbeat_at"], now))
                   for r in live if r["state"] in states.ACTIVE]
        # only runs waiting in an opskit queue have a position (SLURM decides when its jobs start)
        queued = sorted((r for r in live if r["state"] == states.QUEUED and r["queue_pos"]),
                        key=lambda r: r["queue_pos"])
        durations = {**Q.durations_by_phase(live, now), **store.done_durations_by_phase(name)}
        out.update(Q.estimate_start_times(Q.slot_count(config), running,
                                          [(r["name"], Q.units_per_run(config), durations.get(r["phase"]))
                                           for r in queued]))
    return out
