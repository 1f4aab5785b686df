"""Token caches: a dataset split tokenized once into a flat memmap, shared by every run that asks for it.

Layout under `<cache_root>/tok/`:
  <key>/tokens.bin, <key>/meta.json   a finished cache (never modified; it appears by one rename)
  <key>.partial/                      a build in progress: tokens.bin.partial + journal.json
  <key>.lock                          flock held by the one process building <key>

The key hashes every setting that changes the bytes (sources and weights, split, mixture seed,
tokenizer and its vocabulary hash, dtype, max_tokens, format). A build appends whole batches of
documents and after each one fsyncs the tokens and then replaces the journal (documents consumed,
tokens written), so a killed build resumes by truncating to the journal and skipping the consumed
documents: the result is byte-identical to a build done in one go.
"""
from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from train.contract import atomic_write_json, read_json
from train.data.registry import LOCAL_PREFIX, DataError, get_dataset
from train.data.stream import mixture_documents
from train.data.tokenizer import Tokenizer

FORMAT_VERSION = 1
BATCH_TEXT_BYTES = 2_000_000  # text per tokenizer call and per journal entry
BATCH_MAX_DOCS = 2048
PROGRESS_EVERY_S = 1.0
DTYPES = ("uint16", "uint32")

Progress = Callable[[dict], None]


@dataclass
class CacheInfo:
    path: Path  # tokens.bin
    dtype: str
    n_tokens: int  # tokens this caller may read (a prefix when a larger cache serves a smaller request)
    n_docs: int
    key: str
    meta: dict = field(repr=False)

    def open(self) -> np.memmap:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))

    @property
    def n_bytes(self) -> int:
        return self.n_tokens * np.dtype(self.dtype).itemsize


def cache_dtype(vocab_size: int, requested: str | None = None) -> str:
    """uint16 when every id fits (vocab <= 65536), else uint32; a requested dtype must fit too."""
    if requested is None:
        return "uint16" if vocab_size <= 2**16 else "uint32"
    if requested not in DTYPES:
        raise DataError(f"cache dtype must be one of {', '.join(DTYPES)}, got '{requested}'")
    if requested == "uint16" and vocab_size > 2**16:
        raise DataError(f"cache dtype uint16 cannot hold ids of a {vocab_size}-token vocabulary; use uint32")
    return requested


