"""SSH targets: rented boxes reached over ssh. Code lives at <workdir>/code, synced with rsync;
every run operation is `python3 <code>/remote/agent.py ...` over one reused connection."""
from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Iterator

from opskit import rsync, ssh_connection
from opskit.errors import OpsError
from opskit.ssh_connection import Address
from opskit.targets.base import Target, quote

DEFAULT_WORKDIR = "~/opskit"
PREPARE_TIMEOUT_S = 3 * 3600  # a cold box downloads torch

_homes: dict[Address, str] = {}  # $HOME per box, resolved once per process
_homes_lock = threading.Lock()


def parse_ssh(spec: str) -> tuple[str | None, str, int | None]:
    """'USER@HOST[:PORT]' -> (user, host, port); HOST may be an ~/.ssh/config alias or [IPv6]."""
    m = re.fullmatch(r"(?:([^@\s]+)@)?(\[[^\]]+\]|[^:@\s\[\]]+)(?::(\d+))?", spec.strip())
    if not m:
        raise OpsError(f"bad --ssh '{spec}': expected USER@HOST[:PORT], e.g. ubuntu@203.0.113.7:22")
    user, host, port = m.groups()
    return user, host.strip("[]"), int(port) if port else None


class SSHTarget(Target):
    kind = "ssh"

    def __init__(self, name: str, config: dict):
        super().__init__(name, config)
        self._synced = False

    @classmethod
    def config_from_options(cls, options: dict) -> dict:
        if not options.get("ssh"):
            raise OpsError("an ssh target needs --ssh USER@HOST[:PORT]")
        user, host, port = parse_ssh(options["ssh"])
        config: dict = {"host": host, "user": user, "port": port}
        if options.get("key"):
            key = Path(options["key"]).expanduser()
            if not key.is_file():
                raise OpsError(f"--key {options['key']}: no such file here (give the private key's path)")
            config["key"] = str(key.resolve())
        workdir = options.get("workdir") or DEFAULT_WORKDIR
        if not (workdir.startswith("/") or workdir == "~" or workdir.startswith("~/")):
            raise OpsError(f"--workdir {workdir}: give an absolute path on the box or one under ~/")
        config["workdir"] = workdir.rstrip("/") or "/"
        for k in ("gpus", "gpus_per_run"):
            if options.get(k) is not None:
                if int(options[k]) < 0:
                    raise OpsError(f"--{k.replace('_', '-')} must be >= 0")
                config[k] = int(options[k])
        config.setdefault("gpus", 0)
        if config.get("gpus_per_run") and config["gpus_per_run"] > config["gpus"]:
            raise OpsError(f"--gpus-per-run {config['gpus_per_run']} exceeds --gpus {config['gpus']}")
        # Provisioning knobs (python: the trainer's; base_python: what the venv is made from;
        # agent_python: what runs remote/agent.py, default the box's python3).
        for k in ("python", "base_python", "agent_python", "known_hosts", "torch_index"):
            if options.get(k):
                config[k] = str(options[k])
        for k in ("system_site_packages", "no_install"):
            if options.get(k):
                config[k] = True
        return {k: v for k, v in config.items() if v is not None}

    # -- where things are
    @property
    def address(self) -> Address:
        c = self.config
        return Address(c["host"], c.get("user"), c.get("port"), c.get("key"), c.get("known_hosts"))

    @property
    def workdir(self) -> str:
        wd = self.config["workdir"]
        if wd == "~" or wd.startswith("~/"):
            return self._home() + wd[1:]
        return wd

    def _home(self) -> str:
        addr = self.address
        with _homes_lock:
            if addr in _homes:
                return _homes[addr]
        res = self._sh('printf %s "$HOME"', timeout=30)
        with _homes_lock:
            _homes[addr] = res.stdout.strip()
        return _homes[addr]

    @property
    def code_dir(self) -> str:
        return f"{self.workdir}/code"

    # -- transport
    def _sh(self, command: str, stdin: str | None = None, timeout: float = 60, on_line=None):
        return ssh_connection.run(self.address, command, stdin=stdin, timeout=timeout, on_line=on_line)

    def _agent_command(self, args: list[str]) -> str:
        return f"{self.config.get('agent_python', 'python3')} {quote([*self._agent_argv(), *args])}"

    def agent(self, args: list[str], stdin: str | None = None, timeout: float = 60) -> str:
        res = self._sh(self._agent_command(args), stdin=stdin, timeout=timeout)
        if res.exit_code == 0:
            return res.stdout
        detail = (res.stdout + res.stderr).strip()
        if "remote/agent.py" in detail and "No such file" in detail:
            raise OpsError(f"target {self.name}: opskit's code is not on the box yet; "
                           f"run `opskit targets prepare {self.name}`")
        raise OpsError(f"target {self.name}: agent {args[0]} failed (exit {res.exit_code}): {detail[-500:]}")

    def agent_stream(self, args: list[str]) -> Iterator[str]:
        return ssh_connection.stream(self.address, self._agent_command(args))

    def fetch(self, run: str, names: list[str], dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        rsync.rsync(rsync.fetch_argv(self.address, self.run_dir(run), dest), self.address,
                    stdin="".join(f"{n}\n" for n in names))

    def sync(self) -> None:
        """rsync the project's code to <workdir>/code (once per process: a launch's prepare already did)."""
        if self._synced:
            return
        from opskit.targets.local import PROJECT_ROOT
        rsync.make_dir(self, self.code_dir)
        rsync.rsync(rsync.sync_code_argv(self.address, PROJECT_ROOT, self.code_dir), self.address, cwd=PROJECT_ROOT)
        self._synced = True

    # -- lifecycle
    def prepare(self, on_line=print) -> None:
        """Sync the code, then run remote/prepare.sh on the box, streaming its output to `on_line`."""
        self.sync()
        argv = ["bash", f"{self.code_dir}/remote/prepare.sh", "--workdir", self.workdir, "--code", self.code_dir,
                "--python", self.python, "--gpus", str(self.gpus)]
        if self.config.get("base_python"):
            argv += ["--base-python", self.config["base_python"]]
        if self.config.get("system_site_packages"):
            argv.append("--system-site-packages")
        if self.config.get("no_install"):
            argv.append("--no-install")
        if self.config.get("torch_index"):
            argv += ["--torch-index", self.config["torch_index"]]
        lines: list[str] = []

        def relay(line: str) -> None:
            lines.append(line)
            on_line(line)

        res = self._sh(quote(argv), timeout=PREPARE_TIMEOUT_S, on_line=relay)
        if res.exit_code != 0:
            failed = [ln for ln in lines if ln.startswith("prepare failed at step ")]
            why = failed[-1] if failed else f"prepare.sh exited {res.exit_code}: {res.stderr.strip()[-300:]}"
            raise OpsError(f"target {self.name}: {why}")

    def check(self) -> dict:
        """Reachable (else TargetUnreachable), python3 version, GPUs, free disk in the workdir."""
        wd = self.workdir
        script = (
            "python3 -c 'import sys; print(\"python3=%d.%d.%d\" % sys.version_info[:3])' 2>/dev/null"
            " || echo python3=missing\n"
            "command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version"
            " --format=csv,noheader 2>/dev/null | sed 's/^/gpu=/'\n"
            f"d={quote([wd])}; while [ ! -d \"$d\" ]; do d=$(dirname \"$d\"); done\n"
            "df -Pk \"$d\" | awk 'NR==2 {print \"free_kb=\" $4}'\n"
            f"test -f {quote([wd + '/.prepared'])} && echo prepared=yes || echo prepared=no\n")
        res = self._sh(script, timeout=30)
        facts: dict[str, list[str]] = {}
        for line in res.stdout.splitlines():
            k, _, v = line.partition("=")
            facts.setdefault(k, []).append(v.strip())
        gpus = facts.get("gpu", [])
        free_kb = int(facts.get("free_kb", ["0"])[0] or 0)
        return {"reachable": True, "host": str(self.address), "workdir": wd,
                "python3": facts.get("python3", ["missing"])[0], "gpus": len(gpus),
                "gpu_models": sorted({g.split(",")[0] for g in gpus}),
                "driver": gpus[0].split(",")[-1].strip() if gpus else None,
                "free_disk_gb": round(free_kb / 2**20, 1), "prepared": facts.get("prepared") == ["yes"],
                "configured_gpus": self.gpus}
