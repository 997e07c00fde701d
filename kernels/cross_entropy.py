"""Fused cross-entropy / log-softmax gather over vocabulary rows, with backward.

API::

    cross_entropy(logits, targets, ignore_index=-100, reduction="mean") -> loss
    cross_entropy_reference(...)                     # F.cross_entropy; the CPU path
    token_logprobs(logits, targets) -> (N,) fp32     # log_softmax(logits)[n, targets[n]]
    token_logprobs_reference(logits, targets)
    linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean",
                         chunk_rows=None) -> fp32 loss    # logits = hidden @ weight.T, chunked
    linear_cross_entropy_reference(...)
    linear_cross_entropy_torch(...)                  # the same chunking in plain torch: the CPU path
    available(device) -> bool

``logits`` is (N, V) fp32/fp16/bf16 (fp64 is accepted and computed in fp32), ``targets``
(N,) integer class ids or ``ignore_index``. ``cross_entropy`` matches ``F.cross_entropy`` (mean
over the non-ignored rows, NaN when all are ignored; output in the logits dtype) and is
differentiable. ``token_logprobs`` is differentiable too and gives 0 at rows whose
target is -100.

The forward kernel streams each row once in chunks, keeping a running max and sum
of exp2 (online log-sum-exp), and stores only the per-row loss and LSE (N fp32
each): no (N, V) fp32 log-softmax is ever materialized. The backward recomputes
``softmax = exp((x - max) - log_sum)`` chunk by chunk and writes ``(softmax - one_hot) * grad``
straight into the gradient, spread over a 2-D grid of (chunk, row) programs.

A target outside [0, V) that is not ``ignore_index`` gives a NaN loss on the Triton
path (checking it would need a GPU->CPU sync); the reference raises.

``linear_cross_entropy`` never holds the (N, V) logits at once: it walks ``chunk_rows``
rows at a time, computes the chunk's logits, loss and logits-gradient (written in
place over the chunk's logits), and folds that into grad_hidden / grad_weight during
the forward, so backward is one scale. Only "mean" and "sum" reductions. Its loss is fp32
whatever the inputs' dtype (summed in fp32: as ``F.cross_entropy`` gives under autocast; in
bf16 a training run's logged losses would be rounded to steps of 1/64 between 2 and 4).
``linear_cross_entropy_torch`` is that algorithm with the two row passes in torch (or in a
function given as ``rows``: the native module's, model/cpu_training.py), for CPUs (training on
the CPU): chunks small enough to stay in cache, and no (N, V) fp32 logits or logits gradient,
ran the LM head + loss 1.1-2.2x as fast as the whole-logits path on a 2-vCPU CPU
(bench/RESULTS.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from kernels._utils import (
    FLOAT_DTYPES,
    check_same_device,
    check_tensor,
    check_triton_device,
    config,
    interpreting,
    jit_kernel,
    kernel_op,
    next_power_of_2,
    triton_available,
)

_REDUCTIONS = ("mean", "sum", "none")
_INT_DTYPES = (torch.int32, torch.int64)
# linear_cross_entropy's default chunk holds at least this many logits (256 MiB in bf16)
_CHUNK_LOGITS = 1 << 27
# linear_cross_entropy_torch's default chunk: about this many logits (8 MiB in fp32, within a CPU's caches),
# and at least _TORCH_CHUNK_MIN_ROWS rows so the matmuls stay matmuls at large vocabularies
_TORCH_CHUNK_LOGITS = 1 << 21
_TORCH_CHUNK_MIN_ROWS = 64


def available(device: torch.device | str) -> bool:
    """True when the Triton cross-entropy path can run on ``device``."""
    return triton_available(device)


# ----------------------------------------------------------------------------- references


def cross_entropy_reference(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """``F.cross_entropy`` with the same checks as ``cross_entropy``."""
    _check_inputs(logits, targets, reduction)
    return F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction=reduction)


def token_logprobs_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) fp32 ``log_softmax(logits)`` gathered at ``targets``; 0 where target is -100."""
    _check_inputs(logits, targets, "none")
    return -F.cross_entropy(logits.float(), targets.long(), ignore_index=-100, reduction="none")


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets)``; holds the full logits."""
    del chunk_rows  # same signature as linear_cross_entropy
    _check_linear_inputs(hidden, weight, targets, reduction)
    logits = hidden @ weight.t()  # (N, V)
    return F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction=reduction)


def linear_cross_entropy_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_rows: int | None = None,
    rows: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """``linear_cross_entropy`` in plain torch, on any device: the same chunks, loss and gradients (computed
    during the forward) with each chunk's rows in one ``log_softmax`` and in-place passes (`chunk_rows_torch`),
    or in ``rows``, a function of the same signature (the CPU's native kernel: `model.cpu_training`). The CPU
    path of the training loss. The default ``chunk_rows`` keeps a chunk's logits near 2^21 elements (256 rows
    at a 8192 vocabulary), at least 64 rows: on a 2-vCPU CPU 256 rows ran the LM head + loss fastest (fewer rows read
    and write the weight's gradient too often, more fall out of cache). A target outside [0, V) raises (not
    checked while torch.compile traces it)."""
    _check_linear_call("linear_cross_entropy_torch", hidden, weight, targets, reduction, chunk_rows)
    if not torch.compiler.is_compiling():  # (a data-dependent branch, so not while torch.compile traces)
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        if bad.any():
            raise ValueError(f"target {int(targets[bad][0])} is out of range [0, {weight.shape[0]}) (ignore_index "
                             f"is {ignore_index})")
    if chunk_rows is None:
        chunk_rows = max(_TORCH_CHUNK_MIN_ROWS, _TORCH_CHUNK_LOGITS // weight.shape[0])
    return _LinearCrossEntropyTorch.apply(hidden, weight, targets, int(ignore_index), reduction, chunk_rows,
                                          rows or chunk_rows_torch)


# ----------------------------------------------------------------------------- Triton path


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """Fused cross-entropy matching ``F.cross_entropy``; differentiable w.r.t. logits."""
    _check_inputs(logits, targets, reduction)
    check_triton_device("cross_entropy", logits.device)
    row_loss = _CrossEntropy.apply(logits, targets, int(ignore_index))  # (N,) fp32
    return _reduce(row_loss, targets, ignore_index, reduction).to(logits.dtype)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) fp32 log-probability of each row's target; 0 where target is -100."""
    _check_inputs(logits, targets, "none")
    check_triton_device("token_logprobs", logits.device)
    return -_CrossEntropy.apply(logits, targets, -100)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` without holding all (N, V) logits.

    hidden (N, C), weight (V, C) (an LM head), targets (N,). Differentiable w.r.t.
    hidden and weight. ``chunk_rows`` bounds the transient logits to (chunk_rows, V); the
    default is a power of two rows whose logits hold about as many elements as ``hidden``,
    or 2^27 (256 MiB in bf16) where that is more: every chunk is three matmuls and a weight-sized
    gradient update, so a few big chunks run faster than many small ones. The matmuls run in the
    inputs' dtype (pass 16-bit hidden and weight for tensor-core speed: ``Transformer.loss``
    casts them as autocast would the LM head); a 16-bit weight's gradient is summed over the
    chunks in fp32 and rounded once. The loss is fp32.
    """
    _check_linear_call("linear_cross_entropy", hidden, weight, targets, reduction, chunk_rows)
    check_triton_device("linear_cross_entropy", hidden.device)
    return _LinearCrossEntropy.apply(hidden, weight, targets, int(ignore_index), reduction, chunk_rows)


def _check_inputs(logits: torch.Tensor, targets: torch.Tensor, reduction: str) -> None:
    check_tensor("logits", logits, 2, FLOAT_DTYPES + (torch.float64,))
    check_tensor("targets", targets, 1, _INT_DTYPES)
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"targets has {targets.shape[0]} rows but logits has {logits.shape[0]} (shape {tuple(logits.shape)})"
        )
    if logits.shape[1] == 0:
        raise ValueError("logits must have at least one class (V >= 1)")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    check_same_device(logits=logits, targets=targets)


def _check_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str) -> None:
    check_tensor("hidden", hidden, 2, FLOAT_DTYPES + (torch.float64,))
    check_tensor("weight", weight, 2, FLOAT_DTYPES + (torch.float64,))
    check_tensor("targets", targets, 1, _INT_DTYPES)
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one class row (V >= 1)")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, C) {tuple(hidden.shape)} and weight (V, C) {tuple(weight.shape)} differ in C")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden dtype {hidden.dtype} != weight dtype {weight.dtype}")
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets has {targets.shape[0]} rows but hidden has {hidden.shape[0]}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    check_same_device(hidden=hidden, weight=weight, targets=targets)


def _check_linear_call(func: str, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str,
                       chunk_rows: int | None) -> None:
    _check_linear_inputs(hidden, weight, targets, reduction)
    if reduction == "none":
        raise ValueError(f'{func} supports reduction "mean" or "sum", not "none"')
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")


def _reduce(row_loss: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return row_loss
    if reduction == "sum":
        return row_loss.sum()
    n_valid = (targets != ignore_index).sum()  # a tensor: no GPU->CPU sync
    return row_loss.sum() / n_valid


def _forward_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) fp32 loss (0 at ignored rows) and (N, 2) fp32 (max, log sum exp(x - max)) of each row: kept
    apart, not summed into one log-sum-exp, so that softmax = exp((x - max) - log_sum) stays exact for
    rows of huge logits (x - lse would cancel to 0 at -1e31)."""
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty((n_rows, 2), device=logits.device, dtype=torch.float32)
    if n_rows:
        kernels = _kernels(interpreting())
        kernels.forward[(n_rows,)](logits, targets, loss, lse, logits.stride(0), n_cols, ignore_index)
    return loss, lse


def _backward_rows(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_rows: torch.Tensor, out: torch.Tensor
) -> None:
    """out[n] = (softmax(logits[n]) - one_hot(targets[n])) * grad_rows[n]; out may alias logits."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    kernels = _kernels(interpreting())
    grid = lambda meta: (n_rows, _cdiv(n_cols, meta["BLOCK"]))  # noqa: E731  (rows on axis 0: no 65535 cap)
    kernels.backward[grid](logits, targets, lse, grad_rows, out, logits.stride(0), out.stride(0), n_cols)


def _chunk_rows_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, row_scale: torch.Tensor,
                       need_grad: bool) -> torch.Tensor:
    """A chunk's (n,) fp32 row losses, and with ``need_grad`` d loss / d logits written over the logits (row n
    scaled by row_scale[n]), by the two kernels."""
    loss, lse = _forward_rows(logits, targets, ignore_index)
    if need_grad:
        _backward_rows(logits, targets, lse, row_scale, logits)
    return loss


def chunk_rows_torch(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, row_scale: torch.Tensor,
                     need_grad: bool) -> torch.Tensor:
    """`_chunk_rows_triton` in torch ops: each row's loss (n,) fp32 and, with need_grad, the logits (n, V)
    overwritten by their gradient (softmax - one-hot at the target) * row_scale. One fp32 log_softmax
    (x - max - log sum, as the kernels keep it), then the softmax, minus one at the target, scaled, in place."""
    valid = targets != ignore_index
    logp = torch.log_softmax(logits.float(), -1)  # (n, V) fp32
    picked = torch.where(valid, targets, 0).long()[:, None]
    loss = torch.where(valid, -logp.gather(1, picked)[:, 0], 0.0)
    if need_grad:
        grad = logp.exp_().scatter_add_(1, picked, -valid.float()[:, None]).mul_(row_scale[:, None])
        logits.copy_(grad)
    return loss


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _rows_impl(logits, targets, ignore_index):
    """(N,) fp32 loss and log-sum-exp (see ``_forward_rows``), for any row stride."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return _forward_rows(logits, targets.contiguous(), ignore_index)


def _rows_fake(logits, targets, ignore_index):
    rows = logits.new_empty(logits.shape[0], dtype=torch.float32)
    return rows, logits.new_empty((logits.shape[0], 2), dtype=torch.float32)


def _rows_backward_impl(logits, targets, lse, grad_loss, ignore_index):
    """d loss / d logits for the per-row loss, given d total / d row_loss (``grad_loss``)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    targets = targets.contiguous()
    grad_rows = torch.where(targets != ignore_index, grad_loss.float(), 0.0).contiguous()  # (N,) fp32
    grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _backward_rows(logits, targets, lse, grad_rows, grad_logits)
    return grad_logits


def _rows_backward_fake(logits, targets, lse, grad_loss, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@functools.cache
def fp32_accumulating_addmm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` adds a product of 16-bit ``dtype``
    matrices into an fp32 ``acc`` in place on ``device``: cuBLAS with an fp32 output, on CUDA from torch 2.8.
    Tried once per device and dtype on a small product (one host sync) rather than assumed from the version."""
    if device.type != "cuda":
        return False
    try:
        a = torch.full((16, 32), 0.5, device=device, dtype=dtype)
        acc = torch.full((16, 16), 1.0 / 3, device=device)
        torch.addmm(acc, a, a.t(), out_dtype=torch.float32, out=acc)
        return bool(torch.allclose(acc, torch.full_like(acc, 8.0 + 1.0 / 3), rtol=0, atol=1e-6))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _linear_impl(hidden, weight, targets, ignore_index, reduction, chunk_rows, need_grad, rows=_chunk_rows_triton):
    """Chunked LM head + cross-entropy: (loss, d loss/d hidden, d loss/d weight), the gradients
    computed on the way (empty when ``need_grad`` is False). ``rows`` does a chunk's rows: the Triton
    kernels, torch ops (`chunk_rows_torch`) or whatever `linear_cross_entropy_torch` was given."""
    # Matmuls run in the inputs' (shared) dtype: under autocast they would change it
    # between the logits and the gradient buffers.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        n_rows, n_cols = hidden.shape[0], weight.shape[0]
        if chunk_rows is None:
            # Chunks whose logits (chunk_rows, V) are about the size of hidden (N, C), or 2^27 elements.
            chunk_rows = next_power_of_2(max(-(-n_rows // max(1, -(-n_cols // hidden.shape[1]))),
                                             _CHUNK_LOGITS // n_cols))
        targets = targets.contiguous()
        valid = targets != ignore_index
        if reduction == "mean":
            row_scale = valid.float() / valid.sum().clamp(min=1)  # d loss / d row_loss
        else:
            row_scale = valid.float()
        grad_hidden = torch.empty(hidden.shape, device=hidden.device, dtype=hidden.dtype) if need_grad else None
        # A 16-bit weight's gradient is summed over chunks in fp32: summed in place in bf16 it would be
        # rounded once per chunk. (Training keeps an fp32 gradient of the fp32 weight anyway.)
        sum_fp32 = weight.dtype in (torch.float16, torch.bfloat16)
        grad_weight = torch.zeros(weight.shape, device=weight.device,
                                  dtype=torch.float32 if sum_fp32 else weight.dtype) if need_grad else None
        # on CUDA cuBLAS adds each chunk's product into that fp32 sum itself: no 16-bit (V, C) product written,
        # read back and rounded on the way
        cublas_sum = need_grad and sum_fp32 and fp32_accumulating_addmm(weight.device, weight.dtype)
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        for start in range(0, n_rows, chunk_rows):
            stop = min(start + chunk_rows, n_rows)
            h = hidden[start:stop]  # (n, C)
            logits = h @ weight.t()  # (n, V) in hidden's dtype; the only big transient
            # the chunk's losses, and the gradient of its logits written over the logits themselves
            total += rows(logits, targets[start:stop], ignore_index, row_scale[start:stop].contiguous(),
                          need_grad).sum()
            if need_grad:
                torch.matmul(logits, weight, out=grad_hidden[start:stop])  # (n, C)
                if cublas_sum:
                    torch.addmm(grad_weight, logits.t(), h, out_dtype=torch.float32, out=grad_weight)
                elif sum_fp32:
                    grad_weight += logits.t() @ h  # (V, C) in 16 bits (fp32 inside the matmul), summed in fp32
                else:
                    grad_weight.addmm_(logits.t(), h)  # (V, C)
        if reduction == "mean":
            total = total / valid.sum()  # NaN when every row is ignored, like F.cross_entropy
    if not need_grad:
        empty = hidden.new_empty(0)
        return total, empty, empty
    return total, grad_hidden, grad_weight.to(weight.dtype)




def _linear_fake(hidden, weight, targets, ignore_index, reduction, chunk_rows, need_grad):
    empty = hidden.new_empty(0)
    # The layouts the impl returns (contiguous), whatever the inputs' strides
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty(hidden.shape) if need_grad else empty,
            weight.new_empty(weight.shape) if need_grad else empty)


# Custom ops, so torch.compile (training) treats each launcher as one opaque call. (Named for what they
# return, (loss, (max, log_sum) stats): inductor's on-disk cache does not key on a fake impl, so an op
# whose outputs change shape or dtype takes a new name.)
_rows = kernel_op("cross_entropy_loss_stats",
                  "(Tensor logits, Tensor targets, int ignore_index) -> (Tensor, Tensor)",
                  _rows_impl, _rows_fake, public="cross_entropy")
_rows_backward = kernel_op(
    "cross_entropy_loss_stats_backward",
    "(Tensor logits, Tensor targets, Tensor stats, Tensor grad_loss, int ignore_index) -> Tensor",
    _rows_backward_impl, _rows_backward_fake, public="cross_entropy",
)
_linear = kernel_op(
    "linear_cross_entropy_fp32_loss",
    "(Tensor hidden, Tensor weight, Tensor targets, int ignore_index, str reduction, int? chunk_rows, "
    "bool need_grad) -> (Tensor, Tensor, Tensor)",
    _linear_impl, _linear_fake, public="linear_cross_entropy",
)


class _CrossEntropy(torch.autograd.Function):
    """Per-row loss (N,) fp32 with the fused backward."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        loss, lse = _rows(logits, targets, ignore_index)
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        return _rows_backward(logits, targets, lse, grad_loss, ctx.ignore_index), None, None


