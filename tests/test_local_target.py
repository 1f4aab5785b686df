"""The local target end to end with the real trainer on the demo model, through the CLI."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MATRIX = str(ROOT / "tests" / "fixtures" / "matrix_e2e.yaml")
pytestmark = pytest.mark.slow


@pytest.fixture
def cli(tmp_path):
    env = {**os.environ, "OPSKIT_STATE": str(tmp_path / "state.db"), "OPSKIT_HEARTBEAT_S": "1",
           "OMP_NUM_THREADS": "1"}

    def run(*args, check=True):
        proc = subprocess.run([sys.executable, "-m", "opskit.cli", *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"opskit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    run.tmp = tmp_path
    return run


def status(cli, run=None):
    rows = json.loads(cli("status", "--json").stdout)
    return {r["run"]: r for r in rows} if run is None else next(r for r in rows if r["run"] == run)


def wait_for(cli, run, pred, timeout=300, seen=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        row = status(cli, run)
        if seen is not None:
            seen.append(row["state"])
        if pred(row):
            return row
        time.sleep(0.5)
    raise AssertionError(f"{run} never got there; last: {row}\nlog:\n{cli('logs', run, '--lines', '40').stdout}")


def test_launch_status_pull_and_refusals(cli):
    run = "e2e/hybrid_a0.2_t100k/s42"
    out = json.loads(cli("launch", "e2e", "--matrix", MATRIX, "--config", "hybrid_a0.2_t100k", "--seed", "42",
                         "--json").stdout)
    assert out[0]["run"] == run and (out[0].get("started") or out[0].get("queued"))
    seen: list[str] = []
    row = wait_for(cli, run, lambda r: r["state"] in ("done", "failed", "lost"), seen=seen)
    assert row["state"] == "done", cli("logs", run, "--lines", "60").stdout
    assert "training" in seen, seen
    assert set(seen) <= {"queued", "starting", "tokenizing", "training", "evaluating", "done"}, seen
    assert row["step"] == row["total_steps"] > 0 and row["loss"] is not None
    for key in ("run", "phase", "config", "seed", "target", "attempt", "state", "step", "total_steps", "loss",
                "tokens_per_s", "eta_s", "updated_at", "heartbeat_at"):
        assert key in row

    again = cli("launch", "e2e", "--matrix", MATRIX, "--config", "hybrid_a0.2_t100k", "--seed", "42", "--json",
                check=False)
    assert again.returncode == 3  # a refusal: the run was not launched (EXIT_INCOMPLETE)
    assert "already done" in json.loads(again.stdout)[0]["reason"]

    cli("pull", "--results-dir", str(cli.tmp / "results"))
    dest = cli.tmp / "results" / "raw" / "e2e" / "hybrid_a0.2_t100k" / "seed42"
    for name in ("results.json", "loss_curve.jsonl", "eval_per_length.json", "run.log", "manifest.json"):
        assert (dest / name).is_file(), name
    pulled = [p for p in (cli.tmp / "results").rglob("*") if p.is_file()]
    assert not [p for p in pulled if "ckpt" in p.parts or p.suffix in (".distcp", ".pt", ".bin", ".safetensors")]
    manifest = json.loads((dest / "manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} >= {"results.json", "loss_curve.jsonl", "eval_per_length.json"}
    results = json.loads((dest / "results.json").read_text())
    assert results["config"] == "hybrid_a0.2_t100k" and results["seed"] == 42 and "128" in results["ppl"]

    shown = json.loads(cli("runs", "show", run, "--json").stdout)
    assert [e["to_state"] for e in shown["events"]][0] == "queued" and shown["events"][-1]["to_state"] == "done"
    assert "attempt 1" in cli("logs", run, "--lines", "200").stdout


def test_sigkill_then_resume_finishes_from_the_checkpoint(cli):
    run = "e2e_long/geo_500k/s7"
    cli("launch", "e2e_long", "--matrix", MATRIX, "--config", "geo_500k")
    row = wait_for(cli, run, lambda r: (r["step"] or 0) >= 15 or r["state"] in ("done", "failed", "lost"))
    assert row["state"] == "training", row
    spec_dir = Path(json.loads(cli("runs", "show", run, "--json").stdout)["run_dir"])
    trainer_pid = json.loads((spec_dir / "status.json").read_text())["pid"]
    os.kill(trainer_pid, signal.SIGKILL)
    row = wait_for(cli, run, lambda r: r["state"] in ("failed", "lost", "done"), timeout=60)
    assert row["state"] in ("failed", "lost"), row
    killed_at = row["step"]

    out = json.loads(cli("resume", run, "--json").stdout)
    assert (out.get("started") or out.get("queued")) and out["attempt"] == 2
    row = wait_for(cli, run, lambda r: r["state"] in ("done", "failed", "lost"))
    assert row["state"] == "done" and row["attempt"] == 2, cli("logs", run, "--lines", "60").stdout
    steps = [json.loads(l)["step"] for l in (spec_dir / "loss_curve.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "duplicated or out-of-order steps after resume"
    assert steps[-1] == row["total_steps"] and max(steps) > killed_at
    log = cli("logs", run, "--lines", "400").stdout
    assert "attempt 2" in log and "resum" in log.lower()


def test_cancel_checkpoints_and_shows_cancelled(cli):
    run = "e2e_long/anchpoly_p3.9_omf0.3_t500k/s7"
    cli("launch", "e2e_long", "--matrix", MATRIX, "--config", "anchpoly_p3.9_omf0.3_t500k")
    wait_for(cli, run, lambda r: (r["step"] or 0) >= 5 or r["state"] in ("done", "failed", "lost"))
    out = json.loads(cli("cancel", run, "--json").stdout)
    assert out[0]["cancelled"]
    row = wait_for(cli, run, lambda r: r["state"] in ("cancelled", "failed", "lost", "done"), timeout=60)
    assert row["state"] == "cancelled", (row, cli("logs", run, "--lines", "40").stdout)


def test_cancel_now_kills_the_whole_run_at_once(cli):
    run = "e2e_long/geo_500k/s7"
    cli("launch", "e2e_long", "--matrix", MATRIX, "--config", "geo_500k")
    wait_for(cli, run, lambda r: (r["step"] or 0) >= 3 or r["state"] in ("done", "failed", "lost"))
    run_dir = Path(json.loads(cli("runs", "show", run, "--json").stdout)["run_dir"])
    trainer_pid = json.loads((run_dir / "status.json").read_text())["pid"]
    assert "killed" in cli("cancel", run, "--now").stdout
    row = status(cli, run)
    assert row["state"] == "cancelled", row
    deadline = time.time() + 10
    while Path(f"/proc/{trainer_pid}").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{trainer_pid}").exists(), "trainer still alive after cancel --now"
    shown = json.loads(cli("runs", "show", run, "--json").stdout)
    assert "cancel --now" in shown["events"][-1]["reason"], shown["events"][-1]


SLEEPY_WORKER = """
import os, pathlib, sys, time
pathlib.Path(sys.argv[1], f"worker{os.environ['LOCAL_RANK']}.pid").write_text(str(os.getpid()))
time.sleep(300)
"""


def test_kill_reaches_torchrun_workers_in_their_own_sessions(tmp_path):
    """torchrun puts each worker in a new session: KILL (cancel --now, resume of a stalled run) must
    still end every worker, not only the launcher's process group."""
    from opskit.targets.local import LocalTarget

    box = LocalTarget("local", {"workdir": str(tmp_path / "wd")})
    script = tmp_path / "worker.py"
    script.write_text(SLEEPY_WORKER)
    run = "t/torchrun/s1"
    box.start(run, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(script), str(tmp_path)], attempt=1, extra_env={"OMP_NUM_THREADS": "1"})
    deadline = time.time() + 60
    while len(list(tmp_path.glob("worker*.pid"))) < 2:
        assert time.time() < deadline, "torchrun workers never started"
        time.sleep(0.2)
    workers = [int(p.read_text()) for p in tmp_path.glob("worker*.pid")]
    assert all(os.getsid(w) == w for w in workers)  # each leads its own session
    assert box.signal(run, "KILL")["signalled"]
    deadline = time.time() + 10
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not [w for w in workers if Path(f"/proc/{w}").exists()], "workers outlived KILL"
    assert not box.observe([run])[0][run].alive


def test_unknown_names_are_clear_errors(cli):
    bad = cli("launch", "e2e", "--matrix", MATRIX, "--config", "geo_50k", check=False)
    assert bad.returncode != 0 and "did you mean geo_500k" in bad.stderr and "Traceback" not in bad.stderr
    bad = cli("logs", "e2e/geo_500k/s1", check=False)
    assert bad.returncode != 0 and "unknown run" in bad.stderr
