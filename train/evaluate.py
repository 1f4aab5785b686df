"""Perplexity by evaluation length over contiguous chunks of the validation tokens.

Produces the eval_per_length.json object of docs/run-directory.md. Every rank of an FSDP run must
call `evaluate_lengths` with the same arguments (the chunks are chosen deterministically); each rank
evaluates its share of the chunks and every rank gets all chunk losses back; rank 0 writes the file.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

from train.distributed import gather_sharded, shard_indices

DEFAULT_LENGTHS = (2048, 4096, 8192, 12288, 16384, 32768)
DEFAULT_CHUNKS = 10
MODES = ("sequential", "random")


def tokens_needed(length: int, chunks: int) -> int:
    """Each chunk is `length` inputs plus the next token as the last target; chunks do not overlap."""
    return chunks * length + 1


def chunk_starts(n_tokens: int, length: int, chunks: int, mode: str, seed: int) -> list[int] | None:
    """Start offsets of the chunks, or None when the validation set is too short for this length.

    Both modes require tokens_needed(length, chunks) tokens, so a length is evaluated in both or in
    neither. Random starts are drawn per length from a generator seeded with (seed, length).
    """
    if mode not in MODES:
        raise ValueError(f"eval mode must be one of {', '.join(MODES)}, got {mode!r}")
    if n_tokens < tokens_needed(length, chunks):
        return None
    if mode == "sequential":
        return [i * length for i in range(chunks)]
    rng = np.random.default_rng([seed, length])
    return sorted(int(s) for s in rng.integers(0, n_tokens - length, size=chunks))  # start + length < n


def evaluate_lengths(
    model: torch.nn.Module,
    val_tokens: np.ndarray,
    lengths: list[int] = DEFAULT_LENGTHS,
    chunks: int = DEFAULT_CHUNKS,
    mode: str = "sequential",
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 1,
) -> dict:
    """{"mode", "chunks_requested", "lengths": {str(L): {loss, ppl, chunks, chunk_losses} | {skipped, reason}}}.

    The model is called as model(inputs, targets, reduction="none") under torch.no_grad, with
    autocast to `dtype` unless it is fp32 (an FSDP model's own mixed-precision policy applies as is).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out = {"mode": mode, "chunks_requested": chunks, "lengths": {}}
    try:
        for length in lengths:
            starts = chunk_starts(len(val_tokens), length, chunks, mode, seed)
            if starts is None:
                need = tokens_needed(length, chunks)
                out["lengths"][str(length)] = {
                    "skipped": True,
                    "reason": f"need {need} validation tokens, have {len(val_tokens)}",
                }
                continue
            losses = _chunk_losses(model, val_tokens, starts, length, device, dtype, batch_size)
            mean = sum(losses) / len(losses)
            out["lengths"][str(length)] = {
                "loss": mean,
                "ppl": math.exp(mean),
                "chunks": len(losses),
                "chunk_losses": losses,
            }
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def _chunk_losses(model, val_tokens, all_starts, length, device, dtype, batch_size) -> list[float]:
    autocast = (
        torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    )
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    starts = [all_starts[i] for i in shard_indices(len(all_starts), rank, world)]
    losses = []
    for b in range(0, len(starts), batch_size):
        batch = np.stack([np.asarray(val_tokens[s : s + length + 1], dtype=np.int64) for s in starts[b : b + batch_size]])
        batch = torch.from_numpy(batch).to(device)
        with autocast:
            token_losses = model(batch[:, :-1], batch[:, 1:], reduction="none")
        losses.extend(token_losses.float().mean(dim=1).tolist())
    return gather_sharded(losses, len(all_starts), device)


# ---------------------------------------------------------------- sliding-window perplexity (eval.stride)

def sliding_windows(n_targets: int, length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, inputs, scored) of each window over tokens[0 : n_targets + 1], walked as in Hugging Face's
    "perplexity of fixed-length models" (the PI and YaRN papers' stride-S evaluation): a window of up to
    `length` inputs starts every `stride` tokens and scores only its last `scored` targets, the ones no
    earlier window scored (the first window scores all of its own). Every target is scored once."""
    if not (0 < stride <= length and n_targets > 0):
        raise ValueError(f"need 0 < stride <= length and n_targets > 0, got stride {stride}, length {length}, "
                         f"n_targets {n_targets}")
    windows, prev_end = [], 0
    for begin in range(0, n_targets, stride):
        end = min(begin + length, n_targets)
        windows.append((begin, end - begin, end - prev_end))
        prev_end = end
        if end == n_targets:
            break
    return windows


@torch.no_grad()
def sliding_window_loss(model, val_tokens, length: int, stride: int, n_targets: int,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        batch_size: int = 1) -> dict:
    """Mean loss per scored token over tokens[0 : n_targets + 1] with windows of `length` inputs moved by
    `stride`: {"loss", "ppl", "stride", "windows", "tokens"}. Same model call as evaluate_lengths."""
    device = torch.device(device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    )
    windows = sliding_windows(n_targets, length, stride)
    total = 0.0
    i = 0
    while i < len(windows):
        group = [w for w in windows[i:i + batch_size] if w[1] == windows[i][1]]  # one width per batch
        i += len(group)
        width = group[0][1]
        batch = np.stack([np.asarray(val_tokens[b : b + width + 1], dtype=np.int64) for b, _, _ in group])
        batch = torch.from_numpy(batch).to(device)
        with autocast:
            token_losses = model(batch[:, :-1], batch[:, 1:], reduction="none").float()
        for row, (_, _, scored) in zip(token_losses, group):
            total += float(row[width - scored:].double().sum())
    loss = total / n_targets
    return {"loss": loss, "ppl": math.exp(loss), "stride": stride, "windows": len(windows), "tokens": n_targets}


def evaluate_sliding(model, val_tokens, lengths, chunks: int, stride: int, device="cpu",
                     dtype: torch.dtype = torch.float32, batch_size: int = 1) -> dict:
    """eval_per_length.json's "sliding" section: {"stride", "lengths": {str(L): sliding_window_loss | skipped}}.

    Length L covers the tokens its contiguous chunks take in sequential mode (chunks * L targets from the
    start), so with stride == L it is the contiguous perplexity; a stride above L is taken as L.
    """
    was_training = model.training
    model.eval()
    out = {"stride": stride, "lengths": {}}
    try:
        for length in lengths:
            need = tokens_needed(length, chunks)
            if len(val_tokens) < need:
                out["lengths"][str(length)] = {"skipped": True,
                                               "reason": f"need {need} validation tokens, have {len(val_tokens)}"}
                continue
            out["lengths"][str(length)] = sliding_window_loss(model, val_tokens, length, min(stride, length),
                                                              chunks * length, device, dtype, batch_size)
    finally:
        model.train(was_training)
    return out
