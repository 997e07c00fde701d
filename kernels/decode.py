"""Split-KV decode attention (flash-decoding) that reads Kiln's paged KV cache in place.

API::

    decode_attention(q, k_cache, v_cache, block_table, lengths, scale=None, num_splits=None) -> out
    decode_attention_reference(q, k_cache, v_cache, block_table, lengths, scale=None, num_splits=None)
    available(device) -> bool

    q            (B, H, D)   one new query per running sequence; its own K/V is already
                             written to the cache at position lengths[b] - 1
    k_cache      (num_blocks, block_size, Hkv, D)   one layer of the paged pool (block,
                             position in block, kv head, dim: the vLLM / flash-attn paged
                             layout); v_cache the same shape. Any strides.
    block_table  (B, max_blocks) int32/int64   the block ids of row b in order: position p
                             of row b lives at k_cache[block_table[b, p // block_size],
                             p % block_size]. Entries past a row's last used block
                             (index >= ceil(lengths[b] / block_size)) are ignored (never
                             used to address the cache) and may hold any value.
    lengths      (B,) int32/int64   valid cached positions of each row,
                             1 <= lengths[b] <= max_blocks * block_size
    scale        softmax scale, default 1/sqrt(D)
    out          (B, H, D) in q's dtype

``block_size`` is any positive int (not necessarily a power of two). A per-sequence slot
cache is the special case of one big block per row: block_size = max_seq_len and
block_table = slots[:, None].

H must be a multiple of Hkv (GQA): query head h reads kv head h // (H // Hkv), and the
kernel loads each kv head's K/V once for all the query heads of its group. The
reference is the plain-torch CPU path (fp32 math; fp64 inputs stay fp64); both accept
rows of different lengths in one batch.

Kernel design (flash-decoding): the key range of every row is cut into
``num_splits`` equal parts, rounded to the key tile. Program (split, b, kv head)
runs an online softmax over its part for the whole query group (a (G, D) x (D, N)
dot per key tile) and writes a partial output plus its log-sum-exp; a second small
kernel merges the partials of each (b, h). Batch 1 with a long cache thus fills
the GPU. ``num_splits=None`` picks the count from occupancy (programs per SM) and
the table's capacity ``max_blocks * block_size`` -- not from ``lengths``, which would
cost a GPU->CPU sync every step; each row then splits its own length evenly, so
splits past a short row's end exit at once. With one split the first kernel writes
the output directly and the merge is skipped. (Merging in the split kernel instead, by
the last of a row's programs to arrive, was slower on an H100 at every batch-1 config:
one program's serial merge of 64 splits x the group's heads outlasts the second launch;
bench/RESULTS.md, seventh lease.) With ``kernels._utils.PDL`` the kernels let a product launched
with programmatic dependent launch (``kernels.gemv``) start as soon as all their programs run.

Paged addressing: a key tile covers BLOCK_N consecutive positions of one row, which
may straddle cache blocks (block_size need not be a multiple of BLOCK_N). Each
position looks up its own block id, ``blk = block_table[b, pos // block_size]``
(masked to in-range positions), and its key row sits at ``blk * stride_block +
(pos % block_size) * stride_pos + kv_head * stride_head`` (int64 offsets, so large
pools do not overflow). ``block_size`` is a runtime argument, not a constexpr, so
pools of different block sizes share the compiled kernels (up to Triton's usual int
specialization: 1, multiples of 16, and other values compile separately).
Validation checks shapes and dtypes always; value checks (lengths in range, used
block ids in [0, num_blocks)) run only on CPU tensors, where they cost no GPU sync.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch

from kernels import _utils
from kernels._utils import (
    FLOAT_DTYPES,
    LOG2E,
    check_same_device,
    check_tensor,
    check_triton_device,
    config,
    grid_yz,
    interpreting,
    jit_kernel,
    kernel_op,
    next_power_of_2,
    num_sms,
    triton_available,
)

_HEAD_DIMS = (16, 32, 64, 128, 256)
_MAX_SPLITS = 128
_MIN_KEYS_PER_SPLIT = 128
_PROGRAMS_PER_SM = 4
_INDEX_DTYPES = (torch.int32, torch.int64)


def available(device: torch.device | str) -> bool:
    """True when the Triton decode kernels can run on ``device``."""
    return triton_available(device)


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Plain-torch decode attention over the paged cache (fp32 math); ``num_splits`` is ignored."""
    _check_inputs(q, k_cache, v_cache, block_table, lengths, num_splits, reference=True)
    scale = _resolve_scale(scale, q.shape[-1])
    batch, n_heads, head_dim = q.shape
    block_size, n_kv_heads = k_cache.shape[1], k_cache.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    if batch == 0:
        return torch.empty_like(q)
    lengths = lengths.to(q.device).long()
    longest = int(lengths.max())  # a sync, fine on the CPU path
    pos = torch.arange(longest, device=q.device)  # (L,)
    valid = pos[None, :] < lengths[:, None]  # (B, L)
    blocks = block_table.to(q.device).long()[:, pos // block_size]  # (B, L) block id of every position
    blocks = blocks.masked_fill(~valid, 0)  # entries past a row's end may hold anything
    k = k_cache[blocks, pos % block_size].to(compute).transpose(1, 2)  # (B, Hkv, L, D)
    v = v_cache[blocks, pos % block_size].to(compute).transpose(1, 2)
    qg = q.to(compute).reshape(batch, n_kv_heads, n_heads // n_kv_heads, head_dim)  # (B, Hkv, G, D)
    scores = (qg @ k.transpose(-1, -2)) * scale  # (B, Hkv, G, L)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v  # (B, Hkv, G, D)
    return out.reshape(batch, n_heads, head_dim).to(q.dtype)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Flash-decoding over the paged cache (Triton); see the module docstring for shapes."""
    _check_inputs(q, k_cache, v_cache, block_table, lengths, num_splits, reference=False)
    check_triton_device("decode_attention", q.device)
    scale = _resolve_scale(scale, q.shape[-1])
    return _decode(q, k_cache, v_cache, block_table, lengths, scale, 0 if num_splits is None else int(num_splits))


def _decode_impl(q, k_cache, v_cache, block_table, lengths, scale, num_splits):
    """Launch the kernels; ``num_splits`` 0 picks the count (see ``choose_num_splits``)."""
    batch, n_heads, head_dim = q.shape
    block_size, n_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv_heads
    if num_splits == 0:
        capacity = block_table.shape[1] * block_size
        num_splits = choose_num_splits(batch, n_kv_heads, capacity, num_sms(q.device))
    lengths = lengths.contiguous()
    out = torch.empty((batch, n_heads, head_dim), device=q.device, dtype=q.dtype)
    if batch == 0:
        return out
    split = num_splits > 1
    if split:
        out_partial = torch.empty((batch, n_heads, num_splits, head_dim), device=q.device, dtype=torch.float32)
        lse_partial = torch.empty((batch, n_heads, num_splits), device=q.device, dtype=torch.float32)
    else:  # the first kernel writes `out` directly; the partial pointers are unused
        out_partial = lse_partial = out
    kernels = _kernels(interpreting())
    pdl = _utils.pdl()  # programmatic dependent launch (kernels._utils.PDL): both kernels let the next one start
    kernels.split[(num_splits, *grid_yz(batch * n_kv_heads))](
        q, k_cache, v_cache, block_table, lengths, out_partial, lse_partial, out,
        q.stride(0), q.stride(1), q.stride(2),
        *k_cache.stride(), *v_cache.stride(),
        block_table.stride(0), block_table.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        block_size, n_kv_heads, group, num_splits, scale * LOG2E, batch * n_kv_heads,
        HEAD_DIM=head_dim, BLOCK_G=max(16, next_power_of_2(group)), SPLIT=split, PDL=pdl,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if split:
        kernels.merge[(batch * n_heads,)](
            out_partial, lse_partial, out, out.stride(0), out.stride(1), out.stride(2), n_heads, num_splits,
            HEAD_DIM=head_dim, BLOCK_S=next_power_of_2(num_splits), PDL=pdl,
        )
    return out


def _decode_fake(q, k_cache, v_cache, block_table, lengths, scale, num_splits):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# A custom op, so a torch.compile'd decode step treats the launcher as one opaque call.
_decode = kernel_op(
    "decode_attention",
    "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor lengths, float scale, "
    "int num_splits) -> Tensor",
    _decode_impl, _decode_fake, public="decode_attention",
)


def choose_num_splits(batch: int, n_kv_heads: int, capacity: int, n_sms: int) -> int:
    """Splits per row so (splits x batch x kv heads) programs give each SM a few, >= 128 keys each.

    ``capacity`` is the most keys a row can hold, ``max_blocks * block_size`` (not the
    actual lengths, which live on the GPU). Once the rows alone give every SM a program, one
    split: at B32 x 8 KV heads on an H100 (and an H200) one split with 128-key tiles beat the
    best two-split config by 4% (bench/RESULTS.md), the partials' writes and the merge launch saved.
    """
    programs = max(1, batch * n_kv_heads)
    if programs >= n_sms:
        return 1
    splits = round(_PROGRAMS_PER_SM * n_sms / programs)
    splits = min(splits, capacity // _MIN_KEYS_PER_SPLIT, _MAX_SPLITS)
    return max(1, splits)


def _resolve_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0.0:
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    return scale


def _check_inputs(q, k_cache, v_cache, block_table, lengths, num_splits, reference: bool) -> None:
    dtypes = FLOAT_DTYPES + ((torch.float64,) if reference else ())
    check_tensor("q", q, 3, dtypes)
    check_tensor("k_cache", k_cache, 4, dtypes)
    check_tensor("v_cache", v_cache, 4, dtypes)
    check_tensor("block_table", block_table, 2, _INDEX_DTYPES)
    check_tensor("lengths", lengths, 1, _INDEX_DTYPES)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must have one shape")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"q, k_cache, v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    batch, n_heads, head_dim = q.shape
    num_blocks, block_size, n_kv_heads, cache_dim = k_cache.shape
    max_blocks = block_table.shape[1]
    if cache_dim != head_dim:
        raise ValueError(
            f"q head dim {head_dim} != cache head dim {cache_dim} "
            "(caches are (num_blocks, block_size, n_kv_head, head_dim))"
        )
    if n_kv_heads < 1 or n_heads % n_kv_heads != 0:
        raise ValueError(
            f"n_head ({n_heads}) must be a positive multiple of the cache's n_kv_head ({n_kv_heads}); "
            "caches are (num_blocks, block_size, n_kv_head, head_dim)"
        )
    if not reference and head_dim not in _HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} is not supported by the Triton kernel; allowed: {_HEAD_DIMS}")
    if block_table.shape[0] != batch or lengths.shape[0] != batch:
        raise ValueError(
            f"block_table {tuple(block_table.shape)} and lengths {tuple(lengths.shape)} must be "
            f"({batch}, max_blocks) and ({batch},) to match q"
        )
    if batch and (num_blocks < 1 or block_size < 1 or max_blocks < 1):
        raise ValueError(
            f"empty cache or block table: k_cache {tuple(k_cache.shape)}, block_table {tuple(block_table.shape)}"
        )
    if num_splits is not None and not (1 <= int(num_splits) <= _MAX_SPLITS):
        raise ValueError(f"num_splits must be None or in [1, {_MAX_SPLITS}], got {num_splits}")
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, lengths=lengths)
    # Value checks only where they cost no GPU sync (and not while torch.compile traces: data-dependent)
    if lengths.device.type == "cpu" and batch and not torch.compiler.is_compiling():
        capacity = max_blocks * block_size
        if bool((lengths < 1).any()) or bool((lengths > capacity).any()):
            raise ValueError(
                f"lengths must be in [1, max_blocks * block_size = {max_blocks} * {block_size} = {capacity}], "
                f"got {lengths.tolist()}"
            )
        used_blocks = (lengths.long() + block_size - 1) // block_size  # (B,)
        used = torch.arange(max_blocks)[None, :] < used_blocks[:, None]  # (B, max_blocks)
        bad = used & ((block_table < 0) | (block_table >= num_blocks))
        if bool(bad.any()):
            row, col = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"block_table[{row}, {col}] = {int(block_table[row, col])} is a used block id outside "
                f"[0, num_blocks={num_blocks})"
            )


# ----------------------------------------------------------------------------- kernels
# `tl` (triton.language) is bound into this module by `jit_kernel` when the kernels
# are first built; importing this module never imports triton.


def _decode_split_kernel(
    Q, K, V, BlockTable, Lengths, OutPartial, LsePartial, Out,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kp, stride_kh, stride_kd,
    stride_vb, stride_vp, stride_vh, stride_vd,
    stride_tb, stride_tn,
    stride_ob, stride_oh, stride_od,
    block_size, n_kv_heads, group_size, num_splits, qk_scale, n_bh,
    HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):
    # Program (split, b * Hkv + kv head): online softmax over one part of row b's keys
    # for all query heads of the kv head's group at once (rows of a (BLOCK_G, D) tile).
    qk_scale = tl.cast(qk_scale, tl.float32)  # a float argument is fp64 under torch.compile's launcher
    split = tl.program_id(0)
    # (batch x kv heads) over grid axes 1 and 2: axis 1 stops at 65535 (see _utils.grid_yz)
    off_bh = tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)
    if off_bh >= n_bh:
        return
    off_b = (off_bh // n_kv_heads).to(tl.int64)
    off_hk = (off_bh % n_kv_heads).to(tl.int64)
    length = tl.load(Lengths + off_b).to(tl.int32)
    # Equal parts of this row's length, rounded up to whole key tiles.
    split_len = (length + num_splits - 1) // num_splits
    split_len = (split_len + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, length)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    g_ok = offs_g < group_size
    heads = off_hk * group_size + offs_g  # (BLOCK_G,) query heads of this group
    q = tl.load(Q + off_b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_ok[:, None], other=0.0)  # (BLOCK_G, D)
    table_row = BlockTable + off_b * stride_tb
    k_head = K + off_hk * stride_kh
    v_head = V + off_hk * stride_vh

    m_i = tl.zeros([BLOCK_G], dtype=tl.float32) - 1.0e30  # finite: empty splits stay NaN-free
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        pos = start_n + offs_n  # cache positions of this key tile (may straddle blocks)
        pos_ok = pos < hi
        blk = tl.load(table_row + (pos // block_size) * stride_tn, mask=pos_ok, other=0).to(tl.int64)
        in_blk = (pos % block_size).to(tl.int64)
        k_rows = blk * stride_kb + in_blk * stride_kp  # (BLOCK_N,) int64 offsets into the pool
        v_rows = blk * stride_vb + in_blk * stride_vp
        k = tl.load(k_head + k_rows[:, None] + offs_d[None, :] * stride_kd,
                    mask=pos_ok[:, None], other=0.0)  # (BLOCK_N, D)
        v = tl.load(v_head + v_rows[:, None] + offs_d[None, :] * stride_vd,
                    mask=pos_ok[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_G, BLOCK_N), log2 units
        qk = tl.where(pos_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    if PDL:  # the keys are read: the output projection, launched with programmatic dependent launch, may start
        tl.extra.cuda.gdc_launch_dependents()
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    if SPLIT:
        # Partials are (B, H, num_splits, D) and (B, H, num_splits), contiguous.
        row = (off_b * n_kv_heads * group_size + heads) * num_splits + split  # (BLOCK_G,)
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(LsePartial + row, lse, mask=g_ok)
        tl.store(OutPartial + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None])
    else:
        tl.store(Out + off_b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 acc.to(Out.dtype.element_ty), mask=g_ok[:, None])


def _decode_merge_kernel(
    OutPartial, LsePartial, Out, stride_ob, stride_oh, stride_od, n_heads, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    # Program b * H + h: weight each split's normalized output by exp2(lse_s - max lse).
    if PDL:  # the output projection launched with programmatic dependent launch may start (kernels._utils.PDL)
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    off_b = row // n_heads
    off_h = row % n_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < num_splits
    lse = tl.load(LsePartial + row * num_splits + offs_s, mask=s_ok, other=float("-inf"))  # (BLOCK_S,)
    weights = tl.exp2(lse - tl.max(lse, 0))  # empty splits (-inf) weigh 0
    part = tl.load(OutPartial + (row * num_splits + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                   mask=s_ok[:, None], other=0.0)  # (BLOCK_S, D)
    out = tl.sum(part * weights[:, None], 0) / tl.sum(weights, 0)
    tl.store(Out + off_b * stride_ob + off_h * stride_oh + offs_d * stride_od, out.to(Out.dtype.element_ty))


def _split_configs() -> list:
    # (32, 4, 2) and (128, 4, 2) were the fastest at B1 L8192 and B32 L2048 on an H200
    # (bench/decode_configs.py, bench/RESULTS.md)
    shapes = [(64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (32, 4, 4), (64, 8, 2), (32, 4, 2), (128, 4, 2)]
    return [config(BLOCK_N=n, num_warps=w, num_stages=s) for n, w, s in shapes]


def _prune_split_configs(configs, named_args, **kwargs):
    """Drop configs whose pipelined K/V tiles would not fit in ~200 KB of shared memory."""
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    itemsize = named_args["K"].element_size()
    fits = [c for c in configs if c.num_stages * 2 * c.kwargs["BLOCK_N"] * head_dim * itemsize <= 200 * 1024]
    return fits or [min(configs, key=lambda c: c.num_stages * c.kwargs["BLOCK_N"])]


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    """Jit the decode kernels once per process and mode (compiled vs interpreted)."""
    del interpret  # cache key only: jit_kernel reads the mode itself
    # Tuned once per head dim / group tile / split mode: batch size and lengths change
    # every serving step and must not trigger re-tuning, nor (not specialized on the counts
    # that follow the batch and the block table's width) a compile for each batch a step outside the
    # CUDA graphs meets.
    return SimpleNamespace(
        split=jit_kernel(
            _decode_split_kernel, _split_configs(), config(BLOCK_N=16), key=["HEAD_DIM", "BLOCK_G", "SPLIT"],
            prune=_prune_split_configs, do_not_specialize=("stride_tb", "num_splits", "n_bh"),
        ),
        merge=jit_kernel(_decode_merge_kernel, [config(num_warps=4, num_stages=1)], config(num_warps=4),
                         key=["HEAD_DIM", "BLOCK_S"], do_not_specialize=("num_splits",)),
    )
