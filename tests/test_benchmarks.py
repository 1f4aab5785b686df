"""The GPU benchmarks' code paths, run on the CPU with the tiny preset so they cannot rot unseen.

The figures they print on a CPU mean nothing; what is checked is that every variant trains the same
model on the same tokens (equal losses), and that each script finishes and reports what it measures.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_bench(script: str, *args: str, tmp_path: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_bench_train_variants_train_the_same_model(tmp_path):
    common = ["--device", "cpu", "--presets", "tiny", "--seq-len", "64", "--micro-batch", "2",
              "--warmup-steps", "1", "--steps", "2", "--json"]
    rows = run_bench("bench_train_gpu.py", *common, "--variants", "legacy", "fsdp2", tmp_path=tmp_path)
    # The trainer's compile and activation-checkpointing path under FSDP2, as a spec can ask for it.
    rows += run_bench("bench_train_gpu.py", *common, "--variants", "fsdp2-compile", "--activation-checkpointing",
                      tmp_path=tmp_path)
    assert [r["variant"] for r in rows] == ["legacy", "fsdp2", "fsdp2-compile"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["ms_per_step"] > 0
        assert r["mfu"] is None and r["peak_mem_gib"] is None  # no peak or CUDA memory on a CPU
        assert math.isfinite(r["loss"])
    losses = [r["loss"] for r in rows]
    # Same seed, tokens and steps: legacy (bf16 autocast) and fsdp2 (fp32 on CPU) agree to bf16 precision.
    assert max(losses) - min(losses) < 0.02, losses


def test_bench_model_reports_train_and_long_eval(tmp_path):
    rows = run_bench("bench_model_gpu.py", "--device", "cpu", "--preset", "tiny", "--dtype", "fp32",
                     "--batch", "2", "--seq-len", "64", "--steps", "2", "--warmup", "1",
                     "--eval-len", "256", "--eval-chunks", "1", "--json", tmp_path=tmp_path)
    train, evaluation = rows
    assert train["measure"] == "train" and train["tokens_per_s"] > 0 and train["mfu"] is None
    assert evaluation["measure"] == "eval" and evaluation["eval_len"] == 256
    assert math.isfinite(evaluation["loss"]) and evaluation["time_s"] > 0


def test_bench_passkey_fills_its_grid(tmp_path):
    out = tmp_path / "passkey.json"
    rows = run_bench("bench_passkey_gpu.py", "--preset", "tiny", "--lengths", "256", "--depths", "0.5",
                     "--trials", "1", "--dtype", "fp32", "--cache-dir", str(tmp_path / "cache"),
                     "--out", str(out), tmp_path=tmp_path)
    assert [r["length"] for r in rows] == [256]
    assert rows[0]["skipped"] == {} and rows[0]["ll_acc"] is not None
    assert json.loads(out.read_text()) == rows
