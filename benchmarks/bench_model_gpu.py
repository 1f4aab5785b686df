"""Time the model on a GPU box: forward+backward at batch x seq_len tokens, and PPL@eval_len.

Prints throughput, MFU (flops_per_token x tokens/s / peak), eval time and peak memory. Written for
one H100 in bf16 (the issue's bar: PPL@32768 of the 1.5B preset fits in 80 GB); --device cpu with
--preset tiny --dtype fp32 is a smoke run.

Example:
    python benchmarks/bench_model_gpu.py --preset 1.5B --batch 4 --seq-len 2048 --eval-len 32768
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import train.model as model_mod
from train.evaluate import evaluate_lengths
from train.model import build_model
from train.mfu import mfu, peak_flops
from train.presets import PRESETS, flops_per_token, get_preset, param_count
from train.run import adamw

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1.5B", choices=list(PRESETS))
    p.add_argument("--spectrum", default="geo_500k", help="RoPE spectrum name (train/spectra.py)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per training sequence")
    p.add_argument("--steps", type=int, default=10, help="timed training steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--eval-len", type=int, default=32768, help="evaluation length in tokens (0: skip)")
    p.add_argument("--eval-chunks", type=int, default=2, help="chunks at --eval-len")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="parameter and activation dtype")
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="for MFU, FLOP/s (default: train/mfu.py's table for this GPU and dtype)")
    p.add_argument("--json", action="store_true", help="also print each measurement as one JSON line")
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def fmt_gib(value: float | None) -> str:
    return "n/a (not CUDA)" if value is None else f"{value:.1f} GiB"


def emit(args, row: dict) -> None:
    if args.json:
        print(json.dumps(row), flush=True)


def bench_training(model, cfg, args, device) -> None:
    opt = adamw(model, 1e-4, 0.1, fused=device.type == "cuda")
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device)
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            sync(device)
            t0 = time.perf_counter()
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    dt = (time.perf_counter() - t0) / args.steps
    tok_s = args.batch * args.seq_len / dt
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = args.peak_flops or peak_flops(gpu, args.dtype)
    util = mfu(flops_per_token(cfg, args.seq_len), tok_s, peak, 1)
    mem = peak_memory_gib(device)
    print(f"train  {args.batch} x {args.seq_len} tokens: {dt * 1e3:.0f} ms/step (fwd+bwd+AdamW), "
          f"{tok_s:,.0f} tokens/s, MFU {'n/a' if util is None else f'{util:.1%}'}, peak memory {fmt_gib(mem)}",
          flush=True)
    emit(args, {"measure": "train", "preset": cfg.name, "dtype": args.dtype, "batch": args.batch,
                "seq_len": args.seq_len, "ms_per_step": dt * 1e3, "tokens_per_s": tok_s, "mfu": util,
                "peak_mem_gib": mem, "loss": loss.item(), "gpu": gpu})
    del opt


def bench_eval(model, cfg, args, device, dtype) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    n = args.eval_chunks * args.eval_len + 1
    val = np.random.default_rng(0).integers(0, cfg.vocab_size, n).astype(np.uint32)
    sync(device)
    t0 = time.perf_counter()
    out = evaluate_lengths(model, val, [args.eval_len], chunks=args.eval_chunks, mode="sequential",
                           seed=0, device=device, dtype=dtype)
    sync(device)
    dt = time.perf_counter() - t0
    row = out["lengths"][str(args.eval_len)]
    if "loss" not in row:
        raise SystemExit(f"eval at {args.eval_len} was skipped: {row}")
    mem = peak_memory_gib(device)
    print(f"eval   PPL@{args.eval_len}: {dt:.1f} s for {args.eval_chunks} chunks "
          f"({dt / args.eval_chunks:.1f} s/chunk), loss {row['loss']:.3f}, peak memory {fmt_gib(mem)}", flush=True)
    emit(args, {"measure": "eval", "preset": cfg.name, "dtype": args.dtype, "eval_len": args.eval_len,
                "chunks": args.eval_chunks, "time_s": dt, "loss": row["loss"], "peak_mem_gib": mem})


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = get_preset(args.preset)
    torch.manual_seed(0)
    model = build_model(cfg, args.spectrum, device=device).to(dtype)
    if args.compile:
        for block in model.blocks:
            block.compile()
    flash = model_mod.flash_attn_func is not None and device.type == "cuda" and dtype != torch.float32
    print(f"preset {cfg.name}: {param_count(cfg):,} parameters; {args.dtype} on {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; "
          f"attention: {'flash-attn' if flash else 'scaled_dot_product_attention'}")
    bench_training(model, cfg, args, device)
    model.zero_grad(set_to_none=True)
    if args.eval_len:
        bench_eval(model, cfg, args, device, dtype)


if __name__ == "__main__":
    main()
