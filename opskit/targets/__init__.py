"""Targets: where runs execute. One kind per file, all behind `Target` (base.py)."""
from __future__ import annotations

from opskit.errors import OpsError
from opskit.targets.base import Target, TargetUnreachable

KINDS = ("local", "ssh", "slurm")


def open_target(record: dict) -> Target:
    """The Target object for a store row (name, kind, config)."""
    kind = record["kind"]
    if kind == "local":
        from opskit.targets.local import LocalTarget
        return LocalTarget(record["name"], record["config"])
    if kind == "ssh":
        from opskit.targets.ssh import SSHTarget
        return SSHTarget(record["name"], record["config"])
    if kind == "slurm":
        from opskit.targets.slurm import SlurmTarget
        return SlurmTarget(record["name"], record["config"])
    raise OpsError(f"target '{record['name']}' has unknown kind '{kind}' (valid: {', '.join(KINDS)})")


__all__ = ["KINDS", "Target", "TargetUnreachable", "open_target"]