def _linear_forward(ctx, linear, hidden, weight, targets, ignore_index, reduction, chunk_rows):
    """The autograd forward of the chunked LM head + loss through `linear` (`_linear_impl` with the chunk's rows
    in Triton, torch or native code): the gradients it computes on the way are saved for the backward."""
    need_grad = hidden.requires_grad or weight.requires_grad
    loss, grad_hidden, grad_weight = linear(hidden, weight, targets, ignore_index, reduction, chunk_rows, need_grad)
    ctx.save_for_backward(grad_hidden, grad_weight)
    return loss


def _linear_backward(ctx, grad_out):
    """(d hidden, d weight): the gradients the forward saved, times the incoming one."""
    grad_hidden, grad_weight = ctx.saved_tensors
    g = grad_out.float()
    dh = (grad_hidden.float() * g).to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
    dw = (grad_weight.float() * g).to(grad_weight.dtype) if ctx.needs_input_grad[1] else None
    return dh, dw


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunked LM-head + cross-entropy; gradients are computed during the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk_rows):
        return _linear_forward(ctx, _linear, hidden, weight, targets, ignore_index, reduction, chunk_rows)

    @staticmethod
    def backward(ctx, grad_out):
        return (*_linear_backward(ctx, grad_out), None, None, None, None)


