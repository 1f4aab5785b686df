"""The tiktoken engine gives exactly the Hugging Face tokenizer's ids, or is not used at all."""
from __future__ import annotations

import json
import unicodedata

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from train.data.corpus import corpus_dir, ensure_demo_corpus
from train.data.tokenizer import DEMO_BPE, _wrap, load_tokenizer

EDGE_TEXTS = [
    "", " ", "\n\n", "<|endoftext|>", "<|endoftext|><|endoftext|>x", "a<|endoftext|>b",
    "Tom's dog didn't go; we'll've  gone   far\t\tand\r\nback.", "3.14159 apples, 2024-11-23",
    "Über naïve café — 東京 🙂 \u00a0end  ", "cafe\u0301 (decomposed é)", "x" * 5000,
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def corpus_texts(cache, split: str) -> list[str]:
    path = ensure_demo_corpus(corpus_dir(cache))[split]
    return [json.loads(line)["text"] for line in path.open()]


def test_demo_bpe_uses_tiktoken_with_identical_ids_on_the_whole_corpus(cache):
    tok = load_tokenizer(DEMO_BPE, cache)
    assert tok.engine == "tiktoken", tok.fast_unavailable
    texts = corpus_texts(cache, "validation") + corpus_texts(cache, "train")[:1500] + EDGE_TEXTS
    assert tok.encode_batch(texts) == tok._hf_encode_batch(texts)
    flat, lengths = tok.encode_flat(texts)
    assert lengths.tolist() == [len(x) for x in tok._hf_encode_batch(texts)] and flat.dtype.kind == "i"
    assert tok.encode_batch(["a<|endoftext|>b"])[0][1] == tok.eos_id  # added tokens split out as HF does


def neox_like(cache, added: list[str], lstrip: bool = False) -> HFTokenizer:
    """GPT-NeoX's shape: NFC, byte-level BPE, non-special added whitespace-run tokens."""
    from tokenizers import AddedToken

    bpe = HFTokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus_texts(cache, "validation")[:200], trainer=trainer)
    bpe.add_tokens([AddedToken(t, lstrip=lstrip, normalized=True) for t in added])
    return bpe


def test_nfc_and_added_whitespace_tokens_match_hugging_face(cache):
    tok = _wrap("neox-like", neox_like(cache, ["    ", "  ", "\n\n"]))
    assert tok.engine == "tiktoken", tok.fast_unavailable
    texts = EDGE_TEXTS + [unicodedata.normalize("NFD", t) for t in EDGE_TEXTS] + corpus_texts(cache, "validation")[:50]
    assert tok.encode_batch(texts) == tok._hf_encode_batch(texts)


def test_added_tokens_with_strip_rules_go_to_hugging_face_for_those_texts(cache):
    tok = _wrap("lstrip", neox_like(cache, ["[MARK]"], lstrip=True))
    assert tok.engine == "tiktoken" and tok.fast_engine().hf_only == ["[MARK]"]
    texts = ["plain text here", "before   [MARK] after", "[MARK]", "x"]
    assert tok.encode_batch(texts) == tok._hf_encode_batch(texts)


def test_other_tokenizer_shapes_keep_the_hugging_face_encoder(cache):
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # not what tiktoken's split does
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus_texts(cache, "validation")[:50], trainer=trainer)
    tok = _wrap("prefix-space", bpe)
    assert tok.engine == "tokenizers" and "pre-tokenizer" in tok.fast_unavailable
    texts = EDGE_TEXTS[:8]
    assert tok.encode_batch(texts) == tok._hf_encode_batch(texts)
