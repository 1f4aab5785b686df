"""A target: a workdir on a machine, reached through a Shell (opskit/transport), where remote/agent.py
does every run operation. The kinds (local.py, ssh.py, slurm/) are siblings that differ in their
options and, for SLURM, in how a run is submitted and observed; everything else is here.
"""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from opskit import planning
from opskit import queue as Q
from opskit.errors import CannotRun, NoSpace, OpsError, TargetUnreachable
from opskit.states import Observation, free_space, observed
from opskit.transport import Shell, quote, rsync, shell_for
from train import contract as C

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Settings the box's supervisor reads from its queue config (docs/queue.md, docs/cost-and-notifications.md).
QUEUE_KEYS = ("gpus_per_run", "max_parallel", "base_port", "idle_exit_s", "poll_s")
WATCH_KEYS = ("price_per_hour", "notify", "idle_after_s", "on_idle", "idle_even_unpulled", "stall_after_s",
              "gpu_idle_pct", "gpu_idle_window_s")
PREPARE_TIMEOUT_S = 3 * 3600  # a cold box downloads torch
SETUP_HOLD_S = 3600  # the idle action waits this long at most for a launch that sets the box up
PROBE_TIMEOUT_S = 120


@dataclass(frozen=True)
class Submission:
    """What `Target.submit` did with a run: queued on the target's own queue (position, seq, its
    supervisor) or handed to a scheduler / started (job id or pid)."""

    queued: bool
    attempt: int
    position: int | None = None
    seq: int | None = None
    supervisor: dict | None = None
    job_id: str | None = None
    pid: int | None = None
    extra: dict = field(default_factory=dict)


