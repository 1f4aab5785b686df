"""Names and small helpers of the run-directory contract (docs/run-directory.md).

Pure Python, no torch: both opskit/ and train/ import it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SPEC = "spec.json"
STATUS = "status.json"
LOG = "run.log"
PID = "pid"
EXIT_CODE = "exit_code"
LOSS_CURVE = "loss_curve.jsonl"
EVAL_PER_LENGTH = "eval_per_length.json"
RESULTS = "results.json"
CKPT_DIR = "ckpt"
CKPT_COMPLETE_MARKER = ".complete"
DOWNSTREAM = "downstream.json"  # written by a p2 job (train/p2.py); read by opskit/results/artifacts.py
PASSKEY = "passkey.json"  # written by a p2 job (train/p2.py)
CODE_DIFF = "code.diff"  # uncommitted changes at launch (opskit/code_record.py)
ENVIRONMENT = "environment.txt"  # the trainer python's `pip freeze` at launch (opskit/code_record.py)
TRACKING = "tracking.json"  # ids of the run in its trackers, reused on resume (train/tracking.py)
TB_DIR = "tb"  # TensorBoard event files (train/tracking.py)
WANDB_DIR = "wandb"  # W&B's own run folders (offline ones for `wandb sync`)

# Files `opskit pull` may bring back (never checkpoints, caches or weights).
PULLABLE = (RESULTS, LOSS_CURVE, EVAL_PER_LENGTH, LOG, STATUS, SPEC, DOWNSTREAM, PASSKEY, CODE_DIFF, TRACKING)
PULLABLE_SUFFIXES = (".png", ".txt", ".csv")
# Sub-directories pulled whole (small tracker files); every other one (ckpt/, hf/, slurm/) stays.
PULLABLE_DIRS = (TB_DIR, WANDB_DIR)

# Trainer phases written to status.json["state"].
TRAINER_STATES = ("starting", "tokenizing", "training", "evaluating", "done", "interrupted", "failed")

EXIT_OK = 0
EXIT_BAD_SPEC = 2
EXIT_INTERRUPTED = 75  # signalled, checkpoint saved; resume continues the run

# How long torchrun waits, after forwarding SIGTERM, for its workers to checkpoint and exit before it
# SIGKILLs them (torch's default, 30 s, is shorter than a large model's checkpoint). Given to every run
# as TORCH_ELASTIC_SHUTDOWN_TIMEOUT: an environment variable, which a box with an older torch ignores.
SIGNAL_GRACE_S = 300

HEARTBEAT_MAX_INTERVAL_S = 30.0


def pullable_paths(run_dir: str | os.PathLike) -> list[str]:
    """Paths (relative, '/'-separated, sorted) of a run directory's files that `opskit pull` brings back:
    top-level files named in PULLABLE or with a PULLABLE_SUFFIXES suffix, and every plain file under a
    PULLABLE_DIRS folder. Symlinks are never followed or listed."""
    root = Path(run_dir)
    out = []
    if not root.is_dir():
        return out
    for path in root.iterdir():
        if path.is_symlink():
            continue
        if path.is_file() and (path.name in PULLABLE or path.suffix in PULLABLE_SUFFIXES):
            out.append(path.name)
        elif path.is_dir() and path.name in PULLABLE_DIRS:
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
                for name in filenames:
                    full = Path(dirpath) / name
                    if full.is_file() and not full.is_symlink():
                        out.append(full.relative_to(root).as_posix())
    return sorted(out)


def code_dirty(run_dir: str | os.PathLike) -> bool | None:
    """Whether the run was launched from a tree with uncommitted changes: its code.diff holds a change
    (opskit/code_record.py writes a header line even for a clean tree); None without a code.diff."""
    try:
        with open(Path(run_dir) / CODE_DIFF, errors="replace") as f:
            return any(line.startswith("diff --git ") for line in f)
    except FileNotFoundError:
        return None


def run_dir(workdir: str | os.PathLike, run: str) -> Path:
    return Path(workdir) / "runs" / run


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` so that a concurrent reader sees the old or the new file, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any | None:
    """The parsed file, or None when it does not exist (yet)."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
