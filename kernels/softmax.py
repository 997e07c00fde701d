"""Fused row softmax with temperature, for any row length (vocabulary rows of 128k+).

API::

    softmax(x, temperature=1.0) -> probs            # Triton path (CUDA, or TRITON_INTERPRET=1)
    softmax_reference(x, temperature=1.0) -> probs  # plain torch; the CPU path
    available(device) -> bool                       # can softmax() run on this device?

``x`` is (N, V) fp32/fp16/bf16 (fp64 is accepted and computed in fp32); ``temperature`` is a
finite float > 0 or an (N,) fp32 tensor
of per-row temperatures (batched sampling with per-request settings). Returns (N, V)
fp32 probabilities of ``softmax(x / temperature)`` over the last dim, computed in
fp32. Temperature 0 (greedy) is the caller's job: it is not a distribution.

Two launch plans, picked from the row length:

* rows that fit one block (V <= 16384 on GPU): one program per row loads the row
  once into registers, max, exp2, sum, normalize, store -- one read, one write;
* longer rows: the row is cut into chunks spread over programs (so 64 rows of 128k
  still fill every SM). Pass 1 writes each chunk's (max, sum exp) to a tiny buffer;
  pass 2 merges the row's chunk stats and writes its chunk normalized, taking the chunks
  last-first: those pass 1 read last are the likeliest still in L2.

``exp(x / T)`` is computed as ``exp2(x * log2(e) / T)`` with the factor folded into
one scale. Fully ``-inf`` rows give NaN, like ``torch.softmax``.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from kernels._utils import (
    FLOAT_DTYPES,
    LOG2E,
    check_same_device,
    check_tensor,
    check_triton_device,
    config,
    interpreting,
    jit_kernel,
    next_power_of_2,
    triton_available,
)

# Row lengths up to this run as one block per row; longer rows are chunked.
_MAX_SINGLE_BLOCK = 16384
_CHUNK = 4096
# The interpreter runs tiny test shapes: small limits so tests reach both plans.
_INTERPRET_MAX_SINGLE_BLOCK = 512
_INTERPRET_CHUNK = 256


def available(device: torch.device | str) -> bool:
    """True when ``softmax`` (the Triton path) can run on ``device``."""
    return triton_available(device)


def softmax_reference(x: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Plain-torch ``softmax(x / temperature)`` over the last dim, fp32 out."""
    _check_inputs(x, temperature)
    x32 = x.float()  # (N, V) fp32 math
    if isinstance(temperature, torch.Tensor):
        x32 = x32 / temperature.float()[:, None]
    else:
        x32 = x32 / float(temperature)
    return torch.softmax(x32, dim=-1)


