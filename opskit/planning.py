"""Pure planning: what a launch will do, the spec each run gets, the trainer's command line."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from opskit.errors import OpsError
from opskit.states import ACTIVE, DONE, QUEUED
from train import contract as C
from train.spec import tracking_problem

if TYPE_CHECKING:  # the catalog (YAML) is not loaded by commands that plan nothing, like `status`
    from opskit.catalog import PlannedRun


@dataclass(frozen=True)
class LaunchDecision:
    run: PlannedRun
    start: bool
    attempt: int
    reason: str


def decide_launches(planned: list[PlannedRun], existing: dict[str, dict], rerun: bool) -> list[LaunchDecision]:
    """Which planned runs start; a running, queued or done run is refused unless `rerun` (never a live one)."""
    out = []
    for p in planned:
        row = existing.get(p.name)
        if row is None:
            out.append(LaunchDecision(p, True, 1, "new"))
        elif row["state"] in ACTIVE or row["state"] == QUEUED:
            out.append(LaunchDecision(p, False, row["attempt"],
                                      f"already {row['state']} on {row['target']}; cancel it first "
                                      f"(opskit cancel {p.name})"))
        elif row["state"] == DONE and not rerun:
            out.append(LaunchDecision(p, False, row["attempt"], "already done; pass --rerun to train it again"))
        elif not rerun:
            out.append(LaunchDecision(p, False, row["attempt"],
                                      f"previous attempt {row['state']}; `opskit resume {p.name}` continues "
                                      f"from its checkpoint, --rerun starts over"))
        else:
            out.append(LaunchDecision(p, True, row["attempt"] + 1, f"rerun (was {row['state']})"))
    return out


def build_spec(p: PlannedRun, workdir: str, attempt: int, trackers=()) -> dict:
    """The run's spec.json (docs/run-directory.md): catalog settings plus identity and paths.

    `trackers` (launch --tracker, repeatable) are added to the matrix's `tracking` list, each once;
    a bad one is an OpsError naming it."""
    spec = {
        "run": p.name, "phase": p.phase, "config": p.config, "seed": p.seed, "attempt": attempt,
        **{k: v for k, v in p.settings.items() if k != "matrix"},
        "cache_dir": f"{workdir}/cache",
        "out_dir": str(C.run_dir(workdir, p.name)),
    }
    if trackers:
        tracking = list(dict.fromkeys([*spec.get("tracking", []), *trackers]))
        problem = tracking_problem(tracking)
        if problem:
            raise OpsError(f"--tracker {tracking[int(problem[0][1:-1])] if problem[0] else ''}: {problem[1]}")
        spec["tracking"] = tracking
    return spec


def trainer_command(python: str, nproc: int, spec_path: str, nnodes: int = 1, rdzv: str | None = None,
                    port: int | str | None = None) -> list[str]:
    """torchrun for one node (standalone rendezvous, or a fixed local `port` so that runs packed on one
    box never share one) or several (c10d rendezvous at `rdzv` host:port). A one-process run skips
    torchrun (the trainer makes its own one-member process group): same code path, seconds less."""
    if nnodes <= 1 and nproc <= 1:
        return [python, "-m", "train.run", "--spec", spec_path]
    cmd = [python, "-m", "torch.distributed.run", f"--nproc_per_node={max(nproc, 1)}"]
    if nnodes > 1:
        cmd += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv}", "--rdzv_id=opskit"]
    elif port is not None:
        cmd += ["--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={port}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "train.run", "--spec", spec_path]


def downstream_command(python: str, spec_path: str) -> list[str]:
    """A p2 job: export, lm-eval tasks, passkey (one process on one GPU)."""
    return [python, "-m", "train.p2", "--spec", spec_path]


def procs_per_run(target_config: dict) -> int:
    """GPU targets: one process per GPU of the run; CPU targets: `procs_per_run` (default 1)."""
    gpus = int(target_config.get("gpus") or 0)
    if gpus:
        return int(target_config.get("gpus_per_run") or gpus)
    return int(target_config.get("procs_per_run") or 1)

