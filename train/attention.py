"""Causal attention kernels: which one runs, chosen once per model by a probe, and named.

Preference on CUDA: FlashAttention-3 (`flash_attn_interface`, Hopper) > cuDNN attention through SDPA >
FlashAttention-2 (`flash_attn`) > SDPA with torch's own priority. On a CPU only SDPA exists. A backend
is taken only when a forward and backward on the real shapes runs and agrees with SDPA's math kernel
on a small input, so a broken or missing kernel falls through to the next. `describe` names the
kernel that SDPA actually dispatches to (torch._fused_sdp_choice), e.g. "sdpa:cudnn_attention".
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # Hopper build of FlashAttention-3
    from flash_attn_interface import flash_attn_func as flash3_func
except ImportError:
    flash3_func = None
try:  # optional extra `flash` (FlashAttention-2)
    from flash_attn import flash_attn_func as flash2_func
except ImportError:
    flash2_func = None

SDPA = "sdpa"                 # torch's own priority (the fallback that always works)
SDPA_CUDNN = "sdpa_cudnn"     # SDPA with cuDNN attention first
FLASH3 = "flash3"
FLASH2 = "flash2"
BACKENDS = (FLASH3, SDPA_CUDNN, FLASH2, SDPA)
ENV_OVERRIDE = "OPSKIT_ATTENTION"  # force one backend (benchmarks, debugging)

_CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = SDPA) -> torch.Tensor:
    """q, k, v: (B, T, H, D) -> (B, T, H, D), causal, softmax scale 1/sqrt(D)."""
    if backend == FLASH3:
        out = flash3_func(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out  # some FA3 versions also return the LSE
    if backend == FLASH2:
        return flash2_func(q, k, v, causal=True)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if backend == SDPA_CUDNN:
        with sdpa_kernel(_CUDNN_FIRST, set_priority=True):
            y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    else:
        y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    return y.transpose(1, 2)


def candidates(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Backends worth probing here, most preferred first (SDPA always last)."""
    if device.type != "cuda":
        return [SDPA]
    out = []
    half = dtype in (torch.bfloat16, torch.float16)
    if flash3_func is not None and half:
        out.append(FLASH3)
    out.append(SDPA_CUDNN)
    if flash2_func is not None and half:
        out.append(FLASH2)
    return out + [SDPA]


def _works(backend: str, shape: tuple, device, dtype) -> bool:
    """Forward + backward at `shape` (B, T, H, D) runs, and a small case matches the math kernel."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=g, requires_grad=True) for _ in range(3))
        causal_attention(q, k, v, backend).sum().backward()
        small = [t.detach()[:1, :256] for t in (q, k, v)]
        got = causal_attention(*small, backend).float()
        with sdpa_kernel([SDPBackend.MATH]):
            want = causal_attention(*(t.float() for t in small), SDPA)
        return bool(torch.isfinite(got).all()) and (got - want).abs().max().item() < 2e-2
    except (RuntimeError, TypeError, ValueError):
        return False
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def select_backend(device, dtype: torch.dtype, shape: tuple) -> str:
    """The first backend of `candidates` that works at `shape`; OPSKIT_ATTENTION forces one."""
    device = torch.device(device)
    forced = os.environ.get(ENV_OVERRIDE)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_OVERRIDE}={forced!r}: choose one of {', '.join(BACKENDS)}")
        return forced
    for backend in candidates(device, dtype):
        if backend == SDPA or _works(backend, shape, device, dtype):
            return backend
    return SDPA


def describe(backend: str, device, dtype: torch.dtype, shape: tuple) -> str:
    """What runs for `backend` at `shape` (B, T, H, D): "flash3", "flash2" or "sdpa:<kernel>"."""
    if backend in (FLASH3, FLASH2):
        return backend
    B, T, H, D = shape
    q = torch.empty((B, H, T, D), device=device, dtype=dtype)
    if backend == SDPA_CUDNN:
        with sdpa_kernel(_CUDNN_FIRST, set_priority=True):
            choice = torch._fused_sdp_choice(q, q, q, is_causal=True)
    else:
        choice = torch._fused_sdp_choice(q, q, q, is_causal=True)
    return f"sdpa:{SDPBackend(choice).name.lower()}"
