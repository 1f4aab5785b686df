"""Acting on runs that exist: cancel, resume (here or on another target), logs, the targets' queues,
and one run's record."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from opskit import states
from opskit.errors import OpsError, TargetUnreachable
from opskit.code_record import record_code
from opskit.operations.launch import Notify, code_files, quiet, submit_one
from opskit.operations.status import refresh
from opskit.operations.targets import get_target, target_names
from opskit.store import Store
from opskit.targets import Target
from opskit.targets.base import PROJECT_ROOT
from opskit.transport.rsync import CODE_PATHS


def cancel(store: Store, runs: list[str], now: bool = False) -> list[dict]:
    """Ask each run's trainer to checkpoint and stop (SIGTERM through the launcher). `now`: SIGKILL its
    whole process group instead, with no checkpoint (a hung run); resume continues from its last one.

    Each answer has `outcome`: removed-from-queue, signalled, killed, cancelled-before-start or not-running."""
    out = []
    for name in runs:
        row = store.require_run(name)
        if row["state"] in states.ENDED:
            out.append({"run": name, "cancelled": False, "outcome": "ended", "reason": f"already {row['state']}"})
            continue
        tgt = get_target(store, row["target"])
        store.update_run(name, cancel_requested=1)
        answer = tgt.cancel(name, now=now)
        if answer.get("removed_from_queue"):
            _mark_cancelled(store, name, "removed from the target's queue", queue_pos=None)
            out.append({"run": name, "cancelled": True, "outcome": "removed-from-queue", "removed_from_queue": True})
            continue
        if now:
            ckpt = row.get("checkpoint_step")
            _mark_cancelled(store, name, "killed by `cancel --now`, no checkpoint taken; resume continues from "
                            + (f"step {ckpt}" if ckpt is not None else "its last checkpoint"))
            outcome = "killed"
        elif answer.get("signalled"):
            outcome = "signalled"  # the trainer checkpoints and exits; refresh derives `cancelled`
        elif answer.get("scancelled") or row["state"] in states.NOT_HANDED:
            _mark_cancelled(store, name, "cancelled before it started")
            outcome = "cancelled-before-start"
        else:  # its process is gone already: the next refresh says how it ended
            out.append({"run": name, "cancelled": False, "outcome": "not-running", **answer})
            continue
        out.append({"run": name, "cancelled": True, "outcome": outcome, **answer})
    return out


def _mark_cancelled(store: Store, run: str, reason: str, **fields) -> None:
    store.update_run(run, state=states.CANCELLED, reason=reason, ended_at=time.time(), stale=0, **fields)


def resume(store: Store, run: str, target: str | None = None, on_event: Notify = quiet) -> dict:
    """Start a new attempt that continues from the run's last complete checkpoint."""
    refresh(store, runs=[run])
    row = store.require_run(run)
    if row["state"] not in states.ENDED and row["state"] != states.STALLED:
        raise OpsError(f"{run} is {row['state']}; only a failed, lost, cancelled or stalled run can be resumed")
    if row["state"] == states.DONE:
        raise OpsError(f"{run} is done; use `opskit launch ... --rerun` to train it again")
    tgt = get_target(store, row["target"])
    moving_to = get_target(store, target) if target and target != row["target"] else None
    if moving_to is not None:  # refuse before a stalled run is killed
        tgt.check_movable()
        moving_to.check_movable()
    if row["state"] == states.STALLED:
        tgt.signal(run, "KILL")
    if moving_to is not None:
        tgt = _move_run(store, row, tgt, moving_to, on_event)
    with tgt.setting_up():  # the box's idle action waits while opskit prepares it
        tgt.prepare(on_line=on_event)
        tgt.sync()
        code = record_code(PROJECT_ROOT, CODE_PATHS)
        spec = store.require_run(run)["spec"]  # a move has just pointed it at the other target
        store.update_run(run, spec={**spec, "code_commit": code.commit, "code_dirty": code.dirty})
        return submit_one(store, tgt, run, row["attempt"] + 1, fresh=False, files=code_files(tgt, code),
                          keep_row_on_error=True)


def _move_run(store: Store, row: dict, src: Target, dst: Target, on_event: Notify) -> Target:
    """Copy the run's newest complete checkpoint to `dst` (through this machine) and point the run there."""
    from opskit.transport import rsync
    with tempfile.TemporaryDirectory(prefix="opskit-move-") as scratch:
        step = rsync.copy_run_for_resume(src, dst, row["name"], Path(scratch))
    spec = {**row["spec"], "cache_dir": f"{dst.workdir}/cache", "out_dir": dst.run_dir(row["name"])}
    store.update_run(row["name"], target=dst.name, run_dir=dst.run_dir(row["name"]), spec=spec)
    on_event(f"copied {row['name']} {step} from {src.name} to {dst.name}")
    return dst


def logs(store: Store, run: str, lines: int = 50, follow: bool = False):
    row = store.require_run(run)
    return get_target(store, row["target"]).logs(run, lines=lines, follow=follow)


def queue_view(store: Store, target: str | None = None) -> list[dict]:
    """Each target's queue: what runs (with its GPUs) and what waits, in order (SLURM: its own queue).

    A dead supervisor with work left is restarted on the way."""
    out = []
    for name in [target] if target else target_names(store):
        tgt = get_target(store, name)
        try:
            state = tgt.queue_state(ensure=True)
        except (TargetUnreachable, OpsError, OSError) as e:
            error = str(e) if str(e).startswith(f"target {name}") else f"target {name}: {e}"
            out.append({"target": name, "kind": tgt.kind, "error": error})
            continue
        out.append({"target": name, "kind": tgt.kind, **state})
    return out


def queue_move_top(store: Store, run: str) -> dict:
    """Put a queued run first in its target's queue."""
    row = store.require_run(run)
    if row["state"] != states.QUEUED:
        raise OpsError(f"{run} is {row['state']}, not waiting in a queue: only a queued run can move "
                       f"(`opskit queue {row['target']}` shows what waits)")
    answer = get_target(store, row["target"]).queue_move_top(run)
    store.update_run(run, queue_pos=answer["position"])
    return answer


def run_details(store: Store, run: str) -> dict:
    """One run's record (refreshed from its target first), its state history and pulled files."""
    refresh(store, runs=[run])
    row = store.require_run(run)
    spec = row.get("spec") or {}
    code = {"commit": spec["code_commit"], "dirty": spec.get("code_dirty")} if "code_commit" in spec else None
    return {**row, "code": code, "events": store.events(run), "artifacts": store.artifacts(run)}
