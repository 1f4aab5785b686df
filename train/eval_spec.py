"""The evaluation a run's spec asks for, as one eval_per_length.json object.

- perplexity by length over contiguous chunks (train.evaluate.evaluate_lengths), as before;
- a `dynamic` scaling (HF dynamic NTK) evaluates each length with the frequencies for that length
  (train.spectra.dynamic_ratio), then puts the training frequencies back;
- `eval.stride` adds the sliding-window perplexity under "sliding" (train.evaluate.evaluate_sliding).

Every rank of an FSDP run calls it with the same arguments, as evaluate_lengths requires.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from train import presets, spectra
from train.evaluate import evaluate_lengths, evaluate_sliding
from train.spec import TrainSpec


def dynamic_frequencies(spec: TrainSpec, lengths) -> dict[int, list[float]]:
    """{length: inv_freq at that length} for a `dynamic` scaling; {} for every other spec."""
    scaling = spectra.parse_scaling(spec.scaling)
    if scaling is None or scaling.type != "dynamic":
        return {}
    head_dim = presets.get_preset(spec.preset).head_dim
    return {n: spectra.rope_parameters(spec.spectrum, head_dim, scaling, length=n)[0] for n in lengths}


@contextmanager
def frequencies(model, inv_freq: list[float]):
    """The model's RoPE frequencies set to `inv_freq` inside the block (a buffer: FSDP leaves it whole)."""
    saved = model.inv_freq.detach().clone()
    with torch.no_grad():
        model.inv_freq.copy_(torch.tensor(inv_freq, dtype=saved.dtype, device=saved.device))
    try:
        yield
    finally:
        with torch.no_grad():
            model.inv_freq.copy_(saved)


def evaluate_spec(model, val_tokens, spec: TrainSpec, device, dtype=torch.float32) -> dict:
    """eval_per_length.json for `spec` (the keys of evaluate_lengths, plus "sliding" with a stride and
    "dynamic" with a dynamic scaling: the base ratio used at each length)."""
    def one_pass(lengths):
        part = evaluate_lengths(model, val_tokens, lengths, spec.eval_chunks, spec.eval_mode, spec.seed,
                                device, dtype)
        if spec.eval_stride:
            part["sliding"] = evaluate_sliding(model, val_tokens, lengths, spec.eval_chunks, spec.eval_stride,
                                               device, dtype)
        return part

    per_length = dynamic_frequencies(spec, spec.eval_lengths)
    if not per_length:
        return one_pass(spec.eval_lengths)
    result = None
    for length, inv in per_length.items():
        with frequencies(model, inv):
            part = one_pass([length])
        if result is None:
            result = part
        else:
            result["lengths"].update(part["lengths"])
            if "sliding" in part:
                result["sliding"]["lengths"].update(part["sliding"]["lengths"])
    scaling = spectra.parse_scaling(spec.scaling)
    result["dynamic"] = {"factor": scaling.factor, "original_max": scaling.original_max,
                         "ratio": {str(n): spectra.dynamic_ratio(scaling, n) for n in per_length}}
    return result
