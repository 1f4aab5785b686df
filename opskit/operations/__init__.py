"""What the commands do, one user-level operation per function: each takes a Store and returns plain
data for the CLI to print; nothing here prints (progress goes through an optional `on_event`).

    targets.py  the targets the store knows          launch.py   launch, submitting one run
    status.py   refresh and the status rows          control.py  cancel, resume, logs, queues, runs show
    selection.py  what status shows                  pull.py     artifacts into results/raw/
    export.py   a run as a HF checkpoint
    cost.py     cost per run/config/phase/target, the boxes' idle time (from their ledgers)

`opskit.operations.NAME` imports only NAME's module, on first use: `opskit status` does not load
what launch, pull or export need.
"""
from __future__ import annotations

import importlib
import sys
import types

_MODULES = {
    "control": ("cancel", "logs", "queue_move_top", "queue_view", "resume", "run_details"),
    "cost": ("box_views", "cost", "run_costs"),
    "export": ("export_run",),
    "launch": ("launch", "submit_one"),
    "pull": ("pull",),
    "status": ("refresh", "status_json", "status_of", "status_rows", "status_view"),
    "targets": ("add_target", "check_target", "get_target", "list_targets", "local_target_record",
                "prepare_target", "remove_target"),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


class _Operations(types.ModuleType):
    """`launch`, `pull` and `cost` are functions named like their modules: when the import system binds
    such a module to its name here (on its first import, from anywhere), the function takes its place."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _WHERE.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Operations
