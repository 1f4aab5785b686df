"""Chunk order: reproducible by seed, disjoint across ranks, stateless across a resume."""
import numpy as np
import pytest

from train.data import DataError
from train.data.loader import ChunkSampler

N_TOKENS, SEQ = 10_001, 10  # 1000 chunks


def _ids(sampler, steps, micro_batch=4, grad_accum=2):
    return np.concatenate([sampler.chunk_ids((s * grad_accum + m) * micro_batch, micro_batch)
                           for s in range(steps) for m in range(grad_accum)])


def test_order_is_reproducible_by_seed():
    a, b, c = (_ids(ChunkSampler(N_TOKENS, SEQ, seed), 20) for seed in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_ranks_are_disjoint_and_cover_an_epoch():
    world = 4
    per_rank = [ChunkSampler(N_TOKENS, SEQ, 7, r, world).chunk_ids(0, 250) for r in range(world)]
    everything = np.concatenate(per_rank)
    assert len(np.unique(everything)) == 1000  # disjoint, and together every chunk once


def test_next_epoch_is_reshuffled():
    s = ChunkSampler(N_TOKENS, SEQ, 3)
    first, second = s.chunk_ids(0, 1000), s.chunk_ids(1000, 1000)
    assert sorted(first) == sorted(second) == list(range(1000)) and not np.array_equal(first, second)


def test_batch_is_a_pure_function_of_step_so_resume_matches():
    tokens = np.arange(N_TOKENS, dtype=np.uint16)
    run = ChunkSampler(N_TOKENS, SEQ, 5, rank=1, world_size=2)
    straight = [run.batch(tokens, step, m, 4, 2) for step in range(300) for m in range(2)]
    resumed = ChunkSampler(N_TOKENS, SEQ, 5, rank=1, world_size=2)  # fresh object: no saved state
    for step in range(150, 300):
        for m in range(2):
            x, y = resumed.batch(tokens, step, m, 4, 2)
            assert np.array_equal(x, straight[step * 2 + m][0]) and np.array_equal(y, straight[step * 2 + m][1])
    x, y = straight[0]
    assert x.dtype == np.int64 and x.shape == (4, SEQ) and np.array_equal(y, x + 1)  # shifted target
    assert np.all(x[:, 0] % SEQ == 0)  # chunks start on a chunk boundary


def test_too_few_tokens_for_the_ranks_is_refused():
    with pytest.raises(DataError, match="fewer than the 8 ranks"):
        ChunkSampler(50, 10, 0, 0, 8)
