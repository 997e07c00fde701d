"""kernels.gemv: a few rows times a weight matrix, plain or after a fused RMSNorm or SwiGLU.

CPU tests run the kernel in the Triton interpreter at tiny, awkward shapes (1 to 16 rows, widths
that end mid-tile) in fp32/fp16 against the unfused kernels' references and an fp64 product;
GPU tests run it compiled in bf16 at the Llama 1.1B decode shapes and skip without CUDA.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels import _utils, activation, gemv, norm  # noqa: E402
from kernel_checks import assert_close, requires_cuda, skip_unless_interpreted  # noqa: E402

on_cpu_interpreter = skip_unless_interpreted(gemv)
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}


def _inputs(shape, dtype, device, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)


def _product(a, weight):
    """The exact product of the (already rounded) inputs, rounded once to their dtype."""
    return (a.double() @ weight.double().T).to(a.dtype)


def check_all(rows, n, k, dtype, device):
    x, residual = _inputs((rows, k), dtype, device, 1), _inputs((rows, k), dtype, device, 2)
    h = _inputs((rows, 2 * k), dtype, device, 3)
    weight = _inputs((n, k), dtype, device, 4, scale=k ** -0.5)
    gain = 1 + 0.1 * _inputs((k,), dtype, device, 5)
    atol, rtol = TOL[dtype]
    what = f"{rows}x{k} @ {n}x{k} {dtype}"

    got = gemv.gemv(x, weight)
    assert got.shape == (rows, n) and got.dtype == dtype
    assert_close(got, _product(x, weight), atol, rtol, "gemv " + what)

    for res in (residual, None):
        got, summed = gemv.rmsnorm_gemv(x, res, gain, weight, 1e-5)
        normed, want_summed = norm.add_norm_reference(x, res, gain, None, 1e-5, True)
        assert_close(summed, want_summed, 0, 0, f"rmsnorm_gemv summed {what} residual={res is not None}")
        assert_close(got, _product(normed, weight), atol, rtol, f"rmsnorm_gemv {what} residual={res is not None}")
        summed64 = want_summed.double()  # RMSNorm exactly (the sum is the dtype's, as the model keeps it)
        exact = summed64 * torch.rsqrt(summed64.pow(2).mean(-1, keepdim=True) + 1e-5) * gain.double()
        assert_close(got, (exact @ weight.double().T).to(dtype), atol, rtol, f"rmsnorm_gemv {what} vs fp64 RMSNorm")
        if res is None:
            assert summed is x

    got = gemv.silu_mul_gemv(h, weight)
    assert_close(got, _product(activation.silu_mul_reference(h), weight), atol, rtol, "silu_mul_gemv " + what)


@on_cpu_interpreter
@pytest.mark.parametrize("rows,n,k", [(1, 17, 40), (3, 40, 33), (16, 16, 64), (2, 33, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split_k,dot", [(1, True), (2, True), (3, True), (1, False), (3, False)])
def test_matches_the_unfused_kernels_and_an_exact_product(rows, n, k, dtype, split_k, dot, monkeypatch):
    """K whole in one program, or split in stretches whose partial sums the last program adds up
    (3 stretches of 32 over K = 33 or 40: some programs have no K at all); on tensor cores or in FMAs."""
    monkeypatch.setattr(gemv, "INTERPRETER_SPLIT_K", split_k)
    monkeypatch.setattr(gemv, "INTERPRETER_DOT", dot)
    check_all(rows, n, k, dtype, "cpu")
    counters = _utils._ARRIVAL_COUNTERS.get(torch.device("cpu"))
    assert counters is None or not counters.any(), "a launch left its arrival counters non-zero"


@on_cpu_interpreter
@pytest.mark.parametrize("rows,split_k,dot", [(3, 3, False), (1, 2, False), (5, 2, True), (16, 3, True)])
def test_split_k_scratch_holds_what_the_kernel_writes(rows, split_k, dot, monkeypatch):
    """The launch sizes its split-K scratch for the configs it may run (rows padded to 16 on tensor cores,
    to the row bucket in FMAs): the kernel writes all of it and nothing past it; no split, one element."""
    monkeypatch.setattr(gemv, "INTERPRETER_SPLIT_K", split_k)
    monkeypatch.setattr(gemv, "INTERPRETER_DOT", dot)
    guard, sentinel, scratch = 64, 12345.0, []
    empty = torch.empty

    def recording_empty(*size, **kwargs):
        if kwargs.get("dtype") is torch.float32 and len(size) == 1 and isinstance(size[0], int):
            buffer = torch.full((size[0] + guard,), sentinel)
            scratch.append((size[0], buffer))
            return buffer[:size[0]]
        return empty(*size, **kwargs)

    n, k = 40, 100
    x, weight, gain = _inputs((rows, k), torch.float32, "cpu", 1), _inputs((n, k), torch.float32, "cpu", 2), \
        _inputs((k,), torch.float32, "cpu", 3)
    monkeypatch.setattr(torch, "empty", recording_empty)
    got, _ = gemv.rmsnorm_gemv(x, None, gain, weight, 1e-5)
    monkeypatch.undo()
    [(size, buffer)] = scratch
    tile_m = 16 if dot else gemv.next_power_of_2(rows)
    assert size == split_k * -(-n // 16) * tile_m * (16 + 1)  # the interpreter's one config: BLOCK_N 16
    assert (buffer[size:] == sentinel).all(), "the kernel wrote past its split-K scratch"
    assert (buffer[:size] != sentinel).all(), "scratch the kernel never writes"
    normed, _ = norm.add_norm_reference(x, None, gain, None, 1e-5, True)
    assert_close(got, _product(normed, weight), 1e-5, 1e-5, "rmsnorm_gemv through the recorded scratch")
    assert gemv._scratch_sizes(n, 4, ((1, 16, True), (1, 64, False))) == (1, 1)


def test_fma_configs_fit_up_to_fma_max_rows():
    """The model's fused decode step runs up to FMA_MAX_ROWS rows: the row buckets some FMA config fits (above,
    only the tensor-core configs, slower than cuBLAS on an H100, remain after pruning)."""
    pytest.importorskip("triton")
    configs = gemv._configs()

    def fma(rows):
        return [c for c in gemv._prune(configs, {}, BLOCK_M=rows) if not c.kwargs["DOT"]]

    assert all(fma(rows) for rows in (1, 2, gemv.FMA_MAX_ROWS))
    assert not fma(2 * gemv.FMA_MAX_ROWS) and gemv._prune(configs, {}, BLOCK_M=2 * gemv.FMA_MAX_ROWS)


@on_cpu_interpreter
def test_programmatic_dependent_launch_needs_a_compiled_kernel_on_a_hopper_gpu(monkeypatch):
    """`set_pdl(True)` refuses the interpreter and CPUs by name; a PDL flag left on never reaches an interpreted
    launch (griddepcontrol and the L2 prefetch are GPU instructions), which still computes the product."""
    with pytest.raises(ValueError, match="compiled Triton kernels on a CUDA device"):
        _utils.set_pdl(True, "cpu")
    assert not _utils.PDL
    _utils.set_pdl(False)
    monkeypatch.setattr(_utils, "PDL", True)
    assert not _utils.pdl()
    x, weight = _inputs((2, 40), torch.float32, "cpu", 1), _inputs((24, 40), torch.float32, "cpu", 2)
    assert_close(gemv.gemv(x, weight), _product(x, weight), 1e-5, 1e-5, "gemv with the PDL flag on, interpreted")


@on_cpu_interpreter
def test_references_equal_the_unfused_torch_ops():
    x, residual = _inputs((2, 24), torch.float32, "cpu", 1), _inputs((2, 24), torch.float32, "cpu", 2)
    weight, gain = _inputs((8, 24), torch.float32, "cpu", 3), _inputs((24,), torch.float32, "cpu", 4)
    y, summed = gemv.rmsnorm_gemv_reference(x, residual, gain, weight)
    normed, _ = norm.add_norm_reference(x, residual, gain, None, 1e-5, True)
    torch.testing.assert_close(y, normed @ weight.T)
    torch.testing.assert_close(summed, residual + x)
    h = _inputs((2, 48), torch.float32, "cpu", 5)
    torch.testing.assert_close(gemv.silu_mul_gemv_reference(h, weight), activation.silu_mul_reference(h) @ weight.T)


@pytest.mark.parametrize("call,match", [
    (lambda: gemv.gemv_reference(torch.zeros(17, 8), torch.zeros(4, 8)), "1 to 16 rows"),
    (lambda: gemv.gemv_reference(torch.zeros(2, 8), torch.zeros(4, 6)), r"weight must be \(N, 8\)"),
    (lambda: gemv.gemv_reference(torch.zeros(2, 8), torch.zeros(4, 8, dtype=torch.float16)), "dtype"),
    (lambda: gemv.gemv_reference(torch.zeros(8), torch.zeros(4, 8)), "2-D"),
    (lambda: gemv.silu_mul_gemv_reference(torch.zeros(2, 7), torch.zeros(4, 3)), "even"),
    (lambda: gemv.rmsnorm_gemv_reference(torch.zeros(2, 8), torch.zeros(3, 8), torch.ones(8), torch.zeros(4, 8)),
     "residual"),
    (lambda: gemv.rmsnorm_gemv_reference(torch.zeros(2, 8), None, torch.ones(6), torch.zeros(4, 8)),
     "norm_weight"),
    (lambda: gemv.rmsnorm_gemv_reference(torch.zeros(2, 8), None, torch.ones(8), torch.zeros(4, 8), eps=0),
     "eps"),
])
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@requires_cuda
@pytest.mark.parametrize("rows", [1, 4, 16])
@pytest.mark.parametrize("n,k", [(2560, 2048), (2048, 2048), (2048, 5632), (11264, 2048)])
def test_gpu_llama_decode_shapes(rows, n, k):
    check_all(rows, n, k, torch.bfloat16, "cuda")
