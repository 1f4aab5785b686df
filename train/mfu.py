"""Model FLOPs utilisation: the one place that knows the peak throughput of each accelerator.

MFU = model FLOPs per token x tokens/s / (peak FLOP/s per device x devices). Pure Python.
"""
from __future__ import annotations

# Dense peak FLOP/s (no sparsity) by (device-name fragment, compute dtype). The first fragment found
# in the device name wins, so more specific names come first.
PEAK_FLOPS: list[tuple[str, str, float]] = [
    ("H100 PCIe", "bf16", 756e12),
    ("H100 NVL", "bf16", 835e12),
    ("H100", "bf16", 989e12),   # SXM
    ("H200", "bf16", 989e12),
    ("GH200", "bf16", 989e12),
    ("B200", "bf16", 2250e12),
    ("A100", "bf16", 312e12),
    ("L40S", "bf16", 362e12),
    ("A10G", "bf16", 125e12),
    ("4090", "bf16", 165e12),
    # fp32 runs on these GPUs use TF32 tensor cores.
    ("H100 PCIe", "fp32", 378e12),
    ("H100", "fp32", 494e12),
    ("H200", "fp32", 494e12),
    ("A100", "fp32", 156e12),
]


def peak_flops(device_name: str | None, dtype: str) -> float | None:
    """Peak dense FLOP/s of one device for `dtype` ("bf16"/"fp32"), or None when unknown (CPUs)."""
    if not device_name:
        return None
    for fragment, kind, peak in PEAK_FLOPS:
        if kind == dtype and fragment in device_name:
            return peak
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak_per_device: float | None, n_devices: int) -> float | None:
    if not peak_per_device or tokens_per_s <= 0:
        return None
    return flops_per_token * tokens_per_s / (peak_per_device * n_devices)
