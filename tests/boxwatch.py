"""Helpers for the tests of what a box's supervisor does on its own (tests/test_box_watch*.py): a real
HTTP server on 127.0.0.1 that records what is POSTed to it, a URL that accepts connections and never
answers, stand-in runs (bash) queued through a real Target, and their times on the box."""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from opskit import states
from opskit.store import Store
from test_queue import wait_until  # noqa: F401  (the box-watch tests use it through this module)
from test_queue_e2e import max_overlap
from train import contract as C

# A stand-in run: its GPUs and start/end times into its run directory, a heartbeat of its own attempt.
JOB = ('echo "$CUDA_VISIBLE_DEVICES" > cvd; date +%s.%N > t_start; sleep {sleep}; '
       'printf \'{{"state": "done", "attempt": 1, "step": 8, "total_steps": 8, "loss": 2.25, "updated_at": 1}}\' '
       '> status.json; date +%s.%N > t_end; exit {code}')


class Hook:
    """A real HTTP server on 127.0.0.1: every POST's JSON body and headers, in arrival order."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.headers: list[dict] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hook.headers.append({k.lower(): v for k, v in self.headers.items()})
                hook.received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, pred, timeout: float = 60.0, what: str = "messages") -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred(self.received):
                return list(self.received)
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; received {self.received}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Blackhole:
    """A URL that accepts the connection (the kernel's backlog) and never answers: a hung webhook."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hangs"

    def close(self) -> None:
        self.sock.close()


def refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/nobody-listens"


def record_run(store: Store, target: str, run: str, run_dir: str) -> None:
    phase, config, seed = run.split("/")
    store.upsert_run({"name": run, "phase": phase, "config": config, "seed": int(seed[1:]), "target": target,
                      "attempt": 1, "state": states.QUEUED, "run_dir": run_dir, "spec": {"attempt": 1}}, reason="test")


def submit(tgt, run: str, sleep: float = 1.0, code: int = 0, gpus: int | None = None) -> dict:
    """Queue a stand-in run on the target's real queue (what launch does, with a command of our own)."""
    return tgt.submit(run, ["bash", "-c", JOB.format(sleep=sleep, code=code)], attempt=1, gpus=gpus).__dict__


def spans(workdir: Path, runs: list[str]) -> dict[str, tuple[float, float, str]]:
    out = {}
    for run in runs:
        d = C.run_dir(workdir, run)
        out[run] = (float((d / "t_start").read_text()), float((d / "t_end").read_text()), (d / "cvd").read_text().strip())
    return out


def assert_packed_two_at_a_time(workdir: Path, runs: list[str]) -> dict:
    s = spans(workdir, runs)
    assert max_overlap([(a, b) for a, b, _ in s.values()]) == 2
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            if s[a][0] < s[b][1] and s[b][0] < s[a][1]:
                assert s[a][2] != s[b][2], f"{a} and {b} shared GPU {s[a][2]}"
    assert {cvd for _, _, cvd in s.values()} == {"0", "1"}
    return s


def stop_supervisor(workdir: Path) -> None:
    """Stop the supervisor a test started (a watched box's would otherwise keep watching)."""
    pid_file = Path(workdir) / "queue" / "supervisor.pid"
    if not pid_file.exists():
        return
    pid, start = pid_file.read_text().split()
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return
    if stat.rsplit(")", 1)[1].split()[19] == start:  # still that supervisor, not a reused pid
        os.kill(int(pid), signal.SIGTERM)
