"""LLaMA-style decoder with a configurable RoPE spectrum.

Tied embedding/output head, pre-norm RMSNorm, bias-free attention with rotary embeddings (rotate-half,
one inv_freq shared by all layers), SwiGLU MLP. Attention never builds a T x T matrix (train/attention.py
picks the kernel); the loss never builds full fp32 logits (train/loss.py).

The RoPE frequencies are fp64 whatever the model's dtype: `GPT._apply` (behind .to, .bfloat16,
.to_empty, ...) refills them from the spectrum's exact values on the new device after every cast.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.attention import SDPA, causal_attention
from train.loss import CHUNKED, LOSS_CHUNK_TOKENS, linear_cross_entropy
from train.presets import ModelConfig
from train.spectra import Scaling, rope_parameters


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_tables(inv_freq: torch.Tensor, seq_len: int, attention_factor: float = 1.0):
    """fp32 cos, sin of shape (seq_len, head_dim), scaled by attention_factor (HF's yarn convention).

    Built for any length on every call (T x K, cheap); angles in fp64 so far positions stay exact.
    """
    positions = torch.arange(seq_len, device=inv_freq.device, dtype=torch.float64)
    angles = torch.outer(positions, inv_freq.double())
    angles = torch.cat((angles, angles), dim=-1)
    return (angles.cos() * attention_factor).float(), (angles.sin() * attention_factor).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); cos/sin: (T, D), used in x's dtype."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        width = cfg.n_heads * cfg.head_dim
        self.q = nn.Linear(cfg.hidden, width, bias=False)
        self.k = nn.Linear(cfg.hidden, width, bias=False)
        self.v = nn.Linear(cfg.hidden, width, bias=False)
        self.o = nn.Linear(width, cfg.hidden, bias=False)
        self.backend = SDPA  # a train.attention backend; GPT.set_attention_backend sets it

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        shape = (B, T, self.n_heads, self.head_dim)
        q = apply_rope(self.q(x).view(shape), cos, sin)
        k = apply_rope(self.k(x).view(shape), cos, sin)
        v = self.v(x).view(shape)
        y = causal_attention(q, k, v, self.backend)
        return self.o(y.reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.up = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.down = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, inv_freq: list[float], attention_factor: float = 1.0):
        super().__init__()
        if len(inv_freq) != cfg.head_dim // 2:
            raise ValueError(f"inv_freq has {len(inv_freq)} entries, head_dim {cfg.head_dim} needs {cfg.head_dim // 2}")
        self.cfg = cfg
        self.attention_factor = float(attention_factor)
        self._inv_freq_values = [float(w) for w in inv_freq]
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)  # also the output head (tied)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.loss_impl, self.loss_chunk = CHUNKED, LOSS_CHUNK_TOKENS  # train.loss: implementation, rows per chunk
        # Derived from the config name, so not part of checkpoints; fp64 on every device and dtype.
        self.register_buffer("inv_freq", self._exact_inv_freq(None), persistent=False)
        if self.inv_freq.device.type != "meta":
            self.init_weights()

    def _exact_inv_freq(self, device) -> torch.Tensor:
        return torch.tensor(self._inv_freq_values, dtype=torch.float64, device=device)

    def _apply(self, fn, recurse=True):
        # Module.to(bf16) and friends cast every floating buffer; the frequencies must not be rounded.
        out = super()._apply(fn, recurse)
        device = self.inv_freq.device
        self.inv_freq = self._exact_inv_freq(device) if device.type != "meta" else self.inv_freq.double()
        return out

    def set_attention_backend(self, backend: str) -> None:
        for block in self.blocks:
            block.attn.backend = backend

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """normal(0, 0.02) for every matrix, ones for norms (inv_freq is refilled by every to/to_empty)."""
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.embed.weight.device).manual_seed(seed)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02, generator=generator)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        cos, sin = rope_tables(self.inv_freq, idx.shape[1], self.attention_factor)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"):
        """Logits (B, T, V) without targets; with targets the cross-entropy: a scalar mean, or per
        token (B, T) in fp32 with reduction="none". Call the module (not a method) so FSDP2 hooks run."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        h = self.hidden_states(idx)
        if targets is None:
            return F.linear(h, self.embed.weight)
        losses = linear_cross_entropy(h.flatten(0, 1), self.embed.weight, targets.flatten(), reduction,
                                      self.loss_impl, self.loss_chunk)
        return losses if reduction == "mean" else losses.view(targets.shape)


def build_model(cfg: ModelConfig, spectrum: str, scaling: Scaling | None = None, device="cpu") -> GPT:
    """GPT for preset `cfg` with RoPE spectrum `spectrum` (train.spectra name) and optional Scaling."""
    inv_freq, attention_factor = rope_parameters(spectrum, cfg.head_dim, scaling)
    with torch.device(device):
        return GPT(cfg, inv_freq, attention_factor)
