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
PULLED = "pulled.json"  # written by `agent.py mark-pulled` after `opskit pull` (the idle action reads it)

# Files `opskit pull` may bring back (never checkpoints, caches or weights).
PULLABLE = (RESULTS, LOSS_CURVE, EVAL_PER_LENGTH, LOG, STATUS, SPEC, DOWNSTREAM, PASSKEY, CODE_DIFF, TRACKING)
PULLABLE_SUFFIXES = (".png", ".txt", ".csv")
# Sub-directories pulled whole (small tracker files); every other one (ckpt/, hf/, slurm/) stays.
# TensorBoard event files are small and come home; W&B's offline folders stay on the box (`wandb sync` them
# there, or copy them deliberately): their binary .wandb logs are not results `publish` would take.
PULLABLE_DIRS = (TB_DIR,)

# Trainer phases written to status.json["state"].
HB_STARTING, HB_TOKENIZING, HB_TRAINING, HB_EVALUATING = "starting", "tokenizing", "training", "evaluating"
HB_DONE, HB_INTERRUPTED, HB_FAILED = "done", "interrupted", "failed"
TRAINER_STATES = (HB_STARTING, HB_TOKENIZING, HB_TRAINING, HB_EVALUATING, HB_DONE, HB_INTERRUPTED, HB_FAILED)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_SPEC = 2
EXIT_INTERRUPTED = 75  # signalled, checkpoint saved; resume continues the run
EXIT_NO_SPACE = 74  # the run's disk is full (ENOSPC); status.json says so too: torchrun reports its own 1

DISK_FULL_BYTES = 16 * 2**20  # less free than this where a run failed: the disk was full

# status.json["failure"] when the trainer failed for a reason opskit names itself (not only `message`).
FAILURE_NO_SPACE = "no_space"

RUNS_DIR = "runs"
CKPT_STEP_PREFIX = "step_"

# How long torchrun waits, after forwarding SIGTERM, for its workers to checkpoint and exit before it
# SIGKILLs them (torch's default, 30 s, is shorter than a large model's checkpoint). Given to every run
# as TORCH_ELASTIC_SHUTDOWN_TIMEOUT: an environment variable, which a box with an older torch ignores.
SIGNAL_GRACE_S = 300

HEARTBEAT_MAX_INTERVAL_S = 30.0
# GPU samples in status.json (train/gpu_monitor.py): the highest utilisation seen in each bucket of this
# many seconds, newest last, at most GPU_BUCKETS of them (opskit.states judges "GPUs idle" from them).
GPU_BUCKET_S = 30
GPU_BUCKETS = 120


# ------------------------------------------------------------------ run names and directories


def run_name(phase: str, config: str, seed: int) -> str:
    """`<phase>/<config>/s<seed>`, e.g. demo/geo_500k/s42."""
    return f"{phase}/{config}/s{seed}"


def parse_run_name(name: str) -> tuple[str, str, int]:
    """(phase, config, seed) of a run name; ValueError naming the expected form otherwise."""
    parts = name.strip("/").split("/")
    if len(parts) != 3 or not all(parts) or not parts[2].startswith("s") or not parts[2][1:].isdigit():
        raise ValueError(f"bad run name '{name}': expected <phase>/<config>/s<seed>, e.g. demo/geo_500k/s42")
    return parts[0], parts[1], int(parts[2][1:])


def run_rel(run: str, *names: str) -> str:
    """A path inside a run's directory, relative to the workdir: `runs/<run>/<names...>`."""
    return "/".join((RUNS_DIR, run, *names))


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
    return Path(workdir) / RUNS_DIR / run


def workdir_of(run_directory: str | os.PathLike, run: str) -> Path:
    """The workdir holding `run_directory` (the inverse of run_dir)."""
    path = Path(run_directory)
    depth = len(Path(run_rel(run)).parts)
    if path.parts[-depth:] != Path(run_rel(run)).parts:
        raise ValueError(f"{path} is not the directory of run {run} (expected .../{run_rel(run)})")
    return path.parents[depth - 1]


# ------------------------------------------------------------------ files the launcher writes


def write_pid(run_directory: str | os.PathLike, pid: int, start_time: str | None) -> None:
    """`pid`: "<pid> <kernel start time>" of the detached process group leader."""
    atomic_write_text(Path(run_directory) / PID, f"{pid} {start_time}\n")


def read_pid(run_directory: str | os.PathLike) -> tuple[int, str] | None:
    """(pid, kernel start time) from the pid file, or None when absent or unreadable."""
    try:
        pid, start = (Path(run_directory) / PID).read_text().split()
        return int(pid), start
    except (OSError, ValueError):
        return None


def read_exit_code(run_directory: str | os.PathLike) -> int | None:
    """The last attempt's exit status, or None while it runs (or when it never wrote one)."""
    try:
        return int((Path(run_directory) / EXIT_CODE).read_text().strip())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ checkpoints


def ckpt_step_name(step: int) -> str:
    """The directory name of the checkpoint at `step`: step_<N>."""
    return f"{CKPT_STEP_PREFIX}{step}"


def parse_ckpt_step(name: str) -> int | None:
    """N of a `step_<N>` directory name, None for anything else (a `.tmp_step_<N>`, say)."""
    rest = name[len(CKPT_STEP_PREFIX):] if name.startswith(CKPT_STEP_PREFIX) else ""
    return int(rest) if rest.isdigit() else None


# ------------------------------------------------------------------ writing and reading files


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` so that a concurrent reader sees the old or the new file, never a part. On any
    failure (a full disk) the temporary file is removed, so a failed write leaves no space taken."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def overwrite_in_place(path: str | os.PathLike, text: str) -> None:
    """Rewrite an existing file's bytes without a new file: on a full disk this still succeeds when
    `text` fits in the blocks the file already has (the last resort for a small record such as the
    heartbeat; a reader may see it half-written, which the readers treat as unreadable)."""
    with open(path, "r+") as f:
        f.write(text)
        f.truncate()
        f.flush()


def is_no_space(error: BaseException, path: str | os.PathLike | None = None) -> bool:
    """Whether a failure was a full disk: ENOSPC/EDQUOT in the exception, its causes or (torch's
    distributed checkpoint) the failures it gathered from ranks; or, since some writers hide the
    errno (torch's zip writer says "unexpected pos"), whether `path`'s filesystem is full right now."""
    import errno
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    return path is not None and disk_full(path)


def disk_full(path: str | os.PathLike) -> bool:
    """Whether the filesystem holding `path` has less than DISK_FULL_BYTES left for this user."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < DISK_FULL_BYTES


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any | None:
    """The parsed file, or None when it does not exist (yet)."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
