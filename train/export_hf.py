"""Export a trained run as a Hugging Face Llama checkpoint: `python -m train.export_hf --run-dir D --out DIR`.

Our GPT is LLaMA-shaped (tied head, RMSNorm, bias-free attention, SwiGLU, rotate-half RoPE), so the
weights map 1:1 onto `LlamaForCausalLM`. The RoPE spectrum travels in config.json so that a plain
`from_pretrained` (trust_remote_code=False) rebuilds it:
- geometric spectrum, no scaling: rope_type "default" with the run's rope_theta;
- anything else: rope_type "longrope" with short_factor == long_factor chosen so that
  1 / (factor_k * base^(2k/d)) == our inv_freq_k, plus our attention_factor (HF then never switches sets).
transformers computes that product in fp32, a last-bit difference; `opskit_rope.json` also holds our exact
fp32 inv_freq, and `load_exported` copies it into the rotary buffers. See docs/p2.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from train.contract import CKPT_DIR, SPEC, atomic_write_json, read_json

ROPE_FILE = "opskit_rope.json"
LONGROPE_BASE = 10000.0  # any base works; the factors absorb it


class ExportError(Exception):
    """A run that cannot be exported (no spec, no complete checkpoint, bad settings); one-line message."""


# ---------------------------------------------------------------- pure planning

def rope_settings(spec: dict) -> tuple[str, dict | None]:
    rope = spec.get("rope") or {}
    if "spectrum" not in rope:
        raise ExportError("spec.json has no rope.spectrum")
    return rope["spectrum"], rope.get("scaling")


def model_plan(spec: dict):
    """(ModelConfig, inv_freq, attention_factor) of a run's spec, as the trainer builds them."""
    from train import presets, spectra

    spectrum, scaling = rope_settings(spec)
    try:
        cfg = presets.get_preset(spec["preset"])
        inv, factor = spectra.rope_parameters(spectrum, cfg.head_dim, spectra.parse_scaling(scaling),
                                              length=spec.get("seq_len"))
    except (KeyError, ValueError) as e:
        raise ExportError(f"spec.json of {spec.get('run', '?')}: {e.args[0] if e.args else e}") from None
    return cfg, inv, factor


def hf_rope_parameters(spectrum: str, scaling: dict | None, inv_freq: list[float], attention_factor: float,
                       head_dim: int, max_positions: int) -> dict:
    """config.json's rope_parameters that reproduce `inv_freq` in transformers' Llama (see module doc)."""
    from train.spectra import parse_theta

    if spectrum.startswith("geo_") and scaling is None:
        return {"rope_type": "default", "rope_theta": parse_theta(spectrum[len("geo_"):])}
    factors = [1.0 / (w * LONGROPE_BASE ** (2 * k / head_dim)) for k, w in enumerate(inv_freq)]
    return {"rope_type": "longrope", "rope_theta": LONGROPE_BASE, "short_factor": factors, "long_factor": factors,
            "factor": 1.0, "attention_factor": float(attention_factor),
            "original_max_position_embeddings": int(max_positions)}


def hf_config(cfg, rope_parameters: dict, max_positions: int, eos_id: int | None) -> dict:
    """LlamaConfig fields for a train.presets.ModelConfig."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden, "intermediate_size": cfg.intermediate,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": int(max_positions), "rope_parameters": rope_parameters,
        "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": eos_id,
    }


_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q.weight": "self_attn.q_proj.weight",
    "attn.k.weight": "self_attn.k_proj.weight",
    "attn.v.weight": "self_attn.v_proj.weight",
    "attn.o.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}


def hf_name(name: str) -> str:
    """Our parameter name -> LlamaForCausalLM's (embed.weight -> model.embed_tokens.weight, ...)."""
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    raise ExportError(f"parameter {name!r} has no Llama counterpart")


def max_positions_of(spec: dict) -> int:
    """The longest length the run is evaluated at (its training length at least)."""
    lengths = list((spec.get("eval") or {}).get("lengths") or [])
    lengths += list(((spec.get("downstream") or {}).get("passkey") or {}).get("lengths") or [])
    return int(max([spec.get("seq_len") or 0] + lengths) or 2048)


# ---------------------------------------------------------------- our checkpoints

@dataclass
class LoadedRun:
    model: object  # train.model.GPT, eval mode
    spec: dict
    step: int
    checkpoint: Path


def read_spec(run_dir: str | os.PathLike) -> dict:
    spec = read_json(Path(run_dir) / SPEC)
    if spec is None:
        raise ExportError(f"{run_dir} has no {SPEC}: not a run directory")
    return spec


