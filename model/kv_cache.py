"""The paged KV cache: one preallocated pool of fixed-size blocks, block tables, prefix caching.

Layout (the Triton decode kernel reads it in place):
    k[layer], v[layer]: (num_blocks, block_size, n_kv_head, head_dim)
Position p of a sequence lives in block `blocks[p // block_size]` at offset
`p % block_size`. A sequence holds only the blocks its tokens need, so memory follows the
tokens actually cached, not max_seq_len per sequence. Block 0 is the null block: it is
never handed out, and right-padded rows of a batch write their padding there.

`BlockPool` is the host-side bookkeeping (no tensors): free blocks, reference counts, and
the prefix cache. A full block's identity is a hash chained over the token ids of every
block before it and its own, so two prompts that share a prefix of whole blocks share
those blocks (reference-counted). A block whose last user is done keeps its hash and sits
in an LRU list: it is reused by a later hit, or evicted (oldest first) when the pool needs
a free block.

`default_num_blocks` sizes the pool from free GPU memory (or, on the CPU, from the batch). The pool
holds the model's dtype, or on the CPU bf16 on request (`resolve_kv_cache_dtype`, `--kv-cache-dtype`).

`CacheBatch` describes one forward over the cache: where each new token is written, the
block table and lengths each row attends over, and the attention mask, built once per
step and shared by every layer. `KVCache.decode_batch` builds a decode step's from block
tables kept as rows of an array (the engine's per-slot tables, updated a block at a time),
so a step at batch 256 does not rebuild a (256, blocks) table from Python lists.
"""

from __future__ import annotations

import heapq
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from .config import ModelConfig
from .transfer import to_device, upload

NULL_BLOCK = 0


