#!/usr/bin/env python3
"""The target's queue supervisor (docs/queue.md): starts queued runs as GPUs free up and records the
ones that end. Standard library only; it keeps going with opskit's laptop closed.

    supervisor.py --workdir W        (started detached by `agent.py ensure-supervisor`)

The queue's files and the operations on them are remote/queue_dir.py; remote/watchdog.py restarts
this process if it dies with work left, and each run that ends asks for it too (remote/detach.sh).
Every step is safe to die at: a successor recovers what a killed supervisor left half done.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from opskit import queue as Q  # noqa: E402  (pure, standard library only)
from remote import processes  # noqa: E402
from remote import queue_dir as D  # noqa: E402
from remote.faults import kill_point  # noqa: E402
from remote.queue_dir import ENTRY_ENV  # noqa: E402
from remote.watch import BoxWatch  # noqa: E402  (ledger, notifications, idle action)
from train import contract as C  # noqa: E402

POLL_S = 1.0
IDLE_EXIT_S = 60.0  # nothing pending or running for this long: exit (the next opskit call restarts it)


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


class Supervisor:
    def __init__(self, workdir: str):
        self.workdir = str(Path(workdir).resolve())
        self.qdir = D.qdir(self.workdir)
        self.idle_since: float | None = None
        self.config_problem: str | None = None
        self.watch = BoxWatch(self.workdir)

    def tick(self) -> bool:
        """One pass: record ended runs, recover half-done starts, start what fits. False: time to exit."""
        _reap_children()
        config, problem = D.load_config(self.workdir)
        if problem != self.config_problem:
            self.config_problem = problem
            if problem:
                self.log(problem)
        with D.locked(self.workdir) as d:
            started = []
            for e in D.entries(d, "started"):
                if e.get("pid") is None:
                    if not self._recover(d, e):
                        continue  # back in pending/: planned again below
                elif D.has_ended(self.workdir, e):
                    D.finish(self.workdir, d, e)
                    continue
                started.append(e)
            pending = Q.order(D.entries(d, "pending"))
            deps = D.dependency_states(self.workdir, pending, started)
            plan = Q.plan_starts(config, pending, started, deps, port_ok=port_free, port_offset=port_offset(self.workdir))
            by_seq = {e["seq"]: e for e in pending}
            for s in plan.starts:
                self._start(d, by_seq[s.seq], s, config)
            self.watch.tick(config, d, D.entries(d, "started"), D.entries(d, "pending"), deps)
            busy = bool(pending or started or plan.starts)
        if busy:
            D.start_daemon(self.workdir, "watchdog")  # a lock probe while one lives
            self.idle_since = None
            return True
        self.idle_since = self.idle_since or time.monotonic()
        return (time.monotonic() - self.idle_since < float(config.get("idle_exit_s") or IDLE_EXIT_S)
                or self.watch.keep_alive(config))

    def log(self, msg: str) -> None:
        D.log_to(self.qdir, msg)

    def _start(self, d: Path, entry: dict, s: Q.Start, config: dict) -> None:
        name = D.entry_name(entry["seq"])
        os.rename(d / "pending" / name, d / "started" / name)  # from here on it is never started twice
        kill_point("moved")
        cuda = s.cuda_visible_devices(config)
        entry.update(slots=list(s.slots), cuda_visible_devices=cuda, port=s.port, started_at=time.time(), pid=None)
        try:
            C.atomic_write_json(d / "started" / name, entry)
        except OSError as e:  # a full disk: the run could not start either
            return self._not_started(d, entry, e)
        kill_point("start-fields")
        self._launch(d, entry)

    def _launch(self, d: Path, entry: dict) -> None:
        env = {**entry["env"], ENTRY_ENV: f"{self.workdir}#{entry['seq']}", D.AGENT_PYTHON_ENV: sys.executable}
        if entry.get("cuda_visible_devices") is not None:
            env["CUDA_VISIBLE_DEVICES"] = entry["cuda_visible_devices"]
        env[D.RUN_ENV_KEYS_ENV] = " ".join([*env, D.RUN_ENV_KEYS_ENV])  # detach.sh drops them for its restart call
        command = [a.replace(Q.PORT_PLACEHOLDER, str(entry["port"])) for a in entry["command"]]
        run_dir = C.run_dir(self.workdir, entry["run"])
        try:  # a full disk or a broken run directory fails this run, not the supervisor (and the queue)
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / C.LOG, "a") as out:
                out.write(f"=== opskit queue: entry {entry['seq']}, CUDA_VISIBLE_DEVICES="
                          f"{entry.get('cuda_visible_devices') or '(unset)'}, rendezvous port {entry['port']}\n")
            entry["pid"] = processes.start_detached(self.workdir, entry["run"], command, env)
        except (OSError, processes.AlreadyRunning) as e:
            return self._not_started(d, entry, e)
        kill_point("pid-written")
        try:
            C.atomic_write_json(d / "started" / D.entry_name(entry["seq"]), entry)
        except OSError as e:  # its pid file exists: the next pass adopts it
            self.log(f"entry {entry['seq']} ({entry['run']}): cannot record pid {entry['pid']}: {e}")
        self.log(f"started {entry['run']} (entry {entry['seq']}) pid {entry['pid']} "
            f"CUDA_VISIBLE_DEVICES={entry.get('cuda_visible_devices')} port {entry['port']}")

    def _not_started(self, d: Path, entry: dict, error: BaseException) -> None:
        no_space = C.is_no_space(error)
        why = f"no space left on device in {self.workdir}" if no_space else str(error)
        entry.update(error=f"could not start: {why}", ended_at=time.time(), no_space=no_space, pid=None)
        D.move(d, entry, "started", "finished")
        self.log(f"run {entry['run']} (entry {entry['seq']}) not started: {error}")

    def _recover(self, d: Path, entry: dict) -> bool:
        """A started entry without a pid: the previous supervisor died during its start. Adopt the run
        if it began (True); otherwise put the entry back in pending/ to start again (False)."""
        pid = D.began(self.workdir, entry)
        if pid is None:
            self.log(f"entry {entry['seq']} ({entry['run']}) was moved but its run never began: queued again")
            D.unstart(d, entry)
            return False
        entry["pid"] = pid
        entry.setdefault("slots", [])
        try:
            C.atomic_write_json(d / "started" / D.entry_name(entry["seq"]), entry)
        except OSError as e:
            self.log(f"entry {entry['seq']} ({entry['run']}): cannot record pid {pid}: {e}")
        self.log(f"adopted {entry['run']} (entry {entry['seq']}) pid {pid}")
        return True


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
    d = D.qdir(a.workdir)
    d.mkdir(parents=True, exist_ok=True)
    lock = D.hold_lock(d / "supervisor.lock")
    if lock is None:
        D.log_to(d, "another supervisor holds the lock; exiting")
        return
    D.write_pid_file(d / "supervisor.pid")
    D.log_to(d, f"supervisor {os.getpid()} watching {d}")
    sup = Supervisor(a.workdir)
    sup.watch.begin(D.read_config(a.workdir))
    while True:
        try:
            if not sup.tick():
                # Give the lock up under the queue lock, so an enqueue either sees us alive and we see
                # its entry, or sees us gone and starts a new supervisor.
                with D.locked(a.workdir):
                    if not D.has_work(a.workdir) and not sup.watch.keep_alive(D.read_config(a.workdir)):
                        sup.watch.end()
                        lock.close()
                        D.log_to(d, "idle; exiting")
                        return
                sup.idle_since = None
        except OSError as e:  # a full or failing disk: keep the queue as it is and try again
            D.log_to(d, f"supervisor pass failed: {e}; retrying")
        time.sleep(float(D.read_config(a.workdir).get("poll_s") or POLL_S))


if __name__ == "__main__":
    main()
