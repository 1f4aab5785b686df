"""The target's queue on disk (docs/queue.md): entries under <workdir>/queue/ and the operations opskit
calls on them through agent.py. Standard library only; the supervisor loop is remote/supervisor.py.

Every change of the queue happens under an flock of queue/lock; the running supervisor also holds
queue/supervisor.lock for its whole life, so "is it alive?" is a non-blocking lock attempt.
An entry is renamed pending/ -> started/ before its run starts, so no run starts twice.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from opskit import queue as Q  # noqa: E402  (pure, standard library only)
from opskit import states  # noqa: E402  (pure, standard library only)
from remote import processes  # noqa: E402
from train import contract as C  # noqa: E402

SUPERVISOR = Path(__file__).resolve().parent / "supervisor.py"
SUBDIRS = ("pending", "started", "finished", "removed")


class QueueError(Exception):
    """A queue operation that cannot be done; the message says why."""


def qdir(workdir: str) -> Path:
    return Path(workdir) / "queue"


def entry_name(seq: int) -> str:
    return f"{seq:06d}.json"


@contextmanager
def locked(workdir: str):
    d = qdir(workdir)
    for sub in SUBDIRS:
        (d / sub).mkdir(parents=True, exist_ok=True)
    with open(d / "lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield d
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def entries(d: Path, sub: str) -> list[dict]:
    out = []
    for path in sorted((d / sub).glob("*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # a half-written file cannot exist (atomic writes); a vanished one is skipped
    return out


def read_config(workdir: str) -> dict:
    return C.read_json(qdir(workdir) / "config.json") or {}


def log(msg: str) -> None:
    """A line of the supervisor's log (its stdout); never the agent's stdout, which carries JSON."""
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {msg}", flush=True)


# ------------------------------------------------------------------ facts about runs


def run_state(workdir: str, run: str) -> str:
    """An ended state, Q.RUNNING or Q.NOT_HERE: the run directory's facts through opskit.states."""
    run_dir = C.run_dir(workdir, run)
    facts = processes.run_facts(run_dir)
    if not facts["exists"] or (not facts["started"] and facts["exit_code"] is None):
        return Q.NOT_HERE
    state, _ = states.derive_state(states.observed(facts, time.time()))
    return state if state in states.ENDED else Q.RUNNING


def dependency_states(workdir: str, pending: list[dict], started: list[dict]) -> dict[str, str]:
    queued = {e["run"] for e in pending}
    running = {e["run"] for e in started}
    deps = {dep for e in pending for dep in e.get("after") or []}
    return {dep: states.QUEUED if dep in queued else Q.RUNNING if dep in running else run_state(workdir, dep)
            for dep in deps}


def has_ended(workdir: str, entry: dict) -> bool:
    run_dir = C.run_dir(workdir, entry["run"])
    return (run_dir / C.EXIT_CODE).exists() or not processes.pid_alive(run_dir)


def finish(workdir: str, d: Path, entry: dict, quiet: bool = False) -> None:
    """Move an ended run's entry to finished/ with its exit code (under the queue lock)."""
    code = C.read_exit_code(C.run_dir(workdir, entry["run"]))
    entry.update(exit_code=code, ended_at=time.time())
    name = entry_name(entry["seq"])
    C.atomic_write_json(d / "started" / name, entry)
    os.rename(d / "started" / name, d / "finished" / name)
    if not quiet:
        log(f"{entry['run']} (entry {entry['seq']}) ended, exit code {code}")


# ------------------------------------------------------------------ operations opskit calls (via agent.py)


def enqueue(workdir: str, entry: dict, config: dict | None) -> dict:
    """Append a run to the queue: entry = {run, command, env, gpus, after, attempt}."""
    run = entry["run"]
    with locked(workdir) as d:
        if config is not None:
            C.atomic_write_json(d / "config.json", config)
        for e in entries(d, "started"):  # ended (a stalled run just killed by resume): the next tick would
            if e["run"] == run and e.get("pid") and has_ended(workdir, e):
                finish(workdir, d, e, quiet=True)
        for sub in ("pending", "started"):
            if any(e["run"] == run for e in entries(d, sub)):
                raise QueueError(f"run {run} is already {'waiting' if sub == 'pending' else 'started'} here")
        run_dir = C.run_dir(workdir, run)
        if processes.pid_alive(run_dir):
            raise QueueError(f"run {run} is already running on this target")
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (C.EXIT_CODE, C.PID):  # a previous attempt's: the run must read as queued now
            (run_dir / stale).unlink(missing_ok=True)
        seq_file = d / "seq"
        seq = int(seq_file.read_text() or 0) + 1 if seq_file.exists() else 1
        C.atomic_write_text(seq_file, f"{seq}\n")
        record = {"run": run, "seq": seq, "order": seq, "command": list(entry["command"]),
                  "env": dict(entry.get("env") or {}), "gpus": entry.get("gpus"),
                  "after": list(entry.get("after") or []), "attempt": entry.get("attempt", 1),
                  "enqueued_at": time.time()}
        C.atomic_write_json(d / "pending" / entry_name(seq), record)
        position = Q.positions(entries(d, "pending"))[run]
    return {"run": run, "seq": seq, "position": position, "supervisor": ensure_running(workdir)}