def find_checkpoint(run_dir: str | os.PathLike, step: int | None = None) -> Path:
    """The newest complete checkpoint of a run (or the one of `step`)."""
    from train.checkpoint import complete_steps, step_dir

    ckpt_dir = Path(run_dir) / CKPT_DIR
    steps = complete_steps(ckpt_dir)
    if not steps:
        raise ExportError(f"{ckpt_dir} holds no complete checkpoint (has the run trained?)")
    if step is None:
        return step_dir(ckpt_dir, steps[-1])
    if step not in steps:
        raise ExportError(f"no complete checkpoint at step {step} in {ckpt_dir}; have {steps}")
    return step_dir(ckpt_dir, step)


def load_run_model(run_dir: str | os.PathLike, step: int | None = None, device="cpu") -> LoadedRun:
    """Our GPT with the weights of a run's checkpoint (DCP, any world size), fp32, in eval mode."""
    import torch.distributed.checkpoint as dcp

    from train.model import GPT

    spec = read_spec(run_dir)
    cfg, inv, factor = model_plan(spec)
    path = find_checkpoint(run_dir, step)
    model = GPT(cfg, inv, factor)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming single process": that is the intent here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(path), no_dist=True)  # reshards whatever world size saved it
    model.load_state_dict(state["model"])
    meta = read_json(path / "meta.json") or {}
    return LoadedRun(model.to(device).eval(), spec, int(meta.get("step", path.name.split("_")[-1])), path)


# ---------------------------------------------------------------- export and load

def save_tokenizer(name: str, cache_dir: str, out_dir: Path) -> int:
    """Write the run's tokenizer in HF format into out_dir; returns its EOS id."""
    from transformers import PreTrainedTokenizerFast

    from train.data.tokenizer import load_tokenizer

    tok = load_tokenizer(name, cache_dir)
    eos = tok.backend.id_to_token(tok.eos_id)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token=eos, pad_token=eos)
    hf.save_pretrained(str(out_dir))
    return tok.eos_id


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, step: int | None = None,
               dtype: str = "fp32") -> Path:
    """Write a run's checkpoint as a Llama checkpoint + tokenizer into out_dir; returns out_dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if dtype not in ("fp32", "bf16"):
        raise ExportError(f"dtype must be fp32 or bf16, got {dtype!r}")
    out_dir = Path(out_dir)
    loaded = load_run_model(run_dir, step)  # first: a run without a checkpoint leaves no empty out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    spec, model = loaded.spec, loaded.model
    spectrum, scaling = rope_settings(spec)
    eos_id = save_tokenizer(spec["tokenizer"], spec["cache_dir"], out_dir)
    max_pos = max_positions_of(spec)
    rope = hf_rope_parameters(spectrum, scaling, model._inv_freq_values, model.attention_factor,
                              model.cfg.head_dim, max_pos)
    config = LlamaConfig(**hf_config(model.cfg, rope, max_pos, eos_id))
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    weights = {hf_name(k): v.to(torch_dtype) for k, v in model.state_dict().items()}
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    hf.load_state_dict(weights, strict=True, assign=True)
    hf.tie_weights()
    hf.config.dtype = torch_dtype
    hf.save_pretrained(str(out_dir))
    atomic_write_json(out_dir / ROPE_FILE, {
        "spectrum": spectrum, "scaling": scaling, "inv_freq": model._inv_freq_values,
        "attention_factor": model.attention_factor, "run": spec.get("run"), "step": loaded.step,
    })
    return out_dir


def load_exported(hf_dir: str | os.PathLike, device="cpu", dtype=None):
    """LlamaForCausalLM from an export, with our exact fp32 inv_freq in its rotary buffers (eval mode).

    Plain `from_pretrained` alone rebuilds the spectrum up to fp32 rounding of transformers' own formula.
    """
    import torch
    from transformers import LlamaForCausalLM

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").exists():
        raise ExportError(f"{hf_dir} is not an exported model (no config.json); run `opskit export RUN --hf DIR`")
    model = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=dtype or torch.float32)
    rope = read_json(hf_dir / ROPE_FILE)
    if rope is not None:
        rotary = model.model.rotary_emb
        exact = torch.tensor(rope["inv_freq"], dtype=torch.float32)
        rotary.inv_freq = exact.clone()
        rotary.original_inv_freq = exact.clone()
        if getattr(rotary, "long_inv_freq", None) is not None or rotary.rope_type == "longrope":
            rotary.long_inv_freq = exact.clone()
        rotary.attention_scaling = float(rope["attention_factor"])
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export_hf", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="the run's directory (holds spec.json and ckpt/)")
    parser.add_argument("--out", required=True, help="directory to write the Hugging Face checkpoint into")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="weight dtype on disk")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.out, args.step, args.dtype)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rope = json.loads((out / "config.json").read_text())["rope_parameters"]["rope_type"]
    print(f"exported {args.run_dir} -> {out} (rope_type {rope})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
