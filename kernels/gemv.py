"""Matrix-vector products for decode steps of a few rows, with the norm or SwiGLU before them fused in.

API::

    gemv(x, weight) -> (M, N)                                    # x (M, K) @ weight (N, K)^T
    rmsnorm_gemv(x, residual, norm_weight, weight, eps=1e-5) -> (y, summed)
                                                                  # RMSNorm(residual + x) @ weight^T
    silu_mul_gemv(h, weight) -> (M, N)                           # (silu(gate) * up) @ weight^T, h (M, 2K)
    gemv_reference(...), rmsnorm_gemv_reference(...), silu_mul_gemv_reference(...)   # plain torch
    available(device) -> bool

``M`` is at most 16 (a decode step's rows); ``x``/``h``, ``residual``, ``norm_weight`` and
``weight`` share one float dtype, and the product is accumulated in fp32 and rounded once.

Why: a batch-1 decode step of the 1.1B Llama shape spends three quarters of its GPU time in
cuBLAS's matrix-vector products, which read the weights at 1.4-2.7 TB/s where a copy runs at
3.0 (the fourth GPU lease's profile, bench/RESULTS.md), and each layer's residual add + RMSNorm
and SwiGLU are kernels of their own before the products that consume them. Here one program
streams ``BLOCK_N`` weight rows over all of K (each row's loads contiguous) for every input row,
and the prologue computes the product's input on the way: the RMS statistics of ``residual + x``
(every program recomputes them from the few KB of its rows, which stay in L2; the first program
also writes the sum, the new residual stream) or ``silu(gate) * up``. Numerics follow the unfused
kernels (``kernels.norm.add_norm``, ``kernels.activation.silu_mul``): the same roundings to the
input dtype, then the product.

Status: correct on the interpreter and compiled for sm_90 offline; not yet timed on a GPU
(``bench/bench_gemv.py``; ``bench/profile_step.py --gemv`` for a whole decode step). The model's
decode steps use it only when ``Transformer.fused_gemv`` is set (``_forward_gemv``), off by default.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kernels._utils import (
    FLOAT_DTYPES,
    check_residual,
    check_same_device,
    check_tensor,
    check_triton_device,
    config,
    interpreting,
    jit_kernel,
    kernel_op,
    triton_available,
)

MAX_ROWS = 16  # one tl.dot tile of rows
_PLAIN, _RMSNORM, _SILU_MUL = 0, 1, 2


def available(device: torch.device | str) -> bool:
    """True when the Triton path can run on ``device``."""
    return triton_available(device)


# ----------------------------------------------------------------------------- references
def gemv_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    _check_inputs(x, weight, x.shape[-1])
    return F.linear(x, weight)


def rmsnorm_gemv_reference(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                           weight: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    _check_norm_inputs(x, residual, norm_weight, weight, eps)
    summed = x if residual is None else residual + x
    xf = summed.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(summed) * norm_weight
    return F.linear(normed, weight), summed


def silu_mul_gemv_reference(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    _check_inputs(h, weight, h.shape[-1] // 2, name="h")
    gate, up = h.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, weight)


# ----------------------------------------------------------------------------- public functions
def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for x (M <= 16, K) and weight (N, K) (Triton)."""
    _check_inputs(x, weight, x.shape[-1])
    check_triton_device("gemv", x.device)
    return _gemv(x, weight)


