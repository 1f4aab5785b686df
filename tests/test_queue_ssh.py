"""An SSH target's queue keeps running while the box is unreachable (real sshd on 127.0.0.1).

Three demo runs are queued over ssh; sshd is killed with every session it forked, the runs go on
under the target's supervisor, and after sshd comes back opskit finds all three done.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import sshd  # noqa: E402

from opskit import operations  # noqa: E402
from opskit.store import Store  # noqa: E402
from train import contract as C  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MATRIX = str(ROOT / "tests" / "fixtures" / "matrix_queue.yaml")
RUNS = [f"q/geo_500k/s{s}" for s in (1, 2, 3)]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_queue_keeps_running_while_sshd_is_down(tmp_path):
    server = sshd.server()
    workdir = tmp_path / "wd"
    with Store(tmp_path / "state.db") as store:
        operations.add_target(store, "box", "ssh", server.target_options(
            "root", str(workdir), base_python=sys.executable, system_site_packages=True))
        launched = operations.launch(store, "q", seeds=[1, 2, 3], target="box", matrix=MATRIX)
        assert [r["run"] for r in launched] == RUNS and all(r["queued"] for r in launched), launched

        deadline = time.monotonic() + 120
        while store.get_run(RUNS[0])["state"] == "queued":
            assert time.monotonic() < deadline, "the first run never started"
            operations.refresh(store)
            time.sleep(1)

        server.stop()
        try:
            health = operations.refresh(store)
            assert health["box"] is not None  # unreachable: rows marked stale, nothing else changes
            assert all(store.get_run(r)["stale"] for r in RUNS)
            # the box's own files say what happens meanwhile (the workdir is on this machine)
            deadline = time.monotonic() + 300
            while not all((C.run_dir(workdir, r) / C.EXIT_CODE).exists() for r in RUNS):
                assert time.monotonic() < deadline, "the queue stopped while sshd was down"
                time.sleep(1)
        finally:
            server.start()

        health = operations.refresh(store)
        assert health["box"] is None
        rows = {r: store.get_run(r) for r in RUNS}
        assert {r: row["state"] for r, row in rows.items()} == {r: "done" for r in RUNS}
        assert not any(row["stale"] for row in rows.values())
        for r in RUNS:  # each started exactly once, one after the other (a CPU box runs one at a time)
            log = (C.run_dir(workdir, r) / C.LOG).read_text()
            assert sum(1 for line in log.splitlines() if line.startswith("=== opskit attempt") and " started " in line) == 1
        deadline = time.monotonic() + 30  # the supervisor notices the last exit within its poll interval
        while True:
            state = operations.get_target(store, "box").queue_state()
            if len(state["finished"]) == len(RUNS) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert [f["run"] for f in state["finished"]] == RUNS and [f["exit_code"] for f in state["finished"]] == [0, 0, 0]
        if state["supervisor"]["alive"]:  # the one this test started; it would exit when idle anyway
            os.kill(state["supervisor"]["pid"], signal.SIGTERM)
