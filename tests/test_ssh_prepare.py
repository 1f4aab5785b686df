"""`prepare` runs the real remote/prepare.sh over ssh; nothing heavy is installed (the venv sees the
test machine's torch through --system-site-packages, and --no-install forbids pip)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import sshd  # noqa: E402

from opskit import operations  # noqa: E402
from opskit.errors import OpsError  # noqa: E402
from opskit.store import Store  # noqa: E402

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "state.db") as s:
        yield s


def prepare(store, name, options) -> list[str]:
    operations.add_target(store, name, "ssh", options)
    lines: list[str] = []
    operations.get_target(store, name).prepare(on_line=lines.append)
    return lines


def test_a_missing_python_fails_at_step_python3(store, tmp_path):
    server = sshd.server()
    options = server.target_options("root", str(tmp_path / "wd"), base_python="/nonexistent/python3")
    with pytest.raises(OpsError, match=r"target nopy: prepare failed at step python3: /nonexistent/python3 not found"):
        prepare(store, "nopy", options)


def test_non_root_box_without_trainer_packages_fails_at_step_packages(store):
    """The test user cannot read root's pyenv torch; its /usr/bin/python3 venv has no torch and
    --no-install forbids downloading one, so prepare must stop at the packages step and say so."""
    server = sshd.server()
    sshd.ensure_user()
    options = server.target_options(sshd.TEST_USER, "~/opskit-prepare", base_python="/usr/bin/python3",
                                    no_install=True)
    lines: list[str] = []
    operations.add_target(store, "userbox", "ssh", options)
    box = operations.get_target(store, "userbox")
    with pytest.raises(OpsError, match="prepare failed at step packages: torch, tokenizers or numpy is not importable"):
        box.prepare(on_line=lines.append)
    assert any(line.startswith("step venv: ") for line in lines), lines
    assert box.check()["prepared"] is False


@pytest.mark.slow
def test_prepare_creates_a_venv_then_repeats_in_seconds(store, tmp_path):
    server = sshd.server()
    workdir = tmp_path / "wd"
    options = server.target_options("root", str(workdir), base_python=sys.executable, system_site_packages=True)
    lines = prepare(store, "box", options)
    steps = list(dict.fromkeys(line.split(":")[0] for line in lines if line.startswith("step ")))
    assert steps == ["step python3", "step disk", "step gpu", "step venv", "step packages", "step done"], lines
    assert "created" in lines[3] and "--system-site-packages" in lines[3]
    assert (workdir / "venv" / "bin" / "python").exists() and (workdir / ".prepared").exists()
    assert (workdir / "code" / "remote" / "agent.py").exists()
    t0 = time.monotonic()
    lines = prepare(store, "box-again", options)  # a new target object: its own sync, the marker skips the rest
    assert time.monotonic() - t0 < 5
    assert lines[-1].startswith("step done: already prepared"), lines
    assert operations.get_target(store, "box").check()["prepared"] is True


FAKE_NVIDIA_SMI = """#!/bin/sh
# Prints what nvidia-smi prints on a 2-GPU box whose driver supports CUDA {cuda}.
case "$*" in
  *--query-gpu*) echo "NVIDIA H100 80GB HBM3, 570.86.15"; echo "NVIDIA H100 80GB HBM3, 570.86.15" ;;
  *) echo "| NVIDIA-SMI 570.86.15    Driver Version: 570.86.15    CUDA Version: {cuda}     |" ;;
esac
"""


@pytest.mark.parametrize("cuda, expected", [
    ("12.8", "prepare failed at step cuda: AssertionError: torch.cuda.is_available() is False"),
    ("13.1", "prepare failed at step cuda: AssertionError: torch.cuda.is_available() is False"),
    ("12.4", "prepare failed at step gpu: driver supports CUDA 12.4, older than every torch build"),
])
def test_gpu_step_reads_nvidia_smi_and_picks_the_torch_build(tmp_path, cuda, expected):
    """nvidia-smi cannot run here: a fake one prints a real box's output; prepare.sh itself runs for real
    (locally: the GPU step does not involve ssh) and must pick the wheel index from the driver's CUDA."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text(FAKE_NVIDIA_SMI.format(cuda=cuda))
    fake.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["bash", str(root / "remote" / "prepare.sh"), "--workdir", str(tmp_path / "wd"),
                           "--code", str(root), "--python", sys.executable, "--gpus", "2", "--no-install"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"})
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert "step gpu: 2 x NVIDIA H100 80GB HBM3, 570.86.15 (driver CUDA " + cuda + ")" in lines
    assert lines[-1].startswith(expected), lines
    want_index = {"12.8": "cu128", "13.1": "cu130"}.get(cuda)
    if want_index:
        assert f"step gpu: torch wheels from https://download.pytorch.org/whl/{want_index}" in lines
