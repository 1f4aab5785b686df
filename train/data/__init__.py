"""Data for the trainer: dataset registry, tokenizers, token caches and the chunk reader.

`prepare_data(spec)` is the one call the trainer makes. Heavy modules (tokenizers, datasets,
numpy memmaps) are imported inside it, so `import train.data` stays light; no module here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from train.data.registry import DataError, DatasetInfo, dataset_info, get_dataset, list_datasets

__all__ = ["DataError", "DatasetInfo", "PreparedData", "dataset_info", "get_dataset", "list_datasets",
           "prepare_data", "train_cache_tokens"]

CACHE_ROUND_TOKENS = 2**16  # round the train cache up so runs that differ a little share one


@dataclass
class PreparedData:
    train: Any  # np.memmap, 1-D token ids
    val: Any
    vocab_size: int
    eos_id: int
    cache_bytes: int
    train_info: Any  # train.data.cache.CacheInfo
    val_info: Any


def train_cache_tokens(train_tokens: int, seq_len: int) -> int:
    """Tokens to cache for training: the run's tokens plus one chunk, rounded up to 64Ki."""
    need = train_tokens + seq_len + 1
    return -(-need // CACHE_ROUND_TOKENS) * CACHE_ROUND_TOKENS


def prepare_data(spec: dict, on_progress: Callable[[dict], None] | None = None,
                 num_workers: int | None = None) -> PreparedData:
    """Load the spec's tokenizer and build (or find) its train and validation caches."""
    from train.data.cache import build_cache
    from train.data.tokenizer import load_tokenizer

    cache_dir = spec["cache_dir"]
    tokenizer = load_tokenizer(spec["tokenizer"], cache_dir)
    sources = [(d["dataset"], float(d.get("weight", 1.0))) for d in spec["data"]["train"]]
    seed = int(spec.get("data_seed", 0))
    train = build_cache(cache_dir, sources, "train", tokenizer,
                        train_cache_tokens(spec["train_tokens"], spec.get("seq_len", 0)),
                        on_progress=on_progress, num_workers=num_workers, seed=seed)
    val_spec = spec["data"]["validation"]
    val = build_cache(cache_dir, [(val_spec["dataset"], 1.0)], val_spec.get("split", "validation"), tokenizer,
                      int(val_spec.get("max_tokens", 5_000_000)), on_progress=on_progress,
                      num_workers=num_workers)
    return PreparedData(train=train.open(), val=val.open(), vocab_size=tokenizer.vocab_size,
                        eos_id=tokenizer.eos_id, cache_bytes=train.n_bytes + val.n_bytes,
                        train_info=train, val_info=val)
