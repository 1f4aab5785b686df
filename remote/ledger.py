"""The box's ledger, written by the target's supervisor (format: opskit/ledger.py; docs/cost-and-notifications.md).

Append-only and crash-safe: each event is one line written with a single O_APPEND write and fsynced;
the time the supervisor was last seen is rewritten every few seconds beside it, so a supervisor that
dies (kill -9, a reboot, the box stopped) has its last stretch closed at that time by the next one.
Standard library only.
"""
from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path

from opskit import ledger as L
from opskit import queue as Q
from train import contract as C


def _qdir(workdir: str) -> Path:
    return Path(workdir) / "queue"


def active_runs(started: list[dict]) -> list[list]:
    """[[run, attempt, seq, units], ...] of the started entries, in seq order."""
    return [[e["run"], int(e.get("attempt") or 1), int(e["seq"]), max(1, len(e.get("slots") or [0]))]
            for e in sorted(started, key=lambda e: e["seq"])]


class Ledger:
    def __init__(self, workdir: str):
        self.path = _qdir(workdir) / L.LEDGER
        self.seen_path = _qdir(workdir) / L.SEEN
        self.active: list | None = None
        self._seen_at = 0.0

    def _append(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def _last_event(self) -> dict | None:
        """The last complete event; a torn last line (a crash mid-write) is ended with a newline first."""
        try:
            with open(self.path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.path) - 4096))
                tail = f.read()
        except FileNotFoundError:
            return None
        if tail and not tail.endswith(b"\n"):
            self._append("\n")
        events = L.parse(tail.decode(errors="replace"))
        return events[-1] if events else None

    def up(self, config: dict) -> None:
        """A supervisor starts watching: close the previous one's stretch if it died, then `up`."""
        now = time.time()
        last = self._last_event()
        if last is None and (not self.path.exists() or self.path.stat().st_size == 0):
            self._append(L.event(L.NEW, now, id=secrets.token_hex(8)))
        elif last is not None and last["ev"] != L.DOWN:
            seen = self.last_seen()
            self._append(L.event(L.DOWN, max(float(last["t"]), min(seen or 0.0, now)), unclean=True))
        self._append(L.event(L.UP, now, pid=os.getpid(), host=socket.gethostname(), slots=Q.slot_count(config)))
        self.active = []
        self.seen(now, force=True)

    def observe(self, config: dict, started: list[dict], now: float | None = None) -> None:
        """Record a change of the active runs (busy = at least one); keep `seen` fresh."""
        now = time.time() if now is None else now
        runs = active_runs(started)
        if runs != self.active:
            self._append(L.event(L.RUNS, now, runs=runs, slots=Q.slot_count(config)))
            self.active = runs
        self.seen(now)

    def note(self, ev: str, **fields) -> None:
        self._append(L.event(ev, time.time(), **fields))

    def seen(self, now: float, force: bool = False) -> None:
        if force or now - self._seen_at >= L.SEEN_EVERY_S:
            C.atomic_write_text(self.seen_path, f"{now:.3f}\n")
            self._seen_at = now

    def last_seen(self) -> float | None:
        try:
            return float(self.seen_path.read_text().strip())
        except (OSError, ValueError):
            return None

    def down(self) -> None:
        now = time.time()
        self._append(L.event(L.DOWN, now))
        self.seen(now, force=True)


def read_since(workdir: str, offset: int = 0, ledger_id: str | None = None) -> dict:
    """The ledger's text from byte `offset` (whole lines only) when `ledger_id` is still its id, else
    from the start; with its id, size, and the time its supervisor was last seen (agent box-state)."""
    path = _qdir(workdir) / L.LEDGER
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {"id": None, "offset": 0, "size": 0, "text": "", "seen": None}
    first = L.parse(data[:data.find(b"\n") + 1].decode(errors="replace"))
    current = first[0].get("id") if first and first[0]["ev"] == L.NEW else None
    if ledger_id != current or offset > len(data):
        offset = 0
    end = data.rfind(b"\n") + 1
    try:
        seen = float((_qdir(workdir) / L.SEEN).read_text().strip())
    except (OSError, ValueError):
        seen = None
    return {"id": current, "offset": offset, "size": max(end, offset),
            "text": data[offset:end].decode(errors="replace") if end > offset else "", "seen": seen}
