"""The target's queue on disk (docs/queue.md): entries under <workdir>/queue/ and the operations opskit
calls on them through agent.py. Standard library only; the supervisor loop is remote/supervisor.py,
the watchdog that restarts it remote/watchdog.py.

Every change of the queue happens under an flock of queue/lock; the running supervisor also holds
queue/supervisor.lock for its whole life (the watchdog queue/watchdog.lock), so "is it alive?" is a
non-blocking lock attempt. An entry is renamed pending/ -> started/ before its run starts, so no run
starts twice; an entry file that cannot be read is moved to broken/ and reported, never skipped.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from opskit import queue as Q  # noqa: E402  (pure, standard library only)
from opskit import states  # noqa: E402  (pure, standard library only)
from remote import processes  # noqa: E402
from remote.faults import kill_point  # noqa: E402
from train import contract as C  # noqa: E402

HERE = Path(__file__).resolve().parent
DAEMONS = {"supervisor": HERE / "supervisor.py", "watchdog": HERE / "watchdog.py"}
SUBDIRS = ("pending", "started", "finished", "removed", "broken")
ENTRY_ENV = "OPSKIT_QUEUE_ENTRY"  # "<workdir>#<seq>" in each started run's environment
AGENT_PYTHON_ENV = "OPSKIT_AGENT_PYTHON"  # the python detach.sh asks to restart the supervisor with
RUN_ENV_KEYS_ENV = "OPSKIT_RUN_ENV_KEYS"  # the variables a run got from its entry, not from the box
START_FIELDS = ("slots", "cuda_visible_devices", "port", "started_at", "pid")
# config.json keys the supervisor reads, and what each must be
CONFIG_INTS = ("gpus", "gpus_per_run", "max_parallel", "base_port")
CONFIG_SECONDS = ("idle_exit_s", "poll_s", "watchdog_s")


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


def log_to(d: Path, msg: str) -> None:
    """A line of queue/supervisor.log, from the supervisor, the watchdog or the agent (whose stdout
    carries its JSON). A full disk loses the line, never the process."""
    try:
        with open(d / "supervisor.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {msg}\n")
    except OSError:
        pass


def log(msg: str) -> None:
    """A line of a daemon's own output (the supervisor's stdout is supervisor.log); never the agent's
    stdout, which carries JSON. A full disk loses the line, never the daemon."""
    try:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {msg}", flush=True)
    except (OSError, ValueError):
        pass


# ------------------------------------------------------------------ entry files


def _entry_problem(entry, sub: str) -> str | None:
    if not isinstance(entry, dict):
        return "not a JSON object"
    if not isinstance(entry.get("run"), str) or not isinstance(entry.get("seq"), int):
        return "no run name or seq"
    if sub in ("pending", "started") and not (isinstance(entry.get("command"), list) and entry["command"]):
        return "no command"
    return None


def _read_entry(path: Path, sub: str) -> tuple[dict | None, str | None]:
    try:
        entry = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as e:  # ValueError: torn JSON, or bytes that are not UTF-8
        return None, f"not valid JSON ({getattr(e, 'msg', None) or e})"
    problem = _entry_problem(entry, sub)
    return (None, problem) if problem else (entry, None)


def run_in_torn_file(path: Path) -> str | None:
    """The run name a torn entry file still shows, if its "run" key was written before it broke."""
    try:
        m = re.search(r'"run":\s*"([^"]+)"', path.read_text(errors="replace"))
    except OSError:
        return None
    return m.group(1) if m else None


def entries(d: Path, sub: str) -> list[dict]:
    """The readable entries of pending/, started/, ... (under the queue lock). A file that is not an
    entry (torn by a crash outside opskit's atomic writes, edited by hand) is moved to broken/ and
    logged: it must not keep a run queued, nor the supervisor alive, for ever."""
    out = []
    for path in sorted((d / sub).glob("*.json")):
        entry, problem = _read_entry(path, sub)
        if problem:
            quarantine(d, sub, path, problem)
        elif entry is not None:
            out.append(entry)
    return out


def quarantine(d: Path, sub: str, path: Path, problem: str) -> None:
    dest = d / "broken" / f"{sub}-{path.name}"
    run = run_in_torn_file(path)
    try:
        os.rename(path, dest)
    except OSError as e:
        log_to(d, f"entry {sub}/{path.name} is broken ({problem}) and cannot be moved aside: {e}")
        return
    log_to(d, f"entry {sub}/{path.name} is broken ({problem}): moved to broken/{dest.name}; "
              f"run {run or '(name unreadable)'} will not start from it (launch it again)")


def broken_entries(d: Path) -> list[dict]:
    """What broken/ holds, with why each file is not an entry and the run it names (if readable)."""
    out = []
    for path in sorted((d / "broken").glob("*.json")):
        sub = path.name.split("-", 1)[0]
        _, problem = _read_entry(path, sub)
        out.append({"file": f"{sub}/{path.name.split('-', 1)[-1]}", "moved_to": f"broken/{path.name}",
                    "error": problem or "not an entry", "run": run_in_torn_file(path)})
    return out


def move(d: Path, entry: dict, src: str, dst: str) -> None:
    """Record `entry`'s fields in its file and move it from src/ to dst/. The rename needs no space,
    so on a full disk the entry still moves (without its new fields): the queue stays consistent."""
    name = entry_name(entry["seq"])
    try:
        C.atomic_write_json(d / src / name, entry)
    except OSError as e:
        log_to(d, f"entry {entry['seq']} ({entry['run']}): cannot record {dst} fields ({e}); moving it anyway")
    kill_point(f"{dst}-fields")
    os.rename(d / src / name, d / dst / name)


def load_config(workdir: str) -> tuple[dict, str | None]:
    """queue/config.json and what is wrong with it: a garbage file or a bad value falls back to the
    defaults (one CPU slot), and the problem is reported instead of a traceback."""
    path = qdir(workdir) / "config.json"
    try:
        config = C.read_json(path)
    except (OSError, ValueError) as e:
        return {}, f"queue/config.json is not valid JSON ({getattr(e, 'msg', None) or e}); using defaults until the next launch rewrites it"
    if config is None:
        return {}, None
    if not isinstance(config, dict):
        return {}, "queue/config.json is not a JSON object; using defaults until the next launch rewrites it"
    bad = [k for k in CONFIG_INTS if config.get(k) is not None
           and (isinstance(config[k], bool) or not isinstance(config[k], int) or config[k] < 0)]
    bad += [k for k in CONFIG_SECONDS if config.get(k) is not None
            and (isinstance(config[k], bool) or not isinstance(config[k], (int, float)) or config[k] <= 0)]
    if bad:
        return ({k: v for k, v in config.items() if k not in bad},
                f"queue/config.json has bad {', '.join(f'{k}={config[k]!r}' for k in bad)}; using defaults for them")
    return config, None


def read_config(workdir: str) -> dict:
    return load_config(workdir)[0]


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


def began(workdir: str, entry: dict) -> int | None:
    """The pid of a started entry's run if its process began (its pid file, or a live process that
    carries the entry in its environment: its pid file is written then), -1 if it began and ended
    already, None if it never began (its supervisor died between moving the entry and starting it)."""
    workdir = str(Path(workdir).resolve())
    run_dir = C.run_dir(workdir, entry["run"])
    recorded = C.read_pid(run_dir)
    if recorded:
        return recorded[0]
    pid = processes.find_process_with_env(f"{ENTRY_ENV}={workdir}#{entry['seq']}".encode() + b"\0")
    if pid is not None:
        try:  # as start_detached would have: signal and status need it
            C.write_pid(run_dir, pid, processes.proc_start_time(pid))
        except OSError as e:
            log_to(qdir(workdir), f"entry {entry['seq']} ({entry['run']}): cannot write its pid file: {e}")
        return pid
    return -1 if (run_dir / C.EXIT_CODE).exists() else None


def unstart(d: Path, entry: dict) -> None:
    """Put a started entry whose run never began back in pending/ (same seq and order): it starts again
    from the planner, with the GPUs and port free then. The rename comes first, so a crash at any
    point leaves it in exactly one place."""
    name = entry_name(entry["seq"])
    os.rename(d / "started" / name, d / "pending" / name)
    for key in START_FIELDS:
        entry.pop(key, None)
    try:
        C.atomic_write_json(d / "pending" / name, entry)
    except OSError:
        pass  # the leftover start fields are ignored in pending/


def finish(workdir: str, d: Path, entry: dict, quiet: bool = False) -> None:
    """Move an ended run's entry to finished/ with its exit code (under the queue lock)."""
    code = C.read_exit_code(C.run_dir(workdir, entry["run"]))
    entry.update(exit_code=code, ended_at=time.time())
    move(d, entry, "started", "finished")
    if not quiet:
        log_to(d, f"{entry['run']} (entry {entry['seq']}) ended, exit code {code}")


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
        try:
            seq = int(seq_file.read_text() or 0) + 1 if seq_file.exists() else 1
        except ValueError:  # a torn seq file: continue after the highest entry there is
            seq = 1 + max((int(p.stem.split("-")[-1]) for sub in SUBDIRS for p in (d / sub).glob("*.json")
                           if p.stem.split("-")[-1].isdigit()), default=0)
        C.atomic_write_text(seq_file, f"{seq}\n")
        record = {"run": run, "seq": seq, "order": seq, "command": list(entry["command"]),
                  "env": dict(entry.get("env") or {}), "gpus": entry.get("gpus"),
                  "after": list(entry.get("after") or []), "attempt": entry.get("attempt", 1),
                  "enqueued_at": time.time()}
        C.atomic_write_json(d / "pending" / entry_name(seq), record)
        position = Q.positions(entries(d, "pending"))[run]
    return {"run": run, "seq": seq, "position": position, "supervisor": ensure_running(workdir)}


