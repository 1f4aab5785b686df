"""`opskit status` at research scale, as a user runs it: real `opskit` processes on a real store.

The default view stays the same size as history grows (unfinished runs, the 20 that ended last, a
count per phase), selections pick the rest, typos list the valid names, ended runs are never asked
about again, and a failed run says why."""
import json
import os
import subprocess
import sys
import time

import pytest

from opskit.store import SCHEMA_VERSION, Store
from opskit.store_migrations import _migration_1
from remote import queue_dir
from test_queue import stop_daemons

N_ENDED = 45


def opskit(state, *args, env=None):
    env = {**os.environ, "OPSKIT_STATE": str(state), "OMP_NUM_THREADS": "1", "COLUMNS": "250", **(env or {})}
    return subprocess.run([sys.executable, "-m", "opskit.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    """45 ended runs over three phases on a target that no longer exists (never contacted: they
    ended), and two runs queued on the local target (its agent is asked about them)."""
    path = tmp_path_factory.mktemp("status") / "state.db"
    now = time.time()
    with Store(path) as store:
        for i in range(N_ENDED):
            phase = ("p0", "p1", "sweep")[i % 3]
            state = ("done", "done", "failed", "cancelled", "lost")[i % 5]
            name = f"{phase}/c{i}/s{i}"
            store.upsert_run({"name": name, "phase": phase, "config": f"c{i}", "seed": i, "target": "gone-box",
                              "attempt": 1, "state": "queued", "created_at": now - 86400 * 3 + i}, reason="new")
            reason = "exit code 1: CUDA out of memory" if state == "failed" else f"{state} for a reason"
            store.update_run(name, state=state, reason=reason, ended_at=now - 86400 * 2 + i * 60,
                             tokens_per_s=1000.0 + i)
        for i in range(2):
            store.upsert_run({"name": f"p1/live/s{i}", "phase": "p1", "config": "live", "seed": i, "target": "local",
                              "attempt": 1, "state": "queued"}, reason="new")
    workdir = path.parent / ".opskit" / "local"  # where the local target keeps its queue
    for i in range(2):  # really waiting in that queue (for a run that never comes), as a launch leaves them
        queue_dir.enqueue(str(workdir), {"run": f"p1/live/s{i}", "command": ["true"], "after": ["p1/blocker/s0"]}, None)
    yield path
    stop_daemons(workdir)


def rows(out):
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_default_view_shows_unfinished_and_latest_ended_and_counts_per_phase(state):
    out = opskit(state, "status")
    assert out.returncode == 0, out.stderr
    shown = [line.split("│")[1].strip() for line in out.stdout.splitlines() if line.startswith("│")]
    latest = [f"{('p0', 'p1', 'sweep')[i % 3]}/c{i}/s{i}" for i in range(N_ENDED - 20, N_ENDED)]
    assert sorted(shown) == sorted(latest + ["p1/live/s0", "p1/live/s1"])
    assert "p0: 6 done, 3 cancelled, 3 failed, 3 lost" in out.stdout
    assert "p1: " in out.stdout and "2 queued" in out.stdout and "sweep: " in out.stdout
    assert f"showing 22 of {N_ENDED + 2} runs" in out.stdout and "--all" in out.stdout
    assert "unreachable" not in out.stdout  # the ended runs' target is gone: nobody asked it
    assert "tok/s last" in out.stdout and "why" in out.stdout
    failed = next(line for line in out.stdout.splitlines() if "│ failed" in line)
    assert "exit code 1: CUDA out of memory" in failed  # why it failed, in the table


def test_selections_and_json_return_every_selected_run(state):
    assert len(rows(opskit(state, "status", "--json"))) == N_ENDED + 2  # --json is never capped
    failed = rows(opskit(state, "status", "--state", "failed", "--json"))
    assert len(failed) == N_ENDED // 5 and {r["state"] for r in failed} == {"failed"}
    assert failed[0]["reason"] == "exit code 1: CUDA out of memory"
    both = rows(opskit(state, "status", "--state", "failed,lost", "--phase", "p0", "--json"))
    assert {(r["phase"], r["state"]) for r in both} == {("p0", "failed"), ("p0", "lost")} and len(both) == 6
    assert len(rows(opskit(state, "status", "--target", "local", "--json"))) == 2
    assert len(rows(opskit(state, "status", "--since", "1d", "--json"))) == N_ENDED + 2  # updated just now
    assert rows(opskit(state, "status", "--since", "2030-01-01", "--json")) == []
    table = opskit(state, "status", "--all")
    assert table.returncode == 0 and "showing" not in table.stdout
    assert sum(line.startswith("│") for line in table.stdout.splitlines()) == N_ENDED + 2


@pytest.mark.parametrize("args, words", [
    (["--state", "faild"], ["unknown state 'faild'", "did you mean failed", "valid: queued,"]),
    (["--phase", "p9"], ["unknown phase 'p9'", "valid:", "sweep"]),
    (["--target", "nobox"], ["unknown target 'nobox'", "gone-box", "local"]),
    (["--since", "yesterday"], ["--since 'yesterday'", "30m, 2h, 3d"]),
])
def test_unknown_names_are_one_line_listing_the_valid_ones(state, args, words):
    out = opskit(state, "status", *args)
    assert out.returncode != 0 and out.stdout == "" and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert all(w in out.stderr for w in words), out.stderr


def test_a_catalog_phase_without_runs_is_an_empty_selection_not_an_error(state):
    assert rows(opskit(state, "status", "--phase", "demo", "--json")) == []


def test_a_store_of_schema_1_is_migrated_with_each_runs_reason(tmp_path):
    import sqlite3
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    _migration_1(conn)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.execute("INSERT INTO runs (name, phase, config, seed, target, state) VALUES ('a/b/s1', 'a', 'b', 1, 'local', "
                 "'failed')")
    conn.executemany("INSERT INTO events (run, time, attempt, from_state, to_state, reason) VALUES (?, ?, 1, ?, ?, ?)",
                     [("a/b/s1", 1.0, None, "queued", "new"), ("a/b/s1", 2.0, "queued", "failed", "exit code 3")])
    conn.close()
    with Store(path) as store:
        assert store.schema_version == SCHEMA_VERSION == 3
        assert store.get_run("a/b/s1")["reason"] == "exit code 3"
        plan = " ".join(r[3] for r in store.conn.execute(
            "EXPLAIN QUERY PLAN SELECT phase, state, COUNT(*) FROM runs GROUP BY phase, state"))
        assert "idx_runs_phase_state" in plan  # counted from the index, not the table
