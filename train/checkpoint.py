"""DCP checkpoints: `ckpt/step_<N>/` = sharded model + optimizer, meta.json, per-rank RNG, `.complete`.

Atomic by construction: everything is written into `ckpt/.tmp_step_<N>/`, the `.complete` marker goes
last, and only then is the directory renamed to `step_<N>` (for `AsyncSaver`, only after the
background write has finished). A crash mid-save leaves a `.tmp_*` that
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


def _begin(ckpt_dir: Path, step: int) -> tuple[Path, Path] | None:
    """Collective: (final, tmp) with tmp freshly made by rank 0, or None when step_<N> is complete."""
    final, tmp = step_dir(ckpt_dir, step), ckpt_dir / f".tmp_{ckpt_step_name(step)}"
    if (final / CKPT_COMPLETE_MARKER).exists():  # e.g. signalled right after resuming from it
        return None
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    return final, tmp


def _finalize(ckpt_dir: Path, tmp: Path, final: Path, step: int, meta: dict, world_size: int, keep: int) -> None:
    """Rank 0, once every rank's tensors are in `tmp`: meta.json, `.complete` last, rename, prune."""
    atomic_write_json(tmp / META, {**meta, "step": step, "world_size": world_size})
    with open(tmp / CKPT_COMPLETE_MARKER, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    prune(ckpt_dir, keep)


def save(ckpt_dir: str | os.PathLike, step: int, model, optimizer, meta: dict, keep: int) -> Path:
    """Collective: every rank calls it. Writes step_<N> atomically, then prunes to `keep`.

    `meta` (JSON) must hold what resuming needs besides the tensors: at least the step and tokens.
    """
    ckpt_dir = Path(ckpt_dir)
    paths = _begin(ckpt_dir, step)
    if paths is None:
        return step_dir(ckpt_dir, step)
    final, tmp = paths
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{dist.get_rank()}.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        _finalize(ckpt_dir, tmp, final, step, meta, dist.get_world_size(), keep)
    dist.barrier()
    return final


class AsyncSaver:
    """Checkpoints written in the background (dcp.async_save) while training goes on.

    `start` copies the state to CPU memory and returns; the files are written by a thread that
    talks over a gloo group of its own (never the training group). `wait` (every rank, before the
    next start and before exit) blocks until the write is done; only then does rank 0 write
    meta.json and `.complete` and rename the directory, so a kill at any point leaves the previous
    checkpoint the latest complete one.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, keep: int):
        self.ckpt_dir, self.keep = Path(ckpt_dir), keep
        self._group = dist.new_group(backend="gloo")
        self._pending = None  # (future, step, tmp, final, meta)

    def start(self, step: int, model, optimizer, meta: dict) -> None:
        """Collective. Waits for the previous save first."""
        self.wait()
        paths = _begin(self.ckpt_dir, step)
        if paths is None:
            return
        final, tmp = paths
        # RNG first: a rank's part of the DCP write (which rank 0's future waits for) comes after it.
        torch.save(_rng_state(), tmp / f"rng_rank{dist.get_rank()}.pt")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        future = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp),
                                process_group=self._group)
        self._pending = (future, step, tmp, final, meta)

    @property
    def pending_step(self) -> int | None:
        return self._pending[1] if self._pending else None

    def poll(self) -> int | None:
        """`wait` if the write in flight is already done (never blocks), else None."""
        if self._pending is None or not getattr(self._pending[0], "upload_completion", self._pending[0]).done():
            return None
        return self.wait()

    def wait(self) -> int | None:
        """Finish the save in flight, if any; returns its step once `.complete` is written."""
        if self._pending is None:
            return None
        future, step, tmp, final, meta = self._pending
        self._pending = None
        getattr(future, "upload_completion", future).result()  # rank 0's future ends after every rank's data and DCP's metadata are written
        if dist.get_rank() == 0:
            _finalize(self.ckpt_dir, tmp, final, step, meta, dist.get_world_size(), self.keep)
        return step


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
