"""A night on a priced GPU workstation, through the CLI with the real trainer: a run launched on a
named local target; the box says it is done (with its PPLs) to a real HTTP server while opskit is
not running; `opskit pull` brings them home, after which the idle action runs once; `opskit cost`
and `opskit report` show what each run and config cost; status shows `-` for GPU use of CPU runs."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import boxwatch as B  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MATRIX = str(ROOT / "tests" / "fixtures" / "matrix_queue.yaml")
RUNS = ["q/geo_500k/s1"]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_launch_notify_pull_idle_action_cost_and_report(tmp_path):
    hook, wd, stopped = B.Hook(), tmp_path / "ws", tmp_path / "stopped"
    env = {**os.environ, "OPSKIT_STATE": str(tmp_path / "state.db"), "OPSKIT_HEARTBEAT_S": "1", "OMP_NUM_THREADS": "1"}

    def opskit(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "opskit.cli", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, f"opskit {args}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    try:
        opskit("targets", "add", "ws", "--local", "--gpus", "2", "--gpus-per-run", "1", "--workdir", str(wd),
               "--price-per-hour", "36", "--notify", f"{hook.url}/night", "--idle-after", "2",
               "--on-idle", f"touch {stopped}; echo box stopped")
        opskit("launch", "q", "--matrix", MATRIX, "--seed", "1", "--target", "ws")
        # the laptop is closed: only the box's supervisor knows, and it says so
        got = hook.wait_for(lambda r: any(m["event"] == "queue_drained" for m in r), timeout=240, what="the runs")
        done = {m["run"]: m for m in got if m["event"] == "run_ended"}
        assert sorted(done) == RUNS and all(m["state"] == "done" for m in done.values())
        assert set(done[RUNS[0]]["ppl"]) == {"128"} and f"PPL@128 {done[RUNS[0]]['ppl']['128']:.2f}" in done[RUNS[0]]["text"]
        assert not stopped.exists()  # idle, but nothing came home yet

        rows = {r["run"]: r for r in json.loads(opskit("status", "--json"))}
        assert all(rows[r]["state"] == "done" and rows[r]["gpu_util"] is None for r in RUNS)  # CPU runs: `-`
        assert "target ws: idle" in " ".join(opskit("status").split())
        opskit("pull")
        B.wait_until(stopped.exists, timeout=20, what="the idle action after the pull")

        cost = json.loads(opskit("cost", "--json"))
        by_run = {r["run"]: r for r in cost["runs"]}
        assert all(by_run[r]["busy_s"] > 1 and by_run[r]["cost"] > 0 for r in RUNS)
        assert cost["configs"][0]["cost"] == pytest.approx(sum(by_run[r]["cost"] for r in RUNS), abs=1e-3)
        opskit("report", "--phase", "q")
        with open(tmp_path / "results" / "processed" / "runs.csv") as f:
            report_rows = {f"{r['phase']}/{r['config']}/s{r['seed']}": r for r in csv.DictReader(f)}
        assert all(float(report_rows[r]["cost"]) == pytest.approx(by_run[r]["cost"], abs=1e-3) for r in RUNS)
        assert "| cost |" in (tmp_path / "results" / "processed" / "summary.md").read_text()
    finally:
        hook.close()
        B.stop_supervisor(wd)