def dequeue(workdir: str, run: str) -> dict:
    """Remove a run that has not started yet; a started one is left to `agent.py signal`."""
    with locked(workdir) as d:
        for e in entries(d, "pending"):
            if e["run"] == run:
                os.rename(d / "pending" / entry_name(e["seq"]), d / "removed" / entry_name(e["seq"]))
                return {"removed": True, "seq": e["seq"]}
        started = any(e["run"] == run for e in entries(d, "started"))
    return {"removed": False, "started": started}


def move_top(workdir: str, run: str) -> dict:
    with locked(workdir) as d:
        pending = entries(d, "pending")
        entry = next((e for e in pending if e["run"] == run), None)
        if entry is None:
            raise QueueError(f"run {run} is not waiting in this target's queue")
        entry["order"] = min(e.get("order", e["seq"]) for e in pending) - 1
        C.atomic_write_json(d / "pending" / entry_name(entry["seq"]), entry)
        return {"run": run, "position": Q.positions(entries(d, "pending"))[run]}


def state(workdir: str, finished_limit: int = 20) -> dict:
    """What is running and what waits (in order, with the reason), for `opskit queue` and status."""
    config = read_config(workdir)
    with locked(workdir) as d:
        pending = Q.order(entries(d, "pending"))
        started = entries(d, "started")
        finished = entries(d, "finished")[-finished_limit:]
        plan = Q.plan_starts(config, pending, started, dependency_states(workdir, pending, started))
    return {"now": time.time(), "config": config, "supervisor": supervisor_info(workdir),
            "running": [{k: e.get(k) for k in ("run", "seq", "attempt", "slots", "cuda_visible_devices", "port",
                                               "started_at", "pid")} for e in started],
            "pending": [{"run": e["run"], "seq": e["seq"], "position": i, "attempt": e.get("attempt"),
                         "units": Q.units_per_run(config, e.get("gpus")), "after": e.get("after") or [],
                         "waiting": plan.waiting.get(e["seq"], "starts now")}
                        for i, e in enumerate(pending, start=1)],
            "finished": [{k: e.get(k) for k in ("run", "seq", "attempt", "slots", "cuda_visible_devices", "port",
                                                "started_at", "ended_at", "exit_code", "error")} for e in finished]}


# ------------------------------------------------------------------ the supervisor's lifecycle


def supervisor_info(workdir: str) -> dict:
    d = qdir(workdir)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "supervisor.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = int((d / "supervisor.pid").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pid = None
            return {"alive": True, "pid": pid}
        fcntl.flock(f, fcntl.LOCK_UN)
    return {"alive": False, "pid": None}


def has_work(workdir: str) -> bool:
    d = qdir(workdir)
    return any((d / "pending").glob("*.json")) or any((d / "started").glob("*.json"))


def ensure_running(workdir: str, even_idle: bool = False) -> dict:
    """Start the supervisor, detached, when the queue has work (or `even_idle`: the box is watched,
    remote/watch.py) and none holds the lock."""
    info = supervisor_info(workdir)
    if info["alive"] or not (even_idle or has_work(workdir)):
        return {**info, "started": False}
    d = qdir(workdir)
    with open(os.devnull, "rb") as null_in, open(d / "supervisor.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, str(SUPERVISOR), "--workdir", str(workdir)],
                                stdin=null_in, stdout=out, stderr=out, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        info = supervisor_info(workdir)
        # Ours holds the lock a moment before it rewrites supervisor.pid: wait for its own pid there
        # (or for it to exit: another supervisor won the lock).
        if (info["alive"] and info["pid"] == proc.pid) or proc.poll() is not None:
            break
        time.sleep(0.02)
    return {**info, "started": True, "pid": info["pid"] or proc.pid}
