"""A p2 (downstream) job: `python -m train.p2 --spec spec.json`.

Evaluates one trained run (the source, e.g. p1/<config>/s<seed>): export it as a HF Llama checkpoint
into <out_dir>/hf, run the lm-eval task list -> downstream.json, passkey retrieval -> passkey.json, and
optionally long-context suites from local paths (into downstream.json's "long_context"). status.json and
exit codes follow docs/run-directory.md (state "evaluating" throughout, "done" at the end).

spec.json is a run spec (run, phase, config, seed, attempt, preset, rope, tokenizer, cache_dir, out_dir,
dtype, eval.lengths) plus a "downstream" object, every key optional (docs/p2.md):
  {"source_run_dir": ABS | "source_run": "p1/geo_500k/s42" | "after": "p1",
   "tasks": [...], "limit": null, "batch_size": 8, "num_fewshot": null,
   "passkey": {"lengths": [...], "depths": [...], "trials": 5, "candidates": 5} | null,
   "suites": [{"suite": "longbench", "path": "/data/LongBench", "limit": null}]}
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from train import contract as C
from train.contract import (DOWNSTREAM, EXIT_BAD_SPEC, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, PASSKEY,
                            atomic_write_json, read_json)
from train.spec import SpecError

HF_SUBDIR = "hf"
REQUIRED = ("run", "phase", "config", "seed", "attempt", "preset", "rope", "tokenizer", "cache_dir", "out_dir")


@dataclass(frozen=True)
class P2Spec:
    raw: dict
    run: str
    attempt: int
    out_dir: Path
    source_dir: Path
    tasks: list
    limit: int | None
    batch_size: int
    num_fewshot: int | None
    passkey: dict | None  # {"lengths", "depths", "trials", "candidates"}
    suites: list = field(default_factory=list)
    dtype: str = "auto"


def source_dir_of(spec: dict, ds: dict) -> Path:
    """The evaluated run's directory: explicit, by run name, or the same config/seed of phase `after`."""
    if ds.get("source_run_dir"):
        return Path(ds["source_run_dir"])
    try:
        workdir = C.workdir_of(spec["out_dir"], spec["run"])
    except ValueError as e:
        raise SpecError(f"spec field 'out_dir': {e}") from None
    if ds.get("source_run"):
        return C.run_dir(workdir, ds["source_run"])
    if ds.get("after"):
        return C.run_dir(workdir, C.run_name(ds["after"], spec["config"], spec["seed"]))
    raise SpecError("spec field 'downstream' must name the evaluated run: source_run_dir, source_run or after")


