"""Fused rotary embedding + paged KV-cache write, for the inference forward.

API::

    rope_cache_write(qkv, n_head, n_kv_head, positions, k_cache, v_cache, write_blocks, write_offsets,
                     cos=None, signed_sin=None, layer=None) -> q
    rope_cache_write_reference(...)       # plain torch; the CPU path
    available(device) -> bool

    qkv            (B, T, (H + 2 Hkv) D)   the fused QKV projection's output: H query heads,
                   then Hkv key heads, then Hkv value heads, D wide each
    positions      (B, T) int   absolute position of each token (indexes the rope tables)
    k_cache        (num_blocks, block_size, Hkv, D)   one layer of the paged pool; v_cache alike.
                   Or, with ``layer``, the whole pool (n_layer, num_blocks, block_size, Hkv, D),
                   of which layer ``layer`` is written: under torch.compile with dynamic shapes,
                   a custom op that writes into a *view* at a storage offset (``pool[i]``)
                   has its writes land at offset 0 (torch 2.13, auto-functionalization), so
                   the model passes the pool itself
    write_blocks   (B, T) int   the block each token's key/value goes to; write_offsets its
                   position in that block (padding tokens point at the null block). On CPU
                   tensors (no GPU sync) they, and positions, are checked to be in range
    cos, signed_sin  (max_seq_len, D) rotary tables in the rotate-half layout, sin already
                   signed (``model.transformer.rope_tables``); None for models with learned
                   positions (GPT-2), which copy q and k unrotated
    q              (B, T, H, D) in qkv's dtype, rotated

Each token's key and value are written into the cache (rotated key) in place, as
``k_cache[write_blocks, write_offsets] = k`` does. Why one kernel: in torch this is a
gather of each rope table, ``x * cos``, a roll, an ``addcmul``, a downcast, and two
``index_put_`` (each several kernels) per layer. At batch 1 a decode step is launch-bound,
CUDA graph or not, so ten-odd launches become one program per token, which loads the
token's row of qkv once, rotates the query and key heads in fp32 and stores q and the
cache rows.
"""

from __future__ import annotations

import functools

import torch

from kernels._utils import (
    FLOAT_DTYPES,
    check_same_device,
    check_tensor,
    check_triton_device,
    interpreting,
    jit_kernel,
    kernel_op,
    next_power_of_2,
    triton_available,
)

_INDEX_DTYPES = (torch.int32, torch.int64)
_HEAD_DIMS = (16, 32, 64, 128, 256)


def available(device: torch.device | str) -> bool:
    """True when ``rope_cache_write`` (the Triton path) can run on ``device``."""
    return triton_available(device)


