"""The same on an SSH target (a real sshd on 127.0.0.1, tests/sshd.py): two (claimed) GPUs pack four
one-GPU runs two at a time, the box's own supervisor POSTs each end and the drained queue to a real
HTTP server with nobody connected, and `opskit cost` reads the box's ledger over ssh."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import boxwatch as B  # noqa: E402
import sshd  # noqa: E402

from opskit import operations  # noqa: E402
from opskit.store import Store  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_an_ssh_box_packs_four_runs_two_at_a_time_and_reports_by_itself(tmp_path):
    server, hook = sshd.server(), B.Hook()
    wd = tmp_path / "wd"
    runs = [f"s/c/s{i}" for i in range(1, 5)]
    try:
        with Store(tmp_path / "state.db") as store:
            operations.add_target(store, "box", "ssh", server.target_options(
                "root", str(wd), gpus=2, gpus_per_run=1, price_per_hour=7.2, notify=[f"{hook.url}/box"]))
            tgt = operations.get_target(store, "box")
            tgt.sync()
            for run in runs:
                B.record_run(store, "box", run, tgt.run_dir(run))
                B.submit(tgt, run, sleep=1.5, gpus=1)
            # nothing talks to the box now; it sends what happens by itself
            got = hook.wait_for(lambda r: any(m["event"] == "queue_drained" for m in r), timeout=90,
                                what="the box's messages")
            assert sorted(m["run"] for m in got if m["event"] == "run_ended") == runs
            assert all(m["state"] == "done" and m["target"] == "box" for m in got if m["event"] == "run_ended")
            B.assert_packed_two_at_a_time(wd, runs)
            report = operations.cost(store, target="box")
            busy = {r["run"]: r["busy_s"] for r in report["runs"]}
            assert all(1.4 < busy[r] < 4 for r in runs), busy
            box = report["targets"][0]
            assert box["error"] is None and box["busy_s"] >= 2 * 1.5 and box["held_cost"] > 0
    finally:
        hook.close()
        B.stop_supervisor(wd)  # the box's (this machine's) supervisor: a priced box keeps watching
