"""The box as opskit's status and cost see it (agent.py box-state): its ledger since an offset, its
supervisor, the idle action's record, the notifications waiting to go; and the pull markers the idle
action waits for (agent.py mark-pulled). Standard library only."""
from __future__ import annotations

import json
import time

from opskit.ledger import watched
from remote import notify as N
from remote import queue_dir as D
from remote.idle_action import RECORD, hold, mark_pulled
from remote.ledger import read_since
from train import contract as C

__all__ = ["box_state", "hold", "mark_pulled"]


def box_state(workdir: str, since: int = 0, ledger_id: str | None = None, config: dict | None = None,
              ensure: bool = False) -> dict:
    """`config`: the target's settings from opskit (written like enqueue writes them); `ensure`: start
    the supervisor of a watched box (a price or an idle action) that is not running."""
    if config is not None:
        with D.locked(workdir) as d:
            C.atomic_write_json(d / "config.json", config)
    supervisor = D.ensure_running(workdir, even_idle=True) if ensure and watched(D.read_config(workdir)) else None
    try:
        idle = json.loads((D.qdir(workdir) / RECORD).read_text())
    except (OSError, ValueError):
        idle = None
    outbox = N.Outbox(workdir)
    return {"now": time.time(), "ledger": read_since(workdir, since, ledger_id),
            "supervisor": supervisor or D.supervisor_info(workdir), "idle_action": idle,
            "notify": {"outbox": outbox.pending(),
                       "given_up": len(list(outbox.given_up.glob("*.json"))) if outbox.given_up.exists() else 0}}
