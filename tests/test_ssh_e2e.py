"""End to end over ssh: check, prepare, launch the demo run, watch it to done through an sshd restart,
pull its artifacts (and no weights). The CLI runs as a subprocess with its own state.db."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import sshd  # noqa: E402

from opskit import operations  # noqa: E402
from opskit.store import Store  # noqa: E402

RUN = "demo/hybrid_a0.2_t100k/s42"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def opskit(state: Path, *args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "opskit.cli", "--state", str(state), *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=cwd)
    assert "Traceback" not in proc.stderr, proc.stderr
    if check:
        assert proc.returncode == 0, f"opskit {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
    return proc


def run_row(state: Path) -> dict:
    rows = json.loads(opskit(state, "status", "--json").stdout)
    return next(r for r in rows if r["run"] == RUN)


def wait_for(state: Path, pred, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = run_row(state)
        if pred(row):
            return row
        assert row["state"] not in ("failed", "lost"), f"{row['state']}: {row['message']}"
        time.sleep(1)
    raise AssertionError(f"run never {what}; last: {row}")


def test_demo_run_over_ssh_survives_sshd_restart_and_pulls_no_weights(tmp_path):
    server = sshd.server()
    state = tmp_path / "state.db"
    workdir = tmp_path / "box"
    with Store(state) as store:  # base_python/system_site_packages/known_hosts have no CLI flags (yet)
        operations.add_target(store, "box", "ssh", server.target_options(
            "root", str(workdir), base_python=sys.executable, system_site_packages=True))

    facts = json.loads(opskit(state, "targets", "check", "box", "--json").stdout)
    assert facts["reachable"] and facts["gpus"] == 0
    assert "ready" in opskit(state, "targets", "prepare", "box").stdout

    opskit(state, "launch", "demo", "--config", "hybrid_a0.2_t100k", "--seed", "42", "--target", "box")
    wait_for(state, lambda r: r["state"] in ("tokenizing", "training"), 240, "started")

    server.stop()
    try:
        t0 = time.monotonic()
        row = run_row(state)
        assert time.monotonic() - t0 < 15  # a connect timeout, not a hang
        assert row["stale"] and row["state"] in ("tokenizing", "training", "evaluating", "done")
        shown = opskit(state, "status")
        assert "unreachable" in shown.stdout
        time.sleep(3)
    finally:
        server.start()

    row = wait_for(state, lambda r: r["state"] == "done", 480, "done")
    assert not row["stale"] and row["exit_code"] == 0

    pulled = json.loads(opskit(state, "pull", RUN, "--results-dir", str(tmp_path / "results"), "--json").stdout)
    dest = Path(pulled[0]["dest"])
    names = {p.name for p in dest.iterdir()}
    assert {"results.json", "loss_curve.jsonl", "spec.json", "status.json", "run.log", "manifest.json"} <= names
    assert not [p for p in dest.rglob("*") if p.is_dir() or p.suffix in (".pt", ".safetensors", ".bin", ".distcp")]
    assert list((workdir / "runs" / RUN / "ckpt").iterdir()), "the box keeps its checkpoints"
    manifest = json.loads((dest / "manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} == names - {"manifest.json"}
    assert json.loads((dest / "results.json").read_text())["run"] == RUN


def test_cancelled_run_resumes_on_another_ssh_target(tmp_path):
    """Cancel on box a after a checkpoint, `resume --target b`: the newest complete checkpoint moves,
    the run finishes on b with one continuous loss curve."""
    server = sshd.server()
    state = tmp_path / "state.db"
    with Store(state) as store:
        for name in ("a", "b"):
            operations.add_target(store, name, "ssh", server.target_options(
                "root", str(tmp_path / name), base_python=sys.executable, system_site_packages=True))
    opskit(state, "launch", "demo", "--config", "hybrid_a0.2_t100k", "--seed", "42", "--target", "a")
    ckpt = tmp_path / "a" / "runs" / RUN / "ckpt"
    deadline = time.monotonic() + 400
    while not list(ckpt.glob("step_*/.complete")):
        assert time.monotonic() < deadline, "no checkpoint on a"
        assert run_row(state)["state"] not in ("failed", "lost", "done")
        time.sleep(1)
    opskit(state, "cancel", RUN)
    row = wait_for(state, lambda r: r["state"] == "cancelled", 120, "cancelled")
    assert row["exit_code"] == 75

    out = opskit(state, "resume", RUN, "--target", "b").stdout
    assert "copied" in out and "step_" in out
    row = wait_for(state, lambda r: r["state"] == "done", 480, "done on b")
    assert row["target"] == "b" and row["attempt"] == 2
    curve = [json.loads(line)["step"] for line in (tmp_path / "b" / "runs" / RUN / "loss_curve.jsonl").open()]
    assert curve == sorted(set(curve)) and curve[0] < 50, curve
