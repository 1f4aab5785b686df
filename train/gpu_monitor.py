"""GPU utilisation, memory and power of a run's GPUs, sampled with nvidia-smi into its heartbeat.

Rank 0 samples every GPU of the run (CUDA_VISIBLE_DEVICES, which every rank of a one-node run
shares) every few seconds and puts the numbers into status.json (docs/run-directory.md): the latest
mean utilisation, memory and power, and the highest utilisation of each GPU_BUCKET_S bucket, from
which opskit.states tells a run whose GPUs sit idle ("GPUs idle"). Standard library only; without
nvidia-smi (a CPU run, a CPU box) nothing is sampled and nothing fails.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

from train.contract import GPU_BUCKET_S, GPU_BUCKETS

QUERY_FIELDS = ("index", "uuid", "utilization.gpu", "memory.used", "memory.total", "power.draw")
SAMPLE_S = float(os.environ.get("OPSKIT_GPU_SAMPLE_S", 5.0))
QUERY_TIMEOUT_S = 10.0
GIVE_UP_AFTER = 5  # failed queries in a row: stop sampling (a broken driver must not spam the log)


def query_argv(devices: str | None = None) -> list[str]:
    """nvidia-smi's CSV query of the listed GPUs (indices or UUIDs, as CUDA_VISIBLE_DEVICES holds them)."""
    argv = ["nvidia-smi", f"--query-gpu={','.join(QUERY_FIELDS)}", "--format=csv,noheader,nounits"]
    return argv + (["-i", devices] if devices else [])


def _number(text: str) -> float | None:
    """A value of the CSV; nvidia-smi writes `[N/A]`, `[Not Supported]` (and sometimes units) otherwise."""
    text = text.strip().split(" ")[0]
    try:
        return float(text)
    except ValueError:
        return None


def parse_query(text: str) -> list[dict]:
    """One dict per GPU line of `query_argv`'s output: index, uuid, util_pct, mem_used_mb, mem_total_mb,
    power_w (None where the GPU does not report it, e.g. utilisation of a MIG slice)."""
    out = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != len(QUERY_FIELDS) or not parts[0].isdigit():
            continue  # a warning line, a blank line
        out.append({"index": int(parts[0]), "uuid": parts[1], "util_pct": _number(parts[2]),
                    "mem_used_mb": _number(parts[3]), "mem_total_mb": _number(parts[4]),
                    "power_w": _number(parts[5])})
    return out


def parse_list(text: str) -> int:
    """How many GPUs `nvidia-smi -L` lists (its MIG lines, indented under their GPU, are not GPUs)."""
    return sum(1 for line in text.splitlines() if line.startswith("GPU ") and ":" in line)


def summary(gpus: list[dict]) -> dict:
    """The heartbeat fields of one sample: mean utilisation, total memory used and total power."""
    def known(key):
        return [g[key] for g in gpus if g[key] is not None]
    util, mem, power = known("util_pct"), known("mem_used_mb"), known("power_w")
    return {"gpu_util": round(sum(util) / len(util), 1) if util else None,
            "gpu_mem_mb": round(sum(mem)) if mem else None,
            "gpu_power_w": round(sum(power), 1) if power else None}


def add_to_buckets(buckets: list[list[float]], t: float, util: float) -> list[list[float]]:
    """[[bucket start, highest utilisation in it], ...], newest last, at most GPU_BUCKETS."""
    start = t - t % GPU_BUCKET_S
    if buckets and buckets[-1][0] == start:
        buckets[-1][1] = max(buckets[-1][1], util)
    else:
        buckets.append([start, util])
    del buckets[:-GPU_BUCKETS]
    return buckets


class GpuMonitor:
    """A thread that samples the run's GPUs into the heartbeat (Heartbeat.note: no progress, no write
    of its own; the heartbeat's thread writes the file)."""

    def __init__(self, heartbeat, devices: str | None = None, interval_s: float = SAMPLE_S):
        self.heartbeat = heartbeat
        self.devices = devices
        self.interval_s = interval_s
        self.buckets: list[list[float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failures = 0

    @classmethod
    def for_run(cls, heartbeat, on_gpu: bool) -> "GpuMonitor | None":
        """The monitor of this process's run, started; None where there is nothing to sample (another
        rank than 0, a CPU run, no nvidia-smi, CUDA_VISIBLE_DEVICES empty)."""
        devices = os.environ.get("CUDA_VISIBLE_DEVICES")
        if not (heartbeat.enabled and on_gpu and shutil.which("nvidia-smi")) or devices in ("", "-1"):
            return None
        return cls(heartbeat, devices).start()

    def sample(self) -> dict | None:
        """Query nvidia-smi once; the heartbeat fields, or None when it did not answer."""
        try:
            res = subprocess.run(query_argv(self.devices), capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            return self._failed(str(e))
        gpus = parse_query(res.stdout)
        if res.returncode != 0 or not gpus:
            return self._failed((res.stderr or res.stdout).strip()[:200] or f"exit {res.returncode}")
        self.failures = 0
        now = time.time()
        fields = {**summary(gpus), "gpu_at": now}
        if fields["gpu_util"] is not None:
            fields["gpu_util_max"] = [list(b) for b in add_to_buckets(self.buckets, now, fields["gpu_util"])]
        return fields

    def _failed(self, why: str) -> None:
        self.failures += 1
        if self.failures == GIVE_UP_AFTER:
            print(f"gpu monitor: nvidia-smi failed {GIVE_UP_AFTER} times ({why}); no more GPU samples", flush=True)
            self._stop.set()
        return None

    def _loop(self) -> None:
        phase = None
        while not self._stop.is_set():
            if self.heartbeat.status.get("state") != phase:  # buckets cover one phase: tokenizing is no
                phase = self.heartbeat.status.get("state")   # reason to call the training idle
                self.buckets = []
            fields = self.sample()
            if fields:
                self.heartbeat.note(**fields)
            self._stop.wait(self.interval_s)

    def start(self) -> "GpuMonitor":
        self._thread = threading.Thread(target=self._loop, name="gpu-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=QUERY_TIMEOUT_S + 1)
            self._thread = None
