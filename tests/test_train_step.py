"""The trainer's step (train/step.py) on real FSDP2 models in child processes (their own gloo groups):
unshards per optimizer step, the compiled + fused-loss path against plain eager PyTorch, the meta-device
build, and that the GPU benchmark times this very function.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent("""
    import json, sys
    import torch
    import torch.nn.functional as F
    import train.step
    from train.distributed import init_distributed, shutdown
    from train.run import adamw, build_model, build_optimizer, plan_model
    from train.spec import validate

    mode = sys.argv[1]
    info = init_distributed()

    def spec(**kw):
        raw = {"run": "t/x/s1", "phase": "t", "config": "x", "seed": 1, "attempt": 1, "preset": "tiny",
               "rope": {"spectrum": "geo_10k", "scaling": None}, "tokenizer": "opskit-demo-bpe",
               "data": {"train": [{"dataset": "demo-stories", "weight": 1.0}],
                        "validation": {"dataset": "demo-stories", "split": "validation", "max_tokens": 1000}},
               "train_tokens": 10**6, "seq_len": 32, "micro_batch": 2, "grad_accum": 4, "lr": 3e-3,
               "warmup_frac": 0.0, "weight_decay": 0.1, "grad_clip": 1.0, "dtype": "fp32", "compile": False,
               "activation_checkpointing": False,
               "eval": {"lengths": [32], "chunks": 1, "mode": "sequential"}, "checkpoint_every": 10,
               "keep_checkpoints": 1, "log_every": 1, "cache_dir": "/tmp/c", "out_dir": "/tmp/o"}
        raw.update(kw)
        return validate(raw)

    def batches(s, step):
        g = torch.Generator().manual_seed(1000 * info.rank + step)
        x = torch.randint(0, 4096, (s.grad_accum, s.micro_batch, s.seq_len + 1), generator=g)
        return [(x[m, :, :-1], x[m, :, 1:]) for m in range(s.grad_accum)]

    def emit(obj):
        if info.rank == 0:
            print(json.dumps(obj), flush=True)

    if mode == "unshards":
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
        count = [0]
        wait = FSDPParamGroup.wait_for_unshard
        def counting(self):  # an unshard was issued (all-gather, or the bf16/fp32 copy-out on one rank)
            count[0] += self._all_gather_result is not None
            return wait(self)
        FSDPParamGroup.wait_for_unshard = counting
        s = spec()
        model, *_ = build_model(plan_model(s), s, info)
        opt = build_optimizer(model, s, info.device)
        per_step = []
        for step in range(3):
            count[0] = 0
            train.step.train_step(model, opt, batches(s, step), s.grad_accum, s.grad_clip)
            per_step.append(count[0])
        emit({"world": info.world_size, "unshards": per_step})

    elif mode == "fused":  # the compiled + fused path against plain eager PyTorch, same weights and data
        s = spec(compile=True, grad_accum=2, micro_batch=4)
        model, _, _, kernels = build_model(plan_model(s), s, info)
        model.loss_chunk = 48  # several chunks per micro-step (4 x 32 rows)
        opt = build_optimizer(model, s, info.device)
        torch.manual_seed(s.seed)
        from train.model import GPT
        plan = plan_model(s)
        ref = GPT(plan.cfg, plan.inv_freq, plan.attention_factor)
        ref_opt = adamw(ref, s.lr, s.weight_decay, fused=False)
        fused, eager = [], []
        for step in range(20):
            data = batches(s, step % 2)  # two batches seen again and again: the loss must fall
            loss, _ = train.step.train_step(model, opt, data, s.grad_accum, s.grad_clip)
            fused.append(loss.item())
            total = 0.0
            for x, y in data:
                part = F.cross_entropy(ref(x).flatten(0, 1), y.flatten()) / s.grad_accum
                part.backward()
                total += part.item()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), s.grad_clip)
            ref_opt.step()
            ref_opt.zero_grad()
            eager.append(total)
        emit({"kernels": kernels, "fused": fused, "eager": eager})

    elif mode == "meta":  # a big model's way: built on meta, sharded, materialised, initialised
        s = spec()
        model, n_params, _, _ = build_model(plan_model(s), s, info, on_meta=True)
        std = model.blocks[0].attn.q.weight.full_tensor().std().item()
        opt = build_optimizer(model, s, info.device)
        losses = [train.step.train_step(model, opt, batches(s, 0), s.grad_accum, s.grad_clip)[0].item()
                  for _ in range(8)]
        w = torch.tensor(plan_model(s).inv_freq, dtype=torch.float64)
        emit({"losses": losses, "n_params": n_params, "inv_freq_exact": bool(torch.equal(model.inv_freq, w)),
              "device": model.inv_freq.device.type, "std": std})

    elif mode == "bench":  # the benchmark's trainer variant must call train.step.train_step itself
        sys.path.insert(0, sys.argv[2])
        calls = []
        real = train.step.train_step
        def recording(*args, **kwargs):
            calls.append(real)
            return real(*args, **kwargs)
        train.step.train_step = recording
        shutdown()  # the benchmark makes its own group
        import bench_train_gpu
        bench_train_gpu.main(["--device", "cpu", "--matrix", "demo", "--phase", "demo", "--config", "geo_500k",
                              "--variants", "trainer", "--seq-len", "32", "--micro-batch", "2", "--grad-accum", "2",
                              "--warmup-steps", "1", "--steps", "2"])
        print(json.dumps({"calls": len(calls)}), flush=True)
        sys.exit(0)
    shutdown()
