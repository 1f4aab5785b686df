"""Experiment trackers the trainer logs to: TensorBoard, W&B and MLflow (docs/trackers.md).

Rank 0 only. `open_tracker(spec, is_main, curve)` checks the packages (every rank: a missing one is a
SpecError naming the extra), opens each tracker of `spec.tracking` and listens to the loss curve, so the
train loop logs `train/*` at every log step without knowing about trackers. `close(exit_code)` logs
`eval/*` from the attempt's eval_per_length.json and ends the tracker runs.

The run continues across resume and SLURM requeue: each tracker's run id is kept in <run_dir>/tracking.json
and reused (MLflow run_id, W&B id with resume="allow", TensorBoard's log dir with a purge at the first
step this attempt logs). A tracker that fails (server gone) says so once and is off for the rest of the
attempt: training never stops for a tracker.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
import uuid
from pathlib import Path

from train.contract import (EVAL_PER_LENGTH, EXIT_INTERRUPTED, EXIT_OK, RESULTS, TB_DIR, TRACKING,
                            WANDB_DIR, atomic_write_json, code_dirty, read_json)
from train.spec import SpecError, TrainSpec

EXTRA = "pip install 'opskit[track]'"
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # tracker kind -> import name
# W&B's service writes the .wandb file every this many seconds (its default, 15 s, is what a hard kill loses)
WANDB_FLUSH_S = 2.0
PARAM_MAX_CHARS = 6000  # MLflow's limit on a param value
MLFLOW_ENV = {  # fail within seconds when the server is gone (MLflow's defaults retry for minutes)
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] tracking: {msg}", flush=True)


def check_installed(trackers) -> None:
    """SpecError naming the first tracker whose package this python lacks (and the extra to install)."""
    for i, item in enumerate(trackers):
        kind = item.split(":", 1)[0]
        if importlib.util.find_spec(MODULES[kind]) is None:
            raise SpecError(f"spec field 'tracking[{i}]': {item} needs the {MODULES[kind]} package, which this "
                            f"python lacks: {EXTRA}")


# ---------------------------------------------------------------- what is logged


def params_of(spec: TrainSpec) -> dict:
    """The run's identity (run, config, seed, phase, preset, spectrum, scaling) and every spec field,
    flattened with dots (rope.scaling.factor); lists as JSON. `attempt` is left out: it changes on
    resume, and a tracker run's params cannot."""
    scaling = spec.scaling or {}
    params = {"run": spec.run, "config": spec.config, "seed": spec.seed, "phase": spec.phase,
              "preset": spec.preset, "spectrum": spec.spectrum, "scaling": scaling.get("type", "none")}
    for key, value in _flatten(spec.raw).items():
        if key != "attempt":
            params.setdefault(key, value)
    dirty = code_dirty(spec.out_dir)
    if dirty is not None:
        params["code_dirty"] = dirty
    return params


