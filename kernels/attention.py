"""Flash attention forward + backward for prefill and training (dense and varlen).

API::

    flash_attention(q, k, v, causal=True, scale=None) -> out
        q (B, H, T, D), k/v (B, Hkv, S, D) -> out (B, H, T, D); differentiable.
    flash_attention_packed(qkv, n_kv_heads, causal=True, scale=None) -> out
        qkv (B, T, H + 2 Hkv, D), one fused projection's query, key and value heads (as
        FlashAttention's qkvpacked functions) -> out (B, T, H, D); differentiable. The
        backward writes dQ, dK and dV straight into one (B, T, H + 2 Hkv, D) gradient, so no
        kernel assembles the projection's gradient from three tensors (training without
        rotary embedding, such as GPT-2).
    flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           causal=True, scale=None) -> out
        packed q (total_q, H, D), k/v (total_k, Hkv, D), cu_seqlens_* (B + 1,) int32
        cumulative offsets -> out (total_q, H, D); differentiable. Several prompts of
        different lengths in one launch.
    flash_attention_reference(...), flash_attention_varlen_reference(...)
        plain torch, fp32 math (fp64 for fp64 inputs); the CPU path.
    available(device) -> bool

Semantics shared by both paths: ``softmax(q k^T * scale) v`` with ``scale`` defaulting
to ``1/sqrt(D)``; grouped-query attention when H is a multiple of Hkv (query head h
reads kv head ``h // (H // Hkv)``, no K/V repeat in memory). ``causal`` masks
bottom-right aligned: with T queries and S keys, query i sits at position S - T + i
and sees keys 0..S-T+i (the prefill-after-cache convention; equals ``is_causal`` of
SDPA only when T == S). A query that sees no key (T > S) outputs zeros.

The Triton kernels follow FlashAttention-2 and the Triton fused-attention tutorial:
fp16/bf16/fp32 in, fp32 accumulate, online softmax in base 2 (``exp2`` with
``scale * log2(e)`` folded into one multiplier), causal masking only on the diagonal
key blocks, bounds masks only on the last partial block, causal query blocks
scheduled heaviest-first. Head dims: powers of two 16..256. The forward stores the
row log-sum-exp; the backward runs a dK/dV kernel (one program per key block and kv
head, looping over the query heads of its group, so GQA reduces dK/dV in registers)
and a dQ kernel. Dense and varlen share the kernels (``VARLEN`` constexpr switch).
The Triton code is in ``kernels/attention_triton.py``; this module holds the API, the
references, the launchers and the autotune configs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from types import SimpleNamespace

import torch

from kernels import attention_triton
from kernels._utils import (
    FLOAT_DTYPES,
    LOG2E,
    check_same_device,
    check_tensor,
    check_triton_device,
    config,
    grid_yz,
    interpreting,
    jit_helpers,
    jit_kernel,
    kernel_op,
    next_power_of_2,
    triton_available,
)

_HEAD_DIMS = (16, 32, 64, 128, 256)


def available(device: torch.device | str) -> bool:
    """True when the Triton attention kernels can run on ``device``."""
    return triton_available(device)


# ----------------------------------------------------------------------------- references


def flash_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """Plain-torch attention with the same semantics as ``flash_attention``."""
    _check_dense(q, k, v, reference=True)
    scale = _resolve_scale(scale, q.shape[-1])
    batch, n_heads, seqlen_q, head_dim = q.shape
    n_kv_heads, seqlen_k = k.shape[1], k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(compute).reshape(batch, n_kv_heads, n_heads // n_kv_heads, seqlen_q, head_dim)  # (B, Hkv, G, T, D)
    kf = k.to(compute)[:, :, None]  # (B, Hkv, 1, S, D)
    vf = v.to(compute)[:, :, None]  # (B, Hkv, 1, S, D)
    scores = (qf @ kf.transpose(-1, -2)) * scale  # (B, Hkv, G, T, S)
    if causal:
        q_pos = torch.arange(seqlen_q, device=q.device)[:, None] + (seqlen_k - seqlen_q)
        visible = torch.arange(seqlen_k, device=q.device)[None, :] <= q_pos  # (T, S)
        # finfo.min, not -inf: a query with no visible key must give 0, not NaN.
        scores = scores.masked_fill(~visible, torch.finfo(compute).min)
        probs = torch.softmax(scores, dim=-1) * visible.any(-1, keepdim=True)
    else:
        probs = torch.softmax(scores, dim=-1)
    out = probs @ vf  # (B, Hkv, G, T, D)
    return out.reshape(batch, n_heads, seqlen_q, head_dim).to(q.dtype)


def flash_attention_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain-torch varlen attention: the dense reference on each packed sequence."""
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, reference=True)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for i in range(len(bounds_q) - 1):
        qi = q[bounds_q[i] : bounds_q[i + 1]].transpose(0, 1)[None]  # (1, H, T_i, D)
        ki = k[bounds_k[i] : bounds_k[i + 1]].transpose(0, 1)[None]  # (1, Hkv, S_i, D)
        vi = v[bounds_k[i] : bounds_k[i + 1]].transpose(0, 1)[None]
        if qi.shape[2] == 0:
            continue
        if ki.shape[2] == 0:  # no keys at all: zeros, like a fully masked row
            outs.append(torch.zeros_like(qi[0].transpose(0, 1)))
            continue
        outs.append(flash_attention_reference(qi, ki, vi, causal, scale)[0].transpose(0, 1))
    # Packed rows past cu_seqlens_q[-1] belong to no sequence: zeros, as in the kernel.
    outs.append(q.new_zeros((q.shape[0] - bounds_q[-1], *q.shape[1:])))
    return torch.cat(outs, dim=0)


