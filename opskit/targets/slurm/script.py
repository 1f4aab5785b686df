"""Pure planning for SLURM targets (docs/targets-slurm.md): the sbatch script of a run, rendered by
submitit's sbatch writer, and what SLURM's answers mean for a run.

Nothing here runs a command; client.py does.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass

from submitit.slurm.slurm import _make_sbatch_string

from opskit import planning
from opskit.states import Observation, heartbeat_fields
from train import contract as C

JOB_SCRIPT = "remote/slurm_job.sh"  # relative to the code dir on the cluster
SLURM_DIR = "slurm"  # inside the run dir: the sbatch script, SLURM's own logs, the cancel marker
CANCEL_MARKER = "cancel"  # slurm/cancel: opskit asked to stop; the job ends instead of requeueing
SBATCH_FILE = "sbatch.sh"  # slurm/sbatch.sh: the submitted script
JOB_ID_FILE = "job_id"  # slurm/job_id: the SLURM job id
JOB_HISTORY_FILE = "job_ids"  # slurm/job_ids: every job id of the run, one a line (its cost)
NOTIFY_FILE = "notify.json"  # slurm/notify.json: where the finish step POSTs (remote/notify.py)
RDZV_PLACEHOLDER = "{rdzv}"  # replaced on the nodes by <first node>:<port of the job>
DEFAULT_SIGNAL_S = 120  # USR1 this long before the time limit: time to save a checkpoint

# SLURM job states (sacct/squeue). Waiting: the job will (again) run later; running: its trainer may
# be up; everything else has ended and decides with the run directory's exit code and heartbeat.
WAITING = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "CONFIGURING",
                     "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING", "SPECIAL_EXIT"})
RUNNING = frozenset({"RUNNING", "COMPLETING", "STAGE_OUT"})
ENDED = frozenset({"COMPLETED", "FAILED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "CANCELLED", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "REVOKED"})


@dataclass(frozen=True)
class SlurmJob:
    """What SLURM says about one job: its current state and how often it was requeued."""

    job_id: str
    state: str  # e.g. RUNNING; "CANCELLED by 0" is reported as CANCELLED
    exit_code: int | None  # the batch script's, once ended
    reason: str | None
    restarts: int
    elapsed_s: int = 0  # run time of every incarnation, summed (what the allocation was held)
    gpus: int | None = None  # GPUs of the allocation (AllocTRES gres/gpu); None: SLURM did not say
    nodes: int | None = None


def sbatch_script(run: str, run_dir: str, code_dir: str, command: list[str], env: dict[str, str],
                  config: dict) -> str:
    """The sbatch script of one run: one task per node runs torchrun through remote/slurm_job.sh;
    after srun returns, the batch step requeues the job (stopped by a signal) or records the exit code.
    A downstream (p2) job is one process on one GPU: one node, whatever the target's size."""
    trainer = is_trainer(command)
    nodes = int(config.get("nodes") or 1) if trainer else 1
    gpus = int(config.get("gpus_per_node") or 0)
    gpus = gpus if trainer else min(gpus, 1)
    slurm_dir = f"{run_dir}/{SLURM_DIR}"
    setup = [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    setup.append(f"rm -f {shlex.quote(run_dir)}/{C.EXIT_CODE}  # an earlier attempt's")
    if nodes > 1:
        setup += ['first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                  'export OPSKIT_RDZV="$first_node:$(( 20000 + SLURM_JOB_ID % 20000 ))"']
    job = f"{code_dir}/{JOB_SCRIPT}"
    extra = {k: config[k] for k in ("account", "qos", "constraint", "mem", "exclusive") if config.get(k)}
    if config.get("time"):
        extra["time"] = config["time"]
    return _make_sbatch_string(
        command=" ".join(shlex.quote(a) for a in ["bash", job, "node", run_dir, *node_command(command, nodes)]),
        folder=slurm_dir,
        job_name=f"opskit:{run}",
        partition=config.get("partition"),
        time=None,  # submitit's default is 5 minutes; the cluster's default applies unless --time
        nodes=nodes,
        ntasks_per_node=1,
        cpus_per_task=config.get("cpus_per_task"),
        gpus_per_node=gpus or None,
        setup=setup,
        teardown=[f"bash {shlex.quote(job)} finish {shlex.quote(run_dir)} $?"],
        wckey=None,
        stderr_to_stdout=True,
        # USR1 (submitit's default is USR2): the trainer checkpoints on it; the job requeues itself
        additional_parameters={"requeue": True, "signal": f"USR1@{int(config.get('signal_s') or DEFAULT_SIGNAL_S)}",
                               **extra},
    ).rstrip("\n") + "\n"


def is_trainer(command: list[str]) -> bool:
    """Whether `command` runs the trainer (train.run, maybe under torchrun), not a downstream job."""
    return "train.run" in command


def node_command(command: list[str], nodes: int) -> list[str]:
    """The command one node runs: single node (or not the trainer) as planned; several nodes
    rendezvous (c10d) on the first node of the allocation, with the planned python, processes per
    node and spec."""
    if nodes <= 1 or not is_trainer(command):
        return list(command)
    nproc = next((int(a.split("=", 1)[1]) for a in command if a.startswith("--nproc_per_node=")), 1)
    return planning.trainer_command(command[0], nproc, command[-1], nnodes=nodes, rdzv=RDZV_PLACEHOLDER)


# ------------------------------------------------------------------ answers


SACCT_FIELDS = "JobIDRaw,State,ExitCode,Reason,ElapsedRaw,AllocTRES"


def sacct_argv(job_ids: list[str]) -> list[str]:
    """One sacct call for every job of a target; -D lists each requeued incarnation as its own line."""
    return ["sacct", "-X", "-D", "-n", "-P", "-o", SACCT_FIELDS, "-j", ",".join(job_ids)]


def _tres(text: str) -> dict[str, int]:
    """AllocTRES `billing=2,cpu=2,gres/gpu=1,mem=1G,node=1` -> {"gres/gpu": 1, "node": 1, ...} (numbers only)."""
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if value.isdigit():
            out[key.strip()] = int(value)
    return out


def parse_sacct(text: str) -> dict[str, SlurmJob]:
    """`sacct -X -D -n -P -o JobIDRaw,State,ExitCode,Reason[,ElapsedRaw,AllocTRES]` -> {job id: its
    newest line, restarts, elapsed seconds of every incarnation, GPUs and nodes of the allocation}."""
    lines: dict[str, list[list[str]]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 3 or not parts[0]:
            continue
        lines.setdefault(parts[0], []).append(parts)
    out = {}
    for job_id, rows in lines.items():
        last = rows[-1]
        code = last[2].split(":")[0]
        reason = last[3] if len(last) > 3 and last[3] not in ("", "None") else None
        tres = _tres(last[5]) if len(last) > 5 else {}
        out[job_id] = SlurmJob(job_id, last[1].split()[0], int(code) if code.isdigit() else None, reason,
                               restarts=sum(1 for r in rows if r[1].split()[0] == "REQUEUED"),
                               elapsed_s=sum(int(r[4]) for r in rows if len(r) > 4 and r[4].isdigit()),
                               gpus=tres.get("gres/gpu", 0 if tres else None), nodes=tres.get("node"))
    return out


def observation(files: dict, job: SlurmJob | None, now: float, log_tail: str | None = None,
                disk: dict | None = None) -> Observation:
    """One run's Observation from its run directory (agent observe) and its SLURM job.

    While SLURM holds the job (waiting or running) a leftover exit_code belongs to an incarnation that
    is being requeued and is ignored; once the job ended, the run directory decides, with SLURM's state
    for what the files cannot tell (cancelled, timed out, node failure)."""
    hb = {**heartbeat_fields(files), "disk": disk}
    if job is None:  # submitted, but not in accounting yet (slurmdbd lags a second or two)
        return Observation(**hb, exit_code=None, alive=False, now=now, started=False,
                           scheduler_state="PENDING")
    if job.state in WAITING:
        return Observation(**hb, exit_code=None, alive=False, now=now, started=False,
                           scheduler_state=job.state, restarts=job.restarts)
    if job.state in RUNNING:
        return Observation(**hb, exit_code=None, alive=True, now=now, started=True,
                           scheduler_state=job.state, restarts=job.restarts)
    exit_code = files["exit_code"] if files["exit_code"] is not None else job.exit_code
    return Observation(**hb, exit_code=exit_code, alive=False, now=now, started=True,
                       scheduler_state=job.state, restarts=job.restarts, log_tail=log_tail)
