"""Read and validate a run's spec.json (docs/run-directory.md) before anything starts.

Pure Python, no torch. Every field is checked up front; the first bad one raises SpecError naming it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

DTYPES = ("auto", "fp32", "bf16")
EVAL_MODES = ("sequential", "random")
SCALING_TYPES = ("pi", "ntk", "yarn", "dynamic")
COMPILE_AUTO = "auto"  # compile: true, false, or "auto" (on for CUDA, off for CPU)
TRACKER_KINDS = ("tensorboard", "wandb", "mlflow")  # "mlflow:URI" names the tracking server


class SpecError(Exception):
    """A missing or ill-typed spec field; the message names it."""


@dataclass(frozen=True)
class TrainSpec:
    raw: dict  # the spec.json content, for modules that take the whole spec (train.data)
    run: str
    phase: str
    config: str
    seed: int
    attempt: int
    preset: str
    spectrum: str
    scaling: dict | None  # {"type", "factor", "original_max"} or None
    tokenizer: str
    train_data: list  # [{"dataset": str, "weight": float}]
    validation: dict  # {"dataset", "split", "max_tokens"}
    train_tokens: int
    seq_len: int
    micro_batch: int
    grad_accum: int
    lr: float
    warmup_frac: float
    weight_decay: float
    grad_clip: float
    dtype: str
    compile: bool | str  # True, False or COMPILE_AUTO; train.distributed.compile_enabled resolves it
    activation_checkpointing: bool
    eval_lengths: list
    eval_chunks: int
    eval_mode: str
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int
    cache_dir: str
    out_dir: str
    tracking: tuple = ()  # ("tensorboard", "wandb", "mlflow:URI"); docs/trackers.md
    eval_stride: int | None = None  # sliding-window perplexity stride; None: contiguous chunks only

    def tokens_per_step(self, world_size: int) -> int:
        return self.seq_len * self.micro_batch * self.grad_accum * world_size

    def total_steps(self, world_size: int) -> int:
        return self.train_tokens // self.tokens_per_step(world_size)


def _get(obj: dict, key: str, kind, where: str, *, positive=False, nonneg=False, choices=None):
    name = f"{where}{key}"
    if key not in obj:
        raise SpecError(f"spec field '{name}' is missing")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; a number field must not accept true/false, nor a bool field 0/1.
    ok = isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise SpecError(f"spec field '{name}' must be {names}, got {value!r}")
    if positive and not value > 0:
        raise SpecError(f"spec field '{name}' must be > 0, got {value!r}")
    if nonneg and not value >= 0:
        raise SpecError(f"spec field '{name}' must be >= 0, got {value!r}")
    if choices is not None and value not in choices:
        raise SpecError(f"spec field '{name}' must be one of {', '.join(choices)}, got {value!r}")
    return value


def _nonempty(value: str, name: str) -> str:
    if not value.strip():
        raise SpecError(f"spec field '{name}' must not be empty")
    return value


def _abs_path(value: str, name: str) -> str:
    if not os.path.isabs(value):
        raise SpecError(f"spec field '{name}' must be an absolute path, got {value!r}")
    return value


def _scaling(rope: dict) -> dict | None:
    if "scaling" not in rope:
        raise SpecError("spec field 'rope.scaling' is missing (null for none)")
    s = rope["scaling"]
    if s is None:
        return None
    if not isinstance(s, dict):
        raise SpecError(f"spec field 'rope.scaling' must be null or an object, got {s!r}")
    return {
        "type": _get(s, "type", str, "rope.scaling.", choices=SCALING_TYPES),
        "factor": float(_get(s, "factor", (int, float), "rope.scaling.", positive=True)),
        "original_max": _get(s, "original_max", int, "rope.scaling.", positive=True),
    }


def _train_data(data: dict) -> list:
    mix = _get(data, "train", list, "data.")
    if not mix:
        raise SpecError("spec field 'data.train' must list at least one dataset")
    out = []
    for i, part in enumerate(mix):
        where = f"data.train[{i}]."
        if not isinstance(part, dict):
            raise SpecError(f"spec field 'data.train[{i}]' must be an object, got {part!r}")
        out.append({
            "dataset": _nonempty(_get(part, "dataset", str, where), where + "dataset"),
            "weight": float(_get(part, "weight", (int, float), where, positive=True)),
        })
    return out


def _validation(data: dict) -> dict:
    v = _get(data, "validation", dict, "data.")
    return {
        "dataset": _nonempty(_get(v, "dataset", str, "data.validation."), "data.validation.dataset"),
        "split": _nonempty(_get(v, "split", str, "data.validation."), "data.validation.split"),
        "max_tokens": _get(v, "max_tokens", int, "data.validation.", positive=True),
    }


def _compile(raw: dict):
    value = _get(raw, "compile", (bool, str), "")
    if isinstance(value, str) and value != COMPILE_AUTO:
        raise SpecError(f"spec field 'compile' must be true, false or \"{COMPILE_AUTO}\", got {value!r}")
    return value


def _eval_lengths(ev: dict) -> list:
    lengths = _get(ev, "lengths", list, "eval.")
    if not lengths:
        raise SpecError("spec field 'eval.lengths' must list at least one length")
    for i, n in enumerate(lengths):
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise SpecError(f"spec field 'eval.lengths[{i}]' must be a positive int, got {n!r}")
    return list(lengths)


def tracking_problem(value: Any) -> tuple[str, str] | None:
    """(where, why) of the first bad entry of a tracker list ("" or "[i]"), or None when it is valid:
    a list of "tensorboard", "wandb", "mlflow:URI", each once."""
    if not isinstance(value, list):
        return "", f'must be a list like ["tensorboard", "mlflow:http://HOST:5000"], got {value!r}'
    for i, item in enumerate(value):
        kind = item.split(":", 1)[0] if isinstance(item, str) else None
        if kind not in TRACKER_KINDS or (kind == "mlflow") != (":" in item) or item.endswith(":"):
            return f"[{i}]", f"must be tensorboard, wandb or mlflow:URI, got {item!r}"
        if item in value[:i]:
            return f"[{i}]", f"repeats {item!r}"
    return None


def check_tracking(value: Any, name: str = "tracking") -> tuple:
    """The trackers of a spec as a tuple, or SpecError naming the bad entry."""
    problem = tracking_problem(value)
    if problem:
        raise SpecError(f"spec field '{name}{problem[0]}' {problem[1]}")
    return tuple(value)


def _stride(ev: dict) -> int | None:
    if ev.get("stride") is None:
        return None
    return _get(ev, "stride", int, "eval.", positive=True)


def validate(raw: Any) -> TrainSpec:
    """The checked spec, or SpecError naming the first bad field."""
    if not isinstance(raw, dict):
        raise SpecError("spec must be a JSON object")
    rope = _get(raw, "rope", dict, "")
    data = _get(raw, "data", dict, "")
    ev = _get(raw, "eval", dict, "")
    spec = TrainSpec(
        raw=raw,
        run=_nonempty(_get(raw, "run", str, ""), "run"),
        phase=_get(raw, "phase", str, ""),
        config=_get(raw, "config", str, ""),
        seed=_get(raw, "seed", int, "", nonneg=True),
        attempt=_get(raw, "attempt", int, "", positive=True),
        preset=_nonempty(_get(raw, "preset", str, ""), "preset"),
        spectrum=_nonempty(_get(rope, "spectrum", str, "rope."), "rope.spectrum"),
        scaling=_scaling(rope),
        tokenizer=_nonempty(_get(raw, "tokenizer", str, ""), "tokenizer"),
        train_data=_train_data(data),
        validation=_validation(data),
        train_tokens=_get(raw, "train_tokens", int, "", positive=True),
        seq_len=_get(raw, "seq_len", int, "", positive=True),
        micro_batch=_get(raw, "micro_batch", int, "", positive=True),
        grad_accum=_get(raw, "grad_accum", int, "", positive=True),
        lr=float(_get(raw, "lr", (int, float), "", positive=True)),
        warmup_frac=float(_get(raw, "warmup_frac", (int, float), "", nonneg=True)),
        weight_decay=float(_get(raw, "weight_decay", (int, float), "", nonneg=True)),
        grad_clip=float(_get(raw, "grad_clip", (int, float), "", positive=True)),
        dtype=_get(raw, "dtype", str, "", choices=DTYPES),
        compile=_compile(raw),
        activation_checkpointing=_get(raw, "activation_checkpointing", bool, ""),
        eval_lengths=_eval_lengths(ev),
        eval_chunks=_get(ev, "chunks", int, "eval.", positive=True),
        eval_mode=_get(ev, "mode", str, "eval.", choices=EVAL_MODES),
        checkpoint_every=_get(raw, "checkpoint_every", int, "", positive=True),
        keep_checkpoints=_get(raw, "keep_checkpoints", int, "", positive=True),
        log_every=_get(raw, "log_every", int, "", positive=True),
        cache_dir=_abs_path(_get(raw, "cache_dir", str, ""), "cache_dir"),
        out_dir=_abs_path(_get(raw, "out_dir", str, ""), "out_dir"),
        tracking=check_tracking(raw.get("tracking", [])),
        eval_stride=_stride(ev),
    )
    if spec.warmup_frac >= 1:
        raise SpecError(f"spec field 'warmup_frac' must be < 1, got {spec.warmup_frac!r}")
    return spec


def check_world(spec: TrainSpec, world_size: int) -> int:
    """The step count for this world size, or SpecError when the budget buys no step."""
    steps = spec.total_steps(world_size)
    if steps < 1:
        raise SpecError(
            f"spec field 'train_tokens' ({spec.train_tokens}) is less than one step "
            f"({spec.tokens_per_step(world_size)} tokens with {world_size} ranks)")
    return steps


def load_spec(path: str | os.PathLike) -> TrainSpec:
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise SpecError(f"spec file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise SpecError(f"spec file {path} is not valid JSON: {e}") from None
    return validate(raw)
