"""Training throughput and MFU on one GPU: the trainer's own step next to the seed-style loop.

Both variants train the same model on the same random tokens, one optimizer step = micro_batch x
grad_accum sequences, in one process:
  trainer   exactly what `python -m train.run` does for the spec: train.run.build_model (FSDP2 with
            its reshard policy, bf16 compute over fp32 master weights, compile as the spec says,
            the attention kernel and fused loss it picks), train.run.build_optimizer, and
            train.step.train_step, the function the train loop calls
  seed      the earlier scripts' way: fp32 weights under torch.autocast(bf16), full logits and
            F.cross_entropy, torch.optim.AdamW as a plain script gets it (unfused), no compile,
            a plain accumulation loop
The spec is the one opskit would launch (--matrix/--phase/--config, default the 1.5B plan's p0), with
the overrides given; tokens/s, MFU (train/mfu.py), peak memory and the trainer / seed ratio print
side by side.

Example (an H100; the 1.5B plan as launched, then micro-batch 8 without activation checkpointing):
  python benchmarks/bench_train_gpu.py
  python benchmarks/bench_train_gpu.py --variants trainer --micro-batch 8 --grad-accum 4 --activation-checkpointing off

Smoke run on a CPU (fp32, no MFU or peak memory; checks the code paths only):
  python benchmarks/bench_train_gpu.py --device cpu --matrix demo --phase demo --config geo_500k \
      --seq-len 64 --micro-batch 2 --grad-accum 2 --warmup-steps 1 --steps 2
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = ("trainer", "seed")
ON_OFF = {"on": True, "off": False, "auto": "auto"}


def add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--matrix", default="1p5b", help="catalog matrix whose spec is measured (configs/*.yaml)")
    p.add_argument("--phase", default="p0", help="phase of the matrix")
    p.add_argument("--config", default="geo_500k", help="RoPE spectrum (a config of the matrix)")
    p.add_argument("--preset", default=None, help="override the matrix's model preset")
    p.add_argument("--seq-len", type=int, default=None, help="override seq_len")
    p.add_argument("--micro-batch", type=int, default=None, help="override micro_batch (sequences per micro-step)")
    p.add_argument("--grad-accum", type=int, default=None, help="override grad_accum (micro-steps per step)")
    p.add_argument("--activation-checkpointing", choices=["on", "off"], default=None, help="override the spec's")
    p.add_argument("--compile", choices=["on", "off", "auto"], default=None, help="override the spec's")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default=None, help="override the spec's")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_args(p)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed optimizer steps (compile, allocator)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a smoke run of the code paths")
    p.add_argument("--json", action="store_true", help="print one JSON object per measurement too")
    return p.parse_args(argv)


def bench_spec(args, workdir: str | None = None):
    """The TrainSpec opskit would write for (matrix, phase, config, seed 42), with the overrides."""
    from opskit.catalog import expand, resolve_phase
    from opskit.planning import build_spec
    from train.spec import validate

    m, phase = resolve_phase(args.phase, args.matrix)
    planned = expand(m, phase, configs=[args.config], seeds=[42])[0]
    raw = build_spec(planned, workdir or tempfile.gettempdir() + "/opskit-bench", attempt=1)
    overrides = {"preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                 "grad_accum": args.grad_accum, "dtype": args.dtype,
                 "activation_checkpointing": ON_OFF.get(args.activation_checkpointing),
                 "compile": ON_OFF.get(args.compile)}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return validate(raw)


def random_batches(spec, vocab: int, device):
    """grad_accum (inputs, targets) micro-batches of random tokens, the same for every variant."""
    import torch
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(spec.grad_accum):
        x = torch.randint(0, vocab, (spec.micro_batch, spec.seq_len + 1), generator=g).to(device)
        out.append((x[:, :-1], x[:, 1:]))
    return out


def build_trainer(spec, dist_info):
    from train.run import build_model, build_optimizer, plan_model
    model, _, dtype, kernels = build_model(plan_model(spec), spec, dist_info)
    optimizer = build_optimizer(model, spec, dist_info.device)
    return model, optimizer, dtype, kernels


def trainer_step_fn(spec, model, optimizer, batches):
    import train.step  # looked up at call time: the trainer's function itself, never a copy
    return lambda: train.step.train_step(model, optimizer, batches, spec.grad_accum, spec.grad_clip)[0]


def build_seed(spec, device):
    import torch
    from train.run import plan_model
    from train.model import GPT
    plan = plan_model(spec)
    torch.manual_seed(spec.seed)
    model = GPT(plan.cfg, plan.inv_freq, attention_factor=plan.attention_factor).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=spec.weight_decay)
    return model, optimizer


def seed_step_fn(spec, model, optimizer, batches, device):
    import torch
    import torch.nn.functional as F

    def step():
        total = 0.0
        for x, y in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / spec.grad_accum
            loss.backward()
            total = total + loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total
    return step


def measure(variant: str, spec, dist_info, warmup_steps: int, steps: int) -> dict:
    """One variant at the spec's batch: tokens/s, ms per optimizer step, MFU, peak memory, last loss."""
    import torch
    from train import presets
    from train.mfu import mfu, peak_flops
    from train.step import sync

    device = dist_info.device
    cuda = device.type == "cuda"
    cfg = presets.get_preset(spec.preset)
    torch._dynamo.reset()  # each measurement compiles for its own shapes (no dynamic-shape recompiles)
    gc.collect()  # the previous measurement's model, held by compiled code until the reset
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    batches = random_batches(spec, cfg.vocab_size, device)
    if variant == "trainer":
        model, optimizer, dtype, kernels = build_trainer(spec, dist_info)
        step = trainer_step_fn(spec, model, optimizer, batches)
        dtype_name = "bf16" if dtype == torch.bfloat16 else "fp32"
    else:
        model, optimizer = build_seed(spec, device)
        step = seed_step_fn(spec, model, optimizer, batches, device)
        kernels = {"attention_backend": "sdpa (torch's priority)", "loss_impl": "full logits", "compile": False}
        dtype_name = "bf16"
    t_build = time.perf_counter()
    for _ in range(warmup_steps):
        step()
    sync(device)
    warm_s = time.perf_counter() - t_build
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss_value = float(loss)
    sync(device)
    elapsed = time.perf_counter() - t
    tokens_per_step = spec.micro_batch * spec.grad_accum * spec.seq_len
    tps = steps * tokens_per_step / elapsed
    gpu = torch.cuda.get_device_name(device) if cuda else None
    row = {
        "variant": variant, "preset": spec.preset, "seq_len": spec.seq_len, "micro_batch": spec.micro_batch,
        "grad_accum": spec.grad_accum, "activation_checkpointing": spec.activation_checkpointing
        if variant == "trainer" else False, **kernels,
        "tokens_per_s": tps, "ms_per_step": elapsed / steps * 1e3, "warmup_s": warm_s,
        "mfu": mfu(presets.flops_per_token(cfg, spec.seq_len), tps, peak_flops(gpu, dtype_name), 1),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "loss": loss_value, "gpu": gpu,
    }
    del model, optimizer, step, batches
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def measure_safely(variant, spec, dist_info, warmup_steps, steps) -> dict:
    import torch
    try:
        return measure(variant, spec, dist_info, warmup_steps, steps)
    except torch.cuda.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return {"variant": variant, "preset": spec.preset, "seq_len": spec.seq_len, "micro_batch": spec.micro_batch,
                "grad_accum": spec.grad_accum, "activation_checkpointing": spec.activation_checkpointing,
                "error": "OOM"}


