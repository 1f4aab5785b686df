"""SLURM targets: one sbatch job per run (docs/targets-slurm.md).

Files move as on the local target (submission on this machine) or as on an SSH target (`--login`:
a login node that shares the workdir's filesystem with the compute nodes). Runs are submitted, not
started: SLURM queues them, so there is no opskit queue here. Status combines one sacct call for
every job of the target with the run directories' heartbeats and exit codes.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

from opskit import slurm_script as S
from opskit.errors import OpsError
from opskit.slurm_client import SlurmClient
from opskit.states import Observation
from opskit.targets.base import Target, TargetUnreachable, quote

TIME_RE = re.compile(r"(\d+-)?\d{1,2}(:\d{2}){0,2}|\d+")
LOG_TAIL_LINES = 5


class SlurmTarget(Target):
    kind = "slurm"
    has_queue = False  # SLURM queues the jobs

    def __init__(self, name: str, config: dict):
        super().__init__(name, config)
        if config.get("login"):
            from opskit.targets.ssh import SSHTarget
            self._via: Target = SSHTarget(name, config)
        else:
            from opskit.targets.local import LocalTarget
            self._via = LocalTarget(name, config)
        address = self._via.address if config.get("login") else None
        self.client = SlurmClient(address, config.get("slurm_conf"))

    @classmethod
    def config_from_options(cls, options: dict) -> dict:
        config: dict = {}
        if options.get("login"):
            from opskit.targets.ssh import parse_ssh
            user, host, port = parse_ssh(options["login"])
            config.update(login=options["login"], host=host, user=user, port=port)
            if options.get("key"):
                key = Path(options["key"]).expanduser()
                if not key.is_file():
                    raise OpsError(f"--key {options['key']}: no such file here (give the private key's path)")
                config["key"] = str(key.resolve())
            config["workdir"] = options.get("workdir") or "~/opskit"
            if options.get("slurm_conf"):  # a path on the login node
                config["slurm_conf"] = options["slurm_conf"]
        else:
            workdir = options.get("workdir")
            if not workdir:  # opskit.operations.add_target gives it one beside state.db
                raise OpsError("a SLURM target on this machine needs --workdir (shared by the compute nodes)")
            if not os.path.isabs(workdir):
                raise OpsError(f"--workdir {workdir}: give an absolute path (shared by the compute nodes)")
            config["workdir"] = workdir
            conf = options.get("slurm_conf") or os.environ.get("SLURM_CONF")
            if conf:
                config["slurm_conf"] = str(Path(conf).resolve())
        for k in ("nodes", "gpus_per_node", "cpus_per_task", "signal_s", "procs_per_run"):
            if options.get(k) is not None:
                if int(options[k]) < (1 if k in ("nodes", "cpus_per_task", "procs_per_run") else 0):
                    raise OpsError(f"--{k.replace('_', '-')} {options[k]} is too small")
                config[k] = int(options[k])
        if options.get("time") is not None and not TIME_RE.fullmatch(str(options["time"])):
            raise OpsError(f"--time {options['time']}: expected HH:MM:SS or D-HH:MM:SS, e.g. 24:00:00")
        for k in ("partition", "account", "qos", "time", "python", "known_hosts", "mem", "constraint"):
            if options.get(k):
                config[k] = str(options[k])
        config["gpus"] = config.get("gpus_per_node", 0)  # per node: torchrun's --nproc_per_node
        return {k: v for k, v in config.items() if v is not None}

    # -- where things are: the same as the local or SSH target that carries the files
    @property
    def workdir(self) -> str:
        return self._via.workdir

    @property
    def code_dir(self) -> str:
        return self._via.code_dir

    @property
    def python(self) -> str:
        return self._via.python

    # -- transport
    def agent(self, args: list[str], stdin: str | None = None, timeout: float = 60) -> str:
        return self._via.agent(args, stdin=stdin, timeout=timeout)

    def agent_stream(self, args: list[str]) -> Iterator[str]:
        return self._via.agent_stream(args)

    def fetch(self, run: str, names: list[str], dest: Path) -> None:
        self._via.fetch(run, names, dest)

    def sync(self) -> None:
        self._via.sync()

    def prepare(self, on_line=print) -> None:
        self._via.prepare(on_line=on_line)
        self.client.run(["sbatch", "--version"])

    def check_movable(self) -> None:
        raise OpsError(f"moving a run to or from a SLURM target ({self.name}) is not supported: "
                       f"resume it on its own target")

    def check(self) -> dict:
        _, out = self.client.run(["sinfo", "-h", "-o", "%P %a %D %T"])
        return {**self._via.check(), "partitions": out.strip().splitlines()}

    def _read(self, rel_paths: list[str]) -> dict[str, str]:
        """The contents of small files under the workdir (absent ones left out), in one round trip."""
        if not rel_paths:
            return {}
        script = ("import json, sys, pathlib\nw = pathlib.Path(sys.argv[1])\nout = {}\n"
                  "for p in sys.argv[2:]:\n    f = w / p\n    if f.is_file():\n        out[p] = f.read_text()\n"
                  "print(json.dumps(out))")
        argv = ["python3", "-c", script, self.workdir, *rel_paths]
        what = f"target {self.name}: python3 reading run files"
        if self.config.get("login"):
            res = self._via._sh(quote(argv), timeout=60)
            code, out, err = res.exit_code, res.stdout, res.stderr
        else:
            import subprocess
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            except subprocess.TimeoutExpired:
                raise TargetUnreachable(f"{what} timed out after 60s") from None
            except OSError as e:
                raise OpsError(f"{what} cannot start: {e}") from None
            code, out, err = proc.returncode, proc.stdout, proc.stderr
        if code != 0:
            raise OpsError(f"{what} failed (exit {code}): {(err.strip().splitlines() or [''])[-1][-300:]}")
        import json
        try:
            return json.loads(out)
        except ValueError:
            raise OpsError(f"{what} answered unexpectedly: {out.strip()[:300]!r}") from None

    # -- runs
    def dry_run_script(self, run: str, command: list[str], attempt: int = 1) -> str:
        """The sbatch script `start` would submit (launch --dry-run prints it)."""
        return S.sbatch_script(run, self.run_dir(run), self.code_dir, command, self.trainer_env(attempt),
                               self.config)

    def start(self, run: str, command: list[str], attempt: int, extra_env: dict | None = None) -> dict:
        """Write the sbatch script into the run's slurm/ folder and submit it; the job id."""
        env = {**self.trainer_env(attempt), **(extra_env or {})}
        script = S.sbatch_script(run, self.run_dir(run), self.code_dir, command, env, self.config)
        rel = f"runs/{run}/{S.SLURM_DIR}"
        self.agent_json(["write", "--workdir", self.workdir, "--path", f"{rel}/sbatch.sh"], stdin=script)
        job_id = self.client.submit(f"{self.run_dir(run)}/{S.SLURM_DIR}/sbatch.sh")
        self.agent_json(["write", "--workdir", self.workdir, "--path", f"{rel}/job_id"], stdin=job_id + "\n")
        return {"job_id": job_id}

    def job_ids(self, runs: list[str]) -> dict[str, str]:
        files = self._read([f"runs/{r}/{S.SLURM_DIR}/job_id" for r in runs])
        out = {}
        for r in runs:
            text = files.get(f"runs/{r}/{S.SLURM_DIR}/job_id", "").strip()
            if text:
                out[r] = text
        return out

    def observe(self, runs: list[str]) -> dict[str, Observation]:
        """Run directories (one agent call) plus every job's SLURM state (one sacct call)."""
        if not runs:
            return {}
        answer = self.agent_json(["observe", *runs, "--workdir", self.workdir])
        ids = self.job_ids(runs)
        jobs = self.client.jobs(sorted(set(ids.values())))
        out = {}
        for run in runs:
            job = jobs.get(ids.get(run, ""))
            tail = None
            if job is not None and job.state in S.ENDED and job.state not in ("COMPLETED", "CANCELLED"):
                tail = self.log_tail(run)
            elif job is not None and job.state == "COMPLETED" and answer["runs"][run]["exit_code"]:
                tail = self.log_tail(run)
            out[run] = S.observation(answer["runs"][run], job, answer["now"], tail)
        return out

    def log_tail(self, run: str, lines: int = LOG_TAIL_LINES) -> str:
        text = self.agent(["tail", "--workdir", self.workdir, "--run", run, "--lines", str(lines + 1)])
        kept = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("=== opskit")]
        return " | ".join(kept[-lines:])

    def signal(self, run: str, sig: str = "TERM") -> dict:
        """TERM (opskit cancel): a waiting job is scancelled; a running one gets USR1 (the trainer
        checkpoints and exits) and a marker that keeps it from being requeued. KILL: scancel."""
        job_id = self.job_ids([run]).get(run)
        if job_id is None:
            return {"signalled": False, "reason": "no SLURM job recorded"}
        job = self.client.jobs([job_id]).get(job_id)
        state = job.state if job else "PENDING"
        if state in S.ENDED:
            return {"signalled": False, "reason": f"SLURM job {job_id} already {state}", "job_id": job_id}
        if sig == "KILL" or state in S.WAITING:
            self.client.cancel(job_id)
            return {"signalled": False, "scancelled": True, "job_id": job_id}
        self.agent_json(["write", "--workdir", self.workdir, "--path", f"runs/{run}/{S.SLURM_DIR}/{S.CANCEL_MARKER}"],
                        stdin=job_id + "\n")
        if not self.client.signal(job_id, "USR1"):
            self.client.cancel(job_id)
        return {"signalled": True, "job_id": job_id, "signal": "USR1"}

    # -- SLURM's own queue stands in for opskit's
    def queue_state(self, ensure: bool = False) -> dict:
        _, out = self.client.run(["squeue", "-h", "-o", "%i|%j|%T|%r"])
        running, pending = [], []
        for line in out.splitlines():
            job_id, name, state, reason = (line.split("|") + ["", "", ""])[:4]
            if not name.startswith("opskit:"):
                continue
            entry = {"run": name[len("opskit:"):], "job_id": job_id, "state": state, "waiting": reason}
            (running if state in S.RUNNING else pending).append(entry)
        for i, e in enumerate(pending, 1):
            e["position"] = i
        return {"running": running, "pending": pending, "finished": []}

    def enqueue(self, *args, **kwargs) -> dict:
        raise OpsError(f"{self.name} is a SLURM target: runs are submitted to SLURM, not queued by opskit")
