#!/usr/bin/env python3
"""The target-side agent: every operation opskit performs inside a target's workdir.

Standard library only: it runs with the box's `python3` before any venv exists. opskit calls it
as a subprocess on the local target and over ssh on SSH targets, so both share one code path.
Each command prints one JSON document on stdout.

    agent.py start   --workdir W --run R [--env K=V ...] -- CMD...
    agent.py observe --workdir W [--queue] RUN...
    agent.py signal  --workdir W --run R [--sig TERM]
    agent.py tail    --workdir W --run R [--lines N] [--follow]
    agent.py manifest --workdir W --run R
    agent.py write   --workdir W --path REL          (stdin -> file, atomically)
    agent.py reset   --workdir W --run R             (move a finished run's directory to trash/)

Queue operations (the queue's files: remote/queue_dir.py; its supervisor: remote/supervisor.py):

    agent.py enqueue --workdir W                     (stdin: {"entry": {...}, "config": {...}})
    agent.py dequeue --workdir W --run R             (remove a run that has not started)
    agent.py queue-move --workdir W --run R --top
    agent.py queue-state --workdir W [--ensure] [RUN...]  (--ensure: restart a dead supervisor first;
                                                          RUN: also its newest finished entry)
    agent.py ensure-supervisor --workdir W           (start the supervisor if work waits and none runs)

The box's ledger, idle action and notifications (remote/box.py; docs/cost-and-notifications.md):

    agent.py box-state --workdir W [--since N --ledger-id ID] [--config-stdin] [--ensure]
    agent.py mark-pulled --workdir W --run R --attempt A --as-of T    (after opskit pull)
    agent.py idle-hold --workdir W --seconds S       (setting up: no idle action for S seconds; 0 ends it)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from remote import processes  # noqa: E402  (standard library only)
from train import contract as C  # noqa: E402  (pure Python)


def start(workdir: str, run: str, cmd: list[str], env: dict[str, str]) -> dict:
    try:
        return {"pid": processes.start_detached(workdir, run, cmd, env)}
    except processes.AlreadyRunning as e:
        raise SystemExit(json.dumps({"error": str(e)})) from None


def observe(workdir: str, runs: list[str]) -> dict:
    return {"now": time.time(), "runs": {run: processes.run_facts(C.run_dir(workdir, run)) for run in runs},
            "disk": processes.disk_facts(workdir)}


def send_signal(workdir: str, run: str, sig: str) -> dict:
    run_dir = C.run_dir(workdir, run)
    recorded = C.read_pid(run_dir)
    if recorded is None or not processes.pid_alive(run_dir):
        return {"signalled": False, "reason": "not running"}
    pid = recorded[0]
    if sig == "KILL":  # nothing can forward it: kill every process of the run ourselves
        processes.kill_tree(pid)
    else:  # the launcher forwards it to the trainer, which checkpoints first
        os.kill(pid, getattr(signal, f"SIG{sig}"))
    return {"signalled": True, "pid": pid}


def tail(workdir: str, run: str, lines: int, follow: bool) -> None:
    """Print the last `lines` lines of run.log (raw text, not JSON); with follow, keep printing until the
    run ends or nobody reads any more (Ctrl-C on `opskit logs --follow` closes the ssh channel)."""
    run_dir = C.run_dir(workdir, run)
    log = run_dir / C.LOG
    if not log.exists():
        print(f"(no log yet at {log})", flush=True)
        if not follow:
            return
        while not log.exists():
            if _reader_gone():
                return
            time.sleep(0.5)
    with open(log, "rb") as f:
        data = f.read()
        kept = data.splitlines()[-lines:] if lines > 0 else []  # [-0:] would be every line
        sys.stdout.write(b"\n".join(kept).decode(errors="replace") + ("\n" if kept else ""))
        sys.stdout.flush()
        while follow and not _reader_gone():
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
            elif (run_dir / C.EXIT_CODE).exists() and not processes.pid_alive(run_dir):
                return
            else:
                time.sleep(0.5)


def _reader_gone() -> bool:
    """Whether the read end of our stdout is closed: poll() flags a pipe or socket whose peer has gone
    with POLLERR/POLLHUP, without writing anything into the stream."""
    poller = select.poll()
    poller.register(sys.stdout.fileno(), 0)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def manifest(workdir: str, run: str) -> dict:
    """The pullable files of a run (never checkpoints, caches or weights), with size and sha256."""
    run_dir = C.run_dir(workdir, run)
    now = time.time()  # the files are as the box had them from this moment (mark-pulled --as-of)
    files = []
    for rel in C.pullable_paths(run_dir):  # ckpt/ and every other folder but PULLABLE_DIRS stay behind
        path = run_dir / rel
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        files.append({"path": rel, "size": path.stat().st_size, "sha256": h.hexdigest()})
    return {"run_dir": str(run_dir), "files": files, "now": now}


def write(workdir: str, rel: str) -> dict:
    path = Path(workdir) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    C.atomic_write_text(path, sys.stdin.read())
    return {"written": str(path)}


def reset(workdir: str, run: str) -> dict:
    """Move a run's directory aside (a rerun starts from scratch; nothing is deleted)."""
    run_dir = C.run_dir(workdir, run)
    if processes.pid_alive(run_dir):
        raise SystemExit(json.dumps({"error": f"run {run} is still running"}))
    if not run_dir.exists():
        return {"moved_to": None}
    dest = Path(workdir) / "trash" / f"{run}.{time.strftime('%Y%m%dT%H%M%S')}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    run_dir.rename(dest)
    return {"moved_to": str(dest)}


