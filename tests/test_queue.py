"""Target queues: pure planning (opskit/queue.py) and the real supervisor driven through agent.py.

Runs here are short bash commands (the queue does not care what it starts); tests/test_queue_e2e.py
queues the real trainer. The GPU count is a fake one from the queue config: nothing reads nvidia-smi.
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

from opskit import queue as Q
from train import contract as C

ROOT = Path(__file__).resolve().parents[1]
AGENT = ROOT / "remote" / "agent.py"
pytestmark = pytest.mark.timeout(90)

# A stand-in run: records its GPUs and start/end times in its run directory (detach.sh runs it there).
JOB = ('echo "$CUDA_VISIBLE_DEVICES" > cvd; date +%s.%N > t_start; sleep {sleep}; '
       'printf \'{{"state": "done"}}\' > status.json; date +%s.%N > t_end; exit {code}')


def agent(workdir: Path, *args: str, stdin: str | None = None) -> dict:
    proc = subprocess.run([sys.executable, str(AGENT), *args, "--workdir", str(workdir)], input=stdin,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def enqueue(workdir: Path, run: str, config: dict, sleep: float = 1.0, code: int = 0, after=(), gpus=None) -> dict:
    entry = {"run": run, "command": ["bash", "-c", JOB.format(sleep=sleep, code=code)], "env": {},
             "gpus": gpus, "after": list(after), "attempt": 1}
    return agent(workdir, "enqueue", stdin=json.dumps({"entry": entry, "config": config}))


def wait_until(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def all_finished(workdir: Path, runs: list[str]) -> bool:
    state = agent(workdir, "queue-state")
    return not state["pending"] and not state["running"] and {f["run"] for f in state["finished"]} >= set(runs)


def intervals(workdir: Path, runs: list[str]) -> dict[str, tuple[float, float, str]]:
    out = {}
    for run in runs:
        d = C.run_dir(workdir, run)
        out[run] = (float((d / "t_start").read_text()), float((d / "t_end").read_text()),
                    (d / "cvd").read_text().strip())
    return out


def starts_in_log(workdir: Path, run: str) -> int:
    log = (C.run_dir(workdir, run) / C.LOG).read_text()
    return sum(1 for line in log.splitlines() if line.startswith("=== opskit attempt") and " started " in line)


def max_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def stop_daemons(wd: Path) -> None:
    """SIGTERM the supervisor and the watchdog this test started (they would exit when idle anyway)."""
    if not (wd / "queue").exists():
        return
    state = agent(wd, "queue-state")
    for name in ("watchdog", "supervisor"):
        if state[name]["alive"] and state[name]["pid"]:
            try:
                os.kill(state[name]["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.fixture
def workdir(tmp_path):
    wd = tmp_path / "wd"
    yield wd
    stop_daemons(wd)


# ------------------------------------------------------------------ pure planning


def test_plan_packs_runs_on_free_gpus_in_order_with_distinct_ports():
    config = {"gpus": 4, "gpus_per_run": 1}
    pending = [{"seq": i, "run": f"r{i}"} for i in (1, 2, 3)]
    running = [{"slots": [0, 2], "port": Q.DEFAULT_BASE_PORT}]
    plan = Q.plan_starts(config, pending, running, {})
    assert [(s.run, s.slots) for s in plan.starts] == [("r1", (1,)), ("r2", (3,))]
    assert len({s.port for s in plan.starts} | {Q.DEFAULT_BASE_PORT}) == 3
    assert plan.waiting == {3: "waiting for GPUs"}
    assert plan.starts[0].cuda_visible_devices(config) == "1"


def test_ports_skip_busy_ones_on_the_host_and_start_at_the_queue_offset():
    base = Q.DEFAULT_BASE_PORT
    pending = [{"seq": 1, "run": "a"}, {"seq": 2, "run": "b"}]
    plan = Q.plan_starts({"gpus": 2, "gpus_per_run": 1}, pending, [], {}, port_ok=lambda p: p != base + 7,
                         port_offset=6)
    assert [s.port for s in plan.starts] == [base + 6, base + 8]
    wrap = Q.plan_starts({"gpus": 0}, pending[:1], [], {}, port_offset=Q.PORT_RANGE - 1,
                         port_ok=lambda p: p != base + Q.PORT_RANGE - 1)
    assert [s.port for s in wrap.starts] == [base]


def test_plan_strict_order_dependencies_and_impossible_requests():
    config = {"gpus": 2}  # default: a run takes every GPU
    pending = [{"seq": 1, "run": "eval", "after": ["train"]}, {"seq": 2, "run": "big", "gpus": 4},
               {"seq": 3, "run": "a"}, {"seq": 4, "run": "b", "gpus": 1}]
    plan = Q.plan_starts(config, pending, [{"slots": [1], "port": 1}], {"train": "running"})
    assert plan.starts == []  # "a" needs both GPUs; "b" behind it must not jump the queue
    assert plan.waiting == {1: "after train (running)", 2: "asks for 4 GPUs, the target has 2",
                            3: "waiting for GPUs", 4: "waiting for GPUs"}
    failed = Q.plan_starts(config, pending[:1], [], {"train": "failed"})
    assert "which failed" in failed.waiting[1] and not failed.starts
    cancelled = Q.plan_starts(config, pending[:1], [], {"train": "cancelled"})
    assert "which was cancelled" in cancelled.waiting[1] and not cancelled.starts
    done = Q.plan_starts(config, pending[:1], [], {"train": "done"})
    assert [(s.run, s.slots) for s in done.starts] == [("eval", (0, 1))]


def test_cpu_target_runs_one_at_a_time_unless_configured():
    pending = [{"seq": i, "run": f"r{i}"} for i in (1, 2, 3)]
    assert [s.run for s in Q.plan_starts({"gpus": 0}, pending, [], {}).starts] == ["r1"]
    plan = Q.plan_starts({"gpus": 0, "max_parallel": 2}, pending, [], {})
    assert [s.run for s in plan.starts] == ["r1", "r2"]
    assert plan.starts[0].cuda_visible_devices({"gpus": 0}) is None


def test_order_and_positions_follow_moves():
    entries = [{"seq": 1, "run": "a"}, {"seq": 2, "run": "b"}, {"seq": 3, "run": "c", "order": 0}]
    assert [e["run"] for e in Q.order(entries)] == ["c", "a", "b"]
    assert Q.positions(entries) == {"c": 1, "a": 2, "b": 3}


def test_estimated_start_times_from_running_etas():
    # 2 GPUs: runs end in 100 s and 300 s; queued runs of 1 GPU take 50 s each, then a 2-GPU one.
    starts = Q.estimate_start_times(2, [(1, 100.0), (1, 300.0)],
                                    [("q1", 1, 50.0), ("q2", 1, 50.0), ("q3", 2, 50.0), ("q4", 1, None)])
    assert starts == {"q1": 100.0, "q2": 150.0, "q3": 300.0, "q4": 350.0}
    unknown = Q.estimate_start_times(1, [(1, None)], [("q1", 1, 10.0)])
    assert unknown == {"q1": None}
    assert Q.remaining_s(100.0, heartbeat_at=1000.0, now=1030.0) == 70.0


# ------------------------------------------------------------------ the supervisor, for real


def test_five_runs_on_two_fake_gpus_run_two_at_a_time_in_order(workdir):
    config = {"gpus": 2, "gpus_per_run": 1, "idle_exit_s": 2}
    runs = [f"q/c/s{i}" for i in range(1, 6)]
    answers = [enqueue(workdir, r, config, sleep=3) for r in runs]
    assert answers[0]["supervisor"]["started"] and answers[0]["supervisor"]["alive"]
    assert not any(a["supervisor"]["started"] for a in answers[1:])  # one supervisor, found alive
    wait_until(lambda: all_finished(workdir, runs), what="five queued runs")
    spans = intervals(workdir, runs)
    assert max_overlap([(s, e) for s, e, _ in spans.values()]) == 2
    starts = [spans[r][0] for r in runs]
    assert starts == sorted(starts)  # launch order
    for a in runs:
        for b in runs:
            sa, ea, ga = spans[a]
            sb, eb, gb = spans[b]
            if a < b and sa < eb and sb < ea:
                assert ga != gb, f"{a} and {b} ran at once on GPU {ga}"
    assert {g for _, _, g in spans.values()} == {"0", "1"}
    finished = agent(workdir, "queue-state")["finished"]
    assert [f["exit_code"] for f in finished] == [0] * 5
    assert all(starts_in_log(workdir, r) == 1 for r in runs)
    wait_until(lambda: not agent(workdir, "queue-state")["supervisor"]["alive"], what="idle exit")


def test_killed_supervisor_is_restarted_on_the_box_and_nothing_starts_twice(workdir):
    """SIGKILL the supervisor while two runs run and three wait: the first run that ends starts a new
    one (detach.sh asks for it), with no opskit command and no ensure-supervisor from outside."""
    config = {"gpus": 2, "gpus_per_run": 1, "idle_exit_s": 2, "watchdog_s": 600}  # the watchdog out of the way
    runs = [f"q/k/s{i}" for i in range(1, 6)]
    for r in runs:
        enqueue(workdir, r, config, sleep=3)
    wait_until(lambda: len(agent(workdir, "queue-state")["running"]) == 2, what="two running")
    pid = agent(workdir, "queue-state")["supervisor"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not agent(workdir, "queue-state")["supervisor"]["alive"], what="supervisor gone")
    assert agent(workdir, "queue-state")["pending"]
    wait_until(lambda: all_finished(workdir, runs), what="queue finished without anyone restarting it")
    log = (workdir / "queue" / "supervisor.log").read_text()
    assert sum(" watching " in line for line in log.splitlines()) == 2  # the killed one and its successor
    assert all(starts_in_log(workdir, r) == 1 for r in runs)
    assert max_overlap([(s, e) for s, e, _ in intervals(workdir, runs).values()]) <= 2


def test_half_done_starts_are_recovered_without_a_second_start(workdir):
    """A supervisor killed between moving an entry to started/ and recording the run's pid."""
    config = {"gpus": 0, "max_parallel": 2, "idle_exit_s": 2}
    q = workdir / "queue"
    enqueue(workdir, "q/h/s1", config, sleep=3)
    pid = agent(workdir, "queue-state")["supervisor"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not agent(workdir, "queue-state")["supervisor"]["alive"], what="supervisor gone")
    # entry 1 was started and is running: forget its pid, as if the supervisor died right after the fork
    e1 = json.loads((q / "started" / "000001.json").read_text())
    e1["pid"] = None
    C.atomic_write_json(q / "started" / "000001.json", e1)
    (C.run_dir(workdir, "q/h/s1") / C.PID).unlink()
    # entry 2 was moved to started/ but its run never began
    C.atomic_write_json(q / "started" / "000002.json",
                        {"run": "q/h/s2", "seq": 2, "order": 2, "command": ["bash", "-c", JOB.format(sleep=0.5, code=0)],
                         "env": {}, "gpus": None, "after": [], "attempt": 1, "slots": [1], "port": Q.DEFAULT_BASE_PORT + 1,
                         "cuda_visible_devices": None, "started_at": time.time(), "pid": None})
    agent(workdir, "ensure-supervisor")
    wait_until(lambda: all_finished(workdir, ["q/h/s1", "q/h/s2"]), what="recovered entries")
    assert starts_in_log(workdir, "q/h/s1") == 1 and starts_in_log(workdir, "q/h/s2") == 1
    assert "adopted q/h/s1" in (q / "supervisor.log").read_text()


