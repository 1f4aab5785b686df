"""End to end: `python -m train.run` and `torchrun -m train.run` on the demo data, tiny preset, CPU.

Real processes, real data cache, real signals. One tokenizer/cache per test session.
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

from train.checkpoint import complete_steps
from train.contract import (CKPT_DIR, EVAL_PER_LENGTH, EXIT_BAD_SPEC, EXIT_INTERRUPTED, LOG, RESULTS, SPEC, STATUS,
                            read_json)
from train.heartbeat import read_loss_curve

pytestmark = pytest.mark.slow

SEQ, MICRO = 64, 8
STEPS = 40  # single process; 20 under 2 ranks


def make_spec(out_dir: Path, cache_dir: Path, **overrides) -> dict:
    spec = {
        "run": f"test/{out_dir.name}/s7", "phase": "test", "config": out_dir.name, "seed": 7, "attempt": 1,
        "preset": "tiny",
        "rope": {"spectrum": "geo_10k", "scaling": None},
        "tokenizer": "opskit-demo-bpe",
        "data": {"train": [{"dataset": "demo-stories", "weight": 1.0}],
                 "validation": {"dataset": "demo-stories", "split": "validation", "max_tokens": 20000}},
        "train_tokens": STEPS * SEQ * MICRO, "seq_len": SEQ, "micro_batch": MICRO, "grad_accum": 1,
        "lr": 0.003, "warmup_frac": 0.1, "weight_decay": 0.1, "grad_clip": 1.0,
        "dtype": "fp32", "compile": False, "activation_checkpointing": False,
        "eval": {"lengths": [128, 512], "chunks": 2, "mode": "sequential"},
        "checkpoint_every": 5, "keep_checkpoints": 2, "log_every": 1,
        "cache_dir": str(cache_dir), "out_dir": str(out_dir),
    }
    spec.update(overrides)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SPEC).write_text(json.dumps(spec, indent=1))
    return spec


def start(out_dir: Path, nproc: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPSKIT_HEARTBEAT_S": "0.5",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "train.run", "--spec", str(out_dir / SPEC)]
    else:
        cmd = [sys.executable, "-m", "train.run", "--spec", str(out_dir / SPEC)]
    log = open(out_dir / LOG, "a")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def finish(proc: subprocess.Popen, out_dir: Path, timeout: float = 120) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"trainer did not finish in {timeout}s:\n{(out_dir / LOG).read_text()[-3000:]}")


def run_to_end(out_dir: Path, nproc: int | None = None) -> int:
    return finish(start(out_dir, nproc), out_dir)


def wait_for(predicate, timeout: float, what: str, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.returncode}) before {what}")
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def signal_at_step(out_dir: Path, proc: subprocess.Popen, step: int, sig=signal.SIGTERM) -> None:
    wait_for(lambda: any(r["step"] >= step for r in _curve_or_empty(out_dir)), 90, f"step {step}", proc)
    proc.send_signal(sig)


def _curve_or_empty(out_dir):
    try:
        return read_loss_curve(out_dir)
    except json.JSONDecodeError:  # a line being appended right now
        return []


def assert_same_curve(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["tokens"] == rb["tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6, rel=1e-6), ra["step"]
        assert ra["lr"] == pytest.approx(rb["lr"], rel=1e-12)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5, abs=1e-6)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, cache_dir) -> Path:
    """One uninterrupted single-process run (also builds the session's tokenizer and cache)."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    make_spec(out, cache_dir)
    rc = run_to_end(out)
    assert rc == 0, (out / LOG).read_text()[-3000:]
    return out


def test_single_process_run_trains_and_reports(reference_run):
    out = reference_run
    curve = read_loss_curve(out)
    assert [r["step"] for r in curve] == list(range(1, STEPS + 1))
    assert curve[-1]["tokens"] == STEPS * SEQ * MICRO
    first, last = curve[0]["loss"], sum(r["loss"] for r in curve[-5:]) / 5
    assert last < first - 1.0, (first, last)  # from ~ln(4096) = 8.3 down

    status = read_json(out / STATUS)
    assert status["state"] == "done" and status["step"] == status["total_steps"] == STEPS
    assert status["checkpoint_step"] == STEPS
    results = read_json(out / RESULTS)
    assert results["steps"] == STEPS and results["tokens_seen"] == STEPS * SEQ * MICRO
    assert results["preset"] == "tiny" and results["seed"] == 7
    assert results["mfu_steady"] is None and results["mfu_wall"] is None  # no peak FLOP/s for a CPU
    assert results["final_train_loss"] == pytest.approx(curve[-1]["loss"])
    from train.presets import get_preset, param_count
    assert results["params"] == param_count(get_preset("tiny"))
    assert results["wall_time_s"] > 0
    # Steady leaves the first steps out (compile, warm-up); wall is every training step.
    from train.step import STEADY_AFTER_STEPS
    assert results["steady_steps"] == STEPS - STEADY_AFTER_STEPS
    assert results["tokens_per_s_steady"] > 0 and results["tokens_per_s_wall"] > 0
    assert results["attention_backend"].startswith("sdpa:") and results["loss_impl"] == "chunked"
    assert results["compile"] is False
    assert results["versions"]["gpu_count"] == 0 and results["versions"]["torch"].startswith("2.")
    evals = read_json(out / EVAL_PER_LENGTH)
    assert set(evals["lengths"]) == {"128", "512"}
    assert set(results["ppl"]) == {k for k, v in evals["lengths"].items() if not v.get("skipped")}
    assert complete_steps(out / CKPT_DIR) == [STEPS - 5, STEPS]  # pruned to keep_checkpoints=2


def test_sigterm_then_resume_gives_the_uninterrupted_curve(reference_run, cache_dir, tmp_path):
    out = tmp_path / "resumed"
    make_spec(out, cache_dir)
    proc = start(out)
    signal_at_step(out, proc, 12)
    assert finish(proc, out) == EXIT_INTERRUPTED, (out / LOG).read_text()[-3000:]
    status = read_json(out / STATUS)
    stopped = status["checkpoint_step"]
    assert status["state"] == "interrupted" and 12 <= stopped < STEPS
    assert complete_steps(out / CKPT_DIR)[-1] == stopped
    assert read_loss_curve(out)[-1]["step"] == stopped

    make_spec(out, cache_dir, attempt=2)
    assert run_to_end(out) == 0, (out / LOG).read_text()[-3000:]
    assert read_json(out / STATUS)["attempt"] == 2
    assert_same_curve(read_loss_curve(out), read_loss_curve(reference_run))
    from train.step import STEADY_AFTER_STEPS  # each attempt has its own warm-up
    assert read_json(out / RESULTS)["steady_steps"] == STEPS - 2 * STEADY_AFTER_STEPS
    assert "attempt 2" in (out / LOG).read_text()


def test_resume_after_sigkill_truncates_the_curve_to_the_checkpoint(reference_run, cache_dir, tmp_path):
    """A hard kill (no checkpoint on the way out): lines past the last checkpoint are redone once."""
    out = tmp_path / "killed"
    make_spec(out, cache_dir)
    proc = start(out)
    signal_at_step(out, proc, 13, signal.SIGKILL)
    proc.wait(timeout=30)
    make_spec(out, cache_dir, attempt=2)
    assert run_to_end(out) == 0, (out / LOG).read_text()[-3000:]
    assert_same_curve(read_loss_curve(out), read_loss_curve(reference_run))


@pytest.fixture(scope="session")
def torchrun_reference(tmp_path_factory, cache_dir, reference_run) -> Path:
    """An uninterrupted run under torchrun --nproc_per_node=2 (after the cache exists)."""
    out = tmp_path_factory.mktemp("runs") / "ddp_reference"
    make_spec(out, cache_dir)
    assert run_to_end(out, nproc=2) == 0, (out / LOG).read_text()[-3000:]
    return out


def test_torchrun_two_ranks_trains(torchrun_reference):
    out = torchrun_reference
    curve = read_loss_curve(out)
    assert [r["step"] for r in curve] == list(range(1, STEPS // 2 + 1))  # twice the tokens per step
    assert curve[-1]["tokens"] == STEPS * SEQ * MICRO
    assert curve[-1]["loss"] < curve[0]["loss"] - 1.0
    results = read_json(out / RESULTS)
    assert results["steps"] == STEPS // 2 and results["tokens_seen"] == STEPS * SEQ * MICRO
    assert read_json(out / STATUS)["state"] == "done"
    assert (out / LOG).read_text().count("phase done") == 1  # only rank 0 logs


def test_torchrun_sigterm_then_resume_gives_the_uninterrupted_curve(torchrun_reference, cache_dir, tmp_path):
    out = tmp_path / "ddp_resumed"
    make_spec(out, cache_dir)
    proc = start(out, nproc=2)
    signal_at_step(out, proc, 7)  # torchrun forwards SIGTERM to both workers, which save and exit 75
    finish(proc, out)  # torchrun's own exit code is not the workers' (see docs/trainer.md)
    status = read_json(out / STATUS)
    assert status["state"] == "interrupted", (out / LOG).read_text()[-3000:]
    assert status["checkpoint_step"] == complete_steps(out / CKPT_DIR)[-1] >= 7
    assert (out / LOG).read_text().count(f"exit {EXIT_INTERRUPTED}") == 1
    make_spec(out, cache_dir, attempt=2)
    assert run_to_end(out, nproc=2) == 0, (out / LOG).read_text()[-3000:]
    assert_same_curve(read_loss_curve(out), read_loss_curve(torchrun_reference))


def test_same_spec_gives_same_curve_start(reference_run, cache_dir, tmp_path):
    out = tmp_path / "again"
    make_spec(out, cache_dir, train_tokens=3 * SEQ * MICRO, checkpoint_every=100)
    assert run_to_end(out) == 0, (out / LOG).read_text()[-3000:]
    again, ref = read_loss_curve(out), read_loss_curve(reference_run)
    assert again[0]["loss"] == ref[0]["loss"]  # same initial weights and first batch, bitwise


@pytest.mark.parametrize("overrides, field", [
    ({"seq_len": "64"}, "seq_len"),
    ({"preset": "huge"}, "preset"),
    ({"rope": {"spectrum": "zigzag_1", "scaling": None}}, "rope.spectrum"),
    ({"data": {"train": [{"dataset": "demo-storiez", "weight": 1.0}],
               "validation": {"dataset": "demo-stories", "split": "validation", "max_tokens": 20000}}},
     "data.train[0].dataset"),
])
def test_bad_spec_exits_2_naming_the_field(cache_dir, tmp_path, overrides, field):
    out = tmp_path / "bad"
    make_spec(out, cache_dir, **overrides)
    assert run_to_end(out) == EXIT_BAD_SPEC
    log = (out / LOG).read_text()
    assert f"'{field}'" in log and "Traceback" not in log


def test_sigterm_while_tokenizing_exits_75_without_checkpoint(tmp_path):
    out = tmp_path / "early"
    make_spec(out, tmp_path / "fresh_cache")  # an empty cache: tokenizer and token cache get built
    proc = start(out)
    wait_for(lambda: (read_json_safe(out / STATUS) or {}).get("state") == "tokenizing", 60, "tokenizing", proc)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, out) == EXIT_INTERRUPTED, (out / LOG).read_text()[-3000:]
    status = read_json(out / STATUS)
    assert status["state"] == "interrupted" and status["checkpoint_step"] is None


def read_json_safe(path):
    try:
        return read_json(path)
    except json.JSONDecodeError:
        raise AssertionError(f"{path} was read while half-written")


SLOW_TO_STOP = """
import pathlib, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: (time.sleep(float(sys.argv[2])), sys.exit(75)))
pathlib.Path(sys.argv[1]).touch()
time.sleep(120)
"""


@pytest.mark.parametrize("grace, stop_s, killed", [(2, 6, True), (20, 3, False)])
def test_torchrun_waits_the_signal_grace_for_a_checkpointing_worker(tmp_path, grace, stop_s, killed):
    """opskit gives every run TORCH_ELASTIC_SHUTDOWN_TIMEOUT (train.contract.SIGNAL_GRACE_S): torchrun
    must wait that long for a worker that takes its time to checkpoint after SIGTERM, and no longer."""
    from opskit.targets.local import LocalTarget

    assert LocalTarget("local", {}).trainer_env(1)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "300"
    script, ready = tmp_path / "worker.py", tmp_path / "ready"
    script.write_text(SLOW_TO_STOP)
    env = {**os.environ, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(grace), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                             str(script), str(ready), str(stop_s)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
        time.sleep(0.1)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    waited = time.monotonic() - t0
    if killed:  # the worker needed longer than the grace: SIGKILL after about `grace` seconds
        assert grace - 0.5 < waited < stop_s, (waited, out)
    else:  # the worker finished its "checkpoint" inside the grace
        assert stop_s - 0.5 < waited < grace, (waited, out)
    assert ("forcefully exiting via 9" in out) == killed, out
