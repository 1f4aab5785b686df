"""SSH connections that outlive one command: OpenSSH's ControlMaster, one master per box and user,
shared by every opskit process (a second `opskit status` within PERSIST_S pays no handshake).

The master is started on first use (`ssh -M -N -f`, ControlPersist) with its socket in a per-user
directory (0700); each command is then an `ssh` client speaking through that socket (~8 ms of CPU
instead of ~110 ms and a round trip per handshake). Before a process first uses a socket it asks the
master whether it lives (`ssh -O check`); a stale socket is removed and a new master started, under a
file lock so that two processes never start two. Where any of this is unavailable (no `ssh`, no safe
socket directory, OPSKIT_SSH_MUX=0, ssh refusing the socket), `available()` is False or
`MuxUnavailable` is raised and opskit/transport/ssh.py falls back to its paramiko pool.
"""
from __future__ import annotations

import codecs
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from opskit.errors import TargetUnreachable
from opskit.transport import Result

PERSIST_S = int(os.environ.get("OPSKIT_SSH_PERSIST", "600"))  # an idle master exits after this long
# A master notices a box that stopped answering within ~6 s (it exits; the next command starts anew).
KEEPALIVE = ["-o", "ServerAliveInterval=2", "-o", "ServerAliveCountMax=3"]
SSH_EXIT = 255  # ssh's own failure (the remote command's code otherwise)
_MUX_TROUBLE = ("ControlPath", "ControlSocket", "unix_listener", "mux_client", "muxserver", "control socket")
_LOST = ("closed by remote host", "Connection closed", "Broken pipe", "server not responding", "Connection reset",
         "Control socket connect", "mux_client", "connection lost")
_MEANINGFUL = ("Permission denied", "banner exchange", "Host key verification failed", "REMOTE HOST IDENTIFICATION",
               "Connection refused", "Could not resolve", "No route to host", "Network is unreachable", "timed out")


class MuxUnavailable(Exception):
    """Shared connections cannot be used here; the caller uses its own connection instead."""


def socket_dir() -> Path | None:
    """This user's directory for master sockets, created 0700; None if it is not safely ours."""
    if os.environ.get("OPSKIT_SSH_DIR"):
        path = Path(os.environ["OPSKIT_SSH_DIR"])
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "opskit-ssh"
    else:
        path = Path(tempfile.gettempdir()) / f"opskit-ssh-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
    except OSError:
        return None
    if not path.is_dir() or path.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None  # someone else's, or open to others: a socket there could be theirs
    return path


def available() -> bool:
    return os.environ.get("OPSKIT_SSH_MUX", "1") != "0" and shutil.which("ssh") is not None \
        and socket_dir() is not None


