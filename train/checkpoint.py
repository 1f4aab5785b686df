"""DCP checkpoints: `ckpt/step_<N>/` = sharded model + optimizer, meta.json, per-rank RNG, `.complete`.

Atomic by construction: everything is written into `ckpt/.tmp_step_<N>/`, the `.complete` marker goes
last, and only then is the directory renamed to `step_<N>`. A crash mid-save leaves a `.tmp_*` that
nothing reads (and the next run deletes); the previous checkpoint stays the latest complete one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from train.contract import CKPT_COMPLETE_MARKER, atomic_write_json, ckpt_step_name, parse_ckpt_step

META = "meta.json"


def step_dir(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / ckpt_step_name(step)


def complete_steps(ckpt_dir: str | os.PathLike) -> list[int]:
    """Steps of the checkpoints holding the `.complete` marker, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for d in ckpt_dir.iterdir():
        step = parse_ckpt_step(d.name)
        if step is not None and (d / CKPT_COMPLETE_MARKER).exists():
            steps.append(step)
    return sorted(steps)


def latest_complete(ckpt_dir: str | os.PathLike) -> Path | None:
    steps = complete_steps(ckpt_dir)
    return step_dir(ckpt_dir, steps[-1]) if steps else None


def prune(ckpt_dir: str | os.PathLike, keep: int) -> list[int]:
    """Delete all but the newest `keep` complete checkpoints; returns the deleted steps."""
    old = complete_steps(ckpt_dir)[:-keep] if keep > 0 else []
    for step in old:
        shutil.rmtree(step_dir(ckpt_dir, step), ignore_errors=True)
    return old


def remove_partial(ckpt_dir: str | os.PathLike) -> None:
    """Delete leftovers of saves that never completed (rank 0, before training)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return
    for d in ckpt_dir.iterdir():
        if d.name.startswith(".tmp_") or (parse_ckpt_step(d.name) is not None and not (d / CKPT_COMPLETE_MARKER).exists()):
            shutil.rmtree(d, ignore_errors=True)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(ckpt_dir: str | os.PathLike, step: int, model, optimizer, meta: dict, keep: int) -> Path:
    """Collective: every rank calls it. Writes step_<N> atomically, then prunes to `keep`.

    `meta` (JSON) must hold what resuming needs besides the tensors: at least the step and tokens.
    """
    ckpt_dir = Path(ckpt_dir)
    final, tmp = step_dir(ckpt_dir, step), ckpt_dir / f".tmp_{ckpt_step_name(step)}"
    rank = dist.get_rank()
    if (final / CKPT_COMPLETE_MARKER).exists():  # e.g. signalled right after resuming from it
        return final
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        atomic_write_json(tmp / META, {**meta, "step": step, "world_size": dist.get_world_size()})
        with open(tmp / CKPT_COMPLETE_MARKER, "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
        prune(ckpt_dir, keep)
    dist.barrier()
    return final


def load(path: str | os.PathLike, model, optimizer) -> dict:
    """Collective: restore model, optimizer and this rank's RNG from `path`; returns its meta.json."""
    path = Path(path)
    meta = json.loads((path / META).read_text())
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.exists() and meta.get("world_size") == dist.get_world_size():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return meta
