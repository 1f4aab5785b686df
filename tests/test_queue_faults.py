"""The target's queue when its supervisor dies at any step, when an entry file is torn, and with
nobody connected (issue #20.1). Real supervisor and watchdog processes, SIGKILLed at named points
(remote/faults.py), real runs through detach.sh, a real store and the local target for the opskit side.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opskit import operations, states
from opskit.store import Store
from remote import faults
from test_queue import JOB, agent, all_finished, starts_in_log, stop_daemons, wait_until
from train import contract as C

ROOT = Path(__file__).resolve().parents[1]
AGENT = ROOT / "remote" / "agent.py"
CONFIG = {"gpus": 0, "max_parallel": 1, "idle_exit_s": 3, "watchdog_s": 0.3, "poll_s": 0.2}
pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def workdir(tmp_path):
    wd = tmp_path / "wd"
    yield wd
    stop_daemons(wd)


def entry(run: str, seq: int, sleep: float = 0.3) -> dict:
    return {"run": run, "seq": seq, "order": seq, "command": ["bash", "-c", JOB.format(sleep=sleep, code=0)],
            "env": {}, "gpus": None, "after": [], "attempt": 1, "enqueued_at": time.time()}


def enqueue_with_fault(workdir: Path, run: str, kill_file: Path) -> dict:
    """Enqueue through the agent with the fault hook in its environment (the supervisor it starts, and
    every supervisor and watchdog started after it, inherit it; the hook fires once)."""
    request = {"entry": {k: v for k, v in entry(run, 0).items() if k not in ("seq", "order", "enqueued_at")},
               "config": CONFIG}
    proc = subprocess.run([sys.executable, str(AGENT), "enqueue", "--workdir", str(workdir)],
                          input=json.dumps(request), capture_output=True, text=True, timeout=30,
                          env={**os.environ, faults.ENV: str(kill_file)})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def supervisors_started(workdir: Path) -> int:
    return sum(" watching " in line for line in (workdir / "queue" / "supervisor.log").read_text().splitlines())


@pytest.mark.parametrize("point", ["moved", "start-fields", "forked", "pid-written", "finished-fields"])
def test_a_supervisor_killed_at_any_step_of_a_start_or_finish_loses_and_doubles_no_run(workdir, tmp_path, point):
    """SIGKILL at the named instruction; no opskit command afterwards: the watchdog starts another
    supervisor, which recovers the entry (starts it again, or adopts the run that began), and the run
    ends once, with its exit code, in finished/."""
    kill_file = tmp_path / "kill-at"
    kill_file.write_text(point)
    run = "q/f/s1"
    enqueue_with_fault(workdir, run, kill_file)
    wait_until(lambda: all_finished(workdir, [run]), what=f"the run after a kill at {point}")
    assert not kill_file.exists(), f"the supervisor never reached {point}"
    assert supervisors_started(workdir) >= 2  # the killed one and the one the watchdog started
    assert starts_in_log(workdir, run) == 1
    [done] = [f for f in agent(workdir, "queue-state")["finished"] if f["run"] == run]
    assert done["exit_code"] == 0 and done.get("error") is None
    assert not list((workdir / "queue" / "started").glob("*.json"))


def test_an_entry_left_in_started_without_its_start_fields_starts_again(workdir):
    """The issue's reproduction: a pending entry in started/ with no port, slots or pid."""
    q = workdir / "queue"
    for sub in ("pending", "started", "finished", "removed", "broken"):
        (q / sub).mkdir(parents=True)
    C.atomic_write_json(q / "config.json", CONFIG)
    C.atomic_write_json(q / "started" / "000001.json", entry("q/p/s1", 1))
    C.atomic_write_json(q / "pending" / "000002.json", entry("q/p/s2", 2))  # waits behind it
    agent(workdir, "ensure-supervisor")
    wait_until(lambda: all_finished(workdir, ["q/p/s1", "q/p/s2"]), what="both runs")
    assert [starts_in_log(workdir, r) for r in ("q/p/s1", "q/p/s2")] == [1, 1]
    assert "was moved but its run never began: queued again" in (q / "supervisor.log").read_text()