def test_cancel_move_and_dependencies(workdir):
    config = {"gpus": 0, "idle_exit_s": 2}  # CPU target: one run at a time
    enqueue(workdir, "q/d/a", config, sleep=4)  # long enough for the moves below
    for run in ("q/d/b", "q/d/c", "q/d/e"):
        enqueue(workdir, run, config, sleep=0.2)
    enqueue(workdir, "q/d/fail", config, sleep=0.1, code=3)
    enqueue(workdir, "q/d/eval", config, sleep=0.1, after=["q/d/fail"])
    assert agent(workdir, "queue-move", "--run", "q/d/e", "--top") == {"run": "q/d/e", "position": 1}
    assert agent(workdir, "dequeue", "--run", "q/d/b") == {"removed": True, "seq": 2}
    assert agent(workdir, "dequeue", "--run", "q/d/a") == {"removed": False, "started": True}
    wait_until(lambda: {f["run"] for f in agent(workdir, "queue-state")["finished"]} >= {"q/d/a", "q/d/c", "q/d/e",
                                                                                        "q/d/fail"},
               what="the runs without a failed dependency")
    state = agent(workdir, "queue-state")
    assert [p["run"] for p in state["pending"]] == ["q/d/eval"]
    assert "q/d/fail, which failed" in state["pending"][0]["waiting"]
    spans = intervals(workdir, ["q/d/a", "q/d/e", "q/d/c"])
    assert spans["q/d/a"][0] < spans["q/d/e"][0] < spans["q/d/c"][0]
    assert max_overlap([(s, e) for s, e, _ in spans.values()]) == 1
    assert not C.run_dir(workdir, "q/d/b").joinpath(C.LOG).exists()
    assert agent(workdir, "dequeue", "--run", "q/d/eval")["removed"]


