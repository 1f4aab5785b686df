"""rsync: push the project's code to a machine, fetch a run's artifacts, copy checkpoints between
targets. Each side of a copy is a Shell, which names its endpoint; the argv builders are pure and
`run()` turns a failure into a one-line error.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from opskit.errors import OpsError, TargetUnreachable
from train import contract as C

# What a box needs to run the trainer; never results/, caches, checkpoints, state.db, .git, venvs.
CODE_PATHS = ("opskit", "train", "remote", "configs", "pyproject.toml")
CODE_EXCLUDES = ("__pycache__/", "*.pyc", "*.egg-info/", ".pytest_cache/", "ckpt/", "*.pt", "*.safetensors",
                 "*.bin", "state.db*")
RSYNC_UNREACHABLE = (255, 12, 30, 35)  # ssh failed / protocol stream / io timeout / daemon timeout


def sync_code_argv(shell, project_root: Path, code_dir: str) -> list[str]:
    """Mirror CODE_PATHS into code_dir (--delete inside them only; pip's egg-info beside them stays)."""
    dest, e = shell.rsync_endpoint(code_dir.rstrip("/") + "/")
    argv = ["rsync", "-az", "--delete", "--relative", *e]
    argv += [f"--exclude={p}" for p in CODE_EXCLUDES]
    argv += [f"./{p}" for p in CODE_PATHS if (project_root / p).exists()]
    return argv + [dest]


def fetch_argv(shell, run_dir: str, dest: Path) -> list[str]:
    """Copy the files named on stdin (one a line) from run_dir into dest; partial files resume."""
    src, e = shell.rsync_endpoint(run_dir.rstrip("/") + "/")
    return ["rsync", "-a", "--partial", "--partial-dir=.rsync-partial", "--files-from=-", *e, src, str(dest) + "/"]


def run(argv: list[str], where: str, cwd: Path | None = None, stdin: str | None = None,
        timeout: float = 3600) -> None:
    try:
        proc = subprocess.run(argv, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TargetUnreachable(f"{where}: rsync timed out after {timeout:.0f}s") from None
    if proc.returncode == 0:
        return
    why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit code {proc.returncode}"
    if "rsync: command not found" in proc.stderr or "rsync: not found" in proc.stderr:
        raise OpsError(f"{where}: rsync is missing on the box; install it there (apt-get install rsync)")
    if proc.returncode in RSYNC_UNREACHABLE:
        raise TargetUnreachable(f"{where} unreachable (rsync): {why}")
    raise OpsError(f"{where}: rsync failed: {why}")


def push_code(shell, project_root: Path, code_dir: str) -> None:
    make_dir(shell, code_dir)
    run(sync_code_argv(shell, project_root, code_dir), str(shell), cwd=project_root)


def make_dir(shell, path: str) -> None:
    """mkdir -p on a machine (rsync's --mkpath needs rsync >= 3.2.3 on the box; Ubuntu 20.04 has 3.1.3)."""
    res = shell.run(["mkdir", "-p", path], timeout=60)
    if res.exit_code != 0:
        raise OpsError(f"{shell}: cannot create {path}: {res.stderr.strip()[-200:]}")


# ------------------------------------------------------------------ moving a run between targets


def latest_checkpoint(target, run_name: str) -> str | None:
    """Name (step_<N>) of the run's newest checkpoint holding the `.complete` marker, or None."""
    src, e = target.shell.rsync_endpoint(f"{target.run_dir(run_name)}/{C.CKPT_DIR}/")
    step_glob = C.ckpt_step_name("*")
    argv = ["rsync", "-r", "--list-only", *e, f"--include={step_glob}/",
            f"--include={step_glob}/{C.CKPT_COMPLETE_MARKER}", "--exclude=*", src]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise TargetUnreachable(f"{target.name}: listing the checkpoints of {run_name} timed out after 120s") from None
    if proc.returncode == 23 and "No such file" in proc.stderr:
        return None
    if proc.returncode != 0:
        run(argv, target.name)  # raises with rsync's reason
    steps = []
    for line in proc.stdout.splitlines():
        parts = line.split()[-1].split("/") if line.split() else []
        if len(parts) == 2 and parts[1] == C.CKPT_COMPLETE_MARKER and C.parse_ckpt_step(parts[0]) is not None:
            steps.append(C.parse_ckpt_step(parts[0]))
    return C.ckpt_step_name(max(steps)) if steps else None


def copy_run_for_resume(src, dst, run_name: str, scratch: Path) -> str:
    """Copy the newest complete checkpoint of a run (plus its loss curve, log and spec) from target
    `src` to target `dst` through `scratch` on this machine. `.complete` goes last: an interrupted copy
    never looks like a checkpoint. Returns the step directory's name."""
    src.check_movable()
    dst.check_movable()
    step = latest_checkpoint(src, run_name)
    if step is None:
        raise OpsError(f"{run_name} has no complete checkpoint on {src.name} to resume from")
    run_src, e_src = src.shell.rsync_endpoint(src.run_dir(run_name))
    run_dst, e_dst = dst.shell.rsync_endpoint(dst.run_dir(run_name))
    ckpt = f"{C.CKPT_DIR}/{step}"
    (scratch / ckpt).mkdir(parents=True, exist_ok=True)
    run(["rsync", "-a", "--partial", *e_src, f"{run_src}/{ckpt}/", f"{scratch}/{ckpt}/"], src.name)
    run(["rsync", "-a", "--ignore-missing-args", "--files-from=-", *e_src, f"{run_src}/", f"{scratch}/"], src.name,
        stdin="".join(f"{n}\n" for n in (C.LOSS_CURVE, C.LOG, C.SPEC)))
    make_dir(dst.shell, dst.run_dir(run_name))
    for extra in ([f"--exclude={C.CKPT_COMPLETE_MARKER}"], []):
        run(["rsync", "-a", "--partial", *extra, *e_dst, f"{scratch}/", f"{run_dst}/"], dst.name)
    return step
