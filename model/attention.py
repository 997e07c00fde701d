"""Attention dispatch: one function per situation, the backend chosen at run time.

Backends:
- "torch": `F.scaled_dot_product_attention` (with GQA handled by `enable_gqa`); the
  CPU path and the reference for the kernels.
- "triton": Kiln's kernels (`kernels.attention.flash_attention` for prefill/training,
  `kernels.decode.decode_attention` for one query per sequence over the cache).
- "auto": "triton" for CUDA tensors when Triton is importable, else "torch".

The backend is a field of the model instance (`Transformer.attn_backend`), never an
import-time global.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from .kv_cache import CacheBatch

BACKENDS = ("auto", "torch", "triton")


# Looked up once, at import (without importing triton): `resolve_backend` runs inside the compiled decode
# step, and Dynamo cannot trace importlib (a find_spec there failed the whole compile on a GPU).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)


def resolve_backend(backend: str, device: torch.device, head_dim: int) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        usable = device.type == "cuda" and _TRITON_INSTALLED and head_dim in TRITON_HEAD_DIMS
        return "triton" if usable else "torch"
    if backend == "triton" and head_dim not in TRITON_HEAD_DIMS:
        raise ValueError(f"the triton attention backend needs a head dim in {TRITON_HEAD_DIMS}, got {head_dim}; "
                         "use the torch backend")
    return backend


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Self-attention within the given tokens. q (B, H, T, D), k/v (B, Hkv, T, D) -> (B, H, T, D)."""
    if backend == "triton":
        from kernels.attention import flash_attention

        return flash_attention(q, k, v, causal=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def gather_blocks(cache: torch.Tensor, block_table: torch.Tensor, kv_len: int,
                  contiguous_from: int | None = None) -> torch.Tensor:
    """Each row's first kv_len cached keys (or values) through its block table: (B, Hkv, L, D).

    cache is one layer of the pool, (num_blocks, block_size, Hkv, D); block_table (B, >= nb).
    A single row whose blocks are consecutive from `contiguous_from` is a view of the pool;
    otherwise the blocks are gathered."""
    block_size = cache.shape[1]
    if contiguous_from is not None:
        start = contiguous_from * block_size
        flat = cache.view(-1, *cache.shape[2:])  # (num_blocks * block_size, Hkv, D)
        return flat[start: start + kv_len].unsqueeze(0).transpose(1, 2)
    rows = cache[block_table[:, : -(-kv_len // block_size)]]  # (B, nb, block_size, Hkv, D)
    return rows.flatten(1, 2)[:, :kv_len].transpose(1, 2)


def cached_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, batch: CacheBatch, backend: str) -> torch.Tensor:
    """Write this step's keys/values into the paged cache, then attend over each row's blocks.

    q (B, H, T, D); k_new/v_new (B, T, Hkv, D); k_cache/v_cache (num_blocks, block_size, Hkv, D).
    Returns (B, H, T, D). The cache may hold another dtype than the step computes in (a CPU engine's
    bf16 prompt forward over its fp32 cache): keys and values are cast on the way in and out.
    """
    store_keys(k_new, v_new, k_cache, v_cache, batch.write_blocks, batch.write_offsets)
    return attend_cached(q, k_cache, v_cache, batch, backend)


def store_keys(k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               write_blocks: torch.Tensor, write_offsets: torch.Tensor) -> None:
    """Write this step's keys/values (B, T, Hkv, D) into their blocks of the paged cache (a CacheBatch's
    write_blocks / write_offsets), in its dtype: a bf16 cache (--kv-cache-dtype) rounds them."""
    k_cache[write_blocks, write_offsets] = k_new.to(k_cache.dtype)
    v_cache[write_blocks, write_offsets] = v_new.to(v_cache.dtype)


def cached_keys(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, kv_len: int,
                contiguous_from: int | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's first kv_len keys and values, (B, Hkv, kv_len, D) in `dtype` (views of the pool when one
    row's blocks are consecutive from `contiguous_from` and the cache holds `dtype`; otherwise gathered or
    cast copies). The fields are a CacheBatch's."""
    keys = gather_blocks(k_cache, block_table, kv_len, contiguous_from)
    values = gather_blocks(v_cache, block_table, kv_len, contiguous_from)
    return keys.to(dtype), values.to(dtype)


def attend_cached(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: CacheBatch,
                  backend: str) -> torch.Tensor:
    """Attend over each row's blocks, this step's keys/values already written. q (B, H, T, D) -> (B, H, T, D)."""
    B, H, T, D = q.shape
    if backend == "triton" and T == 1:
        from kernels.decode import decode_attention

        return decode_attention(q[:, :, 0], k_cache, v_cache, batch.block_table, batch.lengths)[:, :, None]
    keys, values = cached_keys(k_cache, v_cache, batch.block_table, batch.kv_len, batch.contiguous_from, q.dtype)
    if backend == "triton" and B == 1:
        from kernels.attention import flash_attention

        # one row: its queries are the last T of its L keys, exactly the kernel's causal offset
        return flash_attention(q, keys, values, causal=True)
    gqa = H != keys.shape[1]
    if batch.mask is None:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=T > 1, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=batch.mask, enable_gqa=gqa)
