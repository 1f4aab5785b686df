"""Perplexity by length: format, chunk choice, exactness against direct forward passes, FSDP2."""
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from train.evaluate import chunk_starts, evaluate_lengths, tokens_needed
from train.model import build_model
from train.presets import get_preset

TINY = get_preset("tiny")
TRAIN_LEN = 32


@pytest.fixture
def val_tokens(tmp_path):
    """A real uint16 memmap, as the token cache stores it."""
    rng = np.random.default_rng(0)
    tokens = np.tile(rng.integers(0, TINY.vocab_size, 48), 60).astype(np.uint16)  # 2880 tokens
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    return np.memmap(path, dtype=np.uint16, mode="r")


def trained_tiny(val_tokens, steps=30) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(TINY, "hybrid_a0.2_t100k")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.from_numpy(np.asarray(val_tokens, dtype=np.int64))
    for _ in range(steps):
        starts = torch.randint(0, len(data) - TRAIN_LEN - 1, (8,))
        batch = torch.stack([data[s : s + TRAIN_LEN + 1] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def direct_loss(model, tokens, start, length):
    chunk = torch.from_numpy(np.asarray(tokens[start : start + length + 1], dtype=np.int64))[None]
    with torch.no_grad():
        logits = model(chunk[:, :-1])
        return torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:]).item()


def test_chunk_starts():
    assert chunk_starts(1000, 100, 4, "sequential", 0) == [0, 100, 200, 300]
    assert chunk_starts(400, 100, 4, "sequential", 0) is None  # needs 401: the last target
    assert tokens_needed(100, 4) == 401
    a = chunk_starts(10_000, 100, 5, "random", seed=1)
    assert a == chunk_starts(10_000, 100, 5, "random", seed=1) != chunk_starts(10_000, 100, 5, "random", seed=2)
    assert all(0 <= s and s + 100 + 1 <= 10_000 for s in a)
    with pytest.raises(ValueError, match="sequential, random"):
        chunk_starts(1000, 100, 4, "strided", 0)


def test_eval_at_4x_and_16x_training_length(val_tokens):
    model = trained_tiny(val_tokens)
    model.train()
    lengths = [TRAIN_LEN, 4 * TRAIN_LEN, 16 * TRAIN_LEN, 4096]
    out = evaluate_lengths(model, val_tokens, lengths, chunks=4, mode="sequential", seed=0)
    assert model.training  # restored

    assert set(out) == {"mode", "chunks_requested", "lengths"}
    assert out["mode"] == "sequential" and out["chunks_requested"] == 4
    assert list(out["lengths"]) == [str(n) for n in lengths]
    assert out["lengths"]["4096"] == {"skipped": True, "reason": f"need {4 * 4096 + 1} validation tokens, have 2880"}
    for n in lengths[:3]:
        row = out["lengths"][str(n)]
        assert set(row) == {"loss", "ppl", "chunks", "chunk_losses"} and row["chunks"] == 4
        assert row["ppl"] == pytest.approx(math.exp(row["loss"]))
        assert row["loss"] == pytest.approx(sum(row["chunk_losses"]) / 4)
        want = [direct_loss(model, val_tokens, i * n, n) for i in range(4)]
        np.testing.assert_allclose(row["chunk_losses"], want, rtol=1e-5)
    # The data repeats every 48 tokens and the model has learned some of it: far below uniform.
    assert out["lengths"][str(4 * TRAIN_LEN)]["loss"] < math.log(TINY.vocab_size) - 1.0
    json.dumps(out)


def test_random_mode_and_batching(val_tokens):
    model = trained_tiny(val_tokens, steps=2)
    one = evaluate_lengths(model, val_tokens, [64], chunks=5, mode="random", seed=3, batch_size=1)
    two = evaluate_lengths(model, val_tokens, [64], chunks=5, mode="random", seed=3, batch_size=2)
    np.testing.assert_allclose(one["lengths"]["64"]["chunk_losses"], two["lengths"]["64"]["chunk_losses"], rtol=1e-5)
    starts = chunk_starts(len(val_tokens), 64, 5, "random", 3)
    want = [direct_loss(model, val_tokens, s, 64) for s in starts]
    np.testing.assert_allclose(one["lengths"]["64"]["chunk_losses"], want, rtol=1e-5)
    assert one["mode"] == "random"


FSDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from train.evaluate import evaluate_lengths
    from train.model import build_model
    from train.presets import get_preset

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = build_model(get_preset("tiny"), "hybrid_a0.2_t100k")
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    rows = []  # sequences this rank ran forward
    model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    tokens = np.memmap(sys.argv[1], dtype=np.uint16, mode="r")
    out = evaluate_lengths(model, tokens, [32, 128], chunks=3, mode="random", seed=5)
    counts = [None, None]
    dist.all_gather_object(counts, sum(rows))
    if dist.get_rank() == 0:
        json.dump({**out, "rows_per_rank": counts}, open(sys.argv[2], "w"))
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_fsdp2_evaluation_matches_single_process(val_tokens, tmp_path):
    script = tmp_path / "fsdp_eval.py"
    script.write_text(FSDP_SCRIPT)
    out_path = tmp_path / "out.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), val_tokens.filename, str(out_path)],
        check=True, env=env, timeout=120, capture_output=True,
    )
    sharded = json.loads(out_path.read_text())
    torch.manual_seed(0)
    model = build_model(TINY, "hybrid_a0.2_t100k")
    single = evaluate_lengths(model, val_tokens, [32, 128], chunks=3, mode="random", seed=5)
    for n in ("32", "128"):
        np.testing.assert_allclose(sharded["lengths"][n]["chunk_losses"], single["lengths"][n]["chunk_losses"], rtol=1e-5)
        assert sharded["lengths"][n]["ppl"] == pytest.approx(single["lengths"][n]["ppl"], rel=1e-5)
    # Each rank evaluated its share (2 of the 3 chunks, one padded), not all 3, at both lengths.
    assert sharded["rows_per_rank"] == [4, 4]
