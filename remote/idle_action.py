"""The idle action (docs/cost-and-notifications.md): the target's `on_idle` command, run once on the
box by its supervisor when no run has been active and nothing has waited for `idle_after_s`, and only
when every finished run's artifacts were pulled (`opskit pull` leaves runs/<run>/pulled.json through
`agent.py mark-pulled`), unless `idle_even_unpulled`. Its record, <workdir>/queue/idle_action.json,
says what it waits for or what it did (`opskit status` shows it); the supervisor log gets the command
and its output. Standard library only.
"""
from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

from opskit import ledger as L
from remote.queue_dir import entries, log
from train import contract as C

RECORD = "idle_action.json"
HOLD = "idle_hold"  # in <workdir>/queue/: "<until>", written while opskit sets the box up (agent idle-hold)
TIMEOUT_S = 600.0
OUTPUT_CHARS = 2000
PULL_CHECK_S = 2.0  # how often a box waiting for `opskit pull` looks for the markers again
BUSY, IDLE, WAITING_FOR_PULL, RUNNING, RAN = (L.ACTION_BUSY, L.ACTION_IDLE, L.ACTION_WAITING_FOR_PULL,
                                            L.ACTION_RUNNING, L.ACTION_RAN)  # the record's `phase`


def unpulled(workdir: str) -> list[str]:
    """Runs whose last finished attempt on this box has not been pulled since it ended."""
    latest: dict[str, dict] = {}
    for e in entries(Path(workdir) / "queue", "finished"):
        if e.get("pid") and (e["run"] not in latest or e["seq"] > latest[e["run"]]["seq"]):
            latest[e["run"]] = e  # it ran here (an entry that could not start has nothing to pull)
    out = []
    for run, e in sorted(latest.items()):
        run_dir = C.run_dir(workdir, run)
        if not run_dir.exists():
            continue  # moved aside by a rerun: nothing of it is left to bring home
        try:
            marker = (C.read_json(run_dir / C.PULLED) or {}).get(str(e.get("attempt") or 1))
        except ValueError:
            marker = None
        if not marker or float(marker.get("as_of") or 0) < float(e.get("ended_at") or 0):
            out.append(run)
    return out


def mark_pulled(workdir: str, run: str, attempt: int, as_of: float) -> dict:
    """Record that `opskit pull` brought attempt `attempt` of `run` home as the box had it at `as_of`."""
    path = C.run_dir(workdir, run) / C.PULLED
    if not path.parent.exists():
        return {"marked": False, "reason": "no such run here"}
    try:
        marks = C.read_json(path) or {}
    except ValueError:
        marks = {}
    marks[str(attempt)] = {"as_of": as_of, "at": time.time()}
    C.atomic_write_json(path, marks)
    return {"marked": True, "run": run, "attempt": attempt}


def hold(workdir: str, seconds: float) -> dict:
    """Count the box as busy for `seconds` from now (0: no longer): opskit is preparing it."""
    path = Path(workdir) / "queue" / HOLD
    path.parent.mkdir(parents=True, exist_ok=True)
    until = time.time() + seconds if seconds > 0 else 0.0
    C.atomic_write_text(path, f"{until:.3f}\n")
    return {"held_until": until or None}


def held_until(workdir: str) -> float:
    try:
        return float((Path(workdir) / "queue" / HOLD).read_text().strip())
    except (OSError, ValueError):
        return 0.0


class IdleAction:
    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = Path(workdir) / "queue" / RECORD
        try:
            self.record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.record = {"phase": BUSY}
        if self.record.get("phase") == RUNNING:  # its supervisor died while it ran: do not run it again
            self.record.update(phase=RAN, exit_code=None, output="(the supervisor stopped while it ran)")
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the action's thread saves its outcome
        self._pull_checked_at = 0.0

    def _save(self, **fields) -> None:
        with self._lock:
            if any(self.record.get(k) != v for k, v in fields.items()):
                self.record.update(fields)
                C.atomic_write_json(self.path, self.record)

    def armed(self, config: dict) -> bool:
        """Whether it may still fire in this idle stretch (the supervisor stays up for it)."""
        return bool(config.get("on_idle")) and self.record.get("phase") not in (RUNNING, RAN)

    def tick(self, config: dict, busy: bool, now: float, ledger) -> None:
        cmd, after = config.get("on_idle"), float(config.get("idle_after_s") or 0)
        if not cmd or not after:
            return
        if busy or now < held_until(self.workdir):
            self._save(phase=BUSY, idle_since=None, unpulled=[], fires_at=None)
            return
        since = self.record.get("idle_since") or now
        if self.record.get("phase") in (RUNNING, RAN) and self.record.get("idle_since") == since:
            return  # once per idle stretch
        if now - since < after:
            return self._save(phase=IDLE, idle_since=since, cmd=cmd, fires_at=since + after, unpulled=[])
        if self.record.get("phase") == WAITING_FOR_PULL and now - self._pull_checked_at < PULL_CHECK_S:
            return
        self._pull_checked_at = now
        waiting = [] if config.get("idle_even_unpulled") else unpulled(self.workdir)
        if waiting:
            if waiting != self.record.get("unpulled"):
                log(f"idle action waits: not pulled yet: {', '.join(waiting)}")
            return self._save(phase=WAITING_FOR_PULL, idle_since=since, cmd=cmd, unpulled=waiting)
        self._save(phase=RUNNING, idle_since=since, cmd=cmd, unpulled=[], ran_at=now, exit_code=None, output="")
        log(f"idle action: no run for {now - since:.0f}s and every finished run pulled: running {cmd!r}")
        ledger.seen(now, force=True)  # a box that stops now has its ledger closed at this moment
        self._thread = threading.Thread(target=self._run, args=(cmd, ledger), name="idle-action", daemon=True)
        self._thread.start()

    def _run(self, cmd: str, ledger) -> None:
        try:
            res = subprocess.run(["bash", "-c", cmd], cwd=self.workdir, capture_output=True, text=True,
                                 timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
            code, output = res.returncode, (res.stdout + res.stderr)
        except subprocess.TimeoutExpired as e:
            code, output = None, f"{e.stdout or ''}{e.stderr or ''}\n(timed out after {TIMEOUT_S:g}s)"
        except OSError as e:
            code, output = None, f"could not run: {e}"
        if isinstance(output, bytes):
            output = output.decode(errors="replace")
        output = output[-OUTPUT_CHARS:]
        for line in output.splitlines():
            log(f"idle action output: {line}")
        log(f"idle action {cmd!r} exited with {code}")
        self._save(phase=RAN, exit_code=code, output=output, finished_at=time.time())
        ledger.note(L.IDLE_ACTION, cmd=cmd, exit_code=code)
