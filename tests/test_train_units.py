"""Pure parts of the trainer: spec validation, lr schedule, MFU, heartbeat and loss-curve files."""
from __future__ import annotations

import copy
import json
import math
import multiprocessing as mp
import os
import time

import pytest

from train.contract import STATUS
from train.heartbeat import Heartbeat, LossCurve, read_loss_curve
from train.mfu import mfu, peak_flops
from train.schedule import lr_at, warmup_steps
from train.spec import SpecError, check_world, load_spec, validate

SPEC = {
    "run": "demo/geo_10k/s42", "phase": "demo", "config": "geo_10k", "seed": 42, "attempt": 1,
    "preset": "tiny",
    "rope": {"spectrum": "geo_10k", "scaling": None},
    "tokenizer": "opskit-demo-bpe",
    "data": {"train": [{"dataset": "demo-stories", "weight": 1.0}],
             "validation": {"dataset": "demo-stories", "split": "validation", "max_tokens": 200000}},
    "train_tokens": 1000000, "seq_len": 128, "micro_batch": 8, "grad_accum": 1,
    "lr": 0.003, "warmup_frac": 0.02, "weight_decay": 0.1, "grad_clip": 1.0,
    "dtype": "auto", "compile": False, "activation_checkpointing": False,
    "eval": {"lengths": [128, 256, 512], "chunks": 4, "mode": "sequential"},
    "checkpoint_every": 50, "keep_checkpoints": 2, "log_every": 10,
    "cache_dir": "/tmp/cache", "out_dir": "/tmp/runs/demo/geo_10k/s42",
}


def test_valid_spec_reads_every_field():
    spec = validate(copy.deepcopy(SPEC))
    assert spec.preset == "tiny" and spec.spectrum == "geo_10k" and spec.scaling is None
    assert spec.eval_lengths == [128, 256, 512] and spec.eval_mode == "sequential"
    assert spec.tokens_per_step(2) == 128 * 8 * 2
    assert check_world(spec, 2) == 1000000 // 2048


@pytest.mark.parametrize("mutate, field", [
    (lambda s: s.pop("seq_len"), "seq_len"),
    (lambda s: s.update(seq_len="128"), "seq_len"),
    (lambda s: s.update(micro_batch=0), "micro_batch"),
    (lambda s: s.update(lr=True), "lr"),
    (lambda s: s.update(compile=1), "compile"),
    (lambda s: s.update(compile="yes"), "compile"),
    (lambda s: s.update(dtype="fp16"), "dtype"),
    (lambda s: s.update(warmup_frac=1.5), "warmup_frac"),
    (lambda s: s.update(out_dir="runs/x"), "out_dir"),
    (lambda s: s["rope"].pop("spectrum"), "rope.spectrum"),
    (lambda s: s["rope"].update(scaling={"type": "linear", "factor": 2, "original_max": 128}), "rope.scaling.type"),
    (lambda s: s["rope"].update(scaling={"type": "yarn", "factor": -2, "original_max": 128}), "rope.scaling.factor"),
    (lambda s: s["data"].update(train=[]), "data.train"),
    (lambda s: s["data"]["train"][0].update(weight=0), "data.train[0].weight"),
    (lambda s: s["data"]["validation"].pop("max_tokens"), "data.validation.max_tokens"),
    (lambda s: s["eval"].update(lengths=[128, -1]), "eval.lengths[1]"),
    (lambda s: s["eval"].update(mode="shuffled"), "eval.mode"),
])
def test_bad_spec_names_the_field(mutate, field):
    raw = copy.deepcopy(SPEC)
    mutate(raw)
    with pytest.raises(SpecError) as err:
        validate(raw)
    assert f"'{field}'" in str(err.value)


def test_compile_auto_is_on_for_cuda_only():
    import torch
    from train.distributed import compile_enabled
    assert validate({**copy.deepcopy(SPEC), "compile": "auto"}).compile == "auto"
    assert compile_enabled("auto", torch.device("cuda", 0)) and not compile_enabled("auto", torch.device("cpu"))
    assert compile_enabled(True, torch.device("cpu")) and not compile_enabled(False, torch.device("cuda", 0))


