"""Model presets by name, their parameter counts and FLOPs per token.

Pure Python (no torch): `opskit models` lists these. The names are the studies' labels; the true
counts (tied embeddings, SwiGLU MLP) are what `param_count` computes.
"""
from __future__ import annotations

from dataclasses import dataclass

VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 128


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    head_dim: int
    intermediate: int
    norm_eps: float = 1e-6


class PresetError(ValueError):
    """An unknown preset name."""


def _preset(name, hidden, n_layers, n_heads, head_dim, intermediate, vocab_size=VOCAB) -> ModelConfig:
    return ModelConfig(name, vocab_size, hidden, n_layers, n_heads, head_dim, intermediate)


PRESETS: dict[str, ModelConfig] = {
    cfg.name: cfg
    for cfg in (
        _preset("tiny", 64, 2, 4, 16, 192, vocab_size=4096),  # CPU tests; the demo BPE's vocab
        _preset("20M", 256, 6, 4, 64, 1024),
        _preset("50M", 512, 6, 8, 64, 2048),
        _preset("100M", 768, 12, 12, 64, 3072),
        _preset("200M", 1024, 12, 16, 64, 4096),
        _preset("350M", 1024, 24, 16, 64, 4096),
        _preset("500M", 1280, 24, 10, 128, 3584),
        _preset("1B", 2048, 18, 16, 128, 5632),
        _preset("1.5B", 2048, 24, 16, 128, 5632),
    )
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise PresetError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}") from None


def param_count(cfg: ModelConfig) -> int:
    """Parameters of `train.model.GPT(cfg)`: tied embedding, per layer attention + SwiGLU + 2 norms, final norm."""
    attn_width = cfg.n_heads * cfg.head_dim
    attention = 4 * cfg.hidden * attn_width  # q, k, v, o; no biases
    mlp = 3 * cfg.hidden * cfg.intermediate  # gate, up, down
    norms = 2 * cfg.hidden
    return cfg.vocab_size * cfg.hidden + cfg.n_layers * (attention + mlp + norms) + cfg.hidden


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), nanoGPT/PaLM style: 6N + 12 L H Q T.

    N counts the tied embedding once (its output-head matmul is real compute); the attention
    term is not halved for causality, as in nanoGPT's estimate_mfu.
    """
    return 6.0 * param_count(cfg) + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def list_presets() -> list[dict]:
    return [
        {
            "name": cfg.name,
            "hidden": cfg.hidden,
            "layers": cfg.n_layers,
            "heads": cfg.n_heads,
            "head_dim": cfg.head_dim,
            "intermediate": cfg.intermediate,
            "vocab": cfg.vocab_size,
            "params": param_count(cfg),
        }
        for cfg in PRESETS.values()
    ]
