"""SLURM targets: one sbatch job per run (docs/targets-slurm.md).

The shell is this machine's (submission here) or a login node's over SSH (`--login`; it shares the
workdir's filesystem with the compute nodes); SLURM's commands go through the same shell
(client.py). Runs are submitted, not queued by opskit: SLURM queues them. Status combines one sacct
call for every job of the target with the run directories' heartbeats and exit codes.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from opskit.errors import OpsError
from opskit.states import Observation
from opskit.targets.base import Submission, Target
from opskit.targets.slurm import script as S
from opskit.targets.slurm.client import SlurmClient
from opskit.transport.ssh import key_path, parse_ssh
from train import contract as C

TIME_RE = re.compile(r"(\d+-)?\d{1,2}(:\d{2}){0,2}|\d+")
LOG_TAIL_LINES = 5


class SlurmTarget(Target):
    kind = "slurm"
    rendezvous_port = None  # one job per run: torchrun's own rendezvous inside the allocation

    def __init__(self, name: str, config: dict, shell=None):
        super().__init__(name, config, shell)
        self.client = SlurmClient(self.shell, config.get("slurm_conf"))

    @classmethod
    def config_from_options(cls, options: dict) -> dict:
        config: dict = {}
        if options.get("login"):
            user, host, port = parse_ssh(options["login"])
            config.update(login=options["login"], host=host, user=user, port=port)
            if options.get("key"):
                config["key"] = key_path(options["key"])
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

    def prepare(self, on_line=print) -> None:
        super().prepare(on_line=on_line)
        self.client.run(["sbatch", "--version"])

    def check_movable(self) -> None:
        raise OpsError(f"moving a run to or from a SLURM target ({self.name}) is not supported: "
                       f"resume it on its own target")

    def check(self) -> dict:
        _, out = self.client.run(["sinfo", "-h", "-o", "%P %a %D %T"])
        return {**super().check(), "partitions": out.strip().splitlines()}

    def _read(self, rel_paths: list[str]) -> dict[str, str]:
        """The contents of small files under the workdir (absent ones left out), in one round trip."""
        if not rel_paths:
            return {}
        script = ("import json, sys, pathlib\nw = pathlib.Path(sys.argv[1])\nout = {}\n"
                  "for p in sys.argv[2:]:\n    f = w / p\n    if f.is_file():\n        out[p] = f.read_text()\n"
                  "print(json.dumps(out))")
        argv = ["python3", "-c", script, self.workdir, *rel_paths]
        what = f"target {self.name}: python3 reading run files"
        try:
            res = self.shell.run(argv, timeout=60)
        except OpsError as e:
            raise type(e)(f"{what}: {e}") from None
        if res.exit_code != 0:
            last = (res.stderr.strip().splitlines() or [''])[-1][-300:]
            raise OpsError(f"{what} failed (exit {res.exit_code}): {last}")
        try:
            return json.loads(res.stdout)
        except ValueError:
            raise OpsError(f"{what} answered unexpectedly: {res.stdout.strip()[:300]!r}") from None

    # -- runs
    def check_after(self, after: list[str]) -> None:
        if after:
            raise OpsError(f"--after needs a target with an opskit queue (local, ssh); {self.name} is slurm")

    def plan(self, run: str, command: list[str], attempt: int) -> dict:
        """The sbatch script `submit` would hand to SLURM (launch --dry-run prints it)."""
        return {"sbatch": S.sbatch_script(run, self.run_dir(run), self.code_dir, command, self.trainer_env(attempt),
                                          self.config)}

    def submit(self, run: str, command: list[str], attempt: int, gpus: int | None = None,
               after: list[str] | tuple[str, ...] = (), extra_env: dict | None = None) -> Submission:
        """Write the sbatch script into the run's slurm/ folder and submit it; the job id."""
        self.check_after(list(after))
        env = {**self.trainer_env(attempt), **(extra_env or {})}
        script = S.sbatch_script(run, self.run_dir(run), self.code_dir, command, env, self.config)
        self.write_file(C.run_rel(run, S.SLURM_DIR, S.SBATCH_FILE), script)
        # the job's finish step POSTs its end to these (remote/notify.py); none: an empty list
        self.write_file(C.run_rel(run, S.SLURM_DIR, S.NOTIFY_FILE),
                        json.dumps({"urls": list(self.config.get("notify") or []), "target": self.name, "run": run,
                                    "attempt": attempt}))
        job_id = self.client.submit(f"{self.run_dir(run)}/{S.SLURM_DIR}/{S.SBATCH_FILE}")
        self.write_file(C.run_rel(run, S.SLURM_DIR, S.JOB_ID_FILE), job_id + "\n")
        history = C.run_rel(run, S.SLURM_DIR, S.JOB_HISTORY_FILE)
        self.write_file(history, self._read([history]).get(history, "") + job_id + "\n")
        return Submission(False, attempt, job_id=job_id)

    def start(self, run: str, command: list[str], attempt: int, extra_env: dict | None = None) -> dict:
        """Starting at once is submitting: SLURM decides when the job runs."""
        return {"job_id": self.submit(run, command, attempt, extra_env=extra_env).job_id}

    def job_ids(self, runs: list[str]) -> dict[str, str]:
        files = self._read([C.run_rel(r, S.SLURM_DIR, S.JOB_ID_FILE) for r in runs])
        out = {}
        for r in runs:
            text = files.get(C.run_rel(r, S.SLURM_DIR, S.JOB_ID_FILE), "").strip()
            if text:
                out[r] = text
        return out

    def run_jobs(self, runs: list[str]) -> dict[str, list[str]]:
        """Every SLURM job id each run had (slurm/job_ids; slurm/job_id for runs submitted before it)."""
        rels = {r: C.run_rel(r, S.SLURM_DIR, S.JOB_HISTORY_FILE) for r in runs}
        files = self._read(list(rels.values()))
        out = {r: list(dict.fromkeys(files.get(rel, "").split())) for r, rel in rels.items()}
        for r, job_id in self.job_ids([r for r in runs if not out[r]]).items():
            out[r] = [job_id]
        return {r: ids for r, ids in out.items() if ids}

    def job_accounting(self, runs: list[str]) -> dict:
        """What SLURM's accounting says each run's jobs held: {"runs": {run: [job id]}, "jobs": {job id:
        {elapsed_s, gpus, nodes, state}}} (opskit cost: elapsed x GPUs x price per GPU-hour)."""
        ids = self.run_jobs(runs)
        jobs = self.client.jobs(sorted({j for v in ids.values() for j in v}))
        return {"runs": ids, "jobs": {j: {"elapsed_s": job.elapsed_s, "gpus": job.gpus, "nodes": job.nodes,
                                          "state": job.state} for j, job in jobs.items()}}

    def box_state(self, since: int = 0, ledger_id: str | None = None) -> dict:
        raise OpsError(f"{self.name} is a SLURM target: SLURM holds its machines (no ledger, no idle action)")

    def observe(self, runs: list[str]) -> tuple[dict[str, Observation], None]:
        """Run directories (one agent call) plus every job's SLURM state (one sacct call); SLURM's
        queue is its own (no opskit queue state)."""
        if not runs:
            return {}, None
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
            out[run] = S.observation(answer["runs"][run], job, answer["now"], tail, self.disk(answer.get("disk")))
        return out, None

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
        self.write_file(C.run_rel(run, S.SLURM_DIR, S.CANCEL_MARKER), job_id + "\n")
        if not self.client.signal(job_id, "USR1"):
            self.client.cancel(job_id)
        return {"signalled": True, "job_id": job_id, "signal": "USR1"}

    def cancel(self, run: str, now: bool = False) -> dict:
        return self.signal(run, "KILL" if now else "TERM")

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

    def queue_move_top(self, run: str) -> dict:
        raise OpsError(f"{run} is on {self.name} (slurm), whose queue opskit does not order")

    def ensure_supervisor(self) -> dict:
        return {"alive": False, "started": False}  # SLURM runs the jobs; there is no supervisor
