"""Passkey retrieval at long lengths on one GPU: time and peak memory of p2's passkey machinery.

A randomly initialised model of a preset (scores are chance level: this measures the machinery and
memory, not retrieval) in bf16, the demo tokenizer (built offline into --cache-dir), and the same
`evaluate_passkey` that `python -m train.p2` runs. Per length: wall time and peak CUDA memory.

Example (an H100):
  python benchmarks/bench_passkey_gpu.py --preset 350M --lengths 4096 16384 --depths 0.1 0.5 0.9 --trials 2
"""
from __future__ import annotations

import argparse
import json
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="350M", help="train.presets name (50M, 350M, ...)")
    p.add_argument("--spectrum", default="hybrid_a0.2_t100k", help="RoPE spectrum name")
    p.add_argument("--lengths", type=int, nargs="+", default=[16384], help="prompt lengths in tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--trials", type=int, default=2, help="trials per (length, depth) cell")
    p.add_argument("--candidates", type=int, default=5, help="keys compared by log-likelihood")
    p.add_argument("--batch-size", type=int, default=5, help="candidate sequences per forward")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--cache-dir", default="/tmp/opskit-bench-cache", help="where the demo tokenizer is built")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def measure_passkey(args) -> list[dict]:
    """One row per length: wall time and peak CUDA memory of evaluate_passkey on a fresh model."""
    import torch

    from train.data.tokenizer import DEMO_BPE, load_tokenizer
    from train.model import build_model
    from train.passkey import ModelRunner, evaluate_passkey
    from train.presets import get_preset

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    tok = load_tokenizer(DEMO_BPE, args.cache_dir)
    cfg = get_preset(args.preset)
    torch.manual_seed(0)
    model = build_model(cfg, args.spectrum, device=device).to(dtype).eval()  # as p2 (RoPE stays fp64)
    runner = ModelRunner(model, device, batch_size=args.batch_size)
    rows = []
    for length in args.lengths:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        result = evaluate_passkey(runner, tok, [length], args.depths, args.trials, args.candidates)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        rows.append({
            "measure": "passkey", "preset": args.preset, "spectrum": args.spectrum, "length": length,
            "dtype": args.dtype, "cells": len(args.depths), "trials": args.trials, "candidates": args.candidates,
            "time_s": round(elapsed, 2),
            "time_per_trial_s": round(elapsed / (len(args.depths) * args.trials), 3),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
            "ll_acc": result["by_length"].get(str(length), {}).get("ll_acc"),
            "gen_acc": result["by_length"].get(str(length), {}).get("gen_acc"),
            "skipped": result["skipped"],
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        })
    del model, runner
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = measure_passkey(args)
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
