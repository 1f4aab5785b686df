"""The box's ledger (docs/cost-and-notifications.md): the time a target's supervisor watched the box
and which runs were active, appended to <workdir>/queue/ledger.jsonl on the box; and what that time
costs. Pure and standard library only: remote/ledger.py writes the file on the box, opskit reads it.

One JSON object per line, each with `ev` and `t` (Unix time on the box):

    new          the file was created; `id` names this ledger (a new box or workdir starts another)
    up           a supervisor started watching (`pid`, `host`, `slots`: GPUs, or run slots on a CPU box)
    runs         the active runs changed: `runs` [[run, attempt, seq, units], ...] (empty: idle), `slots`
    down         the supervisor stopped watching; `unclean`: it died, `t` is the last time it was seen
    idle_action  the idle action ran: `cmd`, `exit_code`
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

LEDGER = "ledger.jsonl"  # in <workdir>/queue/
SEEN = "ledger.seen"  # the time the running supervisor was last seen, rewritten every SEEN_EVERY_S
SEEN_EVERY_S = 5.0
NEW, UP, RUNS, DOWN, IDLE_ACTION = "new", "up", "runs", "down", "idle_action"
# The idle action's record (<workdir>/queue/idle_action.json, remote/idle_action.py): its `phase`.
ACTION_BUSY, ACTION_IDLE, ACTION_WAITING_FOR_PULL, ACTION_RUNNING, ACTION_RAN = (
    "busy", "idle", "waiting for pull", "running", "ran")


def watched(config: dict) -> bool:
    """A box whose supervisor keeps watch with nothing to run: it has a price (its idle time counts) or
    an idle action (a target config, as opskit stores it and as the box's queue config holds it)."""
    return config.get("price_per_hour") is not None or bool(config.get("on_idle"))


def event(ev: str, t: float, **fields) -> str:
    """One line of the ledger."""
    return json.dumps({"ev": ev, "t": round(t, 3), **fields}, sort_keys=True) + "\n"


def parse(text: str) -> list[dict]:
    """The events of a ledger's text; a torn or foreign line is skipped."""
    out = []
    for line in text.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and "ev" in e and isinstance(e.get("t"), (int, float)):
            out.append(e)
    return out


@dataclass(frozen=True)
class Interval:
    """A stretch of watched time with one set of active runs ((run, attempt, units), ...)."""

    start: float
    end: float
    runs: tuple = ()
    slots: int = 1

    @property
    def seconds(self) -> float:
        return max(0.0, self.end - self.start)


def intervals(events: list[dict], open_until: float | None = None) -> list[Interval]:
    """The watched intervals of a ledger. A stretch still open at its end (the supervisor runs, or died
    without a `down`) is closed at `open_until` (now, or the time it was last seen)."""
    out: list[Interval] = []
    start: float | None = None
    runs: tuple = ()
    slots = 1
    last_t = None
    for e in events:
        t = float(e["t"])
        if e["ev"] == UP:
            if start is not None:  # a supervisor that vanished without a trace: close at its last event
                out.append(Interval(start, last_t or t, runs, slots))
            start, runs, slots = t, (), int(e.get("slots") or 1)
        elif e["ev"] == RUNS and start is not None:
            out.append(Interval(start, t, runs, slots))
            start, slots = t, int(e.get("slots") or slots)
            runs = tuple((r[0], int(r[1]), int(r[3])) for r in e.get("runs") or [])
        elif e["ev"] == DOWN and start is not None:
            out.append(Interval(start, max(t, start), runs, slots))
            start, runs = None, ()
        last_t = t
    if start is not None and open_until is not None:
        out.append(Interval(start, max(open_until, start), runs, slots))
    return [i for i in out if i.seconds > 0]


@dataclass
class Usage:
    """What a box's watched time was spent on. Run seconds are wall seconds a run was active; its
    share is units/slots of the box while it was (one of two GPUs: half)."""

    held_s: float = 0.0
    busy_s: float = 0.0
    run_s: dict[str, float] = field(default_factory=dict)
    run_share_s: dict[str, float] = field(default_factory=dict)
    idle_since: float | None = None  # start of the idle stretch the box is in now (None: busy or unwatched)
    idle_now_s: float = 0.0  # watched seconds of that stretch

    @property
    def idle_s(self) -> float:
        return self.held_s - self.busy_s

    def add(self, other: "Usage") -> "Usage":
        out = Usage(self.held_s + other.held_s, self.busy_s + other.busy_s, dict(self.run_s), dict(self.run_share_s))
        for mine, theirs in ((out.run_s, other.run_s), (out.run_share_s, other.run_share_s)):
            for run, s in theirs.items():
                mine[run] = mine.get(run, 0.0) + s
        latest = other if (other.idle_since or 0) >= (self.idle_since or 0) else self
        out.idle_since, out.idle_now_s = latest.idle_since, latest.idle_now_s
        return out


def usage(spans: list[Interval], watching: bool) -> Usage:
    """Held, busy and idle seconds, and each run's; `watching`: the last interval reaches now (a live
    supervisor), so a trailing idle stretch is the box's idle time right now."""
    u = Usage()
    for i in spans:
        u.held_s += i.seconds
        if i.runs:
            u.busy_s += i.seconds
        for run, _attempt, units in i.runs:
            u.run_s[run] = u.run_s.get(run, 0.0) + i.seconds
            u.run_share_s[run] = u.run_share_s.get(run, 0.0) + i.seconds * units / max(1, i.slots)
    if watching and spans and not spans[-1].runs:
        for i in reversed(spans):
            if i.runs:
                break
            u.idle_since, u.idle_now_s = i.start, u.idle_now_s + i.seconds
    return u


def money(seconds: float, price_per_hour: float | None) -> float | None:
    """What `seconds` cost at `price_per_hour` (None without a price)."""
    return None if price_per_hour is None else round(seconds / 3600.0 * float(price_per_hour), 4)