def rope_cache_write_reference(qkv, n_head, n_kv_head, positions, k_cache, v_cache, write_blocks, write_offsets,
                               cos=None, signed_sin=None, layer=None) -> torch.Tensor:
    """Plain torch: rotate q and k (``x * cos + roll(x, D/2) * signed_sin``), write k and v, return q."""
    _check_inputs(qkv, n_head, n_kv_head, positions, k_cache, v_cache, write_blocks, write_offsets, cos, signed_sin,
                  layer, reference=True)
    if layer is not None:
        k_cache, v_cache = k_cache[layer], v_cache[layer]
    B, T, _ = qkv.shape
    H, Hkv, D = n_head, n_kv_head, k_cache.shape[-1]
    qk = qkv[..., : (H + Hkv) * D].reshape(B, T, H + Hkv, D)
    v = qkv[..., (H + Hkv) * D:].reshape(B, T, Hkv, D)
    if cos is not None:
        c, s = cos[positions][:, :, None, :].float(), signed_sin[positions][:, :, None, :].float()
        qk = torch.addcmul(qk * c, qk.roll(D // 2, dims=-1), s).to(qkv.dtype)
    k_cache[write_blocks, write_offsets] = qk[:, :, H:]
    v_cache[write_blocks, write_offsets] = v
    return qk[:, :, :H].contiguous()


def rope_cache_write(qkv, n_head, n_kv_head, positions, k_cache, v_cache, write_blocks, write_offsets,
                     cos=None, signed_sin=None, layer=None) -> torch.Tensor:
    """Fused Triton rotary embedding of q and k + cache write of k and v; returns q (B, T, H, D)."""
    _check_inputs(qkv, n_head, n_kv_head, positions, k_cache, v_cache, write_blocks, write_offsets, cos, signed_sin,
                  layer, reference=False)
    check_triton_device("rope_cache_write", qkv.device)
    if layer is None:
        k_cache, v_cache, layer = k_cache.unsqueeze(0), v_cache.unsqueeze(0), 0
    return _rope(qkv, positions, k_cache, v_cache, int(layer), write_blocks, write_offsets, cos, signed_sin, n_head)


def _rope_impl(qkv, positions, k_pool, v_pool, layer, write_blocks, write_offsets, cos, signed_sin, n_head):
    k_cache, v_cache = k_pool[layer], v_pool[layer]  # the kernel writes through these views' pointers
    B, T, width = qkv.shape
    D, Hkv = k_cache.shape[-1], k_cache.shape[-2]
    q = torch.empty((B, T, n_head, D), device=qkv.device, dtype=qkv.dtype)
    if B * T == 0:
        return q
    rows = qkv.reshape(B * T, width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    positions, write_blocks, write_offsets = (t.reshape(B * T) for t in (positions, write_blocks, write_offsets))
    rope = cos is not None
    tables = (cos, signed_sin) if rope else (rows, rows)  # unused dummy pointers without rope
    _kernel(interpreting())[(B * T,)](
        rows, tables[0], tables[1], positions, write_blocks, write_offsets, q, k_cache, v_cache,
        rows.stride(0), tables[0].stride(0), positions.stride(0), write_blocks.stride(0), write_offsets.stride(0),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        n_head, Hkv,
        HEAD_DIM=D, BLOCK_H=next_power_of_2(n_head), BLOCK_KV=next_power_of_2(Hkv), ROPE=rope,
        num_warps=4,
    )
    return q


def _rope_fake(qkv, positions, k_pool, v_pool, layer, write_blocks, write_offsets, cos, signed_sin, n_head):
    B, T, _ = qkv.shape
    return qkv.new_empty((B, T, n_head, k_pool.shape[-1]))


# A custom op (mutating the two cache tensors), so a torch.compile'd decode step holds the launch
# as one opaque node.
_rope = kernel_op(
    "rope_cache_write",
    "(Tensor qkv, Tensor positions, Tensor(a!) k_pool, Tensor(b!) v_pool, int layer, Tensor write_blocks, "
    "Tensor write_offsets, Tensor? cos, Tensor? signed_sin, int n_head) -> Tensor",
    _rope_impl, _rope_fake, public="rope_cache_write", mutates_args=("k_pool", "v_pool"),
)


def _check_inputs(qkv, n_head, n_kv_head, positions, k_cache, v_cache, write_blocks, write_offsets,
                  cos, signed_sin, layer, reference: bool) -> None:
    check_tensor("qkv", qkv, 3, FLOAT_DTYPES)
    dims = 4 if layer is None else 5
    check_tensor("k_cache", k_cache, dims, FLOAT_DTYPES)
    check_tensor("v_cache", v_cache, dims, FLOAT_DTYPES)
    if layer is not None and not 0 <= int(layer) < k_cache.shape[0]:
        raise ValueError(f"layer {layer} is out of range for a pool of {k_cache.shape[0]} layers")
    for name, t in (("positions", positions), ("write_blocks", write_blocks), ("write_offsets", write_offsets)):
        check_tensor(name, t, 2, _INDEX_DTYPES)
        if t.shape != qkv.shape[:2]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected (B, T) = {tuple(qkv.shape[:2])} as qkv")
    if k_cache.shape != v_cache.shape or not (qkv.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"k_cache {tuple(k_cache.shape)} {k_cache.dtype} and v_cache {tuple(v_cache.shape)} "
                         f"{v_cache.dtype} must share one shape and qkv's dtype {qkv.dtype}")
    D, Hkv = k_cache.shape[-1], k_cache.shape[-2]
    if D % 2 or (not reference and D not in _HEAD_DIMS):
        raise ValueError(f"head dim {D} is not supported by the Triton kernel; allowed: {_HEAD_DIMS} "
                         "(the reference takes any even head dim)")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need a unit stride over the head dim")
    if n_kv_head != Hkv or n_head < 1 or n_head % n_kv_head:
        raise ValueError(f"n_head {n_head} must be a positive multiple of n_kv_head {n_kv_head}, which must match "
                         f"the cache's {Hkv} kv heads")
    if qkv.shape[-1] != (n_head + 2 * n_kv_head) * D:
        raise ValueError(f"qkv's last dim is {qkv.shape[-1]}, expected (n_head + 2 n_kv_head) * head_dim = "
                         f"{(n_head + 2 * n_kv_head) * D}")
    tensors = {"qkv": qkv, "k_cache": k_cache, "v_cache": v_cache, "positions": positions,
               "write_blocks": write_blocks, "write_offsets": write_offsets}
    if (cos is None) != (signed_sin is None):
        raise ValueError("cos and signed_sin go together: both tables, or neither (no rotary embedding)")
    if cos is not None:
        for name, t in (("cos", cos), ("signed_sin", signed_sin)):
            check_tensor(name, t, 2, FLOAT_DTYPES)
            if t.shape[1] != D or t.stride(1) != 1:
                raise ValueError(f"{name} must be (max_seq_len, {D}) with unit column stride, got {tuple(t.shape)}")
        if cos.shape != signed_sin.shape:
            raise ValueError(f"cos {tuple(cos.shape)} and signed_sin {tuple(signed_sin.shape)} must match")
        tensors.update(cos=cos, signed_sin=signed_sin)
    check_same_device(**tensors)
    # Value checks only where they cost no GPU sync (and not while torch.compile traces): an id out of
    # range would write outside the pool or read outside the rope tables
    if positions.device.type == "cpu" and positions.numel() and not torch.compiler.is_compiling():
        num_blocks, block_size = k_cache.shape[-4], k_cache.shape[-3]
        ranges = [("write_blocks", write_blocks, num_blocks, "num_blocks"),
                  ("write_offsets", write_offsets, block_size, "block_size")]
        if cos is not None:
            ranges.append(("positions", positions, cos.shape[0], "the rope tables' max_seq_len"))
        for name, t, limit, what in ranges:
            bad = (t < 0) | (t >= limit)
            if bool(bad.any()):
                b, i = (int(j) for j in bad.nonzero()[0])
                raise ValueError(f"{name}[{b}, {i}] = {int(t[b, i])} is outside [0, {what} = {limit})")


# ----------------------------------------------------------------------------- kernel
# `tl` (triton.language) is bound into this module by `jit_kernel` when the kernel is
# first built; importing this module never imports triton.


def _rope_cache_kernel(
    QKV, Cos, Sin, Pos, WBlocks, WOffsets, Q, KC, VC,
    stride_row, stride_table, stride_pos, stride_wb, stride_wo,
    stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh,
    n_head, n_kv_head,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr, ROPE: tl.constexpr,
):
    # One program per token: its query heads, key heads and value heads as (heads, D/2) halves.
    HALF: tl.constexpr = HEAD_DIM // 2
    row = tl.program_id(0).to(tl.int64)
    src = QKV + row * stride_row
    offs = tl.arange(0, HALF)
    hq = tl.arange(0, BLOCK_H)
    hk = tl.arange(0, BLOCK_KV)
    q_ok = hq[:, None] < n_head
    k_ok = hk[:, None] < n_kv_head
    q1 = tl.load(src + hq[:, None] * HEAD_DIM + offs[None, :], mask=q_ok, other=0.0)  # (BLOCK_H, HALF)
    q2 = tl.load(src + hq[:, None] * HEAD_DIM + HALF + offs[None, :], mask=q_ok, other=0.0)
    k_src = src + n_head * HEAD_DIM
    k1 = tl.load(k_src + hk[:, None] * HEAD_DIM + offs[None, :], mask=k_ok, other=0.0)  # (BLOCK_KV, HALF)
    k2 = tl.load(k_src + hk[:, None] * HEAD_DIM + HALF + offs[None, :], mask=k_ok, other=0.0)
    if ROPE:
        # x * cos + rotate_half(x) * sin, rotate_half(x) = [x2, x1] with the sign folded into the table
        pos = tl.load(Pos + row * stride_pos).to(tl.int64)
        c1 = tl.load(Cos + pos * stride_table + offs).to(tl.float32)[None, :]
        c2 = tl.load(Cos + pos * stride_table + HALF + offs).to(tl.float32)[None, :]
        s1 = tl.load(Sin + pos * stride_table + offs).to(tl.float32)[None, :]
        s2 = tl.load(Sin + pos * stride_table + HALF + offs).to(tl.float32)[None, :]
        q1f, q2f = q1.to(tl.float32), q2.to(tl.float32)
        q1, q2 = q1f * c1 + q2f * s1, q2f * c2 + q1f * s2
        k1f, k2f = k1.to(tl.float32), k2.to(tl.float32)
        k1, k2 = k1f * c1 + k2f * s1, k2f * c2 + k1f * s2
    q_dst = Q + row * n_head * HEAD_DIM + hq[:, None] * HEAD_DIM + offs[None, :]
    tl.store(q_dst, q1.to(Q.dtype.element_ty), mask=q_ok)
    tl.store(q_dst + HALF, q2.to(Q.dtype.element_ty), mask=q_ok)
    blk = tl.load(WBlocks + row * stride_wb).to(tl.int64)
    off = tl.load(WOffsets + row * stride_wo).to(tl.int64)
    k_dst = KC + blk * stride_kb + off * stride_kp + hk[:, None] * stride_kh + offs[None, :]
    tl.store(k_dst, k1.to(KC.dtype.element_ty), mask=k_ok)
    tl.store(k_dst + HALF, k2.to(KC.dtype.element_ty), mask=k_ok)
    v_src = k_src + n_kv_head * HEAD_DIM
    v_dst = VC + blk * stride_vb + off * stride_vp + hk[:, None] * stride_vh + offs[None, :]
    v1 = tl.load(v_src + hk[:, None] * HEAD_DIM + offs[None, :], mask=k_ok, other=0.0)
    v2 = tl.load(v_src + hk[:, None] * HEAD_DIM + HALF + offs[None, :], mask=k_ok, other=0.0)
    tl.store(v_dst, v1, mask=k_ok)
    tl.store(v_dst + HALF, v2, mask=k_ok)


@functools.cache
def _kernel(interpret: bool):
    del interpret  # cache key only: jit_kernel reads the mode itself
    return jit_kernel(_rope_cache_kernel)  # not autotuned: a token's row is a few KB
