#!/usr/bin/env python3
"""Keeps a workdir's queue going with nobody connected: restarts its supervisor when it dies with work
left (docs/queue.md). Standard library only.

    watchdog.py --workdir W          (started beside the supervisor by queue_dir.ensure_running)

It holds queue/watchdog.lock for its life. Every `watchdog_s` seconds (queue config, default 10) it
checks the supervisor's lock; a dead supervisor with entries pending or started is started again. It
exits when the queue has had no work for `idle_exit_s`, as the supervisor does. The supervisor starts
a dead watchdog on each pass, and each run that ends asks for a supervisor (remote/detach.sh), so a
kill of either, or of both, never leaves queued runs waiting for a laptop.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from remote import queue_dir as D  # noqa: E402

WATCHDOG_S = 10.0
IDLE_EXIT_S = 60.0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="watchdog.py")
    p.add_argument("--workdir", required=True)
    a = p.parse_args(argv)
    d = D.qdir(a.workdir)
    d.mkdir(parents=True, exist_ok=True)
    lock = D.hold_lock(d / "watchdog.lock")
    if lock is None:
        return  # another watchdog watches this queue
    D.write_pid_file(d / "watchdog.pid")
    idle_since = None
    while True:
        config = D.read_config(a.workdir)
        time.sleep(float(config.get("watchdog_s") or WATCHDOG_S))
        try:
            if D.has_work(a.workdir):
                idle_since = None
                if not D.supervisor_info(a.workdir)["alive"]:
                    D.log_to(d, f"watchdog {os.getpid()}: the supervisor is gone and work waits; starting one")
                    D.start_daemon(a.workdir, "supervisor")
                continue
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since >= float(config.get("idle_exit_s") or IDLE_EXIT_S):
                with D.locked(a.workdir):  # as the supervisor: an enqueue sees us alive or gone
                    if not D.has_work(a.workdir):
                        lock.close()
                        return
        except OSError as e:  # a full disk: try again next time
            D.log_to(d, f"watchdog {os.getpid()}: {e}")


if __name__ == "__main__":
    main()
