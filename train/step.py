"""The trainer's optimizer step and what times it: one function that train/run.py and the GPU
benchmarks both call, so a benchmark measures exactly what a run does.
"""
from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable

import torch

STEADY_AFTER_STEPS = 3  # steps of each attempt left out of the steady figures (compile, allocator, optimizer state)
GC_EVERY_STEPS = 50      # Python's collector runs here, not at random points of a step (as torchtitan does)


def train_step(model, optimizer, micro_batches: Iterable, grad_accum: int, grad_clip: float):
    """One optimizer step of an FSDP2 model over `grad_accum` (inputs, targets) micro-batches.

    Gradients are reduced and parameters resharded only after the last micro-step's backward:
    the earlier micro-steps keep the gathered (bf16) parameters and accumulate locally. Returns the
    (device) mean loss over the micro-steps and the grad norm before clipping, neither synced.
    """
    loss_sum = None
    for micro, (x, y) in enumerate(micro_batches):
        last = micro == grad_accum - 1
        model.set_requires_gradient_sync(last)
        model.set_reshard_after_backward(last)
        loss = model(x, y) / grad_accum  # call the module so FSDP2's hooks run
        loss.backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, norm


@contextmanager
def gc_controlled():
    """Automatic garbage collection off while training; `collect_now` at chosen steps instead."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def collect_now(step: int) -> None:
    if step % GC_EVERY_STEPS == 0:
        gc.collect(1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepTimer:
    """Time in training steps, all of it (`total_s`) and the steady part: the steps of this attempt
    after its first STEADY_AFTER_STEPS, timed from a device sync (`steady_s`, `steady_steps`).
    Checkpoint saves are not step time. Totals carry over attempts through the checkpoint meta."""
    device: torch.device
    total_s: float = 0.0
    steady_s: float = 0.0
    steady_steps: int = 0
    steps_this_attempt: int = 0
    _t0: float = 0.0

    def begin(self) -> None:
        self._t0 = time.perf_counter()

    def end(self) -> float:
        """Ends a step; returns its (host) duration."""
        self.steps_this_attempt += 1
        if self.steps_this_attempt == STEADY_AFTER_STEPS:
            sync(self.device)  # the steady clock starts with the warm-up steps really done
        dt = time.perf_counter() - self._t0
        self.total_s += dt
        if self.steps_this_attempt > STEADY_AFTER_STEPS:
            self.steady_s += dt
            self.steady_steps += 1
        return dt
