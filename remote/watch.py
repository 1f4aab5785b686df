"""What a target's supervisor does for the researcher besides starting runs
(docs/cost-and-notifications.md): the ledger of busy and idle time (remote/ledger.py), notifications
(remote/notify.py) and the idle action (remote/idle_action.py).

The supervisor calls `begin` when it starts, `tick` on every pass (under the queue lock: nothing here
waits on the network or a command) and `end` when it exits; `keep_alive` says whether it must stay up
with nothing to run. A failure here is logged and never stops the queue. Standard library only.
"""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from opskit import queue as Q
from opskit import states
from remote import notify as N
from remote import processes
from remote.idle_action import IdleAction
from remote.ledger import Ledger
from remote.queue_dir import log
from train import contract as C

STALL_CHECK_S = 10.0
MAX_NOTICE_AGE_S = 86400.0  # a run that ended longer ago than this (an old queue) is not announced
NOTIFIED = "notified"  # queue/notify/notified: seqs of finished entries already announced, one a line


def observe_run(workdir: str, entry: dict, now: float, rules: dict | None = None) -> tuple[str, str]:
    """(state, reason) of a queue entry's run through opskit.states, as opskit itself would derive it
    (a heartbeat of another attempt says nothing of this one)."""
    run_dir = C.run_dir(workdir, entry["run"])
    facts = processes.run_facts(run_dir)
    attempt = int(entry.get("attempt") or 1)
    if (facts["status"] or {}).get("attempt", attempt) != attempt:
        facts = {**facts, "status": None}
    try:
        log_every = (C.read_json(run_dir / C.SPEC) or {}).get("log_every")
    except ValueError:
        log_every = None
    return states.derive_state(states.observed(facts, now), log_every=log_every, **(rules or {}))


class RunNotices:
    """Which runs ended or stalled since the last pass, and whether the queue just drained."""

    def __init__(self, workdir: str, outbox: N.Outbox):
        self.workdir = workdir
        self.outbox = outbox
        self.path = Path(workdir) / "queue" / N.NOTIFY_DIR / NOTIFIED
        self.notified: set[int] | None = None
        self.stalled: set[int] = set()
        self.ended: dict[str, int] = {}
        self.had_work = False
        self._checked_at = 0.0

    @staticmethod
    def _finished(d: Path) -> set[int]:
        return {int(p.stem) for p in (d / "finished").glob("*.json") if p.stem.isdigit()}

    def _load(self, d: Path) -> None:
        try:
            self.notified = {int(x) for x in self.path.read_text().split()}
        except (OSError, ValueError):  # notifications just switched on: what ended before is history
            self.notified = self._finished(d)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            C.atomic_write_text(self.path, "".join(f"{s}\n" for s in sorted(self.notified)))

    def _mark(self, seq: int) -> None:
        self.notified.add(seq)
        with open(self.path, "a") as f:
            f.write(f"{seq}\n")

    def tick(self, config: dict, d: Path, started: list[dict], pending: list[dict], busy: bool, now: float) -> None:
        urls = list(config.get("notify") or [])
        if not urls:
            self.had_work = busy
            return
        if self.notified is None:
            self._load(d)
        target = config.get("target") or socket.gethostname()
        for seq in sorted(self._finished(d) - self.notified):
            try:
                entry = json.loads((d / "finished" / f"{seq:06d}.json").read_text())
            except (OSError, ValueError):
                entry = None
            msg = self._ended(entry, started + pending, target, now) if entry else None
            if msg:  # into the outbox before it counts as announced: a crash between repeats, never loses
                self.outbox.add(urls, msg)
                self.ended[msg["state"]] = self.ended.get(msg["state"], 0) + 1
            self._mark(seq)
        if now - self._checked_at >= STALL_CHECK_S:
            self._checked_at = now
            self._stalls(config, started, target, urls, now)
        if self.had_work and not busy and self.ended:
            self.outbox.add(urls, N.drained_message(target, self.ended, len(pending), now))
            self.ended = {}
        self.had_work = busy

    def _ended(self, entry: dict, live: list[dict], target: str, now: float) -> dict | None:
        attempt = int(entry.get("attempt") or 1)
        if any(e["run"] == entry["run"] and int(e.get("attempt") or 1) > attempt for e in live):
            return None  # stopped for a new attempt (resume): not news
        if now - float(entry.get("ended_at") or now) > MAX_NOTICE_AGE_S:
            return None
        if entry.get("error"):
            state, reason = states.FAILED, f"the target's queue could not start it: {entry['error']}"
        else:
            state, reason = observe_run(self.workdir, entry, now)
            if state not in states.ENDED:
                return None
        return N.run_message(N.EVENT_ENDED, target, entry["run"], attempt, state, reason,
                             C.run_dir(self.workdir, entry["run"]), now)

    def _stalls(self, config: dict, started: list[dict], target: str, urls: list[str], now: float) -> None:
        rules = states.stall_rules(config)
        for e in started:
            if not e.get("pid"):
                continue
            state, reason = observe_run(self.workdir, e, now, rules)
            if state == states.STALLED and e["seq"] not in self.stalled:
                self.stalled.add(e["seq"])
                self.outbox.add(urls, N.run_message(N.EVENT_STALLED, target, e["run"], int(e.get("attempt") or 1),
                                                    state, reason, C.run_dir(self.workdir, e["run"]), now))
            elif state != states.STALLED:
                self.stalled.discard(e["seq"])


class BoxWatch:
    def __init__(self, workdir: str):
        self.workdir = workdir
        self.ledger = Ledger(workdir)
        self.outbox = N.Outbox(workdir)
        self.notices = RunNotices(workdir, self.outbox)
        self.idle = IdleAction(workdir)
        self.sender: N.Sender | None = None

    def _guard(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # a full disk, a bug: logged; the queue goes on
            log(f"{what}: {type(e).__name__}: {e}")

    def begin(self, config: dict) -> None:
        self._guard("ledger", self.ledger.up, config)
        self.sender = N.Sender(self.outbox).start()

    def tick(self, config: dict, d: Path, started: list[dict], pending: list[dict], run_states: dict) -> None:
        now = time.time()
        busy = bool(started) or any(not Q.blocked(config, e, run_states) for e in pending)
        self._guard("ledger", self.ledger.observe, config, started, now)
        self._guard("notifications", self.notices.tick, config, d, started, pending, busy, now)
        self._guard("idle action", self.idle.tick, config, busy, now, self.ledger)

    def keep_alive(self, config: dict) -> bool:
        """A priced box keeps its ledger, an armed idle action waits its time, messages wait to go."""
        priced = config.get("price_per_hour") is not None
        return priced or self.idle.armed(config) or self.outbox.pending() > 0

    def end(self) -> None:
        self._guard("ledger", self.ledger.down)
        if self.sender is not None:
            self.sender.stop()