def test_budget_below_one_step_is_refused():
    spec = validate({**copy.deepcopy(SPEC), "train_tokens": 1000})
    with pytest.raises(SpecError, match="train_tokens"):
        check_world(spec, 1)


def test_load_spec_reports_bad_json(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        load_spec(path)
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.json")


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    total, peak = 100, 1e-3
    warm = warmup_steps(total, 0.1)
    lrs = [lr_at(s, total, peak, warm) for s in range(total)]
    assert warm == 10
    assert lrs[0] == pytest.approx(peak / 10) and lrs[9] == pytest.approx(peak)
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))  # strictly decreasing after warmup
    assert lrs[55] == pytest.approx(peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert lr_at(total, total, peak, warm) == pytest.approx(0.1 * peak)
    assert lr_at(0, total, peak, 0) == pytest.approx(peak)  # no warmup


def test_mfu_uses_the_peak_table():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops(None, "fp32") is None and peak_flops("cpu", "fp32") is None
    assert mfu(6e9, 50_000, 989e12, 1) == pytest.approx(6e9 * 5e4 / 989e12)
    assert mfu(6e9, 100_000, 989e12, 2) == pytest.approx(6e9 * 5e4 / 989e12)
    assert mfu(6e9, 1000, None, 1) is None


def test_heartbeat_refreshes_updated_at_in_the_background(tmp_path):
    hb = Heartbeat(tmp_path, attempt=3, interval_s=0.05).start()
    try:
        hb.update(state="tokenizing", cache_tokens=10, message="building cache")
        first = json.loads((tmp_path / STATUS).read_text())
        time.sleep(0.3)
        later = json.loads((tmp_path / STATUS).read_text())
    finally:
        hb.stop()
    assert first["state"] == later["state"] == "tokenizing" and first["attempt"] == 3
    assert first["pid"] == os.getpid() and later["cache_tokens"] == 10
    assert later["updated_at"] > first["updated_at"]
    # Only the trainer's own reports move progress_at; the thread's beats do not (stall detection).
    assert later["progress_at"] == first["progress_at"] <= first["updated_at"]
    with pytest.raises(ValueError, match="unknown trainer state"):
        hb.update(state="sleeping")


def test_disabled_heartbeat_writes_nothing(tmp_path):
    hb = Heartbeat(tmp_path, attempt=1, enabled=False, interval_s=0.01).start()
    hb.update(state="training")
    hb.stop()
    assert not (tmp_path / STATUS).exists()


def _poll_status(path, stop_at, results):
    seen, bad = 0, 0
    while time.time() < stop_at:
        try:
            text = open(path).read()
        except FileNotFoundError:
            continue
        try:
            json.loads(text)
            seen += 1
        except json.JSONDecodeError:
            bad += 1
    results.put((seen, bad))


def test_status_json_is_always_valid_for_a_polling_reader(tmp_path):
    hb = Heartbeat(tmp_path, attempt=1, interval_s=0.001).start()
    results = mp.Queue()
    reader = mp.Process(target=_poll_status, args=(tmp_path / STATUS, time.time() + 2.0, results))
    reader.start()
    try:
        i, end = 0, time.time() + 1.5
        while time.time() < end:  # the main thread and the heartbeat thread both rewrite the file
            hb.update(state="training", step=i, message="x" * (i % 500))
            i += 1
    finally:
        hb.stop()
    seen, bad = results.get(timeout=10)
    reader.join()
    assert bad == 0 and seen > 100


def test_loss_curve_truncates_after_the_resumed_step(tmp_path):
    curve = LossCurve(tmp_path)
    for step in range(1, 8):
        curve.append(step, step * 100, 5.0 - step * 0.1, 1e-3, 1.0, 1000.0)
    with open(curve.path, "a") as f:
        f.write('{"step": 8, "tok')  # torn line from a crash mid-append
    assert curve.truncate_after(5) == 3
    assert [r["step"] for r in read_loss_curve(tmp_path)] == [1, 2, 3, 4, 5]
    assert curve.truncate_after(5) == 0
