"""Targets' failures are one-line OpsErrors, never tracebacks: timeouts, a missing python, unreadable
run files, a fresh setup without a workdir, a move to or from a SLURM target. Plus `logs -n 0`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opskit.transport import rsync
from opskit.errors import OpsError
from opskit.targets.slurm.client import SlurmClient
from opskit.targets import TargetUnreachable
from opskit.targets import base as target_base
from opskit.targets.local import LocalTarget
from opskit.targets.slurm import SlurmTarget
from train import contract as C

ROOT = Path(__file__).resolve().parents[1]
AGENT = ROOT / "remote" / "agent.py"
RUN = "demo/geo_500k/s42"
pytestmark = pytest.mark.timeout(60)


def test_slurm_command_that_outlives_its_timeout_is_unreachable_not_a_traceback():
    with pytest.raises(TargetUnreachable, match=r"^sleep 5 on this machine timed out after 0.5s"):
        SlurmClient().run(["sleep", "5"], timeout=0.5)


def test_slurm_target_with_unreadable_run_files_raises_ops_error(tmp_path):
    tgt = SlurmTarget("hpc", SlurmTarget.config_from_options({"name": "hpc", "workdir": str(tmp_path / "wd")}))
    job_id = Path(tgt.run_dir(RUN)) / "slurm" / "job_id"
    job_id.parent.mkdir(parents=True)
    job_id.write_bytes(b"\xff\xfe not utf-8\n")  # python3's read_text fails: it exits 1
    with pytest.raises(OpsError, match=r"^target hpc: python3 reading run files failed \(exit 1\): Unicode") as e:
        tgt.job_ids([RUN])
    assert "\n" not in str(e.value)
    job_id.write_text("4242\n")
    assert tgt.job_ids([RUN, "demo/geo_500k/s1"]) == {RUN: "4242"}


def test_local_agent_timeout_is_unreachable(tmp_path):
    box = LocalTarget("local", {"workdir": str(tmp_path / "wd")})
    # tail --follow of a run without a log waits for it while someone reads: only the timeout ends it
    with pytest.raises(TargetUnreachable, match=r"^target local: local agent tail timed out after 1s"):
        box.agent(["tail", "--workdir", box.workdir, "--run", RUN, "--follow"], timeout=1)


def test_check_on_a_fresh_setup_walks_up_to_an_existing_dir(tmp_path):
    box = LocalTarget("local", {"workdir": str(tmp_path / "project" / ".opskit" / "local")})
    facts = box.check()
    assert facts["reachable"] and facts["free_disk_gb"] > 0
    assert not (tmp_path / "project").exists()  # check creates nothing


def test_targets_check_cli_on_a_fresh_setup(tmp_path):
    env = {**os.environ, "OPSKIT_STATE": str(tmp_path / "state.db"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "opskit.cli", "targets", "check", "--json"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert facts["reachable"] is True and facts["free_disk_gb"] > 0


def test_prepare_with_a_missing_python_is_one_line(tmp_path):
    box = LocalTarget("local", {"workdir": str(tmp_path), "python": str(tmp_path / "no" / "python")})
    with pytest.raises(OpsError, match=r"^target local: cannot run python .*/no/python: No such file") as e:
        box.prepare()
    assert "\n" not in str(e.value)


def test_prepare_with_a_python_that_hangs_times_out(tmp_path, monkeypatch):
    slow = tmp_path / "python"
    slow.write_text("#!/bin/sh\nsleep 10\n")
    slow.chmod(0o755)
    monkeypatch.setattr(target_base, "PROBE_TIMEOUT_S", 0.5)
    box = LocalTarget("local", {"workdir": str(tmp_path), "python": str(slow)})
    with pytest.raises(OpsError, match=r"^target local: .*/python took over 0.5s to import"):
        box.prepare()


def tail(workdir: Path, lines: int) -> str:
    proc = subprocess.run([sys.executable, str(AGENT), "tail", "--workdir", str(workdir), "--run", RUN,
                           "--lines", str(lines)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_logs_with_zero_lines_prints_nothing(tmp_path):
    log = C.run_dir(tmp_path, RUN) / C.LOG
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"line {i}\n" for i in range(1, 6)))
    assert tail(tmp_path, 0) == ""
    assert tail(tmp_path, 2) == "line 4\nline 5\n"
    assert tail(tmp_path, 50) == log.read_text()
    box = LocalTarget("local", {"workdir": str(tmp_path)})
    assert "".join(box.logs(RUN, lines=0)) == ""


def fake_run_dir(run_dir: Path) -> None:
    step = run_dir / C.CKPT_DIR / "step_10"
    step.mkdir(parents=True)
    (step / "meta.json").write_text('{"step": 10}\n')
    (step / C.CKPT_COMPLETE_MARKER).write_text("")
    (run_dir / C.SPEC).write_text("{}\n")


@pytest.mark.parametrize("login", [None, "alice@login.cluster.example"])
def test_moving_a_run_to_or_from_slurm_is_refused(tmp_path, login):
    local = LocalTarget("local", {"workdir": str(tmp_path / "local")})
    fake_run_dir(Path(local.run_dir(RUN)))
    options = {"name": "hpc", "workdir": str(tmp_path / "hpc"), **({"login": login} if login else {})}
    hpc = SlurmTarget("hpc", SlurmTarget.config_from_options(options))  # no connection is made
    local.check_movable()  # local (and SSH) targets can
    with pytest.raises(OpsError, match="moving a run to or from a SLURM target .hpc. is not supported"):
        hpc.check_movable()
    # opskit/rsync.py's move refuses too, before copying anything
    with pytest.raises(OpsError, match="not supported: resume it on its own target"):
        rsync.copy_run_for_resume(local, hpc, RUN, tmp_path / "scratch")
    with pytest.raises(OpsError, match="not supported"):
        rsync.copy_run_for_resume(hpc, local, RUN, tmp_path / "scratch")
    assert not (tmp_path / "hpc").exists() and not (tmp_path / "scratch").exists()
