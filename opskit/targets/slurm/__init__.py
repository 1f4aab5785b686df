"""SLURM targets, in one place: the target (target.py), SLURM's commands over the target's shell
(client.py), and the pure sbatch builder and sacct reader (script.py)."""
from opskit.targets.slurm.target import SlurmTarget

__all__ = ["SlurmTarget"]
