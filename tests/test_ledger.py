"""The box's ledger: what remote/ledger.py writes (append-only, a dead supervisor's last stretch closed
at its last sign of life, a torn line survived) and what opskit/ledger.py makes of it (held, busy,
idle, each run's share of the box, the idle stretch it is in now)."""
from __future__ import annotations

import json

import pytest

from opskit import ledger as L
from remote.ledger import Ledger, read_since

CONFIG = {"gpus": 2}


def entry(run: str, seq: int, slots=(0,)) -> dict:
    return {"run": run, "seq": seq, "attempt": 1, "slots": list(slots)}


def test_held_busy_idle_and_each_runs_share_of_the_box():
    events = [
        {"ev": L.UP, "t": 0, "slots": 2},
        {"ev": L.RUNS, "t": 10, "runs": [["a", 1, 1, 1]], "slots": 2},  # a on one of two GPUs
        {"ev": L.RUNS, "t": 40, "runs": [["a", 1, 1, 1], ["b", 1, 2, 1]], "slots": 2},
        {"ev": L.RUNS, "t": 70, "runs": [["b", 1, 2, 1]], "slots": 2},
        {"ev": L.RUNS, "t": 100, "runs": [], "slots": 2},
        {"ev": L.DOWN, "t": 130},
        {"ev": L.UP, "t": 1000, "slots": 2},  # after a stop: the 870 s between are not held
        {"ev": L.RUNS, "t": 1000, "runs": [["c", 2, 3, 2]], "slots": 2},  # c on both GPUs
        {"ev": L.RUNS, "t": 1060, "runs": [], "slots": 2},
    ]
    u = L.usage(L.intervals(events, open_until=1100), watching=True)
    assert u.held_s == 130 + 100 and u.busy_s == 90 + 60 and u.idle_s == 80
    assert u.run_s == {"a": 60, "b": 60, "c": 60}
    assert u.run_share_s == {"a": 30, "b": 30, "c": 60}
    assert (u.idle_since, u.idle_now_s) == (1060, 40)
    assert L.money(u.run_share_s["a"], 3.6) == 0.03 and L.money(10, None) is None
    closed = L.usage(L.intervals(events[:6]), watching=False)  # stopped: no idle stretch "now"
    assert closed.held_s == 130 and closed.idle_since is None
    both = closed.add(u)
    assert both.held_s == 360 and both.run_s["a"] == 120 and both.idle_since == 1060


def test_a_runs_busy_time_is_counted_from_its_ledger_lines_only():
    events = [{"ev": L.UP, "t": 0, "slots": 1}, {"ev": L.RUNS, "t": 5, "runs": [["a", 1, 1, 1]], "slots": 1}]
    assert L.usage(L.intervals(events, open_until=65), watching=True).run_s == {"a": 60}
    unknown_end = L.usage(L.intervals(events), watching=False)  # the open stretch counts only once closed
    assert unknown_end.held_s == 5 and unknown_end.run_s == {}


def test_the_writer_appends_and_a_dead_supervisors_stretch_ends_when_it_was_last_seen(tmp_path):
    wd = str(tmp_path)
    first = Ledger(wd)
    first.up(CONFIG)
    first.observe(CONFIG, [entry("a", 1)], now=first.last_seen() + 1)
    seen = first.last_seen()
    # killed here (no `down`); the box reboots; a new supervisor starts much later
    second = Ledger(wd)
    second.up(CONFIG)
    events = L.parse((tmp_path / "queue" / L.LEDGER).read_text())
    assert [e["ev"] for e in events] == [L.NEW, L.UP, L.RUNS, L.DOWN, L.UP]
    assert events[3]["unclean"] and events[3]["t"] == pytest.approx(max(seen, events[2]["t"]), abs=0.01)
    second.observe(CONFIG, [], now=events[4]["t"] + 1)
    second.down()
    u = L.usage(L.intervals(L.parse((tmp_path / "queue" / L.LEDGER).read_text())), watching=False)
    assert u.busy_s == pytest.approx(max(0.0, seen - events[2]["t"]), abs=0.01)


def test_a_torn_last_line_is_skipped_and_the_next_event_starts_a_new_line(tmp_path):
    wd = str(tmp_path)
    ledger = Ledger(wd)
    ledger.up(CONFIG)
    with open(tmp_path / "queue" / L.LEDGER, "a") as f:
        f.write('{"ev": "runs", "t": 12')  # a crash in the middle of a write
    Ledger(wd).up(CONFIG)
    lines = (tmp_path / "queue" / L.LEDGER).read_text().splitlines()
    assert lines[2] == '{"ev": "runs", "t": 12' and json.loads(lines[-1])["ev"] == L.UP
    assert [e["ev"] for e in L.parse("\n".join(lines))] == [L.NEW, L.UP, L.DOWN, L.UP]


def test_opskit_reads_only_new_whole_lines_and_notices_a_new_ledger(tmp_path):
    wd = str(tmp_path)
    assert read_since(wd)["id"] is None
    ledger = Ledger(wd)
    ledger.up(CONFIG)
    whole = read_since(wd)
    assert whole["offset"] == 0 and whole["id"] and whole["text"].count("\n") == 2
    ledger.observe(CONFIG, [entry("a", 1)])
    more = read_since(wd, whole["size"], whole["id"])
    assert more["offset"] == whole["size"] and [e["ev"] for e in L.parse(more["text"])] == [L.RUNS]
    assert read_since(wd, whole["size"], "another-box")["offset"] == 0  # a different ledger: from the start
    with open(tmp_path / "queue" / L.LEDGER, "a") as f:
        f.write('{"ev": "runs"')  # being written right now
    assert read_since(wd, more["size"], whole["id"])["text"] == ""
