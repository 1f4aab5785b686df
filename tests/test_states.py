"""State derivation: heartbeat + process + exit code -> run state; never from log text."""
import pytest

from opskit.states import Observation, derive_state, progress_fields

NOW = 1_000_000.0


def hb(state, age=1.0, **kw):
    return {"state": state, "updated_at": NOW - age, **kw}


@pytest.mark.parametrize("obs, expected", [
    (Observation(None, None, alive=True, now=NOW), "starting"),
    (Observation(hb("tokenizing"), None, alive=True, now=NOW), "tokenizing"),
    (Observation(hb("training"), None, alive=True, now=NOW), "training"),
    (Observation(hb("evaluating"), None, alive=True, now=NOW), "evaluating"),
    (Observation(hb("training", age=301), None, alive=True, now=NOW), "stalled"),
    # beating, but the trainer reported nothing for 301 s: hung while training, not while tokenizing
    (Observation(hb("training", progress_at=NOW - 301), None, alive=True, now=NOW), "stalled"),
    (Observation(hb("training", progress_at=NOW - 299), None, alive=True, now=NOW), "training"),
    (Observation(hb("tokenizing", progress_at=NOW - 301), None, alive=True, now=NOW), "tokenizing"),
    (Observation(hb("training"), None, alive=False, now=NOW), "lost"),
    (Observation(None, None, alive=False, now=NOW), "lost"),
    (Observation(hb("done"), 0, alive=False, now=NOW), "done"),
    (Observation(hb("training"), 0, alive=False, now=NOW), "failed"),  # 0 without finishing is not done
    (Observation(hb("training"), 1, alive=False, now=NOW), "failed"),
    (Observation(hb("training"), -9, alive=False, now=NOW), "failed"),
    (Observation(hb("interrupted", checkpoint_step=40), 75, alive=False, now=NOW), "cancelled"),
    (Observation(hb("failed", message="CUDA out of memory"), 1, alive=False, now=NOW), "failed"),
    (Observation(None, None, alive=False, now=NOW, started=False), "queued"),
    (Observation(hb("done"), None, alive=True, now=NOW), "evaluating"),  # finishing up
])
def test_derive_state(obs, expected):
    assert derive_state(obs)[0] == expected


def test_slow_logging_runs_wait_three_of_their_own_report_intervals():
    # 10 steps per report at 1000 tokens/step and 50 tokens/s: a report every 200 s, so 600 s of quiet
    slow = hb("training", progress_at=NOW - 500, step=20, tokens=20_000, tokens_per_s=50.0)
    assert derive_state(Observation(slow, None, alive=True, now=NOW), 300, log_every=10)[0] == "training"
    assert derive_state(Observation({**slow, "progress_at": NOW - 601}, None, alive=True, now=NOW), 300,
                        log_every=10)[0] == "stalled"
    assert derive_state(Observation(slow, None, alive=True, now=NOW), 300)[0] == "stalled"  # pace unknown


def test_reasons_carry_the_evidence():
    assert "CUDA out of memory" in derive_state(Observation(hb("failed", message="CUDA out of memory"), 1, False, NOW))[1]
    assert "step 40" in derive_state(Observation(hb("interrupted", checkpoint_step=40), 75, False, NOW))[1]
    assert derive_state(Observation(hb("training", age=50), None, True, NOW), stall_after_s=30)[0] == "stalled"


def test_progress_fields_copy_heartbeat_numbers():
    f = progress_fields(hb("training", step=10, total_steps=100, loss=3.5, tokens_per_s=1e4, eta_s=90, cache_bytes=7))
    assert f == {"step": 10, "total_steps": 100, "loss": 3.5, "tokens_per_s": 1e4, "eta_s": 90, "cache_bytes": 7,
                 "heartbeat_at": NOW - 1.0}


def idle_buckets(now: float, seconds: float, util: float = 2.0, busy_before: bool = True) -> list:
    """GPU buckets (train/gpu_monitor.py) ending now: `seconds` of them at `util`, a busy one before."""
    from train.contract import GPU_BUCKET_S
    start = now - now % GPU_BUCKET_S
    low = [[start - i * GPU_BUCKET_S, util] for i in range(int(seconds // GPU_BUCKET_S) + 1)][::-1]
    return ([[low[0][0] - GPU_BUCKET_S, 95.0]] if busy_before else []) + low


def test_gpus_idle_for_the_window_is_a_stall_of_a_training_run_only():
    from opskit.states import DEFAULT_GPU_IDLE_WINDOW_S as WINDOW
    idle = hb("training", progress_at=NOW - 5, gpu_util=2.0, gpu_util_max=idle_buckets(NOW, WINDOW + 30))
    state, reason = derive_state(Observation(idle, None, alive=True, now=NOW))
    assert state == "stalled" and reason.startswith("GPUs idle") and "10%" in reason
    short = {**idle, "gpu_util_max": idle_buckets(NOW, WINDOW - 90)}  # not long enough yet
    assert derive_state(Observation(short, None, alive=True, now=NOW))[0] == "training"
    busy_inside = {**idle, "gpu_util_max": [*idle["gpu_util_max"][:5], [NOW - 300, 60.0], *idle["gpu_util_max"][5:]]}
    busy_inside["gpu_util_max"].sort()
    assert derive_state(Observation(busy_inside, None, alive=True, now=NOW))[0] == "training"
    stopped_sampling = {**idle, "gpu_util_max": idle_buckets(NOW - 200, WINDOW + 30)}
    assert derive_state(Observation(stopped_sampling, None, alive=True, now=NOW))[0] == "training"
    assert derive_state(Observation({**idle, "state": "evaluating"}, None, alive=True, now=NOW))[0] == "evaluating"
    assert derive_state(Observation(idle, None, alive=True, now=NOW), gpu_idle_pct=0)[0] == "training"  # off
    assert derive_state(Observation(idle, None, alive=True, now=NOW), gpu_idle_pct=1)[0] == "training"
    assert derive_state(Observation(idle, None, alive=True, now=NOW), gpu_idle_window_s=3000)[0] == "training"
    cpu = hb("training", progress_at=NOW - 5)  # a CPU run has no samples: never "GPUs idle"
    assert derive_state(Observation(cpu, None, alive=True, now=NOW))[0] == "training"


def test_stall_rules_come_from_the_target_config():
    from opskit.states import stall_rules
    assert stall_rules({}) == {"stall_after_s": 300.0, "gpu_idle_pct": 10.0, "gpu_idle_window_s": 600.0}
    assert stall_rules({"stall_after_s": 60, "gpu_idle_pct": 0, "gpu_idle_window_s": 120}) == {
        "stall_after_s": 60.0, "gpu_idle_pct": 0.0, "gpu_idle_window_s": 120.0}
    assert progress_fields({"gpu_util": 97.5, "gpu_mem_mb": 70000, "gpu_power_w": 650.0, "gpu_util_max": [[0, 1]]}) == {
        "gpu_util": 97.5, "gpu_mem_mb": 70000, "gpu_power_w": 650.0}
