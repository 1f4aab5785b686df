"""`targets add`: named local targets (their GPUs given or detected), and the settings every kind
takes for cost, notifications, the idle action and "GPUs idle", checked before anything is stored."""
from __future__ import annotations

import subprocess
import sys

import pytest

from opskit import operations
from opskit.errors import OpsError
from opskit.store import Store
from opskit.targets.local import torch_device_count


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "state.db") as s:
        yield s


def test_a_named_local_target_gets_a_workdir_beside_the_store_and_its_gpus(store, tmp_path):
    rec = operations.add_target(store, "ws", "local", {"gpus": 2, "gpus_per_run": 1})
    assert rec["config"] == {"workdir": str(tmp_path / ".opskit" / "ws"), "gpus": 2, "gpus_per_run": 1,
                             "gpus_detected": False}
    tgt = operations.get_target(store, "ws")
    assert tgt.kind == "local" and tgt.in_place and tgt.queue_config()["gpus"] == 2
    detected = operations.add_target(store, "ws2", "local", {"workdir": str(tmp_path / "w2")})["config"]
    assert detected["gpus_detected"] and detected["gpus"] == torch_device_count(sys.executable) == 0  # CPU torch here
    with pytest.raises(OpsError, match="--gpus-per-run 3 exceeds the target's 2 GPUs"):
        operations.add_target(store, "ws3", "local", {"gpus": 2, "gpus_per_run": 3})


def test_the_builtin_local_target_detects_its_gpus_and_can_be_set_by_hand(store):
    rec = operations.local_target_record(store)
    assert rec["config"]["gpus_detected"] and rec["config"]["gpus"] == 0  # no GPU on this machine
    rec = operations.add_target(store, "local", "local", {"gpus": 4, "price_per_hour": 1.5})
    assert rec["config"]["gpus"] == 4 and rec["config"]["price_per_hour"] == 1.5
    assert operations.local_target_record(store)["config"]["gpus"] == 4  # the user's count is kept
    with pytest.raises(OpsError, match="built-in local target"):
        operations.add_target(store, "local", "ssh", {"ssh": "u@h"})


def test_price_notify_idle_and_gpu_idle_settings(store):
    rec = operations.add_target(store, "box", "ssh", {
        "ssh": "ubuntu@203.0.113.7", "gpus": 2, "price_per_hour": 4.4, "notify": ["https://hooks.example/T0/B0?x=1"],
        "idle_after_s": 1800, "on_idle": "sudo shutdown -h now", "gpu_idle_pct": 5, "gpu_idle_window_s": 900})
    cfg = rec["config"]
    assert (cfg["price_per_hour"], cfg["notify"], cfg["idle_after_s"], cfg["on_idle"]) == (
        4.4, ["https://hooks.example/T0/B0?x=1"], 1800.0, "sudo shutdown -h now")
    box = operations.get_target(store, "box").queue_config()  # what the box's supervisor reads
    assert box["target"] == "box" and box["notify"] == cfg["notify"] and box["gpu_idle_window_s"] == 900.0
    assert "idle_even_unpulled" not in box


@pytest.mark.parametrize("options, error", [
    ({"notify": ["ftp://x/y"]}, "give an http:// or https:// URL"),
    ({"notify": ["https://me:pw@hooks.example/x"]}, "a URL with a user or password in it is refused"),
    ({"on_idle": "sudo poweroff"}, "--on-idle CMD and --idle-after SECONDS go together"),
    ({"idle_after_s": 60}, "--on-idle CMD and --idle-after SECONDS go together"),
    ({"price_per_hour": -1}, "a price is not negative"),
    ({"gpu_idle_pct": 101}, "between 0 \\(off\\) and 100"),
    ({"gpu_idle_window_s": 10}, "between 60 and 3600 s"),
])
def test_bad_settings_are_one_line_errors(store, options, error):
    with pytest.raises(OpsError, match=error) as e:
        operations.add_target(store, "box", "ssh", {"ssh": "u@h", **options})
    assert "pw" not in str(e.value) and store.get_target("box") is None


def test_slurm_has_no_box_to_stop(store, tmp_path):
    with pytest.raises(OpsError, match="SLURM holds a cluster's machines"):
        operations.add_target(store, "hpc", "slurm", {"workdir": str(tmp_path), "idle_after_s": 60, "on_idle": "x"})
    cfg = operations.add_target(store, "hpc", "slurm", {"workdir": str(tmp_path), "price_per_hour": 2.0,
                                                        "notify": ["http://127.0.0.1:9/x"]})["config"]
    assert cfg["price_per_hour"] == 2.0 and cfg["notify"] == ["http://127.0.0.1:9/x"]


def test_targets_add_cli_takes_local_and_shows_no_webhook_secret(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "opskit.cli", "--state", str(tmp_path / "s.db"), "targets", "add",
                           "ws", "--local", "--gpus", "2", "--notify", "https://hooks.example/T0/B0/XyZsecret?token=abc"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "added local target ws:" in proc.stdout and "gpus=2" in proc.stdout
    assert "token=abc" not in proc.stdout and "notify=['https://hooks.example/T0/B0/XyZsecret?...']" in proc.stdout
    both = subprocess.run([sys.executable, "-m", "opskit.cli", "--state", str(tmp_path / "s.db"), "targets", "add",
                           "x", "--local", "--ssh", "u@h"], capture_output=True, text=True, timeout=60)
    assert both.returncode != 0 and both.stderr.strip() == "error: --local is this machine: not with --ssh or --slurm"
