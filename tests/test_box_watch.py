"""What a box's supervisor does with nobody watching (docs/cost-and-notifications.md), on real parts:
a named local target with two (claimed) GPUs packs four one-GPU runs two at a time and POSTs their
ends to a real HTTP server on 127.0.0.1 while no opskit command runs, past a URL that hangs and one
that refuses; the idle action waits for `opskit pull` and runs once; a run's cost is its recorded
busy time x its share of the box x the price; a training run whose GPUs sit idle is announced
stalled ("GPUs idle") by the box. The same packing over a real sshd: test_box_watch_ssh.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import boxwatch as B  # noqa: E402

from opskit import ledger as L  # noqa: E402
from opskit import operations  # noqa: E402
from opskit.store import Store  # noqa: E402
from train import contract as C  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def hook():
    h = B.Hook()
    yield h
    h.close()


@pytest.fixture
def workdirs(tmp_path):
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(tmp_path / name)
        return made[-1]

    yield make
    for wd in made:
        B.stop_supervisor(wd)


def opskit(tmp_path: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "opskit.cli", "--state", str(tmp_path / "state.db"), *args],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, f"opskit {args}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_a_local_gpu_target_packs_runs_and_tells_a_real_http_server_by_itself(tmp_path, hook, workdirs):
    wd = workdirs("ws")
    hung, refused = B.Blackhole(), B.refused_url()
    secret_url = f"{hook.url}/hook?token=s3cret"
    added = json.loads(opskit(tmp_path, "targets", "add", "ws", "--local", "--gpus", "2", "--gpus-per-run", "1",
                              "--workdir", str(wd), "--notify", secret_url, "--notify", hung.url,
                              "--notify", refused, "--json"))
    assert added["config"]["gpus"] == 2 and added["config"]["notify"] == [secret_url, hung.url, refused]
    runs = [f"q/c/s{i}" for i in range(1, 5)]
    with Store(tmp_path / "state.db") as store:
        tgt = operations.get_target(store, "ws")
        for run in runs:
            B.submit(tgt, run, sleep=1.5, code=3 if run == "q/c/s3" else 0, gpus=1)
    started = time.time()
    # From here on no opskit command runs: the box's supervisor sends everything by itself.
    got = hook.wait_for(lambda r: any(m["event"] == "queue_drained" for m in r), what="the queue to drain")
    try:
        ended = {m["run"]: m for m in got if m["event"] == "run_ended"}
        assert {r: m["state"] for r, m in ended.items()} == {"q/c/s1": "done", "q/c/s2": "done", "q/c/s3": "failed",
                                                             "q/c/s4": "done"}
        m = ended["q/c/s3"]
        assert m["reason"] == "exit code 3" and m["target"] == "ws" and (m["step"], m["loss"]) == (8, 2.25)
        assert m["text"] == "opskit: q/c/s3 failed on ws: exit code 3 (step 8/8, loss 2.250)"
        drained = next(m for m in got if m["event"] == "queue_drained")
        assert drained["ended"] == {"done": 3, "failed": 1} and drained["blocked"] == 0
        for h in hook.headers:  # the message and nothing else: no credentials, no cookies
            assert h["content-type"] == "application/json" and not {"authorization", "cookie"} & set(h)
        # the hung and the refused URL held nothing up: the second pair started as the first ended
        s = B.assert_packed_two_at_a_time(wd, runs)
        firsts, lasts = sorted(v[1] for v in s.values())[:2], sorted(v[0] for v in s.values())[2:]
        assert max(lasts) - max(firsts) < 3.0 and max(v[1] for v in s.values()) - started < 12
        log = (wd / "queue" / "supervisor.log").read_text()
        assert f"notified {hook.url}/hook: run_ended q/c/s1 (HTTP 200)" in log and "s3cret" not in log
        assert f"notification to {hung.url} failed" in log or hung.url not in log  # still waiting on its timeout
        assert f"notification to {refused} failed (" in log and "retry in 5s" in log
        state = tgt.queue_state()
        assert [f["exit_code"] for f in state["finished"]] == [0, 0, 3, 0] and not state["pending"]
    finally:
        hung.close()


def test_the_idle_action_waits_for_the_pull_and_runs_once(tmp_path, workdirs):
    wd, wd_even = workdirs("ws"), workdirs("even")
    actions = tmp_path / "actions"
    runs = ["i/c/s1", "i/c/s2"]
    with Store(tmp_path / "state.db") as store:
        common = {"gpus": 0, "max_parallel": 2, "idle_exit_s": 1, "idle_after_s": 1.5}
        operations.add_target(store, "ws", "local", {**common, "workdir": str(wd),
                                                     "on_idle": f"echo stopping >> {actions}; echo bye"})
        operations.add_target(store, "even", "local", {**common, "workdir": str(wd_even), "idle_even_unpulled": True,
                                                       "on_idle": f"echo even >> {actions}.even"})
        tgt, even = operations.get_target(store, "ws"), operations.get_target(store, "even")
        for run in runs:
            B.record_run(store, "ws", run, tgt.run_dir(run))
            B.submit(tgt, run, sleep=0.5)
        B.submit(even, "i/e/s1", sleep=0.2)
        B.wait_until(lambda: len(tgt.queue_state()["finished"]) == 2, what="both runs")
        time.sleep(3)  # well past --idle-after: nothing came home yet, so the box is not stopped
        act = tgt.box_state()["idle_action"]
        assert act["phase"] == L.ACTION_WAITING_FOR_PULL and act["unpulled"] == runs and not actions.exists()
        assert (Path(f"{actions}.even")).read_text() == "even\n"  # --idle-even-unpulled: it did not wait

        assert operations.pull(store, [runs[0]], str(tmp_path / "results"))[0]["marked_on_box"]
        time.sleep(2)
        act = tgt.box_state()["idle_action"]
        assert act["unpulled"] == [runs[1]] and not actions.exists()

        with tgt.setting_up():  # what launch does around prepare: setting the box up is not idle
            operations.pull(store, [runs[1]], str(tmp_path / "results"))
            time.sleep(2.5)
            assert not actions.exists() and tgt.box_state()["idle_action"]["phase"] == L.ACTION_BUSY
        B.wait_until(actions.exists, timeout=10, what="the idle action")
        time.sleep(2)  # it runs once per idle stretch, not once per pass
        assert actions.read_text() == "stopping\n"
        act = tgt.box_state()["idle_action"]
        assert act["phase"] == L.ACTION_RAN and act["exit_code"] == 0 and act["output"] == "bye\n"
        view = next(b for b in operations.box_views(store) if b["target"] == "ws")
        assert view["idle_action"]["phase"] == L.ACTION_RAN
    log = (wd / "queue" / "supervisor.log").read_text()
    assert "idle action waits: not pulled yet: i/c/s1, i/c/s2" in log and "idle action output: bye" in log
    assert log.count("running 'echo stopping") == 1
    status = " ".join(opskit(tmp_path, "status").split())  # the caption wraps
    assert "target ws: idle" in status and f"idle action `echo stopping >> {actions}; echo bye` ran" in status
    assert "exit 0: bye" in status


def test_a_runs_cost_is_its_recorded_busy_time_times_its_share_and_the_price(tmp_path, workdirs):
    wd = workdirs("box")
    price = 3600.0  # one unit a second
    with Store(tmp_path / "state.db") as store:
        operations.add_target(store, "box", "local", {"workdir": str(wd), "gpus": 2, "gpus_per_run": 1,
                                                      "price_per_hour": price, "idle_exit_s": 1})
        tgt = operations.get_target(store, "box")
        for run, sleep in (("c/a/s1", 3.0), ("c/b/s1", 1.5)):
            B.record_run(store, "box", run, tgt.run_dir(run))
            B.submit(tgt, run, sleep=sleep, gpus=1)
        B.record_run(store, "box", "c/never/s1", tgt.run_dir("c/never/s1"))
        B.submit(tgt, "c/never/s1", gpus=4)  # asks for more GPUs than the box has: never starts
        B.wait_until(lambda: len(tgt.queue_state()["finished"]) == 2, what="two runs")
        time.sleep(1.5)
        report = operations.cost(store)
        finished = {f["run"]: f for f in tgt.queue_state()["finished"]}
        runs = {r["run"]: r for r in report["runs"]}
        for run in ("c/a/s1", "c/b/s1"):  # the ledger's busy time is the time the supervisor ran it
            recorded = finished[run]["ended_at"] - finished[run]["started_at"]
            assert runs[run]["busy_s"] == pytest.approx(recorded, abs=0.3)
            assert runs[run]["cost"] == pytest.approx(runs[run]["busy_s"] * 0.5, abs=0.06)  # one of two GPUs
        assert runs["c/never/s1"]["busy_s"] == 0 and runs["c/never/s1"]["cost"] == 0.0
        box = report["targets"][0]
        assert box["target"] == "box" and box["held_s"] >= box["busy_s"] >= runs["c/a/s1"]["busy_s"]
        assert box["held_cost"] == pytest.approx(box["held_s"], abs=0.1) and box["idle_s"] > 1
        assert box["idle_since"] and box["idle_now_cost"] == pytest.approx(box["idle_now_s"], abs=0.1)
        config = {c["config"]: c for c in report["configs"]}
        assert config["a"]["cost"] == runs["c/a/s1"]["cost"] and report["total"] == box["held_cost"]

        # the supervisor is killed; a new one (status restarts a watched box's) goes on with the ledger
        pid = int((wd / "queue" / "supervisor.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        B.wait_until(lambda: not tgt.box_state()["supervisor"]["alive"] or
                     tgt.box_state()["supervisor"]["pid"] != pid, what="a new supervisor")
        after = operations.cost(store)
        assert {r["run"]: r["cost"] for r in after["runs"]} == {r: v["cost"] for r, v in runs.items()}
        # a dead supervisor's last stretch ends when it was last seen: at most SEEN_EVERY_S is lost
        assert after["targets"][0]["held_s"] >= box["held_s"] - L.SEEN_EVERY_S
        events = L.parse((wd / "queue" / L.LEDGER).read_text())
        assert [e["ev"] for e in events].count(L.UP) == 2 and any(e.get("unclean") for e in events)
    shown = json.loads(opskit(tmp_path, "cost", "--target", "box", "--json"))
    assert {r["run"] for r in shown["runs"]} == set(runs) and shown["targets"][0]["price_per_hour"] == price
    assert "c/a/s1" in opskit(tmp_path, "cost")


def test_a_training_run_whose_gpus_sit_idle_is_announced_stalled_by_the_box(tmp_path, hook, workdirs):
    wd = workdirs("gpu")
    # the heartbeat of a training run whose GPUs have idled for 11 minutes (train/gpu_monitor.py's fields)
    beat = ("import json, time; t = time.time(); b = [[t - t % 30 - 30 * i, 2.0] for i in range(23)][::-1]; "
            "json.dump({'state': 'training', 'attempt': 1, 'updated_at': t, 'progress_at': t, 'step': 40, "
            "'total_steps': 100, 'loss': 3.5, 'gpu_util': 2.0, 'gpu_util_max': b}, open('status.json', 'w')); "
            "time.sleep(12)")
    with Store(tmp_path / "state.db") as store:
        operations.add_target(store, "gpu", "local", {"workdir": str(wd), "gpus": 1, "notify": [f"{hook.url}/g"]})
        operations.get_target(store, "gpu").submit("g/c/s1", [sys.executable, "-c", beat], attempt=1)
    got = hook.wait_for(lambda r: any(m["event"] == "run_stalled" for m in r), timeout=40, what="the stall")
    stall = next(m for m in got if m["event"] == "run_stalled")
    assert stall["run"] == "g/c/s1" and stall["state"] == "stalled" and stall["reason"].startswith("GPUs idle")
    assert stall["step"] == 40 and "stalled on gpu: GPUs idle: utilisation under 10%" in stall["text"]
