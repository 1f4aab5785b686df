"""status: observe every unfinished run on its target (targets in parallel), store the states the
state machine (opskit/states.py) derives, and the rows `opskit status` shows."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from opskit import queue as Q
from opskit import states
from opskit.errors import OpsError, TargetUnreachable
from opskit.operations.targets import get_target, local_target_record
from opskit.store import Store
from opskit.targets import Target


def refresh(store: Store, phase: str | None = None, runs: list[str] | None = None,
            notes: dict[str, list[str]] | None = None) -> dict[str, str | None]:
    """Observe every unfinished run on its target and store derived states. A run another command
    changed meanwhile (a launch, a cancel) keeps what that command wrote.

    Returns {target: None if it answered, else the reason it did not}; `notes` collects, per target,
    what `status` shows beside the table (low disk, a bad queue config, torn queue entries)."""
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
                    "starts_in_s": starts.get(r["name"]), "gpu_util": r["gpu_util"], "gpu_mem_mb": r["gpu_mem_mb"],
                    "gpu_power_w": r["gpu_power_w"]})
    return out


def _estimated_starts(store: Store, targets: set[str]) -> dict[str, float | None]:
    """Seconds until each queued run starts, from its target's running runs' ETAs (docs/queue.md)."""
    out: dict[str, float | None] = {}
    now = time.time()
    for name in targets:
        rec = local_target_record(store) if name == "local" else store.get_target(name)
        if rec is None:
            continue
        config = rec["config"]
        rows = store.list_runs(target=name)
        running = [(len(r["gpus"].split(",")) if r["gpus"] else Q.units_per_run(config),
                    Q.remaining_s(r["eta_s"], r["heartbeat_at"], now))
                   for r in rows if r["state"] in states.ACTIVE]
        # only runs waiting in an opskit queue have a position (SLURM decides when its jobs start)
        queued = sorted((r for r in rows if r["state"] == states.QUEUED and r["queue_pos"]),
                        key=lambda r: r["queue_pos"])
        durations = Q.durations_by_phase(rows, now)
        out.update(Q.estimate_start_times(Q.slot_count(config), running,
                                          [(r["name"], Q.units_per_run(config), durations.get(r["phase"]))
                                           for r in queued]))
    return out
