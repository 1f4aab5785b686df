"""Documents of a dataset split, streamed in a fixed order (so a resumed cache build is exact)."""
from __future__ import annotations

import itertools
import json
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from train.data.registry import LOCAL_SUFFIXES, DataError, DatasetInfo, get_dataset


def _jsonl(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                record = json.loads(line)
                if field not in record:
                    raise DataError(f"{path}:{n}: no '{field}' field")
                yield record[field]


def _parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(columns=[field], batch_size=1024):
        yield from batch.column(0).to_pylist()


def _local_files(path: Path) -> Iterator[str]:
    """A .txt file is one document, a .jsonl line is one, a .parquet row is one."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise DataError(f"no {', '.join(LOCAL_SUFFIXES)} files under {path}")
    for file in files:
        if file.suffix == ".jsonl":
            yield from _jsonl(file, "text")
        elif file.suffix == ".parquet":
            yield from _parquet(file, "text")
        else:
            yield file.read_text(encoding="utf-8")


def _hub(info: DatasetInfo, split: str) -> Iterator[str]:
    import datasets

    stream = datasets.load_dataset(info.hf_id, info.config, split=split, streaming=True)
    for record in stream:
        yield record[info.text_field]


def _split_docs(info: DatasetInfo, split: str, cache_root: str | os.PathLike) -> Iterator[str]:
    if info.name == "demo-stories":
        from train.data.corpus import corpus_dir, ensure_demo_corpus

        return _jsonl(ensure_demo_corpus(corpus_dir(cache_root))[split], "text")
    if info.path is not None:
        root = Path(info.path)
        return _local_files(root / split if split in info.splits and len(info.splits) > 1 else root)
    return _hub(info, split)


def iter_documents(name: str, split: str, cache_root: str | os.PathLike) -> Iterator[str]:
    info = get_dataset(name)
    if not info.has_split(split):
        raise DataError(f"dataset '{name}' has no split '{split}' (has {', '.join(info.splits)})")
    if split in info.splits and not (split == "train" and info.holdout_docs):
        return _split_docs(info, split, cache_root)
    train = _split_docs(info, "train", cache_root)
    if split == "validation":
        return itertools.islice(train, info.holdout_docs)
    return itertools.islice(train, info.holdout_docs, None)


def interleave(streams: list[Iterable[str]], weights: list[float], seed: int) -> Iterator[str]:
    """Pick each next document from a stream chosen by weight (seeded); a stream that ends drops out."""
    if len(streams) != len(weights) or any(w <= 0 for w in weights):
        raise DataError(f"mixture weights must be positive, one per dataset: {weights}")
    rng = random.Random(seed)
    live = [iter(s) for s in streams]
    weights = list(weights)
    while live:
        i = rng.choices(range(len(live)), weights=weights)[0] if len(live) > 1 else 0
        try:
            yield next(live[i])
        except StopIteration:
            del live[i], weights[i]


def mixture_documents(sources: list[tuple[str, float]], split: str, cache_root: str | os.PathLike,
                      seed: int = 0) -> Iterator[str]:
    streams = [iter_documents(name, split, cache_root) for name, _ in sources]
    if len(streams) == 1:
        return streams[0]
    return interleave(streams, [w for _, w in sources], seed)