def softmax(x: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Fused Triton softmax of ``x / temperature`` over the last dim; (N, V) fp32 out."""
    return _softmax(x, temperature, **LONG_ROW_PLAN)


# How pass 2 of the long-row plan meets L2 (bench/softmax_variants.py times each choice):
# reverse: its programs take the row's chunks last-first, those pass 1 read last (likeliest still in L2);
# l2_hints: pass 1 loads evict_last (keep x in L2), pass 2 loads evict_first and stores streaming.
# On an H100 at 64 x 128256 fp32 (CUDA-graph replays): in order 36.3 us, hints 33.0, reversed 28.8,
# both 31.3; chunks of 8192 or 16384 no better (bench/RESULTS.md, fourth lease).
LONG_ROW_PLAN = {"reverse": True, "l2_hints": False, "chunk": _CHUNK}


def _softmax(x: torch.Tensor, temperature: float | torch.Tensor, reverse: bool, l2_hints: bool,
             chunk: int) -> torch.Tensor:
    _check_inputs(x, temperature)
    check_triton_device("softmax", x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), device=x.device, dtype=torch.float32)
    if n_rows == 0 or n_cols == 0:
        return y
    per_row = isinstance(temperature, torch.Tensor)
    temps = temperature.float().contiguous() if per_row else y  # y: unused dummy pointer
    scale = LOG2E if per_row else LOG2E / float(temperature)
    interpret = interpreting()
    kernels = _kernels(interpret)
    max_single = _INTERPRET_MAX_SINGLE_BLOCK if interpret else _MAX_SINGLE_BLOCK
    if n_cols <= max_single:
        block = max(16, next_power_of_2(n_cols))
        kernels.row[(n_rows,)](x, y, temps, x.stride(0), y.stride(0), n_cols, scale, PER_ROW_T=per_row, BLOCK=block)
        return y
    chunk = _INTERPRET_CHUNK if interpret else chunk
    n_chunks = -(-n_cols // chunk)
    stats_max, stats_sum = torch.empty((2, n_rows, n_chunks), device=x.device, dtype=torch.float32)  # one allocation
    grid = (n_rows, n_chunks)  # rows on axis 0: grid axes 1 and 2 stop at 65535
    kernels.chunk_stats[grid](
        x, stats_max, stats_sum, temps, x.stride(0), n_cols, n_chunks, scale, PER_ROW_T=per_row, BLOCK=chunk,
        L2_HINTS=l2_hints,
    )
    kernels.chunk_normalize[grid](
        x, y, stats_max, stats_sum, temps, x.stride(0), y.stride(0), n_cols, n_chunks, scale,
        PER_ROW_T=per_row, BLOCK=chunk, CHUNKS_POW2=max(2, next_power_of_2(n_chunks)), REVERSE=reverse,
        L2_HINTS=l2_hints,
    )
    return y


def _check_inputs(x: torch.Tensor, temperature: float | torch.Tensor) -> None:
    check_tensor("x", x, 2, FLOAT_DTYPES + (torch.float64,))
    if isinstance(temperature, torch.Tensor):
        check_tensor("temperature", temperature, 1)
        if temperature.shape[0] != x.shape[0]:
            raise ValueError(
                f"per-row temperature must have shape ({x.shape[0]},) to match x {tuple(x.shape)}, "
                f"got {tuple(temperature.shape)}"
            )
        check_same_device(x=x, temperature=temperature)
        # Value check only where it costs no GPU->CPU sync.
        if temperature.device.type == "cpu" and not bool(((temperature > 0) & temperature.isfinite()).all()):
            raise ValueError("every temperature must be a finite number > 0 (handle greedy sampling before softmax)")
    else:
        t = float(temperature)
        if not t > 0 or t == float("inf"):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


# ----------------------------------------------------------------------------- kernels
# `tl` (triton.language) is bound into this module by `jit_kernel` when the kernels
# are first built; importing this module never imports triton.


def _softmax_row_kernel(X, Y, T, stride_x, stride_y, n_cols, scale, PER_ROW_T: tl.constexpr, BLOCK: tl.constexpr):
    # One program per row; the whole row sits in registers. scale = log2(e) / temperature.
    row = tl.program_id(0).to(tl.int64)
    scale = tl.cast(scale, tl.float32)  # fp64 when launched by torch.compile
    if PER_ROW_T:
        scale = scale / tl.load(T + row)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=float("-inf")).to(tl.float32)  # (BLOCK,)
    row_max = tl.max(x, axis=0)
    # -inf entries (and padding lanes) weigh 0 even when a huge temperature rounds scale to 0
    p = tl.where(x == float("-inf"), 0.0, tl.exp2((x - row_max) * scale))
    denom = tl.sum(p, axis=0)
    tl.store(Y + row * stride_y + cols, p / denom, mask=mask)


def _softmax_chunk_stats_kernel(
    X, M, S, T, stride_x, n_cols, n_chunks, scale, PER_ROW_T: tl.constexpr, BLOCK: tl.constexpr,
    L2_HINTS: tl.constexpr,
):
    # Pass 1 over a long row: (max, sum exp2((x - max) * scale)) of one chunk.
    row = tl.program_id(0).to(tl.int64)
    scale = tl.cast(scale, tl.float32)  # fp64 when launched by torch.compile
    chunk = tl.program_id(1)
    if PER_ROW_T:
        scale = scale / tl.load(T + row)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + row * stride_x + cols, mask=cols < n_cols, other=float("-inf"),
                eviction_policy="evict_last" if L2_HINTS else "").to(tl.float32)
    chunk_max = tl.max(x, axis=0)
    # An all -inf chunk must contribute sum 0, not exp2(-inf - -inf) = NaN.
    shift = tl.where(chunk_max == float("-inf"), 0.0, chunk_max)
    chunk_sum = tl.sum(tl.where(x == float("-inf"), 0.0, tl.exp2((x - shift) * scale)), axis=0)
    tl.store(M + row * n_chunks + chunk, chunk_max)
    tl.store(S + row * n_chunks + chunk, chunk_sum)


def _softmax_chunk_normalize_kernel(
    X, Y, M, S, T, stride_x, stride_y, n_cols, n_chunks, scale,
    PER_ROW_T: tl.constexpr, BLOCK: tl.constexpr, CHUNKS_POW2: tl.constexpr, REVERSE: tl.constexpr,
    L2_HINTS: tl.constexpr,
):
    # Pass 2: merge the row's chunk stats (a few dozen floats), write this chunk.
    row = tl.program_id(0).to(tl.int64)
    scale = tl.cast(scale, tl.float32)  # fp64 when launched by torch.compile
    chunk = tl.program_id(1)
    if REVERSE:
        chunk = n_chunks - 1 - chunk
    if PER_ROW_T:
        scale = scale / tl.load(T + row)
    idx = tl.arange(0, CHUNKS_POW2)
    stat_mask = idx < n_chunks
    maxes = tl.load(M + row * n_chunks + idx, mask=stat_mask, other=float("-inf"))
    sums = tl.load(S + row * n_chunks + idx, mask=stat_mask, other=0.0)
    row_max = tl.max(maxes, axis=0)
    weights = tl.where(maxes == float("-inf"), 0.0, tl.exp2((maxes - row_max) * scale))
    denom = tl.sum(sums * weights, axis=0)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=float("-inf"),
                eviction_policy="evict_first" if L2_HINTS else "").to(tl.float32)
    p = tl.where(x == float("-inf"), 0.0, tl.exp2((x - row_max) * scale))
    tl.store(Y + row * stride_y + cols, p / denom, mask=mask, cache_modifier=".cs" if L2_HINTS else "")


def _warps_configs() -> list:
    return [config(num_warps=w, num_stages=1) for w in (4, 8, 16)]


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    """Jit the softmax kernels once per process and mode (compiled vs interpreted)."""
    del interpret  # cache key only: jit_kernel reads the mode itself
    one = config(num_warps=4, num_stages=1)
    return SimpleNamespace(
        row=jit_kernel(_softmax_row_kernel, _warps_configs(), one, key=["BLOCK", "PER_ROW_T"]),
        chunk_stats=jit_kernel(_softmax_chunk_stats_kernel, _warps_configs(), one,
                               key=["BLOCK", "PER_ROW_T", "L2_HINTS"]),
        chunk_normalize=jit_kernel(
            _softmax_chunk_normalize_kernel, _warps_configs(), one,
            key=["BLOCK", "CHUNKS_POW2", "PER_ROW_T", "REVERSE", "L2_HINTS"],
        ),
    )
