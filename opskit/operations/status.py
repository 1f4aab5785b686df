"""status: observe every unfinished run on its target (targets in parallel), store the states the
state machine (opskit/states.py) derives, and the rows `opskit status` shows. Both select in SQL:
history that is not shown costs nothing (opskit/operations/selection.py says what is shown)."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from opskit import queue as Q
from opskit import states
from opskit.errors import OpsError, TargetUnreachable
from opskit.operations.selection import RECENT_ENDED, Selection
from opskit.operations.targets import get_target, local_target_record
from opskit.store import Store

if TYPE_CHECKING:
    from opskit.targets import Target

# A status row (`status --json`, what scripts rely on): each key and the SQL that reads it from the
# runs table. status_rows builds dicts from it; status_json lets SQLite write the JSON itself, so 100k
# rows cost no Python object each. `starts_in_s` (queued runs only) is computed here, not stored.
STATUS_FIELDS = {
    "run": "name", "phase": "phase", "config": "config", "seed": "seed", "target": "target", "attempt": "attempt",
    "state": "state", "stale": "stale = 1", "reason": "reason", "step": "step", "total_steps": "total_steps",
    "loss": "loss", "tokens_per_s": "tokens_per_s", "eta_s": "eta_s", "cache_bytes": "cache_bytes",
    "cache_tokens": "cache_tokens", "created_at": "created_at", "updated_at": "updated_at",
    "heartbeat_at": "heartbeat_at", "started_at": "started_at", "ended_at": "ended_at", "message": "message",
    "exit_code": "exit_code", "job_id": "job_id", "queue_pos": f"CASE WHEN state = '{states.QUEUED}' THEN queue_pos END",
    "gpus": "gpus", "starts_in_s": "NULL", "gpu_util": "gpu_util", "gpu_mem_mb": "gpu_mem_mb",
    "gpu_power_w": "gpu_power_w",
}
BOOLEAN_FIELDS = ("stale",)


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
        rows = store.select_fields(STATUS_FIELDS, **filters, unfinished=True)
        rows += store.select_fields(STATUS_FIELDS, **filters, recently_ended=recent)
        rows.sort(key=lambda r: (r["created_at"] or 0, r["run"]))
    else:
        rows = store.select_fields(STATUS_FIELDS, **filters, states=sel.states)
    counts = store.state_counts(**filters, states=sel.states)
    total = sum(n for per_state in counts.values() for n in per_state.values())
    return {"runs": status_rows(store, rows), "counts": counts, "total": total, "hidden": total - len(rows),
            "capped": capped}


def status_json(store: Store, sel: Selection = Selection()) -> list[str]:
    """Every selected run's status row as a JSON object, written by SQLite (`status --json`)."""
    filters = {"phases": sel.phases, "targets": sel.targets, "since": sel.since, "states": sel.states}
    rows = store.select_fields_json(STATUS_FIELDS, BOOLEAN_FIELDS, **filters)
    queued = [i for i, (state, _) in enumerate(rows) if state == states.QUEUED]
    out = [text for _, text in rows]
    if queued:  # the few rows with an estimated start: through Python
        parsed = [json.loads(out[i]) for i in queued]
        for i, row in zip(queued, status_rows(store, parsed)):
            out[i] = json.dumps(row, separators=(",", ":"))
    return out


def status_of(store: Store, runs: list[str]) -> list[dict]:
    """Status rows of the named runs (launch --wait)."""
    return status_rows(store, store.select_fields(STATUS_FIELDS, names=runs))


def status_rows(store: Store, rows: list[dict]) -> list[dict]:
    """Status rows (STATUS_FIELDS' keys) with their booleans and the queued runs' estimated starts."""
    starts = _estimated_starts(store, {r["target"] for r in rows if r["state"] == states.QUEUED})
    for r in rows:
        r["stale"] = bool(r["stale"])
        if r["state"] == states.QUEUED:
            r["starts_in_s"] = starts.get(r["run"])
    return rows


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
