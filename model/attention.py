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
from types import ModuleType

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


# The native module (model/native) whose `causal_attention_lse` / `causal_attention_backward` run
# `native_causal_attention`: registered by `Transformer.use_native_attention` once it is built.
_native_module: ModuleType | None = None


def use_native_module(module: ModuleType | None) -> bool:
    """Register the native module for `native_causal_attention`; False (nothing registered) when it is None or
    lacks the training attention (a torch without the fp32 micro-kernel)."""
    global _native_module
    if module is None or not hasattr(module, "causal_attention_backward"):
        return False
    _native_module = module
    return True


def native_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention on a CPU in Kiln's native kernels, differentiable: q (B, T, H, D), k/v (B, T, Hkv, D)
    (views of a qkv product serve: only the last dim must be contiguous) -> (B, T, H, D) in q's dtype.

    The math is fp32 whatever the inputs' dtype (bf16 under autocast is widened on the way in and the results
    rounded on the way out); the backward recomputes the attention weights from the forward's log-sum-exp,
    flash attention's way. One opaque op to torch.compile (`kiln::cpu_causal_attention`)."""
    return _cpu_causal_attention(q, k, v, q.shape[-1] ** -0.5)[0]


def _native() -> ModuleType:
    if _native_module is None:
        raise RuntimeError("native_causal_attention needs the native module: call "
                           "Transformer.use_native_attention(model.native.load()) first")
    return _native_module


def _f32(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("kiln::cpu_causal_attention", mutates_args=())
def _cpu_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _native().causal_attention_lse(_f32(q), _f32(k), _f32(v), scale)  # lse (B, H, T) fp32
    return out.to(q.dtype), lse


@_cpu_causal_attention.register_fake
def _(q, k, v, scale):
    B, T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("kiln::cpu_causal_attention_backward", mutates_args=())
def _cpu_causal_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                                   grad: torch.Tensor, lse: torch.Tensor,
                                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _native().causal_attention_backward(_f32(q), _f32(k), _f32(v), _f32(out), _f32(grad),
                                                     lse.contiguous(), scale)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@_cpu_causal_attention_backward.register_fake
def _(q, k, v, out, grad, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1])
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return (*_cpu_causal_attention_backward(q, k, v, out, grad_out, lse, ctx.scale), None)


_cpu_causal_attention.register_autograd(_backward, setup_context=_setup_context)


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
