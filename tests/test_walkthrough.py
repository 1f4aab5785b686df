"""The README's Quickstart, run as written (each command of its code block, in order) with the real
trainer on the demo matrix; and Ctrl-C in `launch --wait`, which leaves the runs going on."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quickstart on the demo matrix", 1)[1].split("```", 2)[1]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip().startswith("opskit ")]


@pytest.fixture
def env(tmp_path):
    bin_dir = Path(sys.executable).parent  # `opskit` as installed beside this python (`source .venv/bin/activate`)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OPSKIT_STATE": str(tmp_path / "state.db"),
            "OMP_NUM_THREADS": "1", "OPSKIT_HEARTBEAT_S": "1", "COLUMNS": "200"}


def statuses(env, cwd) -> dict:
    out = subprocess.run(["opskit", "status", "--json"], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    if out.returncode != 0 and "no run store at" in out.stderr:  # asked before launch made $OPSKIT_STATE
        return {}
    assert out.returncode == 0, out.stderr
    return {r["run"]: r for r in json.loads(out.stdout)}


def test_the_readme_quickstart_works_as_written(tmp_path, env):
    commands = quickstart_commands()
    assert commands[2] == "opskit launch demo --config hybrid_a0.2_t100k --seed 123", commands
    run = "demo/hybrid_a0.2_t100k/s123"
    for command in commands:
        argv = command.split()
        if argv[1:3] == ["status", "--watch"]:  # the live view, left with Ctrl-C once the run is done
            watch = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
            deadline = time.time() + 600
            while statuses(env, tmp_path)[run]["state"] not in ("done", "failed", "lost") and time.time() < deadline:
                time.sleep(2)
            time.sleep(3)  # one more redraw
            watch.send_signal(signal.SIGINT)
            out, err = watch.communicate(timeout=30)
            assert watch.returncode == 0 and "Traceback" not in err, err
            assert run in out and "done" in out, out[-2000:]
            continue
        proc = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}: {proc.stdout[-1000:]}{proc.stderr[-1000:]}"
        if argv[1] == "launch" and "--dry-run" in argv:
            assert "would start" in proc.stdout and "tiny" in proc.stdout and "GPU-hours" in proc.stdout
        elif argv[1] == "launch":
            assert "queued" in proc.stdout
        elif argv[1] == "logs":
            assert "attempt 1" in proc.stdout
        elif argv[1] == "pull":
            assert (tmp_path / "results/raw/demo/hybrid_a0.2_t100k/seed123/results.json").is_file()
        elif argv[1] == "runs":
            assert re.search(r"state\s+done", proc.stdout), proc.stdout
        elif argv[1] == "report":
            assert "hybrid_a0.2_t100k" in proc.stdout
    assert statuses(env, tmp_path)[run]["state"] == "done"


def test_ctrl_c_in_launch_wait_leaves_the_runs_going_and_says_how_to_watch(tmp_path, env):
    matrix = str(ROOT / "tests" / "fixtures" / "matrix_e2e.yaml")
    run = "e2e/geo_500k/s42"
    launch = subprocess.Popen(["opskit", "launch", "e2e", "--matrix", matrix, "--config", "geo_500k", "--wait"],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120  # Ctrl-C once the run is on its target and the live view is up
    while statuses(env, tmp_path).get(run, {}).get("state") not in ("starting", "tokenizing", "training") \
            and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(1)
    launch.send_signal(signal.SIGINT)
    out, err = launch.communicate(timeout=60)
    assert launch.returncode == 130 and "Traceback" not in err, err
    assert "the runs go on" in out and "opskit status --watch --phase e2e" in out and f"opskit logs {run}" in out
    row = statuses(env, tmp_path)[run]
    assert row["state"] not in ("cancelled", "failed", "lost"), row  # still going
    subprocess.run(["opskit", "cancel", run, "--now"], env=env, cwd=tmp_path, capture_output=True, timeout=60)
