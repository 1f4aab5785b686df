"""What a run needs (preset and parameters, tokens, steps, dtype, data, GPUs, memory, GPU-hours) and
whether its target has it, before a run is queued: a 1.5B model on a CPU-only target, bf16 on a
CPU, or a hub tokenizer or dataset that is not cached here and cannot be downloaded are refused in
one line (`launch --force` overrides), instead of failing a minute later on the target."""
from __future__ import annotations

import functools
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from opskit import planning
from opskit.errors import OpsError
from opskit.targets import Target
from train import presets
from train.data.registry import DATASETS, DataError, get_dataset
from train.mfu import peak_flops

CPU_MAX_PARAMS = 150e6  # beyond this, training on CPU cores takes days: such runs need GPUs
TRAIN_BYTES_PER_PARAM = 16  # fp32 weights and gradients, Adam's two moments (sharded across a run's GPUs)
ASSUMED_MFU = 0.4  # for the GPU-hours estimate
ASSUMED_GPU = "H100"  # ... on this GPU, in bf16
HUB_TIMEOUT_S = 2.0


def needs(tgt: Target, spec: dict) -> dict:
    """What the run of `spec` asks of `tgt` (shown by launch --dry-run, checked by `problems`)."""
    gpus = planning.procs_per_run(tgt.config) if tgt.gpus else 0
    world = max(gpus, planning.procs_per_run(tgt.config))
    out: dict = {"gpus": gpus, "dtype": _dtype(spec.get("dtype", "auto"), gpus),
                 "data": [d["dataset"] for d in (spec.get("data") or {}).get("train", [])],
                 "tokenizer": spec.get("tokenizer")}
    if "downstream" in spec:  # a p2 job: evaluates a trained run; no training budget of its own
        return {**out, "kind": "downstream", "preset": spec.get("preset"), "gpus": 1 if tgt.gpus else 0}
    try:
        cfg = presets.get_preset(spec["preset"])
    except presets.PresetError as e:
        raise OpsError(f"{spec['run']}: {e}") from None
    params = presets.param_count(cfg)
    tokens_per_step = spec["seq_len"] * spec["micro_batch"] * spec["grad_accum"] * world
    flops = presets.flops_per_token(cfg, spec["seq_len"]) * spec["train_tokens"]
    peak = peak_flops(ASSUMED_GPU, "bf16")
    return {**out, "kind": "train", "preset": cfg.name, "params": params, "tokens": spec["train_tokens"],
            "steps": spec["train_tokens"] // tokens_per_step, "memory_gb": round(_memory_bytes(cfg, spec, gpus) / 1e9, 1),
            "gpu_hours": round(flops / (ASSUMED_MFU * peak) / 3600, 2)}


def _dtype(setting: str, gpus: int) -> str:
    """What the trainer computes in (train/distributed.py compute_dtype): auto is bf16 on GPUs only."""
    return "bf16" if setting == "bf16" or (setting == "auto" and gpus) else "fp32"


def _memory_bytes(cfg: presets.ModelConfig, spec: dict, gpus: int) -> float:
    """Peak training memory per device, roughly: sharded weights/gradients/optimizer plus activations
    of one micro-batch (34 bytes per token, hidden unit and layer; ~2 with activation checkpointing)
    and its logits."""
    tokens = spec["micro_batch"] * spec["seq_len"]
    per_layer = 2 if spec.get("activation_checkpointing") else 34
    scale = 1 if _dtype(spec.get("dtype", "auto"), gpus) == "bf16" else 2
    activations = tokens * cfg.hidden * cfg.n_layers * per_layer * scale + tokens * cfg.vocab_size * 4 * 2
    return TRAIN_BYTES_PER_PARAM * presets.param_count(cfg) / max(gpus, 1) + activations


def problems(tgt: Target, spec: dict, need: dict) -> list[str]:
    """Why the run cannot run well on `tgt`, each a short clause; [] if nothing is known against it."""
    out = []
    if need["kind"] == "train" and not need["gpus"] and need["params"] > CPU_MAX_PARAMS:
        out.append(f"preset {need['preset']} ({need['params'] / 1e9:.2f}B parameters) needs GPUs and target "
                   f"{tgt.name} has none")
    if not need["gpus"] and spec.get("dtype") == "bf16":
        out.append(f"dtype bf16 on a CPU is emulated and ~100x slower (target {tgt.name} has no GPUs; "
                   f"use dtype auto or fp32)")
    here = tgt.kind == "local"  # this machine's memory and network say nothing of a box or a cluster's nodes
    if need["kind"] == "train" and not need["gpus"] and here:
        available = _available_memory_bytes()
        if available and need["memory_gb"] * 1e9 > available:
            out.append(f"it needs ~{need['memory_gb']:.0f} GB of memory and this machine has "
                       f"{available / 1e9:.0f} GB available")
    if here:  # a box downloads for itself; here we can tell whether this machine can
        missing = _uncached_hub_files(spec)
        if missing and not _hub_reachable():
            out.append(f"it needs {', '.join(missing)} from the Hugging Face hub (not cached here) and the hub "
                       f"cannot be reached")
    return out


def _available_memory_bytes() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"


def _uncached_hub_files(spec: dict) -> list[str]:
    """The hub tokenizer (an org/name that is no file here) and hub datasets the run would download."""
    missing = []
    tok = spec.get("tokenizer") or ""
    if "/" in tok and not tok.endswith(".json") and not os.path.exists(tok):
        if not (_hub_cache() / f"models--{tok.replace('/', '--')}" / "snapshots").is_dir():
            missing.append(tok)
    data = spec.get("data") or {}
    names = [d["dataset"] for d in data.get("train", [])] + [data.get("validation", {}).get("dataset")]
    tokenized = _tokenized_sources(spec.get("cache_dir"))
    for name in dict.fromkeys(n for n in names if n):
        try:
            info = get_dataset(name)
        except DataError:
            continue  # the spec check names an unknown dataset
        if info.hf_id and name not in tokenized:  # streamed from the hub unless a token cache holds it
            missing.append(info.hf_id)
    return missing


def _tokenized_sources(cache_dir: str | None) -> set[str]:
    """Datasets that finished token caches under the run's cache dir were built from."""
    out: set[str] = set()
    for meta in Path(cache_dir or "/nonexistent").glob("tok/*/meta.json"):
        try:
            text = json.dumps(json.loads(meta.read_text()).get("sources"))
        except (OSError, ValueError):
            continue
        out.update(name for name in DATASETS if f'"{name}"' in text)
    return out


@functools.lru_cache(maxsize=1)
def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", ""):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=HUB_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def refusal(refused: list[tuple[str, list[str]]], target: str) -> str:
    """One line: the first refused run's problems, and how many others there are."""
    (run, why), others = refused[0], len(refused) - 1
    more = f" (and {others} more run{'s' if others > 1 else ''})" if others else ""
    return f"{run}{more} cannot run on target {target}: {'; '.join(why)}; pass --force to launch anyway"
