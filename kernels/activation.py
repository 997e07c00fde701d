"""Fused SwiGLU activation, ``silu(gate) * up``, for the inference forward.

API::

    silu_mul(h) -> (..., F)          # h (..., 2F) = [gate; up], the fused gate+up projection's output
    silu_mul_reference(h)            # plain torch; the CPU path
    available(device) -> bool

In torch, ``F.silu(gate) * up`` is two kernels and a (..., F) intermediate; at batch 1
each is a launch of almost no work. Here one kernel reads both halves of each row
and writes the product. Numerics follow torch: silu in fp32, rounded to h's dtype (the
output of ``F.silu``), then the product in fp32, rounded once more.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kernels._utils import (
    FLOAT_DTYPES,
    check_tensor,
    check_triton_device,
    interpreting,
    jit_kernel,
    kernel_op,
    triton_available,
)

_BLOCK = 1024  # columns per program
_INTERPRET_BLOCK = 64


def available(device: torch.device | str) -> bool:
    """True when ``silu_mul`` (the Triton path) can run on ``device``."""
    return triton_available(device)


def silu_mul_reference(h: torch.Tensor) -> torch.Tensor:
    """Plain torch: gate, up = h.chunk(2, -1); silu(gate) * up."""
    _check_inputs(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """Fused Triton ``silu(gate) * up`` over h's last dim halves; (..., F) out in h's dtype."""
    _check_inputs(h)
    check_triton_device("silu_mul", h.device)
    return _silu_mul(h)


def _silu_mul_impl(h):
    width = h.shape[-1] // 2
    out = torch.empty((*h.shape[:-1], width), device=h.device, dtype=h.dtype)
    if out.numel() == 0:  # (before the reshape: (..., 0) cannot be reshaped to (-1, 0))
        return out
    rows = h.reshape(-1, 2 * width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    n_rows = rows.shape[0]
    block = _INTERPRET_BLOCK if interpreting() else _BLOCK
    _kernel(interpreting())[(n_rows, -(-width // block))](
        rows, out, rows.stride(0), width, BLOCK=block, num_warps=4,
    )
    return out


def _silu_mul_fake(h):
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


# A custom op, so a torch.compile'd decode step holds the launch as one opaque node.
_silu_mul = kernel_op("silu_mul", "(Tensor h) -> Tensor", _silu_mul_impl, _silu_mul_fake, public="silu_mul")


def _check_inputs(h) -> None:
    if not isinstance(h, torch.Tensor) or h.dim() < 1:
        raise ValueError(f"h must be a tensor of shape (..., 2F), got {type(h).__name__}")
    check_tensor("h", h, h.dim(), FLOAT_DTYPES)
    if h.shape[-1] % 2:
        raise ValueError(f"h's last dim must be even ([gate; up]), got shape {tuple(h.shape)}")


# ----------------------------------------------------------------------------- kernel
# `tl` (triton.language) is bound into this module by `jit_kernel` when the kernel is
# first built; importing this module never imports triton.


def _silu_mul_kernel(H, Out, stride_h, width, BLOCK: tl.constexpr):
    # Program (row, column block): out[row, cols] = silu(h[row, cols]) * h[row, width + cols]
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(H + row * stride_h + width + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(Out.dtype.element_ty).to(tl.float32)  # F.silu's output dtype
    tl.store(Out + row * width + cols, (act * up).to(Out.dtype.element_ty), mask=mask)


@functools.cache
def _kernel(interpret: bool):
    del interpret  # cache key only: jit_kernel reads the mode itself
    return jit_kernel(_silu_mul_kernel)  # not autotuned: an elementwise kernel