def dequeue(workdir: str, run: str) -> dict:
    """Remove a run that has not started yet, also one moved to started/ whose process never began; a
    started one is left to `agent.py signal`."""
    with locked(workdir) as d:
        for e in entries(d, "pending"):
            if e["run"] == run:
                os.rename(d / "pending" / entry_name(e["seq"]), d / "removed" / entry_name(e["seq"]))
                return {"removed": True, "seq": e["seq"]}
        started = [e for e in entries(d, "started") if e["run"] == run]
        for e in started:
            if e.get("pid") is None and began(workdir, e) is None:
                os.rename(d / "started" / entry_name(e["seq"]), d / "removed" / entry_name(e["seq"]))
                log_to(d, f"entry {e['seq']} ({run}) cancelled before its run began")
                return {"removed": True, "seq": e["seq"]}
    return {"removed": False, "started": bool(started)}


def move_top(workdir: str, run: str) -> dict:
    with locked(workdir) as d:
        pending = entries(d, "pending")
        entry = next((e for e in pending if e["run"] == run), None)
        if entry is None:
            raise QueueError(f"run {run} is not waiting in this target's queue")
        entry["order"] = min(e.get("order", e["seq"]) for e in pending) - 1
        C.atomic_write_json(d / "pending" / entry_name(entry["seq"]), entry)
        return {"run": run, "position": Q.positions(entries(d, "pending"))[run]}


