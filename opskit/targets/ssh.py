"""SSH targets: rented boxes reached over ssh (opskit/transport/ssh.py). Code lives at
<workdir>/code, synced with rsync; every run operation is `python3 <code>/remote/agent.py ...` over
one reused connection; remote/prepare.sh makes the trainer's venv."""
from __future__ import annotations

from opskit.errors import OpsError
from opskit.targets.base import Target
from opskit.transport.ssh import key_path, parse_ssh

DEFAULT_WORKDIR = "~/opskit"


class SSHTarget(Target):
    kind = "ssh"

    @classmethod
    def config_from_options(cls, options: dict) -> dict:
        if not options.get("ssh"):
            raise OpsError("an ssh target needs --ssh USER@HOST[:PORT]")
        user, host, port = parse_ssh(options["ssh"])
        config: dict = {"host": host, "user": user, "port": port}
        if options.get("key"):
            config["key"] = key_path(options["key"])
        workdir = options.get("workdir") or DEFAULT_WORKDIR
        if not (workdir.startswith("/") or workdir == "~" or workdir.startswith("~/")):
            raise OpsError(f"--workdir {workdir}: give an absolute path on the box or one under ~/")
        config["workdir"] = workdir.rstrip("/") or "/"
        for k in ("gpus", "gpus_per_run", "max_parallel"):
            if options.get(k) is not None:
                if int(options[k]) < (1 if k == "max_parallel" else 0):
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
