"""The run store's schema as numbered migrations: a store at version N runs N+1.. on open (store.py).
Each runs its statements inside the opening command's write transaction."""
from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 3


def _migration_1(conn: sqlite3.Connection) -> None:
    """The first schema (as sqlite-utils created it, so that old stores and new ones are alike)."""
    _script(conn, """
        CREATE TABLE "targets" ("name" TEXT PRIMARY KEY, "kind" TEXT, "config" TEXT, "created_at" REAL);
        CREATE TABLE "runs" (
           "name" TEXT PRIMARY KEY, "matrix" TEXT, "phase" TEXT NOT NULL, "config" TEXT NOT NULL,
           "seed" INTEGER NOT NULL, "target" TEXT NOT NULL, "attempt" INTEGER DEFAULT 1, "state" TEXT NOT NULL,
           "stale" INTEGER DEFAULT 0, "cancel_requested" INTEGER DEFAULT 0,
           "created_at" REAL, "started_at" REAL, "ended_at" REAL, "updated_at" REAL,
           "step" INTEGER, "total_steps" INTEGER, "tokens" INTEGER, "loss" REAL, "tokens_per_s" REAL,
           "eta_s" REAL, "cache_bytes" INTEGER, "cache_tokens" INTEGER, "cache_target_tokens" INTEGER,
           "heartbeat_at" REAL, "checkpoint_step" INTEGER, "message" TEXT,
           "pid" INTEGER, "job_id" TEXT, "exit_code" INTEGER, "run_dir" TEXT, "spec" TEXT, "after" TEXT,
           "queue_pos" INTEGER, "gpus" TEXT);
        CREATE INDEX "idx_runs_phase" ON "runs" ("phase");
        CREATE INDEX "idx_runs_target_state" ON "runs" ("target", "state");
        CREATE TABLE "events" ("id" INTEGER PRIMARY KEY, "run" TEXT, "time" REAL, "attempt" INTEGER,
                               "from_state" TEXT, "to_state" TEXT, "reason" TEXT);
        CREATE INDEX "idx_events_run" ON "events" ("run");
        CREATE TABLE "artifacts" ("id" INTEGER PRIMARY KEY, "run" TEXT, "path" TEXT, "size" INTEGER,
                                  "sha256" TEXT, "pulled_at" REAL);
        CREATE UNIQUE INDEX "idx_artifacts_run_path" ON "artifacts" ("run", "path");
        CREATE TABLE "gates" ("id" INTEGER PRIMARY KEY, "matrix" TEXT, "phase" TEXT, "decided_at" REAL,
                              "decision" TEXT);
    """)


def _migration_2(conn: sqlite3.Connection) -> None:
    """GPU samples of a run's heartbeat; what opskit last read of each box's ledger (cost, status)."""
    _script(conn, """
        ALTER TABLE "runs" ADD COLUMN "gpu_util" REAL;
        ALTER TABLE "runs" ADD COLUMN "gpu_mem_mb" REAL;
        ALTER TABLE "runs" ADD COLUMN "gpu_power_w" REAL;
        CREATE TABLE "box_records" ("target" TEXT, "key" TEXT, "data" TEXT, "fetched_at" REAL,
                                    PRIMARY KEY ("target", "key"));
    """)


def _migration_3(conn: sqlite3.Connection) -> None:
    """The reason of each run's current state on the run itself (status shows why a run failed), and
    indexes for what `status` selects: unfinished runs, the latest ended ones, counts per phase."""
    _script(conn, """
        ALTER TABLE "runs" ADD COLUMN "reason" TEXT;
        UPDATE "runs" SET "reason" = (SELECT e."reason" FROM "events" e WHERE e."run" = "runs"."name"
                                      ORDER BY e."id" DESC LIMIT 1);
        DROP INDEX "idx_runs_phase";
        CREATE INDEX "idx_runs_phase_state" ON "runs" ("phase", "state");
        CREATE INDEX "idx_runs_state" ON "runs" ("state");
        CREATE INDEX "idx_runs_stale" ON "runs" ("stale");
        CREATE INDEX "idx_runs_ended_at" ON "runs" ("ended_at");
        CREATE INDEX "idx_runs_updated_at" ON "runs" ("updated_at");
        CREATE INDEX "idx_runs_created" ON "runs" ("created_at", "name");
    """)


MIGRATIONS = {1: _migration_1, 2: _migration_2, 3: _migration_3}


def _script(conn: sqlite3.Connection, sql: str) -> None:
    """Statements one by one, inside the caller's transaction (executescript would commit it)."""
    for statement in sql.split(";"):
        if statement.strip():
            conn.execute(statement)