""")


def run_child(mode: str, nproc: int | None = None, *extra: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "--no-python",
            sys.executable, "-c", CHILD, mode, *extra] if nproc else [sys.executable, "-c", CHILD, mode, *extra])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_one_rank_unshards_each_group_once_per_optimizer_step():
    """Before: 20 per step at grad_accum 4 on the tiny model (2 blocks + root, forward and backward of
    every micro-step). Now: each of the 3 groups once, in the first micro-step's forward."""
    (out,) = run_child("unshards")
    assert out == {"world": 1, "unshards": [3, 3, 3]}


@pytest.mark.slow
def test_two_ranks_regather_only_the_resharded_block_in_backward():
    """Two ranks keep resharding after forward (memory), except the last block and the root; nothing
    reshards after backward until the last micro-step: 3 + 1 per micro-step = 7 (was 20)."""
    (out,) = run_child("unshards", 2)
    assert out == {"world": 2, "unshards": [7, 7, 7]}


@pytest.mark.slow
def test_compiled_fused_path_trains_like_plain_eager():
    (out,) = run_child("fused")
    assert out["kernels"]["compile"] is True and out["kernels"]["loss_impl"] == "chunked_compiled"
    fused, eager = out["fused"], out["eager"]
    assert max(abs(a - b) for a, b in zip(fused, eager)) < 1e-3, (fused, eager)
    assert fused[-1] < fused[0] - 1.0  # and it does train


def test_meta_device_build_trains_with_exact_rope():
    (out,) = run_child("meta")
    from train.presets import get_preset, param_count
    assert out["n_params"] == param_count(get_preset("tiny")) and out["inv_freq_exact"] and out["device"] == "cpu"
    assert out["std"] == pytest.approx(0.02, rel=0.15)  # init_weights ran on the materialised shards
    assert out["losses"][-1] < out["losses"][0] - 0.5  # same batch 8 times: memorised


def test_benchmark_times_the_trainers_own_step():
    *_, out = run_child("bench", None, str(ROOT / "benchmarks"))
    assert out == {"calls": 1 + 2}  # warm-up + timed steps, all through train.step.train_step


def test_step_timer_leaves_each_attempts_warm_up_out_of_the_steady_figures():
    import time as _time
    import torch
    from train.step import STEADY_AFTER_STEPS, StepTimer
    timer = StepTimer(torch.device("cpu"), total_s=10.0, steady_s=4.0, steady_steps=2)  # a resumed attempt
    durations = []
    for _ in range(STEADY_AFTER_STEPS + 2):
        timer.begin()
        _time.sleep(0.01)
        durations.append(timer.end())
    assert timer.steady_steps == 2 + 2
    assert timer.steady_s == pytest.approx(4.0 + sum(durations[STEADY_AFTER_STEPS:]))
    assert timer.total_s == pytest.approx(10.0 + sum(durations))


def test_gc_is_off_in_the_train_loop_and_back_on_after():
    import gc
    from train.step import gc_controlled
    with gc_controlled():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_eval_shards_pad_every_rank_to_the_same_count():
    from train.distributed import shard_indices
    shards = [shard_indices(5, r, 2) for r in range(2)]
    assert shards == [[0, 2, 4], [1, 3, 3]]  # rank 1 repeats its last chunk (discarded on gathering)
    assert shard_indices(1, 1, 2) == [0] and shard_indices(4, 0, 1) == [0, 1, 2, 3]
