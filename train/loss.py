"""Cross-entropy of h @ weight.T over a 50K vocabulary without full fp32 logits, and without
recomputing the output matmul in backward.

Training (`mean`, gradients on): `ChunkedLinearCrossEntropy` walks the rows `chunk` at a time and
computes each chunk's loss and its gradients (dh, dweight) in the same pass, as Liger's fused
linear cross-entropy does: three matmuls of the output layer in all (the checkpointed version
needed four) and one chunk of fp32 logits alive at a time. The elementwise part of a chunk
(logsumexp, softmax - onehot) is compiled when `compiled=True`. On CUDA, Liger's kernel is used
instead when it is installed and agrees with this one (`select_impl`).

Evaluation (`none`, no gradients): per-token losses, chunk by chunk.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

LOSS_CHUNK_TOKENS = 4096  # rows of fp32 full-vocab logits materialised at a time
CHUNKED = "chunked"
CHUNKED_COMPILED = "chunked_compiled"
LIGER = "liger"
IMPLS = (CHUNKED, CHUNKED_COMPILED, LIGER)
ENV_OVERRIDE = "OPSKIT_LOSS"

try:  # optional CUDA extra `fused`
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
except ImportError:
    LigerFusedLinearCrossEntropyLoss = None


def _chunk_loss_and_dlogits(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float):
    """Summed CE of one chunk and d(scale * sum CE)/d logits in h's dtype."""
    logits = F.linear(h, weight).float()
    lse = torch.logsumexp(logits, dim=-1)
    loss = (lse - logits.gather(1, targets[:, None]).squeeze(1)).sum()
    dlogits = torch.exp(logits - lse[:, None])
    dlogits.scatter_add_(1, targets[:, None], torch.full_like(lse[:, None], -1.0))
    return loss, (dlogits * scale).to(h.dtype)


_compiled_kernel = None


def _kernel(compiled: bool):
    global _compiled_kernel
    if not compiled:
        return _chunk_loss_and_dlogits
    if _compiled_kernel is None:
        _compiled_kernel = torch.compile(_chunk_loss_and_dlogits, dynamic=False)
    return _compiled_kernel


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean CE of h (N, D) @ weight (V, D).T against targets (N,); gradients computed in forward."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, compiled: bool):
        kernel = _kernel(compiled)
        n = h.shape[0]
        grad_h = torch.empty_like(h)
        single = n <= chunk
        grad_w = None if single else torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            loss, dlogits = kernel(h[rows], weight, targets[rows], 1.0 / n)
            total = total + loss
            grad_h[rows] = dlogits @ weight
            if single:
                grad_w = dlogits.t() @ h[rows]
            else:
                grad_w += (dlogits.t() @ h[rows]).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None, None, None


def per_token_losses(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     chunk: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """fp32 CE per row, chunk by chunk (for evaluation: no gradients)."""
    parts = [F.cross_entropy(F.linear(h[s:s + chunk], weight).float(), targets[s:s + chunk], reduction="none")
             for s in range(0, h.shape[0], chunk)]
    return torch.cat(parts)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                         impl: str = CHUNKED, chunk: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """CE of h (N, D) @ weight.T against targets (N,): a scalar mean, or per-row fp32 losses ("none")."""
    grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if reduction == "none":
        if grads:
            raise ValueError("per-token losses are for evaluation: call under torch.no_grad, or use reduction='mean'")
        return per_token_losses(h, weight, targets, chunk)
    if not grads:
        return per_token_losses(h, weight, targets, chunk).mean()
    if impl == LIGER:
        return _liger()(weight, h, targets)
    return ChunkedLinearCrossEntropy.apply(h, weight, targets, chunk, impl == CHUNKED_COMPILED)


_liger_loss = None


def _liger():
    global _liger_loss
    if _liger_loss is None:
        _liger_loss = LigerFusedLinearCrossEntropyLoss()
    return _liger_loss


def _agrees_with_chunked(impl: str, device, dtype, hidden: int, vocab: int) -> bool:
    """`impl` gives the chunked path's loss and gradients on a small random problem."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        h = torch.randn(512, hidden, device=device, dtype=dtype, generator=g)
        w = (0.02 * torch.randn(vocab, hidden, device=device, generator=g)).to(dtype)
        t = torch.randint(0, vocab, (512,), device=device, generator=g)
        out = []
        for which in (impl, CHUNKED):
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            loss = linear_cross_entropy(hh, ww, t, impl=which, chunk=256)
            loss.backward()
            out.append((loss.float(), hh.grad.float(), ww.grad.float()))
        return all(torch.allclose(a, b, rtol=2e-2, atol=1e-3) for a, b in zip(*out))
    except (RuntimeError, TypeError, ValueError):
        return False


def select_impl(device, dtype: torch.dtype, compile_enabled: bool, hidden: int, vocab: int) -> str:
    """Liger on CUDA when installed and verified; else the chunked path (compiled with `compile`).
    OPSKIT_LOSS forces one of IMPLS."""
    device = torch.device(device)
    forced = os.environ.get(ENV_OVERRIDE)
    if forced:
        if forced not in IMPLS:
            raise ValueError(f"{ENV_OVERRIDE}={forced!r}: choose one of {', '.join(IMPLS)}")
        return forced
    if (device.type == "cuda" and LigerFusedLinearCrossEntropyLoss is not None
            and _agrees_with_chunked(LIGER, device, dtype, hidden, vocab)):
        return LIGER
    return CHUNKED_COMPILED if compile_enabled else CHUNKED
