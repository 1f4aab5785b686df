"""Trackers (train/tracking.py) with the real packages: TensorBoard's own event reader, a real `mlflow server`
on 127.0.0.1, W&B offline run files. Also the spec and catalog fields, and what `pull` may take."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from opskit import catalog, planning
from opskit.errors import OpsError
from train.contract import CODE_DIFF, RESULTS, TRACKING, pullable_paths, read_json
from train.heartbeat import read_loss_curve
from train.spec import SpecError, validate
from train.tracking import params_of

REPO = Path(__file__).resolve().parent.parent


def demo_spec(tmp_path, **settings) -> dict:
    m, phase = catalog.resolve_phase("demo")
    planned = catalog.expand(m, phase, configs=["geo_500k"], seeds=[42])[0]
    spec = planning.build_spec(planned, str(tmp_path), 1)
    spec.update(settings)
    return spec


# ---------------------------------------------------------------- spec, catalog, contract (fast)


def test_spec_fields_tracking_stride_and_dynamic(tmp_path):
    spec = validate(demo_spec(tmp_path))
    assert spec.tracking == () and spec.eval_stride is None  # optional: older specs stay valid
    raw = demo_spec(tmp_path, tracking=["tensorboard", "mlflow:http://127.0.0.1:5000", "wandb"])
    raw["eval"]["stride"] = 256
    raw["rope"]["scaling"] = {"type": "dynamic", "factor": 4, "original_max": 128}
    spec = validate(raw)
    assert spec.tracking == ("tensorboard", "mlflow:http://127.0.0.1:5000", "wandb")
    assert spec.eval_stride == 256 and spec.scaling["type"] == "dynamic"
    for bad, field in [("tensorboard", "tracking"), (["mlflow"], "tracking[0]"), (["tb"], "tracking[0]"),
                       (["wandb", "wandb"], "tracking[1]"), (["mlflow:"], "tracking[0]")]:
        with pytest.raises(SpecError, match=re.escape(f"'{field}'")):
            validate(demo_spec(tmp_path, tracking=bad))
    raw = demo_spec(tmp_path)
    raw["eval"]["stride"] = 0
    with pytest.raises(SpecError, match="'eval.stride' must be > 0"):
        validate(raw)


def test_matrix_tracking_key_flows_into_the_spec(tmp_path):
    src = (catalog.CONFIG_DIR / "demo.yaml").read_text()
    src = src.replace("eval:\n  lengths: [128, 256, 512]\n", "eval:\n  stride: 64\n  lengths: [128, 256, 512]\n")
    path = tmp_path / "tracked.yaml"
    path.write_text(src.replace("name: demo", "name: tracked") + 'tracking: [tensorboard, "mlflow:http://127.0.0.1:5000"]\n')
    m = catalog.load_matrix(str(path))
    run = catalog.expand(m, m.phases["demo"])[0]
    spec = validate(planning.build_spec(run, str(tmp_path), 1))
    assert spec.tracking == ("tensorboard", "mlflow:http://127.0.0.1:5000") and spec.eval_stride == 64
    # a matrix without the key gives no trackers
    assert catalog.expand(*catalog.resolve_phase("demo"))[0].settings["tracking"] == []

    # launch --tracker adds to the matrix's list, each once; a bad one is refused by name
    spec = planning.build_spec(run, str(tmp_path), 1, trackers=["wandb", "tensorboard"])
    assert spec["tracking"] == ["tensorboard", "mlflow:http://127.0.0.1:5000", "wandb"]
    with pytest.raises(OpsError, match="--tracker neptune: must be tensorboard, wandb or mlflow:URI"):
        planning.build_spec(run, str(tmp_path), 1, trackers=["neptune"])

    bad = src + "tracking: [tensorboard, neptune]\n"
    path.write_text(bad)
    line = len(bad.splitlines())
    with pytest.raises(catalog.CatalogError, match=rf"tracked.yaml:{line}: tracking\[1\]: must be tensorboard"):
        catalog.load_matrix(str(path))


def test_params_are_identity_and_every_spec_field_flattened(tmp_path):
    raw = demo_spec(tmp_path, tracking=["tensorboard"])
    raw["rope"]["scaling"] = {"type": "yarn", "factor": 4, "original_max": 128}
    Path(raw["out_dir"]).mkdir(parents=True)
    params = params_of(validate(raw))
    assert {k: params[k] for k in ("run", "config", "seed", "phase", "preset", "spectrum", "scaling")} == {
        "run": "demo/geo_500k/s42", "config": "geo_500k", "seed": 42, "phase": "demo", "preset": "tiny",
        "spectrum": "geo_500k", "scaling": "yarn"}
    assert params["rope.scaling.factor"] == 4 and params["rope.scaling.original_max"] == 128
    assert params["eval.lengths"] == "[128, 256, 512]" and params["lr"] == raw["lr"]
    assert json.loads(params["data.train"]) == raw["data"]["train"]
    assert params["tracking"] == '["tensorboard"]' and "attempt" not in params and "code_dirty" not in params
    Path(raw["out_dir"], CODE_DIFF).write_text("# opskit code.diff: ...\ndiff --git a/x b/x\n")
    assert params_of(validate(raw))["code_dirty"] is True


def test_pull_takes_tracker_folders_but_no_checkpoints_or_links(tmp_path):
    run = tmp_path / "run"
    (run / "tb").mkdir(parents=True)
    (run / "tb" / "events.out.tfevents.1.host.1.0").write_bytes(b"x")
    (run / "wandb" / "offline-run-1-abc" / "files").mkdir(parents=True)
    (run / "wandb" / "offline-run-1-abc" / "run-abc.wandb").write_bytes(b"x")
    (run / "wandb" / "latest-run").symlink_to(run / "wandb" / "offline-run-1-abc")
    (run / "ckpt" / "step_5").mkdir(parents=True)
    (run / "ckpt" / "step_5" / "model.distcp").write_bytes(b"x")
    for name in (TRACKING, CODE_DIFF, "environment.txt", RESULTS, "notes.bin"):
        (run / name).write_text("{}")
    assert pullable_paths(run) == ["code.diff", "environment.txt", "results.json", "tb/events.out.tfevents.1.host.1.0",
                                   "tracking.json"]  # W&B's binary logs stay on the box (docs/trackers.md)


def test_missing_package_is_a_one_line_spec_error_naming_the_extra(tmp_path):
    """A real python without the track extra (a bare venv) refuses the spec before anything starts."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(demo_spec(tmp_path, tracking=["tensorboard", "mlflow:http://127.0.0.1:1"])))
    code = ("import sys; from train.spec import load_spec; from train.tracking import open_tracker\n"
            "open_tracker(load_spec(sys.argv[1]), True)")
    proc = subprocess.run([str(tmp_path / "bare" / "bin" / "python"), "-c", code, str(spec_path)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last == ("train.spec.SpecError: spec field 'tracking[0]': tensorboard needs the tensorboard package, "
                    "which this python lacks: pip install 'opskit[track]'")


# ---------------------------------------------------------------- real trainer runs (slow)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.log = open(root / "server.log", "w")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
             "--default-artifact-root", str(root / "artifacts")],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise AssertionError(f"mlflow server did not come up:\n{(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)

    def client(self):
        from mlflow.tracking import MlflowClient
        return MlflowClient(tracking_uri=self.uri)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="session")
def tracking_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tracking_cache")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


def wandb_records(path: Path):
    """The records of a .wandb file: LevelDB-log framing (32 KiB blocks, 7-byte headers) of W&B's own
    protobuf Record messages, after the ':W&B' file header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += block - pos % block
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def tb_scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}, acc


@pytest.mark.slow
def test_tracked_run_killed_and_resumed_stays_one_run_in_every_tracker(mlflow_server, tracking_cache, tmp_path):
    from test_train_run import STEPS, make_spec, run_to_end, signal_at_step, start

    out, cache = tmp_path / "tracked", tracking_cache
    trackers = ["tensorboard", f"mlflow:{mlflow_server.uri}", "wandb"]
    make_spec(out, cache, tracking=trackers)
    proc = start(out)
    signal_at_step(out, proc, 13, signal.SIGKILL)  # like a preempted node: no checkpoint on the way out
    proc.wait(timeout=60)
    first = read_json(out / TRACKING)
    make_spec(out, cache, tracking=trackers, attempt=2)
    assert run_to_end(out) == 0, (out / "run.log").read_text()[-3000:]
    state = read_json(out / TRACKING)
    run_id = state[f"mlflow:{mlflow_server.uri}"]["run_id"]
    assert run_id == first[f"mlflow:{mlflow_server.uri}"]["run_id"]  # same run, not a new one
    assert state["wandb"]["id"] == first["wandb"]["id"] and state["wandb"]["mode"] == "offline"
    curve = {r["step"]: r for r in read_loss_curve(out)}
    results = read_json(out / RESULTS)
    assert list(curve) == list(range(1, STEPS + 1))

    # MLflow: params, every train metric at every step, eval PPLs at the last step, finished.
    client = mlflow_server.client()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "test/tracked/s7"
    assert run.data.tags["opskit.attempt"] == "2"
    p = run.data.params
    assert (p["run"], p["config"], p["seed"], p["phase"], p["preset"], p["spectrum"], p["scaling"]) == \
        ("test/tracked/s7", "tracked", "7", "test", "tiny", "geo_10k", "none")
    assert p["rope.spectrum"] == "geo_10k" and p["seq_len"] == "64" and p["eval.lengths"] == "[128, 512]"
    for key, field in [("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm"),
                       ("train/tokens_per_s", "tokens_per_s")]:
        history = client.get_metric_history(run_id, key)
        assert {m.step for m in history} == set(curve)  # steps 11..13 twice (redone after the kill)
        latest = {m.step: m for m in sorted(history, key=lambda m: m.timestamp)}
        for step, m in latest.items():
            assert m.value == pytest.approx(curve[step][field], rel=1e-6)
    for length, ppl in results["ppl"].items():
        [m] = client.get_metric_history(run_id, f"eval/ppl_{length}")
        assert (m.step, m.value) == (STEPS, pytest.approx(ppl))
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "opskit/test"

    # TensorBoard, read back with its own reader: one curve, the steps redone after the kill purged once.
    scalars, acc = tb_scalars(out / "tb")
    assert sorted(scalars["train/loss"]) == list(curve)
    assert all(scalars["train/loss"][s] == pytest.approx(curve[s]["loss"], rel=1e-6) for s in curve)
    assert scalars["eval/ppl_512"] == {STEPS: pytest.approx(results["ppl"]["512"], rel=1e-6)}
    text = acc.Tensors("params/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| spectrum | geo_10k |" in text and "| seed | 7 |" in text

    # W&B offline: one run folder per attempt, same id, for `wandb sync`. The second attempt logged
    # steps 11..40; the first, killed hard, has what W&B's service had written: a prefix of 1..13.
    wid = state["wandb"]["id"]
    files = sorted((out / "wandb").glob(f"offline-run-*-{wid}*/run-{wid}.wandb"))
    assert len(files) == 2
    steps, config = [], {}
    for f in files:
        steps.append([])
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                if "train/loss" in items:
                    steps[-1].append(items["_step"])
                    assert items["train/loss"] == pytest.approx(curve[items["_step"]]["loss"], rel=1e-6)
            elif kind == "run":
                assert r.run.run_id == wid and r.run.display_name == "test/tracked/s7"
                config.update({c.key: json.loads(c.value_json) for c in r.run.config.update})
    assert steps[1] == list(range(11, STEPS + 1)) and steps[0] == list(range(1, len(steps[0]) + 1))
    assert len(steps[0]) <= 13 and config["spectrum"] == "geo_10k" and config["preset"] == "tiny"

    # The tracker ids and TensorBoard's events come back with `pull`; W&B's folders stay for `wandb sync`.
    pulled = pullable_paths(out)
    assert TRACKING in pulled and any(p.startswith("tb/events.out.tfevents") for p in pulled)
    assert not any(p.startswith("wandb/") for p in pulled)


@pytest.mark.slow
def test_a_tracker_that_fails_never_stops_training(tracking_cache, tmp_path):
    """One MLflow server never there, one killed mid-run: each is said once in run.log and turned off;
    training, evaluation and TensorBoard go on to the end. The same run has a `dynamic` scaling and a
    sliding-window stride: evaluation recomputes the frequencies at 128 and adds the sliding PPL."""
    from test_train_run import MICRO, SEQ, finish, make_spec, start, wait_for

    server = MlflowServer(tmp_path / "mlflow")
    dead = f"mlflow:http://127.0.0.1:{free_port()}"
    live = f"mlflow:{server.uri}"
    out = tmp_path / "run"
    steps = 60
    make_spec(out, tracking_cache, tracking=["tensorboard", dead, live], train_tokens=steps * SEQ * MICRO,
              checkpoint_every=100, eval={"lengths": [64, 128], "chunks": 2, "mode": "sequential", "stride": 32},
              rope={"spectrum": "geo_10k", "scaling": {"type": "dynamic", "factor": 2.0, "original_max": SEQ}})
    try:
        proc = start(out)
        wait_for(lambda: any(r["step"] >= 5 for r in read_loss_curve(out)), 120, "step 5", proc)
    finally:
        server.stop()
    assert finish(proc, out, timeout=240) == 0, (out / "run.log").read_text()[-3000:]
    log = (out / "run.log").read_text()
    assert log.count(f"tracking: {dead}: opening failed") == 1
    assert log.count(f"tracking: {live}: logging step") == 1 and log.count("it is off for the rest") == 2
    assert "Traceback" not in log
    scalars, _ = tb_scalars(out / "tb")
    assert sorted(scalars["train/loss"]) == list(range(1, steps + 1))
    assert scalars["eval/ppl_128"] == {steps: pytest.approx(read_json(out / RESULTS)["ppl"]["128"], rel=1e-6)}
    assert set(read_json(out / TRACKING)) == {"tensorboard", live}  # the dead one got no id to keep
    evals = read_json(out / "eval_per_length.json")
    assert evals["dynamic"]["ratio"] == {"64": 1.0, "128": 3.0}  # 2 * 128 / 64 - (2 - 1)
    assert set(evals["sliding"]["lengths"]) == {"64", "128"} and evals["sliding"]["stride"] == 32
    assert scalars["eval/ppl_sliding_128"] == {steps: pytest.approx(evals["sliding"]["lengths"]["128"]["ppl"])}


@pytest.mark.slow
def test_launch_with_trackers_through_the_cli_records_code_and_pulls_the_events(mlflow_server, tmp_path):
    """The issue's demo: `opskit launch ... --tracker tensorboard --tracker mlflow:URI` on the local target;
    the tracker entries hold the metrics and params, each attempt records its code, pull brings tb/ home."""
    env = {**os.environ, "OPSKIT_STATE": str(tmp_path / "state.db"), "OPSKIT_HEARTBEAT_S": "1", "OMP_NUM_THREADS": "1"}

    def opskit(*args):
        proc = subprocess.run([sys.executable, "-m", "opskit.cli", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, f"opskit {args}: {proc.stdout}\n{proc.stderr}"
        return proc.stdout

    run = "e2e/geo_500k/s42"
    opskit("launch", "e2e", "--matrix", str(REPO / "tests" / "fixtures" / "matrix_e2e.yaml"), "--config", "geo_500k",
           "--tracker", "tensorboard", "--tracker", f"mlflow:{mlflow_server.uri}", "--wait")
    shown = json.loads(opskit("runs", "show", run, "--json"))
    assert shown["state"] == "done", opskit("logs", run, "--lines", "40")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert shown["code"]["commit"] == head and isinstance(shown["code"]["dirty"], bool)
    assert shown["spec"]["tracking"] == ["tensorboard", f"mlflow:{mlflow_server.uri}"]
    run_dir = Path(shown["run_dir"])
    assert (run_dir / CODE_DIFF).read_text().startswith(f"# opskit code.diff: uncommitted changes against commit {head}")
    assert "torch==2.13.0" in (run_dir / "environment.txt").read_text()
    results = read_json(run_dir / RESULTS)
    assert results["versions"]["git_commit"] == head

    client = mlflow_server.client()
    [mlrun] = client.search_runs([client.get_experiment_by_name("opskit/e2e").experiment_id],
                                 filter_string=f"attributes.run_name = '{run}'")
    assert mlrun.info.status == "FINISHED" and mlrun.data.params["config"] == "geo_500k"
    assert mlrun.data.params["code_dirty"] in ("True", "False")
    for length, ppl in results["ppl"].items():
        assert mlrun.data.metrics[f"eval/ppl_{length}"] == pytest.approx(ppl)
    assert len(client.get_metric_history(mlrun.info.run_id, "train/loss")) == len(read_loss_curve(run_dir))

    opskit("pull", "--results-dir", str(tmp_path / "results"))
    dest = tmp_path / "results" / "raw" / "e2e" / "geo_500k" / "seed42"
    scalars, _ = tb_scalars(dest / "tb")
    assert scalars["eval/ppl_128"] and len(scalars["train/loss"]) == len(read_loss_curve(dest))
    assert (dest / CODE_DIFF).is_file() and (dest / "environment.txt").is_file()
