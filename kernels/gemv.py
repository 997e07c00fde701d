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
and SwiGLU are kernels of their own before the products that consume them. Here program (n, s)
streams ``BLOCK_N`` weight rows (each row's loads contiguous) over the s-th of ``SPLIT_K`` stretches
of K for every input row; with K split, the last program of a column block to finish adds the
stretches' partial sums (arrival counters that each launch leaves at zero). The prologue computes
the product's input on the way: ``residual + x`` (rounded to the dtype, as the unfused add is; the
first column block writes it, the new residual stream), times the norm's gain, with the row's sum
of squares kept beside the product so its 1 / rms scales the output at the end (RMSNorm is linear
once the statistics are known; the input is read once), or ``silu(gate) * up``, rounded as
``kernels.activation.silu_mul`` rounds it. The products run on tensor cores (``tl.dot``, rows padded
to 16) or in fp32 FMAs (each thread's partial sums of a (rows, BLOCK_N, BLOCK_K) tile, summed over
K at the end), whichever config the autotuner finds fastest per shape, prologue and row bucket.

Status: correct on the interpreter and on an H100. There (bench/RESULTS.md, sixth and seventh leases)
the tensor-core configs were 0.66-0.99x Kiln's add+norm kernel then cuBLAS at the 1.1B products, and the
FMA configs 1.09-1.31x at one row: every product faster than the path it would replace; a batch-1 step
through them ran 1.16x the plain step on an H200 (eighth lease). FMA configs fit row buckets up to
``FMA_MAX_ROWS`` (4); above that only tensor-core configs remain, so the model's fused decode step
(``Transformer._forward_gemv``) runs for steps of at most 4 rows, and only when ``Transformer.fused_gemv``
is set: off until its end-to-end GPU tests have all run. With ``kernels._utils.PDL`` (``set_pdl``, sm_90+,
off) each launch uses programmatic dependent launch: its programs prefetch their first weight tile toward L2
while the kernel ahead of them ends, then wait for its outputs (a first form, prefetching whole slices, made
the H200 step 1.24x slower; this one is untimed).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kernels import _utils
from kernels._utils import (
    FLOAT_DTYPES,
    arrival_counters,
    check_residual,
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

MAX_ROWS = 16  # one tl.dot tile of rows
FMA_MAX_ROWS = 4  # the most rows an FMA config's partial sums fit (FMA_TILE over the smallest tile, 2 x 1024)
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
    interpreter_config = _interpreter_config(interpreting())
    partials_size, blocks = _scratch_sizes(n, next_power_of_2(rows), _split_shapes(interpreter_config))
    partials = torch.empty(partials_size, device=x.device, dtype=torch.float32)
    counters = arrival_counters(x.device, blocks)
    pdl = _utils.pdl()  # programmatic dependent launch (kernels._utils.PDL)
    _built_kernel(interpreter_config)[lambda meta: (-(-n // meta["BLOCK_N"]), meta["SPLIT_K"])](
        x, res, gain, total, weight, out, partials, counters,
        x.stride(0), res.stride(0), total.stride(0), weight.stride(0), out.stride(0),
        rows, n, k, eps,
        PROLOGUE=prologue, HAS_RESIDUAL=residual is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_M=next_power_of_2(rows), PDL=pdl,
        **({"launch_pdl": True} if pdl else {}),
    )
    return out


def _scratch_sizes(n: int, block_m: int, splits) -> tuple[int, int]:
    """The split-K scratch (fp32 elements) and arrival counters that any of ``splits`` may need for ``n`` outputs.

    A config that splits K stores each stretch's (TILE_M, BLOCK_N) partial sums and TILE_M sums of squares
    per column block (TILE_M: 16 on tensor cores, else the launch's row bucket); one that does not needs
    neither, so the scratch is one element when no config splits."""
    partials, blocks = 1, 1
    for split, block_n, dot in splits:
        if split > 1:
            n_blocks = -(-n // block_n)
            blocks = max(blocks, n_blocks)
            partials = max(partials, split * n_blocks * (MAX_ROWS if dot else block_m) * (block_n + 1))
    return partials, blocks


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
    X, R, G, S, W, Y, Partials, Counters,
    stride_xm, stride_rm, stride_sm, stride_wn, stride_ym,
    n_rows, n_out, n_in, eps,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, DOT: tl.constexpr,
    LOOP_STAGES: tl.constexpr, PDL: tl.constexpr,
):
    # Program (n, s): output columns [n * BLOCK_N, +BLOCK_N) of every row, over the s-th of SPLIT_K
    # stretches of K (whole BLOCK_K tiles). RMSNorm is linear in its input once the row's statistics are
    # known: the product runs on (residual + x) * gain while the sum of squares builds up beside it, and
    # the row's 1 / rms scales the result at the end, so the input is read once.
    # DOT: the products on tensor cores (tl.dot, rows padded to 16); else in fp32 FMAs, each thread
    # keeping its own partial sums of a (BLOCK_M, BLOCK_N, BLOCK_K) tile, summed over K once at the end
    # (BLOCK_M is the launch's power-of-two row count there, so one row reads the weights once).
    # LOOP_STAGES: K tiles in flight. Triton pipelines (cp.async through shared memory) only the loads
    # that feed a tl.dot unless the loop asks; 1 leaves the FMA path's loads to the warps' own latency hiding.
    # PDL: launched with programmatic dependent launch (kernels._utils.PDL), the program may run before the
    # kernel ahead of it has finished. It touches nothing that kernel writes (inputs, the split-K scratch, the
    # outputs) until griddepcontrol.wait; before that it asks L2 for its first tile of the weights, one prefetch
    # per 128 bytes (64 16-bit elements), so the weight stream starts during the other kernel's tail; and it
    # lets the next launch begin once its own weights are read.
    TILE_M: tl.constexpr = 16 if DOT else BLOCK_M
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, TILE_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < n_rows
    n_ok = offs_n < n_out
    x_rows = X + offs_m[:, None].to(tl.int64) * stride_xm
    r_rows = R + offs_m[:, None].to(tl.int64) * stride_rm
    w_rows = W + offs_n[:, None].to(tl.int64) * stride_wn
    eps = tl.cast(eps, tl.float32)  # fp64 when launched by torch.compile
    split = tl.cdiv(tl.cdiv(n_in, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = pid_k * split
    k_stop = tl.minimum(n_in, k_begin + split)
    sq_tile = tl.zeros((TILE_M, BLOCK_K), dtype=tl.float32)  # summed across K once, after the loop
    if DOT:
        acc = tl.zeros((TILE_M, BLOCK_N), dtype=tl.float32)
    else:
        acc3 = tl.zeros((TILE_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    if PDL:  # the first K tile only: whole slices, triggering at the start, made an H200 step 1.24x slower
        tl.static_assert(BLOCK_K >= 64)
        w_lines = W + tl.minimum(offs_n, n_out - 1)[:, None].to(tl.int64) * stride_wn  # in-bounds rows
        lines = tl.minimum(k_begin + tl.arange(0, BLOCK_K // 64) * 64, n_in - 1)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [w_lines + lines[None, :]],
                                  dtype=tl.int32, is_pure=False, pack=1)
        tl.extra.cuda.gdc_wait()  # the kernel before has finished and its writes are visible
    for k0 in tl.range(k_begin, k_stop, BLOCK_K, num_stages=LOOP_STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_stop
        ok = m_ok[:, None] & k_ok[None, :]
        if PROLOGUE == 2:  # silu(gate) * up, each rounded as F.silu and the product are
            gate = tl.load(x_rows + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
            up = tl.load(x_rows + n_in + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(W.dtype.element_ty).to(tl.float32)
            a = (act * up).to(W.dtype.element_ty)
        else:
            a = tl.load(x_rows + offs_k[None, :], mask=ok, other=0.0)
            if PROLOGUE == 1:
                if HAS_RESIDUAL:  # the sum rounded to the dtype, as the unfused add is; column block 0 keeps it
                    a = (tl.load(r_rows + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
                         + a.to(tl.float32)).to(W.dtype.element_ty)
                    if pid == 0:
                        tl.store(S + offs_m[:, None].to(tl.int64) * stride_sm + offs_k[None, :], a, mask=ok)
                af = a.to(tl.float32)
                sq_tile += af * af
                gain = tl.load(G + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                a = (af * gain[None, :]).to(W.dtype.element_ty)
        w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
        if DOT:
            acc += tl.dot(a, tl.trans(w), input_precision=DOT_PRECISION)
        else:
            acc3 += a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    if PDL:  # the weights are read: the next product may start (in this kernel's tail, not beside its loop)
        tl.extra.cuda.gdc_launch_dependents()
    if not DOT:
        acc = tl.sum(acc3, axis=2)
    squares = tl.sum(sq_tile, axis=1)
    if SPLIT_K > 1:
        # Each stretch leaves its partial sums in Partials; the last of a column block's programs to arrive
        # (its counter in Counters, back to 0 when it is done) adds them up and writes the output.
        tile = TILE_M * BLOCK_N
        n_blocks = tl.num_programs(0)
        offs_tile = offs_m[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(Partials + (pid_k * n_blocks + pid) * tile + offs_tile, acc)
        sq_part = Partials + SPLIT_K * n_blocks * tile + pid * SPLIT_K * TILE_M
        if PROLOGUE == 1:
            tl.store(sq_part + pid_k * TILE_M + offs_m, squares)
        tl.debug_barrier()  # every thread's partials are written before the counter says so
        if tl.atomic_add(Counters + pid, 1, sem="acq_rel") == SPLIT_K - 1:
            acc = tl.zeros((TILE_M, BLOCK_N), dtype=tl.float32)
            squares = tl.zeros((TILE_M,), dtype=tl.float32)
            for s in range(SPLIT_K):
                acc += tl.load(Partials + (s * n_blocks + pid) * tile + offs_tile, cache_modifier=".cg")
                if PROLOGUE == 1:
                    squares += tl.load(sq_part + s * TILE_M + offs_m, cache_modifier=".cg")
            tl.atomic_xchg(Counters + pid, 0)
            if PROLOGUE == 1:
                acc = acc * (1.0 / tl.sqrt(squares / n_in + eps))[:, None]
            tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
                     mask=m_ok[:, None] & n_ok[None, :])
    else:
        if PROLOGUE == 1:
            acc = acc * (1.0 / tl.sqrt(squares / n_in + eps))[:, None]
        tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


def _configs() -> list:
    # (BLOCK_N, BLOCK_K, warps, stages, SPLIT_K, DOT). Tensor cores: the fastest of each 1.1B product in a sweep
    # on an H100 (bench/gemv_configs.py, bench/RESULTS.md: 128 x 128 tiles for the products with the norm in,
    # 16 x 256 for o, 64 x 256 split 8 ways for down); the sweep's trend (wider column blocks won) also puts
    # 256 x 64 tiles on offer, untimed. FMAs: a few weight rows per program, long K tiles, the loads pipelined
    # (3 stages) or not (1). Timed at one row on an H100 (seventh lease), the fastest were 8 x 512 pipelined
    # (norm + qkv, norm + gate/up), 2 x 1024 unpipelined (o), 4 x 512 pipelined (SwiGLU + down) and 8 x 1024
    # pipelined (norm + LM head), none splitting K.
    shapes = [(128, 128, 4, 3, 1, True), (128, 128, 4, 3, 2, True), (128, 128, 4, 3, 4, True),
              (256, 64, 4, 4, 1, True), (256, 64, 8, 4, 2, True),
              (16, 256, 4, 4, 1, True), (64, 256, 4, 3, 8, True), (64, 128, 4, 3, 8, True),
              (4, 512, 4, 3, 1, False), (8, 256, 4, 3, 1, False), (8, 512, 4, 3, 1, False),
              (8, 1024, 4, 3, 1, False), (2, 1024, 4, 1, 1, False),
              (16, 256, 4, 3, 1, False), (8, 256, 4, 3, 4, False), (8, 512, 4, 1, 1, False), (4, 512, 4, 1, 1, False)]
    return [config(BLOCK_N=n, BLOCK_K=k, SPLIT_K=sk, DOT=dot, LOOP_STAGES=st, num_warps=w, num_stages=st)
            for n, k, w, st, sk, dot in shapes]


FMA_TILE = 8192  # most elements of an FMA config's (rows, BLOCK_N, BLOCK_K) partial sums: 64 registers a thread


def _prune(configs, named_args, **kwargs):
    """FMA configs only while their per-thread partial sums fit in registers at this launch's row count."""
    rows = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", MAX_ROWS))
    fits = [c for c in configs if c.kwargs["DOT"] or rows * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= FMA_TILE]
    return fits or [c for c in configs if c.kwargs["DOT"]]


# The interpreter's one config splits K and uses tensor cores, so CPU tests run the partial-sum path; tests vary both.
INTERPRETER_SPLIT_K = 2
INTERPRETER_DOT = True


def _interpreter_config(interpret: bool) -> tuple:
    """The interpreter's (SPLIT_K, DOT) now (the cache key of what is built from it); () on a GPU."""
    return (INTERPRETER_SPLIT_K, INTERPRETER_DOT) if interpret else ()


def _kernel_configs(interpreter_config: tuple) -> list:
    if interpreter_config:
        split_k, dot = interpreter_config
        return [config(BLOCK_N=16, BLOCK_K=32, SPLIT_K=split_k, DOT=dot, LOOP_STAGES=2)]
    return _configs()


@functools.cache
def _split_shapes(interpreter_config: tuple) -> tuple[tuple[int, int, bool], ...]:
    """(SPLIT_K, BLOCK_N, DOT) of each config the launch may run: what its scratch buffers must hold."""
    return tuple({(c.kwargs["SPLIT_K"], c.kwargs["BLOCK_N"], c.kwargs["DOT"])
                  for c in _kernel_configs(interpreter_config)})


def _kernel(interpret: bool):
    """The jitted (GPU: autotuned) kernel for the interpreter or a GPU, as a launch would get it."""
    return _built_kernel(_interpreter_config(interpret))


@functools.cache
def _built_kernel(interpreter_config: tuple):
    # Tuned per product shape, prologue and power-of-two row count (the decode batch's bucket).
    interpret = bool(interpreter_config)
    configs = _kernel_configs(interpreter_config)
    return jit_kernel(_gemv_kernel, [] if interpret else configs, configs[0] if interpret else None,
                      key=["n_out", "n_in", "PROLOGUE", "BLOCK_M"], prune=_prune, do_not_specialize=("n_rows",))
