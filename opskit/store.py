"""The run store: one SQLite file (`state.db`) through sqlite-utils.

WAL mode and a busy timeout let several `opskit` commands write at once; every state change is
appended to `events`. JSON columns only, never pickles. Schema changes are numbered migrations.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import sqlite_utils

from opskit import store_path
from opskit.errors import OpsError, unknown_name
from opskit.states import ALL_STATES
from opskit.store_path import StoreError

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 30_000
DEFAULT_PATH = "state.db"


def _migration_1(db: sqlite_utils.Database) -> None:
    db["targets"].create({"name": str, "kind": str, "config": str, "created_at": float}, pk="name")
    db["runs"].create({
        "name": str, "matrix": str, "phase": str, "config": str, "seed": int, "target": str,
        "attempt": int, "state": str, "stale": int, "cancel_requested": int,
        "created_at": float, "started_at": float, "ended_at": float, "updated_at": float,
        "step": int, "total_steps": int, "tokens": int, "loss": float, "tokens_per_s": float,
        "eta_s": float, "cache_bytes": int, "cache_tokens": int, "cache_target_tokens": int,
        "heartbeat_at": float, "checkpoint_step": int, "message": str,
        "pid": int, "job_id": str, "exit_code": int, "run_dir": str, "spec": str, "after": str,
        "queue_pos": int, "gpus": str,
    }, pk="name", not_null={"phase", "config", "seed", "target", "state"},
        defaults={"attempt": 1, "stale": 0, "cancel_requested": 0})
    db["runs"].create_index(["phase"])
    db["runs"].create_index(["target", "state"])
    db["events"].create({"id": int, "run": str, "time": float, "attempt": int, "from_state": str,
                         "to_state": str, "reason": str}, pk="id")
    db["events"].create_index(["run"])
    db["artifacts"].create({"id": int, "run": str, "path": str, "size": int, "sha256": str,
                            "pulled_at": float}, pk="id")
    db["artifacts"].create_index(["run", "path"], unique=True)
    db["gates"].create({"id": int, "matrix": str, "phase": str, "decided_at": float, "decision": str}, pk="id")


def _migration_2(db: sqlite_utils.Database) -> None:
    """GPU samples of a run's heartbeat; what opskit last read of each box's ledger (cost, status)."""
    for col in ("gpu_util", "gpu_mem_mb", "gpu_power_w"):
        db["runs"].add_column(col, float)
    db["box_records"].create({"target": str, "key": str, "data": str, "fetched_at": float}, pk=("target", "key"))


MIGRATIONS = {1: _migration_1, 2: _migration_2}


class Store:
    """All reads and writes of state.db. Open one per command; it is cheap.

    `create`: make the file when it does not exist (its directory must). A store knows where it was
    created: a copy whose original still exists is refused (it would drive the original's local runs),
    a moved one re-points the targets kept beside it (`notes` says so); `adopt` makes a copy its own.
    Any SQLite failure is a StoreError that names the file and what to do."""

    def __init__(self, path: str | os.PathLike = DEFAULT_PATH, create: bool = True, adopt: bool = False):
        self.path = Path(path)
        self.notes: list[str] = []
        store_path.check_file(store_path.StoreChoice(self.path, "path"), create)
        self.created = not self.path.exists()
        conn = None
        try:
            conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            self.db = sqlite_utils.Database(conn)
            self._migrate()
            self._check_identity(adopt)
        except sqlite3.Error as e:
            if conn is not None:
                conn.close()
            raise StoreError(store_path.describe(self.path, e)) from None
        except BaseException:
            if conn is not None:
                conn.close()
            raise

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.db.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A write transaction taken up front (BEGIN IMMEDIATE), so concurrent writers queue, not fail.

        Nested use joins the outer transaction (which commits or rolls back the whole)."""
        conn = self.db.conn
        if conn.in_transaction:
            yield
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _migrate(self) -> None:
        with self.transaction():
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise StoreError(f"the run store {self.path} has schema version {version}, newer than this "
                                 f"opskit ({SCHEMA_VERSION}): upgrade opskit (pip install -U), or use the "
                                 f"opskit that wrote it")
            for v in range(version + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[v](self.db)
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return row[0] if row else None

    def _check_identity(self, adopt: bool) -> None:
        here = str(self.path.resolve())
        recorded = self._meta("store_path")
        if recorded == here:
            return
        if recorded is not None and not adopt and Path(recorded).exists():
            local = self.get_target("local")
            runs = f" (its local runs live in {local['config'].get('workdir')})" if local else ""
            raise StoreError(f"{here} is a copy of the run store {recorded}, which still exists{runs}: use that "
                             f"one (--state {recorded}), or make this copy a store of its own with "
                             f"`opskit store adopt --state {here}`")
        with self.transaction():
            if recorded is not None:
                moved = self._repoint(Path(recorded).parent / ".opskit", self.path.resolve().parent / ".opskit")
                if moved:
                    self.notes.append(f"the run store was at {recorded}; targets {', '.join(moved)} now keep "
                                      f"their runs beside it, in {self.path.resolve().parent / '.opskit'}")
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('store_path', ?)", [here])

    def _repoint(self, old: Path, new: Path) -> list[str]:
        """Targets whose workdir lay beside the store's old place (and their runs' paths) move with it."""
        def moved(path: str | None) -> str | None:
            if path and (path == str(old) or path.startswith(f"{old}/")):
                return str(new) + path[len(str(old)):]
            return None
        names = []
        for t in self.list_targets():
            workdir = moved(t["config"].get("workdir"))
            if workdir:
                self.db["targets"].update(t["name"], {"config": json.dumps({**t["config"], "workdir": workdir})})
                names.append(t["name"])
        for run in self.list_runs():
            if run["target"] not in names:
                continue
            spec = run["spec"] or {}
            spec = {**spec, **{k: moved(spec[k]) for k in ("out_dir", "cache_dir") if moved(spec.get(k))}}
            self.db["runs"].update(run["name"], {"run_dir": moved(run["run_dir"]) or run["run_dir"],
                                                 "spec": json.dumps(spec) if run["spec"] else None})
        return names

    @property
    def schema_version(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])

    # ------------------------------------------------------------ targets

    def add_target(self, name: str, kind: str, config: dict, replace: bool = False) -> None:
        with self.transaction():
            if not replace and self.db["targets"].count_where("name = ?", [name]):
                raise OpsError(f"target '{name}' exists; remove it first (opskit targets remove {name})")
            self.db["targets"].insert({"name": name, "kind": kind, "config": json.dumps(config),
                                       "created_at": time.time()}, replace=True)

    def get_target(self, name: str) -> dict | None:
        rows = list(self.db["targets"].rows_where("name = ?", [name]))
        return _target_row(rows[0]) if rows else None

    def list_targets(self) -> list[dict]:
        return [_target_row(r) for r in self.db["targets"].rows_where(order_by="name")]

    def remove_target(self, name: str) -> None:
        with self.transaction():
            if not self.db["targets"].count_where("name = ?", [name]):
                raise unknown_name("target", name, [t["name"] for t in self.list_targets()])
            self.db["targets"].delete(name)

    # ------------------------------------------------------------ runs

    def get_run(self, name: str) -> dict | None:
        rows = list(self.db["runs"].rows_where("name = ?", [name]))
        return _run_row(rows[0]) if rows else None

    def require_run(self, name: str) -> dict:
        run = self.get_run(name)
        if run is None:
            raise unknown_name("run", name, [r["name"] for r in self.list_runs()])
        return run

    def list_runs(self, phase: str | None = None, target: str | None = None, states: tuple[str, ...] = ()) -> list[dict]:
        where, args = [], []
        if phase:
            where.append("phase = ?"), args.append(phase)
        if target:
            where.append("target = ?"), args.append(target)
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})"), args.extend(states)
        rows = self.db["runs"].rows_where(" AND ".join(where) or None, args, order_by="created_at, name")
        return [_run_row(r) for r in rows]

    def upsert_run(self, row: dict, reason: str) -> None:
        """Create a run (or replace it for a rerun/new attempt) and log the event."""
        _check_state(row["state"])
        now = time.time()
        with self.transaction():
            old = self.get_run(row["name"])
            record = {**row, "updated_at": now}
            record.setdefault("created_at", old["created_at"] if old else now)
            if isinstance(record.get("spec"), dict):
                record["spec"] = json.dumps(record["spec"])
            self.db["runs"].insert(record, replace=True)
            self._event(row["name"], record.get("attempt", 1), old["state"] if old else None, row["state"], reason, now)

    def update_run(self, name: str, reason: str | None = None, **fields: Any) -> None:
        """Update fields; a change of `state` is logged as an event (with `reason`)."""
        if "state" in fields:
            _check_state(fields["state"])
        now = time.time()
        with self.transaction():
            old = self.get_run(name)
            if old is None:
                raise unknown_name("run", name, [])
            fields["updated_at"] = now
            if "spec" in fields and isinstance(fields["spec"], dict):
                fields["spec"] = json.dumps(fields["spec"])
            self.db["runs"].update(name, fields)
            new_state = fields.get("state")
            if new_state and new_state != old["state"]:
                self._event(name, fields.get("attempt", old["attempt"]), old["state"], new_state, reason or "", now)

    def _event(self, run: str, attempt: int, from_state: str | None, to_state: str, reason: str, now: float) -> None:
        self.db["events"].insert({"run": run, "time": now, "attempt": attempt, "from_state": from_state,
                                  "to_state": to_state, "reason": reason})

    def events(self, run: str) -> list[dict]:
        return list(self.db["events"].rows_where("run = ?", [run], order_by="id"))

    # ------------------------------------------------------------ what opskit read of a box

    def put_box_record(self, target: str, key: str, data: dict) -> None:
        """Keep a copy of something read from a target (a ledger, SLURM's accounting), by key."""
        with self.transaction():
            self.db["box_records"].insert({"target": target, "key": key, "data": json.dumps(data),
                                           "fetched_at": time.time()}, replace=True)

    def box_records(self, target: str | None = None) -> list[dict]:
        rows = self.db["box_records"].rows_where("target = ?" if target else None, [target] if target else [],
                                                 order_by="target, fetched_at")
        return [{**r, "data": json.loads(r["data"])} for r in rows]

    # ------------------------------------------------------------ artifacts and gates

    def record_artifact(self, run: str, path: str, size: int, sha256: str) -> None:
        with self.transaction():
            self.db.execute(
                "INSERT INTO artifacts (run, path, size, sha256, pulled_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(run, path) DO UPDATE SET size=excluded.size, sha256=excluded.sha256, "
                "pulled_at=excluded.pulled_at", [run, path, size, sha256, time.time()])

    def forget_artifacts(self, run: str, paths: list[str]) -> None:
        with self.transaction():
            for path in paths:
                self.db.execute("DELETE FROM artifacts WHERE run = ? AND path = ?", [run, path])

    def artifacts(self, run: str) -> list[dict]:
        return list(self.db["artifacts"].rows_where("run = ?", [run], order_by="path"))

    def record_gate(self, matrix: str, phase: str, decision: dict) -> None:
        with self.transaction():
            self.db["gates"].insert({"matrix": matrix, "phase": phase, "decided_at": time.time(),
                                     "decision": json.dumps(decision)})

    def latest_gate(self, matrix: str, phase: str) -> dict | None:
        rows = list(self.db["gates"].rows_where("matrix = ? AND phase = ?", [matrix, phase],
                                                order_by="id desc", limit=1))
        return json.loads(rows[0]["decision"]) if rows else None


def _check_state(state: str) -> None:
    if state not in ALL_STATES:  # a bug, not a user error: only opskit.states' constants are states
        raise ValueError(f"unknown run state {state!r}; states are {', '.join(ALL_STATES)}")


def _target_row(row: dict) -> dict:
    return {**row, "config": json.loads(row["config"] or "{}")}


def _run_row(row: dict) -> dict:
    out = dict(row)
    out["spec"] = json.loads(row["spec"]) if row.get("spec") else None
    out["stale"] = bool(row.get("stale"))
    out["cancel_requested"] = bool(row.get("cancel_requested"))
    return out