def format_row(r: dict) -> str:
    head = (f"{r['preset']:>5} {r['variant']:<8} {r['micro_batch']:>2} x {r['seq_len']} x ga {r['grad_accum']}"
            f"{' AC' if r.get('activation_checkpointing') else '   '}")
    if "error" in r:
        return f"{head}: {r['error']}"
    mfu_text = f"{r['mfu'] * 100:5.1f}%" if r["mfu"] is not None else "  n/a"
    mem = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "n/a"
    return (f"{head}: {r['tokens_per_s']:>10,.0f} tok/s  MFU {mfu_text}  {r['ms_per_step']:8.1f} ms/step  "
            f"peak {mem}  loss {r['loss']:.3f}  [{r['attention_backend']}, {r['loss_impl']}, "
            f"compile {'on' if r['compile'] else 'off'}; warm-up {r['warmup_s']:.0f}s]")


def ratio_row(rows: list[dict]) -> dict | None:
    """trainer / seed tokens/s of the rows at the same batch."""
    by = {r["variant"]: r for r in rows if "error" not in r}
    if "trainer" in by and "seed" in by:
        return {"measure": "ratio", "trainer_over_seed_tokens_per_s": by["trainer"]["tokens_per_s"] / by["seed"]["tokens_per_s"]}
    return None


def prepare(device_name: str):
    """Checks the device, joins a one-rank process group (FSDP2 needs one); returns DistInfo."""
    import torch
    from train.distributed import init_distributed
    if device_name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here (--device cpu makes a smoke run)")
    if device_name == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # init_distributed picks CUDA whenever it sees one
    return init_distributed()


def emit(rows_out: list, row: dict, as_json: bool, text: str | None = None) -> None:
    rows_out.append(row)
    if as_json:
        print(json.dumps(row), flush=True)
    if text:
        print(text, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    from train.distributed import shutdown
    dist_info = prepare(args.device)
    spec = bench_spec(args)
    rows = []
    for variant in args.variants:
        r = measure_safely(variant, spec, dist_info, args.warmup_steps, args.steps)
        emit(rows, r, args.json, format_row(r))
    ratio = ratio_row(rows)
    if ratio:
        emit(rows, ratio, args.json, f"trainer / seed tokens/s: {ratio['trainer_over_seed_tokens_per_s']:.2f}x")
    shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