# ----------------------------------------------------------------------------- Triton path


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """Fused attention (Triton) over (B, H, T, D) queries and (B, Hkv, S, D) keys/values."""
    _check_dense(q, k, v, reference=False)
    check_triton_device("flash_attention", q.device)
    scale = _resolve_scale(scale, q.shape[-1])
    return _FlashAttention.apply(q, k, v, None, None, q.shape[2], k.shape[2], bool(causal), scale)


def flash_attention_packed(
    qkv: torch.Tensor, n_kv_heads: int, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """Fused attention over one packed projection: qkv (B, T, H + 2 Hkv, D) -> out (B, T, H, D)."""
    check_tensor("qkv", qkv, 4)
    n_kv_heads = int(n_kv_heads)
    n_heads = qkv.shape[2] - 2 * n_kv_heads
    if n_kv_heads < 1 or n_heads < n_kv_heads:
        raise ValueError(f"qkv has {qkv.shape[2]} heads: not H + 2 * {n_kv_heads} with H >= {n_kv_heads} "
                         "(qkv is (B, T, H + 2 Hkv, D))")
    _check_dense(*_unpack(qkv, n_heads, n_kv_heads), reference=False)
    check_triton_device("flash_attention_packed", qkv.device)
    scale = _resolve_scale(scale, qkv.shape[-1])
    return _FlashAttentionPacked.apply(qkv, n_heads, n_kv_heads, bool(causal), scale)


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Fused attention over packed sequences: q (total_q, H, D), k/v (total_k, Hkv, D)."""
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, reference=False)
    check_triton_device("flash_attention_varlen", q.device)
    scale = _resolve_scale(scale, q.shape[-1])
    cu_q = cu_seqlens_q.to(torch.int32).contiguous()
    cu_k = cu_seqlens_k.to(torch.int32).contiguous()
    return _FlashAttention.apply(q, k, v, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k), bool(causal), scale)


def _resolve_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0.0:
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    return scale


def _check_common(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, reference: bool, layout: str) -> None:
    dtypes = FLOAT_DTYPES + ((torch.float64,) if reference else ())
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in dtypes:
        raise ValueError(f"dtype {q.dtype} is not supported; use one of {[str(d) for d in dtypes]}")
    n_heads, n_kv_heads = q.shape[-2 if layout == "varlen" else 1], k.shape[-2 if layout == "varlen" else 1]
    if n_kv_heads < 1 or n_heads % n_kv_heads != 0:
        raise ValueError(f"n_head ({n_heads}) must be a positive multiple of n_kv_head ({n_kv_heads})")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"q head dim {head_dim} != k/v head dim {k.shape[-1]}")
    if not reference and head_dim not in _HEAD_DIMS:
        raise ValueError(
            f"head dim {head_dim} is not supported by the Triton kernel; allowed: {_HEAD_DIMS} "
            "(use flash_attention_reference otherwise)"
        )
    check_same_device(q=q, k=k, v=v)


def _check_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, reference: bool) -> None:
    check_tensor("q", q, 4)
    check_tensor("k", k, 4)
    check_tensor("v", v, 4)
    _check_common(q, k, v, reference, "dense")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"q batch {q.shape[0]} != k/v batch {k.shape[0]} (q (B, H, T, D), k/v (B, Hkv, S, D))")
    if q.shape[2] < 1 or k.shape[2] < 1:
        raise ValueError(f"sequence lengths must be >= 1, got T={q.shape[2]} S={k.shape[2]}")


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, reference: bool) -> None:
    check_tensor("q", q, 3)
    check_tensor("k", k, 3)
    check_tensor("v", v, 3)
    _check_common(q, k, v, reference, "varlen")
    check_tensor("cu_seqlens_q", cu_seqlens_q, 1, (torch.int32, torch.int64))
    check_tensor("cu_seqlens_k", cu_seqlens_k, 1, (torch.int32, torch.int64))
    if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.shape[0] < 2:
        raise ValueError(
            "cu_seqlens_q and cu_seqlens_k must both have shape (B + 1,) with B >= 1, got "
            f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}"
        )
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if int(value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    check_same_device(q=q, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    # Offsets are only checked where that costs no GPU->CPU sync.
    for name, cu, total, longest in (
        ("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
        ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k),
    ):
        if cu.device.type != "cpu":
            continue
        lengths = cu[1:] - cu[:-1]
        if int(cu[0]) != 0 or bool((lengths < 0).any()) or int(cu[-1]) > total:
            raise ValueError(f"{name} must start at 0, be non-decreasing and end <= {total}, got {cu.tolist()}")
        if int(lengths.max()) > int(longest):
            name_max = "max_seqlen_q" if name.endswith("q") else "max_seqlen_k"
            raise ValueError(f"{name_max}={longest} is smaller than the longest sequence ({int(lengths.max())})")


def _strides(x: torch.Tensor, varlen: bool) -> tuple[int, int, int, int]:
    """(batch, head, token, dim) strides in kernel order; batch stride 0 when packed."""
    if varlen:  # (total, heads, D)
        return 0, x.stride(1), x.stride(0), x.stride(2)
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


_MIN_BUCKET = 16


def _bucket(n: int) -> int:
    # Autotune key: lengths bucketed to powers of two so each prompt length does not re-tune.
    return max(_MIN_BUCKET, next_power_of_2(n))


def length_buckets(up_to: int) -> list[int]:
    """One length in each autotuning bucket that lengths 1..``up_to`` fall in: the powers of two from 16
    below ``up_to``, then ``up_to`` itself (it tunes its bucket, the next power of two, as well as any
    length in it). A launch in a bucket not seen before tunes the kernels (``warm_up_causal``)."""
    buckets, n = [], _MIN_BUCKET
    while n < up_to:
        buckets.append(n)
        n *= 2
    return buckets + [up_to]


def warm_up_causal(n_heads: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
                   max_len: int, max_queries: int | None = None) -> list[tuple[int, int]]:
    """Run the causal forward once for every pair of query and key length buckets, keys up to ``max_len`` and
    queries up to ``max_queries`` (default ``max_len``) and no more than the keys: the pairs an inference server
    meets (prefill of whole prompts, of a prompt's chunks after the first, after a prefix-cache hit). Returns
    the (queries, keys) lengths run.

    The forward is tuned per pair on its first launch (every config compiled, then timed): a server that
    has not met a pair would stall its running streams for it. The configs compile once per process (or
    come from Triton's disk cache), each further pair costs only their timing, and the choices are cached
    on disk too. Random inputs: only the shapes, dtype, head counts and head dim matter."""
    check_triton_device("warm_up_causal", torch.device(device))
    max_queries = max_len if max_queries is None else max_queries
    pairs = [(t, s) for s in length_buckets(max_len) for t in length_buckets(min(s, max_queries))]
    with torch.no_grad():
        for t, s in pairs:
            q = torch.randn(1, n_heads, t, head_dim, device=device, dtype=dtype)
            k, v = torch.randn(2, 1, n_kv_heads, s, head_dim, device=device, dtype=dtype)
            flash_attention(q, k, v, causal=True)
    return pairs


@dataclasses.dataclass(frozen=True)
class _Shapes:
    """Problem sizes in kernel terms; seqlen_* are the longest lengths when packed."""

    batch: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    seqlen_q: int
    seqlen_k: int
    lse_shape: tuple[int, ...]  # (B, H, T) dense, (H, total_q) packed
    lse_strides: tuple[int, int]  # (batch, head) strides of LSE / delta; batch is 0 when packed

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    @staticmethod
    def of(q: torch.Tensor, k: torch.Tensor, cu_q: torch.Tensor | None, max_q: int, max_k: int) -> _Shapes:
        if cu_q is None:
            batch, n_heads, seqlen_q, head_dim = q.shape
            lse_shape, lse_strides = (batch, n_heads, seqlen_q), (n_heads * seqlen_q, seqlen_q)
        else:
            total_q, n_heads, head_dim = q.shape
            batch, seqlen_q = cu_q.shape[0] - 1, max_q
            lse_shape, lse_strides = (n_heads, total_q), (0, total_q)
        return _Shapes(batch, n_heads, k.shape[-3 if cu_q is None else -2], head_dim, seqlen_q, max_k,
                       lse_shape, lse_strides)


def _forward_impl(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    """Launch the forward: (out, lse), lse fp32 in log2 units, shaped per ``_Shapes.lse_shape``."""
    varlen = cu_q is not None
    shapes = _Shapes.of(q, k, cu_q, max_q, max_k)
    # Packed tokens past cu_seqlens_q[-1] belong to no sequence: zeros, not garbage.
    out = torch.zeros_like(q) if varlen else torch.empty_like(q)
    lse = torch.empty(shapes.lse_shape, device=q.device, dtype=torch.float32)
    if shapes.batch > 0 and shapes.seqlen_q > 0:
        kernels = _kernels(interpreting())
        n_bh = shapes.batch * shapes.n_heads
        grid = lambda meta: (_cdiv(shapes.seqlen_q, meta["BLOCK_M"]), *grid_yz(n_bh))  # noqa: E731
        kernels.forward[grid](
            q, k, v, out, lse, cu_q if varlen else lse, cu_k if varlen else lse,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
            *shapes.lse_strides, shapes.seqlen_q, shapes.seqlen_k, shapes.n_heads, shapes.group,
            scale * LOG2E, n_bh, _bucket(shapes.seqlen_q), _bucket(shapes.seqlen_k),
            CAUSAL=causal, VARLEN=varlen, HEAD_DIM=shapes.head_dim, DOT_PRECISION=_dot_precision(q.dtype),
        )
    return out, lse


def _forward_fake(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    shapes = _Shapes.of(q, k, cu_q, max_q, max_k)
    return torch.empty_like(q), q.new_empty(shapes.lse_shape, dtype=torch.float32)


def _backward_impl(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    """Launch the backward: (dq, dk, dv)."""
    new_grad = torch.zeros_like if cu_q is not None else torch.empty_like  # packed padding gets zero gradient
    dq, dk, dv = new_grad(q), new_grad(k), new_grad(v)
    _launch_backward(grad_out, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, causal, scale)
    return dq, dk, dv


def _launch_backward(grad_out, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, causal, scale) -> None:
    """The backward's three launches, writing dq, dk and dv (any strides, head dim contiguous)."""
    shapes = _Shapes.of(q, k, cu_q, max_q, max_k)
    varlen = cu_q is not None
    if shapes.batch == 0 or shapes.seqlen_q == 0 or shapes.seqlen_k == 0:
        return
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    kernels = _kernels(interpreting())
    cu_q_arg, cu_k_arg = (cu_q, cu_k) if varlen else (lse, lse)
    delta = torch.empty_like(lse)  # rowsum(dO * O), fp32, laid out like lse
    n_bh, n_bhk = shapes.batch * shapes.n_heads, shapes.batch * shapes.n_kv_heads
    rows_grid = lambda meta: (_cdiv(shapes.seqlen_q, meta["BLOCK_M"]), *grid_yz(n_bh))  # noqa: E731
    kernels.preprocess[rows_grid](
        out, grad_out, delta, cu_q_arg, *_strides(out, varlen), *_strides(grad_out, varlen),
        *shapes.lse_strides, shapes.seqlen_q, shapes.n_heads, n_bh, VARLEN=varlen, HEAD_DIM=shapes.head_dim,
    )
    common = dict(CAUSAL=causal, VARLEN=varlen, HEAD_DIM=shapes.head_dim, DOT_PRECISION=_dot_precision(q.dtype))
    kv_grid = lambda meta: (_cdiv(shapes.seqlen_k, meta["BLOCK_N"]), *grid_yz(n_bhk))  # noqa: E731
    kernels.dkdv[kv_grid](
        q, k, v, grad_out, dk, dv, lse, delta, cu_q_arg, cu_k_arg,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(grad_out, varlen),
        *_strides(dk, varlen), *_strides(dv, varlen), *shapes.lse_strides,
        shapes.seqlen_q, shapes.seqlen_k, shapes.n_kv_heads, shapes.group, scale, scale * LOG2E, n_bhk,
        _bucket(shapes.seqlen_q), _bucket(shapes.seqlen_k), **common,
    )
    kernels.dq[rows_grid](
        q, k, v, grad_out, dq, lse, delta, cu_q_arg, cu_k_arg,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(grad_out, varlen),
        *_strides(dq, varlen), *shapes.lse_strides,
        shapes.seqlen_q, shapes.seqlen_k, shapes.n_heads, shapes.group, scale, scale * LOG2E, n_bh,
        _bucket(shapes.seqlen_q), _bucket(shapes.seqlen_k), **common,
    )


def _backward_fake(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# Custom ops, so torch.compile (training) treats each launcher as one opaque call.
_forward = kernel_op(
    "flash_attention_forward",
    "(Tensor q, Tensor k, Tensor v, Tensor? cu_q, Tensor? cu_k, SymInt max_q, SymInt max_k, bool causal, "
    "float scale) -> (Tensor, Tensor)",
    _forward_impl, _forward_fake, public="flash_attention",
)
_backward = kernel_op(
    "flash_attention_backward",
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? cu_q, Tensor? cu_k, "
    "SymInt max_q, SymInt max_k, bool causal, float scale) -> (Tensor, Tensor, Tensor)",
    _backward_impl, _backward_fake, public="flash_attention",
)


def _unpack(qkv: torch.Tensor, n_heads: int, n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views (B, H, T, D), (B, Hkv, T, D), (B, Hkv, T, D) of a packed (B, T, H + 2 Hkv, D) tensor."""
    q, k, v = qkv.split((n_heads, n_kv_heads, n_kv_heads), dim=2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _backward_packed_impl(grad_out, qkv, out, lse, n_heads: int, n_kv_heads: int, causal: bool, scale: float):
    """The backward of packed attention: d(qkv), one (B, T, H + 2 Hkv, D) tensor the kernels write into."""
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    q, k, v = _unpack(qkv, n_heads, n_kv_heads)
    seqlen = qkv.shape[1]
    _launch_backward(grad_out, q, k, v, out, lse, *_unpack(dqkv, n_heads, n_kv_heads), None, None, seqlen, seqlen,
                     causal, scale)
    return dqkv


def _backward_packed_fake(grad_out, qkv, out, lse, n_heads, n_kv_heads, causal, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


_backward_packed = kernel_op(
    "flash_attention_packed_backward",
    "(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int n_heads, int n_kv_heads, bool causal, float scale) "
    "-> Tensor",
    _backward_packed_impl, _backward_packed_fake, public="flash_attention_packed",
)


class _FlashAttentionPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, n_heads, n_kv_heads, causal, scale):
        seqlen = qkv.shape[1]
        out, lse = _forward(*_unpack(qkv, n_heads, n_kv_heads), None, None, seqlen, seqlen, causal, scale)
        ctx.save_for_backward(qkv, out, lse)
        ctx.n_heads, ctx.n_kv_heads, ctx.causal, ctx.scale = n_heads, n_kv_heads, causal, scale
        return out.transpose(1, 2)  # (B, T, H, D)

    @staticmethod
    def backward(ctx, grad_out):
        qkv, out, lse = ctx.saved_tensors
        dqkv = _backward_packed(grad_out.transpose(1, 2), qkv, out, lse, ctx.n_heads, ctx.n_kv_heads, ctx.causal,
                                ctx.scale)
        return dqkv, None, None, None, None


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        out, lse = _forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.max_q, ctx.max_k, ctx.causal, ctx.scale = max_q, max_k, causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = _backward(grad_out, q, k, v, out, lse, cu_q, cu_k, ctx.max_q, ctx.max_k, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None, None, None, None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (TF32 would lose ~3 digits); 16-bit inputs ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------- configs
# (BLOCK_M, BLOCK_N, num_warps, num_stages, largest head dim) for H100, 16-bit inputs. The
# head-dim limits drop the configs that spill registers heavily (dK/dV accumulators make
# the dkdv kernel the tightest). `python bench/compile_check.py` compiles them all for
# sm_90: every config fits in shared memory, and spills are rare and small (at most 240 B
# per thread with triton 3.6, mostly dkdv; bench/RESULTS.md). The autotuner's timings
# decide among the configs that are left.
_FWD_CONFIGS = (
    (128, 64, 8, 3, 128), (128, 64, 8, 4, 128), (128, 128, 8, 3, 64), (128, 32, 8, 3, 128),
    (64, 64, 4, 3, 128), (64, 64, 4, 4, 128), (64, 32, 4, 4, 128), (64, 128, 4, 3, 64),
    (64, 32, 8, 2, 256), (32, 32, 4, 3, 256), (64, 16, 4, 2, 256),
)
_DKDV_CONFIGS = (
    (32, 128, 8, 3, 64), (64, 128, 8, 3, 64), (32, 64, 4, 4, 64), (16, 64, 4, 2, 64),
    (32, 64, 8, 3, 128), (16, 64, 8, 2, 256), (16, 128, 8, 2, 128), (16, 32, 4, 2, 256),
)
_DQ_CONFIGS = (
    (128, 32, 8, 3, 128), (128, 64, 8, 3, 128), (64, 32, 4, 3, 128), (64, 32, 4, 4, 128),
    (64, 64, 4, 3, 128), (128, 32, 8, 2, 256), (64, 32, 8, 2, 256), (64, 16, 4, 2, 256),
    (32, 32, 4, 3, 256),
)
# fp32 inputs: exact fp32 dots (no tensor cores) and twice the bytes per tile, so the
# 16-bit tiles spill kilobytes per thread (every forward config at D=128). These smaller
# tiles were picked from a compile sweep of 48 shapes per kernel at D=64 and D=128
# (sm_90, triton 3.6) as the ones that do not spill; D=256 keeps only the smallest tile.
# Rechecked at every head dim: at most 280 B spill, except three single-stage dkdv
# tiles at D=32 (up to 1.6 KB; none at D=64), bench/RESULTS.md.
_FWD_CONFIGS_FP32 = (
    (64, 32, 8, 2, 64), (64, 16, 4, 2, 64), (32, 32, 4, 2, 64), (32, 64, 8, 2, 128), (16, 64, 4, 2, 128),
    (32, 16, 4, 3, 128), (16, 16, 4, 2, 256),
)
_DKDV_CONFIGS_FP32 = (
    (64, 64, 8, 1, 64), (64, 32, 4, 1, 64), (32, 64, 4, 1, 64), (32, 16, 4, 2, 128), (16, 32, 4, 1, 128),
    (16, 16, 4, 3, 256),
)
_DQ_CONFIGS_FP32 = (
    (64, 32, 8, 2, 128), (64, 16, 4, 2, 128), (32, 64, 8, 2, 128), (32, 32, 4, 3, 128), (32, 16, 4, 3, 128),
    (16, 64, 4, 2, 128), (16, 16, 4, 2, 256),
)


def _configs(*tables) -> list:
    shapes = dict.fromkeys((m, n, w, s) for table in tables for m, n, w, s, _ in table)  # ordered, no repeats
    return [config(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _pruner(table, fp32_table):
    """Config filter for one kernel: the dtype's table and its head-dim limits, tiles no longer than the sequences."""
    limits = {dtype: {(m, n, w, s): d for m, n, w, s, d in t} for dtype, t in (("16", table), ("32", fp32_table))}

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        head_dim, bucket_q, bucket_k = args["HEAD_DIM"], args["SEQ_BUCKET_Q"], args["SEQ_BUCKET_K"]
        max_head_dim = limits["32" if args["Q"].dtype == torch.float32 else "16"]
        fits = [
            c for c in configs
            if head_dim <= max_head_dim.get((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages), 0)
        ]
        short = [c for c in fits if c.kwargs["BLOCK_M"] <= bucket_q and c.kwargs["BLOCK_N"] <= bucket_k]
        return short or [min(fits, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    return prune


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    """Jit the attention kernels once per process and mode (compiled vs interpreted)."""
    del interpret  # cache key only: jit_kernel reads the mode itself
    jit_helpers(attention_triton, attention_triton.HELPERS)
    key = ["SEQ_BUCKET_Q", "SEQ_BUCKET_K", "HEAD_DIM", "CAUSAL", "VARLEN", "group_size"]
    # Lengths (and the LSE strides that follow them) vary with every prompt: compiled once for all of them,
    # not again for the first length that is odd, or a multiple of 16, or 1.
    lengths = ("stride_lb", "stride_lh", "seqlen_q", "seqlen_k", "n_bh")
    # Interpreter tiles differ between M and N so tiny tests cross unaligned block edges.
    return SimpleNamespace(
        forward=jit_kernel(
            attention_triton.attn_fwd_kernel, _configs(_FWD_CONFIGS, _FWD_CONFIGS_FP32),
            config(BLOCK_M=32, BLOCK_N=16), key, _pruner(_FWD_CONFIGS, _FWD_CONFIGS_FP32), do_not_specialize=lengths,
        ),
        preprocess=jit_kernel(
            attention_triton.attn_bwd_preprocess_kernel, [config(BLOCK_M=32, num_warps=8)], config(BLOCK_M=32),
            key=["HEAD_DIM"], do_not_specialize=("stride_lb", "stride_lh", "seqlen_q", "n_bh"),
        ),
        dkdv=jit_kernel(
            attention_triton.attn_bwd_dkdv_kernel, _configs(_DKDV_CONFIGS, _DKDV_CONFIGS_FP32),
            config(BLOCK_M=16, BLOCK_N=32), key, _pruner(_DKDV_CONFIGS, _DKDV_CONFIGS_FP32), do_not_specialize=lengths,
        ),
        dq=jit_kernel(
            attention_triton.attn_bwd_dq_kernel, _configs(_DQ_CONFIGS, _DQ_CONFIGS_FP32),
            config(BLOCK_M=32, BLOCK_N=16), key, _pruner(_DQ_CONFIGS, _DQ_CONFIGS_FP32), do_not_specialize=lengths,
        ),
    )
