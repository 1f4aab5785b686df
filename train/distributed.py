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


def compile_enabled(compile_setting: bool | str, device: torch.device) -> bool:
    """`auto` compiles on CUDA only (on a CPU compile costs 10-40 s and gains nothing at tiny sizes)."""
    return compile_setting is True or (compile_setting == "auto" and device.type == "cuda")


def compute_dtype(dtype_setting: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on CUDA and fp32 elsewhere (bf16 matmuls are ~100x slower on these CPUs)."""
    if dtype_setting == "bf16" or (dtype_setting == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def parallelize(model: nn.Module, param_dtype: torch.dtype, activation_checkpointing: bool = False,
                compile_blocks: bool = False) -> nn.Module:
    """Activation checkpointing and torch.compile per block, then fully_shard per block and the root.

    Parameters stay fp32 (the optimizer's master copy); FSDP2 casts them to `param_dtype` for compute
    and reduces gradients in fp32. On one rank nothing is resharded after forward (there is nothing
    to gather, only the bf16 cast to redo); on several, every block but the last is (the last one's
    backward comes right away), as torchtitan does. Resharding after backward is decided per
    micro-step by train.step.train_step.
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
    several = dist.get_world_size() > 1
    for i, block in enumerate(blocks):
        fully_shard(block, mp_policy=mp, reshard_after_forward=several and i < len(blocks) - 1)
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    return model


class StopAgreement:
    """Whether any rank asked to stop, agreed on by all at the same step without stalling the GPU.

    One rank: the local flag. Several: each boundary starts an all-reduce (MAX) of the local flag on
    a CPU (gloo) group of its own and reads the one started at the previous boundary, which is long
    done by then, so no boundary waits on the device or the network; ranks stop one step after the
    signal, all at the same step.
    """

    def __init__(self):
        self.world = dist.get_world_size()
        self._group = dist.new_group(backend="gloo") if self.world > 1 else None
        self._pending = None  # (work, tensor) of the previous boundary

    def any_stop(self, flag: bool) -> bool:
        if self._group is None:
            return flag
        seen = self._collect()
        if not seen:  # the same on every rank, so all start the next one or none does
            t = torch.tensor([1 if flag else 0], dtype=torch.int32)
            self._pending = (dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group, async_op=True), t)
        return seen

    def _collect(self) -> bool:
        if self._pending is None:
            return False
        work, t = self._pending
        self._pending = None
        work.wait()
        return bool(t.item())

    def close(self) -> None:
        """Wait for the last all-reduce (every rank calls it once at the end of training)."""
        self._collect()


def mean_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() / dist.get_world_size()


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Items rank `rank` takes of 0..n-1 (round robin), padded with its last one (or 0) so that every
    rank gets ceil(n / world): FSDP needs the same number of forward calls on every rank."""
    mine = list(range(rank, n, world))
    per_rank = -(-n // world)
    return mine + [mine[-1] if mine else 0] * (per_rank - len(mine))


def gather_sharded(values: list[float], n: int, device: torch.device) -> list[float]:
    """Inverse of shard_indices: every rank's `values` (one per index it took) back in 0..n-1 order."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return list(values[:n])
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    table = torch.stack(parts).cpu().tolist()  # table[rank][j] is item rank + j * world
    return [table[i % world][i // world] for i in range(n)]


def barrier_polling(poll_s: float = 0.2) -> None:
    """A barrier that waits in Python, so a signal handler can still run (and raise) meanwhile."""
    work = dist.barrier(async_op=True)
    while not work.is_completed():
        time.sleep(poll_s)
    work.wait()
