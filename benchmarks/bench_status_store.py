"""CPU cost of `opskit status` as the store grows: real CLI processes on a real state.db.

Fills a store with N ended runs (phases, configs, seeds, states, each with its spec, events and
pulled-artifact rows as launch, refresh and pull leave them) plus a few live ones queued on the
local target (refresh asks the local agent about those on every call, as it would in a lab), then
runs `opskit status` (the default view) and `opskit status --json` (every run) as subprocesses and
reports the CPU seconds each used (user + system of the process and its children), the median of
--repeat runs, with the ratios to the smallest store. Also `opskit --help` and `status` on 100 runs.

    OMP_NUM_THREADS=1 python benchmarks/bench_status_store.py [--sizes 1000,10000,100000] [--repeat 5]

Goals (issue #17): default view and --json at 10k runs < 0.5 CPU-s each; the default view at 10k
within 1.5x of 100 runs; 100k runs < 2 s; `opskit --help` and `status` of 100 runs < 0.3 CPU-s.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opskit.store import Store  # noqa: E402
from remote import queue_dir  # noqa: E402

PHASES = ("p0", "p1", "p2", "search50m", "size_100m", "size_200m")
CONFIGS = [f"{f}_{t}" for f in ("geo", "hybrid_a0.2", "anchpoly_p3.9_omf0.3", "yarn_s4", "ntk_s8") for t in
           ("t100k", "t500k", "t1m", "t2m")]
ENDED = (("done", 0.8), ("failed", 0.1), ("cancelled", 0.06), ("lost", 0.04))
REASONS = {"done": "exit code 0", "failed": "exit code 1: CUDA out of memory (tried to allocate 2.00 GiB)",
           "cancelled": "stopped by signal after checkpoint at step 1200", "lost": "process gone without an exit code"}
RUN_COLUMNS = ("name", "matrix", "phase", "config", "seed", "target", "attempt", "state", "stale", "cancel_requested",
               "created_at", "started_at", "ended_at", "updated_at", "step", "total_steps", "tokens", "loss",
               "tokens_per_s", "eta_s", "cache_bytes", "cache_tokens", "cache_target_tokens", "heartbeat_at",
               "checkpoint_step", "message", "pid", "job_id", "exit_code", "run_dir", "spec", "after", "queue_pos",
               "gpus", "reason")
ARTIFACTS = ("results.json", "loss_curve.jsonl", "eval_per_length.json", "run.log", "status.json", "spec.json")


def spec_of(name: str, phase: str, config: str, seed: int, workdir: str) -> str:
    """A spec.json as launch writes it (about 1 kB)."""
    return json.dumps({
        "run": name, "phase": phase, "config": config, "seed": seed, "attempt": 1, "preset": "1p5b",
        "tokenizer": "meta-llama/Llama-3.2-1B", "rope": {"spectrum": config, "scaling": None},
        "data": {"train": [{"dataset": "fineweb-edu", "weight": 0.7}, {"dataset": "proof-pile-2", "weight": 0.3}],
                 "validation": {"dataset": "pg19", "split": "validation", "max_tokens": 2_000_000}},
        "train_tokens": 30_000_000_000, "seq_len": 2048, "micro_batch": 8, "grad_accum": 4, "lr": 3e-4,
        "warmup_frac": 0.01, "weight_decay": 0.1, "grad_clip": 1.0, "dtype": "bf16", "compile": True,
        "activation_checkpointing": False, "eval": {"lengths": [2048, 4096, 8192, 16384, 32768], "chunks": 64,
                                                    "mode": "sequential"},
        "checkpoint_every": 1000, "keep_checkpoints": 2, "log_every": 10,
        "cache_dir": f"{workdir}/cache", "out_dir": f"{workdir}/runs/{name}"})


def fill(path: Path, n_ended: int, n_live: int, workdir: str, seed: int = 0) -> None:
    """A store with n_ended ended runs (created over the last months) and n_live queued local ones."""
    rng = random.Random(seed)
    states, weights = zip(*ENDED)
    now = time.time()
    runs, events, artifacts = [], [], []
    for i in range(n_ended + n_live):
        phase, config, seed_ = PHASES[i % len(PHASES)], CONFIGS[(i // len(PHASES)) % len(CONFIGS)], i
        name = f"{phase}/{config}/s{seed_}"
        created = now - (n_ended + n_live - i) * 300.0
        live = i >= n_ended
        state = "queued" if live else rng.choices(states, weights)[0]
        started, ended = (None, None) if live else (created + 60, created + 60 + rng.uniform(600, 36000))
        target = "local" if live else rng.choice(("box1", "box2", "cluster"))
        runs.append((name, "bench", phase, config, seed_, target, 1, state, 0, 0, created, started, ended,
                     ended or created, None if live else 5000, 5000, None if live else 40_000_000, None if live else 2.9,
                     None if live else 51234.5, None if live else 0.0, None, None, None, ended, None, None, None, None,
                     None if live else (0 if state == "done" else 1), f"{workdir}/runs/{name}",
                     spec_of(name, phase, config, seed_, workdir), None, None, None, REASONS.get(state, "new")))
        events.append((name, created, 1, None, "queued", "new"))
        if not live:
            events += [(name, started, 1, "queued", "training", "heartbeat"),
                       (name, ended, 1, "training", state, REASONS[state])]
            artifacts += [(name, a, 1000 + j, f"{i:032x}{j:032x}", ended + 60) for j, a in enumerate(ARTIFACTS)]
    with Store(path) as store, store.transaction():
        store.conn.executemany(f"INSERT INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({','.join('?' * len(RUN_COLUMNS))})",
                               runs)
        store.conn.executemany("INSERT INTO events (run, time, attempt, from_state, to_state, reason) "
                               "VALUES (?, ?, ?, ?, ?, ?)", events)
        if artifacts:
            store.conn.executemany("INSERT INTO artifacts (run, path, size, sha256, pulled_at) VALUES (?, ?, ?, ?, ?)",
                                   artifacts)
        for box in ("box1", "box2"):  # the targets the ended runs ran on (never contacted: their runs ended)
            store.add_target(box, "ssh", {"host": "203.0.113.7", "user": "ubuntu", "workdir": "~/opskit", "gpus": 8})
        store.add_target("cluster", "slurm", {"workdir": workdir, "partition": "gpu"})
        store.add_target("local", "local", {"workdir": workdir, "gpus": 0})


def cpu_seconds(args: list[str], env: dict, repeat: int, check=None) -> float:
    """Median CPU seconds (user + system, the process and its children) of running `args`."""
    out = []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        if check:
            check(proc.stdout)
        out.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(out)


def queue_live_runs(db: Path, workdir: str) -> None:
    """Put the store's queued runs in the local target's real queue, waiting for a run that never
    comes (so they stay queued, and every status asks the local agent about them)."""
    with Store(db) as store:
        for r in store.select_runs(states=["queued"], columns=("name",)):
            queue_dir.enqueue(workdir, {"run": r["name"], "command": ["true"], "after": ["p0/never/s0"]}, None)


def stop_daemons(workdir: str) -> None:
    for name in ("watchdog", "supervisor"):
        pid = queue_dir.daemon_info(workdir, name).get("pid")
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def measure(work: Path, n: int, live: int, repeat: int, name: str = "") -> dict:
    db = work / f"state_{n}{name}.db"
    workdir = str(work / f"wd_{n}{name}")
    t0 = time.perf_counter()
    fill(db, n, live, workdir)
    fill_s = time.perf_counter() - t0
    queue_live_runs(db, workdir)
    try:
        return _measure(db, n, live, repeat, fill_s)
    finally:
        stop_daemons(workdir)


def _measure(db: Path, n: int, live: int, repeat: int, fill_s: float) -> dict:
    env = {**os.environ, "OPSKIT_STATE": str(db), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    opskit = [sys.executable, "-m", "opskit.cli"]

    def all_rows(stdout: str) -> None:
        rows = json.loads(stdout)
        assert len(rows) == n + live, (len(rows), n + live)

    def default_view(stdout: str) -> None:
        assert "showing" in stdout and "p0:" in stdout, stdout[-500:]
        queued = sum(int(m) for m in re.findall(r"\b(\d+) queued\b", stdout))  # the per-phase counts
        assert queued == live, f"{queued} of the {live} live runs still queued: {stdout[-500:]}"

    return {"runs": n + live, "fill_s": round(fill_s, 2), "db_mb": round(db.stat().st_size / 1e6, 1),
            "default_cpu_s": cpu_seconds(opskit + ["status"], env, repeat, default_view),
            "json_cpu_s": cpu_seconds(opskit + ["status", "--json"], env, repeat, all_rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000,100000", help="ended runs in each store (comma-separated)")
    p.add_argument("--live", type=int, default=5, help="queued runs on the local target in every store")
    p.add_argument("--repeat", type=int, default=5, help="runs of each command; the median is reported")
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="opskit-bench-store-") as tmp:
        work = Path(tmp)
        base = measure(work, 100, a.live, a.repeat)
        ended_only = measure(work, 100, 0, a.repeat, name="ended")  # the case: no target is asked
        env = {**os.environ, "OPSKIT_STATE": str(work / "state_100.db")}
        help_cpu = cpu_seconds([sys.executable, "-m", "opskit.cli", "--help"], env, a.repeat)
        rows = [measure(work, n, a.live, a.repeat) for n in sizes]
    for r in [base, *rows]:
        r["default_vs_100"] = round(r["default_cpu_s"] / base["default_cpu_s"], 2)
        r["json_vs_100"] = round(r["json_cpu_s"] / base["json_cpu_s"], 2)
        r["default_cpu_s"], r["json_cpu_s"] = round(r["default_cpu_s"], 3), round(r["json_cpu_s"], 3)
        print(json.dumps(r))
    print(json.dumps({"help_cpu_s": round(help_cpu, 3), "load_average": round(load, 2),
                      "cores": os.cpu_count(), "repeat": a.repeat}))
    print(f"{'runs':>8} {'default CPU-s':>14} {'x vs 100':>9} {'--json CPU-s':>13} {'x vs 100':>9} {'db MB':>7}")
    for r in [base, *rows]:
        print(f"{r['runs']:>8} {r['default_cpu_s']:>14.3f} {r['default_vs_100']:>9.2f} {r['json_cpu_s']:>13.3f} "
              f"{r['json_vs_100']:>9.2f} {r['db_mb']:>7.1f}")
    print(f"opskit --help: {help_cpu:.3f} CPU-s; load average {load:.2f} on {os.cpu_count()} cores "
          f"(median of {a.repeat} runs each)")
    by_n = {r["runs"] - a.live: r for r in rows}
    goals = [("default view at 10k < 0.5 CPU-s", 10000, lambda r: r["default_cpu_s"] < 0.5),
             ("--json at 10k < 0.5 CPU-s", 10000, lambda r: r["json_cpu_s"] < 0.5),
             ("default view at 10k within 1.5x of 100 runs", 10000, lambda r: r["default_vs_100"] <= 1.5),
             ("default view at 100k < 2 CPU-s", 100000, lambda r: r["default_cpu_s"] < 2),
             ("--json at 100k < 2 CPU-s", 100000, lambda r: r["json_cpu_s"] < 2)]
    for text, n, ok in goals:
        if n in by_n:
            print(f"goal {text}: {'met' if ok(by_n[n]) else 'MISSED'}")
    print(f"status of 100 ended runs (no target asked): {ended_only['default_cpu_s']:.3f} CPU-s; with {a.live} "
          f"runs queued on the local target (its agent asked): {base['default_cpu_s']:.3f} CPU-s")
    print(f"goal status of 100 runs < 0.3 CPU-s: {'met' if ended_only['default_cpu_s'] < 0.3 else 'MISSED'} "
          f"({ended_only['default_cpu_s']:.3f}); opskit --help < 0.3 CPU-s: {'met' if help_cpu < 0.3 else 'MISSED'}")


if __name__ == "__main__":
    main()
