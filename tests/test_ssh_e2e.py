"""End to end over ssh: check, prepare, launch the demo run, watch it to done through an sshd restart,
pull its artifacts (and no weights). The CLI runs as a subprocess with its own state.db."""
from __future__ import annotations

import json
import os
import shutil
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
TORCH_WHEELS = "/opt/wheels"  # where this machine kind keeps its CPU torch wheel (pip's find-links)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def opskit(state: Path, *args: str, check: bool = True, cwd: Path | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "opskit.cli", "--state", str(state), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)
    assert "Traceback" not in proc.stderr, proc.stderr
    if check:
        assert proc.returncode == 0, f"opskit {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
    return proc


def run_row(state: Path, run: str = RUN) -> dict:
    rows = json.loads(opskit(state, "status", "--json").stdout)
    return next(r for r in rows if r["run"] == run)


def wait_for(state: Path, pred, timeout: float, what: str, run: str = RUN) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = run_row(state, run)
        if pred(row):
            return row
        assert row["state"] not in ("failed", "lost"), f"{row['state']}: {row['message']}"
        time.sleep(1)
    raise AssertionError(f"run never {what}; last: {row}")


@pytest.fixture
def user_workdir():
    """A fresh work directory in the non-root test user's home; removed afterwards (its venv is ~1.4 GB)."""
    home = Path(sshd.ensure_user().pw_dir)
    workdir = home / f"opskit-e2e-{os.getpid()}-{time.monotonic_ns()}"
    yield workdir
    shutil.rmtree(workdir, ignore_errors=True)


def test_demo_run_over_ssh_as_non_root_survives_sshd_restart_and_pulls_no_weights(tmp_path, user_workdir):
    """The whole path as a plain user on a bare box: prepare builds a venv from the box's
    /usr/bin/python3 and pip-installs the trainer's packages into it for real (torch from the
    machine's wheel folder, the rest from PyPI), then the demo run goes to done through an sshd
    restart and pull brings back no weights."""
    assert list(Path(TORCH_WHEELS).glob("torch-*.whl")), f"no torch wheel in {TORCH_WHEELS} on this machine"
    server = sshd.server()
    state = tmp_path / "state.db"
    workdir = user_workdir
    opskit(state, "targets", "add", "box", "--ssh", server.ssh_spec(sshd.TEST_USER), "--key", str(server.key),
           "--known-hosts", str(server.known_hosts), "--workdir", f"~/{workdir.name}",
           "--base-python", "/usr/bin/python3", "--torch-index", TORCH_WHEELS)

    facts = json.loads(opskit(state, "targets", "check", "box", "--json").stdout)
    assert facts["reachable"] and facts["gpus"] == 0
    prepared = opskit(state, "targets", "prepare", "box", timeout=420).stdout
    assert "ready" in prepared and "step venv: created" in prepared and "installed (torch 2.13.0" in prepared, prepared
    assert (workdir / "venv" / "pyvenv.cfg").stat().st_uid == sshd.ensure_user().pw_uid

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


# A short run with frequent checkpoints (the demo's 292 steps take minutes on a shared 2-core CPU).
MOVE_MATRIX = """
name: ssh-move
description: short tiny runs for the resume-on-another-target test
model: {preset: tiny}
tokenizer: opskit-demo-bpe
data:
  train: [{dataset: demo-stories, weight: 1.0}]
  validation: {dataset: demo-stories, split: validation, max_tokens: 4000}
train: {tokens: 61440, seq_len: 128, micro_batch: 8, grad_accum: 1, lr: 3.0e-3, warmup_frac: 0.05,
        weight_decay: 0.1, grad_clip: 1.0, dtype: fp32, checkpoint_every: 5, keep_checkpoints: 2, log_every: 1}
eval: {lengths: [128], chunks: 1, mode: sequential}
configs: {core: [geo_500k]}
seeds: [1]
phases: {mv: {configs: core, seeds: [1]}}
"""
MOVE_RUN = "mv/geo_500k/s1"


def test_cancelled_run_resumes_on_another_ssh_target(tmp_path):
    """Cancel on box a after a checkpoint, `resume --target b`: the newest complete checkpoint moves,
    the run finishes on b with one continuous loss curve."""
    server = sshd.server()
    state = tmp_path / "state.db"
    matrix = tmp_path / "ssh_move.yaml"
    matrix.write_text(MOVE_MATRIX)
    with Store(state) as store:
        for name in ("a", "b"):
            operations.add_target(store, name, "ssh", server.target_options(
                "root", str(tmp_path / name), base_python=sys.executable, system_site_packages=True))
    opskit(state, "launch", "mv", "--matrix", str(matrix), "--target", "a")
    ckpt = tmp_path / "a" / "runs" / MOVE_RUN / "ckpt"
    deadline = time.monotonic() + 300
    while not list(ckpt.glob("step_*/.complete")):
        assert time.monotonic() < deadline, "no checkpoint on a"
        time.sleep(0.5)
    opskit(state, "cancel", MOVE_RUN)
    wait_for(state, lambda r: r["state"] == "cancelled", 120, "cancelled", MOVE_RUN)  # heartbeat "interrupted"

    out = opskit(state, "resume", MOVE_RUN, "--target", "b").stdout
    assert f"copied {MOVE_RUN} step_" in out and "from a to b" in out, out
    row = wait_for(state, lambda r: r["state"] == "done", 480, "done on b", MOVE_RUN)
    assert row["target"] == "b" and row["attempt"] == 2
    log = (tmp_path / "b" / "runs" / MOVE_RUN / "run.log").read_text()
    assert "resumed from step_" in log
    curve = [json.loads(line)["step"] for line in (tmp_path / "b" / "runs" / MOVE_RUN / "loss_curve.jsonl").open()]
    assert curve == list(range(1, curve[-1] + 1)) and curve[-1] == 60, curve
