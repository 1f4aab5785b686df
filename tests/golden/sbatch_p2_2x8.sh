#!/bin/bash

# Parameters
#SBATCH --gpus-per-node=1
#SBATCH --job-name=opskit:demo/hybrid_a0.2_t100k/s42
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/scratch/alice/opskit/runs/demo/hybrid_a0.2_t100k/s42/slurm/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --requeue
#SBATCH --signal=USR1@120
#SBATCH --time=24:00:00

# setup
export OPSKIT_ATTEMPT=1
export PYTHONPATH=/scratch/alice/opskit/code
export PYTHONUNBUFFERED=1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300
rm -f /scratch/alice/opskit/runs/demo/hybrid_a0.2_t100k/s42/exit_code  # an earlier attempt's

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /scratch/alice/opskit/runs/demo/hybrid_a0.2_t100k/s42/slurm/%j_%t_log.out bash /scratch/alice/opskit/code/remote/slurm_job.sh node /scratch/alice/opskit/runs/demo/hybrid_a0.2_t100k/s42 /scratch/alice/opskit/venv/bin/python -m train.p2 --spec /scratch/alice/opskit/runs/demo/hybrid_a0.2_t100k/s42/spec.json


# teardown
bash /scratch/alice/opskit/code/remote/slurm_job.sh finish /scratch/alice/opskit/runs/demo/hybrid_a0.2_t100k/s42 $?
