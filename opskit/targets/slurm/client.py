"""SLURM's commands (sbatch, sacct, scancel, squeue, sinfo) through the target's shell: this machine
or a login node over SSH, alike. `SLURM_CONF` (when the target names one) is set for every command.
"""
from __future__ import annotations

from opskit.errors import CannotRun, OpsError, TargetUnreachable
from opskit.targets.slurm import script as S
from opskit.transport import Shell

TIMEOUT_S = 60


class SlurmError(OpsError):
    """A SLURM command failed; the message holds its output."""


class SlurmClient:
    def __init__(self, shell: Shell | None = None, slurm_conf: str | None = None):
        if shell is None:
            from opskit.transport.local import LocalShell
            shell = LocalShell()
        self.shell = shell
        self.slurm_conf = slurm_conf

    def run(self, argv: list[str], timeout: float = TIMEOUT_S, check: bool = True) -> tuple[int, str]:
        """(exit code, stdout+stderr) of one SLURM command; with `check`, a failure raises SlurmError."""
        where = "on this machine" if self.shell.local else f"on {self.shell}"
        try:
            res = self.shell.run(argv, timeout=timeout, env={"SLURM_CONF": self.slurm_conf} if self.slurm_conf else None)
        except CannotRun:
            raise SlurmError(f"{argv[0]} not found {where}: is this a SLURM login node? "
                             f"(or add the target with --login USER@HOST)") from None
        except TargetUnreachable as e:
            raise TargetUnreachable(f"{e}: is SLURM's controller up?") from None
        code, out = res.exit_code, res.stdout + res.stderr
        if check and code != 0:
            where = "" if self.shell.local else f" {where}"
            raise SlurmError(f"{' '.join(argv[:2])}{where} failed (exit {code}): {out.strip()[-400:]}")
        return code, out

    def submit(self, script_path: str) -> str:
        """sbatch a script that is already on the cluster's filesystem; the job id."""
        _, out = self.run(["sbatch", "--parsable", script_path])
        job_id = out.strip().splitlines()[-1].split(";")[0] if out.strip() else ""
        if not job_id.isdigit():
            raise SlurmError(f"sbatch answered unexpectedly: {out.strip()[-300:]!r}")
        return job_id

    def jobs(self, job_ids: list[str]) -> dict[str, S.SlurmJob]:
        """Every listed job's state in one sacct call (jobs sacct does not know yet are left out)."""
        if not job_ids:
            return {}
        _, out = self.run(S.sacct_argv(job_ids))
        return S.parse_sacct(out)

    def signal(self, job_id: str, sig: str) -> bool:
        """Send `sig` to the job's steps (not the batch shell); False when SLURM has nothing to signal."""
        code, _ = self.run(["scancel", f"--signal={sig}", job_id], check=False)
        return code == 0

    def cancel(self, job_id: str) -> None:
        self.run(["scancel", job_id], check=False)  # an ended job is not an error
