"""Frequency-risk surrogate of a RoPE spectrum (figure 6).

risk = share of the K = head_dim/2 rotary frequencies w_k > 0 whose wavelength 2*pi/w_k exceeds the
training length: those dimensions never complete a full turn during training, so positions past the
training length show them angles they never saw. Zero frequencies carry no position and are not
counted. Higher means more dimensions are out of distribution at long context.
"""
from __future__ import annotations

import math

from opskit.results.artifacts import RunArtifacts


def frequency_risk(spectrum: str, head_dim: int, train_len: int) -> float:
    from train.spectra import inv_freq  # pure Python

    freqs = [w for w in inv_freq(spectrum, head_dim) if w > 0]
    if not freqs:
        return 0.0
    return sum(2 * math.pi / w > train_len for w in freqs) / len(freqs)


def run_head_dim(run: RunArtifacts) -> int | None:
    """head_dim from the run's preset (spec.json/results.json), or the imported model_cfg."""
    from train.presets import PresetError, get_preset

    preset = (run.spec or {}).get("preset") or (run.results or {}).get("preset")
    if preset:
        try:
            return get_preset(preset).head_dim
        except PresetError:
            pass
    cfg = (run.results or {}).get("legacy", {}).get("model_cfg") or {}
    if cfg.get("head_dim"):
        return int(cfg["head_dim"])
    hidden = cfg.get("hidden") or cfg.get("d_model") or cfg.get("hidden_size") or cfg.get("n_embd")
    heads = cfg.get("n_heads") or cfg.get("n_head") or cfg.get("num_attention_heads")
    return int(hidden) // int(heads) if hidden and heads else None


def run_spectrum(run: RunArtifacts) -> str:
    rope = (run.spec or {}).get("rope") or {}
    return rope.get("spectrum") or run.config


def run_risk(run: RunArtifacts) -> float | None:
    """The surrogate for a run, or None when its head_dim, train length or spectrum is unknown."""
    from train.spectra import SpectrumError

    head_dim, train_len = run_head_dim(run), run.train_len
    if not head_dim or not train_len:
        return None
    try:
        return frequency_risk(run_spectrum(run), head_dim, train_len)
    except SpectrumError:
        return None
