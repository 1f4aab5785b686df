"""Target queues end to end on the local target with the real trainer, through the CLI.

The local target claims 2 GPUs (the supervisor takes the count from the target record; the trainer
runs on the CPU whatever CUDA_VISIBLE_DEVICES says), each run takes one.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opskit.store import Store

ROOT = Path(__file__).resolve().parent.parent
MATRIX = str(ROOT / "tests" / "fixtures" / "matrix_queue.yaml")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def cli(tmp_path):
    env = {**os.environ, "OPSKIT_STATE": str(tmp_path / "state.db"), "OPSKIT_HEARTBEAT_S": "1",
           "OMP_NUM_THREADS": "1"}
    workdir = tmp_path / "wd"
    with Store(tmp_path / "state.db") as store:
        store.add_target("local", "local", {"workdir": str(workdir), "gpus": 2, "gpus_per_run": 1,
                                            "idle_exit_s": 5}, replace=True)

    def run(*args):
        proc = subprocess.run([sys.executable, "-m", "opskit.cli", *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=120)
        if proc.returncode != 0:
            raise AssertionError(f"opskit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    run.workdir = workdir
    yield run
    if (workdir / "queue").exists():
        state = queue(run)
        for name in ("watchdog", "supervisor"):  # the ones this test started
            if state[name]["alive"] and state[name]["pid"]:
                os.kill(state[name]["pid"], signal.SIGTERM)


def queue(cli) -> dict:
    return next(q for q in json.loads(cli("queue", "local", "--json")) if q["target"] == "local")


def statuses(cli) -> dict[str, dict]:
    return {r["run"]: r for r in json.loads(cli("status", "--json"))}


def wait_all_ended(cli, runs, timeout=240, seen=None) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = statuses(cli)
        if seen is not None:
            seen.append(rows)
        if all(rows[r]["state"] in ("done", "failed", "lost", "cancelled") for r in runs):
            return rows
        time.sleep(1)
    raise AssertionError(f"runs did not end: {[(r, rows[r]['state']) for r in runs]}")


def attempts_started(cli, run) -> int:
    log = (cli.workdir / "runs" / run / "run.log").read_text()
    return sum(1 for line in log.splitlines() if line.startswith("=== opskit attempt") and " started " in line)


def spans(cli, runs) -> dict[str, tuple[float, float, str]]:
    """(start, end, CUDA_VISIBLE_DEVICES) per run: the supervisor's record, the exit_code file's time.
    A run shows done from its exit code; the supervisor files its entry as finished on its next pass."""
    deadline = time.monotonic() + 30
    while True:
        finished = {f["run"]: f for f in queue(cli)["finished"]}
        if set(runs) <= set(finished) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return {r: (finished[r]["started_at"], (cli.workdir / "runs" / r / "exit_code").stat().st_mtime,
                finished[r]["cuda_visible_devices"]) for r in runs}


def max_overlap(intervals) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def test_five_demo_runs_on_two_gpus_run_two_at_a_time_in_order(cli):
    runs = [f"q/geo_500k/s{s}" for s in (1, 2, 3, 4, 5)]
    launched = json.loads(cli("launch", "q", "--matrix", MATRIX, "--json"))
    assert [r["run"] for r in launched] == runs and all(r["queued"] for r in launched)
    seen: list[dict] = []
    rows = wait_all_ended(cli, runs, seen=seen)
    assert all(rows[r]["state"] == "done" for r in runs), rows
    # status showed waiting runs with their queue position
    queued_views = [(r["run"], r["queue_pos"]) for snapshot in seen for r in snapshot.values()
                    if r["state"] == "queued" and r["queue_pos"]]
    assert queued_views and all(pos >= 1 for _, pos in queued_views)
    s = spans(cli, runs)
    assert max_overlap([(a, b) for a, b, _ in s.values()]) == 2
    assert [s[r][0] for r in runs] == sorted(s[r][0] for r in runs)  # started in launch order
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            if s[a][0] < s[b][1] and s[b][0] < s[a][1]:
                assert s[a][2] != s[b][2], f"{a} and {b} shared GPU {s[a][2]}"
    assert {cvd for _, _, cvd in s.values()} == {"0", "1"}
    for r in runs:
        assert attempts_started(cli, r) == 1
        log = (cli.workdir / "runs" / r / "run.log").read_text()
        assert f"CUDA_VISIBLE_DEVICES={s[r][2]}, rendezvous port" in log


def test_killed_supervisor_is_restarted_by_status_and_no_run_is_lost_or_doubled(cli):
    runs = [f"q/geo_500k/s{s}" for s in (1, 2, 3)]
    cli("launch", "q", "--matrix", MATRIX, "--seed", "1", "--seed", "2", "--seed", "3")
    deadline = time.monotonic() + 60
    while len(queue(cli)["running"]) < 2:
        assert time.monotonic() < deadline, "two runs never started"
        time.sleep(0.3)
    first = json.loads((cli.workdir / "queue" / "supervisor.pid").read_text().split()[0])
    os.kill(first, signal.SIGKILL)
    time.sleep(1)
    pending = sorted((cli.workdir / "queue" / "pending").glob("*.json"))
    assert len(pending) == 1  # s3 waits (the box's watchdog or the next run's end would restart the queue)
    rows = statuses(cli)  # `opskit status` restarts the supervisor at once
    second = queue(cli)["supervisor"]
    assert second["alive"] and second["pid"] != first
    assert rows["q/geo_500k/s3"]["state"] in ("queued", "starting", "tokenizing", "training", "evaluating", "done")
    rows = wait_all_ended(cli, runs)
    assert all(rows[r]["state"] == "done" for r in runs), rows
    assert [attempts_started(cli, r) for r in runs] == [1, 1, 1]


def test_cancel_removes_a_queued_run_and_move_reorders(cli):
    cli("launch", "q", "--matrix", MATRIX, "--seed", "1", "--seed", "2", "--seed", "3", "--seed", "4")
    # s1 and s2 take both GPUs; s3 and s4 wait
    cli("queue", "move", "q/geo_500k/s4", "--top")
    pending = [p["run"] for p in queue(cli)["pending"]]
    assert pending[0] == "q/geo_500k/s4", pending
    out = json.loads(cli("cancel", "q/geo_500k/s3", "--json"))
    assert out[0]["cancelled"] and out[0]["removed_from_queue"]
    assert statuses(cli)["q/geo_500k/s3"]["state"] == "cancelled"
    rows = wait_all_ended(cli, ["q/geo_500k/s1", "q/geo_500k/s2", "q/geo_500k/s4"])
    assert {rows[r]["state"] for r in ("q/geo_500k/s1", "q/geo_500k/s2", "q/geo_500k/s4")} == {"done"}
    assert not (cli.workdir / "runs" / "q/geo_500k/s3" / "run.log").exists()  # never started
