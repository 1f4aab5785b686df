"""Targets: where runs execute. One kind per file (local.py, ssh.py, slurm/), siblings over one
Target (base.py); none imports another."""
from __future__ import annotations

from opskit.errors import OpsError, TargetUnreachable
from opskit.targets.base import Submission, Target

KINDS = ("local", "ssh", "slurm")


def target_class(kind: str) -> type[Target]:
    if kind == "local":
        from opskit.targets.local import LocalTarget
        return LocalTarget
    if kind == "ssh":
        from opskit.targets.ssh import SSHTarget
        return SSHTarget
    if kind == "slurm":
        from opskit.targets.slurm import SlurmTarget
        return SlurmTarget
    raise OpsError(f"unknown target kind '{kind}' (valid: {', '.join(KINDS)})")


def open_target(record: dict) -> Target:
    """The Target object for a store row (name, kind, config)."""
    return target_class(record["kind"])(record["name"], record["config"])


__all__ = ["KINDS", "Submission", "Target", "TargetUnreachable", "open_target", "target_class"]
