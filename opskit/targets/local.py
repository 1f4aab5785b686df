"""The local target: this machine. Runs start in place from the project checkout; the built-in
`local` target (opskit/operations/targets.py) keeps its workdir beside state.db."""
from __future__ import annotations

from opskit.targets.base import Target
from opskit.transport.local import LocalShell


class LocalTarget(Target):
    kind = "local"

    def __init__(self, name: str, config: dict, shell=None):
        super().__init__(name, config, shell or LocalShell())
