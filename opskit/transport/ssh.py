"""A box over SSH as a Shell: commands through OpenSSH's shared connection to the box (ssh_mux.py:
one master per box and user, kept across opskit processes), or, where that is unavailable, through
this process's paramiko pool (ssh_pool.py); files with rsync over OpenSSH (through the master too).

Connection failures become `TargetUnreachable`. Every command is sent with `SHLVL=1` (needs
`AcceptEnv SHLVL` on the server): bash then skips ~/.bashrc for non-interactive ssh commands, which
saves ~140 ms where it runs `pyenv init`.
"""
from __future__ import annotations

import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from opskit.errors import OpsError
from opskit.transport import Result, Shell, quote, rsync, ssh_mux

CONNECT_TIMEOUT_S = 5.0
REMOTE_ENV = {"SHLVL": "1"}


@dataclass(frozen=True)
class Address:
    """Where a box is and who we are there. `key` is a path; its contents are never read here."""

    host: str
    user: str | None = None
    port: int | None = None
    key: str | None = None
    known_hosts: str | None = None  # extra known_hosts file (tests); None: the user's

    def __str__(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.host}{':' + str(self.port) if self.port else ''}"


def parse_ssh(spec: str) -> tuple[str | None, str, int | None]:
    """'USER@HOST[:PORT]' -> (user, host, port); HOST may be an ~/.ssh/config alias or [IPv6]."""
    m = re.fullmatch(r"(?:([^@\s]+)@)?(\[[^\]]+\]|[^:@\s\[\]]+)(?::(\d+))?", spec.strip())
    if not m:
        raise OpsError(f"bad --ssh '{spec}': expected USER@HOST[:PORT], e.g. ubuntu@203.0.113.7:22")
    user, host, port = m.groups()
    return user, host.strip("[]"), int(port) if port else None


def key_path(option: str) -> str:
    """The absolute path of an SSH private key given to --key (its contents are never read)."""
    key = Path(option).expanduser()
    if not key.is_file():
        raise OpsError(f"--key {option}: no such file here (give the private key's path)")
    return str(key.resolve())


def openssh_argv(addr: Address) -> list[str]:
    """`ssh` and its options for `addr` (no destination): batch mode, connect timeout, SHLVL=1."""
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


_muxes: dict[Address, ssh_mux.Mux | None] = {}
_muxes_lock = threading.Lock()


def _mux_of(addr: Address) -> ssh_mux.Mux | None:
    with _muxes_lock:
        if addr not in _muxes:
            directory = ssh_mux.socket_dir() if ssh_mux.available() else None
            host = f"{addr.user + '@' if addr.user else ''}{addr.host}"
            _muxes[addr] = ssh_mux.Mux(openssh_argv(addr), host, str(addr), directory) if directory else None
        return _muxes[addr]


def shared_connection(addr: Address) -> ssh_mux.Mux | None:
    """The box's shared OpenSSH connection, started if needed; None where it cannot be used (then
    this process's paramiko pool serves the box). Raises TargetUnreachable if the box cannot be reached."""
    mux = _mux_of(addr)
    if mux is None:
        return None
    try:
        mux.ensure()
    except ssh_mux.MuxUnavailable:
        with _muxes_lock:
            _muxes[addr] = None
        return None
    return mux


def stop_shared_connection(addr: Address) -> None:
    """Stop the box's shared connection, if one runs (the next command, in any process, starts anew)."""
    mux = _mux_of(addr)
    if mux is not None:
        mux.stop()


def run(addr: Address, command: str, stdin: str | None = None, timeout: float = 60,
        on_line: Callable[[str], None] | None = None, label: str | None = None) -> Result:
    """Run a shell command on the box and wait for it (at most `timeout` seconds).

    With `on_line`, stdout lines are also passed on as they arrive (prepare's progress)."""
    mux = shared_connection(addr)
    if mux is not None:
        return mux.run(command, stdin=stdin, timeout=timeout, on_line=on_line, label=label)
    from opskit.transport import ssh_pool
    return ssh_pool.run(addr, command, stdin=stdin, timeout=timeout, on_line=on_line, label=label)


def stream(addr: Address, command: str) -> Iterator[str]:
    """Yield the command's stdout as it arrives until it exits; closing the generator stops it."""
    mux = shared_connection(addr)
    if mux is not None:
        return mux.stream(command)
    from opskit.transport import ssh_pool
    return ssh_pool.stream(addr, command)


def close_all() -> None:
    """Stop the shared connections this process used and close its pooled ones: the next command
    connects afresh (benchmarks measure a cold start this way)."""
    with _muxes_lock:
        muxes = [m for m in _muxes.values() if m is not None]
        _muxes.clear()
    for mux in muxes:
        mux.stop()
    if "opskit.transport.ssh_pool" in sys.modules:
        sys.modules["opskit.transport.ssh_pool"].close_all()


class SSHShell(Shell):
    """One box reached as `address`; `$HOME` there is asked once per process."""

    local = False
    _homes: dict[Address, str] = {}
    _homes_lock = threading.Lock()

    def __init__(self, address: Address):
        self.address = address

    def __str__(self) -> str:
        return str(self.address)

    def run(self, argv: list[str] | str, stdin: str | None = None, timeout: float = 60,
            on_line: Callable[[str], None] | None = None, env: dict[str, str] | None = None,
            label: str | None = None) -> Result:
        command = argv if isinstance(argv, str) else quote(argv)
        if env:
            command = " ".join(f"{k}={quote([v])}" for k, v in env.items()) + " " + command
        return run(self.address, command, stdin=stdin, timeout=timeout, on_line=on_line, label=label)

    def stream(self, argv: list[str]) -> Iterator[str]:
        return stream(self.address, quote(argv))

    def fetch(self, src_dir: str, names: list[str], dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        rsync.run(rsync.fetch_argv(self, src_dir, dest), str(self), stdin="".join(f"{n}\n" for n in names))

    def expand_home(self, path: str) -> str:
        if path == "~" or path.startswith("~/"):
            return self.home() + path[1:]
        return path

    def home(self) -> str:
        with self._homes_lock:
            if self.address in self._homes:
                return self._homes[self.address]
        home = self.run('printf %s "$HOME"', timeout=30).stdout.strip()
        with self._homes_lock:
            self._homes[self.address] = home
        return home

    def rsync_endpoint(self, path: str) -> tuple[str, list[str]]:
        addr = self.address
        host = f"[{addr.host}]" if ":" in addr.host else addr.host
        return f"{addr.user + '@' if addr.user else ''}{host}:{path}", ["-e", quote(self.ssh_argv())]

    def ssh_argv(self) -> list[str]:
        """The `ssh` argv rsync uses: through the shared connection when there is one."""
        mux = shared_connection(self.address)
        return openssh_argv(self.address) + (mux.options() if mux else [])
