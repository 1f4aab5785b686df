#!/usr/bin/env python3
"""The target's queue (docs/queue.md): files under <workdir>/queue/ and the supervisor that starts
queued runs as GPUs free up. Standard library only; it keeps going with opskit's laptop closed.

    supervisor.py --workdir W        (started detached by `agent.py ensure-supervisor`)

Every change of the queue happens under an flock of queue/lock; the running supervisor also holds
queue/supervisor.lock for its whole life, so "is it alive?" is a non-blocking lock attempt.
An entry is renamed pending/ -> started/ before its run starts, so no run starts twice.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from opskit import queue as Q  # noqa: E402  (pure, standard library only)
from remote import agent  # noqa: E402
from train import contract as C  # noqa: E402

POLL_S = 1.0
IDLE_EXIT_S = 60.0  # nothing pending or running for this long: exit (the next opskit call restarts it)
ENTRY_ENV = "OPSKIT_QUEUE_ENTRY"  # "<workdir>#<seq>" in each started run's environment


class QueueError(Exception):
    """A queue operation that cannot be done; the message says why."""


def qdir(workdir: str) -> Path:
    return Path(workdir) / "queue"


def _entry_name(seq: int) -> str:
    return f"{seq:06d}.json"


@contextmanager
def locked(workdir: str):
    d = qdir(workdir)
    for sub in ("pending", "started", "finished", "removed"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    with open(d / "lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield d
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _entries(d: Path, sub: str) -> list[dict]:
    out = []
    for path in sorted((d / sub).glob("*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # a half-written file cannot exist (atomic writes); a vanished one is skipped
    return out


def read_config(workdir: str) -> dict:
    return C.read_json(qdir(workdir) / "config.json") or {}


# ------------------------------------------------------------------ facts about runs


def run_state(workdir: str, run: str) -> str:
    """done | failed | cancelled | lost | running | unknown, from the run directory (exit_code,
    heartbeat, pid): the same facts, in the same order, as opskit.states.derive_state."""
    run_dir = C.run_dir(workdir, run)
    if not run_dir.exists():
        return "unknown"
    try:
        code = int((run_dir / C.EXIT_CODE).read_text().strip())
    except (OSError, ValueError):
        code = None
    if code is not None:
        hb_state = (C.read_json(run_dir / C.STATUS) or {}).get("state")
        if code == C.EXIT_OK and hb_state == "done":
            return "done"
        return "cancelled" if code != C.EXIT_OK and hb_state == "interrupted" else "failed"
    if agent._pid_alive(run_dir):
        return "running"
    return "lost" if (run_dir / C.PID).exists() else "unknown"


def _dependency_states(workdir: str, pending: list[dict], started: list[dict]) -> dict[str, str]:
    queued = {e["run"] for e in pending}
    running = {e["run"] for e in started}
    deps = {dep for e in pending for dep in e.get("after") or []}
    return {dep: "queued" if dep in queued else "running" if dep in running else run_state(workdir, dep)
            for dep in deps}


def _has_ended(workdir: str, entry: dict) -> bool:
    run_dir = C.run_dir(workdir, entry["run"])
    return (run_dir / C.EXIT_CODE).exists() or not agent._pid_alive(run_dir)


def _finish(workdir: str, d: Path, entry: dict, log: bool = True) -> None:
    """Move an ended run's entry to finished/ with its exit code (under the queue lock)."""
    try:
        code = int((C.run_dir(workdir, entry["run"]) / C.EXIT_CODE).read_text().strip())
    except (OSError, ValueError):
        code = None
    entry.update(exit_code=code, ended_at=time.time())
    name = _entry_name(entry["seq"])
    C.atomic_write_json(d / "started" / name, entry)
    os.rename(d / "started" / name, d / "finished" / name)
    if log:  # the supervisor's log; not the agent's stdout, which carries its JSON answer
        _log(f"{entry['run']} (entry {entry['seq']}) ended, exit code {code}")


def port_free(port: int) -> bool:
    """Can a rendezvous server listen on this port of the host right now?"""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def port_offset(workdir: str) -> int:
    """Where this workdir's queue starts looking for ports, so two queues on one host rarely race."""
    return zlib.crc32(str(Path(workdir).resolve()).encode()) % Q.PORT_RANGE


def _find_process(token: str) -> int | None:
    """A live process whose environment carries `token` (a start the supervisor did not finish recording)."""
    needle = f"{ENTRY_ENV}={token}".encode() + b"\0"
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "environ").read_bytes() + b"\0":
                    return int(proc.name)
            except OSError:
                continue
    return None


# ------------------------------------------------------------------ operations opskit calls (via agent.py)


