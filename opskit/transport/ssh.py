"""A box over SSH as a Shell: commands over one reused connection per host (fabric for ~/.ssh/config
and auth, paramiko channels), files with rsync over OpenSSH.

A process-wide pool keyed by (user, host, port, key) keeps one authenticated transport per box;
threads open their own channels on it. Connection failures become `TargetUnreachable`.
Every command is sent with `SHLVL=1` (needs `AcceptEnv SHLVL` on the server): bash then skips
~/.bashrc for non-interactive ssh commands, which saves ~140 ms where it runs `pyenv init`.
"""
from __future__ import annotations

import codecs
import os
import re
import select
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import paramiko
from fabric import Connection

from opskit.errors import OpsError, TargetUnreachable
from opskit.transport import Result, Shell, quote, rsync

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


class _Pooled:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conn: Connection | None = None


_pool: dict[Address, _Pooled] = {}
_pool_lock = threading.Lock()


def _connect(addr: Address) -> Connection:
    connect_kwargs: dict = {"banner_timeout": CONNECT_TIMEOUT_S, "auth_timeout": CONNECT_TIMEOUT_S}
    if addr.key:
        connect_kwargs["key_filename"] = [os.path.expanduser(addr.key)]
    conn = Connection(addr.host, user=addr.user, port=addr.port, connect_timeout=CONNECT_TIMEOUT_S,
                      connect_kwargs=connect_kwargs, inline_ssh_env=False)
    if addr.known_hosts and os.path.exists(addr.known_hosts):
        conn.client.load_host_keys(addr.known_hosts)
    sock = None
    if conn.gateway is None:  # our own socket, with TCP_NODELAY: ~16 ms per command instead of ~100
        try:
            sock = socket.create_connection((conn.host, conn.port), timeout=CONNECT_TIMEOUT_S)
        except OSError as e:
            raise TargetUnreachable(f"{addr} unreachable: {e.strerror or e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.connect_kwargs["sock"] = sock
    try:
        conn.open()
    except paramiko.AuthenticationException as e:
        raise TargetUnreachable(f"{addr}: authentication failed ({e}); check --key or your ssh agent") from None
    except (paramiko.SSHException, OSError, EOFError) as e:
        if sock is not None:
            sock.close()
        raise TargetUnreachable(f"{addr} unreachable: {e}") from None
    conn.transport.set_keepalive(15)
    return conn


def connection(addr: Address, fresh: bool = False) -> Connection:
    """The pooled, open connection to `addr` (a new one if it is missing, dead, or `fresh`)."""
    with _pool_lock:
        slot = _pool.setdefault(addr, _Pooled())
    with slot.lock:
        if fresh or slot.conn is None or not slot.conn.is_connected:
            if slot.conn is not None:
                slot.conn.close()
            slot.conn = None
            slot.conn = _connect(addr)
        return slot.conn


def _open_channel(addr: Address) -> paramiko.Channel:
    """A session channel; a dead pooled connection is replaced once before giving up."""
    for attempt in (0, 1):
        conn = connection(addr, fresh=attempt == 1)
        try:
            chan = conn.transport.open_session(timeout=CONNECT_TIMEOUT_S)
            chan.update_environment(REMOTE_ENV)
            return chan
        except (paramiko.SSHException, OSError, EOFError) as e:
            if attempt == 1:
                raise TargetUnreachable(f"{addr} unreachable: {e or type(e).__name__}") from None
    raise AssertionError("unreachable")


def run(addr: Address, command: str, stdin: str | None = None, timeout: float = 60,
        on_line: Callable[[str], None] | None = None, label: str | None = None) -> Result:
    """Run a shell command on the box and wait for it (at most `timeout` seconds).

    With `on_line`, stdout lines are also passed on as they arrive (prepare's progress)."""
    chan = _open_channel(addr)
    deadline = time.monotonic() + timeout
    out, err, pending = bytearray(), bytearray(), b""
    try:
        chan.exec_command(command)
        if stdin is not None:
            chan.sendall(stdin.encode())
        chan.shutdown_write()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                what = label or f"command {command[:120]!r}"
                raise TargetUnreachable(f"{addr}: {what} timed out after {timeout:.0f}s")
            select.select([chan], [], [], min(remaining, 1.0))
            got = False
            while chan.recv_ready():
                data = chan.recv(65536)
                out += data
                got = True
                if on_line:
                    pending += data
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        on_line(line.decode(errors="replace"))
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
                got = True
            if not got and chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                break
            if not got and chan.closed:
                break
        if on_line and pending:
            on_line(pending.decode(errors="replace"))
        code = chan.recv_exit_status() if chan.exit_status_ready() else -1
    except (paramiko.SSHException, OSError, EOFError) as e:
        raise TargetUnreachable(f"{addr}: connection lost during command: {e or type(e).__name__}") from None
    finally:
        chan.close()
    return Result(code, out.decode(errors="replace"), err.decode(errors="replace"))


def stream(addr: Address, command: str) -> Iterator[str]:
    """Yield the command's stdout as it arrives until it exits; closing the generator closes the channel."""
    chan = _open_channel(addr)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a chunk may end inside a character
    try:
        chan.exec_command(command)
        chan.shutdown_write()
        while True:
            data = chan.recv(65536)
            if not data:
                return
            yield decoder.decode(data)
    except (paramiko.SSHException, OSError, EOFError) as e:
        raise TargetUnreachable(f"{addr}: connection lost while streaming: {e or type(e).__name__}") from None
    finally:
        chan.close()


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
        """The `ssh` argv rsync uses: batch mode, connect timeout, SHLVL=1 like our own commands."""
        addr = self.address
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
