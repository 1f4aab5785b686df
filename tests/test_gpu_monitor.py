"""GPU samples in the heartbeat (train/gpu_monitor.py): nvidia-smi's output parsed, buckets of the
highest utilisation, and nothing at all (no thread, no fields, no failure) where there is no GPU.

nvidia-smi's output is in tests/fixtures/nvidia_smi/. This machine has no GPU and no nvidia-smi, so
the one test of the sampling thread puts a two-line stand-in `nvidia-smi` on PATH that prints those
files; everything else (the heartbeat file, its thread, opskit's derivation) is the real one.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from opskit import states
from opskit.targets.local import detect_gpus, torch_device_count
from train import contract as C
from train import gpu_monitor as G
from train.heartbeat import Heartbeat

FIXTURES = Path(__file__).parent / "fixtures" / "nvidia_smi"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_query_of_two_training_h100s():
    gpus = G.parse_query(fixture("query_2xh100_training.csv"))
    assert [g["index"] for g in gpus] == [0, 1]
    assert gpus[0] == {"index": 0, "uuid": "GPU-4f6b2c1a-9e3d-4b7a-8c2e-1d5f6a7b8c9d", "util_pct": 98.0,
                       "mem_used_mb": 71846.0, "mem_total_mb": 81559.0, "power_w": 688.21}
    assert G.summary(gpus) == {"gpu_util": 97.0, "gpu_mem_mb": 143758, "gpu_power_w": 1367.8}


def test_values_a_gpu_does_not_report_are_left_out_not_zero():
    gpus = G.parse_query(fixture("query_unreported.csv") + "\nWARNING: infoROM is corrupted at gpu 0000:41:00.0\n")
    assert len(gpus) == 2  # the warning line is not a GPU
    assert gpus[0]["power_w"] is None and gpus[1]["util_pct"] is None
    assert G.summary(gpus) == {"gpu_util": 41.0, "gpu_mem_mb": 15363, "gpu_power_w": 61.3}
    assert G.summary([g for g in gpus if g["util_pct"] is None])["gpu_util"] is None


def test_nvidia_smi_list_counts_gpus_not_their_mig_slices():
    assert G.parse_list(fixture("list_2xh100.txt")) == 2
    assert G.parse_list(fixture("list_a100_mig.txt")) == 3
    assert G.parse_list("") == 0


def test_query_asks_for_the_runs_own_gpus():
    argv = G.query_argv("GPU-4f6b2c1a-9e3d-4b7a-8c2e-1d5f6a7b8c9d,1")
    assert argv[0] == "nvidia-smi" and argv[-2:] == ["-i", "GPU-4f6b2c1a-9e3d-4b7a-8c2e-1d5f6a7b8c9d,1"]
    assert "--format=csv,noheader,nounits" in argv and "-i" not in G.query_argv(None)


def test_buckets_keep_the_highest_utilisation_and_a_bounded_history():
    b: list = []
    t0 = 1_000_020.0  # inside the bucket that starts at 1_000_020 - 1_000_020 % 30 = 1_000_020 - 0
    G.add_to_buckets(b, t0, 5.0)
    G.add_to_buckets(b, t0 + 10, 80.0)
    G.add_to_buckets(b, t0 + 20, 1.0)
    assert b == [[t0 - t0 % C.GPU_BUCKET_S, 80.0]]
    for i in range(1, C.GPU_BUCKETS + 10):
        G.add_to_buckets(b, t0 + i * C.GPU_BUCKET_S, float(i))
    assert len(b) == C.GPU_BUCKETS and b[-1][1] == float(C.GPU_BUCKETS + 9)


def test_without_a_gpu_nothing_is_sampled_and_the_heartbeat_has_no_gpu_numbers(tmp_path):
    hb = Heartbeat(tmp_path, attempt=1).start()
    try:
        assert G.GpuMonitor.for_run(hb, on_gpu=True) is None  # no nvidia-smi on this machine
        assert G.GpuMonitor.for_run(hb, on_gpu=False) is None
    finally:
        hb.stop()
    status = json.loads((tmp_path / C.STATUS).read_text())
    assert status["gpu_util"] is None and status["gpu_util_max"] is None
    assert states.progress_fields(status).get("gpu_util") is None  # status shows '-'
    assert detect_gpus("/nonexistent/python") == 0 == torch_device_count("/nonexistent/python")


def test_samples_reach_status_json_without_counting_as_progress(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    which = tmp_path / "which"
    (bin_dir / "nvidia-smi").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\ncat "$(cat {which})"\n')
    (bin_dir / "nvidia-smi").chmod(0o755)
    which.write_text(str(FIXTURES / "query_2xh100_idle.csv"))
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    hb = Heartbeat(tmp_path / "run", attempt=1, interval_s=0.1)
    (tmp_path / "run").mkdir()
    hb.start()
    hb.update(state=C.HB_TRAINING)
    progress_at = hb.status["progress_at"]
    monitor = G.GpuMonitor.for_run(hb, on_gpu=True)
    monitor.interval_s = 0.1
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status = json.loads((tmp_path / "run" / C.STATUS).read_text())
            if status.get("gpu_util") is not None:
                break
            time.sleep(0.05)
    finally:
        monitor.stop()
        hb.stop()
    assert (tmp_path / "args").read_text().split()[-2:] == ["-i", "0,1"]
    assert status["gpu_util"] == 1.5 and status["gpu_mem_mb"] == 143758 and status["gpu_power_w"] == 239.5
    assert status["gpu_util_max"][-1][1] == 1.5 and status["progress_at"] == progress_at
    fields = states.progress_fields(status)
    assert (fields["gpu_util"], fields["gpu_mem_mb"], fields["gpu_power_w"]) == (1.5, 143758, 239.5)
