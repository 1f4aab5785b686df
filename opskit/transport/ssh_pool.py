"""The fallback way to a box: paramiko (through fabric, for ~/.ssh/config and auth) with one
authenticated transport per box kept for this process; threads open their own channels on it.
Used where OpenSSH's shared connections (ssh_mux.py) are unavailable. Imported only then: paramiko
costs ~0.2 CPU-s to import."""
from __future__ import annotations

import codecs
import logging
import os
import select
import socket
import threading
import time
from typing import Callable, Iterator

import paramiko
from fabric import Connection

from opskit.errors import TargetUnreachable
from opskit.transport import Result
from opskit.transport.ssh import CONNECT_TIMEOUT_S, REMOTE_ENV, Address


class _Pooled:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conn: Connection | None = None


# paramiko logs a failed handshake (a port that sends no SSH banner) as a 20-line traceback on stderr;
# the TargetUnreachable raised here says it in one line.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
logging.getLogger("paramiko").propagate = False

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
        transport = conn.client.get_transport()
        if transport is None or not transport.remote_version:  # the port never spoke SSH
            raise TargetUnreachable(f"{addr} unreachable: Connection timed out during banner exchange "
                                    f"(no SSH banner within {CONNECT_TIMEOUT_S:g}s)") from None
        raise TargetUnreachable(f"{addr} unreachable: {_one_line(e)}") from None
    conn.transport.set_keepalive(15)
    return conn


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]


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


def close_all() -> None:
    """Close every pooled connection (the next command connects afresh)."""
    with _pool_lock:
        slots = list(_pool.values())
        _pool.clear()
    for slot in slots:
        with slot.lock:
            if slot.conn is not None:
                slot.conn.close()
                slot.conn = None


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
                raise TargetUnreachable(f"{addr} unreachable: {_one_line(e)}") from None
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
        raise TargetUnreachable(f"{addr}: connection lost during command: {_one_line(e)}") from None
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
        raise TargetUnreachable(f"{addr}: connection lost while streaming: {_one_line(e)}") from None
    finally:
        chan.close()