def enqueue(workdir: str, entry: dict, config: dict | None) -> dict:
    """Append a run to the queue: entry = {run, command, env, gpus, after, attempt}."""
    run = entry["run"]
    with locked(workdir) as d:
        if config is not None:
            C.atomic_write_json(d / "config.json", config)
        for e in _entries(d, "started"):  # ended (a stalled run just killed by resume): the next tick would
            if e["run"] == run and e.get("pid") and _has_ended(workdir, e):
                _finish(workdir, d, e, log=False)
        for sub in ("pending", "started"):
            if any(e["run"] == run for e in _entries(d, sub)):
                raise QueueError(f"run {run} is already {'queued' if sub == 'pending' else 'started'} here")
        run_dir = C.run_dir(workdir, run)
        if agent._pid_alive(run_dir):
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
        C.atomic_write_json(d / "pending" / _entry_name(seq), record)
        position = Q.positions(_entries(d, "pending"))[run]
    return {"run": run, "seq": seq, "position": position, "supervisor": ensure_running(workdir)}


def dequeue(workdir: str, run: str) -> dict:
    """Remove a run that has not started yet; a started one is left to `agent.py signal`."""
    with locked(workdir) as d:
        for e in _entries(d, "pending"):
            if e["run"] == run:
                os.rename(d / "pending" / _entry_name(e["seq"]), d / "removed" / _entry_name(e["seq"]))
                return {"removed": True, "seq": e["seq"]}
        started = any(e["run"] == run for e in _entries(d, "started"))
    return {"removed": False, "started": started}


def move_top(workdir: str, run: str) -> dict:
    with locked(workdir) as d:
        pending = _entries(d, "pending")
        entry = next((e for e in pending if e["run"] == run), None)
        if entry is None:
            raise QueueError(f"run {run} is not waiting in this target's queue")
        entry["order"] = min(e.get("order", e["seq"]) for e in pending) - 1
        C.atomic_write_json(d / "pending" / _entry_name(entry["seq"]), entry)
        return {"run": run, "position": Q.positions(_entries(d, "pending"))[run]}


def state(workdir: str, finished_limit: int = 20) -> dict:
    """What is running and what waits (in order, with the reason), for `opskit queue` and status."""
    config = read_config(workdir)
    with locked(workdir) as d:
        pending = Q.order(_entries(d, "pending"))
        started = _entries(d, "started")
        finished = _entries(d, "finished")[-finished_limit:]
        plan = Q.plan_starts(config, pending, started, _dependency_states(workdir, pending, started))
    return {"now": time.time(), "config": config, "supervisor": supervisor_info(workdir),
            "running": [{k: e.get(k) for k in ("run", "seq", "attempt", "slots", "cuda_visible_devices", "port",
                                               "started_at", "pid")} for e in started],
            "pending": [{"run": e["run"], "seq": e["seq"], "position": i, "attempt": e.get("attempt"),
                         "units": Q.units_per_run(config, e.get("gpus")), "after": e.get("after") or [],
                         "waiting": plan.waiting.get(e["seq"], "starting")}
                        for i, e in enumerate(pending, start=1)],
            "finished": [{k: e.get(k) for k in ("run", "seq", "attempt", "slots", "cuda_visible_devices", "port",
                                                "started_at", "ended_at", "exit_code", "error")} for e in finished]}


# ------------------------------------------------------------------ supervisor lifecycle


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


def ensure_running(workdir: str) -> dict:
    """Start the supervisor, detached, when the queue has work and none holds the lock."""
    info = supervisor_info(workdir)
    if info["alive"] or not has_work(workdir):
        return {**info, "started": False}
    d = qdir(workdir)
    with open(os.devnull, "rb") as null_in, open(d / "supervisor.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--workdir", str(workdir)],
                                stdin=null_in, stdout=log, stderr=log, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        info = supervisor_info(workdir)
        # Ours holds the lock a moment before it rewrites supervisor.pid: wait for its own pid there
        # (or for it to exit: another supervisor won the lock).
        if (info["alive"] and info["pid"] == proc.pid) or proc.poll() is not None:
            break
        time.sleep(0.02)
    return {**info, "started": True, "pid": info["pid"] or proc.pid}


def _log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {msg}", flush=True)


