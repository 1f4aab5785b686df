"""The run store on real SQLite: schema, events, and two writer processes at once."""
import multiprocessing as mp
import sqlite3

import pytest

from opskit.errors import OpsError
from opskit.store import SCHEMA_VERSION, Store


def _run(name, state="queued"):
    return {"name": name, "phase": "demo", "config": "geo_500k", "seed": 42, "target": "local", "state": state,
            "spec": {"seed": 42}}


def test_schema_version_and_wal(tmp_path):
    store = Store(tmp_path / "state.db")
    assert store.schema_version == SCHEMA_VERSION
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    Store(tmp_path / "state.db").close()  # reopening does not re-run migrations


def test_newer_schema_is_refused(tmp_path):
    Store(tmp_path / "state.db").close()
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(OpsError, match="schema version 99, newer"):
        Store(tmp_path / "state.db")


def test_state_changes_are_events_and_json_round_trips(tmp_path):
    store = Store(tmp_path / "state.db")
    store.upsert_run(_run("demo/geo_500k/s42"), reason="launched")
    store.update_run("demo/geo_500k/s42", state="training", reason="heartbeat", step=5, loss=4.5)
    store.update_run("demo/geo_500k/s42", step=6)  # no state change: no event
    row = store.get_run("demo/geo_500k/s42")
    assert (row["state"], row["step"], row["loss"], row["spec"]) == ("training", 6, 4.5, {"seed": 42})
    assert [(e["from_state"], e["to_state"], e["reason"]) for e in store.events("demo/geo_500k/s42")] == [
        (None, "queued", "launched"), ("queued", "training", "heartbeat")]
    with pytest.raises(OpsError, match="unknown run 'demo/geo_500k/s4'.*did you mean demo/geo_500k/s42"):
        store.require_run("demo/geo_500k/s4")


def test_targets_keep_no_secrets_and_refuse_duplicates(tmp_path):
    store = Store(tmp_path / "state.db")
    store.add_target("box1", "ssh", {"host": "h", "key": "~/.ssh/id"})
    with pytest.raises(OpsError, match="exists"):
        store.add_target("box1", "ssh", {})
    assert store.get_target("box1")["config"] == {"host": "h", "key": "~/.ssh/id"}
    store.remove_target("box1")
    assert store.list_targets() == []


def _writer(path, prefix, n, errors):
    try:
        store = Store(path)
        for i in range(n):
            name = f"demo/{prefix}/s{i}"
            store.upsert_run(_run(name), reason="launched")
            store.update_run(name, state="training", reason="heartbeat", step=i)
            store.record_artifact(name, "results.json", i, "0" * 64)
        store.close()
    except Exception as e:  # reported to the parent: a locked database must never surface
        errors.put(repr(e))


def test_two_concurrent_writers_never_see_database_locked(tmp_path):
    path = tmp_path / "state.db"
    Store(path).close()
    errors = mp.Queue()
    procs = [mp.Process(target=_writer, args=(path, p, 150, errors)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert errors.empty(), errors.get()
    assert all(p.exitcode == 0 for p in procs)
    store = Store(path)
    assert len(store.list_runs()) == 300
    assert store.count("events") == 600
    assert store.count("artifacts") == 300
    assert {r["state"] for r in store.list_runs()} == {"training"}
