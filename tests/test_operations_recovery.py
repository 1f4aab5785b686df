"""What opskit does when things go wrong halfway: a launch that fails or is interrupted, a cancel of a
run that never reached its target, an old heartbeat, a hung trainer, a rerun's superseded files.

Real store (SQLite), real local target (remote/agent.py in a subprocess), real processes and signals.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from opskit import operations, states
from opskit import queue as Q
from opskit.errors import OpsError
from opskit.store import Store
from remote.processes import proc_start_time
from train import contract as C

RUN = "demo/geo_500k/s42"


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "state.db")
    yield s
    s.close()


def set_local_python(store: Store, python: str) -> None:
    rec = operations.local_target_record(store)
    store.add_target("local", "local", {**rec["config"], "python": python}, replace=True)


def add_run(store: Store, state: str, attempt: int = 1, **fields) -> dict:
    tgt = operations.get_target(store, "local")
    store.upsert_run({"name": RUN, "matrix": "demo", "phase": "demo", "config": "geo_500k", "seed": 42,
                      "target": "local", "attempt": attempt, "state": state, "run_dir": tgt.run_dir(RUN),
                      "spec": {"attempt": attempt}, **fields}, reason="test")
    return store.require_run(RUN)


def test_a_failed_launch_leaves_no_run_preparing_and_can_be_launched_again(store, tmp_path):
    set_local_python(store, str(tmp_path / "no-such-python"))
    with pytest.raises(OpsError, match="no-such-python"):
        operations.launch(store, "demo", configs=["geo_500k"], seeds=[42])
    row = store.require_run(RUN)
    assert row["state"] == states.FAILED and row["ended_at"]
    assert [e["to_state"] for e in store.events(RUN)] == ["queued", "preparing", "failed"]
    # Not stuck: --rerun starts it again (and fails the same way while the python is missing).
    with pytest.raises(OpsError):
        operations.launch(store, "demo", configs=["geo_500k"], seeds=[42], rerun=True)
    assert store.require_run(RUN)["attempt"] == 2


def test_ctrl_c_during_prepare_ends_the_run_cancelled(store, tmp_path):
    # The "python" prepare probes sends SIGINT to opskit (its parent), as a Ctrl-C in the terminal would.
    interrupting = tmp_path / "python"
    interrupting.write_text("#!/bin/sh\nkill -INT $PPID\nsleep 5\n")
    interrupting.chmod(0o755)
    set_local_python(store, str(interrupting))
    with pytest.raises(KeyboardInterrupt):
        operations.launch(store, "demo", configs=["geo_500k"], seeds=[42])
    row = store.require_run(RUN)
    assert row["state"] == states.CANCELLED
    assert "interrupted" in store.events(RUN)[-1]["reason"]


def test_cancel_of_a_run_stuck_before_its_target_ends_it(store):
    add_run(store, states.PREPARING)  # as a launch killed with SIGKILL leaves it
    [answer] = operations.cancel(store, [RUN])
    assert answer["outcome"] == "cancelled-before-start"
    assert store.require_run(RUN)["state"] == states.CANCELLED


def test_an_ended_stale_run_stays_ended_on_refresh(store):
    add_run(store, states.QUEUED)
    store.update_run(RUN, stale=1)  # an earlier refresh could not reach the target
    [answer] = operations.cancel(store, [RUN])
    assert answer["outcome"] == "cancelled-before-start"
    store.update_run(RUN, stale=1)  # even if it is flagged stale again, nothing brings it back
    operations.refresh(store)
    row = store.require_run(RUN)
    assert row["state"] == states.CANCELLED and not row["stale"]
    assert [e["to_state"] for e in store.events(RUN)] == ["queued", "cancelled"]


@pytest.fixture
def live_process():
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


def write_run_dir(store: Store, pid: int, status: dict) -> Path:
    run_dir = Path(operations.get_target(store, "local").run_dir(RUN))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / C.PID).write_text(f"{pid} {proc_start_time(pid)}\n")
    C.atomic_write_json(run_dir / C.STATUS, status)
    return run_dir


def test_an_earlier_attempts_heartbeat_does_not_make_a_resumed_run_stalled(store, live_process):
    add_run(store, states.STARTING, attempt=2)
    old = time.time() - 3600
    write_run_dir(store, live_process.pid, {"state": "training", "attempt": 1, "updated_at": old,
                                            "progress_at": old, "step": 40})
    operations.refresh(store)
    row = store.require_run(RUN)
    assert row["state"] == states.STARTING, row  # attempt 2 has not beaten yet
    assert row["step"] is None  # nor is attempt 1's progress shown as its own


def test_a_hung_trainer_whose_heartbeat_thread_still_beats_is_stalled(store, live_process):
    add_run(store, states.TRAINING)
    now = time.time()
    write_run_dir(store, live_process.pid, {"state": "training", "attempt": 1, "updated_at": now,
                                            "progress_at": now - 3600, "step": 7})
    operations.refresh(store)
    row = store.require_run(RUN)
    assert row["state"] == states.STALLED
    assert "no training progress" in store.events(RUN)[-1]["reason"]
    # Tokenizing reports progress coarsely: an old progress_at there is not a stall.
    write_run_dir(store, live_process.pid, {"state": "tokenizing", "attempt": 1, "updated_at": now,
                                            "progress_at": now - 3600})
    operations.refresh(store)
    assert store.require_run(RUN)["state"] == states.TOKENIZING


def test_pull_drops_files_a_rerun_no_longer_has(store, tmp_path):
    add_run(store, states.DONE)
    run_dir = Path(operations.get_target(store, "local").run_dir(RUN))
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({"ppl": 1.0}))
    (run_dir / "run.log").write_text("attempt 1\n")
    results = tmp_path / "results"
    [first] = operations.pull(store, [RUN], results_dir=str(results))
    dest = Path(first["dest"])
    assert (dest / "results.json").exists() and first["removed"] == []
    user_note = dest / "notes.txt"  # never pulled: not ours to remove
    user_note.write_text("mine")

    (run_dir / "results.json").unlink()  # the box was cleaned up after the pull: keep our copy
    [same] = operations.pull(store, [RUN], results_dir=str(results))
    assert same["removed"] == [] and (dest / "results.json").exists()
    manifest = json.loads((dest / "manifest.json").read_text())
    assert sorted(f["path"] for f in manifest["files"]) == ["results.json", "run.log"]

    store.update_run(RUN, attempt=2, state=states.TRAINING)  # a rerun started afresh, no results yet
    [second] = operations.pull(store, [RUN], results_dir=str(results))
    assert second["removed"] == ["results.json"]
    assert not (dest / "results.json").exists() and user_note.exists()
    assert [a["path"] for a in store.artifacts(RUN)] == ["run.log"]
    manifest = json.loads((dest / "manifest.json").read_text())
    assert [f["path"] for f in manifest["files"]] == ["run.log"] and manifest["attempt"] == 2


def test_one_run_failing_to_pull_does_not_stop_the_others(store, tmp_path):
    add_run(store, states.DONE)
    other = "demo/hybrid_a0.2_t100k/s42"
    store.upsert_run({"name": other, "matrix": "demo", "phase": "demo", "config": "hybrid_a0.2_t100k",
                      "seed": 42, "target": "gone", "attempt": 1, "state": states.DONE, "spec": {"attempt": 1}},
                     reason="test")
    run_dir = Path(operations.get_target(store, "local").run_dir(RUN))
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text("{}")
    out = {r["run"]: r for r in operations.pull(store, [other, RUN], results_dir=str(tmp_path / "results"))}
    assert "gone" in out[other]["error"]
    assert out[RUN]["files"] == ["results.json"]


def test_queue_fields_come_from_this_attempt():
    queue = {"pending": [], "running": [],
             "finished": [{"run": RUN, "attempt": 1, "cuda_visible_devices": "0", "started_at": 10.0},
                          {"run": RUN, "attempt": 2, "cuda_visible_devices": "1", "started_at": 20.0}]}
    assert Q.queue_fields(queue, RUN, 2)["started_at"] == 20.0
    assert Q.queue_fields(queue, RUN, 1)["gpus"] == "0"


def test_a_run_its_queue_could_not_start_shows_failed_and_the_queue_goes_on(store):
    rec = operations.local_target_record(store)
    workdir = Path(rec["config"]["workdir"])
    store.add_target("local", "local", {**rec["config"], "idle_exit_s": 2}, replace=True)
    run_dir = Path(operations.get_target(store, "local").run_dir(RUN))
    (run_dir / C.LOG).mkdir(parents=True)  # the run's log cannot be opened: the supervisor cannot start it
    try:
        [queued] = operations.launch(store, "demo", configs=["geo_500k"], seeds=[42])
        assert queued["queued"]
        deadline = time.monotonic() + 60
        while store.require_run(RUN)["state"] not in states.ENDED and time.monotonic() < deadline:
            time.sleep(0.5)
            operations.refresh(store)
        assert store.require_run(RUN)["state"] == states.FAILED
        assert "could not start it" in store.events(RUN)[-1]["reason"]
        assert operations.queue_view(store, "local")[0]["pending"] == []  # nothing left waiting behind it
    finally:
        pid_file = workdir / "queue" / "supervisor.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
            except ProcessLookupError:
                pass


def test_concurrent_launches_of_one_run_start_it_once(tmp_path):
    import threading
    slow = tmp_path / "python"  # prepare takes a moment, then fails: enough for the launches to overlap
    slow.write_text("#!/bin/sh\nsleep 1\nexit 1\n")
    slow.chmod(0o755)
    with Store(tmp_path / "state.db") as s:
        set_local_python(s, str(slow))
    results, gate = [], threading.Barrier(4)

    def launch_once():
        with Store(tmp_path / "state.db") as s:
            gate.wait()
            try:
                results.append(operations.launch(s, "demo", configs=["geo_500k"], seeds=[42])[0]["reason"])
            except OpsError as e:
                results.append(f"took it: {e}")

    threads = [threading.Thread(target=launch_once) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.startswith("took it") for r in results) == 1, results  # the others were refused
    with Store(tmp_path / "state.db") as s:
        assert s.require_run(RUN)["attempt"] == 1


def test_a_target_records_its_stall_threshold_and_a_slurm_workdir_beside_the_store(store):
    rec = operations.add_target(store, "hpc", "slurm", {"stall_after_s": 900.0})
    assert rec["config"]["stall_after_s"] == 900.0
    assert rec["config"]["workdir"] == str(store.path.resolve().parent / ".opskit" / "hpc")
    with pytest.raises(OpsError, match="at least 30 s"):
        operations.add_target(store, "hpc2", "slurm", {"stall_after_s": 5})


def test_pull_says_when_a_pulled_log_holds_a_credential(store, tmp_path):
    add_run(store, states.DONE)
    run_dir = Path(operations.get_target(store, "local").run_dir(RUN))
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text("{}")
    (run_dir / "run.log").write_text("loading\nWANDB_API_KEY=" + "0123456789abcdef" * 2 + "01234567\nstep 1\n")
    said: list[str] = []
    [out] = operations.pull(store, [RUN], results_dir=str(tmp_path / "results"), on_event=said.append)
    assert out["credential_warnings"] == [f"{RUN}: run.log contains what looks like a WANDB_API_KEY (line 2); "
                                          f"do not publish it as is"]
    assert f"warning: {out['credential_warnings'][0]}" in said
    [again] = operations.pull(store, [RUN], results_dir=str(tmp_path / "results"))  # nothing new: said once
    assert again["credential_warnings"] == []
