"""A full disk on the target (issue #20.3), on a real small filesystem: a tmpfs mounted for the test
(root only; skipped otherwise). Real supervisor, watchdog and detach.sh; the real trainer for the
run that fills its disk with a checkpoint."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opskit import operations, states
from opskit.store import Store
from test_queue import agent, stop_daemons, wait_until
from train import contract as C
from train.heartbeat import Heartbeat

ROOT = Path(__file__).resolve().parents[1]
MATRIX = str(ROOT / "tests" / "fixtures" / "matrix_disk.yaml")
pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def small_disk(tmp_path):
    """small_disk("4m") -> the mount point of a fresh tmpfs of that size, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounts = []

    def mount(size: str) -> Path:
        point = tmp_path / f"disk{len(mounts)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        if (point / "wd" / "queue").exists():
            stop_daemons(point / "wd")
            time.sleep(0.3)
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill(directory: Path) -> Path:
    """Write a filler file until the filesystem refuses another byte."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_write_that_does_not_fit_leaves_no_tmp_file_and_the_heartbeat_still_lands(small_disk):
    disk = small_disk("1m")
    hb = Heartbeat(disk, attempt=1)
    hb.update(state=C.HB_TRAINING, step=3)
    fill(disk)
    with pytest.raises(OSError) as raised:
        C.atomic_write_text(disk / "big.txt", "x" * 2_000_000)
    assert raised.value.errno == errno.ENOSPC and C.is_no_space(raised.value)
    assert not [p.name for p in disk.iterdir() if p.name.endswith(".tmp")]  # the 2 MB tmp is gone
    hb.update(state=C.HB_FAILED, failure=C.FAILURE_NO_SPACE, message="no space left on device")
    beat = json.loads((disk / C.STATUS).read_text())  # written over the old beat's blocks
    assert (beat["state"], beat["failure"], beat["step"]) == (C.HB_FAILED, C.FAILURE_NO_SPACE, 3)


def enqueue(wd: Path, run: str, command: str, config: dict) -> None:
    entry = {"run": run, "command": ["bash", "-c", command], "env": {}, "gpus": None, "after": [], "attempt": 1}
    agent(wd, "enqueue", stdin=json.dumps({"entry": entry, "config": config}))


def test_the_supervisor_survives_a_full_disk_and_the_queue_stays_true(small_disk, tmp_path):
    """The disk fills while a run runs: the supervisor killed then is restarted by the watchdog (its
    pid file rewritten in place), the run's exit code still lands, the next run's start fails on the
    full disk and ends failed with the free space, and nothing stays `running` in the queue."""
    wd = small_disk("4m") / "wd"
    config = {"gpus": 0, "idle_exit_s": 5, "watchdog_s": 0.3, "poll_s": 0.2}
    go = tmp_path / "go"  # outside the small disk
    runs = ["f/a/s1", "f/b/s1"]
    with Store(tmp_path / "state.db") as store:
        store.add_target("local", "local", {"workdir": str(wd), "gpus": 0}, replace=True)
        for run in runs:
            phase, cfg, seed = C.parse_run_name(run)
            store.upsert_run({"name": run, "phase": phase, "config": cfg, "seed": seed, "target": "local",
                              "attempt": 1, "state": states.QUEUED, "queue_pos": 1, "spec": {"attempt": 1},
                              "run_dir": str(C.run_dir(wd, run))}, reason="test")
        enqueue(wd, runs[0], f"while [ ! -e {go} ]; do sleep 0.1; done; exit 3", config)
        enqueue(wd, runs[1], "exit 0", config)
        wait_until(lambda: any(r.get("pid") for r in agent(wd, "queue-state")["running"]), what="the first run")
        first = agent(wd, "queue-state")["supervisor"]["pid"]
        fill(wd.parent)
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: agent(wd, "queue-state")["supervisor"]["pid"] not in (None, first), what="a new supervisor")
        notes: dict = {}
        operations.refresh(store, notes=notes)  # `status` shows the target's free space when it is low
        assert any(n.startswith("low disk: 0 MB free on local:") for n in notes["local"]), notes
        go.touch()
        wait_until(lambda: len(agent(wd, "queue-state")["finished"]) == 2, what="both entries finished")
        queue = agent(wd, "queue-state")
        assert queue["running"] == [] and queue["pending"] == []
        assert C.read_exit_code(C.run_dir(wd, runs[0])) == 3  # written into the room reserved at its start
        assert "Traceback" not in (wd / "queue" / "supervisor.log").read_text()
        operations.refresh(store)
        first_run, second_run = (store.require_run(r) for r in runs)
        assert first_run["state"] == states.FAILED and store.events(runs[0])[-1]["reason"] == "exit code 3"
        assert second_run["state"] == states.FAILED
        reason = store.events(runs[1])[-1]["reason"]
        assert reason.startswith(f"no space left on device on local:{wd} (") and reason.endswith(" MB free)"), reason


def opskit(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPSKIT_STATE": str(tmp_path / "state.db"), "OPSKIT_HEARTBEAT_S": "1",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "opskit.cli", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.mark.slow
def test_a_run_that_fills_its_disk_fails_saying_so_and_resume_is_one_line(small_disk, tmp_path):
    disk = small_disk("3m")
    wd = disk / "wd"
    wd.mkdir()
    (tmp_path / "cache").mkdir()
    (wd / "cache").symlink_to(tmp_path / "cache")  # the token cache fits elsewhere; checkpoints do not
    run = "d/geo_500k/s1"
    with Store(tmp_path / "state.db") as store:
        store.add_target("local", "local", {"workdir": str(wd), "gpus": 0, "idle_exit_s": 3}, replace=True)

    refused = opskit(tmp_path, "launch", "d", "--matrix", MATRIX, "--seed", "1")
    assert refused.returncode == 3, refused.stderr
    assert f"needs ~8.9 MB on local:{wd} (checkpoints 8.9 MB" in refused.stdout and "--force" in refused.stdout

    assert opskit(tmp_path, "launch", "d", "--matrix", MATRIX, "--seed", "1", "--force").returncode == 0
    deadline = time.monotonic() + 120
    while (row := json.loads(opskit(tmp_path, "status", "--json").stdout)[0])["state"] not in states.ENDED:
        assert time.monotonic() < deadline, row
        time.sleep(1)
    shown = json.loads(opskit(tmp_path, "runs", "show", run, "--json").stdout)
    reason = shown["events"][-1]["reason"]
    assert row["state"] == "failed" and reason.startswith(f"no space left on device on local:{wd} ("), reason
    run_dir = C.run_dir(wd, run)
    assert C.read_exit_code(run_dir) == C.EXIT_NO_SPACE
    assert not [p for p in disk.rglob("*") if ".tmp" in p.name]  # no tmp file, no half checkpoint left

    fill(disk)
    events = len(shown["events"])
    resumed = opskit(tmp_path, "resume", run)
    assert resumed.returncode == 1
    assert resumed.stderr.strip().count("\n") == 0, resumed.stderr
    assert f"not resumed: no space left on device on local:{wd} (0 MB free)" in resumed.stderr
    after = json.loads(opskit(tmp_path, "runs", "show", run, "--json").stdout)
    assert after["attempt"] == 1 and len(after["events"]) == events  # attempt 1 is not rewritten
