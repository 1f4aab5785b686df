"""Learning rate: linear warmup, then cosine decay to a floor. A pure function of the step."""
from __future__ import annotations

import math

MIN_LR_FRAC = 0.1  # cosine decays to this fraction of the peak


def warmup_steps(total_steps: int, warmup_frac: float) -> int:
    return int(round(total_steps * warmup_frac))


def lr_at(step: int, total_steps: int, peak_lr: float, warmup: int, min_frac: float = MIN_LR_FRAC) -> float:
    """Learning rate for the optimizer update that turns `step` (0-based) into `step + 1`."""
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak_lr * (min_frac + (1.0 - min_frac) * cosine)
