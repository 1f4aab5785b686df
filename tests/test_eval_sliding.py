"""Sliding-window perplexity (eval.stride) and per-length frequencies of a `dynamic` scaling in evaluation."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_evaluate import TINY, direct_loss, trained_tiny
from train import spectra
from train.eval_spec import evaluate_spec
from train.evaluate import evaluate_lengths, evaluate_sliding, sliding_window_loss, sliding_windows
from train.model import GPT
from train.spec import validate


@pytest.fixture(scope="module")
def val_tokens(tmp_path_factory):
    """A real uint16 memmap, as the token cache stores it (test_evaluate's data, once per module)."""
    rng = np.random.default_rng(0)
    tokens = np.tile(rng.integers(0, TINY.vocab_size, 48), 60).astype(np.uint16)
    path = tmp_path_factory.mktemp("sliding") / "tokens.bin"
    tokens.tofile(path)
    return np.memmap(path, dtype=np.uint16, mode="r")


@pytest.fixture(scope="module")
def model(val_tokens):
    return trained_tiny(val_tokens)


def test_windows_score_every_target_once():
    for n, length, stride in [(400, 100, 100), (400, 100, 30), (401, 64, 64), (50, 100, 10), (1000, 128, 1)]:
        windows = sliding_windows(n, length, stride)
        scored = []
        for begin, inputs, k in windows:
            assert 0 < inputs <= length and 0 < k <= inputs
            scored += range(begin + inputs - k, begin + inputs)  # target i predicts token i + 1
        assert scored == list(range(n))
    assert sliding_windows(400, 100, 100) == [(0, 100, 100), (100, 100, 100), (200, 100, 100), (300, 100, 100)]
    assert sliding_windows(300, 100, 50)[:2] == [(0, 100, 100), (50, 100, 50)]
    for stride in (0, 11):
        with pytest.raises(ValueError, match="stride"):
            sliding_windows(100, 10, stride)


def hf_guide_sliding_ppl(model, tokens, n_targets, max_length, stride):
    """The loop of Hugging Face's "Perplexity of fixed-length models" guide, written out: windows of
    max_length + 1 tokens (max_length predictions), labels -100 except the new ones, logits from the model."""
    seq = torch.from_numpy(np.asarray(tokens[: n_targets + 1], dtype=np.int64))[None]
    seq_len, nll_sum, n_tokens, prev_end = seq.size(1), 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length + 1, seq_len)
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(input_ids[:, :-1])
        shift = labels[:, 1:]
        nll_sum += F.cross_entropy(logits[0].double(), shift[0], ignore_index=-100, reduction="sum").item()
        n_tokens += int((shift != -100).sum())
        prev_end = end
        if end == seq_len:
            break
    assert n_tokens == n_targets
    return math.exp(nll_sum / n_tokens)


def test_stride_equal_to_length_is_the_contiguous_perplexity(val_tokens, model):
    lengths, chunks = [64, 128, 512, 4096], 4
    contiguous = evaluate_lengths(model, val_tokens, lengths, chunks)
    for length in (64, 128, 512):
        got = evaluate_sliding(model, val_tokens, [length], chunks, stride=length)["lengths"][str(length)]
        assert got["ppl"] == pytest.approx(contiguous["lengths"][str(length)]["ppl"], rel=1e-6)
        assert got["windows"] == chunks and got["tokens"] == chunks * length and got["stride"] == length
    sliding = evaluate_sliding(model, val_tokens, lengths, chunks, stride=64)
    assert sliding["stride"] == 64
    assert sliding["lengths"]["4096"]["skipped"] and "need 16385" in sliding["lengths"]["4096"]["reason"]
    assert sliding["lengths"]["64"]["ppl"] == pytest.approx(contiguous["lengths"]["64"]["ppl"], rel=1e-6)