def parse_spec(spec: dict) -> P2Spec:
    from train.downstream import DEFAULT_TASKS
    from train.passkey import DEFAULT_DEPTHS

    for key in REQUIRED:
        if key not in spec:
            raise SpecError(f"spec field '{key}' is missing")
    ds = spec.get("downstream")
    if not isinstance(ds, dict):
        raise SpecError("spec field 'downstream' is missing or not an object")
    tasks = ds.get("tasks", list(DEFAULT_TASKS))
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise SpecError(f"spec field 'downstream.tasks' must be a list of task names, got {tasks!r}")
    passkey = ds.get("passkey", {})
    if passkey is not None:
        if not isinstance(passkey, dict):
            raise SpecError("spec field 'downstream.passkey' must be an object or null")
        lengths = passkey.get("lengths") or (spec.get("eval") or {}).get("lengths")
        if not lengths or not all(isinstance(n, int) and n > 0 for n in lengths):
            raise SpecError(f"spec field 'downstream.passkey.lengths' must be positive ints, got {lengths!r}")
        passkey = {"lengths": lengths, "depths": passkey.get("depths", list(DEFAULT_DEPTHS)),
                   "trials": int(passkey.get("trials", 5)), "candidates": int(passkey.get("candidates", 5))}
    suites = ds.get("suites") or []
    for i, s in enumerate(suites):
        if not isinstance(s, dict) or "suite" not in s or "path" not in s:
            raise SpecError(f"spec field 'downstream.suites[{i}]' needs suite and path")
    return P2Spec(raw=spec, run=spec["run"], attempt=int(spec["attempt"]), out_dir=Path(spec["out_dir"]),
                  source_dir=source_dir_of(spec, ds), tasks=tasks, limit=ds.get("limit"),
                  batch_size=int(ds.get("batch_size", 8)), num_fewshot=ds.get("num_fewshot"),
                  passkey=passkey, suites=suites, dtype=spec.get("dtype", "auto"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def export_once(p: P2Spec, heartbeat) -> Path:
    """<out_dir>/hf, exported from the source's newest checkpoint unless already exported from it."""
    from train.export_hf import ROPE_FILE, export_run, find_checkpoint

    hf_dir = p.out_dir / HF_SUBDIR
    newest = find_checkpoint(p.source_dir)
    done = read_json(hf_dir / ROPE_FILE) or {}
    if done.get("step") is not None and newest.name == C.ckpt_step_name(done['step']):
        log(f"export: {hf_dir} already holds {newest.name}")
        return hf_dir
    heartbeat.update(message=f"exporting {p.source_dir.name} {newest.name} to HF")
    log(f"export: {p.source_dir} {newest.name} -> {hf_dir}")
    return export_run(p.source_dir, hf_dir)


def run(p: P2Spec, heartbeat) -> int:
    import torch

    from train.downstream import evaluate_tasks
    from train.export_hf import load_run_model
    from train.longbench import HFRunner, evaluate_suite
    from train.passkey import ModelRunner, evaluate_passkey, peak_memory

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = p.dtype == "bf16" or (p.dtype == "auto" and device.type == "cuda")
    dtype = torch.bfloat16 if bf16 else torch.float32
    heartbeat.update(state=C.HB_EVALUATING, message=f"evaluating {p.source_dir}")
    hf_dir = export_once(p, heartbeat)
    record = {"source_run_dir": str(p.source_dir), "run": p.run, "tasks": {}}
    if p.tasks:
        heartbeat.update(message=f"lm-eval: {', '.join(p.tasks)}")
        log(f"lm-eval: {p.tasks} (limit {p.limit})")
        record.update(evaluate_tasks(hf_dir, p.tasks, p.batch_size, p.limit, str(device), dtype, p.num_fewshot))
        atomic_write_json(p.out_dir / DOWNSTREAM, record)
        log(f"lm-eval: {record['tasks']}")

    from train.data.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(p.raw["tokenizer"], p.raw["cache_dir"])
    if p.passkey:
        loaded = load_run_model(p.source_dir, device=device)
        model = loaded.model.to(dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = evaluate_passkey(
            ModelRunner(model, device), tokenizer, p.passkey["lengths"], p.passkey["depths"],
            p.passkey["trials"], p.passkey["candidates"], seed=int(p.raw["seed"]),
            on_cell=lambda n, d: heartbeat.update(message=f"passkey length {n} depth {d:g}"))
        result.update(run=p.run, source_step=loaded.step, device=str(device), dtype=str(dtype).split(".")[-1],
                      **peak_memory(device))
        atomic_write_json(p.out_dir / PASSKEY, result)
        log(f"passkey by length: {result['by_length']}")
        del model, loaded

    if p.suites:
        from train.export_hf import load_exported
        hf_model = load_exported(hf_dir, device=device, dtype=dtype)
        runner = HFRunner(hf_model, device)
        record["long_context"] = {}
        for s in p.suites:
            heartbeat.update(message=f"{s['suite']} from {s['path']}")
            record["long_context"][s["suite"]] = evaluate_suite(
                s["suite"], runner, tokenizer, s["path"], hf_model.config.max_position_embeddings, s.get("limit"))
        atomic_write_json(p.out_dir / DOWNSTREAM, record)
    elif not p.tasks:
        atomic_write_json(p.out_dir / DOWNSTREAM, record)  # the run's marker of a finished p2 job
    heartbeat.update(state=C.HB_DONE, message="done")
    log("phase done")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.p2", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="path of the p2 run's spec.json")
    args = parser.parse_args(argv)
    from train.run import Interrupted, StopSignals

    signals = StopSignals().install()
    try:
        raw = read_json(args.spec)
        if raw is None:
            raise SpecError(f"{args.spec} does not exist")
        p = parse_spec(raw)
    except SpecError as e:
        print(f"error: invalid spec: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_SPEC

    from train.downstream import DownstreamError
    from train.export_hf import ExportError
    from train.heartbeat import Heartbeat
    from train.longbench import LongBenchError
    from train.passkey import PasskeyError

    p.out_dir.mkdir(parents=True, exist_ok=True)
    heartbeat = Heartbeat(p.out_dir, p.attempt).start()
    log(f"==== attempt {p.attempt} of {p.run}: pid {os.getpid()}, evaluating {p.source_dir} ====")
    try:
        code = run(p, heartbeat)
    except (DownstreamError, ExportError, PasskeyError, LongBenchError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        heartbeat.update(state=C.HB_FAILED, message=str(e).splitlines()[0])
        code = EXIT_FAILED
    except Interrupted as e:
        heartbeat.update(state=C.HB_INTERRUPTED, message=f"{e.args[0]}: p2 restarts its evaluation on resume")
        code = EXIT_INTERRUPTED
    except Exception as e:
        summary = f"{type(e).__name__}: {e}".splitlines()[0]
        print(f"error: p2 failed: {summary}", file=sys.stderr, flush=True)
        traceback.print_exc()
        heartbeat.update(state=C.HB_FAILED, message=summary)
        code = EXIT_FAILED
    finally:
        heartbeat.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