def test_a_dependency_that_succeeds_releases_its_follower(workdir):
    config = {"gpus": 2, "gpus_per_run": 1, "idle_exit_s": 2}
    enqueue(workdir, "p2/eval/s1", config, sleep=0.2, after=["p1/train/s1"])  # queued first, waits
    enqueue(workdir, "p1/train/s1", config, sleep=1.0)
    wait_until(lambda: all_finished(workdir, ["p1/train/s1", "p2/eval/s1"]), what="train then eval")
    spans = intervals(workdir, ["p1/train/s1", "p2/eval/s1"])
    assert spans["p2/eval/s1"][0] >= spans["p1/train/s1"][1]


def test_a_killed_run_can_be_queued_again_at_once(workdir):
    """resume of a stalled run: KILL, then queue the next attempt before the supervisor's next tick."""
    config = {"gpus": 0, "idle_exit_s": 2}
    run = "q/r/s1"
    enqueue(workdir, run, config, sleep=60)
    wait_until(lambda: C.run_dir(workdir, run).joinpath("t_start").exists(), what="the first attempt running")
    assert agent(workdir, "signal", "--run", run, "--sig", "KILL")["signalled"]
    again = enqueue(workdir, run, config, sleep=0.1)  # refused before: "already started here"
    assert again["position"] == 1
    wait_until(lambda: all_finished(workdir, [run]), what="the second attempt")
    finished = [f for f in agent(workdir, "queue-state")["finished"] if f["run"] == run]
    assert [f["exit_code"] for f in finished] == [None, 0]  # killed (no exit code), then done
    assert starts_in_log(workdir, run) == 2
