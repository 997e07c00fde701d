"""The KV cache: preallocated per-slot key/value buffers, and the per-step batch view.

Layout (the Triton decode kernel reads it directly):
    k[layer], v[layer]: (num_slots, n_kv_head, max_seq_len, head_dim)
Each running sequence owns one slot. The engine keeps each slot's length on the host
(a Python int: the scheduler needs it anyway, and reading it never syncs the device).
A new sequence can be prefilled into a free slot while other slots are mid-generation;
freeing a slot makes it reusable at once (its stale contents are overwritten before
they are read, because every position is written before it is attended to).

`CacheBatch` describes one forward over the cache: which slot each batch row writes
into, the absolute positions of its new tokens, and the attention mask, built once per
step and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, num_slots: int, max_seq_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self.max_seq_len = min(max_seq_len or config.max_seq_len, config.max_seq_len)
        shape = (config.n_layer, num_slots, config.n_kv_head, self.max_seq_len, config.dim_per_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = [0] * num_slots  # host-side valid length of each slot
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out the lowest slot first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV-cache slot")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self.lengths[slot] = 0
        self._free.append(slot)
        self._free.sort(reverse=True)

    def usage(self) -> float:
        """Fraction of cache positions holding live tokens."""
        return sum(self.lengths) / (self.num_slots * self.max_seq_len)

    def batch(self, slots: list[int], num_new: list[int]) -> "CacheBatch":
        """The view for one forward: row b appends num_new[b] tokens to slots[b].

        Rows are right-padded to max(num_new); padded positions are clamped inside the
        buffer and never attended to by real queries.
        """
        starts = [self.lengths[s] for s in slots]
        for s, start, n in zip(slots, starts, num_new):
            if start + n > self.max_seq_len:
                raise ValueError(f"slot {s}: {start} + {n} tokens exceed the cache length {self.max_seq_len}")
        return CacheBatch.build(slots, starts, num_new, self.max_seq_len, self.k.device)

    def advance(self, slots: list[int], num_new: list[int]) -> None:
        for s, n in zip(slots, num_new):
            self.lengths[s] += n


@dataclass
class CacheBatch:
    slots: torch.Tensor  # (B,) int64
    positions: torch.Tensor  # (B, T) int64, absolute positions of the new tokens (clamped when padded)
    lengths: torch.Tensor  # (B,) int32, valid keys per row after this step's writes
    kv_len: int  # keys each row attends over: max over rows of start + num_new
    mask: torch.Tensor | None  # (B, 1, T, kv_len) bool, True = attend; None when a plain causal mask is exact
    slot_range: tuple[int, int] | None  # (first, last + 1) when slots are consecutive: index with a view

    @staticmethod
    def build(slots: list[int], starts: list[int], num_new: list[int], max_seq_len: int,
              device: torch.device) -> "CacheBatch":
        T = max(num_new)
        kv_len = max(s + n for s, n in zip(starts, num_new))
        start_t = torch.tensor(starts, dtype=torch.int64)
        offsets = torch.arange(T, dtype=torch.int64)
        positions = (start_t[:, None] + offsets[None, :]).clamp_(max=max_seq_len - 1)  # (B, T)
        lengths = torch.tensor([s + n for s, n in zip(starts, num_new)], dtype=torch.int32)
        uniform = len(set(starts)) == 1 and len(set(num_new)) == 1
        mask = None
        if not (uniform and (T == 1 or starts[0] == 0)):
            # query at absolute position p sees keys 0..p (keys past a row's length are
            # never seen: p < start + num_new for real queries)
            key_idx = torch.arange(kv_len, dtype=torch.int64)
            mask = (key_idx[None, None, None, :] <= positions[:, None, :, None])  # (B, 1, T, kv_len)
            mask = mask.to(device)
        consecutive = all(b - a == 1 for a, b in zip(slots, slots[1:]))
        return CacheBatch(
            slots=torch.tensor(slots, dtype=torch.int64, device=device),
            positions=positions.to(device),
            lengths=lengths.to(device),
            kv_len=kv_len,
            mask=mask,
            slot_range=(slots[0], slots[-1] + 1) if consecutive else None,
        )