class _LinearCrossEntropyTorch(torch.autograd.Function):
    """`_LinearCrossEntropy` with each chunk's rows done by `rows` (`linear_cross_entropy_torch`)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk_rows, rows):
        linear = functools.partial(_linear_impl, rows=rows)
        return _linear_forward(ctx, linear, hidden, weight, targets, ignore_index, reduction, chunk_rows)

    @staticmethod
    def backward(ctx, grad_out):
        return (*_linear_backward(ctx, grad_out), None, None, None, None, None)


# ----------------------------------------------------------------------------- kernels
# `tl` (triton.language) is bound into this module by `jit_kernel` when the kernels
# are first built; importing this module never imports triton.


def _cross_entropy_fwd_kernel(Logits, Targets, Loss, Lse, stride_row, n_cols, ignore_index, BLOCK: tl.constexpr):
    # One program per row: stream the row in BLOCK chunks with an online log-sum-exp.
    # exp(x) is computed as exp2(x * log2(e)); Triton kernels cannot read a Python
    # global, hence the literal 1.4426950408889634.
    row = tl.program_id(0).to(tl.int64)
    base = Logits + row * stride_row
    offs = tl.arange(0, BLOCK)
    # The running max starts at -inf (a finite start such as -1e30 gave -inf for rows whose logits all
    # lie below it); while it is still -inf the shift is 0, so exp2(-inf - -inf) = NaN never appears.
    run_max = float("-inf")
    run_sum = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)  # (BLOCK,)
        new_max = tl.maximum(run_max, tl.max(x, axis=0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp2((run_max - shift) * 1.4426950408889634) + tl.sum(
            tl.exp2((x - shift) * 1.4426950408889634), axis=0
        )
        run_max = new_max
    log_sum = tl.log(run_sum)
    target = tl.load(Targets + row).to(tl.int64)
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < n_cols)
    target_logit = tl.load(base + tl.where(in_range, target, 0)).to(tl.float32)
    # (max - x_t) + log_sum, as log_softmax computes it: lse - x_t would cancel for huge logits
    loss = tl.where(in_range, (run_max - target_logit) + log_sum, float("nan"))
    loss = tl.where(ignored, 0.0, loss)
    tl.store(Loss + row, loss)
    tl.store(Lse + 2 * row, run_max)
    tl.store(Lse + 2 * row + 1, log_sum)


def _cross_entropy_bwd_kernel(
    Logits, Targets, Lse, GradRows, GradLogits, stride_row, stride_grad, n_cols, BLOCK: tl.constexpr
):
    # grad[n, c] = (softmax(x)[c] - [c == target]) * grad_rows[n]; one chunk per program.
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(Logits + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
    row_max = tl.load(Lse + 2 * row)
    log_sum = tl.load(Lse + 2 * row + 1)
    g = tl.load(GradRows + row)
    target = tl.load(Targets + row).to(tl.int64)
    p = tl.exp2(((x - row_max) - log_sum) * 1.4426950408889634)
    grad = (p - tl.where(cols == target, 1.0, 0.0)) * g
    tl.store(GradLogits + row * stride_grad + cols, grad.to(GradLogits.dtype.element_ty), mask=mask)


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    """Jit the cross-entropy kernels once per process and mode (compiled vs interpreted)."""
    del interpret  # cache key only: jit_kernel reads the mode itself
    fwd_configs = [config(BLOCK=b, num_warps=w, num_stages=s) for b in (4096, 8192) for w in (8, 16) for s in (2, 3)]
    bwd_configs = [config(BLOCK=b, num_warps=w, num_stages=1) for b in (2048, 4096, 8192) for w in (4, 8, 16)]
    return SimpleNamespace(
        # The interpreter chunk (128) is smaller than a test vocab of 1000: the loop runs.
        forward=jit_kernel(_cross_entropy_fwd_kernel, fwd_configs, config(BLOCK=128), key=["n_cols"]),
        # linear_cross_entropy writes the gradient over the logits it reads: autotuning restores them
        backward=jit_kernel(_cross_entropy_bwd_kernel, bwd_configs, config(BLOCK=128), key=["n_cols"],
                            restore=["GradLogits"]),
    )

