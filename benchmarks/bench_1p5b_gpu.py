"""The 1.5B plan's GPU check in one run (about 6 minutes on one H100/H200): every figure issue #15 asks for.

  1. train, the 1.5B spec as `opskit launch p0` writes it (seq 2048, its micro-batch, grad_accum,
     activation checkpointing, compile auto): the trainer's own step (bench_train_gpu.py "trainer")
     and the seed-style loop at the same batch; tokens/s, MFU (train/mfu.py: 989 TFLOP/s bf16 dense
     on H100/H200), peak memory, and trainer / seed as a ratio; MFU against the 55 % goal
  2. train, the trainer at micro-batch 8 x 2048 without activation checkpointing (grad_accum halved,
     same tokens per step): does it fit, is it faster (runbooks/the-1p5b-plan.md: choosing it)
  3. PPL@32768 of the 1.5B model as the trainer evaluates it: time, peak memory
  4. passkey retrieval at 16K on the 350M preset (p2's machinery, bf16): time, peak memory

Parts run in order and each is skipped once --budget-s is spent. --json prints one JSON object
with every measurement at the end.

On a GPU:
  python benchmarks/bench_1p5b_gpu.py --json
Smoke run on a CPU (tiny presets, short lengths; checks the code paths only, as CI does):
  python benchmarks/bench_1p5b_gpu.py --smoke --json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from types import SimpleNamespace

from bench_model_gpu import format_eval, measure_eval
from bench_passkey_gpu import measure_passkey
from bench_train_gpu import bench_spec, format_row, measure_safely, prepare, ratio_row

MFU_GOAL = 0.55

FULL = {
    "device": "cuda", "matrix": "1p5b", "phase": "p0", "config": "geo_500k", "preset": None, "seq_len": 2048,
    "alt_micro_batch": 8, "warmup_steps": 2, "steps": 5, "seed_warmup_steps": 1, "seed_steps": 3,
    "eval_len": 32768, "eval_chunks": 2,
    "passkey": {"preset": "350M", "spectrum": "hybrid_a0.2_t100k", "lengths": [16384], "depths": [0.1, 0.5, 0.9],
                "trials": 2, "candidates": 5, "batch_size": 5, "dtype": "bf16"},
}
SMOKE = {
    **FULL, "device": "cpu", "matrix": "demo", "phase": "demo", "preset": "tiny", "seq_len": 64,
    "micro_batch": 2, "grad_accum": 2, "alt_micro_batch": 4, "warmup_steps": 1, "steps": 1,
    "seed_warmup_steps": 1, "seed_steps": 1, "eval_len": 256, "eval_chunks": 1,
    "passkey": {**FULL["passkey"], "preset": "tiny", "lengths": [256], "depths": [0.5], "trials": 1,
                "dtype": "fp32"},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny presets: the code paths only")
    p.add_argument("--budget-s", type=float, default=420, help="skip the parts still to run after this many seconds")
    p.add_argument("--cache-dir", default=None, help="where the demo tokenizer is built (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print every measurement as one JSON object at the end")
    return p.parse_args(argv)


def spec_args(plan: dict, **overrides) -> SimpleNamespace:
    base = {"matrix": plan["matrix"], "phase": plan["phase"], "config": plan["config"], "preset": plan["preset"],
            "seq_len": plan["seq_len"], "micro_batch": plan.get("micro_batch"), "grad_accum": plan.get("grad_accum"),
            "activation_checkpointing": None, "compile": None, "dtype": None}
    return SimpleNamespace(**{**base, **overrides})


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    started = time.perf_counter()
    dist_info = prepare(plan["device"])
    from train.distributed import shutdown

    out = {"parts": {}, "skipped": []}

    def part(name: str) -> bool:
        if time.perf_counter() - started > args.budget_s:
            out["skipped"].append(name)
            print(f"-- {name}: skipped (budget of {args.budget_s:.0f}s spent)", flush=True)
            return False
        print(f"-- {name}", flush=True)
        return True

    spec = bench_spec(spec_args(plan))
    if part("train at the plan's batch: trainer vs seed"):
        rows = [measure_safely("trainer", spec, dist_info, plan["warmup_steps"], plan["steps"]),
                measure_safely("seed", spec, dist_info, plan["seed_warmup_steps"], plan["seed_steps"])]
        for r in rows:
            print(format_row(r), flush=True)
        ratio = ratio_row(rows)
        if ratio:
            print(f"trainer / seed tokens/s: {ratio['trainer_over_seed_tokens_per_s']:.2f}x", flush=True)
        trainer_mfu = rows[0].get("mfu")
        if trainer_mfu is not None:
            print(f"trainer MFU {trainer_mfu:.1%}: goal >= {MFU_GOAL:.0%} {'met' if trainer_mfu >= MFU_GOAL else 'NOT met'}",
                  flush=True)
        out["parts"]["train_plan"] = {"rows": rows, "ratio": ratio, "mfu_goal": MFU_GOAL}

    tokens_per_step = spec.micro_batch * spec.grad_accum
    alt_mb = plan["alt_micro_batch"]
    if tokens_per_step % alt_mb == 0 and part(f"train at micro-batch {alt_mb} without activation checkpointing"):
        alt = bench_spec(spec_args(plan, micro_batch=alt_mb, grad_accum=tokens_per_step // alt_mb,
                                   activation_checkpointing="off"))
        r = measure_safely("trainer", alt, dist_info, plan["warmup_steps"], plan["steps"])
        print(format_row(r), flush=True)
        out["parts"]["train_alt_micro_batch"] = {"rows": [r]}

    if part(f"PPL@{plan['eval_len']}"):
        r = measure_eval(spec, dist_info, plan["eval_len"], plan["eval_chunks"])
        print(format_eval(r), flush=True)
        out["parts"]["eval"] = r

    pk = plan["passkey"]
    if part(f"passkey at {pk['lengths']} on {pk['preset']}"):
        cache = args.cache_dir or tempfile.mkdtemp(prefix="opskit-bench-cache-")
        rows = measure_passkey(SimpleNamespace(**pk, cache_dir=cache))
        for r in rows:
            mem = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f} GiB"
            print(f"{r['preset']:>5} passkey  {r['length']} tokens: {r['time_s']:.1f} s for {r['cells']} depths x "
                  f"{r['trials']} trials ({r['time_per_trial_s']:.2f} s/trial), peak {mem}", flush=True)
        out["parts"]["passkey"] = rows

    out["total_s"] = time.perf_counter() - started
    print(f"-- done in {out['total_s']:.0f}s", flush=True)
    if args.json:
        print(json.dumps(out), flush=True)
    shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
