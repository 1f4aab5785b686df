"""SlurmTarget against a real single-node SLURM (tests/slurm_cluster.py): submission, one sacct call
per target, a failing job shows failed with its log's tail, scancel shows cancelled."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import slurm_cluster  # noqa: E402

from opskit import operations, states  # noqa: E402
from opskit.targets.slurm.client import SlurmClient  # noqa: E402
from opskit.store import Store  # noqa: E402

pytestmark = [pytest.mark.skipif(slurm_cluster.skip_reason() is not None, reason=str(slurm_cluster.skip_reason())),
              pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def cluster():
    return slurm_cluster.cluster()


@pytest.fixture
def store(tmp_path, cluster):
    with Store(tmp_path / "state.db") as s:
        operations.add_target(s, "hpc", "slurm", {"name": "hpc", "workdir": str(tmp_path / "wd"),
                                                  "slurm_conf": str(cluster.conf)})
        yield s


def submit(store: Store, run: str, command: list[str]) -> dict:
    """Record a run and submit `command` as its job (what launch does, with a command of our own)."""
    tgt = operations.get_target(store, "hpc")
    phase, config, seed = run.split("/")
    store.upsert_run({"name": run, "phase": phase, "config": config, "seed": int(seed[1:]), "target": "hpc",
                      "attempt": 1, "state": states.QUEUED, "run_dir": tgt.run_dir(run), "spec": {}}, reason="test")
    started = tgt.start(run, command, attempt=1)
    store.update_run(run, state=states.STARTING, job_id=started["job_id"])
    return started


def wait_state(store: Store, run: str, wanted: set[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    row = {}
    while time.monotonic() < deadline:
        operations.refresh(store, runs=[run])
        row = store.require_run(run)
        if row["state"] in wanted:
            return row
        time.sleep(0.5)
    raise AssertionError(f"{run} stayed {row.get('state')} (wanted {wanted}); events: {store.events(run)}")


def test_failing_job_shows_failed_with_log_tail(store):
    run = "t/fail/s1"
    job = submit(store, run, ["bash", "-c", "echo loading the model; echo 'RuntimeError: boom' >&2; exit 3"])
    row = wait_state(store, run, states.ENDED)
    assert row["state"] == states.FAILED and row["exit_code"] == 3 and row["job_id"] == job["job_id"]
    reason = store.events(run)[-1]["reason"]
    assert reason.startswith("exit code 3") and "RuntimeError: boom" in reason and "loading the model" in reason
    log = "".join(operations.logs(store, run))
    assert f"SLURM job {job['job_id']}" in log and "exit code 3" in log


def test_scancelled_job_shows_cancelled(store, cluster):
    run = "t/scancel/s1"
    job = submit(store, run, ["sleep", "300"])
    wait_state(store, run, {states.STARTING})
    deadline = time.monotonic() + 30
    while "RUNNING" not in cluster.sh("squeue", "-h", "-j", job["job_id"], "-o", "%T") and time.monotonic() < deadline:
        time.sleep(0.3)
    cluster.sh("scancel", job["job_id"])
    row = wait_state(store, run, states.ENDED)
    assert row["state"] == states.CANCELLED
    assert store.events(run)[-1]["reason"].startswith("SLURM CANCELLED")


def test_cancel_of_a_waiting_job_removes_it(store, cluster):
    run = "t/held/s1"
    cluster.sh("scontrol", "update", "PartitionName=debug", "State=DOWN")  # jobs wait (PartitionDown)
    try:
        submit(store, run, ["true"])
        wait_state(store, run, {states.QUEUED})
        assert operations.cancel(store, [run])[0]["scancelled"]
    finally:
        cluster.sh("scontrol", "update", "PartitionName=debug", "State=UP")
    row = wait_state(store, run, states.ENDED)
    assert row["state"] == states.CANCELLED


def test_status_asks_slurm_once_per_target(store, monkeypatch):
    runs = [f"t/many/s{i}" for i in range(4)]
    for r in runs:
        submit(store, r, ["true"])
    calls = []
    real = SlurmClient.run

    def counted(self, argv, *a, **kw):
        calls.append(argv[0])
        return real(self, argv, *a, **kw)

    monkeypatch.setattr(SlurmClient, "run", counted)
    operations.refresh(store, runs=runs)
    assert calls.count("sacct") == 1 and calls.count("squeue") == 0, calls
    for r in runs:
        wait_state(store, r, {states.FAILED, states.DONE, states.STARTING, states.QUEUED}, timeout=30)


def test_dry_run_prints_the_sbatch_script(store):
    out = operations.launch(store, "demo", ["hybrid_a0.2_t100k"], [42], target="hpc", dry_run=True)
    script = out[0]["sbatch"]
    assert script.startswith("#!/bin/bash") and "#SBATCH --requeue" in script and "#SBATCH --signal=USR1@120" in script
    assert "train.run --spec" in script and store.get_run(out[0]["run"]) is None


def test_login_node_over_ssh(tmp_path, cluster):
    """--login: files through the SSH target's connection and rsync, SLURM commands over the same ssh."""
    import sshd
    server = sshd.server()
    with Store(tmp_path / "state.db") as s:
        operations.add_target(s, "hpc-login", "slurm", {
            "login": server.ssh_spec(), "key": str(server.key), "known_hosts": str(server.known_hosts),
            "workdir": str(tmp_path / "shared"), "slurm_conf": str(cluster.conf), "python": sys.executable})
        tgt = operations.get_target(s, "hpc-login")
        assert not tgt.client.shell.local and tgt.client.shell is tgt.shell and tgt.code_dir == f"{tmp_path}/shared/code"
        tgt.sync()
        run = "t/login/s1"
        s.upsert_run({"name": run, "phase": "t", "config": "login", "seed": 1, "target": "hpc-login", "attempt": 1,
                      "state": states.QUEUED, "run_dir": tgt.run_dir(run), "spec": {}}, reason="test")
        started = tgt.start(run, ["bash", "-c", "echo on $(hostname) via login; exit 4"], attempt=1)
        s.update_run(run, state=states.STARTING, job_id=started["job_id"])
        row = wait_state(s, run, states.ENDED)
        assert row["state"] == states.FAILED and row["exit_code"] == 4
        assert "via login" in s.events(run)[-1]["reason"]