class Supervisor:
    def __init__(self, workdir: str):
        self.workdir = str(Path(workdir).resolve())
        self.idle_since: float | None = None

    def tick(self) -> bool:
        """One pass: record ended runs, recover half-done starts, start what fits. False: time to exit."""
        _reap_children()
        config = read_config(self.workdir)
        with locked(self.workdir) as d:
            started = []
            for e in _entries(d, "started"):
                if e.get("pid") is None:
                    self._recover(d, e, config)
                elif _has_ended(self.workdir, e):
                    _finish(self.workdir, d, e)
                    continue
                started.append(e)
            pending = Q.order(_entries(d, "pending"))
            plan = Q.plan_starts(config, pending, started, _dependency_states(self.workdir, pending, started),
                                 port_ok=port_free, port_offset=port_offset(self.workdir))
            by_seq = {e["seq"]: e for e in pending}
            for s in plan.starts:
                self._start(d, by_seq[s.seq], s, config)
            if pending or started or plan.starts:
                self.idle_since = None
                return True
            self.idle_since = self.idle_since or time.monotonic()
            return time.monotonic() - self.idle_since < float(config.get("idle_exit_s") or IDLE_EXIT_S)

    def _start(self, d: Path, entry: dict, s: Q.Start, config: dict) -> None:
        name = _entry_name(entry["seq"])
        os.rename(d / "pending" / name, d / "started" / name)  # from here on it is never started again
        cuda = s.cuda_visible_devices(config)
        entry.update(slots=list(s.slots), cuda_visible_devices=cuda, port=s.port, started_at=time.time(), pid=None)
        C.atomic_write_json(d / "started" / name, entry)
        self._launch(d, entry)

    def _launch(self, d: Path, entry: dict) -> None:
        name = _entry_name(entry["seq"])
        env = {**entry["env"], ENTRY_ENV: f"{self.workdir}#{entry['seq']}"}
        if entry.get("cuda_visible_devices") is not None:
            env["CUDA_VISIBLE_DEVICES"] = entry["cuda_visible_devices"]
        command = [a.replace(Q.PORT_PLACEHOLDER, str(entry["port"])) for a in entry["command"]]
        run_dir = C.run_dir(self.workdir, entry["run"])
        try:  # a full disk or a broken run directory fails this run, not the supervisor (and the queue)
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / C.LOG, "a") as log:
                log.write(f"=== opskit queue: entry {entry['seq']}, CUDA_VISIBLE_DEVICES="
                          f"{entry.get('cuda_visible_devices') or '(unset)'}, rendezvous port {entry['port']}\n")
            entry["pid"] = agent.start(self.workdir, entry["run"], command, env)["pid"]
        except (OSError, SystemExit) as e:  # agent.start exits with a JSON error when the run is alive
            entry.update(error=f"could not start: {e}", ended_at=time.time())
            C.atomic_write_json(d / "started" / name, entry)
            os.rename(d / "started" / name, d / "finished" / name)
            _log(f"run {entry['run']} (entry {entry['seq']}) not started: {e}")
            return
        C.atomic_write_json(d / "started" / name, entry)
        _log(f"started {entry['run']} (entry {entry['seq']}) pid {entry['pid']} "
             f"CUDA_VISIBLE_DEVICES={entry.get('cuda_visible_devices')} port {entry['port']}")

    def _recover(self, d: Path, entry: dict, config: dict) -> None:
        """A started entry without a pid: the previous supervisor died during its start."""
        run_dir = C.run_dir(self.workdir, entry["run"])
        pid = None
        if (run_dir / C.PID).exists():
            pid = int((run_dir / C.PID).read_text().split()[0])
        else:
            pid = _find_process(f"{self.workdir}#{entry['seq']}")
            if pid is not None:  # started, pid file not written yet: write it as agent.start would
                C.atomic_write_text(run_dir / C.PID, f"{pid} {agent._proc_start_time(pid)}\n")
        if pid is None and not (run_dir / C.EXIT_CODE).exists():
            _log(f"entry {entry['seq']} ({entry['run']}) was moved but never started: starting it")
            return self._launch(d, entry)
        entry["pid"] = pid or -1
        C.atomic_write_json(d / "started" / _entry_name(entry["seq"]), entry)
        _log(f"adopted {entry['run']} (entry {entry['seq']}) pid {pid}")


def _reap_children() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="supervisor.py")
    p.add_argument("--workdir", required=True)
    a = p.parse_args(argv)
    d = qdir(a.workdir)
    d.mkdir(parents=True, exist_ok=True)
    lock = open(d / "supervisor.lock", "a")
    for attempt in range(40):  # `supervisor_info` probes the lock for an instant: retry past a probe
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            time.sleep(0.05)
    else:
        _log("another supervisor holds the lock; exiting")
        return
    C.atomic_write_text(d / "supervisor.pid", f"{os.getpid()} {agent._proc_start_time(os.getpid())}\n")
    _log(f"supervisor {os.getpid()} watching {d}")
    sup = Supervisor(a.workdir)
    while True:
        if not sup.tick():
            # Give the lock up under the queue lock, so an enqueue either sees us alive and we see its
            # entry, or sees us gone and starts a new supervisor.
            with locked(a.workdir):
                if not has_work(a.workdir):
                    lock.close()
                    _log("idle; exiting")
                    return
            sup.idle_since = None
        time.sleep(float(read_config(a.workdir).get("poll_s") or POLL_S))


if __name__ == "__main__":
    main()
