"""A private, real OpenSSH server on 127.0.0.1 for tests (docs: /work/shared/notes/local-sshd.md).

`server()` starts one per test session (stopped at exit): generated host and client keys, a free
port, logins for root and for a non-root user this module creates. `stop()`/`start()` take it down
and up again on the same port, as a rebooting box would be.
"""
from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from remote.processes import descendants  # noqa: E402  (standard library only)

SSHD = "/usr/sbin/sshd"
TEST_USER = "opskit-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_user(name: str = TEST_USER) -> pwd.struct_passwd:
    """A login user without a password (`*`: sshd with UsePAM no refuses a locked `!` account)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True, capture_output=True)
        subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True)
        return pwd.getpwnam(name)


class SSHServer:
    def __init__(self) -> None:
        if not Path(SSHD).exists():
            raise RuntimeError(f"{SSHD} missing: apt-get install -y openssh-server")
        self.dir = Path(tempfile.mkdtemp(prefix="opskit-sshd-"))
        self.dir.chmod(0o755)  # the non-root user's session reads authorized_keys from here
        self.port = free_port()
        self.key = self.dir / "client_ed25519"
        self.known_hosts = self.dir / "known_hosts"
        self.log = self.dir / "sshd.log"
        self.pid_file = self.dir / "sshd.pid"
        self.config = self.dir / "sshd_config"
        for key in (self.dir / "host_ed25519", self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        auth = self.dir / "authorized_keys"
        shutil.copyfile(f"{self.key}.pub", auth)
        auth.chmod(0o644)
        self.config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.dir / 'host_ed25519'}",
            f"PidFile {self.pid_file}", f"AuthorizedKeysFile {auth}", "StrictModes no", "UsePAM no",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "Subsystem sftp internal-sftp",
            "AcceptEnv LANG LC_* SHLVL", "MaxSessions 50", "MaxStartups 50:30:100", ""]))
        self.pid: int | None = None

    def start(self) -> None:
        Path("/run/sshd").mkdir(exist_ok=True)
        self.pid_file.unlink(missing_ok=True)  # a killed sshd leaves its pid file: never read the old pid
        subprocess.run([SSHD, "-f", str(self.config), "-E", str(self.log)], check=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.pid = int(self.pid_file.read_text())
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except (OSError, ValueError):
                time.sleep(0.05)
        raise RuntimeError(f"sshd did not come up on port {self.port}; see {self.log}")

    def stop(self) -> None:
        """Kill the listener and every session it forked (as if the box went away)."""
        if self.pid is None:
            return
        for pid in [self.pid, *descendants(self.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pid = None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                time.sleep(0.05)
            except OSError:
                return

    def freeze(self, frozen: bool = True) -> None:
        """SIGSTOP (or SIGCONT) the listener and its sessions: a box that hangs instead of refusing."""
        for pid in [self.pid, *descendants(self.pid)]:
            try:
                os.kill(pid, signal.SIGSTOP if frozen else signal.SIGCONT)
            except ProcessLookupError:
                pass

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def ssh_spec(self, user: str = "root") -> str:
        return f"{user}@127.0.0.1:{self.port}"

    def target_options(self, user: str = "root", workdir: str | None = None, **extra) -> dict:
        """Options for `operations.add_target(..., "ssh", options)` pointing at this server."""
        return {"ssh": self.ssh_spec(user), "key": str(self.key), "known_hosts": str(self.known_hosts),
                "workdir": workdir, **extra}


_server: SSHServer | None = None


def server() -> SSHServer:
    """The session's server, started on first use and stopped when the test process exits."""
    global _server
    if _server is None:
        _server = SSHServer()
        _server.start()
        atexit.register(_server.cleanup)
    elif _server.pid is None:
        _server.start()
    return _server
