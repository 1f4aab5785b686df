"""The run store: one SQLite file (`state.db`) through the standard library's sqlite3.

WAL mode and a busy timeout let several `opskit` commands write at once; every state change is
appended to `events` and its reason kept on the run (`reason`). JSON columns only, never pickles.
Schema changes are numbered migrations (store_migrations.py). Reads select in SQL (indexes in
migration 3), so what a command does not show costs it nothing: `status` stays the same size as
history grows.
"""
from __future__ import annotations

import difflib
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from opskit import store_path
from opskit.errors import NotFound, OpsError, unknown_name
from opskit.states import ALL_STATES, ENDED
from opskit.store_migrations import MIGRATIONS, SCHEMA_VERSION
from opskit.store_path import StoreError

BUSY_TIMEOUT_MS = 30_000
DEFAULT_PATH = "state.db"
UNFINISHED = tuple(s for s in ALL_STATES if s not in ENDED)
ENDED_STATES = tuple(s for s in ALL_STATES if s in ENDED)


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
        conn = None
        try:
            self.created = not self.path.exists() and self._create()
            self.conn = conn = self._connect(self.path)
            self._migrate()
            self._run_columns = {r["name"] for r in conn.execute('PRAGMA table_info("runs")')}
            self._check_identity(adopt)
        except sqlite3.Error as e:
            if conn is not None:
                conn.close()
            raise StoreError(store_path.describe(self.path, e)) from None
        except BaseException:
            if conn is not None:
                conn.close()
            raise

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _create(self) -> bool:
        """Make the store whole beside its place, then link it there: a command that looks meanwhile
        (`status` while the first `launch` starts) never finds an empty file. False if another
        command created it first."""
        new = self.path.with_name(f".{self.path.name}.{os.getpid()}.new")
        new.unlink(missing_ok=True)
        try:
            self.conn = self._connect(new)
            try:
                self._migrate()
            finally:
                self.conn.close()  # the last connection: SQLite folds its WAL into the file
            try:
                os.link(new, self.path)
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links
                if self.path.exists():
                    return False
                os.replace(new, self.path)
            return True
        finally:
            new.unlink(missing_ok=True)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A write transaction taken up front (BEGIN IMMEDIATE), so concurrent writers queue, not fail.

        Nested use joins the outer transaction (which commits or rolls back the whole)."""
        conn = self.conn
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
        version = self._version()
        if version == SCHEMA_VERSION:  # the usual case: no write lock taken
            return
        with self.transaction():
            self.conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            version = self._version()
            if version > SCHEMA_VERSION:
                raise StoreError(f"the run store {self.path} has schema version {version}, newer than this "
                                 f"opskit ({SCHEMA_VERSION}): upgrade opskit (pip install -U), or use the "
                                 f"opskit that wrote it")
            for v in range(version + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[v](self.conn)
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])

    def _version(self) -> int:
        try:
            row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError:  # no meta table yet: a new store
            return 0
        return int(row[0]) if row else 0

    def _meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
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
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('store_path', ?)", [here])

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
                self.conn.execute("UPDATE targets SET config = ? WHERE name = ?",
                                  [json.dumps({**t["config"], "workdir": workdir}), t["name"]])
                names.append(t["name"])
        for run in self.list_runs():
            if run["target"] not in names:
                continue
            spec = run["spec"] or {}
            spec = {**spec, **{k: moved(spec[k]) for k in ("out_dir", "cache_dir") if moved(spec.get(k))}}
            self.conn.execute("UPDATE runs SET run_dir = ?, spec = ? WHERE name = ?",
                              [moved(run["run_dir"]) or run["run_dir"], json.dumps(spec) if run["spec"] else None,
                               run["name"]])
        return names

    @property
    def schema_version(self) -> int:
        return self._version()

    def _rows(self, sql: str, args: Iterable[Any] = ()) -> list[dict]:
        cur = self.conn.cursor()
        cur.row_factory = None  # plain tuples zipped with the column names: twice as fast as sqlite3.Row
        cur.execute(sql, list(args))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur]

    def count(self, table: str) -> int:
        if table not in ("runs", "events", "artifacts", "targets", "gates", "box_records"):
            raise ValueError(f"no table {table!r}")
        return self.conn.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0]

    # ------------------------------------------------------------ targets

    def add_target(self, name: str, kind: str, config: dict, replace: bool = False) -> None:
        with self.transaction():
            if not replace and self.get_target(name) is not None:
                raise OpsError(f"target '{name}' exists; pass --replace to overwrite it "
                               f"(or remove it first: opskit targets remove {name})")
            self.conn.execute("INSERT OR REPLACE INTO targets (name, kind, config, created_at) VALUES (?, ?, ?, ?)",
                              [name, kind, json.dumps(config), time.time()])

    def get_target(self, name: str) -> dict | None:
        rows = self._rows("SELECT * FROM targets WHERE name = ?", [name])
        return _target_row(rows[0]) if rows else None

    def list_targets(self) -> list[dict]:
        return [_target_row(r) for r in self._rows("SELECT * FROM targets ORDER BY name")]

    def remove_target(self, name: str) -> None:
        with self.transaction():
            if self.get_target(name) is None:
                raise unknown_name("target", name, [t["name"] for t in self.list_targets()])
            self.conn.execute("DELETE FROM targets WHERE name = ?", [name])

    # ------------------------------------------------------------ runs

    def get_run(self, name: str) -> dict | None:
        rows = self._rows("SELECT * FROM runs WHERE name = ?", [name])
        return _run_row(rows[0]) if rows else None

    def require_run(self, name: str) -> dict:
        run = self.get_run(name)
        if run is None:
            raise self._unknown_run(name)
        return run

    def _unknown_run(self, name: str) -> NotFound:
        """Names close to `name` from its own phase (never a list of every run ever made)."""
        phase = name.split("/", 1)[0]
        like = phase.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "/%"
        names = [r[0] for r in self.conn.execute("SELECT name FROM runs WHERE name LIKE ? ESCAPE '\\' LIMIT 5000",
                                                 [like])]
        total = self.conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        if total <= 12:
            return unknown_name("run", name, [r[0] for r in self.conn.execute("SELECT name FROM runs ORDER BY name")])
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        return NotFound(f"unknown run '{name}'{hint}; `opskit status --all` lists the {total} runs")

    def list_runs(self, phase: str | None = None, target: str | None = None, states: tuple[str, ...] = ()) -> list[dict]:
        return self.select_runs(phases=[phase] if phase else (), targets=[target] if target else (), states=states)

    def select_runs(self, columns: Iterable[str] | None = None, **selection: Any) -> list[dict]:
        """Runs matching every filter of the selection (`_selection`), in SQL; `columns`: only these."""
        where, args, tail = _selection(**selection)
        cols = "*" if columns is None else _names(columns)
        return [_run_row(r) for r in self._rows(f"SELECT {cols} FROM runs{where}{tail}", args)]

    def select_fields(self, fields: dict[str, str], **selection: Any) -> list[dict]:
        """{key: value of its SQL expression over the run} for each selected run (`_selection`)."""
        where, args, tail = _selection(**selection)
        exprs = ", ".join(f'{sql} AS "{key}"' for key, sql in fields.items())
        return self._rows(f"SELECT {exprs} FROM runs{where}{tail}", args)

    def select_fields_json(self, fields: dict[str, str], booleans: Iterable[str] = (),
                           **selection: Any) -> list[tuple[str, str]]:
        """(state, the fields as one JSON object written by SQLite) for each selected run: no Python
        object per value, so `status --json` of 100k runs stays fast. `booleans`: fields that are
        true/false in the JSON (SQLite has no boolean type)."""
        where, args, tail = _selection(**selection)
        booleans = set(booleans)
        pairs = ", ".join(f"'{key}', " + (f"json(CASE WHEN {sql} THEN 'true' ELSE 'false' END)" if key in booleans
                                          else sql) for key, sql in fields.items())
        cur = self.conn.cursor()
        cur.row_factory = None
        return cur.execute(f"SELECT state, json_object({pairs}) FROM runs{where}{tail}", args).fetchall()

    def state_counts(self, phases: Iterable[str] = (), targets: Iterable[str] = (), states: Iterable[str] = (),
                     since: float | None = None) -> dict[str, dict[str, int]]:
        """{phase: {state: number of runs}} of the runs matching the filters."""
        where, args = _filters(phases, targets, states, since, ())
        sql = "SELECT phase, state, COUNT(*) AS n FROM runs" + (" WHERE " + " AND ".join(where) if where else "") \
              + " GROUP BY phase, state ORDER BY phase"
        out: dict[str, dict[str, int]] = {}
        for r in self.conn.execute(sql, args):
            out.setdefault(r["phase"], {})[r["state"]] = r["n"]
        return out

    def phases(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT phase FROM runs ORDER BY phase")]

    def run_targets(self) -> list[str]:
        """Targets that runs were launched on (a removed target's runs keep its name)."""
        return [r[0] for r in self.conn.execute("SELECT DISTINCT target FROM runs ORDER BY target")]

    def done_durations_by_phase(self, target: str) -> dict[str, float]:
        """Mean wall time of the done runs on `target`, per phase (docs/queue.md: estimated starts)."""
        rows = self.conn.execute(
            "SELECT phase, AVG(ended_at - started_at) FROM runs WHERE target = ? AND state = ? "
            "AND started_at IS NOT NULL AND ended_at IS NOT NULL GROUP BY phase", [target, "done"])
        return {phase: mean for phase, mean in rows}

    def upsert_run(self, row: dict, reason: str) -> None:
        """Create a run (or replace it for a rerun/new attempt) and log the event."""
        _check_state(row["state"])
        now = time.time()
        with self.transaction():
            old = self.get_run(row["name"])
            record = {**row, "updated_at": now, "reason": reason}
            record.setdefault("created_at", old["created_at"] if old else now)
            if isinstance(record.get("spec"), dict):
                record["spec"] = json.dumps(record["spec"])
            self._check_columns(record)
            cols = list(record)
            self.conn.execute(f"INSERT OR REPLACE INTO runs ({_names(cols)}) "
                              f"VALUES ({_marks(cols)})", [record[c] for c in cols])
            self._event(row["name"], record.get("attempt", 1), old["state"] if old else None, row["state"], reason, now)

    def update_run(self, name: str, reason: str | None = None, **fields: Any) -> None:
        """Update fields; a change of `state` is logged as an event (with `reason`, also kept on the run)."""
        if "state" in fields:
            _check_state(fields["state"])
        now = time.time()
        with self.transaction():
            old = self.conn.execute("SELECT state, attempt FROM runs WHERE name = ?", [name]).fetchone()
            if old is None:
                raise unknown_name("run", name, [])
            fields["updated_at"] = now
            if "spec" in fields and isinstance(fields["spec"], dict):
                fields["spec"] = json.dumps(fields["spec"])
            new_state = fields.get("state")
            changed = bool(new_state) and new_state != old["state"]
            if changed:
                fields["reason"] = reason or ""
            self._check_columns(fields)
            self.conn.execute(f"UPDATE runs SET {_names(fields, ' = ?')} WHERE name = ?",
                              [*fields.values(), name])
            if changed:
                self._event(name, fields.get("attempt", old["attempt"]), old["state"], new_state, reason or "", now)

    def _check_columns(self, fields: dict) -> None:
        unknown = set(fields) - self._run_columns
        if unknown:  # a bug, not a user error
            raise ValueError(f"runs has no column {', '.join(sorted(unknown))}")

    def _event(self, run: str, attempt: int, from_state: str | None, to_state: str, reason: str, now: float) -> None:
        self.conn.execute("INSERT INTO events (run, time, attempt, from_state, to_state, reason) "
                          "VALUES (?, ?, ?, ?, ?, ?)", [run, now, attempt, from_state, to_state, reason])

    def events(self, run: str) -> list[dict]:
        return self._rows("SELECT * FROM events WHERE run = ? ORDER BY id", [run])

    # ------------------------------------------------------------ what opskit read of a box

    def put_box_record(self, target: str, key: str, data: dict) -> None:
        """Keep a copy of something read from a target (a ledger, SLURM's accounting), by key."""
        with self.transaction():
            self.conn.execute("INSERT OR REPLACE INTO box_records (target, key, data, fetched_at) VALUES (?, ?, ?, ?)",
                              [target, key, json.dumps(data), time.time()])

    def box_records(self, target: str | None = None) -> list[dict]:
        rows = self._rows("SELECT * FROM box_records" + (" WHERE target = ?" if target else "")
                          + " ORDER BY target, fetched_at", [target] if target else [])
        return [{**r, "data": json.loads(r["data"])} for r in rows]

    # ------------------------------------------------------------ artifacts and gates

    def record_artifact(self, run: str, path: str, size: int, sha256: str) -> None:
        """Record a pulled file; an unchanged one keeps its `pulled_at` (nothing new was pulled)."""
        with self.transaction():
            self.conn.execute(
                "INSERT INTO artifacts (run, path, size, sha256, pulled_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(run, path) DO UPDATE SET size=excluded.size, sha256=excluded.sha256, "
                "pulled_at=excluded.pulled_at WHERE sha256 IS NOT excluded.sha256 OR size IS NOT excluded.size",
                [run, path, size, sha256, time.time()])

    def forget_artifacts(self, run: str, paths: list[str]) -> None:
        with self.transaction():
            for path in paths:
                self.conn.execute("DELETE FROM artifacts WHERE run = ? AND path = ?", [run, path])

    def artifacts(self, run: str) -> list[dict]:
        return self._rows("SELECT * FROM artifacts WHERE run = ? ORDER BY path", [run])

    def record_gate(self, matrix: str, phase: str, decision: dict) -> None:
        with self.transaction():
            self.conn.execute("INSERT INTO gates (matrix, phase, decided_at, decision) VALUES (?, ?, ?, ?)",
                              [matrix, phase, time.time(), json.dumps(decision)])

    def latest_gate(self, matrix: str, phase: str) -> dict | None:
        row = self.conn.execute("SELECT decision FROM gates WHERE matrix = ? AND phase = ? ORDER BY id DESC LIMIT 1",
                                [matrix, phase]).fetchone()
        return json.loads(row[0]) if row else None


def _names(columns, suffix: str = "") -> str:
    return ", ".join(f'"{c}"{suffix}' for c in columns)


def _marks(values) -> str:
    return ",".join("?" * len(values))


def _selection(phases: Iterable[str] = (), targets: Iterable[str] = (), states: Iterable[str] = (),
               since: float | None = None, names: Iterable[str] = (), unfinished: bool = False,
               recently_ended: int | None = None) -> tuple[str, list, str]:
    """WHERE clause, its arguments, and ORDER BY (and LIMIT) of a selection of runs: every given filter
    holds. `unfinished`: not ended, or ended but stale (its target was unreachable when it was last
    looked at). `since`: updated at or after. `recently_ended`: the N runs that ended last (not
    stale), newest first; else in launch order."""
    if recently_ended is not None:
        states = ENDED_STATES
    where, args = _filters(phases, targets, states, since, names)
    tail = " ORDER BY created_at, name"
    if unfinished:
        where.append(f"(state IN ({_marks(UNFINISHED)}) OR stale = 1)")
        args.extend(UNFINISHED)
    if recently_ended is not None:
        where.append("stale = 0")
        tail = f" ORDER BY ended_at IS NULL, ended_at DESC, updated_at DESC LIMIT {int(recently_ended)}"
    return (" WHERE " + " AND ".join(where) if where else ""), args, tail


def _filters(phases, targets, states, since, names) -> tuple[list[str], list]:
    where: list[str] = []
    args: list = []
    for column, values in (("phase", phases), ("target", targets), ("state", states), ("name", names)):
        values = list(values)
        if values:
            where.append(f"{column} IN ({_marks(values)})")
            args.extend(values)
    if since is not None:
        where.append("updated_at >= ?")
        args.append(since)
    return where, args


def _check_state(state: str) -> None:
    if state not in ALL_STATES:  # a bug, not a user error: only opskit.states' constants are states
        raise ValueError(f"unknown run state {state!r}; states are {', '.join(ALL_STATES)}")


def _target_row(row: dict) -> dict:
    return {**row, "config": json.loads(row["config"] or "{}")}


def _run_row(row: dict) -> dict:
    if "spec" in row:
        row["spec"] = json.loads(row["spec"]) if row["spec"] else None
    for flag in ("stale", "cancel_requested"):
        if flag in row:
            row[flag] = bool(row[flag])
    return row

