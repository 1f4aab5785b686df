"""End to end on a real single-node SLURM through the CLI: dry run prints the sbatch script; the demo
run is requeued mid-run by SLURM (scontrol requeue) and resumes from its checkpoint, is cancelled
(checkpoint, no requeue), resumed, finishes with one continuous loss curve, and is pulled."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import slurm_cluster  # noqa: E402

RUN = "demo/hybrid_a0.2_t100k/s42"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900),
              pytest.mark.skipif(slurm_cluster.skip_reason() is not None, reason=str(slurm_cluster.skip_reason()))]


def opskit(env: dict, state: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "opskit.cli", "--state", str(state), *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=state.parent)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, \
        f"opskit {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def wait_for(env, state, pred, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    row: dict = {}
    while time.monotonic() < deadline:
        row = next(r for r in json.loads(opskit(env, state, "status", "--json").stdout) if r["run"] == RUN)
        if pred(row):
            return row
        time.sleep(2)
    raise AssertionError(f"{what}: still {row.get('state')} at step {row.get('step')} after {timeout:.0f}s")


def test_demo_on_slurm_requeue_cancel_resume_pull(tmp_path):
    cluster = slurm_cluster.cluster()
    env = {**cluster.env(), "OMP_NUM_THREADS": "1", "OPSKIT_HEARTBEAT_S": "2"}
    state, workdir = tmp_path / "state.db", tmp_path / "wd"
    opskit(env, state, "targets", "add", "hpc", "--slurm", "--workdir", str(workdir))

    dry = json.loads(opskit(env, state, "launch", "demo", "-c", "hybrid_a0.2_t100k", "-s", "42", "-t", "hpc",
                            "--dry-run", "--json").stdout)
    assert "#SBATCH --requeue" in dry[0]["sbatch"] and f"--spec {workdir}/runs/{RUN}/spec.json" in dry[0]["sbatch"]

    opskit(env, state, "launch", "demo", "-c", "hybrid_a0.2_t100k", "-s", "42", "-t", "hpc")
    row = wait_for(env, state, lambda r: (r["step"] or 0) >= 60 and r["state"] == "training", 300, "first checkpoint")
    job = row["job_id"]

    cluster.sh("scontrol", "requeue", job)  # as an admin or a preemption would: SIGTERM, then the job waits
    wait_for(env, state, lambda r: r["state"] == "queued", 60, "requeued job waits")
    row = wait_for(env, state, lambda r: r["state"] == "training" and (r["step"] or 0) >= 80, 300,
                   "requeued job resumes")
    assert row["job_id"] == job and row["attempt"] == 2  # the same job, requeued: status counts it as an attempt

    opskit(env, state, "cancel", RUN)
    row = wait_for(env, state, lambda r: r["state"] in ("cancelled", "failed", "done"), 120, "cancel")
    assert row["state"] == "cancelled"
    assert "CANCELLED" in cluster.sh("sacct", "-X", "-n", "-j", job, "-o", "State")

    opskit(env, state, "resume", RUN)
    row = wait_for(env, state, lambda r: r["state"] in ("done", "failed", "cancelled", "lost"), 400, "finish")
    assert row["state"] == "done" and row["attempt"] == 3 and row["job_id"] != job, row

    run_dir = workdir / "runs" / RUN
    log = (run_dir / "run.log").read_text()
    assert f"SLURM job {job}, restart 1" in log and "resumed from step_" in log
    steps = [json.loads(line)["step"] for line in (run_dir / "loss_curve.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == row["total_steps"], "one continuous loss curve"

    opskit(env, state, "pull", RUN)
    dest = tmp_path / "results" / "raw" / "demo" / "hybrid_a0.2_t100k" / "seed42"
    pulled = sorted(p.name for p in dest.iterdir())
    assert {"results.json", "loss_curve.jsonl", "run.log", "manifest.json"} <= set(pulled)
    assert not any(p.startswith(("ckpt", "slurm")) for p in pulled)
    tail = opskit(env, state, "logs", RUN, "-n", "5").stdout
    assert "ended" in tail and "exit code 0" in tail
