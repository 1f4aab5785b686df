"""Resume on another target: the newest complete checkpoint (only) travels through this machine."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import sshd  # noqa: E402

from opskit.transport import rsync  # noqa: E402
from opskit.errors import OpsError  # noqa: E402
from opskit.targets.local import LocalTarget  # noqa: E402
from opskit.targets.ssh import SSHTarget  # noqa: E402
from train import contract as C  # noqa: E402

RUN = "demo/geo_500k/s42"
pytestmark = pytest.mark.timeout(120)


def fake_run_dir(run_dir: Path) -> None:
    """A run directory as the trainer leaves it: two complete checkpoints, one being written."""
    ckpt = run_dir / C.CKPT_DIR
    for step, complete in ((50, True), (100, True), (150, False)):
        d = ckpt / f"step_{step}"
        d.mkdir(parents=True)
        (d / "__0_0.distcp").write_bytes(bytes([step % 256]) * 2048)
        (d / "meta.json").write_text(f'{{"step": {step}}}\n')
        if complete:
            (d / C.CKPT_COMPLETE_MARKER).write_text("")
    (ckpt / ".tmp_step_200").mkdir()
    (run_dir / C.LOSS_CURVE).write_text('{"step": 10}\n{"step": 100}\n')
    (run_dir / C.LOG).write_text("attempt 1\n")
    (run_dir / C.SPEC).write_text('{"run": "demo/geo_500k/s42"}\n')
    (run_dir / C.STATUS).write_text('{"state": "interrupted"}\n')


def test_newest_complete_checkpoint_moves_local_to_ssh_to_ssh(tmp_path):
    server = sshd.server()
    local = LocalTarget("local", {"workdir": str(tmp_path / "local")})
    box_a = SSHTarget("a", SSHTarget.config_from_options(server.target_options("root", str(tmp_path / "a"))))
    box_b = SSHTarget("b", SSHTarget.config_from_options(server.target_options("root", str(tmp_path / "b"))))
    fake_run_dir(Path(local.run_dir(RUN)))

    assert rsync.latest_checkpoint(local, RUN) == "step_100"
    assert rsync.latest_checkpoint(box_a, RUN) is None
    assert rsync.copy_run_for_resume(local, box_a, RUN, tmp_path / "scratch1") == "step_100"
    assert rsync.latest_checkpoint(box_a, RUN) == "step_100"
    assert rsync.copy_run_for_resume(box_a, box_b, RUN, tmp_path / "scratch2") == "step_100"

    got = Path(box_b.run_dir(RUN))
    assert sorted(p.name for p in got.iterdir()) == sorted([C.CKPT_DIR, C.LOSS_CURVE, C.LOG, C.SPEC])
    assert [p.name for p in (got / C.CKPT_DIR).iterdir()] == ["step_100"]
    assert (got / C.CKPT_DIR / "step_100" / "__0_0.distcp").read_bytes() == bytes([100]) * 2048
    assert (got / C.CKPT_DIR / "step_100" / C.CKPT_COMPLETE_MARKER).exists()
    assert (got / C.LOSS_CURVE).read_text().endswith('{"step": 100}\n')


def test_a_run_without_a_complete_checkpoint_cannot_move(tmp_path):
    server = sshd.server()
    local = LocalTarget("local", {"workdir": str(tmp_path / "local")})
    box = SSHTarget("a", SSHTarget.config_from_options(server.target_options("root", str(tmp_path / "a"))))
    (Path(local.run_dir(RUN)) / C.CKPT_DIR / "step_50").mkdir(parents=True)  # never completed
    with pytest.raises(OpsError, match="no complete checkpoint on local"):
        rsync.copy_run_for_resume(local, box, RUN, tmp_path / "scratch")
    assert not Path(box.run_dir(RUN)).exists()
