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

# Files `opskit pull` may bring back (never checkpoints, caches or weights).
PULLABLE = (RESULTS, LOSS_CURVE, EVAL_PER_LENGTH, LOG, STATUS, SPEC, DOWNSTREAM, PASSKEY)
PULLABLE_SUFFIXES = (".png", ".txt", ".csv")

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
