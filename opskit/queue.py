"""Target queues, pure planning (docs/queue.md): which queued runs start now and on which GPUs and
port, queue positions, and estimated start times from the running runs' ETAs.

Standard library only (and opskit.states, which is too): remote/supervisor.py imports this module on
the target, where only `python3` may exist.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable

from opskit import states

DEFAULT_BASE_PORT = 29600  # rendezvous ports handed out from here (torchrun's own default is 29500)
PORT_RANGE = 1000
PORT_PLACEHOLDER = "{rdzv_port}"  # replaced in a queued command by the port the run was given
# What the queue knows of a run it waits for, besides the run states of opskit.states.
RUNNING = "running"  # its process lives (any live state)
NOT_HERE = "unknown"  # no such run on this target


def slot_count(config: dict) -> int:
    """How many units the target shares out: its GPUs, or `max_parallel` runs on a CPU target."""
    gpus = int(config.get("gpus") or 0)
    if gpus:
        return gpus
    return max(1, int(config.get("max_parallel") or 1))


def units_per_run(config: dict, asked: int | None = None) -> int:
    """GPUs a run takes (`asked`, else the target's gpus_per_run, else all); 1 slot on a CPU target."""
    gpus = int(config.get("gpus") or 0)
    if not gpus:
        return 1
    return int(asked or config.get("gpus_per_run") or gpus)


def max_parallel(config: dict) -> int | None:
    value = config.get("max_parallel")
    return int(value) if value else None


@dataclass(frozen=True)
class Start:
    """One queued entry the supervisor starts now."""

    seq: int
    run: str
    slots: tuple[int, ...]  # GPU ids on a GPU target (CUDA_VISIBLE_DEVICES), slot numbers on a CPU one
    port: int

    def cuda_visible_devices(self, config: dict) -> str | None:
        return ",".join(str(g) for g in self.slots) if int(config.get("gpus") or 0) else None


@dataclass
class Plan:
    starts: list[Start] = field(default_factory=list)
    waiting: dict[int, str] = field(default_factory=dict)  # seq -> why it does not start yet


def dependency_state(after: list[str], run_states: dict[str, str]) -> tuple[bool, str | None]:
    """(ready, reason) for an entry's `after` runs; run_states maps run -> an ended state of
    opskit.states, QUEUED, RUNNING or NOT_HERE."""
    for dep in after:
        state = run_states.get(dep, NOT_HERE)
        if state == states.DONE:
            continue
        if state in states.ENDED:
            was = "was " if state == states.CANCELLED else ""
            return False, f"after {dep}, which {was}{state}: resume or rerun it, or cancel this run"
        if state == NOT_HERE:
            return False, f"after {dep}, which is not on this target"
        return False, f"after {dep} ({state})"
    return True, None


def blocked(config: dict, entry: dict, run_states: dict[str, str]) -> bool:
    """Whether a pending entry cannot start without someone acting: it asks for more GPUs than the
    target has, or waits for a run that ended without being done or is not on this target."""
    if units_per_run(config, entry.get("gpus")) > slot_count(config):
        return True
    return any(run_states.get(dep, NOT_HERE) == NOT_HERE or run_states.get(dep) in states.ENDED - {states.DONE}
               for dep in entry.get("after") or [])


def plan_starts(config: dict, pending: list[dict], running: list[dict], run_states: dict[str, str],
                port_ok: Callable[[int], bool] = lambda port: True, port_offset: int = 0) -> Plan:
    """Which pending entries start now, in queue order.

    `pending`: entries in queue order ({seq, run, gpus, after}); `running`: started entries still
    running ({slots, port}). Entries waiting on a dependency are skipped; among the ready ones the
    order is strict: when the first one does not fit, nothing behind it starts (no starving a big run).
    Ports: the first one from `base_port + port_offset` (wrapping in the range) that no running entry
    holds and `port_ok` accepts (the supervisor checks the host: other queues and programs use ports too).
    """
    total = slot_count(config)
    limit = max_parallel(config) or total
    used = {g for r in running for g in r.get("slots", [])}
    used_ports = {r["port"] for r in running if r.get("port")}
    free = [g for g in range(total) if g not in used]
    n_running = len(running)
    base = int(config.get("base_port") or DEFAULT_BASE_PORT)
    unit = "GPUs" if int(config.get("gpus") or 0) else "a free slot"
    plan = Plan()
    blocked = False
    for entry in pending:
        ready, why = dependency_state(entry.get("after") or [], run_states)
        if not ready:
            plan.waiting[entry["seq"]] = why
            continue
        need = units_per_run(config, entry.get("gpus"))
        if need > total:
            plan.waiting[entry["seq"]] = f"asks for {need} GPUs, the target has {total}"
            continue
        if blocked or need > len(free) or n_running >= limit:
            blocked = True
            plan.waiting[entry["seq"]] = f"waiting for {unit}"
            continue
        ids, free = free[:need], free[need:]
        port = next(p for p in (base + (port_offset + i) % PORT_RANGE for i in range(PORT_RANGE))
                    if p not in used_ports and port_ok(p))
        used_ports.add(port)
        n_running += 1
        plan.starts.append(Start(entry["seq"], entry["run"], tuple(ids), port))
    return plan


def order(entries: list[dict]) -> list[dict]:
    """Queue order: `order` key (moved entries get a smaller one), then arrival `seq`."""
    return sorted(entries, key=lambda e: (e.get("order", e["seq"]), e["seq"]))


def estimate_start_times(slots: int, running: list[tuple[int, float | None]],
                         queued: list[tuple[str, int, float | None]]) -> dict[str, float | None]:
    """Seconds from now until each queued run starts, or None when an ETA it depends on is unknown.

    `running`: (units, eta_s) per running run; `queued`: (run, units, expected duration_s) in queue
    order. Simulates the supervisor's strict order: a run starts once enough units are free.
    """
    ends: list[float] = []  # min-heap of end times, one item per unit in use
    free = slots
    for units, eta in running:
        free -= units
        for _ in range(units):
            heapq.heappush(ends, math.inf if eta is None else max(0.0, float(eta)))
    out: dict[str, float | None] = {}
    t = 0.0
    for run, units, duration in queued:
        units = min(units, slots)
        while free < units:
            t = max(t, heapq.heappop(ends))
            free += 1
        out[run] = None if math.isinf(t) else t
        free -= units
        end = math.inf if duration is None or math.isinf(t) else t + float(duration)
        for _ in range(units):
            heapq.heappush(ends, end)
    return out


def positions(entries: list[dict]) -> dict[str, int]:
    """1-based queue position of each pending run."""
    return {e["run"]: i for i, e in enumerate(order(entries), start=1)}


def remaining_s(eta_s: float | None, heartbeat_at: float | None, now: float) -> float | None:
    """A running run's ETA counted from `now` (the heartbeat gave it at `heartbeat_at`)."""
    if eta_s is None:
        return None
    return max(0.0, float(eta_s) - max(0.0, now - float(heartbeat_at or now)))


def queue_fields(queue: dict | None, run: str, attempt: int) -> dict:
    """Run-row fields of this attempt of a run from its target's queue state (agent queue-state):
    queue_pos and why it waits, or the GPUs, start time and start error of its entry."""
    if queue is None:
        return {}
    for e in queue["pending"]:
        if e["run"] == run:
            return {"queue_pos": e["position"], "message": e["waiting"]}
    for e in queue["running"] + queue["finished"][::-1]:  # newest finished first
        if e["run"] == run and e.get("attempt", attempt) == attempt:
            error = e.get("error")
            if e in queue["finished"] and not e.get("pid") and not error:  # its start failed unrecorded
                error = "its start failed and the queue could not record why (a full disk?)"
            return {"queue_pos": None, "gpus": e.get("cuda_visible_devices"), "started_at": e.get("started_at"),
                    "start_error": error, "start_no_space": bool(e.get("no_space"))}
    # Nowhere in the queue: a torn entry file (moved to queue/broken/), or a launch killed before
    # its enqueue. opskit.states.next_state fails a queued run that is not started either.
    torn = [b["file"] for b in queue.get("broken", []) if b.get("run") in (run, None)]
    return {"queue_pos": None, "entry_missing": f" (torn entry file {', '.join(torn)} moved to queue/broken/)"
            if torn else True}


def durations_by_phase(rows: list[dict], now: float) -> dict[str, float]:
    """Expected wall time of a run per phase: mean of finished runs, else of running ones (elapsed + ETA)."""
    done: dict[str, list[float]] = {}
    live: dict[str, list[float]] = {}
    for r in rows:
        if r.get("started_at") and r.get("ended_at") and r.get("state") == states.DONE:
            done.setdefault(r["phase"], []).append(r["ended_at"] - r["started_at"])
        elif r.get("started_at") and r.get("eta_s") is not None and not r.get("ended_at"):
            live.setdefault(r["phase"], []).append(now - r["started_at"] + float(r["eta_s"]))
    return {phase: sum(v) / len(v) for phase, v in {**live, **done}.items()}
