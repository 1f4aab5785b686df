"""Tokenizers by name: the project's offline demo BPE, a local tokenizer.json, or a Hugging Face name.

Every tokenizer encodes without special tokens; documents are separated by its EOS id.
"""
from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from train.data.registry import DataError

DEMO_BPE = "opskit-demo-bpe"
DEMO_VOCAB = 4096
EOS_TOKEN = "<|endoftext|>"
# Looked for, in this order, when a tokenizer file does not say which token ends a document.
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "[SEP]")


@dataclass
class Tokenizer:
    name: str
    vocab_size: int
    eos_id: int
    backend: HFTokenizer = field(repr=False)
    vocab_hash: str = ""  # hash of the full tokenizer definition; part of every cache key
    _fast: object = field(default=None, repr=False)  # FastBPE, False when unavailable, None: not tried
    fast_unavailable: str = ""  # why the tiktoken engine is not used ("" while it is)

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(every text's ids in order, the number of ids of each text), no special tokens: through the
        tiktoken engine when it reproduces this tokenizer (train/data/fast_bpe.py), else Hugging Face's
        Rust encoder across the batch."""
        fast = self.fast_engine()
        if fast:
            return fast.encode_flat(texts)
        ids = self._hf_encode_batch(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        return np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(lengths.sum())), lengths

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        flat, lengths = self.encode_flat(texts)
        return [a.tolist() for a in np.split(flat, np.cumsum(lengths)[:-1])] if texts else []

    def fast_engine(self):
        if self._fast is None:
            from train.data.fast_bpe import FastBPE

            self._fast, self.fast_unavailable = FastBPE.build(self.backend.to_str(), self._hf_encode_batch)
            self._fast = self._fast or False
        return self._fast

    @property
    def engine(self) -> str:
        return "tiktoken" if self.fast_engine() else "tokenizers"

    def _hf_encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids)


def _wrap(name: str, backend: HFTokenizer, eos_token: str | None = None) -> Tokenizer:
    eos_id = None
    for tok in ([eos_token] if eos_token else []) + list(EOS_CANDIDATES):
        eos_id = backend.token_to_id(tok)
        if eos_id is not None:
            break
    if eos_id is None:
        raise DataError(f"tokenizer '{name}' has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)})")
    definition = backend.to_str()
    return Tokenizer(name=name, vocab_size=backend.get_vocab_size(with_added_tokens=True), eos_id=eos_id,
                     backend=backend, vocab_hash=hashlib.sha256(definition.encode()).hexdigest()[:16])


def train_demo_bpe(cache_dir: str | os.PathLike) -> Path:
    """Train the demo byte-level BPE on demo-stories/train once; concurrent callers wait for it."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from train.data.corpus import corpus_dir, ensure_demo_corpus

    out_dir = Path(cache_dir) / "tokenizers" / DEMO_BPE
    path = out_dir / "tokenizer.json"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return path
        train_path = ensure_demo_corpus(corpus_dir(cache_dir))["train"]

        def texts():
            with open(train_path) as f:
                for line in f:
                    yield json.loads(line)["text"]

        bpe = HFTokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=DEMO_VOCAB, special_tokens=[EOS_TOKEN], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        bpe.train_from_iterator(texts(), trainer=trainer)
        tmp = out_dir / f".tokenizer.json.{os.getpid()}.tmp"
        bpe.save(str(tmp))
        os.replace(tmp, path)
    return path


def _eos_from_config(directory: Path) -> str | None:
    config = directory / "tokenizer_config.json"
    if not config.exists():
        return None
    eos = json.loads(config.read_text()).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def _load_file(name: str, path: Path) -> Tokenizer:
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise DataError(f"tokenizer file {path} does not exist")
    return _wrap(name, HFTokenizer.from_file(str(path)), _eos_from_config(path.parent))


def _load_hub(name: str) -> Tokenizer:
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(name, use_fast=True)
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        raise DataError(
            f"cannot load tokenizer '{name}' (offline? {type(e).__name__}). Download it on a machine with "
            f"internet (`huggingface-cli download {name} tokenizer.json tokenizer_config.json "
            f"--local-dir DIR`) and pass DIR/tokenizer.json as the tokenizer") from None
    if not getattr(hf, "is_fast", False):
        raise DataError(f"tokenizer '{name}' has no fast (Rust) version; pass a tokenizer.json instead")
    return _wrap(name, hf.backend_tokenizer, hf.eos_token)


def load_tokenizer(name: str, cache_dir: str | os.PathLike) -> Tokenizer:
    """`opskit-demo-bpe`, a path to a tokenizer.json (or a directory holding one), or a hub name."""
    if name == DEMO_BPE:
        return _load_file(name, train_demo_bpe(cache_dir))
    if name.endswith(".json") or os.path.sep in name and os.path.exists(name) or os.path.isdir(name):
        return _load_file(name, Path(name))
    return _load_hub(name)