def _flatten(obj: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        elif isinstance(value, (list, tuple, dict)):
            out[name] = json.dumps(value)
        elif value is None:
            out[name] = "none"
        else:
            out[name] = value
    return out


def train_metrics(record: dict) -> dict:
    """A loss_curve.jsonl record as tracker metrics."""
    return {"train/loss": record["loss"], "train/lr": record["lr"], "train/grad_norm": record["grad_norm"],
            "train/tokens_per_s": record["tokens_per_s"], "train/tokens": record["tokens"]}


def eval_metrics(eval_result: dict) -> dict:
    """eval_per_length.json as metrics: eval/ppl_<L>, eval/loss_<L> and, with a stride, eval/ppl_sliding_<L>."""
    out = {}
    for length, r in (eval_result.get("lengths") or {}).items():
        if not r.get("skipped"):
            out[f"eval/ppl_{length}"], out[f"eval/loss_{length}"] = r["ppl"], r["loss"]
    for length, r in ((eval_result.get("sliding") or {}).get("lengths") or {}).items():
        if not r.get("skipped"):
            out[f"eval/ppl_sliding_{length}"] = r["ppl"]
    return out


# ---------------------------------------------------------------- sinks


class Sink:
    """One tracker. `open` returns what tracking.json keeps for it (its run id), reused on resume."""

    def __init__(self, key: str, spec: TrainSpec):
        self.key, self.spec, self.run_dir = key, spec, Path(spec.out_dir)

    def open(self, state: dict | None, params: dict) -> dict:
        raise NotImplementedError

    def log(self, metrics: dict, step: int, purge: bool = True) -> None:
        """`purge`: this attempt's first log may drop what an earlier attempt logged from `step` on."""
        raise NotImplementedError

    def close(self, exit_code: int) -> None:
        raise NotImplementedError


class TensorBoardSink(Sink):
    """Event files in <run_dir>/tb/ (pulled with the run). The writer opens at the first step this attempt
    logs, with purge_step there: TensorBoard then drops what an earlier attempt logged from that step on."""

    def open(self, state, params):
        self.state = dict(state or {"log_dir": TB_DIR})
        self.params = params if not self.state.get("params_written") else None
        self.writer = None
        return self.state

    def _writer(self, step: int, purge: bool):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.run_dir / self.state["log_dir"]), flush_secs=10,
                                        purge_step=step if purge else None)
            if self.params is not None:
                self.writer.add_text("params", _markdown_table(self.params), 0)
                self.state["params_written"] = True
        return self.writer

    def log(self, metrics, step, purge=True):
        w = self._writer(step, purge)
        for key, value in metrics.items():
            w.add_scalar(key, value, step)

    def close(self, exit_code):
        if self.writer is not None:
            self.writer.close()


def _markdown_table(params: dict) -> str:
    return "| param | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in sorted(params.items()))


class MlflowSink(Sink):
    """A run in experiment `opskit/<phase>` on the tracking server `mlflow:URI` names."""

    def open(self, state, params):
        for name, value in MLFLOW_ENV.items():
            os.environ.setdefault(name, value)
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.uri = self.key.split(":", 1)[1]
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment = f"opskit/{self.spec.phase}"
        run_id, have = (state or {}).get("run_id"), {}
        if run_id:
            try:
                have = self.client.get_run(run_id).data.params
                self.client.update_run(run_id, status="RUNNING")
            except MlflowException as e:
                if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                    raise
                _say(f"{self.key}: run {run_id} is not on the server; starting a new one")
                run_id = None
        if run_id is None:
            run_id = self.client.create_run(self._experiment_id(), run_name=self.spec.run,
                                            tags={"opskit.run": self.spec.run}).info.run_id
        self.run_id = run_id
        self.client.set_tag(run_id, "opskit.attempt", str(self.spec.attempt))
        from mlflow.entities import Param
        new = [Param(k, str(v)[:PARAM_MAX_CHARS]) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):  # log_batch takes at most 100 params
            self.client.log_batch(run_id, params=new[i:i + 100])
        return {"run_id": run_id, "experiment": self.experiment}

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(self.experiment)
        except MlflowException:  # another run created it a moment ago
            return self.client.get_experiment_by_name(self.experiment).experiment_id

    def log(self, metrics, step, purge=True):
        """Sent in MLflow's logging thread, so a step never waits on the network; the previous batch
        had a whole log interval to arrive, and raises here if it failed."""
        from mlflow.entities import Metric
        self._wait()
        now = int(time.time() * 1000)
        self.pending = self.client.log_batch(self.run_id, synchronous=False,
                                             metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def _wait(self):
        pending, self.pending = getattr(self, "pending", None), None
        if pending is not None:
            pending.wait()

    def close(self, exit_code):
        self._wait()
        status = {EXIT_OK: "FINISHED", EXIT_INTERRUPTED: "KILLED"}.get(exit_code, "FAILED")
        self.client.set_terminated(self.run_id, status)


class WandbSink(Sink):
    """A W&B run in <run_dir>/wandb/: offline (for `wandb sync`) unless this machine's environment has
    WANDB_API_KEY or sets WANDB_MODE itself. Project WANDB_PROJECT (default opskit), group phase/config."""

    def open(self, state, params):
        import wandb

        run_id = (state or {}).get("id") or uuid.uuid4().hex[:12]
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run_dir.joinpath(WANDB_DIR).mkdir(exist_ok=True)
        settings = wandb.Settings(console="off", x_disable_stats=True, save_code=False, disable_git=True,
                                  silent=True, x_transaction_log_flush_interval=WANDB_FLUSH_S)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "opskit"), id=run_id, resume="allow",
                              name=self.spec.run, group=f"{self.spec.phase}/{self.spec.config}",
                              job_type="train", dir=str(self.run_dir), mode=mode, config=params,
                              allow_val_change=True, settings=settings)
        return {"id": run_id, "project": self.run.project, "mode": mode}

    def log(self, metrics, step, purge=True):
        self.run.log(metrics, step=step)

    def close(self, exit_code):
        self.run.finish(exit_code=exit_code)


SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MlflowSink}


# ---------------------------------------------------------------- the tracker


class Tracker:
    """The trackers of one attempt. Every call into a sink is guarded: the first error turns that sink off
    (said once in run.log) and the others, and training, go on."""

    def __init__(self, sinks: list[Sink], state_path: Path | None = None, reraise: tuple = ()):
        self.sinks, self.state_path, self.state = sinks, state_path, {}
        self.reraise = reraise  # exceptions that are not the tracker's (the trainer's stop signal)
        self.logged_train = False

    def _guarded(self, sink: Sink, what: str, fn, *args):
        try:
            return fn(*args)
        except self.reraise:
            raise
        except Exception as e:  # a tracker must never stop training
            summary = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            _say(f"{sink.key}: {what} failed ({summary}); it is off for the rest of this attempt, training goes on")
            self.sinks = [s for s in self.sinks if s is not sink]
            return None

    def open(self, params: dict) -> "Tracker":
        saved = read_json(self.state_path) or {} if self.state_path else {}
        self.state = dict(saved)
        for sink in list(self.sinks):
            got = self._guarded(sink, "opening", sink.open, saved.get(sink.key), params)
            if got is not None:
                self.state[sink.key] = got  # a sink that failed keeps its saved id for the next attempt
        self._save()
        if self.sinks:
            _say("logging to " + ", ".join(s.key for s in self.sinks))
        return self

    def _save(self) -> None:
        if self.state_path is not None and self.state:
            atomic_write_json(self.state_path, self.state)

    def log(self, metrics: dict, step: int, purge: bool = True) -> None:
        for sink in list(self.sinks):
            self._guarded(sink, f"logging step {step}", sink.log, metrics, step, purge)

    def log_train(self, record: dict) -> None:
        """Listener of train.heartbeat.LossCurve: one call per log step."""
        self.log(train_metrics(record), record["step"])
        self.logged_train = True

    def close(self, exit_code: int) -> None:
        """Log eval/* when the attempt finished (eval_per_length.json is this attempt's), end every run."""
        if exit_code == EXIT_OK and self.sinks and self.state_path is not None:
            run_dir = self.state_path.parent
            evals, results = read_json(run_dir / EVAL_PER_LENGTH), read_json(run_dir / RESULTS) or {}
            metrics = eval_metrics(evals or {})
            if metrics:
                self.log(metrics, int(results.get("steps") or 0), purge=self.logged_train)
        for sink in list(self.sinks):
            self._guarded(sink, "closing", sink.close, exit_code)
        self._save()  # TensorBoard notes that it wrote the params
        self.sinks = []


def open_tracker(spec: TrainSpec, is_main: bool, curve=None, reraise: tuple = ()) -> Tracker:
    """The spec's trackers, opened on rank 0 (a Tracker with none elsewhere), listening to `curve`.

    Raises SpecError on every rank when a tracker's package is missing. Exceptions of a `reraise` type
    (the trainer's Interrupted) pass through instead of turning a tracker off.
    """
    check_installed(spec.tracking)
    if not is_main or not spec.tracking:
        return Tracker([])
    sinks = [SINKS[item.split(":", 1)[0]](item, spec) for item in spec.tracking]
    tracker = Tracker(sinks, Path(spec.out_dir) / TRACKING, reraise).open(params_of(spec))
    if curve is not None:
        curve.listeners.append(tracker.log_train)
    return tracker
