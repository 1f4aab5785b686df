"""Process group and FSDP2 wrapping.

A run is always inside a process group: under torchrun (env://, multi-node through its rendezvous)
or, started plainly, a one-rank gloo group on a FileStore, so FSDP2 and DCP behave the same.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

# Rank 0 may tokenize for a long time while the others wait at a barrier.
PG_TIMEOUT = timedelta(minutes=float(os.environ.get("OPSKIT_PG_TIMEOUT_MIN", 180)))


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join torchrun's group (RANK in env) or make a single-process one; pick the device."""
    use_cuda = torch.cuda.is_available()
    under_torchrun = "RANK" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if under_torchrun else 0
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # fp32 runs use TF32 tensor cores (train/mfu.py assumes so)
    else:
        device = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if under_torchrun:
        dist.init_process_group(backend, init_method="env://", timeout=PG_TIMEOUT)
    else:
        fd, store_path = tempfile.mkstemp(prefix="opskit-pg-")
        os.close(fd)
        os.unlink(store_path)  # FileStore wants to create the file itself
        store = dist.FileStore(store_path, 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=PG_TIMEOUT)
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def compute_dtype(dtype_setting: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on CUDA and fp32 elsewhere (bf16 matmuls are ~100x slower on these CPUs)."""
    if dtype_setting == "bf16" or (dtype_setting == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def parallelize(model: nn.Module, param_dtype: torch.dtype, activation_checkpointing: bool = False,
                compile_blocks: bool = False) -> nn.Module:
    """Activation checkpointing and torch.compile per block, then fully_shard per block and the root.

    Parameters stay fp32 (the optimizer's master copy); FSDP2 casts them to `param_dtype` for compute
    and reduces gradients in fp32.
    """
    blocks = model.blocks
    for i, block in enumerate(blocks):
        if activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
            block = checkpoint_wrapper(block)
        if compile_blocks:
            block.compile()
        blocks[i] = block
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. a signal arrived somewhere)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() / dist.get_world_size()


def barrier_polling(poll_s: float = 0.2) -> None:
    """A barrier that waits in Python, so a signal handler can still run (and raise) meanwhile."""
    work = dist.barrier(async_op=True)
    while not work.is_completed():
        time.sleep(poll_s)
    work.wait()
