"""status.json (heartbeat) and loss_curve.jsonl writers. Only rank 0 makes them.

Both follow docs/run-directory.md: status.json is replaced atomically at every phase change and
refreshed by a background thread, so `updated_at` is never older than HEARTBEAT_S even while the
main thread is busy tokenizing or evaluating. `progress_at` changes only when the trainer itself
reports (a log step, a phase, a checkpoint), so a hung main thread (a stuck collective) shows as a
stall although the thread keeps beating.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from train.contract import (HB_STARTING, HEARTBEAT_MAX_INTERVAL_S, LOSS_CURVE, STATUS, TRAINER_STATES,
                            atomic_write_json, atomic_write_text, is_no_space, overwrite_in_place)

# Refresh interval; well under the contract's maximum so a slow disk never makes a run look dead.
# Tests shorten it with OPSKIT_HEARTBEAT_S.
HEARTBEAT_S = min(float(os.environ.get("OPSKIT_HEARTBEAT_S", 10.0)), HEARTBEAT_MAX_INTERVAL_S)

STATUS_FIELDS = (
    "state", "attempt", "pid", "updated_at", "step", "total_steps", "tokens", "loss", "tokens_per_s",
    "eta_s", "cache_bytes", "cache_tokens", "cache_target_tokens", "checkpoint_step", "message", "progress_at",
    # GPU samples (train/gpu_monitor.py): mean utilisation %, memory used (MiB) and power (W) of the
    # run's GPUs at gpu_at, and [[bucket start, highest utilisation], ...]; null on a CPU run.
    "gpu_util", "gpu_mem_mb", "gpu_power_w", "gpu_at", "gpu_util_max",
    "failure",
)


def initial_status(attempt: int) -> dict:
    status = dict.fromkeys(STATUS_FIELDS)
    status.update(state=HB_STARTING, attempt=attempt, pid=os.getpid(), step=0, tokens=0, message="")
    return status


class Heartbeat:
    """Owns status.json: `update()` merges fields and writes at once; a thread rewrites it periodically.

    Disabled (every call a no-op) on ranks other than 0.
    """

    def __init__(self, out_dir: str | os.PathLike, attempt: int, enabled: bool = True,
                 interval_s: float = HEARTBEAT_S):
        self.path = Path(out_dir) / STATUS
        self.enabled = enabled
        self.interval_s = interval_s
        self.status = initial_status(attempt)
        self._lock = threading.Lock()  # the thread and the main thread share one tmp file name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self, **fields) -> None:
        if not self.enabled:
            return
        unknown = set(fields) - set(STATUS_FIELDS)
        if unknown:
            raise ValueError(f"unknown status.json fields: {sorted(unknown)}")
        if "state" in fields and fields["state"] not in TRAINER_STATES:
            raise ValueError(f"unknown trainer state {fields['state']!r}")
        with self._lock:
            self.status.update(fields)
            self.status["progress_at"] = time.time()  # the trainer itself moved on (the thread never sets it)
            self._write_locked()

    def note(self, **fields) -> None:
        """Merge fields that are not the trainer's progress (GPU samples): written with the next beat."""
        if not self.enabled:
            return
        unknown = set(fields) - set(STATUS_FIELDS)
        if unknown:
            raise ValueError(f"unknown status.json fields: {sorted(unknown)}")
        with self._lock:
            self.status.update(fields)

    def _write_locked(self) -> None:
        self.status["updated_at"] = time.time()
        try:
            atomic_write_json(self.path, self.status)
        except OSError as e:
            if not (is_no_space(e) and self.path.exists()):
                raise
            # A full disk: the old heartbeat's blocks still hold a new one (it is ~600 bytes), so opskit
            # reads the truth (failed, no space) instead of an old "training" beat.
            overwrite_in_place(self.path, json.dumps(self.status, sort_keys=True) + "\n")

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                try:
                    self._write_locked()
                except OSError as e:  # a full or vanished disk must not kill the run from a thread
                    print(f"heartbeat: could not write {self.path}: {e}", flush=True)

    def start(self) -> "Heartbeat":
        if self.enabled and self._thread is None:
            self.update()
            self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class LossCurve:
    """Appends one JSON line per logging step to loss_curve.jsonl (rank 0 only); `listeners` (the
    trackers, train/tracking.py) get each record too."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True):
        self.path = Path(out_dir) / LOSS_CURVE
        self.enabled = enabled
        self.listeners: list = []

    def truncate_after(self, step: int) -> int:
        """Drop lines with `step` greater than `step` (what a resume from that checkpoint redoes).

        Returns the number of lines dropped. A torn last line (a crash mid-append) is dropped too.
        """
        if not self.enabled or not self.path.exists():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if record.get("step", 0) > step:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        return dropped

    def append(self, step: int, tokens: int, loss: float, lr: float, grad_norm: float,
               tokens_per_s: float) -> dict:
        record = {"step": step, "tokens": tokens, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens_per_s, "time": time.time()}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
            for listener in self.listeners:
                listener(record)
        return record


def read_loss_curve(out_dir: str | os.PathLike) -> list[dict]:
    path = Path(out_dir) / LOSS_CURVE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