def rmsnorm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, weight: torch.Tensor,
                 eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(RMSNorm(residual + x) @ weight.T, residual + x)``; with no residual, x is the sum (Triton)."""
    _check_norm_inputs(x, residual, norm_weight, weight, eps)
    check_triton_device("rmsnorm_gemv", x.device)
    if residual is None:
        return _rmsnorm_gemv(x, norm_weight, weight, float(eps)), x
    return _add_rmsnorm_gemv(x, residual, norm_weight, weight, float(eps))


def silu_mul_gemv(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(silu(gate) * up) @ weight.T`` for h (M <= 16, 2K) = [gate; up] and weight (N, K) (Triton)."""
    _check_inputs(h, weight, h.shape[-1] // 2, name="h")
    check_triton_device("silu_mul_gemv", h.device)
    return _silu_mul_gemv(h, weight)


# ----------------------------------------------------------------------------- launchers
def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(prologue: int, x, residual, norm_weight, weight, eps, summed) -> torch.Tensor:
    x, weight = _unit_stride(x), _unit_stride(weight)
    rows, n = x.shape[0], weight.shape[0]
    k = weight.shape[1]
    out = torch.empty((rows, n), device=x.device, dtype=x.dtype)
    if rows == 0 or n == 0:
        return out
    res = _unit_stride(residual) if residual is not None else x
    gain = norm_weight.contiguous() if norm_weight is not None else weight
    total = summed if summed is not None else out
    kernel = _kernel(interpreting())
    kernel[lambda meta: (-(-n // meta["BLOCK_N"]),)](
        x, res, gain, total, weight, out,
        x.stride(0), res.stride(0), total.stride(0), weight.stride(0), out.stride(0),
        rows, n, k, eps,
        PROLOGUE=prologue, HAS_RESIDUAL=residual is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_M=MAX_ROWS,
    )
    return out


def _gemv_impl(x, weight):
    return _launch(_PLAIN, x, None, None, weight, 0.0, None)


def _rmsnorm_gemv_impl(x, norm_weight, weight, eps):
    return _launch(_RMSNORM, x, None, norm_weight, weight, eps, None)


def _add_rmsnorm_gemv_impl(x, residual, norm_weight, weight, eps):
    summed = torch.empty_like(x, memory_format=torch.contiguous_format)
    return _launch(_RMSNORM, x, residual, norm_weight, weight, eps, summed), summed


def _silu_mul_gemv_impl(h, weight):
    return _launch(_SILU_MUL, h, None, None, weight, 0.0, None)


def _out_fake(x, weight):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _add_rmsnorm_gemv_fake(x, residual, norm_weight, weight, eps):
    return x.new_empty((x.shape[0], weight.shape[0])), torch.empty_like(x, memory_format=torch.contiguous_format)


# Custom ops, so a torch.compile'd decode step holds each launch as one opaque node.
_gemv = kernel_op("gemv", "(Tensor x, Tensor weight) -> Tensor", _gemv_impl, _out_fake, public="gemv")
_rmsnorm_gemv = kernel_op("rmsnorm_gemv", "(Tensor x, Tensor norm_weight, Tensor weight, float eps) -> Tensor",
                          _rmsnorm_gemv_impl, lambda x, g, weight, eps: _out_fake(x, weight), public="rmsnorm_gemv")
_add_rmsnorm_gemv = kernel_op(
    "add_rmsnorm_gemv",
    "(Tensor x, Tensor residual, Tensor norm_weight, Tensor weight, float eps) -> (Tensor, Tensor)",
    _add_rmsnorm_gemv_impl, _add_rmsnorm_gemv_fake, public="rmsnorm_gemv",
)
_silu_mul_gemv = kernel_op("silu_mul_gemv", "(Tensor h, Tensor weight) -> Tensor", _silu_mul_gemv_impl, _out_fake,
                           public="silu_mul_gemv")


# ----------------------------------------------------------------------------- input checks
def _check_inputs(x, weight, k: int, name: str = "x") -> None:
    check_tensor(name, x, 2, FLOAT_DTYPES)
    check_tensor("weight", weight, 2, FLOAT_DTYPES)
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"{name} must have 1 to {MAX_ROWS} rows (a decode step's), got shape {tuple(x.shape)}")
    if name == "h" and x.shape[1] % 2:
        raise ValueError(f"h's last dim must be even ([gate; up]), got shape {tuple(x.shape)}")
    if weight.shape[1] != k or k == 0:
        raise ValueError(f"weight must be (N, {k}) for {name} of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight must have {name}'s dtype {x.dtype}, got {weight.dtype}")
    check_same_device(**{name: x, "weight": weight})


def _check_norm_inputs(x, residual, norm_weight, weight, eps) -> None:
    _check_inputs(x, weight, x.shape[-1] if isinstance(x, torch.Tensor) else 0)
    check_tensor("norm_weight", norm_weight, 1, (x.dtype,))
    if norm_weight.shape[0] != x.shape[1]:
        raise ValueError(f"norm_weight must be ({x.shape[1]},), got {tuple(norm_weight.shape)}")
    tensors = {"x": x, "norm_weight": norm_weight}
    check_residual(residual, x)
    if residual is not None:
        tensors["residual"] = residual
    check_same_device(**tensors)
    if not float(eps) > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")


# ----------------------------------------------------------------------------- kernel
# `tl` (triton.language) is bound into this module by `jit_kernel` when the kernel is
# first built; importing this module never imports triton.


def _gemv_kernel(
    X, R, G, S, W, Y,
    stride_xm, stride_rm, stride_sm, stride_wn, stride_ym,
    n_rows, n_out, n_in, eps,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program n: output columns [n * BLOCK_N, +BLOCK_N) of every row, over all of K.
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < n_rows
    n_ok = offs_n < n_out
    x_rows = X + offs_m[:, None].to(tl.int64) * stride_xm
    r_rows = R + offs_m[:, None].to(tl.int64) * stride_rm
    w_rows = W + offs_n[:, None].to(tl.int64) * stride_wn
    eps = tl.cast(eps, tl.float32)  # fp64 when launched by torch.compile
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if PROLOGUE == 1:  # RMS statistics of residual + x (rounded to the dtype, as the add is)
        squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, n_in, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            ok = m_ok[:, None] & (offs_k[None, :] < n_in)
            x = tl.load(x_rows + offs_k[None, :], mask=ok, other=0.0)
            if HAS_RESIDUAL:
                x = (tl.load(r_rows + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
                     + x.to(tl.float32)).to(W.dtype.element_ty)
                if pid == 0:
                    tl.store(S + offs_m[:, None].to(tl.int64) * stride_sm + offs_k[None, :], x, mask=ok)
            xf = x.to(tl.float32)
            squares += tl.sum(xf * xf, axis=1)
        rstd = 1.0 / tl.sqrt(squares / n_in + eps)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < n_in
        ok = m_ok[:, None] & k_ok[None, :]
        if PROLOGUE == 2:  # silu(gate) * up, each rounded as F.silu and the product are
            gate = tl.load(x_rows + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
            up = tl.load(x_rows + n_in + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(W.dtype.element_ty).to(tl.float32)
            a = (act * up).to(W.dtype.element_ty)
        else:
            a = tl.load(x_rows + offs_k[None, :], mask=ok, other=0.0)
            if PROLOGUE == 1:  # RMSNorm: x * rstd rounded to the dtype, then the gain, rounded again
                if HAS_RESIDUAL:
                    a = (tl.load(r_rows + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
                         + a.to(tl.float32)).to(W.dtype.element_ty)
                gain = tl.load(G + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                a = (a.to(tl.float32) * rstd[:, None]).to(W.dtype.element_ty).to(tl.float32) * gain[None, :]
                a = a.to(W.dtype.element_ty)
        w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
        acc += tl.dot(a, tl.trans(w), input_precision=DOT_PRECISION)
    tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _configs() -> list:
    # (BLOCK_N, BLOCK_K, warps, stages): few weight rows per program, so even the 2048-row products
    # spread over every SM, and long contiguous K tiles in flight
    shapes = [(16, 256, 4, 4), (16, 512, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4)]
    return [config(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s) for n, k, w, s in shapes]


@functools.cache
def _kernel(interpret: bool):
    del interpret  # cache key only: jit_kernel reads the mode itself
    # Tuned per product shape and prologue; the row count (the decode batch) changes every step.
    return jit_kernel(_gemv_kernel, _configs(), config(BLOCK_N=16, BLOCK_K=32), key=["n_out", "n_in", "PROLOGUE"],
                      do_not_specialize=("n_rows",))
