"""Processes of runs on a target: start one detached, tell whether it lives, stop its whole tree.

Standard library only (it runs with the box's python3); shared by remote/agent.py and the queue's
supervisor. A run's process is named by the contract's pid file: "<pid> <kernel start time>".
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from opskit import states
from remote.faults import kill_point
from train import contract as C

DETACH = Path(__file__).resolve().parent / "detach.sh"


def proc_start_time(pid: int) -> str | None:
    """Kernel start time of a pid (field 22 of /proc/PID/stat), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def pid_alive(run_dir: Path) -> bool:
    """Whether the process recorded in the run's pid file still runs (same start time, not a zombie)."""
    recorded = C.read_pid(run_dir)
    if recorded is None:
        return False
    pid, start = recorded
    if proc_start_time(pid) != start:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class AlreadyRunning(Exception):
    """The run's recorded process still runs; it is not started twice."""


def start_detached(workdir: str, run: str, cmd: list[str], env: dict[str, str]) -> int:
    """Start `cmd` through detach.sh in a session of its own (it outlives opskit and ssh), appending to
    the run's log; record its pid file. Returns the pid."""
    run_dir = C.run_dir(workdir, run)
    run_dir.mkdir(parents=True, exist_ok=True)
    if pid_alive(run_dir):
        raise AlreadyRunning(f"run {run} is already running on this target")
    (run_dir / C.EXIT_CODE).unlink(missing_ok=True)  # a previous attempt's must not end this one
    full_env = {**os.environ, **env}
    with open(os.devnull, "rb") as null_in, open(run_dir / C.LOG, "ab") as log:
        proc = subprocess.Popen(["bash", str(DETACH), str(run_dir), *cmd], stdin=null_in, stdout=log,
                                stderr=log, env=full_env, start_new_session=True, close_fds=True)
    kill_point("forked")
    start_time = None
    for _ in range(50):  # /proc entry appears at once; loop guards against a slow fork
        start_time = proc_start_time(proc.pid)
        if start_time:
            break
        time.sleep(0.01)
    C.write_pid(run_dir, proc.pid, start_time)
    return proc.pid


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), from the parent pids in /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = [], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        out += frontier
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL `pid`, its process group and every descendant. torchrun starts each worker in a session
    of its own, so the launcher's group alone would leave the workers running (and holding GPUs). All
    are stopped first, so that no launcher sees a worker die and starts another."""
    tree = [pid, *descendants(pid)]
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for p in tree:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def find_process_with_env(needle: bytes) -> int | None:
    """A live process whose environment holds the NUL-terminated `needle` (e.g. b"K=V\\0")."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "environ").read_bytes() + b"\0":
                    return int(proc.name)
            except OSError:
                continue
    return None


def read_heartbeat(run_dir: Path) -> tuple[dict | None, str | None, float | None]:
    """(status, problem, written_at) of a run's status.json: the parsed heartbeat, or None with what
    is wrong with it (not JSON, not an object, a field of the wrong type); its mtime either way."""
    path = run_dir / C.STATUS
    try:
        text = path.read_text()
        written_at = path.stat().st_mtime
    except FileNotFoundError:
        return None, None, None
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{C.STATUS} unreadable: {getattr(e, 'strerror', None) or e}", None
    try:
        status = json.loads(text)
    except ValueError as e:
        return None, f"{C.STATUS} is not valid JSON ({getattr(e, 'msg', e)})", written_at
    problem = states.heartbeat_problem(status)
    return (None, problem, written_at) if problem else (status, None, written_at)


def run_facts(run_dir: Path) -> dict:
    """What the run directory says of a run: its heartbeat (or what is wrong with it), exit code, whether
    its process lives and whether it was ever started here (opskit.states.observed turns this into an
    Observation)."""
    status, problem, written_at = read_heartbeat(run_dir)
    return {"status": status, "status_error": problem, "status_written_at": written_at,
            "exit_code": C.read_exit_code(run_dir), "alive": pid_alive(run_dir),
            "started": (run_dir / C.PID).exists(), "exists": run_dir.exists()}


def disk_facts(path: str | os.PathLike) -> dict | None:
    """Free and total bytes of the filesystem holding `path` (its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return {"path": str(path), "free_bytes": st.f_bavail * st.f_frsize, "total_bytes": st.f_blocks * st.f_frsize}
