"""Every benchmark in benchmarks/, run in a smoke mode so none can rot unseen: the GPU ones on the CPU
with the tiny preset, the status ones on small stores and two SSH boxes, the tokenizer on 0.3 MB.

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

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_bench(script: str, *args: str, tmp_path: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


DEMO_SPEC = ["--device", "cpu", "--matrix", "demo", "--phase", "demo", "--config", "geo_500k"]


def test_bench_train_trainer_and_seed_train_the_same_model(tmp_path):
    common = [*DEMO_SPEC, "--seq-len", "64", "--micro-batch", "2", "--grad-accum", "2",
              "--warmup-steps", "1", "--steps", "2", "--json"]
    rows = run_bench("bench_train_gpu.py", *common, tmp_path=tmp_path)
    # The trainer's compile and activation-checkpointing path under FSDP2, as a spec can ask for it.
    rows += run_bench("bench_train_gpu.py", *common, "--variants", "trainer", "--compile", "on",
                      "--activation-checkpointing", "on", tmp_path=tmp_path)
    ratio = rows.pop(2)
    assert [r["variant"] for r in rows] == ["trainer", "seed", "trainer"]
    assert ratio["trainer_over_seed_tokens_per_s"] == pytest.approx(rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"])
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 and r["grad_accum"] == 2
        assert r["mfu"] is None and r["peak_mem_gib"] is None  # no peak or CUDA memory on a CPU
        assert math.isfinite(r["loss"])
    assert rows[2]["compile"] is True and rows[2]["activation_checkpointing"] is True
    assert rows[2]["loss_impl"] == "chunked_compiled" and rows[0]["attention_backend"].startswith("sdpa:")
    losses = [r["loss"] for r in rows]
    # Same seed, tokens and steps: seed (bf16 autocast) and trainer (fp32 on CPU) agree to bf16 precision.
    assert max(losses) - min(losses) < 0.02, losses


def test_bench_model_reports_the_trainers_long_eval(tmp_path):
    (evaluation,) = run_bench("bench_model_gpu.py", *DEMO_SPEC, "--eval-len", "256", "--eval-chunks", "1", "--json",
                              tmp_path=tmp_path)
    assert evaluation["measure"] == "eval" and evaluation["eval_len"] == 256 and evaluation["preset"] == "tiny"
    assert math.isfinite(evaluation["loss"]) and evaluation["time_s"] > 0
    assert evaluation["attention_backend"].startswith("sdpa:") and evaluation["peak_mem_gib"] is None


def test_bench_1p5b_smoke_runs_every_part(tmp_path):
    """The one GPU script of the 1.5B check (issue #15), on the CPU with tiny presets."""
    *_, out = run_bench("bench_1p5b_gpu.py", "--smoke", "--json", "--cache-dir", str(tmp_path / "cache"),
                        tmp_path=tmp_path)
    assert out["skipped"] == [] and set(out["parts"]) == {"train_plan", "train_alt_micro_batch", "eval", "passkey"}
    trainer, seed = out["parts"]["train_plan"]["rows"]
    assert (trainer["variant"], seed["variant"]) == ("trainer", "seed") and trainer["seq_len"] == 64
    assert out["parts"]["train_plan"]["ratio"]["trainer_over_seed_tokens_per_s"] > 0
    (alt,) = out["parts"]["train_alt_micro_batch"]["rows"]
    assert (alt["micro_batch"], alt["grad_accum"], alt["activation_checkpointing"]) == (4, 1, False)
    assert out["parts"]["eval"]["eval_len"] == 256
    assert out["parts"]["passkey"][0]["length"] == 256 and out["parts"]["passkey"][0]["skipped"] == {}


def test_bench_passkey_fills_its_grid(tmp_path):
    out = tmp_path / "passkey.json"
    rows = run_bench("bench_passkey_gpu.py", "--preset", "tiny", "--lengths", "256", "--depths", "0.5",
                     "--trials", "1", "--dtype", "fp32", "--cache-dir", str(tmp_path / "cache"),
                     "--out", str(out), tmp_path=tmp_path)
    assert [r["length"] for r in rows] == [256]
    assert rows[0]["skipped"] == {} and rows[0]["ll_acc"] is not None
    assert json.loads(out.read_text()) == rows


def run_script(script: str, *args: str, tmp_path: Path, timeout: float = 600) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_bench_status_store_measures_real_cli_processes(tmp_path):
    out = run_script("bench_status_store.py", "--sizes", "300", "--live", "2", "--repeat", "1", tmp_path=tmp_path)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith('{"runs"')]
    assert [r["runs"] for r in rows] == [102, 302]
    assert all(r["default_cpu_s"] > 0 and r["json_cpu_s"] > 0 for r in rows)
    assert rows[0]["default_vs_100"] == 1.0 and rows[1]["default_vs_100"] > 0
    assert "opskit --help:" in out and "goal status of 100 runs < 0.3 CPU-s:" in out


@pytest.mark.slow
def test_bench_status_ssh_reports_warm_cross_process_status(tmp_path):
    out = run_script("bench_status_ssh.py", "--targets", "2", "--runs", "2", "--repeat", "1", tmp_path=tmp_path)
    figures = json.loads(out[:out.index("\n}") + 2])
    assert figures["targets"] == 2 and figures["refresh_all_warm_s"] > 0
    assert figures["cli_status_all_cold_s"] > 0 and figures["cli_status_all_warm_s"] > 0
    assert "`opskit status` as a new process over 2 targets" in out


def test_bench_tokenize_builds_the_same_tokens(tmp_path):
    out = run_script("bench_tokenize.py", "--mb", "0.3", "--rounds", "1", "--dir", str(tmp_path / "work"),
                     tmp_path=tmp_path)
    assert "identical tokens: True" in out and "speed-up:" in out


def test_every_benchmark_has_a_smoke_run_here():
    here = Path(__file__).read_text()
    missing = [p.name for p in sorted((ROOT / "benchmarks").glob("*.py")) if f'"{p.name}"' not in here]
    assert not missing, f"benchmarks without a smoke run in tests/test_benchmarks.py: {missing}"
