"""rsync over ssh: push the project's code to a box, fetch a run's artifacts, copy checkpoints.

The argv builders are pure; `rsync()` runs one and turns a failure into a one-line error.
"""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from opskit.errors import OpsError
from opskit.ssh_connection import CONNECT_TIMEOUT_S, Address
from opskit.targets.base import TargetUnreachable

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
    argv = ["rsync", "-az", "--delete", "--relative", "--mkpath", "-e", shlex.join(ssh_command(addr))]
    argv += [f"--exclude={p}" for p in CODE_EXCLUDES]
    argv += [f"./{p}" for p in CODE_PATHS if (project_root / p).exists()]
    return argv + [remote(addr, code_dir.rstrip("/") + "/")]


def fetch_argv(addr: Address, run_dir: str, dest: Path) -> list[str]:
    """Copy the files named on stdin (one a line) from run_dir into dest; partial files resume."""
    return ["rsync", "-a", "--partial", "--partial-dir=.rsync-partial", "--files-from=-",
            "-e", shlex.join(ssh_command(addr)), remote(addr, run_dir.rstrip("/") + "/"), str(dest) + "/"]


def copy_dir_argv(src: str, dest: str, addr: Address | None) -> list[str]:
    """Mirror a directory (a checkpoint) between here and a box; `src`/`dest` already carry host: prefixes."""
    argv = ["rsync", "-a", "--partial", "--mkpath"]
    if addr is not None:
        argv += ["-e", shlex.join(ssh_command(addr))]
    return argv + [src.rstrip("/") + "/", dest.rstrip("/") + "/"]


def rsync(argv: list[str], addr: Address, cwd: Path | None = None, stdin: str | None = None,
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
