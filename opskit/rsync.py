"""rsync over ssh: push the project's code to a box, fetch a run's artifacts, copy checkpoints.

The argv builders are pure; `rsync()` runs one and turns a failure into a one-line error.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

from opskit.errors import OpsError
from opskit import ssh_connection
from opskit.ssh_connection import CONNECT_TIMEOUT_S, Address
from opskit.targets.base import TargetUnreachable
from train import contract as C

# What a box needs to run the trainer; never results/, caches, checkpoints, state.db, .git, venvs.
CODE_PATHS = ("opskit", "train", "remote", "configs", "pyproject.toml")
CODE_EXCLUDES = ("__pycache__/", "*.pyc", "*.egg-info/", ".pytest_cache/", "ckpt/", "*.pt", "*.safetensors",
                 "*.bin", "state.db*")
RSYNC_UNREACHABLE = (255, 12, 30, 35)  # ssh failed / protocol stream / io timeout / daemon timeout


def ssh_command(addr: Address) -> list[str]:
    """The `ssh` argv rsync uses (-e): batch mode, connect timeout, SHLVL=1 like our own commands."""
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(CONNECT_TIMEOUT_S)}",
           "-o", "ServerAliveInterval=15", "-o", "SetEnv=SHLVL=1"]
    if addr.port:
        cmd += ["-p", str(addr.port)]
    if addr.key:
        cmd += ["-i", os.path.expanduser(addr.key)]
    # A new box's host key is accepted and remembered (as fabric's AutoAddPolicy does); a changed one is refused.
    cmd += ["-o", "StrictHostKeyChecking=accept-new"]
    if addr.known_hosts:
        cmd += ["-o", f"UserKnownHostsFile={addr.known_hosts}"]
    return cmd


def remote(addr: Address, path: str) -> str:
    host = f"[{addr.host}]" if ":" in addr.host else addr.host
    return f"{addr.user + '@' if addr.user else ''}{host}:{path}"


def sync_code_argv(addr: Address, project_root: Path, code_dir: str) -> list[str]:
    """Mirror CODE_PATHS into code_dir (--delete inside them only; pip's egg-info beside them stays)."""
    argv = ["rsync", "-az", "--delete", "--relative", "-e", shlex.join(ssh_command(addr))]
    argv += [f"--exclude={p}" for p in CODE_EXCLUDES]
    argv += [f"./{p}" for p in CODE_PATHS if (project_root / p).exists()]
    return argv + [remote(addr, code_dir.rstrip("/") + "/")]


def fetch_argv(addr: Address, run_dir: str, dest: Path) -> list[str]:
    """Copy the files named on stdin (one a line) from run_dir into dest; partial files resume."""
    return ["rsync", "-a", "--partial", "--partial-dir=.rsync-partial", "--files-from=-",
            "-e", shlex.join(ssh_command(addr)), remote(addr, run_dir.rstrip("/") + "/"), str(dest) + "/"]


def rsync(argv: list[str], addr: Address | str, cwd: Path | None = None, stdin: str | None = None,
          timeout: float = 3600) -> None:
    try:
        proc = subprocess.run(argv, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TargetUnreachable(f"{addr}: rsync timed out after {timeout:.0f}s") from None
    if proc.returncode == 0:
        return
    why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit code {proc.returncode}"
    if "rsync: command not found" in proc.stderr or "rsync: not found" in proc.stderr:
        raise OpsError(f"{addr}: rsync is missing on the box; install it there (apt-get install rsync)")
    if proc.returncode in RSYNC_UNREACHABLE:
        raise TargetUnreachable(f"{addr} unreachable (rsync): {why}")
    raise OpsError(f"{addr}: rsync failed: {why}")


# ------------------------------------------------------------------ moving a run between targets


def endpoint(target, path: str) -> tuple[str, list[str]]:
    """rsync's name for a path on a target, and the `-e` option it needs (none on this machine)."""
    addr = getattr(target, "address", None)
    if addr is None:
        return path, []
    return remote(addr, path), ["-e", shlex.join(ssh_command(addr))]


def make_dir(target, path: str) -> None:
    """mkdir -p on a target (rsync's --mkpath needs rsync >= 3.2.3 on the box; Ubuntu 20.04 has 3.1.3)."""
    addr = getattr(target, "address", None)
    if addr is None:
        Path(path).mkdir(parents=True, exist_ok=True)
        return
    res = ssh_connection.run(addr, f"mkdir -p {shlex.quote(path)}", timeout=60)
    if res.exit_code != 0:
        raise OpsError(f"{addr}: cannot create {path}: {res.stderr.strip()[-200:]}")


def latest_checkpoint(target, run: str) -> str | None:
    """Name (step_<N>) of the run's newest checkpoint holding the `.complete` marker, or None."""
    src, e = endpoint(target, f"{target.run_dir(run)}/{C.CKPT_DIR}/")
    argv = ["rsync", "-r", "--list-only", *e, "--include=step_*/", f"--include=step_*/{C.CKPT_COMPLETE_MARKER}",
            "--exclude=*", src]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise TargetUnreachable(f"{target.name}: listing the checkpoints of {run} timed out after 120s") from None
    if proc.returncode == 23 and "No such file" in proc.stderr:
        return None
    if proc.returncode != 0:
        rsync(argv, target.name)  # raises with rsync's reason
    steps = [int(m.group(1)) for line in proc.stdout.splitlines()
             if (m := re.search(rf"step_(\d+)/{re.escape(C.CKPT_COMPLETE_MARKER)}$", line))]
    return f"step_{max(steps)}" if steps else None


def copy_run_for_resume(src, dst, run: str, scratch: Path) -> str:
    """Copy the newest complete checkpoint of `run` (plus its loss curve, log and spec) from target `src`
    to target `dst` through `scratch` on this machine. `.complete` goes last: an interrupted copy never
    looks like a checkpoint. Returns the step directory's name."""
    src.check_movable()
    dst.check_movable()
    step = latest_checkpoint(src, run)
    if step is None:
        raise OpsError(f"{run} has no complete checkpoint on {src.name} to resume from")
    run_src, e_src = endpoint(src, src.run_dir(run))
    run_dst, e_dst = endpoint(dst, dst.run_dir(run))
    ckpt = f"{C.CKPT_DIR}/{step}"
    (scratch / ckpt).mkdir(parents=True, exist_ok=True)
    rsync(["rsync", "-a", "--partial", *e_src, f"{run_src}/{ckpt}/", f"{scratch}/{ckpt}/"], src.name)
    rsync(["rsync", "-a", "--ignore-missing-args", "--files-from=-", *e_src, f"{run_src}/", f"{scratch}/"], src.name,
          stdin="".join(f"{n}\n" for n in (C.LOSS_CURVE, C.LOG, C.SPEC)))
    make_dir(dst, dst.run_dir(run))
    for extra in ([f"--exclude={C.CKPT_COMPLETE_MARKER}"], []):
        rsync(["rsync", "-a", "--partial", *extra, *e_dst, f"{scratch}/", f"{run_dst}/"], dst.name)
    return step