class Mux:
    """The shared connection to one box: `base` is the ssh argv (options, no destination), `dest`
    [user@]host, `label` how errors name the box."""

    def __init__(self, base: list[str], dest: str, label: str, directory: Path):
        self.base, self.dest, self.label = list(base), dest, label
        digest = hashlib.sha256("\0".join([*base, dest]).encode()).hexdigest()[:20]
        self.path = directory / digest  # short: a unix socket path has at most 107 bytes
        self._checked = False
        self._lock = threading.Lock()

    def options(self) -> list[str]:
        """ssh options that use the running master (rsync's `-e ssh ...` too)."""
        return ["-o", f"ControlPath={self.path}", "-o", "ControlMaster=no"]

    def ensure(self) -> None:
        """A live master for this box: checked once per process, started (or replaced) as needed."""
        with self._lock:
            if self._checked and self.path.exists():
                return
            with open(f"{self.path}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one starter at a time, across processes
                if not self._alive():
                    self.path.unlink(missing_ok=True)  # stale: its master is gone
                    self._start()
            self._checked = True

    def forget(self) -> None:
        """The master seemed gone: check (and restart) it before the next command."""
        self._checked = False

    def _alive(self) -> bool:
        if not self.path.exists():
            return False
        check = subprocess.run([*self.base, "-o", f"ControlPath={self.path}", "-O", "check", self.dest],
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
        return check.returncode == 0

    def _start(self) -> None:
        # ssh takes an option's first value: the keepalive goes before the base options' own
        argv = [self.base[0], *KEEPALIVE, *self.base[1:], "-o", f"ControlPath={self.path}", "-o", "ControlMaster=yes",
                "-o", f"ControlPersist={PERSIST_S}", "-N", "-f", self.dest]
        with tempfile.TemporaryFile("w+") as err:  # never a pipe: the master would hold it open
            try:
                code = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                      timeout=30).returncode
            except subprocess.TimeoutExpired:
                raise TargetUnreachable(f"{self.label} unreachable: no SSH session after 30s") from None
            except OSError as e:
                raise MuxUnavailable(str(e)) from None
            err.seek(0)
            text = err.read()
        if code == 0 and self.path.exists():
            return
        if any(word in text for word in _MUX_TROUBLE) or (code == 0 and not self.path.exists()):
            raise MuxUnavailable(text.strip() or "no control socket")
        raise unreachable(self.label, text)

    def argv(self, command: str) -> list[str]:
        return [*self.base, *self.options(), self.dest, command]

    def run(self, command: str, stdin: str | None = None, timeout: float = 60,
            on_line: Callable[[str], None] | None = None, label: str | None = None) -> Result:
        self.ensure()
        what = label or f"command {command[:120]!r}"
        try:
            if on_line is None:
                proc = subprocess.run(self.argv(command), input=stdin if stdin is not None else "",
                                      capture_output=True, text=True, timeout=timeout, errors="replace")
                code, out, err = proc.returncode, proc.stdout, proc.stderr
            else:
                code, out, err = self._run_lines(command, stdin, timeout, on_line)
        except subprocess.TimeoutExpired:
            raise TargetUnreachable(f"{self.label}: {what} timed out after {timeout:.0f}s") from None
        if code == SSH_EXIT and any(word in err for word in _LOST):
            self.forget()
            raise TargetUnreachable(f"{self.label}: connection lost during command: {_last_line(err)}")
        if code == SSH_EXIT and any(word in _last_line(err) for word in _MEANINGFUL):  # the master had gone
            self.forget()  # and ssh could not connect on its own either (refused, no banner, ...)
            raise unreachable(self.label, err)
        return Result(code, out, _without_notes(err))

    def _run_lines(self, command: str, stdin: str | None, timeout: float,
                   on_line: Callable[[str], None]) -> tuple[int, str, str]:
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(self.argv(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                    text=True, errors="replace")
            fired = threading.Event()

            def kill() -> None:
                fired.set()
                proc.kill()

            timer = threading.Timer(timeout, kill)
            timer.start()
            try:
                proc.stdin.write(stdin or "")
                proc.stdin.close()
                out = []
                for line in proc.stdout:
                    out.append(line)
                    on_line(line.rstrip("\n"))
                code = proc.wait()
            finally:
                timer.cancel()
            if fired.is_set():
                raise subprocess.TimeoutExpired(command, timeout)
            err.seek(0)
            return code, "".join(out), err.read()

    def stream(self, command: str) -> Iterator[str]:
        """The command's stdout as it arrives; closing the generator stops the ssh client."""
        self.ensure()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        proc = subprocess.Popen(self.argv(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        try:
            while data := os.read(proc.stdout.fileno(), 65536):
                yield decoder.decode(data)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()

    def stop(self) -> None:
        """Ask the master to exit (the next command starts a new one)."""
        if self.path.exists():
            subprocess.run([*self.base, "-o", f"ControlPath={self.path}", "-O", "exit", self.dest],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
        self._checked = False


def unreachable(label: str, stderr: str) -> TargetUnreachable:
    """ssh's own words, on one line: authentication, refused, no banner, unknown host key..."""
    line = _last_line(stderr)
    if "Permission denied" in line:
        return TargetUnreachable(f"{label}: authentication failed ({line}); check --key or your ssh agent")
    line = line.removeprefix("ssh: ")
    if line.startswith("connect to host"):
        line = line.rsplit(": ", 1)[-1]
    return TargetUnreachable(f"{label} unreachable: {line}")


def _without_notes(stderr: str) -> str:
    """stderr without ssh's own notes (a host key added, a stale socket); the command's stays."""
    keep = [ln for ln in stderr.splitlines(keepends=True)
            if not ln.startswith("Warning: Permanently added") and "Control socket connect" not in ln]
    return "".join(keep)


def _last_line(stderr: str) -> str:
    lines = [ln.strip() for ln in _without_notes(stderr).splitlines() if ln.strip()]
    for word in _MEANINGFUL:
        for ln in lines:
            if word in ln:
                return ln
    return lines[-1] if lines else "ssh failed without a message"
