"""The sbatch script a SLURM run gets (golden files) and how SLURM's answers become run states.

Golden files: tests/golden/sbatch_*.sh. After an intended change, regenerate them with
UPDATE_GOLDEN=1 pytest tests/test_slurm_script.py and review the diff.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from opskit import planning, states
from opskit.targets.slurm import script as S
from opskit.errors import OpsError
from opskit.targets.slurm import SlurmTarget

GOLDEN = Path(__file__).parent / "golden"
RUN = "demo/hybrid_a0.2_t100k/s42"


def script_for(nodes: int, gpus_per_node: int, p2: bool = False, **extra) -> str:
    config = SlurmTarget.config_from_options({
        "login": "alice@login.cluster.example", "workdir": "/scratch/alice/opskit", "partition": "gpu",
        "nodes": nodes, "gpus_per_node": gpus_per_node, "time": "24:00:00", **extra})
    tgt = SlurmTarget("cluster", config)  # no connection is made to render a script
    spec = f"{tgt.run_dir(RUN)}/spec.json"
    command = (planning.downstream_command(tgt.python, spec) if p2
               else planning.trainer_command(tgt.python, planning.procs_per_run(tgt.config), spec))
    return tgt.plan(RUN, command, attempt=1)["sbatch"]


@pytest.mark.parametrize("nodes,gpus,p2,golden", [(1, 2, False, "sbatch_1x2.sh"), (2, 8, False, "sbatch_2x8.sh"),
                                                  (2, 8, True, "sbatch_p2_2x8.sh")])
def test_sbatch_script_matches_golden_file(nodes, gpus, p2, golden):
    extra = {} if p2 else {"account": "proj42", "qos": "normal"}
    got = script_for(nodes, gpus, p2, **extra)
    path = GOLDEN / golden
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(got)
    assert path.exists(), f"{path} missing: run UPDATE_GOLDEN=1 pytest {__file__}"
    assert got == path.read_text(), (f"the sbatch script for {nodes}x{gpus} changed; if on purpose, run "
                                     f"UPDATE_GOLDEN=1 pytest tests/test_slurm_script.py and review git diff {path}")


def test_multi_node_script_rendezvous_on_first_node_single_node_standalone():
    one, two = script_for(1, 2), script_for(2, 8)
    assert "--standalone" in one and "--nproc_per_node=2" in one and "rdzv" not in one
    assert "--nnodes=2" in two and "--rdzv_endpoint={rdzv}" in two and "--standalone" not in two
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in two
    for text in (one, two):
        assert "#SBATCH --signal=USR1@120" in text and "#SBATCH --requeue" in text
        assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --time=24:00:00" in text
        assert "slurm_job.sh finish /scratch/alice/opskit/runs/demo/hybrid_a0.2_t100k/s42 $?" in text


def test_one_process_per_node_on_two_nodes_still_uses_torchrun():
    command = planning.trainer_command("/venv/bin/python", 1, "/w/spec.json")
    assert command[1:3] == ["-m", "train.run"]
    assert S.node_command(command, 2) == ["/venv/bin/python", "-m", "torch.distributed.run", "--nproc_per_node=1",
                                          "--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint={rdzv}",
                                          "--rdzv_id=opskit", "-m", "train.run", "--spec", "/w/spec.json"]


def test_options_are_checked():
    with pytest.raises(OpsError, match="--time"):
        SlurmTarget.config_from_options({"workdir": "/x", "time": "tomorrow"})
    with pytest.raises(OpsError, match="--nodes"):
        SlurmTarget.config_from_options({"workdir": "/x", "nodes": 0})
    with pytest.raises(OpsError, match="absolute"):
        SlurmTarget.config_from_options({"workdir": "rel/dir"})
    cfg = SlurmTarget.config_from_options({"workdir": "/x", "slurm_conf": "/etc/slurm/slurm.conf", "signal_s": 30})
    assert cfg == {"workdir": "/x", "slurm_conf": "/etc/slurm/slurm.conf", "signal_s": 30, "gpus": 0}


# sacct lines as SLURM 22.05 prints them (-X -D -n -P -o JobIDRaw,State,ExitCode,Reason); a preempted
# and a requeued job are hard to provoke on one node, their lines are taken from real clusters.
SACCT = """\
11|COMPLETED|0:0|None
12|REQUEUED|0:0|None
12|REQUEUED|0:15|None
12|RUNNING|0:0|None
13|CANCELLED by 0|0:15|None
14|PREEMPTED|0:15|None
15|PENDING|0:0|Priority
16|OUT_OF_MEMORY|0:125|None
"""


def test_parse_sacct_takes_newest_line_and_counts_requeues():
    jobs = S.parse_sacct(SACCT)
    assert jobs["12"] == S.SlurmJob("12", "RUNNING", 0, None, restarts=2)
    assert jobs["13"].state == "CANCELLED"
    assert jobs["15"].reason == "Priority" and jobs["15"].restarts == 0


def derive(files, job_line: str | None, tail=None):
    job = S.parse_sacct(job_line)[job_line.split("|")[0]] if job_line else None
    return states.derive_state(S.observation(files, job, 1000.0, tail))


HB_TRAIN = {"state": "training", "updated_at": 999.0, "step": 5}
HB_STOPPED = {"state": "interrupted", "updated_at": 999.0, "checkpoint_step": 40}


@pytest.mark.parametrize("files,line,expected", [
    ({"status": None, "exit_code": None}, None, states.QUEUED),  # not in accounting yet
    ({"status": None, "exit_code": None}, "1|PENDING|0:0|Priority", states.QUEUED),
    ({"status": HB_TRAIN, "exit_code": None}, "1|RUNNING|0:0|None", states.TRAINING),
    # a stopped incarnation's exit code while SLURM requeues the job: still waiting, not ended
    ({"status": HB_STOPPED, "exit_code": 1}, "1|REQUEUED|0:0|None\n1|PENDING|0:0|BeginTime", states.QUEUED),
    ({"status": HB_STOPPED, "exit_code": 1}, "1|RUNNING|0:0|None", states.STARTING),
    ({"status": {"state": "done", "updated_at": 1.0}, "exit_code": 0}, "1|COMPLETED|0:0|None", states.DONE),
    ({"status": None, "exit_code": 3}, "1|FAILED|3:0|None", states.FAILED),
    ({"status": None, "exit_code": None}, "1|FAILED|1:0|None", states.FAILED),  # died before the wrapper
    ({"status": HB_TRAIN, "exit_code": None}, "1|CANCELLED by 0|0:15|None", states.CANCELLED),
    ({"status": HB_STOPPED, "exit_code": 1}, "1|CANCELLED by 0|0:0|None", states.CANCELLED),
    ({"status": HB_TRAIN, "exit_code": None}, "1|TIMEOUT|0:1|None", states.FAILED),
    ({"status": HB_TRAIN, "exit_code": None}, "1|OUT_OF_MEMORY|0:125|None", states.FAILED),
    ({"status": HB_TRAIN, "exit_code": None}, "1|NODE_FAIL|0:0|None", states.LOST),
    ({"status": HB_TRAIN, "exit_code": None}, "1|PREEMPTED|0:15|None", states.LOST),
])
def test_slurm_states_map_onto_run_states(files, line, expected):
    assert derive(files, line)[0] == expected


def test_failure_reason_carries_log_tail_and_slurm_state():
    state, reason = derive({"status": None, "exit_code": 3}, "1|FAILED|3:0|None", tail="boom | exit 3")
    assert state == states.FAILED and reason == "exit code 3; log: boom | exit 3"
    state, reason = derive({"status": HB_TRAIN, "exit_code": None}, "1|TIMEOUT|0:1|None", tail="step 5")
    assert reason == "SLURM TIMEOUT; log: step 5"
    assert derive({"status": None, "exit_code": None}, "1|REQUEUED|0:0|None\n1|PENDING|0:0|BeginTime")[1] == \
        "SLURM PENDING (requeued 1x)"


def test_p2_job_runs_its_own_command_on_one_node_and_one_gpu():
    command = ["/venv/bin/python", "-m", "train.p2", "--spec", "/w/spec.json"]
    assert S.node_command(command, 2) == command
    text = script_for(2, 8, p2=True)
    assert "#SBATCH --nodes=1" in text and "#SBATCH --gpus-per-node=1" in text
    assert "-m train.p2 --spec" in text and "train.run" not in text and "torch.distributed.run" not in text
    assert "rdzv" not in text.lower() and "scontrol show hostnames" not in text
    cpu = script_for(2, 0, p2=True)  # a CPU-only target asks for no GPU
    assert "#SBATCH --nodes=1" in cpu and "gpus-per-node" not in cpu
