"""What every target offers. Subclasses say how to reach the target's agent (remote/agent.py)
and how files move; everything else (start, observe, signal, logs, manifests) is shared."""
from __future__ import annotations

import json
import shlex
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator

from opskit.errors import OpsError
from opskit.states import Observation
from train import contract as C


class TargetUnreachable(OpsError):
    """The target did not answer (in time)."""


class Target(ABC):
    kind = "?"
    has_queue = True  # runs wait in the target's own queue (remote/supervisor.py); SLURM uses its own

    def __init__(self, name: str, config: dict):
        self.name = name
        self.config = config

    @classmethod
    def config_from_options(cls, options: dict) -> dict:
        """Validate `targets add` options into the stored config; raise OpsError naming a bad one."""
        raise OpsError(f"targets of kind {cls.kind} cannot be added by hand")

    # -- where things are on the target
    @property
    def workdir(self) -> str:
        return self.config["workdir"]

    @property
    @abstractmethod
    def code_dir(self) -> str: ...

    @property
    def python(self) -> str:
        """The trainer's python on the target."""
        return self.config.get("python") or f"{self.workdir}/venv/bin/python"

    @property
    def gpus(self) -> int:
        return int(self.config.get("gpus") or 0)

    def run_dir(self, run: str) -> str:
        return str(C.run_dir(self.workdir, run))

    # -- transport
    @abstractmethod
    def agent(self, args: list[str], stdin: str | None = None, timeout: float = 60) -> str:
        """Run remote/agent.py with `args` on the target; its stdout."""

    @abstractmethod
    def agent_stream(self, args: list[str]) -> Iterator[str]:
        """Run the agent and yield its stdout as it comes (logs --follow)."""

    @abstractmethod
    def fetch(self, run: str, names: list[str], dest: Path) -> None:
        """Copy the named files of a run's directory into `dest`."""

    def agent_json(self, args: list[str], stdin: str | None = None, timeout: float = 60) -> dict:
        out = self.agent(args, stdin=stdin, timeout=timeout)
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise OpsError(f"target {self.name}: agent answered unexpectedly: {out.strip()[:300]!r}") from None

    def _agent_argv(self) -> list[str]:
        # -S: the agent needs the standard library only; skipping site-packages halves its start-up
        return ["-S", f"{self.code_dir}/remote/agent.py"]

    # -- lifecycle (overridden where a kind differs)
    def check(self) -> dict:
        return {"reachable": True}

    def prepare(self, on_line=print) -> None:
        """Make the target able to run the trainer (venv, packages); idempotent."""

    def sync(self) -> None:
        """Bring the project's code to the target (no-op where it runs in place)."""

    def check_movable(self) -> None:
        """Raise OpsError where a run's checkpoint cannot be copied to or from this target
        (`opskit resume RUN --target T`, opskit/rsync.py); local and SSH targets can."""

    # -- runs
    def write_spec(self, run: str, spec: dict) -> None:
        rel = f"runs/{run}/{C.SPEC}"
        self.agent_json(["write", "--workdir", self.workdir, "--path", rel], stdin=json.dumps(spec, indent=1))

    def trainer_env(self, attempt: int) -> dict[str, str]:
        env = {"PYTHONPATH": self.code_dir, "OPSKIT_ATTEMPT": str(attempt), "PYTHONUNBUFFERED": "1",
               "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(C.SIGNAL_GRACE_S)}
        if self.gpus == 0:
            env["OMP_NUM_THREADS"] = str(self.config.get("threads_per_run", 1))
        return env

    def start(self, run: str, command: list[str], attempt: int, extra_env: dict | None = None) -> dict:
        env = {**self.trainer_env(attempt), **(extra_env or {})}
        args = ["start", "--workdir", self.workdir, "--run", run]
        for k, v in env.items():
            args += ["--env", f"{k}={v}"]
        return self.agent_json(args + ["--", *command])

    def observe(self, runs: list[str]) -> dict[str, Observation]:
        if not runs:
            return {}
        return _observations(self.agent_json(["observe", "--workdir", self.workdir, *runs]))

    def observe_with_queue(self, runs: list[str]) -> tuple[dict[str, Observation], dict | None]:
        """Runs and (where the target has an opskit queue) the queue's state, in one round trip."""
        if not self.has_queue:
            return self.observe(runs), None
        answer = self.agent_json(["observe", "--workdir", self.workdir, "--queue", *runs])
        return _observations(answer), answer["queue"]

    def signal(self, run: str, sig: str = "TERM") -> dict:
        return self.agent_json(["signal", "--workdir", self.workdir, "--run", run, "--sig", sig])

    def logs(self, run: str, lines: int = 50, follow: bool = False) -> Iterator[str]:
        args = ["tail", "--workdir", self.workdir, "--run", run, "--lines", str(lines)]
        if follow:
            yield from self.agent_stream(args + ["--follow"])
        else:
            yield self.agent(args)

    # -- the target's queue (docs/queue.md)
    def queue_config(self) -> dict:
        """What the supervisor shares out: GPU count (may be a fake one), GPUs per run, limits."""
        keys = ("gpus_per_run", "max_parallel", "base_port", "idle_exit_s", "poll_s")
        return {"gpus": self.gpus, **{k: self.config[k] for k in keys if self.config.get(k) is not None}}

    def enqueue(self, run: str, command: list[str], attempt: int, gpus: int | None = None,
                after: list[str] | tuple[str, ...] = (), extra_env: dict | None = None) -> dict:
        """Queue a run; the supervisor starts it when its GPUs are free and its `after` runs are done."""
        entry = {"run": run, "command": command, "env": {**self.trainer_env(attempt), **(extra_env or {})},
                 "gpus": gpus, "after": list(after), "attempt": attempt}
        return self.agent_json(["enqueue", "--workdir", self.workdir],
                               stdin=json.dumps({"entry": entry, "config": self.queue_config()}))

    def ensure_supervisor(self) -> dict:
        return self.agent_json(["ensure-supervisor", "--workdir", self.workdir])

    def queue_state(self, ensure: bool = False) -> dict:
        """Running and pending entries (in order, with why each waits); `ensure` restarts a dead supervisor."""
        return self.agent_json(["queue-state", "--workdir", self.workdir, *(["--ensure"] if ensure else [])])

    def dequeue(self, run: str) -> dict:
        return self.agent_json(["dequeue", "--workdir", self.workdir, "--run", run])

    def queue_move_top(self, run: str) -> dict:
        return self.agent_json(["queue-move", "--workdir", self.workdir, "--run", run, "--top"])

    def manifest(self, run: str) -> list[dict]:
        return self.agent_json(["manifest", "--workdir", self.workdir, "--run", run])["files"]


def _observations(answer: dict) -> dict[str, Observation]:
    return {run: Observation(status=o["status"], exit_code=o["exit_code"], alive=o["alive"], now=answer["now"],
                             started=o["started"]) for run, o in answer["runs"].items()}


def quote(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)
