"""`prepare` runs the real remote/prepare.sh over ssh; nothing heavy is installed (the venv sees the
test machine's torch through --system-site-packages, and --no-install forbids pip)."""
from __future__ import annotations

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
    steps = [line.split(":")[0] for line in lines if line.startswith("step ")]
    assert steps == ["step python3", "step disk", "step gpu", "step venv", "step packages", "step done"], lines
    assert "created" in lines[3] and "--system-site-packages" in lines[3]
    assert (workdir / "venv" / "bin" / "python").exists() and (workdir / ".prepared").exists()
    assert (workdir / "code" / "remote" / "agent.py").exists()
    t0 = time.monotonic()
    lines = prepare(store, "box-again", options)  # a new target object: its own sync, the marker skips the rest
    assert time.monotonic() - t0 < 5
    assert lines[-1].startswith("step done: already prepared"), lines
    assert operations.get_target(store, "box").check()["prepared"] is True