QUEUE_OPS = ("enqueue", "dequeue", "queue-move", "queue-state", "ensure-supervisor")
BOX_OPS = ("box-state", "mark-pulled", "idle-hold")


def box_op(a: argparse.Namespace) -> dict:
    from remote import box  # loaded only for these operations
    if a.op == "mark-pulled":
        return box.mark_pulled(a.workdir, a.run, a.attempt, a.as_of)
    if a.op == "idle-hold":
        return box.hold(a.workdir, a.seconds)
    config = json.loads(sys.stdin.read())["config"] if a.config_stdin else None
    return box.box_state(a.workdir, a.since, a.ledger_id, config, a.ensure)


def queue_op(a: argparse.Namespace) -> dict:
    from remote import queue_dir as S  # loaded only for queue operations
    try:
        if a.op == "enqueue":
            request = json.loads(sys.stdin.read())
            return S.enqueue(a.workdir, request["entry"], request.get("config"))
        if a.op == "dequeue":
            return S.dequeue(a.workdir, a.run)
        if a.op == "queue-move":
            if not a.top:
                raise S.QueueError("queue-move needs --top")
            return S.move_top(a.workdir, a.run)
        if a.op == "queue-state":
            supervisor = S.ensure_running(a.workdir) if a.ensure else None
            return {**S.state(a.workdir, runs=a.runs), **({"ensured": supervisor} if supervisor else {})}
        return S.ensure_running(a.workdir)
    except S.QueueError as e:
        raise SystemExit(json.dumps({"error": str(e)})) from None


def fail(error: BaseException, workdir: str | None) -> None:
    """One line of JSON on stdout and exit 1, for an error the agent could not do its work past: opskit
    shows it as one line (a full disk says so, with the free space), never a traceback."""
    if C.is_no_space(error):
        disk = processes.disk_facts(workdir) if workdir else None
        free = f" ({disk['free_bytes'] / 1e6:.0f} MB free)" if disk else ""
        answer = {"error": f"no space left on device in {workdir}{free}", "no_space": True, "disk": disk}
    else:
        answer = {"error": f"{type(error).__name__}: {error}".splitlines()[0]}
    print(json.dumps(answer), flush=True)
    raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    workdir = argv[argv.index("--workdir") + 1] if "--workdir" in argv[:-1] else None
    try:
        run_op(argv)
    except (SystemExit, KeyboardInterrupt, BrokenPipeError):
        raise
    except Exception as e:  # noqa: BLE001  (one JSON line for opskit; the box has no one to read a traceback)
        fail(e, workdir)


def run_op(argv: list[str]) -> None:
    cmd: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, cmd = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="agent.py")
    p.add_argument("op", choices=["start", "observe", "signal", "tail", "manifest", "write", "reset", *QUEUE_OPS,
                                  *BOX_OPS])
    p.add_argument("runs", nargs="*")
    p.add_argument("--workdir", required=True)
    p.add_argument("--run")
    p.add_argument("--path")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--sig", default="TERM")
    p.add_argument("--lines", type=int, default=50)
    p.add_argument("--follow", action="store_true")
    p.add_argument("--top", action="store_true")
    p.add_argument("--ensure", action="store_true")
    p.add_argument("--queue", action="store_true", help="observe: also the queue's state (one round trip)")
    p.add_argument("--since", type=int, default=0)
    p.add_argument("--ledger-id")
    p.add_argument("--config-stdin", action="store_true")
    p.add_argument("--attempt", type=int, default=1)
    p.add_argument("--as-of", type=float, default=0.0)
    p.add_argument("--seconds", type=float, default=0.0)
    a = p.parse_intermixed_args(argv)  # run names may come before or after the options
    if a.op == "tail":
        return tail(a.workdir, a.run, a.lines, a.follow)
    if a.op in QUEUE_OPS:
        return print(json.dumps(queue_op(a)))
    if a.op in BOX_OPS:
        return print(json.dumps(box_op(a)))
    if a.op == "start":
        result = start(a.workdir, a.run, cmd, dict(e.split("=", 1) for e in a.env))
    elif a.op == "observe":
        queue = None
        if a.queue:  # the queue first: a dead supervisor is restarted before its runs are looked at
            a.op, a.ensure = "queue-state", True
            queue = queue_op(a)
        result = {**observe(a.workdir, a.runs), **({"queue": queue} if a.queue else {})}
    elif a.op == "signal":
        result = send_signal(a.workdir, a.run, a.sig)
    elif a.op == "manifest":
        result = manifest(a.workdir, a.run)
    elif a.op == "reset":
        result = reset(a.workdir, a.run)
    else:
        result = write(a.workdir, a.path)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