def local_store(tmp_path: Path, workdir: Path, run: str) -> Store:
    store = Store(tmp_path / "state.db")
    store.add_target("local", "local", {"workdir": str(workdir), "gpus": 0, "idle_exit_s": 3}, replace=True)
    phase, config, seed = C.parse_run_name(run)
    store.upsert_run({"name": run, "phase": phase, "config": config, "seed": seed, "target": "local",
                      "attempt": 1, "state": states.QUEUED, "queue_pos": 1, "spec": {"attempt": 1},
                      "run_dir": str(C.run_dir(workdir, run))}, reason="queued on local (attempt 1)")
    return store


def test_cancel_clears_an_entry_in_started_that_never_got_a_pid(workdir, tmp_path):
    run = "q/c/s1"
    q = workdir / "queue"
    for sub in ("pending", "started", "finished", "removed", "broken"):
        (q / sub).mkdir(parents=True)
    C.atomic_write_json(q / "started" / "000001.json", {**entry(run, 1), "slots": [0], "port": 29600, "pid": None})
    with local_store(tmp_path, workdir, run) as store:
        [answer] = operations.cancel(store, [run])
        assert answer["outcome"] == "removed-from-queue"
        assert store.require_run(run)["state"] == states.CANCELLED
    assert (q / "removed" / "000001.json").exists() and not (q / "started" / "000001.json").exists()
    assert not C.run_dir(workdir, run).joinpath(C.LOG).exists()  # never started


def test_a_torn_entry_file_is_reported_and_its_run_fails_instead_of_waiting_for_ever(workdir, tmp_path):
    run = "q/t/s1"
    q = workdir / "queue"
    for sub in ("pending", "started", "finished", "removed", "broken"):
        (q / sub).mkdir(parents=True)
    C.atomic_write_json(q / "config.json", CONFIG)
    whole = json.dumps(entry(run, 1), indent=1)
    (q / "pending" / "000001.json").write_text(whole[:whole.index('"seq"') + 4])  # cut mid-write
    (q / "pending" / "000002.json").write_text("[1, 2")  # nothing readable at all
    with local_store(tmp_path, workdir, run) as store:
        notes: dict = {}
        health = operations.refresh(store, notes=notes)  # also starts the supervisor: work seemed to wait
        assert health == {"local": None}
        row = store.require_run(run)
        assert row["state"] == states.FAILED
        assert "torn entry file pending/000001.json" in store.events(run)[-1]["reason"]
        assert any("2 torn queue entry file(s)" in n and run in n for n in notes["local"]), notes
    proc = subprocess.run([sys.executable, "-m", "opskit.cli", "--state", str(tmp_path / "state.db"), "queue"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"torn entry pending/000001.json (not valid JSON" in proc.stdout and run in proc.stdout
    assert "torn entry pending/000002.json" in proc.stdout
    log = (q / "supervisor.log").read_text()
    assert "entry pending/000001.json is broken" in log and f"run {run} will not start" in log
    # nothing is left that counts as work: the supervisor exits when idle instead of living for ever
    wait_until(lambda: not agent(workdir, "queue-state")["supervisor"]["alive"], timeout=20, what="idle exit")


def test_the_queue_goes_on_after_supervisor_and_watchdog_are_both_killed(workdir):
    """Only the run that ends is left to restart the queue (detach.sh asks for a supervisor)."""
    config = {**CONFIG, "watchdog_s": 600}
    for i, sleep in ((1, 2.0), (2, 0.3)):
        e = entry(f"q/w/s{i}", 0, sleep)
        agent(workdir, "enqueue", stdin=json.dumps({"entry": {k: e[k] for k in ("run", "command", "env", "gpus",
                                                                                 "after", "attempt")},
                                                    "config": config}))
    wait_until(lambda: agent(workdir, "queue-state")["running"], what="the first run")
    state = agent(workdir, "queue-state")
    for name in ("watchdog", "supervisor"):
        os.kill(state[name]["pid"], 9)
    wait_until(lambda: not agent(workdir, "queue-state")["supervisor"]["alive"], what="supervisor gone")
    wait_until(lambda: all_finished(workdir, ["q/w/s1", "q/w/s2"]), what="the second run, started by the first's end")
    assert starts_in_log(workdir, "q/w/s2") == 1
