"""Garbage where opskit reads the box's files (issue #20.4): a heartbeat that is JSON but not one, a
queue config that is not JSON, one bad line of a loss curve. Each affects only what it belongs to and
says what is wrong. Real store, the local target's agent, live processes, the CLI as a subprocess."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opskit import operations, states
from opskit.results.report import make_report
from opskit.store import Store
from remote.processes import proc_start_time
from train import contract as C

FIXTURES = Path(__file__).parent / "fixtures" / "results"
RUNS = {"bad/list/s1": "[1]", "bad/typed/s1": None, "bad/fine/s1": None}


@pytest.fixture
def sleepers():
    procs = [subprocess.Popen(["sleep", "120"]) for _ in RUNS]
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "opskit.cli", "--state", str(tmp_path / "state.db"), *args],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "Traceback" not in proc.stdout + proc.stderr and "unexpected" not in proc.stderr, proc.stderr
    return proc


def training_runs(store: Store, sleepers) -> dict[str, Path]:
    tgt = operations.get_target(store, "local")
    now = time.time()
    beats = {"bad/list/s1": "[1]",
             "bad/typed/s1": json.dumps({"state": "training", "attempt": 1, "updated_at": "yesterday", "step": 4}),
             "bad/fine/s1": json.dumps({"state": "training", "attempt": 1, "updated_at": now, "progress_at": now,
                                        "step": 9, "total_steps": 20})}
    dirs = {}
    for (run, beat), proc in zip(beats.items(), sleepers):
        phase, config, seed = C.parse_run_name(run)
        store.upsert_run({"name": run, "phase": phase, "config": config, "seed": seed, "target": "local",
                          "attempt": 1, "state": states.TRAINING, "spec": {"attempt": 1},
                          "run_dir": tgt.run_dir(run)}, reason="test")
        d = Path(tgt.run_dir(run))
        d.mkdir(parents=True)
        C.write_pid(d, proc.pid, proc_start_time(proc.pid))
        (d / C.STATUS).write_text(beat)
        dirs[run] = d
    return dirs


def test_a_malformed_heartbeat_affects_only_its_own_run_and_can_still_stall(tmp_path, sleepers):
    with Store(tmp_path / "state.db") as store:
        dirs = training_runs(store, sleepers)
        assert operations.refresh(store) == {"local": None}
        rows = {r: store.require_run(r) for r in RUNS}
        assert {r: row["state"] for r, row in rows.items()} == dict.fromkeys(RUNS, states.TRAINING)
        assert rows["bad/list/s1"]["message"] == "heartbeat unreadable: status.json is not a JSON object (it holds list [1])"
        assert rows["bad/typed/s1"]["message"] == ("heartbeat unreadable: status.json updated_at is 'yesterday', "
                                                   "not a number")
        assert rows["bad/fine/s1"]["step"] == 9 and rows["bad/fine/s1"]["message"] is None
        listed = cli(tmp_path, "status", "--json")
        assert listed.returncode == 0 and {r["run"] for r in json.loads(listed.stdout)} == set(RUNS)
        # a hung trainer whose garbage heartbeat is never rewritten still shows stalled
        old = time.time() - 3600
        os.utime(dirs["bad/list/s1"] / C.STATUS, (old, old))
        operations.refresh(store)
        assert store.require_run("bad/list/s1")["state"] == states.STALLED
        assert "heartbeat unreadable and not rewritten for" in store.events("bad/list/s1")[-1]["reason"]
        assert store.require_run("bad/typed/s1")["state"] == states.TRAINING


def test_a_garbage_queue_config_is_one_line_in_status_and_queue(tmp_path, sleepers):
    with Store(tmp_path / "state.db") as store:
        training_runs(store, sleepers)
        workdir = Path(operations.get_target(store, "local").workdir)
    (workdir / "queue").mkdir(parents=True)
    (workdir / "queue" / "config.json").write_text('{"gpus": 2, "max_parallel":')
    shown = cli(tmp_path, "status")
    assert shown.returncode == 0
    note = [line for line in shown.stdout.splitlines() if "config.json" in line]
    assert len(note) == 1 and "target local: queue/config.json is not valid JSON" in note[0], shown.stdout
    queued = cli(tmp_path, "queue")
    assert queued.returncode == 0 and "warning: queue/config.json is not valid JSON" in queued.stdout


def test_report_skips_a_bad_loss_curve_line_names_it_and_reports_the_rest(tmp_path):
    shutil.copytree(FIXTURES / "raw", tmp_path / "raw")
    curve = tmp_path / "raw" / "fx" / "geo_500k" / "seed42" / C.LOSS_CURVE
    lines = curve.read_text().splitlines()
    curve.write_text("\n".join([lines[0], '{"step": 2, "tokens": 81', "7", *lines[1:]]) + "\n")
    out = make_report(tmp_path, "fx", None, FIXTURES / "configs")
    assert out.warnings == [f"{curve}:2: skipped, not a loss-curve point: '{{\"step\": 2, \"tokens\": 81'",
                            f"{curve}:3: skipped, not a loss-curve point: '7'"]
    geo = next(r for r in out.report.runs if r.name == "fx/geo_500k/s42")
    assert len(geo.loss_curve) == len(lines)
    assert {s.config for s in out.report.summaries if s.n} == {"geo_500k", "hybrid_a0.2_t100k"}
    assert any(f.name == "fig1_train_loss" and f.path for f in out.figures)
    shown = cli(tmp_path, "report", "--phase", "fx", "--results-dir", str(tmp_path))
    assert shown.returncode == 0 and f"warning: {curve}:2: skipped" in shown.stdout
