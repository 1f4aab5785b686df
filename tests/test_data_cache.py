"""Token caches: exact resume after a kill, reuse of an exhausted dataset, concurrent builders,
dtype checks, mixtures and prepare_data. Real tokenizers, real files, real processes."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from train.contract import read_json
from train.data import DataError, prepare_data
from train.data.cache import build_cache, cache_dtype
from train.data.tokenizer import DEMO_BPE, load_tokenizer

DEMO = [("demo-stories", 1.0)]
N = 300_000

# Builds demo-stories/train in small batches (slow enough to be killed in the middle).
BUILDER = """
import sys, train.data.cache as c
from train.data.tokenizer import load_tokenizer
c.BATCH_TEXT_BYTES = 20_000
tok = load_tokenizer("opskit-demo-bpe", sys.argv[1])
info = c.build_cache(sys.argv[2], [("demo-stories", 1.0)], "train", tok, int(sys.argv[3]))
print(info.key, info.n_tokens)
"""


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    load_tokenizer(DEMO_BPE, root)  # trains the demo BPE (and writes the corpus) once for the module
    return root


@pytest.fixture(scope="module")
def tok(demo_cache):
    return load_tokenizer(DEMO_BPE, demo_cache)


def _builder(demo_cache, root, n=N):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", BUILDER, str(demo_cache), str(root), str(n)],
                            stdout=subprocess.PIPE, text=True, env=env)


def _link_corpus(demo_cache, root):
    """Another cache root that shares the (already written) demo corpus."""
    root.mkdir()
    (root / "corpus").symlink_to(demo_cache / "corpus")
    return root


def test_killed_build_resumes_byte_identical(demo_cache, tok, tmp_path):
    whole = build_cache(_link_corpus(demo_cache, tmp_path / "a"), DEMO, "train", tok, N)
    root = _link_corpus(demo_cache, tmp_path / "b")
    proc = _builder(demo_cache, root)
    journal = root / "tok" / f"{whole.key}.partial" / "journal.json"
    deadline = time.time() + 60
    while not (read_json(journal) or {}).get("tokens") and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = read_json(journal)
    assert 0 < done["tokens"] < N, "the builder must be killed in the middle"
    with open(journal.parent / "tokens.bin.partial", "ab") as f:
        f.write(b"\x07" * 1000)  # bytes of a batch written after the last journal entry
    progress = []
    resumed = build_cache(root, DEMO, "train", tok, N, on_progress=progress.append)
    assert "(resumed)" in progress[0]["message"] and progress[0]["cache_tokens"] == done["tokens"]
    assert resumed.key == whole.key and resumed.n_docs == whole.n_docs
    assert resumed.path.read_bytes() == whole.path.read_bytes()
    assert not (root / "tok" / f"{whole.key}.partial").exists()
    assert resumed.n_tokens == N and resumed.open()[-1] == whole.open()[-1]


def test_concurrent_builders_make_one_cache(demo_cache, tok, tmp_path):
    whole = build_cache(_link_corpus(demo_cache, tmp_path / "a"), DEMO, "train", tok, N)
    root = _link_corpus(demo_cache, tmp_path / "b")
    procs = [_builder(demo_cache, root) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] == [whole.key, str(N)]
    assert (root / "tok" / whole.key / "tokens.bin").read_bytes() == whole.path.read_bytes()
    assert sorted(p.name for p in (root / "tok").iterdir()) == [whole.key, f"{whole.key}.lock"]


def test_small_dataset_is_cached_once_with_its_true_count(tok, tmp_path):
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps({"text": f"Story {i}: Tom saw a red ball."}) + "\n" for i in range(50)))
    src, root = [(f"local:{data}", 1.0)], tmp_path / "cache"
    first = build_cache(root, src, "train", tok, 1_000_000)
    n = first.n_tokens
    assert 0 < n < 1_000_000 and first.meta["exhausted"] and first.n_docs == 50
    arr = first.open()
    assert arr[-1] == tok.eos_id and np.count_nonzero(arr == tok.eos_id) == first.n_docs  # no zero tail
    progress = []
    again = build_cache(root, src, "train", tok, 1_000_000, on_progress=progress.append)
    bigger = build_cache(root, src, "train", tok, 5_000_000, on_progress=progress.append)
    assert progress == [] and again.path == bigger.path == first.path and bigger.n_tokens == n
    smaller = build_cache(root, src, "train", tok, n // 2, on_progress=progress.append)
    assert progress == [] and smaller.n_tokens == n // 2  # a prefix of the finished cache
    assert np.array_equal(smaller.open(), arr[: n // 2])
    assert len(list((root / "tok").glob("*/meta.json"))) == 1


def test_local_text_and_parquet_files(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("One whole file is one document.")
    pq.write_table(pa.table({"text": ["row one", "row two"]}), tmp_path / "d" / "b.parquet")
    info = build_cache(tmp_path / "c", [(f"local:{tmp_path / 'd'}", 1.0)], "train", tok, None)
    assert info.n_docs == 3
    text = tok.decode([int(t) for t in info.open() if t != tok.eos_id])
    assert text == "One whole file is one document.row onerow two"


def test_dtype_must_hold_the_vocabulary(tmp_path):
    assert cache_dtype(4096) == "uint16" and cache_dtype(2**16) == "uint16" and cache_dtype(2**16 + 1) == "uint32"
    with pytest.raises(DataError, match="uint16 cannot hold"):
        cache_dtype(70_000, "uint16")
    with pytest.raises(DataError, match="must be one of"):
        cache_dtype(4096, "int8")
    # A real word-level tokenizer with 70k entries: a uint16 cache is refused, uint32 keeps big ids.
    vocab = {f"w{i}": i for i in range(70_000)} | {"<|endoftext|>": 70_000, "[UNK]": 70_001}
    wl = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tokenizer.json"
    wl.save(str(path))
    big = load_tokenizer(str(path), tmp_path)
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "w69999 w1 w65536"}) + "\n")
    src = [(f"local:{tmp_path / 'd.jsonl'}", 1.0)]
    with pytest.raises(DataError, match="uint16 cannot hold"):
        build_cache(tmp_path / "c", src, "train", big, None, dtype="uint16")
    info = build_cache(tmp_path / "c", src, "train", big, None)
    assert info.dtype == "uint32" and list(info.open()) == [69999, 1, 65536, 70_000]


def test_mixture_is_seeded_and_recorded(tok, tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": f"{name} {i}"}) + "\n" for i in range(40)))
    src = [(f"local:{tmp_path / 'a.jsonl'}", 3.0), (f"local:{tmp_path / 'b.jsonl'}", 1.0)]
    one = build_cache(tmp_path / "c1", src, "train", tok, 40, seed=1)
    two = build_cache(tmp_path / "c2", src, "train", tok, 40, seed=1)
    other = build_cache(tmp_path / "c3", src, "train", tok, 40, seed=2)
    assert one.key == two.key != other.key
    assert one.path.read_bytes() == two.path.read_bytes() != other.path.read_bytes()
    assert one.meta["sources"] == [[s, w] for s, w in src] and one.meta["seed"] == 1
    first_docs = tok.decode([int(t) for t in one.open()]).split("<|endoftext|>")
    assert sum(d.startswith("a") for d in first_docs) > sum(d.startswith("b") for d in first_docs)


def test_prepare_data_for_a_demo_spec(demo_cache, tmp_path):
    spec = {"tokenizer": DEMO_BPE, "train_tokens": 200_000, "seq_len": 128, "cache_dir": str(demo_cache),
            "data": {"train": [{"dataset": "demo-stories", "weight": 1.0}],
                     "validation": {"dataset": "demo-stories", "split": "validation", "max_tokens": 50_000}}}
    progress = []
    data = prepare_data(spec, on_progress=progress.append)
    assert len(data.train) >= 200_000 + 129 and len(data.val) == 50_000
    assert data.vocab_size == load_tokenizer(DEMO_BPE, demo_cache).vocab_size and data.eos_id == 0
    assert data.cache_bytes == 2 * (len(data.train) + len(data.val))
    assert int(data.train.max()) < data.vocab_size
    assert any(p.get("cache_target_tokens") == len(data.train) for p in progress)
    assert {"cache_tokens", "cache_bytes", "tokens_per_s", "eta_s", "message"} <= set(progress[-1])
    assert not np.array_equal(data.train[:1000], data.val[:1000])
