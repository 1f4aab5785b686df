"""SLURM's commands (sbatch, sacct, scancel, scontrol) run here or on a login node over SSH.

One funnel, `SlurmClient.run`, so that both places behave alike; `SLURM_CONF` (when the target
names one) is set for every command.
"""
from __future__ import annotations

import os
import subprocess

from opskit import slurm_script as S
from opskit.errors import OpsError
from opskit.ssh_connection import Address
from opskit.targets.base import TargetUnreachable

TIMEOUT_S = 60


class SlurmError(OpsError):
    """A SLURM command failed; the message holds its output."""


class SlurmClient:
    def __init__(self, login: Address | None = None, slurm_conf: str | None = None):
        self.login = login
        self.slurm_conf = slurm_conf

    def run(self, argv: list[str], timeout: float = TIMEOUT_S, check: bool = True) -> tuple[int, str]:
        """(exit code, stdout+stderr) of one SLURM command; with `check`, a failure raises SlurmError."""
        if self.login is None:
            env = {**os.environ, **({"SLURM_CONF": self.slurm_conf} if self.slurm_conf else {})}
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
            except FileNotFoundError:
                raise SlurmError(f"{argv[0]} not found on this machine: is this a SLURM login node? "
                                 f"(or add the target with --login USER@HOST)") from None
            except subprocess.TimeoutExpired:
                raise TargetUnreachable(f"{' '.join(argv[:2])} on this machine timed out after {timeout:g}s: "
                                        f"is SLURM's controller up?") from None
            except OSError as e:
                raise SlurmError(f"{' '.join(argv[:2])} on this machine cannot run: {e}") from None
            code, out = proc.returncode, proc.stdout + proc.stderr
        else:
            from opskit import ssh_connection
            from opskit.targets.base import quote
            prefix = f"SLURM_CONF={quote([self.slurm_conf])} " if self.slurm_conf else ""
            res = ssh_connection.run(self.login, prefix + quote(argv), timeout=timeout)
            code, out = res.exit_code, res.stdout + res.stderr
        if check and code != 0:
            where = f" on {self.login}" if self.login else ""
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