@pytest.mark.parametrize("length, stride", [(128, 32), (256, 100)])
def test_small_stride_matches_the_reference_loop(val_tokens, model, length, stride):
    n = 4 * length
    want = hf_guide_sliding_ppl(model, val_tokens, n, length, stride)
    for batch_size in (1, 3):
        got = sliding_window_loss(model, val_tokens, length, stride, n, batch_size=batch_size)
        assert got["ppl"] == pytest.approx(want, rel=1e-5)
    contiguous = evaluate_lengths(model, val_tokens, [length], 4)["lengths"][str(length)]["ppl"]
    assert got["ppl"] != pytest.approx(contiguous, rel=1e-5)  # other contexts, another number


def spec_for(tmp_path, scaling, stride=None):
    raw = {
        "run": "t/x/s0", "phase": "t", "config": "x", "seed": 0, "attempt": 1, "preset": "tiny",
        "rope": {"spectrum": "hybrid_a0.2_t100k", "scaling": scaling}, "tokenizer": "opskit-demo-bpe",
        "data": {"train": [{"dataset": "demo-stories", "weight": 1.0}],
                 "validation": {"dataset": "demo-stories", "split": "validation", "max_tokens": 1000}},
        "train_tokens": 1000, "seq_len": 32, "micro_batch": 1, "grad_accum": 1, "lr": 1e-3, "warmup_frac": 0.0,
        "weight_decay": 0.0, "grad_clip": 1.0, "dtype": "fp32", "compile": False, "activation_checkpointing": False,
        "eval": {"lengths": [32, 128, 512], "chunks": 2, "mode": "sequential", "stride": stride},
        "checkpoint_every": 10, "keep_checkpoints": 1, "log_every": 1,
        "cache_dir": str(tmp_path), "out_dir": str(tmp_path),
    }
    return validate(raw)


def test_dynamic_run_evaluates_each_length_with_its_own_frequencies(val_tokens, model, tmp_path):
    scaling = {"type": "dynamic", "factor": 4.0, "original_max": 32}
    spec = spec_for(tmp_path, scaling, stride=16)
    before = model.inv_freq.clone()
    result = evaluate_spec(model, val_tokens, spec, "cpu")
    assert torch.equal(model.inv_freq, before)  # the training frequencies are back
    sc = spectra.parse_scaling(scaling)
    assert result["dynamic"]["ratio"] == {"32": 1.0, "128": 13.0, "512": 61.0}
    head_dim = model.cfg.head_dim
    for length in (32, 128, 512):
        # A model built with the frequencies HF dynamic NTK uses at this length, same weights.
        inv, _ = spectra.rope_parameters(spec.spectrum, head_dim, sc, length=length)
        ref = GPT(model.cfg, inv)
        ref.load_state_dict(model.state_dict())
        want = evaluate_lengths(ref, val_tokens, [length], 2)["lengths"][str(length)]
        got = result["lengths"][str(length)]
        assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-6)
        assert got["chunk_losses"][0] == pytest.approx(direct_loss(ref, val_tokens, 0, length), rel=1e-5)
        sliding = sliding_window_loss(ref, val_tokens, length, 16, 2 * length)
        assert result["sliding"]["lengths"][str(length)]["ppl"] == pytest.approx(sliding["ppl"], rel=1e-6)
        if length > 32:  # beyond the original length the frequencies, and so the result, differ
            assert not torch.equal(ref.inv_freq, model.inv_freq)
            static = evaluate_lengths(model, val_tokens, [length], 2)["lengths"][str(length)]["ppl"]
            assert got["ppl"] != pytest.approx(static, rel=1e-5)


def test_other_scalings_evaluate_as_before(val_tokens, model, tmp_path):
    spec = spec_for(tmp_path, None)
    result = evaluate_spec(model, val_tokens, spec, "cpu")
    assert result == evaluate_lengths(model, val_tokens, [32, 128, 512], 2)
    assert "sliding" not in result and "dynamic" not in result