def _finished(d: Path, limit: int, runs: set[str]) -> list[dict]:
    """The last `limit` finished entries, and the newest one of each of `runs` not among them."""
    paths = sorted((d / "finished").glob("*.json"))
    recent, older_paths = paths[-limit:] if limit else [], paths[:-limit] if limit else paths
    out = []
    for path in recent:
        entry, problem = _read_entry(path, "finished")
        if problem:
            quarantine(d, "finished", path, problem)
        elif entry is not None:
            out.append(entry)
    missing = set(runs) - {e["run"] for e in out}
    older = []
    for path in reversed(older_paths):
        if not missing:
            break
        entry, _ = _read_entry(path, "finished")
        if entry and entry["run"] in missing:
            older.append(entry)
            missing.discard(entry["run"])
    return older[::-1] + out


def state(workdir: str, finished_limit: int = 20, runs: list[str] | tuple[str, ...] = ()) -> dict:
    """What is running and what waits (in order, with the reason), for `opskit queue` and status;
    `runs`: also the newest finished entry of each of these runs, however old."""
    config, config_problem = load_config(workdir)
    with locked(workdir) as d:
        pending = Q.order(entries(d, "pending"))
        started = entries(d, "started")
        running = {e["run"] for e in pending + started}
        finished = _finished(d, finished_limit, {r for r in runs if r not in running})
        plan = Q.plan_starts(config, pending, started, dependency_states(workdir, pending, started))
        broken = broken_entries(d)
    return {"now": time.time(), "config": config, "config_error": config_problem,
            "supervisor": daemon_info(workdir, "supervisor"), "watchdog": daemon_info(workdir, "watchdog"),
            "broken": broken,
            "running": [{k: e.get(k) for k in ("run", "seq", "attempt", "slots", "cuda_visible_devices", "port",
                                               "started_at", "pid")} for e in started],
            "pending": [{"run": e["run"], "seq": e["seq"], "position": i, "attempt": e.get("attempt"),
                         "units": Q.units_per_run(config, e.get("gpus")), "after": e.get("after") or [],
                         "waiting": plan.waiting.get(e["seq"], "starts now")}
                        for i, e in enumerate(pending, start=1)],
            "finished": [{k: e.get(k) for k in ("run", "seq", "attempt", "slots", "cuda_visible_devices", "port",
                                                "started_at", "ended_at", "exit_code", "error", "no_space", "pid")}
                         for e in finished]}


