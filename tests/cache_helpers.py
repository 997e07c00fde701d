"""Drive the paged KV cache by hand in model-level tests: sequences with block tables.

`Sequences` keeps, per sequence, its block table and length, and hands out blocks one at a
time as a sequence grows, so sequences that grow in turn get interleaved,
non-consecutive blocks (the case the block tables exist for)."""

from __future__ import annotations

from model.kv_cache import CacheBatch, KVCache


class Sequences:
    def __init__(self, kv: KVCache):
        self.kv = kv
        self.tables: list[list[int]] = []
        self.lengths: list[int] = []

    def allocate(self) -> int:
        self.tables.append([])
        self.lengths.append(0)
        return len(self.tables) - 1

    def batch(self, seqs: list[int], num_new: list[int]) -> CacheBatch:
        for s, n in zip(seqs, num_new):
            while len(self.tables[s]) < self.kv.blocks_needed(self.lengths[s] + n):
                self.tables[s].append(self.kv.pool.allocate())
        return self.kv.batch([self.tables[s] for s in seqs], [self.lengths[s] for s in seqs], num_new)

    def advance(self, seqs: list[int], num_new: list[int]) -> None:
        for s, n in zip(seqs, num_new):
            self.lengths[s] += n
