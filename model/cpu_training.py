"""Kiln's native CPU kernels (model/native) for training, as torch custom ops: causal self-attention with its
backward, and the rows of the chunked LM head + loss. Opaque to torch.compile (each is one op in the graph);
`Transformer.use_native_kernels` registers the module and routes the CPU's training forward to them.
"""

from __future__ import annotations

from types import ModuleType

import torch

# The native module (model/native) whose functions the ops run: registered by `use_native_module` (through
# `Transformer.use_native_kernels`) once it is built.
_native_module: ModuleType | None = None
# Whether bf16 inputs (bf16 autocast) reach the native attention as bf16, for products in bf16 with fp32 sums:
# where the module's bf16 micro-kernel runs on this CPU (set by `use_native_module`); else they are widened.
_bf16_products = False


def use_native_module(module: ModuleType | None) -> bool:
    """Register the native module for the ops here; False (nothing registered) when it is None or lacks the
    training attention (a torch without the fp32 micro-kernel)."""
    global _native_module, _bf16_products
    if module is None or not hasattr(module, "causal_attention_backward"):
        return False
    _native_module = module
    _bf16_products = bool(getattr(module, "attention_bf16_ready", lambda: False)())
    return True


def bf16_products() -> bool:
    """Whether bf16 inputs to `native_causal_attention` are multiplied in bf16 here (else widened to fp32)."""
    return _bf16_products


def native_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention on a CPU in Kiln's native kernels, differentiable: q (B, T, H, D), k/v (B, T, Hkv, D)
    (views of a qkv product serve: only the last dim must be contiguous) -> (B, T, H, D) in q's dtype.

    fp32 inputs are multiplied in fp32. Under bf16 autocast (any input bf16; `kiln train`'s precision=auto picks
    it only on CPUs whose bf16 products pay) the products take bf16 operands with fp32 sums, as flash attention
    does on a GPU (1.4-1.7x the fp32 kernels on AVX-512 BF16), where the module's bf16 micro-kernel runs
    (AVX-512 and up); elsewhere the inputs are widened to fp32 and the results rounded back. Softmax,
    log-sum-exp and all sums are fp32 either way; the backward recomputes the attention weights from the
    forward's log-sum-exp, flash attention's way. One opaque op to torch.compile (`kiln::cpu_causal_attention`)."""
    return _cpu_causal_attention(q, k, v, q.shape[-1] ** -0.5)[0]


def _native() -> ModuleType:
    if _native_module is None:
        raise RuntimeError("Kiln's native training ops need the native module: call "
                           "Transformer.use_native_kernels(model.native.load()) first")
    return _native_module


def _compute_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.dtype:
    """What the native attention computes in for these inputs (the forward and its backward alike)."""
    bf16 = torch.bfloat16 in (q.dtype, k.dtype, v.dtype)
    return torch.bfloat16 if bf16 and _bf16_products and q.shape[-1] % 2 == 0 else torch.float32


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(dtype)
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("kiln::cpu_causal_attention", mutates_args=())
def _cpu_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    dt = _compute_dtype(q, k, v)
    out, lse = _native().causal_attention_lse(_as(q, dt), _as(k, dt), _as(v, dt), scale)  # lse (B, H, T) fp32
    return out.to(q.dtype), lse


@_cpu_causal_attention.register_fake
def _(q, k, v, scale):
    B, T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("kiln::cpu_causal_attention_backward", mutates_args=())
def _cpu_causal_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                                   grad: torch.Tensor, lse: torch.Tensor,
                                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dt = _compute_dtype(q, k, v)
    dq, dk, dv = _native().causal_attention_backward(_as(q, dt), _as(k, dt), _as(v, dt), _as(out, dt),
                                                     _as(grad, dt), lse.contiguous(), scale)
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


def native_loss_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, row_scale: torch.Tensor,
                     need_grad: bool) -> torch.Tensor:
    """A chunk's rows of `kernels.cross_entropy.linear_cross_entropy_torch` (its `rows` argument) in the native
    module: (n,) fp32 losses, and with need_grad the logits (n, V) overwritten by their gradient. fp32 and bf16
    logits; others (fp16) take the torch ops."""
    if logits.dtype not in (torch.float32, torch.bfloat16) or logits.stride(-1) != 1:
        from kernels.cross_entropy import chunk_rows_torch

        return chunk_rows_torch(logits, targets, ignore_index, row_scale, need_grad)
    return _cpu_loss_rows(logits, targets.long(), ignore_index, row_scale.float(), need_grad)


@torch.library.custom_op("kiln::cpu_loss_rows_", mutates_args=("logits",))
def _cpu_loss_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, row_scale: torch.Tensor,
                   need_grad: bool) -> torch.Tensor:
    return _native().loss_rows_(logits, targets, ignore_index, row_scale, need_grad)


@_cpu_loss_rows.register_fake
def _(logits, targets, ignore_index, row_scale, need_grad):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)
