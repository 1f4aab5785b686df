"""Training throughput and MFU on one GPU: the trainer's path next to the earlier single-file scripts.

Variants, same model, batch and random tokens, measured in one process:
  legacy          fp32 parameters, torch.autocast(bf16), torch.optim.AdamW as a plain script gets it
                  (unfused: torch's default multi-tensor path), no compile
  fsdp2           the trainer: train.distributed.parallelize (FSDP2, bf16 params, fp32 reduce) and
                  train.run.adamw (fused, decay on matrices only)
  fsdp2-compile   the same with torch.compile per block

Example (an H100):
  python benchmarks/bench_train_gpu.py --presets 350M 1.5B --seq-len 2048

Smoke run on a CPU (fp32 compute for fsdp2, no MFU, no peak memory; checks the code paths only):
  python benchmarks/bench_train_gpu.py --device cpu --presets tiny --variants legacy fsdp2 \
      --seq-len 64 --micro-batch 2 --warmup-steps 1 --steps 2
"""
from __future__ import annotations

import argparse
import gc
import json
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["350M", "1.5B"], help="train.presets names")
    p.add_argument("--variants", nargs="+", default=["legacy", "fsdp2", "fsdp2-compile"],
                   choices=["legacy", "fsdp2", "fsdp2-compile"])
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--micro-batch", type=int, nargs="+", default=None,
                   help="sequences per step, one per preset (default: 8 for <1B, 4 above)")
    p.add_argument("--spectrum", default="geo_500k")
    p.add_argument("--warmup-steps", type=int, default=5, help="untimed steps (compile, allocator)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a smoke run of the code paths")
    p.add_argument("--json", action="store_true", help="print one JSON object per measurement too")
    return p.parse_args(argv)


def build(variant: str, cfg, inv_freq, device, activation_checkpointing: bool):
    import torch
    from train.distributed import compute_dtype, parallelize
    from train.model import GPT
    from train.run import adamw

    torch.manual_seed(0)
    model = GPT(cfg, inv_freq).to(device)
    if variant == "legacy":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        return model, opt
    parallelize(model, compute_dtype("auto", device), activation_checkpointing,
                compile_blocks=variant == "fsdp2-compile")
    return model, adamw(model, 1e-4, 0.1, fused=device.type == "cuda")


def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(variant: str, cfg, inv_freq, seq_len: int, micro_batch: int, args) -> dict:
    import torch
    from train import presets
    from train.mfu import mfu, peak_flops

    device = torch.device(args.device)
    model, opt = build(variant, cfg, inv_freq, device, args.activation_checkpointing)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1), device=device, generator=g)
    inputs, targets = x[:, :-1], x[:, 1:]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if variant == "legacy" else None

    def step():
        if autocast is not None:
            with autocast:
                loss = model(inputs, targets)
        else:
            loss = model(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup_steps):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss_value = loss.item()
    sync(device)
    elapsed = time.perf_counter() - t
    tps = args.steps * micro_batch * seq_len / elapsed
    name = torch.cuda.get_device_name(device) if cuda else None
    flops = presets.flops_per_token(cfg, seq_len)
    result = {
        "preset": cfg.name, "variant": variant, "seq_len": seq_len, "micro_batch": micro_batch,
        "params": presets.param_count(cfg), "tokens_per_s": tps, "ms_per_step": elapsed / args.steps * 1e3,
        "mfu": mfu(flops, tps, peak_flops(name, "bf16"), 1),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "loss": loss_value, "gpu": name,
    }
    del model, opt, x, inputs, targets
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from train import presets, spectra
    from train.distributed import init_distributed, shutdown

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_train_gpu.py: no CUDA GPU here (--device cpu makes a smoke run)")
    if args.activation_checkpointing and "legacy" in args.variants:
        raise SystemExit("--activation-checkpointing applies to the fsdp2 variants only")
    torch.backends.cuda.matmul.allow_tf32 = True
    init_distributed()  # FSDP2 needs a process group; a one-rank group here
    micro = args.micro_batch or [8 if presets.param_count(presets.get_preset(n)) < 1e9 else 4 for n in args.presets]
    if len(micro) != len(args.presets):
        raise SystemExit("--micro-batch takes one value per preset")
    rows = []
    for name, mb in zip(args.presets, micro):
        cfg = presets.get_preset(name)
        inv = spectra.inv_freq(args.spectrum, cfg.head_dim)
        for variant in args.variants:
            try:
                r = measure(variant, cfg, inv, args.seq_len, mb, args)
            except torch.cuda.OutOfMemoryError:
                r = {"preset": name, "variant": variant, "seq_len": args.seq_len, "micro_batch": mb, "error": "OOM"}
                gc.collect()
                torch.cuda.empty_cache()
            rows.append(r)
            if args.json:
                print(json.dumps(r), flush=True)
            if "error" in r:
                print(f"{name:>6} {variant:<14} OOM at micro-batch {mb}", flush=True)
            else:
                mfu_text = f"{r['mfu'] * 100:5.1f}%" if r["mfu"] is not None else "  n/a"
                mem_text = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "n/a"
                print(f"{name:>6} {variant:<14} mb {mb:>2} seq {args.seq_len}: {r['tokens_per_s']:>10,.0f} tok/s  "
                      f"MFU {mfu_text}  {r['ms_per_step']:7.1f} ms/step  peak {mem_text}  loss {r['loss']:.3f}",
                      flush=True)
    shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
