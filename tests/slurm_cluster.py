"""A real single-node SLURM for tests (docs: /work/shared/notes/local-slurm.md), as root.

`cluster()` brings one up per test session in a temp dir and tears it down at exit: its own munge
daemon and socket, MariaDB, slurmdbd, slurmctld and slurmd on free ports, accounting on (sacct
works). Every SLURM command must run with `env()` (SLURM_CONF points at this cluster).
`skip_reason()` says why it cannot run here (not root, binaries missing), or None.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "slurmdbd", "mariadbd", "mariadb-install-db", "munged", "sbatch", "sacct",
            "sacctmgr")
APT_PACKAGES = "slurm-wlm slurmdbd munge mariadb-server"
DB_PASS = "opskit-test"


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "a private SLURM cluster needs root (slurmd runs jobs as any user)"
    missing = [b for b in BINARIES if not shutil.which(b) and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        return f"missing {', '.join(missing)}: apt-get install -y {APT_PACKAGES}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="opskit-slurm-"))
        self.dir.chmod(0o755)
        self.node = socket.gethostname().split(".")[0]
        self.name = "opskit"
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "munge.socket"
        self.ports = {k: _free_port() for k in ("ctld", "slurmd", "dbd", "db")}
        self.pid_files: dict[str, Path] = {}

    # -- configuration
    def _write_configs(self) -> None:
        d = self.dir
        for sub in ("state", "spool", "log", "munge", "db"):
            (d / sub).mkdir(exist_ok=True)
        cpus = os.cpu_count() or 1
        mem_mb = max(512, int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20) - 1024)
        auth = f"AuthInfo=socket={self.munge_socket}"
        # cred_expire also delays a requeued job's restart (default 120 s)
        self.conf.write_text("\n".join([
            f"ClusterName={self.name}", f"SlurmctldHost={self.node}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", f"{auth},cred_expire=5",
            f"SlurmctldPort={self.ports['ctld']}", f"SlurmdPort={self.ports['slurmd']}",
            f"StateSaveLocation={d / 'state'}", f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}", f"SlurmdPidFile={d / 'slurmd.pid'}",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={d / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/linux",
            "AccountingStorageType=accounting_storage/slurmdbd", "AccountingStorageHost=localhost",
            f"AccountingStoragePort={self.ports['dbd']}", f"AccountingStoragePass={self.munge_socket}",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "MpiDefault=none", "ReturnToService=2",
            "SwitchType=switch/none", "MailProg=/bin/true", "EnforcePartLimits=ALL",
            "SchedulerParameters=batch_sched_delay=0", "KillWait=10", "MinJobAge=600", "JobRequeue=1",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP", ""]))
        # slurmd refuses unknown cgroup settings on 22.05; none at all works on these machines
        dbd = d / "slurmdbd.conf"
        dbd.write_text("\n".join([
            "AuthType=auth/munge", auth, "DbdHost=localhost", f"DbdPort={self.ports['dbd']}", "SlurmUser=root",
            f"LogFile={d / 'log' / 'slurmdbd.log'}", f"PidFile={d / 'slurmdbd.pid'}",
            "StorageType=accounting_storage/mysql", "StorageHost=127.0.0.1", f"StoragePort={self.ports['db']}",
            "StorageLoc=slurm_acct_db", "StorageUser=slurm", f"StoragePass={DB_PASS}", ""]))
        dbd.chmod(0o600)

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- bring-up, in order: munged -> mariadbd -> slurmdbd -> slurmctld -> cluster -> slurmd
    def start(self) -> None:
        self._write_configs()
        d = self.dir
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._daemon("munged", [_bin("munged"), f"--socket={self.munge_socket}", f"--key-file={key}",
                                f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'log' / 'munged.log'}",
                                f"--seed-file={d / 'munge' / 'seed'}", "--force"], d / "munged.pid")
        self._start_mariadb()
        self._daemon("slurmdbd", [_bin("slurmdbd")], d / "slurmdbd.pid")
        self._wait_port(self.ports["dbd"], "slurmdbd", d / "log" / "slurmdbd.log")
        self._daemon("slurmctld", [_bin("slurmctld"), "-f", str(self.conf)], d / "slurmctld.pid")
        self._wait_port(self.ports["ctld"], "slurmctld", d / "log" / "slurmctld.log")
        self._sh(["sacctmgr", "-i", "add", "cluster", self.name], ok_if="already exists")
        self._daemon("slurmd", [_bin("slurmd"), "-f", str(self.conf)], d / "slurmd.pid")
        self._wait_idle()

    def _start_mariadb(self) -> None:
        data, sock = self.dir / "db", self.dir / "db" / "mysql.sock"
        subprocess.run([_bin("mariadb-install-db"), "--user=root", f"--datadir={data}",
                        "--auth-root-authentication-method=normal"], check=True, capture_output=True, timeout=120)
        log = open(self.dir / "log" / "mariadb.log", "ab")
        subprocess.Popen([_bin("mariadbd"), "--user=root", f"--datadir={data}", f"--socket={sock}",
                          f"--port={self.ports['db']}", "--bind-address=127.0.0.1",
                          f"--pid-file={self.dir / 'mariadb.pid'}", "--skip-name-resolve"],
                         stdout=log, stderr=log, start_new_session=True)
        self.pid_files["mariadbd"] = self.dir / "mariadb.pid"
        self._wait_port(self.ports["db"], "mariadbd", self.dir / "log" / "mariadb.log")
        sql = (f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{DB_PASS}';"
               f"CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '{DB_PASS}';"
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;")
        subprocess.run(["mariadb", f"--socket={sock}", "-uroot", "-e", sql], check=True, capture_output=True,
                       timeout=30)

    def _daemon(self, name: str, argv: list[str], pid_file: Path) -> None:
        proc = subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} did not start: {(proc.stdout + proc.stderr).strip()[-500:]}")
        self.pid_files[name] = pid_file

    def _wait_port(self, port: int, name: str, log: Path, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        tail = log.read_text()[-800:] if log.exists() else "(no log)"
        raise RuntimeError(f"{name} did not listen on {port} within {timeout:.0f}s; log tail:\n{tail}")

    def _wait_idle(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self._sh(["sinfo", "-h", "-N", "-o", "%T"], check=False).strip()
            if state in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.2)
        raise RuntimeError(f"node {self.node} not idle after {timeout:.0f}s (sinfo: {state!r}); "
                           f"see {self.dir / 'log' / 'slurmd.log'}")

    def _sh(self, argv: list[str], check: bool = True, ok_if: str | None = None) -> str:
        proc = subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=60)
        out = proc.stdout + proc.stderr
        if check and proc.returncode != 0 and not (ok_if and ok_if in out):
            raise RuntimeError(f"{' '.join(argv)} failed: {out.strip()[-500:]}")
        return proc.stdout

    def sh(self, *argv: str) -> str:
        """Run a SLURM command against this cluster; its stdout."""
        return self._sh(list(argv))

    # -- teardown: cancel jobs (a running step keeps slurmstepd alive), then stop each daemon by pid
    def stop(self) -> None:
        if (self.dir / "slurmctld.pid").exists():
            self._sh(["scancel", "--full", "--user=root"], check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self._sh(["squeue", "-h"], check=False).strip():
                time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
            pid_file = self.pid_files.pop(name, None)
            if pid_file is not None:
                _stop_pid(pid_file)
        for pid in _stepds(str(self.conf)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _stop_pid(pid_file: Path, timeout: float = 10) -> None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stepds(conf: str) -> list[int]:
    """slurmstepd processes of this cluster (SLURM_CONF=<ours> in their environment)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == "slurmstepd" and \
                    f"SLURM_CONF={conf}".encode() in (entry / "environ").read_bytes():
                out.append(int(entry.name))
        except OSError:
            pass
    return out


_cluster: SlurmCluster | None = None


def cluster() -> SlurmCluster:
    """The session's cluster, started on first use and stopped when the test process exits."""
    global _cluster
    if _cluster is None:
        c = SlurmCluster()
        atexit.register(c.cleanup)
        c.start()
        _cluster = c
    return _cluster


if __name__ == "__main__":  # bring one up by hand: python tests/slurm_cluster.py (stop: ctrl-c or kill PID)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    c = cluster()
    print(f"export SLURM_CONF={c.conf}\n(pid {os.getpid()}: ctrl-c or kill stops it)", flush=True)
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
