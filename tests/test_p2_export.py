"""HF export of a trained run: the Llama checkpoint's logits equal ours, for geometric and other spectra.

`make_trained_run` (also used by the other test_p2_* files) trains the tiny preset a few real steps
in a child process, FSDP2-wrapped in a one-rank gloo group as the trainer does, and saves a DCP
checkpoint with train.checkpoint.save.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from train.export_hf import (ExportError, export_run, hf_name, hf_rope_parameters, load_exported,  # noqa: E402
                             load_run_model)

REPO = Path(__file__).resolve().parent.parent
TRAIN_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from train import checkpoint
    from train.distributed import init_distributed, parallelize, shutdown
    from train.export_hf import model_plan
    from train.model import GPT

    spec = json.load(open(sys.argv[1]))
    steps = int(sys.argv[2])
    init_distributed()
    torch.manual_seed(spec["seed"])
    cfg, inv, factor = model_plan(spec)
    model = GPT(cfg, inv, factor)
    parallelize(model, torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # A repeating pattern the tiny model picks up in a few steps, so the weights are not the init.
    pattern = torch.arange(40) % 17 + 5
    x = pattern.repeat(4, 2)[:, :spec["seq_len"] + 1]
    for step in range(steps):
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    checkpoint.save(spec["out_dir"] + "/ckpt", steps, model, opt, {"tokens": steps * x.numel()}, keep=2)
    print("loss", float(loss))
    shutdown()
""")


def run_spec(out_dir: Path, cache_dir: Path, spectrum: str, scaling=None, phase="p1", seed=42) -> dict:
    """A spec.json as opskit writes it (docs/run-directory.md), for the tiny preset."""
    config = spectrum if scaling is None else f"{spectrum}_{scaling['type']}"
    return {
        "run": f"{phase}/{config}/s{seed}", "phase": phase, "config": config, "seed": seed, "attempt": 1,
        "preset": "tiny", "rope": {"spectrum": spectrum, "scaling": scaling}, "tokenizer": "opskit-demo-bpe",
        "data": {"train": [{"dataset": "demo-stories", "weight": 1.0}],
                 "validation": {"dataset": "demo-stories", "split": "validation", "max_tokens": 20000}},
        "train_tokens": 4096, "seq_len": 32, "micro_batch": 4, "grad_accum": 1, "lr": 0.003,
        "warmup_frac": 0.02, "weight_decay": 0.1, "grad_clip": 1.0, "dtype": "fp32", "compile": False,
        "activation_checkpointing": False, "eval": {"lengths": [32, 64], "chunks": 2, "mode": "sequential"},
        "checkpoint_every": 50, "keep_checkpoints": 2, "log_every": 10,
        "cache_dir": str(cache_dir), "out_dir": str(out_dir),
    }