# ------------------------------------------------------------------ the supervisor's and watchdog's lifecycle


def hold_lock(path: Path):
    """The open file holding `path`'s flock for this process's life, or None when another holds it.
    `daemon_info` probes the lock for an instant: retry past a probe."""
    lock = open(path, "a")
    for _ in range(40):
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock
        except BlockingIOError:
            time.sleep(0.05)
    lock.close()
    return None


def write_pid_file(path: Path) -> None:
    """"pid start-time" of this process; on a full disk, in place over the last one, else not at all."""
    text = f"{os.getpid()} {processes.proc_start_time(os.getpid())}\n"
    try:
        C.atomic_write_text(path, text)
    except OSError as e:
        try:
            C.overwrite_in_place(path, text)
        except OSError:
            log_to(path.parent, f"cannot write {path.name}: {e}")


def daemon_info(workdir: str, name: str = "supervisor") -> dict:
    """Whether the supervisor (or the watchdog) of this workdir is alive, and its pid."""
    d = qdir(workdir)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{name}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = int((d / f"{name}.pid").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pid = None
            return {"alive": True, "pid": pid}
        fcntl.flock(f, fcntl.LOCK_UN)
    return {"alive": False, "pid": None}


def supervisor_info(workdir: str) -> dict:
    return daemon_info(workdir, "supervisor")


def has_work(workdir: str) -> bool:
    d = qdir(workdir)
    return any((d / "pending").glob("*.json")) or any((d / "started").glob("*.json"))


def start_daemon(workdir: str, name: str) -> dict:
    """Start the supervisor or the watchdog detached (own session, output to supervisor.log) unless one
    holds its lock; wait until it reports its own pid."""
    info = daemon_info(workdir, name)
    if info["alive"]:
        return {**info, "started": False}
    d = qdir(workdir)
    with open(os.devnull, "rb") as null_in, open(d / "supervisor.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, str(DAEMONS[name]), "--workdir", str(workdir)],
                                stdin=null_in, stdout=out, stderr=out, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        info = daemon_info(workdir, name)
        # Ours holds the lock a moment before it rewrites its pid file: wait for its own pid there
        # (or for it to exit: another one won the lock).
        if (info["alive"] and info["pid"] == proc.pid) or proc.poll() is not None:
            break
        time.sleep(0.02)
    return {**info, "started": True, "pid": info["pid"] or proc.pid}


def ensure_running(workdir: str, even_idle: bool = False) -> dict:
    """Start the supervisor when the queue has work (or `even_idle`: the box is watched,
    remote/watch.py) and none holds the lock; with work, its watchdog too."""
    work = has_work(workdir)
    if not (even_idle or work):
        return {**supervisor_info(workdir), "started": False}
    if work:
        start_daemon(workdir, "watchdog")
    return start_daemon(workdir, "supervisor")
