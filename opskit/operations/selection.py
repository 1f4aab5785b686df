"""Which runs `status` shows: the default view (every unfinished run, the runs that ended last, a
count per phase and state) or what --all, --state, --phase, --target and --since select. Names are
checked here so that a typo is an error listing the valid ones, never an empty table."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime

from opskit import states
from opskit.errors import OpsError, unknown_name
from opskit.operations.targets import target_names
from opskit.store import Store

RECENT_ENDED = 20  # ended runs the default view shows, newest first
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class Selection:
    phases: tuple[str, ...] = ()
    states: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    since: float | None = None  # runs updated at or after this time
    all: bool = False

    @property
    def capped(self) -> bool:
        """The default view: ended runs limited to the latest RECENT_ENDED (--all, --state, --since lift it)."""
        return not (self.all or self.states or self.since is not None)


def split(values: list[str] | None) -> tuple[str, ...]:
    """Repeated and comma-separated values: --state failed,lost --state stalled."""
    return tuple(v.strip() for item in values or () for v in item.split(",") if v.strip())


def parse_since(text: str, now: float | None = None) -> float:
    """'30m', '2h', '3d', '1w' ago, or a date/time like 2025-05-01 or 2025-05-01T14:00 (local time)."""
    now = time.time() if now is None else now
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise OpsError(f"--since {text!r}: give an age like 30m, 2h, 3d, 1w or a date like 2025-05-01") from None


def selection(store: Store, phases=(), run_states=(), targets=(), since: str | None = None,
              all_runs: bool = False) -> Selection:
    """A Selection from the command line's words, every name checked."""
    phases, run_states, targets = split(phases), split(run_states), split(targets)
    for s in run_states:
        if s not in states.ALL_STATES:
            raise unknown_name("state", s, states.ALL_STATES)
    if phases:
        known = set(store.phases())
        missing = [p for p in phases if p not in known]
        if missing:  # a phase of the catalog that has no runs yet is fine; anything else is a typo
            catalog_phases = _catalog_phases()
            for p in missing:
                if p not in catalog_phases:
                    raise unknown_name("phase", p, sorted(known | catalog_phases))
    if targets:
        known = set(target_names(store)) | set(store.run_targets())
        for t in targets:
            if t not in known:
                raise unknown_name("target", t, sorted(known))
    return Selection(phases, run_states, targets, parse_since(since) if since else None, all_runs)


def _catalog_phases() -> set[str]:
    from opskit import catalog
    try:
        return {p for m in catalog.load_all().values() for p in m.phases}
    except OpsError:  # a broken catalog must not stop `status`
        return set()