def test_downstream_job_on_a_multi_node_target_runs_on_one_node(store, cluster, tmp_path):
    """A p2 (downstream) job is one process: a 2-node target submits it for one node and runs its own
    command (not the trainer), so it runs on this one-node cluster."""
    operations.add_target(store, "hpc2", "slurm", {"name": "hpc2", "workdir": str(tmp_path / "wd2"), "nodes": 2,
                                                   "slurm_conf": str(cluster.conf)})
    tgt = operations.get_target(store, "hpc2")
    run = "t/p2/s1"
    store.upsert_run({"name": run, "phase": "t", "config": "p2", "seed": 1, "target": "hpc2", "attempt": 1,
                      "state": states.QUEUED, "run_dir": tgt.run_dir(run), "spec": {}}, reason="test")
    command = ["bash", "-c", "echo downstream nodes=$SLURM_JOB_NUM_NODES; printf '{\"state\": \"done\"}' > status.json",
               "-m", "train.p2", "--spec", f"{tgt.run_dir(run)}/spec.json"]  # bash ignores these: $0 and on
    started = tgt.start(run, command, attempt=1)
    store.update_run(run, state=states.STARTING, job_id=started["job_id"])
    row = wait_state(store, run, states.ENDED)
    assert row["state"] == states.DONE and row["exit_code"] == 0, store.events(run)
    script = (Path(tgt.run_dir(run)) / "slurm" / "sbatch.sh").read_text()
    assert "#SBATCH --nodes=1" in script and "train.run" not in script
    assert "downstream nodes=1" in "".join(operations.logs(store, run))


def test_the_jobs_finish_step_posts_its_end_and_cost_comes_from_sacct(tmp_path, cluster):
    sys.path.insert(0, str(Path(__file__).parent))
    import boxwatch
    hook = boxwatch.Hook()
    run = "t/notify/s1"
    try:
        with Store(tmp_path / "state.db") as store:
            operations.add_target(store, "hpc", "slurm", {"workdir": str(tmp_path / "wd"), "slurm_conf": str(cluster.conf),
                                                          "price_per_hour": 3600.0, "notify": [f"{hook.url}/hpc"]})
            job = submit(store, run, ["bash", "-c", "printf '{\"state\": \"done\", \"attempt\": 1, \"step\": 3, "
                                                    "\"total_steps\": 3, \"loss\": 1.5}' > status.json; sleep 2"])
            got = hook.wait_for(lambda r: r, timeout=60, what="the finish step's POST")
            assert got[0]["event"] == "run_ended" and got[0]["run"] == run and got[0]["state"] == states.DONE
            assert got[0]["target"] == "hpc" and got[0]["reason"] == "exit code 0" and got[0]["step"] == 3
            assert wait_state(store, run, states.ENDED)["state"] == states.DONE
            report = operations.cost(store, target="hpc")
            row = report["runs"][0]
            assert row["busy_s"] >= 2 and row["cost"] == row["busy_s"]  # no GPUs: one node x 1 a second
            elapsed = cluster.sh("sacct", "-X", "-n", "-P", "-j", job["job_id"], "-o", "ElapsedRaw").split()
            assert row["busy_s"] == sum(int(e) for e in elapsed)
            assert report["targets"][0]["held_cost"] == row["cost"]
    finally:
        hook.close()