def block_hashes(token_ids: list[int], block_size: int, parent: int | None = None,
                 start_block: int = 0) -> list[int]:
    """Chained hashes of the full blocks of `token_ids`, from block `start_block` on.

    `parent` is the hash of block start_block - 1 (None at the start)."""
    hashes = []
    for i in range(start_block, len(token_ids) // block_size):
        parent = hash((parent, tuple(token_ids[i * block_size: (i + 1) * block_size])))
        hashes.append(parent)
    return hashes


class BlockPool:
    """Free list, reference counts and the hash -> block map of the prefix cache."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks (one is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self._free = list(range(1, num_blocks))  # a min-heap: low ids first keeps sequences contiguous
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but hashed, oldest first
        self._hash_of: dict[int, int] = {}  # block -> hash
        self._block_of: dict[int, int] = {}  # hash -> block
        self.queried_tokens = 0  # prefix-cache statistics
        self.hit_tokens = 0

    @property
    def num_free(self) -> int:
        """Blocks a sequence can get now: never used, or cached but unreferenced (evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks referenced by live sequences."""
        return self.num_blocks - 1 - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def allocate(self) -> int:
        if self._free:
            block = heapq.heappop(self._free)
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        else:
            raise RuntimeError("the KV pool is out of blocks")
        self.ref[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; unreferenced ones become free or evictable.

        Released in reverse so a sequence's last blocks (the least shared) are evicted first."""
        for block in reversed(blocks):
            if self.ref[block] <= 0:
                raise ValueError(f"block {block} is not allocated")
            self.ref[block] -= 1
            if self.ref[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    heapq.heappush(self._free, block)

    def lookup(self, hashes: list[int]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes`, each with a reference taken."""
        found = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            if self.ref[block] == 0:
                del self._evictable[block]
            self.ref[block] += 1
            found.append(block)
        return found

    def register(self, block: int, block_hash: int) -> None:
        """Make a full, written block findable by its hash (first writer wins)."""
        if not self.enable_prefix_caching or block_hash in self._block_of or block in self._hash_of:
            return
        self._block_of[block_hash] = block
        self._hash_of[block] = block_hash

    def reset_prefix_cache(self) -> None:
        for block in list(self._evictable):
            heapq.heappush(self._free, block)
        self._evictable.clear()
        self._hash_of.clear()
        self._block_of.clear()


class KVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, max_seq_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 enable_prefix_caching: bool = True):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.max_seq_len = min(max_seq_len or config.max_seq_len, config.max_seq_len)
        self.max_blocks_per_seq = -(-self.max_seq_len // block_size)
        if num_blocks - 1 < self.max_blocks_per_seq:
            raise ValueError(f"{num_blocks} KV blocks of {block_size} tokens cannot hold one sequence of "
                             f"{self.max_seq_len} tokens: need at least {self.max_blocks_per_seq + 1} "
                             "(one block is reserved)")
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        shape = (config.n_layer, num_blocks, block_size, config.n_kv_head, config.dim_per_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layer * block_size * config.n_kv_head * config.dim_per_head * itemsize

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def usage(self) -> float:
        """Fraction of the pool's blocks referenced by live sequences."""
        return self.pool.num_used / (self.num_blocks - 1)

    def batch(self, tables: list[list[int]], starts: list[int], num_new: list[int],
              with_mask: bool = True) -> "CacheBatch":
        """The view for one forward: row b writes num_new[b] tokens at positions starts[b]...

        `tables[b]` must already hold the blocks those positions fall in. Rows are
        right-padded to max(num_new); padded positions write into the null block and are
        never attended to by real queries. `with_mask=False` skips the attention mask (the
        Triton decode kernel reads each row's length instead).
        """
        for table, start, n in zip(tables, starts, num_new):
            if start + n > self.max_seq_len or self.blocks_needed(start + n) > len(table):
                raise ValueError(f"positions {start}..{start + n - 1} do not fit the row's "
                                 f"{len(table)} blocks of {self.block_size} (max {self.max_seq_len} tokens)")
        return CacheBatch.build(tables, starts, num_new, self.block_size, self.max_seq_len, self.k.device, with_mask)

    def decode_batch(self, tables: np.ndarray, rows: list[int], starts: list[int],
                     with_mask: bool = True) -> "CacheBatch":
        """The view for one decode step: row b of the batch is row rows[b] of `tables`, an int64 array of
        block tables (one per row, padded with NULL_BLOCK past its blocks), with one new token at position
        starts[b]. Only the columns the step reaches are copied (the table is as wide as the context)."""
        kv_len = max(starts) + 1
        nb = self.blocks_needed(kv_len)
        if kv_len > self.max_seq_len or tables.shape[1] < nb:
            raise ValueError(f"positions up to {kv_len - 1} do not fit {tables.shape[1]} blocks of "
                             f"{self.block_size} (max {self.max_seq_len} tokens)")
        table = tables[rows, :nb].astype(np.int64, copy=False)  # (B, nb), a new contiguous array
        return CacheBatch._build_decode(table, starts, kv_len, self.block_size, self.k.device, with_mask)


KV_CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_kv_cache_dtype(requested: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """What the KV pool holds, for `requested` "auto" (the model's dtype), "fp32" or "bf16".

    A bf16 cache on the CPU (where models run in fp32) halves the pool's memory and the bytes a decode step
    reads at long contexts: keys and values are rounded to bf16 when written and widened back to the step's
    dtype when read, so outputs move (greedy tokens can differ from an fp32 cache's where two logits are
    close) as they do with vLLM's --kv-cache-dtype. On CUDA the attention kernels read the cache in the
    model's dtype, so only that is allowed there. Raises ValueError naming what is allowed."""
    if requested == "auto":
        return model_dtype
    if requested not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of auto, fp32, bf16; got {requested!r}")
    dtype = KV_CACHE_DTYPES[requested]
    if torch.device(device).type != "cpu" and dtype != model_dtype:
        name = str(model_dtype).removeprefix("torch.")
        raise ValueError(f"kv cache dtype {requested} applies on the CPU; on {torch.device(device).type} the "
                         f"cache holds the model's dtype ({name}): use auto")
    return dtype


def default_num_blocks(config: ModelConfig, device: torch.device, dtype: torch.dtype, block_size: int,
                       max_seq_len: int, max_batch_size: int, gpu_memory_fraction: float, reserve_bytes: int) -> int:
    """Pool size: on CUDA what fits in `gpu_memory_fraction` of the device after the weights and
    `reserve_bytes` of activations; on the CPU two full-length sequences per batch row (room
    for the prefix cache), capped at a fifth of the machine's memory."""
    per_block = KVCache.bytes_per_block(config, block_size, dtype)
    per_seq = -(-max_seq_len // block_size)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1.0 - gpu_memory_fraction) * total - reserve_bytes
        blocks = int(budget // per_block)
        if blocks < per_seq + 1:
            raise ValueError(f"KV cache: {max(budget, 0) / 2**30:.2f} GiB left for {per_seq + 1} blocks of "
                             f"{per_block / 2**20:.1f} MiB; raise --gpu-memory-fraction or lower --max-model-len")
        return blocks
    blocks = 2 * max_batch_size * per_seq + 1
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        blocks = min(blocks, max(per_seq + 1, int(ram * 0.2 // per_block)))
    except (ValueError, OSError, AttributeError):
        pass
    return blocks


@dataclass
class CacheBatch:
    positions: torch.Tensor  # (B, T) int64, absolute positions of the new tokens (clamped when padded)
    write_blocks: torch.Tensor  # (B, T) int64, block each new token is written to (null block when padded)
    write_offsets: torch.Tensor  # (B, T) int64, offset inside that block
    block_table: torch.Tensor  # (B, nb) int64, the blocks covering kv_len; 0-padded
    lengths: torch.Tensor  # (B,) int32, valid keys per row after this step's writes
    kv_len: int  # keys each row attends over: max over rows of start + num_new
    block_size: int
    mask: torch.Tensor | None  # (B, 1, T, kv_len) bool, True = attend; None when a plain causal mask is exact
    contiguous_from: int | None  # one row whose blocks are consecutive from this id: its keys are a view

    @staticmethod
    def build(tables: list[list[int]], starts: list[int], num_new: list[int], block_size: int,
              max_seq_len: int, device: torch.device, with_mask: bool = True) -> "CacheBatch":
        B, T = len(tables), max(num_new)
        ends = [s + n for s, n in zip(starts, num_new)]
        kv_len = max(ends)
        nb = -(-kv_len // block_size)
        if T == 1:
            table = np.full((B, nb), NULL_BLOCK, dtype=np.int64)
            for b, blocks in enumerate(tables):
                used = blocks[:nb]
                table[b, : len(used)] = used
            return CacheBatch._build_decode(table, starts, kv_len, block_size, device, with_mask)
        table = torch.zeros(B, nb, dtype=torch.int64)
        for b, blocks in enumerate(tables):
            used = blocks[: -(-ends[b] // block_size)]
            table[b, : len(used)] = torch.tensor(used, dtype=torch.int64)
        start_t = torch.tensor(starts, dtype=torch.int64)
        offsets = torch.arange(T, dtype=torch.int64)
        raw = start_t[:, None] + offsets[None, :]  # (B, T)
        real = offsets[None, :] < torch.tensor(num_new)[:, None]
        positions = raw.clamp(max=max_seq_len - 1)
        block_idx = torch.where(real, raw // block_size, 0)
        write_blocks = torch.where(real, table.gather(1, block_idx), NULL_BLOCK)
        write_offsets = torch.where(real, raw % block_size, 0)
        uniform = len(set(starts)) == 1 and len(set(num_new)) == 1
        mask = None
        if with_mask and not (uniform and (T == 1 or starts[0] == 0)):
            # query at absolute position p sees keys 0..p (keys past a row's length are
            # never seen: p < start + num_new for real queries)
            key_idx = torch.arange(kv_len, dtype=torch.int64)
            mask = upload(key_idx[None, None, None, :] <= positions[:, None, :, None], device)  # (B, 1, T, kv_len)
        contiguous_from = _contiguous_from(tables, nb)
        return CacheBatch(
            positions=upload(positions, device),
            write_blocks=upload(write_blocks, device),
            write_offsets=upload(write_offsets, device),
            block_table=upload(table, device),
            lengths=to_device(ends, torch.int32, device),
            kv_len=kv_len,
            block_size=block_size,
            mask=mask,
            contiguous_from=contiguous_from,
        )

    @staticmethod
    def _build_decode(table: np.ndarray, starts: list[int], kv_len: int, block_size: int, device: torch.device,
                      with_mask: bool) -> "CacheBatch":
        """One new token per row (a decode step) at positions `starts`, block tables `table` (B, nb): the
        fields in a few tensor calls, since at batch 1 on a CPU building the batch costs as much as a
        small matmul, and with the table as an array, not rebuilt from lists, at batch 256 too."""
        write_blocks = [int(table[b, s // block_size]) for b, s in enumerate(starts)]
        if NULL_BLOCK in write_blocks:
            row = write_blocks.index(NULL_BLOCK)
            raise ValueError(f"row {row}'s block table does not cover its new position {starts[row]}")
        index = torch.tensor([[[s] for s in starts], [[w] for w in write_blocks],
                              [[s % block_size] for s in starts]], dtype=torch.int64)  # (3, B, 1)
        lengths = torch.tensor([s + 1 for s in starts], dtype=torch.int32)
        mask = None
        if with_mask and len(set(starts)) > 1:
            mask = upload((torch.arange(kv_len)[None, :] < lengths[:, None])[:, None, None, :], device)  # (B, 1, 1, L)
        contiguous_from = _contiguous_from([table[0].tolist()], table.shape[1]) if len(starts) == 1 else None
        table = torch.from_numpy(table)
        if device.type != "cpu":
            index, table, lengths = upload(index, device), upload(table, device), upload(lengths, device)
        return CacheBatch(positions=index[0], write_blocks=index[1], write_offsets=index[2], block_table=table,
                          lengths=lengths, kv_len=kv_len, block_size=block_size, mask=mask,
                          contiguous_from=contiguous_from)


def _contiguous_from(tables: list[list[int]], nb: int) -> int | None:
    """The first block of a single row whose first `nb` blocks are consecutive ids (its keys are
    then a view of the pool), else None."""
    if len(tables) != 1:
        return None
    used = tables[0][:nb]
    return used[0] if all(b - a == 1 for a, b in zip(used, used[1:])) else None
