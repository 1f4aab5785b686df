"""Perplexity at a long evaluation length on one GPU, with the model exactly as the trainer builds and
evaluates it (train.run.build_model, train.evaluate.evaluate_lengths): time and peak memory.

Training throughput is bench_train_gpu.py's (the trainer's own step). The spec comes from the
catalog as there (--matrix/--phase/--config, default the 1.5B plan); the weights are the seed's
random initialisation, so the loss is ~ln(vocab): this measures time and memory, not quality.

Example (an H100: does PPL@32768 of the 1.5B preset fit, and how long does a chunk take?):
    python benchmarks/bench_model_gpu.py --eval-len 32768 --eval-chunks 2

Smoke run on a CPU:
    python benchmarks/bench_model_gpu.py --device cpu --matrix demo --phase demo --eval-len 256 --eval-chunks 1
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from bench_train_gpu import add_spec_args, bench_spec, emit, prepare


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_args(p)
    p.add_argument("--eval-len", type=int, default=32768, help="evaluation length in tokens")
    p.add_argument("--eval-chunks", type=int, default=2, help="chunks at --eval-len")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a smoke run of the code paths")
    p.add_argument("--json", action="store_true", help="also print the measurement as one JSON line")
    return p.parse_args(argv)


def measure_eval(spec, dist_info, eval_len: int, chunks: int) -> dict:
    import torch
    from train.attention import describe
    from train.evaluate import evaluate_lengths
    from train.model import Attention
    from train.run import build_model, plan_model
    from train.step import sync

    device = dist_info.device
    cuda = device.type == "cuda"
    plan = plan_model(spec)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, _, dtype, kernels = build_model(plan, spec, dist_info)
    backend = next(m.backend for m in model.modules() if isinstance(m, Attention))
    val = np.random.default_rng(0).integers(0, plan.cfg.vocab_size, chunks * eval_len + 1).astype(np.uint32)
    sync(device)
    t0 = time.perf_counter()
    out = evaluate_lengths(model, val, [eval_len], chunks=chunks, mode="sequential", seed=0, device=device,
                           dtype=torch.float32)  # as train.run: FSDP2's policy computes in `dtype`
    sync(device)
    dt = time.perf_counter() - t0
    row = out["lengths"][str(eval_len)]
    if "loss" not in row:
        raise SystemExit(f"eval at {eval_len} was skipped: {row}")
    result = {"measure": "eval", "preset": spec.preset, "eval_len": eval_len, "chunks": chunks, "time_s": dt,
              "s_per_chunk": dt / chunks, "loss": row["loss"],
              "attention_backend": describe(backend, device, dtype, (1, eval_len, plan.cfg.n_heads, plan.cfg.head_dim)),
              "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
              # not held here; a run's evaluation has it too (fp32 AdamW moments, sharded over the ranks)
              "optimizer_state_gib": 8 * sum(p.numel() for p in model.parameters()) / 2**30,
              "gpu": torch.cuda.get_device_name(device) if cuda else None}
    del model
    return result


def format_eval(r: dict) -> str:
    mem = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f} GiB"
    return (f"{r['preset']:>5} eval     PPL@{r['eval_len']}: {r['time_s']:.1f} s for {r['chunks']} chunks "
            f"({r['s_per_chunk']:.1f} s/chunk), loss {r['loss']:.3f}, peak {mem} "
            f"(+{r['optimizer_state_gib']:.1f} GiB optimizer state in a run)  [{r['attention_backend']}]")


def main(argv=None) -> int:
    args = parse_args(argv)
    from train.distributed import shutdown
    dist_info = prepare(args.device)
    r = measure_eval(bench_spec(args), dist_info, args.eval_len, args.eval_chunks)
    emit([], r, args.json, format_eval(r))
    shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
