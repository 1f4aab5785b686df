"""Dataset registry, demo corpus and tokenizer loading (real files, real tokenizers, no network)."""
import json
import os
import subprocess
import sys

import pytest

from train.data import DataError, dataset_info, get_dataset, list_datasets
from train.data.corpus import SPLIT_BYTES, ensure_demo_corpus, generate_split
from train.data.tokenizer import DEMO_BPE, load_tokenizer



@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


REQUIRED = ("tinystories", "fineweb", "fineweb-edu", "fineweb-edu-10bt", "slimpajama", "pg19", "cosmopedia",
            "cosmopedia-100k", "wikitext-103", "openwebtext", "c4", "demo-stories")


def test_registry_lists_required_datasets_with_their_fields():
    names = [d["name"] for d in list_datasets()]
    assert set(REQUIRED) <= set(names)
    info = dataset_info("tinystories")
    assert info["hf_id"] == "roneneldan/TinyStories" and info["text_field"] == "text"
    assert info["splits"] == ["train", "validation"]
    json.dumps(list_datasets())  # what `opskit datasets --json` prints


def test_unknown_dataset_names_the_closest_match():
    with pytest.raises(DataError, match="Did you mean 'fineweb-edu'"):
        get_dataset("fineweb_edu")


def test_local_dataset_paths(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "hi"}\n')
    info = get_dataset(f"local:{tmp_path}")
    assert info.path == str(tmp_path) and info.splits == ("train",)
    (tmp_path / "train").mkdir()
    (tmp_path / "validation").mkdir()
    assert get_dataset(f"local:{tmp_path}").splits == ("train", "validation")
    with pytest.raises(DataError, match="does not exist"):
        get_dataset(f"local:{tmp_path}/missing")


def test_registry_imports_no_heavy_modules():
    code = ("import sys, train.data, train.data.registry; train.data.list_datasets();"
            "print([m for m in ('torch', 'datasets', 'tokenizers', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_demo_corpus_is_deterministic_and_has_long_documents(tmp_path):
    docs = generate_split("validation")
    assert docs == generate_split("validation")
    assert sum(map(len, docs)) >= SPLIT_BYTES["validation"]
    assert max(map(len, docs)) > 10_000  # several thousand tokens: text for evaluation at 512+
    paths = ensure_demo_corpus(tmp_path)
    mtime = paths["train"].stat().st_mtime_ns
    assert ensure_demo_corpus(tmp_path)["train"].stat().st_mtime_ns == mtime  # written once, reused
    assert 8e6 <= paths["train"].stat().st_size <= 20e6


def test_demo_tokenizer_is_trained_once_and_round_trips(demo_cache):
    tok = load_tokenizer(DEMO_BPE, demo_cache)
    path = demo_cache / "tokenizers" / DEMO_BPE / "tokenizer.json"
    mtime = path.stat().st_mtime_ns
    again = load_tokenizer(DEMO_BPE, demo_cache)
    assert path.stat().st_mtime_ns == mtime and again.vocab_hash == tok.vocab_hash
    text = "Mia went to the park with her red kite."
    ids = tok.encode_batch([text])[0]
    assert tok.eos_id not in ids and tok.decode(ids) == text
    assert 256 < tok.vocab_size <= 4096
    assert load_tokenizer(str(path), demo_cache).vocab_hash == tok.vocab_hash  # by local path too


def test_offline_hub_tokenizer_says_how_to_use_a_local_file(tmp_path):
    code = ("from train.data.tokenizer import load_tokenizer\n"
            "try:\n load_tokenizer('EleutherAI/gpt-neox-20b', '.')\n"
            "except Exception as e:\n print(type(e).__name__, e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.startswith("DataError cannot load tokenizer 'EleutherAI/gpt-neox-20b' (offline?")
    assert "huggingface-cli download EleutherAI/gpt-neox-20b" in out.stdout and "tokenizer.json" in out.stdout
