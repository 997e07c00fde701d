"""Fused residual add + RMSNorm / LayerNorm, for the inference forward.

API::

    add_norm(x, residual, weight, bias=None, eps=1e-5, rms=True) -> (normed, summed)
    add_norm_reference(...)                                      # plain torch; the CPU path
    available(device) -> bool

``x`` is (..., d) fp32/fp16/bf16; ``residual`` is None or x's shape and dtype; ``weight``
(and for LayerNorm ``bias``) are (d,). ``summed = residual + x`` (``x`` itself when
``residual`` is None: no copy) is the new residual stream, and ``normed`` is
``RMSNorm(summed)`` (``rms=True``, Kiln's ``model.transformer.RMSNorm``) or
``LayerNorm(summed)`` (``F.layer_norm``), both in x's dtype.

Why: a pre-norm block runs ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``. In torch
each residual add is a kernel and each RMSNorm is about eight (upcast, square, mean, add,
rsqrt, multiply, downcast, scale). At batch 1 a decode step's work per kernel is tiny, so
on a GPU the step costs about a launch per kernel even when replayed from a CUDA graph.
Carrying the residual stream beside the normed activations (as vLLM's fused_add_rms_norm
does) makes each add + norm one kernel: one program per row loads the row and the
residual once, and writes both outputs.

Numerics follow the torch modules so that greedy tokens do not move: the sum is rounded
to x's dtype (a torch add in that dtype) before it is normalized; statistics are fp32;
RMSNorm rounds ``x * rstd`` to x's dtype before scaling by the weight, as
``xf.type_as(x) * weight`` does, and LayerNorm computes ``(x - mean) * rstd * w + b`` in
fp32 and rounds once, as ``F.layer_norm`` does.
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
    interpreting,
    jit_kernel,
    kernel_op,
    next_power_of_2,
    triton_available,
)

_MAX_DIM = 65536  # one row sits in registers


def available(device: torch.device | str) -> bool:
    """True when ``add_norm`` (the Triton path) can run on ``device``."""
    return triton_available(device)


def add_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       bias: torch.Tensor | None = None, eps: float = 1e-5,
                       rms: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: ``summed = residual + x``; ``normed = norm(summed)``."""
    _check_inputs(x, residual, weight, bias, eps, rms)
    summed = x if residual is None else residual + x
    if rms:
        xf = summed.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(summed) * weight
    else:
        normed = F.layer_norm(summed, (summed.shape[-1],), weight, bias, eps)
    return normed.to(summed.dtype), summed  # (in x's dtype, as the kernel, whatever the weight's)


def add_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
             bias: torch.Tensor | None = None, eps: float = 1e-5,
             rms: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Triton ``summed = residual + x; normed = norm(summed)``; one launch."""
    _check_inputs(x, residual, weight, bias, eps, rms)
    check_triton_device("add_norm", x.device)
    if residual is None:
        return _norm(x, weight, bias, float(eps), rms), x
    return _add_norm(x, residual, weight, bias, float(eps), rms)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (N, d) with unit column stride (a view for the usual contiguous activations)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(x, residual, weight, bias, eps, rms, normed, summed) -> None:
    rows = _rows(x)
    n_rows, d = rows.shape
    if n_rows == 0:
        return
    res = _rows(residual) if residual is not None else rows
    weight = weight.contiguous()  # the kernel reads them with unit stride (a no-op for a model's parameters)
    bias = bias.contiguous() if bias is not None else None
    out = normed.view(-1, d)
    out_sum = summed.view(-1, d) if summed is not None else out
    block = max(16, next_power_of_2(d))
    _kernel(interpreting())[(n_rows,)](
        rows, res, weight, bias if bias is not None else weight, out, out_sum,
        rows.stride(0), res.stride(0), out.stride(0), out_sum.stride(0), d, eps,
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, RMS=rms, BLOCK=block,
        num_warps=min(max(block // 256, 1), 8),  # ~8 elements per thread (the Triton layer-norm tutorial)
    )


def _norm_impl(x, weight, bias, eps, rms):
    normed = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    _launch(x, None, weight, bias, eps, rms, normed, None)
    return normed


def _add_norm_impl(x, residual, weight, bias, eps, rms):
    normed = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    summed = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    _launch(x, residual, weight, bias, eps, rms, normed, summed)
    return normed, summed


def _norm_fake(x, weight, bias, eps, rms):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


def _add_norm_fake(x, residual, weight, bias, eps, rms):
    return _norm_fake(x, weight, bias, eps, rms), _norm_fake(x, weight, bias, eps, rms)


# Custom ops, so a torch.compile'd decode step holds each launch as one opaque node.
_norm = kernel_op("norm", "(Tensor x, Tensor weight, Tensor? bias, float eps, bool rms) -> Tensor",
                  _norm_impl, _norm_fake, public="add_norm")
_add_norm = kernel_op(
    "add_norm", "(Tensor x, Tensor residual, Tensor weight, Tensor? bias, float eps, bool rms) -> (Tensor, Tensor)",
    _add_norm_impl, _add_norm_fake, public="add_norm",
)


def _check_inputs(x, residual, weight, bias, eps, rms) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor of shape (..., d), got {type(x).__name__}")
    check_tensor("x", x, x.dim(), FLOAT_DTYPES)
    d = x.shape[-1]
    if not 1 <= d <= _MAX_DIM:
        raise ValueError(f"the normalized dim must be in [1, {_MAX_DIM}], got {d}")
    check_tensor("weight", weight, 1, FLOAT_DTYPES)
    if weight.shape[0] != d:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({d},) to match x {tuple(x.shape)}")
    tensors = {"x": x, "weight": weight}
    check_residual(residual, x)
    if residual is not None:
        tensors["residual"] = residual
    if bias is not None:
        if rms:
            raise ValueError("bias applies to LayerNorm only (rms=False)")
        check_tensor("bias", bias, 1, FLOAT_DTYPES)
        if bias.shape != weight.shape:
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({d},)")
        tensors["bias"] = bias
    check_same_device(**tensors)
    if not float(eps) > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")


# ----------------------------------------------------------------------------- kernel
# `tl` (triton.language) is bound into this module by `jit_kernel` when the kernel is
# first built; importing this module never imports triton.


def _add_norm_kernel(
    X, R, W, B, Y, S, stride_x, stride_r, stride_y, stride_s, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per row; the row sits in registers.
    row = tl.program_id(0).to(tl.int64)
    eps = tl.cast(eps, tl.float32)  # fp64 when launched by torch.compile
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (r.to(tl.float32) + x.to(tl.float32)).to(Y.dtype.element_ty)  # rounded as torch's add rounds
        tl.store(S + row * stride_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        y = (xf * rstd).to(Y.dtype.element_ty).to(tl.float32) * w  # RMSNorm's type_as, then the gain
    else:
        mean = tl.sum(xf, axis=0) / n_cols
        centered = tl.where(mask, xf - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / n_cols + eps)
        y = centered * rstd * w
        if HAS_BIAS:
            y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@functools.cache
def _kernel(interpret: bool):
    del interpret  # cache key only: jit_kernel reads the mode itself
    return jit_kernel(_add_norm_kernel)  # not autotuned: the launcher sizes num_warps from the row