def make_trained_run(workdir: Path, cache_dir: Path, spectrum: str, scaling=None, steps: int = 6,
                     seed: int = 42) -> Path:
    spec = run_spec(Path("."), cache_dir, spectrum, scaling, seed=seed)
    run_dir = workdir / "runs" / spec["run"]
    run_dir.mkdir(parents=True)
    spec["out_dir"] = str(run_dir)
    (run_dir / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", TRAIN_CHILD, str(run_dir / "spec.json"), str(steps)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def p2_cache(tmp_path_factory) -> Path:
    """One cache dir (demo corpus + demo BPE, ~15 s to build) for every p2 test."""
    from train.data.tokenizer import DEMO_BPE, load_tokenizer

    cache = tmp_path_factory.mktemp("p2cache")
    load_tokenizer(DEMO_BPE, cache)
    return cache


def test_weight_names_map_one_to_one():
    from train.model import GPT
    from train.presets import get_preset

    cfg = get_preset("tiny")
    ours = GPT(cfg, [1.0] * (cfg.head_dim // 2)).state_dict()
    names = {hf_name(k) for k in ours}
    assert len(names) == len(ours)
    assert "model.layers.1.self_attn.o_proj.weight" in names and "model.embed_tokens.weight" in names
    with pytest.raises(ExportError, match="no Llama counterpart"):
        hf_name("blocks.0.attn.rotary.weight")


def test_rope_parameters_geometric_vs_explicit():
    from train.spectra import rope_parameters

    geo = hf_rope_parameters("geo_500k", None, [], 1.0, 64, 4096)
    assert geo == {"rope_type": "default", "rope_theta": 500000.0}
    inv, af = rope_parameters("hybrid_a0.2_t100k", 64)
    explicit = hf_rope_parameters("hybrid_a0.2_t100k", None, inv, af, 64, 4096)
    assert explicit["rope_type"] == "longrope" and explicit["short_factor"] == explicit["long_factor"]
    rebuilt = [1 / (f * explicit["rope_theta"] ** (2 * k / 64)) for k, f in enumerate(explicit["short_factor"])]
    assert rebuilt == pytest.approx(inv, rel=1e-12)


@pytest.mark.parametrize("spectrum,scaling", [
    ("geo_10k", None),
    ("hybrid_a0.2_t100k", None),
    ("anchpoly_p3.9_omf0.3_t500k", {"type": "yarn", "factor": 4.0, "original_max": 32}),
])
def test_export_round_trip_logits_equal(tmp_path, p2_cache, spectrum, scaling):
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    run_dir = make_trained_run(tmp_path, p2_cache, spectrum, scaling)
    hf_dir = export_run(run_dir, tmp_path / "hf")
    assert (hf_dir / "model.safetensors").exists() and (hf_dir / "tokenizer.json").exists()
    ours = load_run_model(run_dir).model
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(tokens)
        exact = load_exported(hf_dir)(tokens).logits
        plain = LlamaForCausalLM.from_pretrained(str(hf_dir)).eval()(tokens).logits  # trust_remote_code=False
    assert want.abs().max() > 0.1  # trained weights, not zeros
    torch.testing.assert_close(exact, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(plain, want, atol=1e-4, rtol=1e-4)
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == ("default" if spectrum.startswith("geo") else "longrope")


def test_export_without_checkpoint_is_a_clear_error(tmp_path, p2_cache):
    run_dir = tmp_path / "runs" / "p1" / "geo_10k" / "s1"
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").write_text(json.dumps(run_spec(run_dir, p2_cache, "geo_10k")))
    with pytest.raises(ExportError, match="no complete checkpoint"):
        export_run(run_dir, tmp_path / "hf")
    out = subprocess.run([sys.executable, "-m", "train.export_hf", "--run-dir", str(run_dir), "--out",
                          str(tmp_path / "hf")], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 1 and out.stderr.startswith("error: ") and "Traceback" not in out.stderr


def test_opskit_export_cli_on_a_local_run(tmp_path, p2_cache):
    """`opskit export RUN --hf DIR` finds the run's directory through the store and exports it."""
    from opskit.store import Store

    run_dir = make_trained_run(tmp_path, p2_cache, "geo_10k")
    spec = json.loads((run_dir / "spec.json").read_text())
    state = tmp_path / "state.db"
    with Store(state) as store:
        store.upsert_run({"name": spec["run"], "matrix": "test", "phase": "p1", "config": spec["config"],
                          "seed": spec["seed"], "target": "local", "state": "done", "run_dir": str(run_dir),
                          "spec": json.dumps(spec)}, reason="test fixture")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "opskit.cli", "--state", str(state), "export"]
    out = subprocess.run(cli + [spec["run"], "--hf", str(tmp_path / "hf")], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rope_type default" in out.stdout and (tmp_path / "hf" / "model.safetensors").exists()
    missing = subprocess.run(cli + ["p1/nope/s1", "--hf", str(tmp_path / "x")], capture_output=True, text=True,
                             env=env, cwd=tmp_path)
    assert missing.returncode != 0 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr
