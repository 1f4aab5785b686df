"""Cache-build throughput against the one-text-at-a-time baseline, on the same text in the same run.

Baseline: `tokenizer.encode(text)` per document in a Python loop (the earlier scripts), ids
collected in a list then written as one array. Cache build: train.data.cache.build_cache (batched,
journaled, through the tiktoken engine of train/data/fast_bpe.py when it reproduces the tokenizer)
into a fresh cache directory. Both use the demo BPE on demo-stories.

    OMP_NUM_THREADS=1 python benchmarks/bench_tokenize.py --mb 30 [--workers 0] [--rounds 2]

The two alternate for --rounds rounds and the best round of each is reported, so load from other
processes on a shared machine hits both alike (the load average is printed too).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from train.data.cache import build_cache
from train.data.corpus import corpus_dir, ensure_demo_corpus
from train.data.tokenizer import DEMO_BPE, load_tokenizer


def bench_text(cache_dir: Path, mb: float) -> Path:
    """A local .jsonl of about `mb` MB: the demo train split repeated as needed."""
    src = ensure_demo_corpus(corpus_dir(cache_dir))["train"]
    lines = src.read_text().splitlines(keepends=True)
    out, size = cache_dir / f"bench_{mb}mb.jsonl", 0
    with open(out, "w") as f:
        for line in itertools.cycle(lines):
            if size >= mb * 1e6:
                break
            f.write(line)
            size += len(line)
    return out


def baseline(tok, path: Path) -> tuple[int, float]:
    start = time.perf_counter()
    ids: list[int] = []
    with open(path) as f:
        for line in f:
            ids.extend(tok.backend.encode(json.loads(line)["text"], add_special_tokens=False).ids)
            ids.append(tok.eos_id)
    arr = np.array(ids, dtype=np.uint16)
    arr.tofile(path.with_suffix(".baseline.bin"))
    return len(arr), time.perf_counter() - start


def cached(tok, path: Path, cache_dir: Path, workers: int) -> tuple[int, float, Path]:
    shutil.rmtree(cache_dir / "tok", ignore_errors=True)
    start = time.perf_counter()
    info = build_cache(cache_dir, [(f"local:{path}", 1.0)], "train", tok, None, num_workers=workers)
    return info.n_tokens, time.perf_counter() - start, info.path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=30.0, help="MB of text to tokenize")
    ap.add_argument("--workers", type=int, default=0, help="cache build processes (0: in-process, Rust threads)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each is shown")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_tokenize_"))
    tok = load_tokenizer(DEMO_BPE, work)
    path = bench_text(work, args.mb)
    load_before = os.getloadavg()[0]
    t_base = t_cache = float("inf")
    for _ in range(args.rounds):
        n_base, t = baseline(tok, path)
        t_base = min(t_base, t)
        n_cache, t, cache_path = cached(tok, path, work, args.workers)
        t_cache = min(t_cache, t)
    same = np.array_equal(np.fromfile(path.with_suffix(".baseline.bin"), dtype=np.uint16),
                          np.fromfile(cache_path, dtype=np.uint16))
    print(f"text: {path.stat().st_size / 1e6:.1f} MB, {n_base} tokens, cores: {os.cpu_count()}, "
          f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}, best of {args.rounds} rounds")
    print(f"baseline (encode per text, Python loop): {n_base / t_base / 1e6:6.3f} M tokens/s  ({t_base:.1f} s)")
    print(f"cache build ({tok.engine}, workers={args.workers}): {n_cache / t_cache / 1e6:6.3f} M tokens/s  "
          f"({t_cache:.1f} s)")
    print(f"speed-up: {t_base / t_cache * n_cache / n_base:.2f}x   identical tokens: {same}")
    if not args.dir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
