"""A tiktoken engine built from a byte-level BPE `tokenizer.json`: the same ids, several times faster.

The cache build spends nearly all of its time in the tokenizer. For GPT-2-style byte-level BPE (the
demo BPE, GPT-2, GPT-NeoX, Pythia) tiktoken gives the same segmentation as Hugging Face `tokenizers`
when its ranks are the merge order (as OpenAI's own GPT-2 conversion does), and it is much faster.
Ranks are then mapped to the tokenizer's ids.

`FastBPE.build` returns None (and the caller keeps the Hugging Face encoder) when tiktoken is
missing or the tokenizer has a shape this does not reproduce exactly: another pre-tokenizer or
normalizer, BPE dropout, byte fallback, sub-word prefixes. Added tokens found in a text are split
out first, as Hugging Face does (leftmost, longest); a text containing an added token with
lstrip/rstrip/single_word is encoded by the Hugging Face tokenizer. A self-check on a fixed sample
must agree with Hugging Face before the engine is used at all.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import unicodedata
from functools import lru_cache

import numpy as np

# The GPT-2 split that `pre_tokenizers.ByteLevel(use_regex=True)` applies.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SELF_CHECK = ("Once upon a time, Tom's dog didn't like 3.14159 apples!!  \n\n\tÜber naïve café — 東京 🙂 "
              "x   y\r\nIt's 'quoted' and we'll've gone.\u00a0end  ")


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (the alphabet of byte-level BPE vocabularies)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _unsupported(spec: dict) -> str | None:
    """Why this tokenizer.json cannot be reproduced by tiktoken, or None when it can."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    normalizer = spec.get("normalizer")
    if model.get("type") != "BPE":
        return f"model {model.get('type')} is not BPE"
    if model.get("dropout") or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix") or model.get("ignore_merges"):
        return "BPE with dropout, byte fallback, sub-word affixes or ignore_merges"
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return f"pre-tokenizer {pre} is not GPT-2 byte-level"
    if normalizer is not None and normalizer.get("type") != "NFC":
        return f"normalizer {normalizer.get('type')}"
    return None


class FastBPE:
    def __init__(self, encoding, rank_to_id: np.ndarray, added: dict[str, int], hf_only: list[str], nfc: bool,
                 hf_encode_batch):
        self.encoding = encoding
        self.hf_encode_batch = hf_encode_batch
        # Ranks are tiktoken's ids: BPE tokens by merge order, then one rank per added token.
        self.rank_to_id = np.concatenate([rank_to_id, np.fromiter(added.values(), np.int64, len(added))])
        self.added_rank = {t: len(rank_to_id) + i for i, t in enumerate(added)}
        self.id_to_rank = np.full(int(self.rank_to_id.max()) + 1, -1, dtype=np.int64)
        self.id_to_rank[self.rank_to_id[::-1]] = np.arange(len(self.rank_to_id))[::-1]  # first rank wins
        split = sorted(set(added) - set(hf_only), key=len, reverse=True)  # longest first: leftmost-longest
        self.added_split = re.compile("|".join(map(re.escape, split))) if split else None
        self.hf_only = hf_only  # added tokens with matching rules this class does not reproduce
        self.nfc = nfc
        self.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    @classmethod
    def build(cls, definition: str, hf_encode_batch) -> tuple[FastBPE | None, str]:
        """(engine, "") or (None, why not). `hf_encode_batch` (texts -> id lists) is the reference for
        the self-check and encodes the texts this engine hands back."""
        try:
            import tiktoken
        except ImportError:
            return None, "tiktoken is not installed"
        spec = json.loads(definition)
        why = _unsupported(spec)
        if why:
            return None, why
        model = spec["model"]
        vocab: dict[str, int] = model["vocab"]
        from_unicode = {c: b for b, c in _byte_to_unicode().items()}
        ranks: dict[bytes, int] = {}
        ids: list[int] = []

        def add(piece: str) -> None:
            token = bytes(from_unicode[c] for c in piece)
            if token not in ranks:
                ranks[token] = len(ranks)
                ids.append(vocab[piece])

        try:
            for b in range(256):
                add(_byte_to_unicode()[b])
            for merge in model["merges"]:
                left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
                add(left + right)
        except KeyError as e:
            return None, f"vocabulary lacks {e} (not a complete byte-level BPE)"
        added = {tok["content"]: tok["id"] for tok in spec.get("added_tokens") or []}
        hf_only = [tok["content"] for tok in spec.get("added_tokens") or []
                   if tok.get("lstrip") or tok.get("rstrip") or tok.get("single_word")]
        encoding = tiktoken.Encoding("opskit-bpe", pat_str=GPT2_SPLIT, mergeable_ranks=ranks, special_tokens={})
        engine = cls(encoding, np.asarray(ids, dtype=np.int64), added, hf_only, spec.get("normalizer") is not None,
                     hf_encode_batch)
        sample = [SELF_CHECK, *(f"a{t}b {t}" for t in list(added)[:4])]
        flat, lengths = engine.encode_flat(sample)
        expected = hf_encode_batch(sample)
        if lengths.tolist() != [len(x) for x in expected] or flat.tolist() != [i for x in expected for i in x]:
            return None, "self-check against the Hugging Face tokenizer disagreed"
        return engine, ""

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all ids in order, ids per text), as int64 arrays."""
        per_text: list[list[int] | None] = [None] * len(texts)  # ranks of each text, in order
        if self.hf_only:
            slow = [i for i, t in enumerate(texts) if any(s in t for s in self.hf_only)]
            for i, ids in zip(slow, self.hf_encode_batch([texts[i] for i in slow])):
                per_text[i] = self._ranks_of(ids)
        pieces: list[str] = []  # plain text between added tokens
        layout: list[tuple[int, list[int]]] = []  # text index, [piece index, or -1 - rank of an added token]
        for i, text in enumerate(texts):
            if per_text[i] is not None:
                continue
            if self.nfc:
                text = unicodedata.normalize("NFC", text)
            parts, start = [], 0
            if self.added_split is not None:
                for m in self.added_split.finditer(text):
                    if m.start() > start:
                        parts.append(len(pieces))
                        pieces.append(text[start:m.start()])
                    parts.append(-1 - self.added_rank[m.group()])
                    start = m.end()
            if start < len(text) or not parts:
                parts.append(len(pieces))
                pieces.append(text[start:])
            layout.append((i, parts))
        encoded = self.encoding.encode_ordinary_batch(pieces, num_threads=self.threads)
        for i, parts in layout:
            if len(parts) == 1 and parts[0] >= 0:
                per_text[i] = encoded[parts[0]]
            else:
                per_text[i] = [r for p in parts for r in (encoded[p] if p >= 0 else (-1 - p,))]
        lengths = np.fromiter(map(len, per_text), dtype=np.int64, count=len(texts))
        ranks = np.fromiter(itertools.chain.from_iterable(per_text), dtype=np.int64, count=int(lengths.sum()))
        return self.rank_to_id[ranks], lengths

    def _ranks_of(self, ids: list[int]) -> list[int]:
        ranks = self.id_to_rank[np.asarray(ids, dtype=np.int64)]
        if (ranks < 0).any():
            raise ValueError("the Hugging Face tokenizer produced an id outside the BPE vocabulary")
        return ranks.tolist()
