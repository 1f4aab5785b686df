"""Fixed-length training chunks read from a token memmap, in a seeded order with no iterator state.

Chunk i is tokens[i*seq_len : i*seq_len + seq_len + 1] (input plus the shifted target), so
(n_tokens - 1) // seq_len chunks cover the cache. Epoch e visits every chunk once in the order of
a permutation seeded by (seed, e); rank r of a world of size w takes positions r, r+w, r+2w...
of that global order, so ranks are disjoint within an epoch and the batch for any step is a pure
function of (seed, rank, world_size, step, micro_step): resuming at step N needs no saved state.
"""
from __future__ import annotations

import numpy as np

from train.data.registry import DataError


class ChunkSampler:
    def __init__(self, n_tokens: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside a world of size {world_size}")
        self.n_chunks = (n_tokens - 1) // seq_len
        if self.n_chunks < world_size:
            raise DataError(f"{n_tokens} tokens make {self.n_chunks} chunks of {seq_len + 1} tokens: "
                            f"fewer than the {world_size} ranks")
        self.seq_len, self.seed, self.rank, self.world_size = seq_len, seed, rank, world_size
        self.per_rank = self.n_chunks // world_size  # chunks each rank sees per epoch (the rest wait)
        self._epoch, self._order = -1, None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order, self._epoch = rng.permutation(self.n_chunks), epoch
        return self._order

    def chunk_ids(self, start: int, count: int) -> np.ndarray:
        """This rank's chunk ids at positions start..start+count-1 of its endless sequence."""
        out = np.empty(count, dtype=np.int64)
        for i, pos in enumerate(range(start, start + count)):
            epoch, k = divmod(pos, self.per_rank)
            out[i] = self._epoch_order(epoch)[k * self.world_size + self.rank]
        return out

    def batch(self, memmap: np.ndarray, step: int, micro_step: int, micro_batch: int,
              grad_accum: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) int64 arrays of shape (micro_batch, seq_len) for one micro-step of one optimizer step."""
        start = (step * grad_accum + micro_step) * micro_batch
        ids = self.chunk_ids(start, micro_batch)
        span = self.seq_len + 1
        chunks = np.stack([np.asarray(memmap[i * self.seq_len: i * self.seq_len + span], dtype=np.int64)
                           for i in ids.tolist()])
        return chunks[:, :-1], chunks[:, 1:]