class Target:
    kind = "?"
    rendezvous_port: str | None = Q.PORT_PLACEHOLDER  # the queue gives each run its own torchrun port

    def __init__(self, name: str, config: dict, shell: Shell | None = None):
        self.name = name
        self.config = config
        self.shell = shell or shell_for(config)
        self._synced = False  # code pushed in this process (a launch's prepare already did)

    @classmethod
    def config_from_options(cls, options: dict) -> dict:
        """Validate `targets add` options into the stored config; raise OpsError naming a bad one."""
        raise OpsError(f"targets of kind {cls.kind} cannot be added by hand")

    # -- where things are on the target
    @property
    def in_place(self) -> bool:
        """Runs start from this checkout (this machine); elsewhere the code is synced to <workdir>/code."""
        return self.shell.local

    @property
    def workdir(self) -> str:
        return self.shell.expand_home(self.config["workdir"])

    @property
    def code_dir(self) -> str:
        return str(PROJECT_ROOT) if self.in_place else f"{self.workdir}/code"

    @property
    def python(self) -> str:
        """The trainer's python on the target."""
        default = sys.executable if self.in_place else f"{self.workdir}/venv/bin/python"
        return self.config.get("python") or default

    @property
    def gpus(self) -> int:
        return int(self.config.get("gpus") or 0)

    def run_dir(self, run: str) -> str:
        return str(C.run_dir(self.workdir, run))

    # -- the agent
    def _agent_argv(self, args: list[str]) -> list[str]:
        python = sys.executable if self.in_place else self.config.get("agent_python", "python3")
        # -S: the agent needs the standard library only; skipping site-packages halves its start-up
        return [python, "-S", f"{self.code_dir}/remote/agent.py", *args]

    def agent(self, args: list[str], stdin: str | None = None, timeout: float = 60) -> str:
        """Run remote/agent.py with `args` on the target; its stdout."""
        label = f"{'local ' if self.shell.local else ''}agent {args[0]}"
        try:
            res = self.shell.run(self._agent_argv(args), stdin=stdin, timeout=timeout, label=label)
        except TargetUnreachable as e:
            raise TargetUnreachable(f"target {self.name}: {e}") from None
        if res.exit_code == 0:
            return res.stdout
        detail = (res.stdout + res.stderr).strip()
        if "remote/agent.py" in detail and "No such file" in detail:
            raise OpsError(f"target {self.name}: opskit's code is not on the box yet; "
                           f"run `opskit targets prepare {self.name}`")
        said = _agent_error(detail)
        if said is not None:  # the agent's own one-line answer (an input mistake, a run not in the queue)
            if said.get("no_space"):
                raise NoSpace(f"no space left on device {free_space(self.disk(said.get('disk')))}")
            raise OpsError(f"target {self.name}: {said['error']}")
        last = detail.splitlines()[-1][-300:] if detail else "no output"
        raise OpsError(f"target {self.name}: agent {args[0]} failed (exit {res.exit_code}): {last}")

    def agent_json(self, args: list[str], stdin: str | None = None, timeout: float = 60) -> dict:
        out = self.agent(args, stdin=stdin, timeout=timeout)
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise OpsError(f"target {self.name}: agent answered unexpectedly: {out.strip()[:300]!r}") from None

    # -- lifecycle
    def check(self) -> dict:
        """Reachable (else TargetUnreachable), python3 version, GPUs, free disk where the workdir is."""
        wd = self.workdir
        script = (
            "python3 -c 'import sys; print(\"python3=%d.%d.%d\" % sys.version_info[:3])' 2>/dev/null"
            " || echo python3=missing\n"
            "command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version"
            " --format=csv,noheader 2>/dev/null | sed 's/^/gpu=/'\n"
            f"d={quote([wd])}; while [ ! -d \"$d\" ]; do d=$(dirname \"$d\"); done\n"
            "df -Pk \"$d\" | awk 'NR==2 {print \"free_kb=\" $4}'\n"
            f"test -f {quote([wd + '/.prepared'])} && echo prepared=yes || echo prepared=no\n")
        res = self.shell.run(script, timeout=30)
        facts: dict[str, list[str]] = {}
        for line in res.stdout.splitlines():
            k, _, v = line.partition("=")
            facts.setdefault(k, []).append(v.strip())
        gpus = facts.get("gpu", [])
        free_kb = int(facts.get("free_kb", ["0"])[0] or 0)
        return {"reachable": True, "host": str(self.shell), "workdir": wd, "python": self.python,
                "python3": facts.get("python3", ["missing"])[0], "gpus": len(gpus),
                "gpu_models": sorted({g.split(",")[0] for g in gpus}),
                "driver": gpus[0].split(",")[-1].strip() if gpus else None,
                "free_disk_gb": round(free_kb / 2**20, 1), "prepared": facts.get("prepared") == ["yes"],
                "configured_gpus": self.gpus}

    def sync(self) -> None:
        """Bring the project's code to <workdir>/code (nothing to do where it runs in place)."""
        if self.in_place or self._synced:
            return
        rsync.push_code(self.shell, PROJECT_ROOT, self.code_dir)
        self._synced = True

    def prepare(self, on_line=print) -> None:
        """Make the target able to run the trainer; idempotent. In place: check this python can import
        the trainer's packages. Elsewhere: sync the code, then run remote/prepare.sh there."""
        if self.in_place:
            return self._probe_python()
        self.sync()
        argv = ["bash", f"{self.code_dir}/remote/prepare.sh", "--workdir", self.workdir, "--code", self.code_dir,
                "--python", self.python, "--gpus", str(self.gpus)]
        for key in ("base_python", "torch_index"):
            if self.config.get(key):
                argv += [f"--{key.replace('_', '-')}", self.config[key]]
        for key in ("system_site_packages", "no_install"):
            if self.config.get(key):
                argv.append(f"--{key.replace('_', '-')}")
        lines: list[str] = []

        def relay(line: str) -> None:
            lines.append(line)
            on_line(line)

        res = self.shell.run(argv, timeout=PREPARE_TIMEOUT_S, on_line=relay)
        if res.exit_code != 0:
            failed = [ln for ln in lines if ln.startswith("prepare failed at step ")]
            why = failed[-1] if failed else f"prepare.sh exited {res.exit_code}: {res.stderr.strip()[-300:]}"
            raise OpsError(f"target {self.name}: {why}")

    def _probe_python(self) -> None:
        try:
            probe = self.shell.run([self.python, "-c", "import torch, tokenizers, numpy"], timeout=PROBE_TIMEOUT_S)
        except TargetUnreachable:
            raise OpsError(f"target {self.name}: {self.python} took over {PROBE_TIMEOUT_S:g}s to import "
                           f"the trainer's packages") from None
        except CannotRun as e:
            raise OpsError(f"target {self.name}: cannot run python {self.python}: {e.strerror or e}; "
                           f"check the target's python setting") from None
        if probe.exit_code != 0:
            raise OpsError(f"{self.python} cannot run the trainer ({probe.stderr.strip().splitlines()[-1:]}); "
                           f"install it with: pip install -e '.[train]'")

    def check_movable(self) -> None:
        """Raise OpsError where a run's checkpoint cannot be copied to or from this target
        (`opskit resume RUN --target T`, opskit/transport/rsync.py); local and SSH targets can."""

    # -- runs
    def write_file(self, rel: str, text: str) -> None:
        """Write a file under the workdir atomically (agent write)."""
        self.agent_json(["write", "--workdir", self.workdir, "--path", rel], stdin=text)

    def write_spec(self, run: str, spec: dict) -> None:
        self.write_file(C.run_rel(run, C.SPEC), json.dumps(spec, indent=1))

    def reset(self, run: str) -> None:
        """Move an earlier attempt's run directory aside: a rerun starts from scratch."""
        self.agent_json(["reset", "--workdir", self.workdir, "--run", run])

    def trainer_env(self, attempt: int) -> dict[str, str]:
        env = {"PYTHONPATH": self.code_dir, "OPSKIT_ATTEMPT": str(attempt), "PYTHONUNBUFFERED": "1",
               "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(C.SIGNAL_GRACE_S)}
        if self.gpus == 0:
            env["OMP_NUM_THREADS"] = str(self.config.get("threads_per_run", 1))
        return env

    def command(self, run: str, spec: dict) -> list[str]:
        """The command line that runs `spec` here: the trainer (torchrun) or a downstream (p2) job."""
        spec_path = f"{self.run_dir(run)}/{C.SPEC}"
        if "downstream" in spec:
            return planning.downstream_command(self.python, spec_path)
        return planning.trainer_command(self.python, planning.procs_per_run(self.config), spec_path,
                                        port=self.rendezvous_port)

    def check_after(self, after: list[str]) -> None:
        """Raise OpsError where this target cannot hold a run back until others are done."""

    def plan(self, run: str, command: list[str], attempt: int) -> dict:
        """What `submit` would hand over, beyond the command (launch --dry-run prints it)."""
        return {}

    def submit(self, run: str, command: list[str], attempt: int, gpus: int | None = None,
               after: list[str] | tuple[str, ...] = (), extra_env: dict | None = None) -> Submission:
        """Queue a run on the target; its supervisor starts it when its GPUs are free and its `after`
        runs are done."""
        entry = {"run": run, "command": command, "env": {**self.trainer_env(attempt), **(extra_env or {})},
                 "gpus": gpus, "after": list(after), "attempt": attempt}
        answer = self.agent_json(["enqueue", "--workdir", self.workdir],
                                 stdin=json.dumps({"entry": entry, "config": self.queue_config()}))
        return Submission(True, attempt, position=answer["position"], seq=answer["seq"],
                          supervisor=answer["supervisor"])

    def start(self, run: str, command: list[str], attempt: int, extra_env: dict | None = None) -> dict:
        """Start a run at once, outside the queue (agent start); its pid."""
        env = {**self.trainer_env(attempt), **(extra_env or {})}
        args = ["start", "--workdir", self.workdir, "--run", run]
        for k, v in env.items():
            args += ["--env", f"{k}={v}"]
        return self.agent_json(args + ["--", *command])

    def observe(self, runs: list[str]) -> tuple[dict[str, Observation], dict | None]:
        """Each run's Observation and the target's queue state, in one round trip (a dead supervisor
        with work left is restarted on the way)."""
        if not runs:
            return {}, None
        answer = self.agent_json(["observe", "--workdir", self.workdir, "--queue", *runs])
        disk = self.disk(answer.get("disk"))
        return {run: observed(o, answer["now"], disk) for run, o in answer["runs"].items()}, answer["queue"]

    def disk(self, facts: dict | None) -> dict | None:
        """The agent's disk facts of the workdir, named `<target>:<workdir>` for messages."""
        return {**facts, "where": f"{self.name}:{facts['path']}"} if facts else None

    def signal(self, run: str, sig: str = "TERM") -> dict:
        return self.agent_json(["signal", "--workdir", self.workdir, "--run", run, "--sig", sig])

    def cancel(self, run: str, now: bool = False) -> dict:
        """Take a waiting run off the queue, or signal a running one (TERM: it checkpoints; KILL: at
        once). The answer says which: removed_from_queue, signalled, or neither (not running)."""
        if self.agent_json(["dequeue", "--workdir", self.workdir, "--run", run])["removed"]:
            return {"removed_from_queue": True}
        return self.signal(run, "KILL" if now else "TERM")

    def logs(self, run: str, lines: int = 50, follow: bool = False) -> Iterator[str]:
        args = ["tail", "--workdir", self.workdir, "--run", run, "--lines", str(lines)]
        if follow:
            yield from self.shell.stream(self._agent_argv(args + ["--follow"]))
        else:
            yield self.agent(args)

    def manifest(self, run: str) -> list[dict]:
        return self.manifest_at(run)[0]

    def manifest_at(self, run: str) -> tuple[list[dict], float | None]:
        """The run's pullable files and the box's time when it listed them."""
        answer = self.agent_json(["manifest", "--workdir", self.workdir, "--run", run])
        return answer["files"], answer.get("now")

    def mark_pulled(self, run: str, attempt: int, as_of: float) -> dict:
        """Tell the box that attempt `attempt` of `run` came home as it was at `as_of` (the idle action
        waits for it)."""
        return self.agent_json(["mark-pulled", "--workdir", self.workdir, "--run", run, "--attempt", str(attempt),
                                "--as-of", repr(float(as_of))])

    def fetch(self, run: str, names: list[str], dest: Path) -> None:
        """Copy the named files of a run's directory into `dest`."""
        self.shell.fetch(self.run_dir(run), names, dest)

    # -- the target's queue (docs/queue.md)
    def queue_config(self) -> dict:
        """What the supervisor shares out: GPU count (may be a fake one), GPUs per run, limits."""
        return {"gpus": self.gpus, "target": self.name,
                **{k: self.config[k] for k in QUEUE_KEYS + WATCH_KEYS if self.config.get(k) is not None}}

    @contextmanager
    def setting_up(self):
        """Hold the box's idle action while opskit prepares the box and queues runs on it: setting up
        is not idle (a box whose code is not there yet has no supervisor to hold)."""
        held = bool(self.config.get("on_idle"))
        if held:
            held = self._hold_idle(SETUP_HOLD_S)
        try:
            yield
        finally:
            if held:
                self._hold_idle(0)

    def _hold_idle(self, seconds: float) -> bool:
        try:
            self.agent_json(["idle-hold", "--workdir", self.workdir, "--seconds", str(seconds)])
            return True
        except OpsError:
            return False

    def box_state(self, since: int = 0, ledger_id: str | None = None) -> dict:
        """The box's ledger from byte `since`, its supervisor, idle action and notifications (agent
        box-state); the target's settings go with it, and a watched box's supervisor is restarted."""
        args = ["box-state", "--workdir", self.workdir, "--since", str(since), "--config-stdin", "--ensure"]
        return self.agent_json(args + (["--ledger-id", ledger_id] if ledger_id else []),
                               stdin=json.dumps({"config": self.queue_config()}))

    def ensure_supervisor(self) -> dict:
        return self.agent_json(["ensure-supervisor", "--workdir", self.workdir])

    def queue_state(self, ensure: bool = False) -> dict:
        """Running and pending entries (in order, with why each waits); `ensure` restarts a dead supervisor."""
        return self.agent_json(["queue-state", "--workdir", self.workdir, *(["--ensure"] if ensure else [])])

    def queue_move_top(self, run: str) -> dict:
        return self.agent_json(["queue-move", "--workdir", self.workdir, "--run", run, "--top"])


def _agent_error(detail: str) -> dict | None:
    """{"error": ...} when the agent's last line says what went wrong (as JSON), else None."""
    lines = detail.splitlines()
    try:
        said = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    return said if isinstance(said, dict) and isinstance(said.get("error"), str) else None