def _local_fingerprint(name: str) -> list:
    """Paths, sizes and mtimes of a local dataset's files, so edited files get a new cache."""
    root = Path(get_dataset(name).path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [[str(p.relative_to(root.parent)), p.stat().st_size, int(p.stat().st_mtime)] for p in files]


def cache_settings(sources: list[tuple[str, float]], split: str, tokenizer: Tokenizer, dtype: str,
                   seed: int) -> dict:
    settings = {
        "format": FORMAT_VERSION, "split": split, "dtype": dtype,
        "sources": [[name, float(weight)] for name, weight in sources],
        "seed": seed if len(sources) > 1 else None,  # only a mixture's order depends on it
        "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "vocab_hash": tokenizer.vocab_hash,
    }
    local = {name: _local_fingerprint(name) for name, _ in sources if name.startswith(LOCAL_PREFIX)}
    if local:
        settings["local_files"] = local
    return settings


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _info(directory: Path, max_tokens: int | None) -> CacheInfo:
    meta = json.loads((directory / "meta.json").read_text())
    path = directory / "tokens.bin"
    itemsize = np.dtype(meta["dtype"]).itemsize
    if path.stat().st_size != meta["n_tokens"] * itemsize:
        raise DataError(f"cache {directory} is damaged: tokens.bin does not hold {meta['n_tokens']} tokens; "
                        f"delete the directory to rebuild it")
    n = meta["n_tokens"] if max_tokens is None else min(meta["n_tokens"], max_tokens)
    # A prefix of a larger cache may end inside a document; count it as one.
    n_docs = meta["n_docs"] if n == meta["n_tokens"] else None
    return CacheInfo(path=path, dtype=meta["dtype"], n_tokens=n, n_docs=n_docs, key=meta["key"], meta=meta)


def find_cache(tok_dir: Path, key: str, base_key: str, max_tokens: int | None) -> CacheInfo | None:
    """The finished cache for `key`, or one with the same settings that covers `max_tokens` tokens:
    a larger one (its prefix is exactly what a build would write) or one whose data ran out."""
    if (tok_dir / key / "meta.json").exists():
        return _info(tok_dir / key, max_tokens)
    best = None
    for meta_path in tok_dir.glob("*/meta.json"):
        if meta_path.parent.name.endswith(".partial"):
            continue
        meta = read_json(meta_path)
        if not meta or meta.get("base_key") != base_key:
            continue
        covers = meta["exhausted"] or (max_tokens is not None and meta["n_tokens"] >= max_tokens)
        if covers and (best is None or meta["n_tokens"] < best["n_tokens"]):
            best = meta
    return _info(tok_dir / best["key"], max_tokens) if best else None


@contextmanager
def _locked(lock_path: Path, partial_dir: Path, on_progress: Progress | None):
    """Hold an exclusive flock; while another process holds it, report its journal."""
    with open(lock_path, "a") as lock:
        last = 0.0
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if on_progress and time.monotonic() - last > PROGRESS_EVERY_S * 2:
                    last = time.monotonic()
                    journal = read_json(partial_dir / "journal.json") or {}
                    on_progress({"cache_tokens": journal.get("tokens", 0),
                                 "message": f"waiting for another process building cache {partial_dir.stem}"})
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    while True:
        batch, size = [], 0
        for text in docs:
            batch.append(text)
            size += len(text)
            if size >= BATCH_TEXT_BYTES or len(batch) >= BATCH_MAX_DOCS:
                break
        if not batch:
            return
        yield batch


def encode_documents(tokenizer: Tokenizer, texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """All texts' ids, each document followed by EOS, and the end offset of each document."""
    flat, lengths = tokenizer.encode_flat(texts)
    if len(flat) and int(flat.max()) >= tokenizer.vocab_size:
        raise DataError(f"tokenizer '{tokenizer.name}' produced id {int(flat.max())} >= its vocab_size "
                        f"{tokenizer.vocab_size}; refusing to write a {dtype} cache")
    ends = np.cumsum(lengths + 1)
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    is_eos = np.zeros(len(out), dtype=bool)
    is_eos[ends - 1] = True
    out[is_eos] = tokenizer.eos_id
    out[~is_eos] = flat
    return out, ends


def _encode_batch(tokenizer: Tokenizer, texts: list[str], dtype: str):
    ids, ends = encode_documents(tokenizer, texts, dtype)
    return ids, ends, np.fromiter((len(t.encode()) for t in texts), dtype=np.int64, count=len(texts))


def _pool_encode(args):
    texts, dtype = args
    return _encode_batch(_WORKER_TOKENIZER, texts, dtype)


_WORKER_TOKENIZER: Tokenizer | None = None


def _pool_init(tokenizer_json: str, name: str, vocab_size: int, eos_id: int):
    global _WORKER_TOKENIZER
    from tokenizers import Tokenizer as HFTokenizer

    _WORKER_TOKENIZER = Tokenizer(name, vocab_size, eos_id, HFTokenizer.from_str(tokenizer_json))
    if _WORKER_TOKENIZER.fast_engine():
        _WORKER_TOKENIZER.fast_engine().threads = 1  # the pool is the parallelism


@contextmanager
def _encoder(tokenizer: Tokenizer, dtype: str, num_workers: int):
    """A function batches -> encoded batches (in order): in-process (the Rust encoder uses every core)
    or a process pool when num_workers > 0."""
    if num_workers <= 0:
        yield lambda batches: (_encode_batch(tokenizer, b, dtype) for b in batches)
        return
    import multiprocessing as mp

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ctx = mp.get_context("spawn")
    init = (tokenizer.backend.to_str(), tokenizer.name, tokenizer.vocab_size, tokenizer.eos_id)
    with ctx.Pool(num_workers, initializer=_pool_init, initargs=init) as pool:

        def ordered(batches):
            # Pool.imap would read the whole dataset ahead; keep a few batches in flight instead.
            pending = deque()
            for batch in batches:
                pending.append(pool.apply_async(_pool_encode, ((batch, dtype),)))
                if len(pending) > 2 * num_workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()

        yield ordered


def _build(tok_dir: Path, key: str, base_key: str, settings: dict, sources, split: str, tokenizer: Tokenizer,
           max_tokens: int | None, on_progress: Progress | None, num_workers: int, seed: int,
           cache_root) -> CacheInfo:
    partial = tok_dir / f"{key}.partial"
    partial.mkdir(exist_ok=True)
    if (partial / "meta.json").exists() and (partial / "tokens.bin").exists():  # killed while finishing
        (partial / "journal.json").unlink(missing_ok=True)
        os.replace(partial, tok_dir / key)
        return _info(tok_dir / key, max_tokens)
    bin_path, journal_path = partial / "tokens.bin.partial", partial / "journal.json"
    journal = read_json(journal_path) or {"key": key, "docs": 0, "tokens": 0, "text_bytes": 0}
    itemsize = np.dtype(settings["dtype"]).itemsize
    name = "+".join(s for s, _ in sources) + f"/{split}"
    started, last_report, start_tokens = time.monotonic(), 0.0, journal["tokens"]

    def report(message: str, force=False):
        nonlocal last_report
        if on_progress is None or not force and time.monotonic() - last_report < PROGRESS_EVERY_S:
            return
        last_report = time.monotonic()
        rate = (journal["tokens"] - start_tokens) / max(last_report - started, 1e-9)
        left = None if max_tokens is None else max(max_tokens - journal["tokens"], 0)
        on_progress({"cache_tokens": journal["tokens"], "cache_bytes": journal["tokens"] * itemsize,
                     "cache_target_tokens": max_tokens, "text_bytes": journal["text_bytes"],
                     "tokens_per_s": rate, "eta_s": left / rate if rate > 0 and left is not None else None,
                     "message": message})

    resumed = (" (resumed)" if journal["docs"] else "") + f" with {tokenizer.engine}"
    report(f"building cache {name}{resumed}", force=True)
    docs = itertools.islice(mixture_documents(sources, split, cache_root, seed), journal["docs"], None)
    exhausted = True
    with open(bin_path, "ab") as out, _encoder(tokenizer, settings["dtype"], num_workers) as encode:
        out.truncate(journal["tokens"] * itemsize)  # drop tokens written after the last journal entry
        out.seek(0, os.SEEK_END)
        batches = _batches(docs)
        if max_tokens is not None and journal["tokens"] >= max_tokens:
            batches, exhausted = iter(()), False
        for ids, ends, doc_bytes in encode(batches):
            n_docs = len(ends)
            if max_tokens is not None and journal["tokens"] + len(ids) >= max_tokens:
                keep = max_tokens - journal["tokens"]
                n_docs = int(np.searchsorted(ends, keep, side="left")) + 1  # the last one may be cut
                ids, exhausted = ids[:keep], False
            out.write(ids.tobytes())
            out.flush()
            os.fsync(out.fileno())
            journal = {"key": key, "docs": journal["docs"] + n_docs, "tokens": journal["tokens"] + len(ids),
                       "text_bytes": journal["text_bytes"] + int(doc_bytes[:n_docs].sum())}
            atomic_write_json(journal_path, journal)
            report(f"building cache {name}{resumed}")
            if not exhausted:
                break
    if journal["tokens"] == 0:
        raise DataError(f"dataset {name} has no text: nothing to cache")
    meta = {**settings, "key": key, "base_key": base_key, "max_tokens": max_tokens,
            "n_tokens": journal["tokens"], "n_docs": journal["docs"], "text_bytes": journal["text_bytes"],
            "exhausted": exhausted, "created_at": time.time(), "encoder": tokenizer.engine}
    atomic_write_json(partial / "meta.json", meta)
    os.replace(bin_path, partial / "tokens.bin")
    journal_path.unlink()
    os.replace(partial, tok_dir / key)  # the finished cache appears whole, in one rename
    report(f"cache {name} ready: {journal['tokens']} tokens" + (" (dataset exhausted)" if exhausted else ""),
           force=True)
    return _info(tok_dir / key, max_tokens)


def build_cache(cache_root: str | os.PathLike, sources: list[tuple[str, float]], split: str, tokenizer: Tokenizer,
                max_tokens: int | None, on_progress: Progress | None = None, num_workers: int | None = None,
                seed: int = 0, dtype: str | None = None) -> CacheInfo:
    """Tokenize `split` of the (weighted mixture of) `sources` into a shared memmap cache, or find it built.

    At most `max_tokens` tokens (None: the whole split); a dataset that runs out first gives a cache
    of what exists, marked exhausted, which later requests of any size reuse. Safe to call from many
    processes at once: one builds, the others wait for it. `num_workers` 0 or None tokenizes in this
    process with the tokenizer's own threads; N > 0 uses a pool of N processes.
    """
    if not sources:
        raise DataError("no datasets given")
    if max_tokens is not None and max_tokens <= 0:
        raise DataError(f"max_tokens must be positive, got {max_tokens}")
    for name, _ in sources:
        if not get_dataset(name).has_split(split):
            raise DataError(f"dataset '{name}' has no split '{split}'")
    settings = cache_settings(sources, split, tokenizer, cache_dtype(tokenizer.vocab_size, dtype), seed)
    base_key = _hash(settings)
    key = _hash({**settings, "max_tokens": max_tokens})
    tok_dir = Path(cache_root) / "tok"
    tok_dir.mkdir(parents=True, exist_ok=True)
    found = find_cache(tok_dir, key, base_key, max_tokens)
    if found:
        return found
    with _locked(tok_dir / f"{key}.lock", tok_dir / f"{key}.partial", on_progress):
        found = find_cache(tok_dir, key, base_key, max_tokens)  # another process may have built it
        if found:
            return found
        return _build(tok_dir, key, base_key, settings, sources, split, tokenizer, max_tokens, on_progress,
                      num_workers or 0, seed, cache_root)
