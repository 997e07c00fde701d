"""kernels.softmax: the Triton softmax against its torch reference.

CPU tests run the kernels in the Triton interpreter at tiny, awkward row lengths that
reach both launch plans (one block per row, and chunked long rows). Without CUDA this
module turns the interpreter on (TRITON_INTERPRET=1) before anything imports triton,
for the whole test process: triton fixes the mode when it is imported. GPU tests run
the compiled kernels at real vocabulary sizes and skip without CUDA.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels import _utils  # noqa: E402
from kernels import softmax as sm  # noqa: E402
from kernel_checks import assert_close as check_close, requires_cuda, skip_unless_interpreted  # noqa: E402

on_cpu_interpreter = skip_unless_interpreted(sm)


def assert_close(actual, expected, atol, rtol, what):
    check_close(actual, expected, atol, rtol, what, equal_nan=True)


# ----------------------------------------------------------------------------- CPU ()


@on_cpu_interpreter
@pytest.mark.parametrize("n_rows,n_cols", [(1, 1), (3, 17), (4, 33), (2, 512), (5, 1000), (2, 3000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_softmax_matches_reference(n_rows, n_cols, dtype, temperature):
    gen = torch.Generator().manual_seed(n_rows * 1000 + n_cols)
    x = (torch.randn(n_rows, n_cols, generator=gen) * 4).to(dtype)
    probs = sm.softmax(x, temperature)
    expected = sm.softmax_reference(x, temperature)
    assert probs.dtype == torch.float32 and probs.shape == (n_rows, n_cols)
    assert_close(probs, expected, atol=1e-6, rtol=1e-5, what=f"softmax {n_rows}x{n_cols} {dtype} T={temperature}")
    assert_close(probs.sum(-1), torch.ones(n_rows), atol=1e-5, rtol=0, what="row sums")


@on_cpu_interpreter
@pytest.mark.parametrize("n_cols", [33, 1000])
def test_per_row_temperature(n_cols):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, n_cols, generator=gen) * 3
    temperature = torch.tensor([0.25, 1.0, 1.5, 3.0])
    assert_close(sm.softmax(x, temperature), sm.softmax_reference(x, temperature), 1e-6, 1e-5, "per-row T")
    # Row i must equal the scalar-temperature softmax at temperature[i].
    for i, t in enumerate(temperature.tolist()):
        assert_close(sm.softmax(x[i : i + 1], t)[0], torch.softmax(x[i] / t, -1), 1e-6, 1e-5, f"row {i}")


@on_cpu_interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the all -inf row
@pytest.mark.parametrize("n_cols", [40, 1000])
def test_masked_logits_and_all_masked_rows(n_cols):
    # Sampling masks logits with -inf (top-k/top-p); a chunk may be entirely -inf.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, n_cols, generator=gen)
    x[0, : n_cols // 2] = float("-inf")  # whole leading chunks masked (long rows)
    x[1, 1::2] = float("-inf")
    x[2] = float("-inf")  # fully masked row: NaN, like torch.softmax
    probs = sm.softmax(x)
    expected = torch.softmax(x, dim=-1)
    assert_close(probs[:2], expected[:2], 1e-6, 1e-5, "masked rows")
    assert bool(torch.isnan(probs[2]).all()), "an all -inf row must give NaN like torch.softmax"


@on_cpu_interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # -inf * 0 in the unused branch
@pytest.mark.parametrize("n_cols", [40, 1000])
def test_huge_temperature_is_uniform_not_nan(n_cols):
    """log2(e) / 1e300 rounds to 0 in fp32: -inf entries and padding lanes must still weigh 0, not NaN."""
    x = torch.randn(2, n_cols)
    x[1, 3] = float("-inf")
    probs = sm.softmax(x, 1e300)
    expected = torch.softmax(x.double() / 1e300, dim=-1)  # (in fp32, 1e300 itself overflows to inf)
    assert not bool(torch.isnan(probs).any())
    assert_close(probs, expected, 1e-7, 1e-5, "huge temperature")


@on_cpu_interpreter
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("l2_hints", [False, True])
def test_long_row_plan_variants_agree(reverse, l2_hints):
    """Every choice bench/softmax_variants.py times (pass 2's chunk order, L2 hints) gives the same
    probabilities; rows of 2000 take the chunked plan here (7 chunks of 256 under the interpreter)."""
    x = torch.randn(3, 2000, generator=torch.Generator().manual_seed(7)) * 4
    temps = torch.tensor([1.0, 0.5, 2.0])
    for temperature in (0.7, temps):
        got = sm._softmax(x, temperature, reverse=reverse, l2_hints=l2_hints, chunk=4096)
        check_close(got, sm.softmax_reference(x, temperature), 1e-6, 1e-5, f"reverse={reverse} hints={l2_hints}")


@on_cpu_interpreter
def test_non_contiguous_input():
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(6, 2 * 37, generator=gen)
    x = base[::2, ::2]  # strided rows and columns
    assert_close(sm.softmax(x, 0.9), sm.softmax_reference(x, 0.9), 1e-6, 1e-5, "strided input")


@on_cpu_interpreter
def test_available_follows_interpreter_flag(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not sm.available("cpu")
    with pytest.raises(ValueError, match="softmax_reference"):
        sm.softmax(torch.randn(2, 3))


def test_interpreter_is_usable_on_cpu_only_machines():
    # Fails loudly (instead of every CPU kernel test skipping) when something imported
    # triton before this module could turn the interpreter on.
    if torch.cuda.is_available() or not _utils.triton_importable():
        pytest.skip("only meaningful on a CPU-only machine with triton installed")
    assert _utils.interpreting() and sm.available("cpu"), (
        "triton was imported before TRITON_INTERPRET=1 was set; the CPU kernel tests cannot run"
    )


def test_reference_works_without_triton(monkeypatch):
    monkeypatch.setattr(_utils, "triton_importable", lambda: False)
    assert not sm.available("cpu") and not sm.available("cuda")
    x = torch.randn(2, 5)
    assert_close(sm.softmax_reference(x, 2.0), torch.softmax(x / 2.0, -1), 1e-7, 1e-6, "reference")
    with pytest.raises(ValueError, match="triton >= 3.6 is not installed"):
        sm.softmax(x)


@pytest.mark.parametrize(
    "x,temperature,match",
    [
        (torch.randn(2, 3), 0.0, "temperature"),
        (torch.randn(2, 3), -1.0, "temperature"),
        (torch.randn(2, 3), float("inf"), "temperature"),
        (torch.randn(2, 3, 4), 1.0, "2-D"),
        (torch.ones(2, 3, dtype=torch.int64), 1.0, "dtype"),
        (torch.randn(2, 3), torch.ones(3), r"shape \(2,\)"),
        (torch.randn(2, 3), torch.tensor([1.0, 0.0]), "> 0"),
        (torch.randn(2, 3), torch.tensor([1.0, float("inf")]), "finite number > 0"),
        (torch.randn(2, 3), torch.tensor([float("nan"), 1.0]), "finite number > 0"),
    ],
)
def test_bad_inputs_raise_value_error(x, temperature, match):
    with pytest.raises(ValueError, match=match):
        sm.softmax_reference(x, temperature)


# ----------------------------------------------------------------------------- GPU


@requires_cuda
@pytest.mark.parametrize("shape", [(4096, 8192), (64, 128256), (7, 50257), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_softmax_real_shapes(shape, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(shape, device="cuda", generator=gen) * 5).to(dtype)
    for temperature in (1.0, 0.6):
        expected = torch.softmax(x.double() / temperature, dim=-1)
        assert_close(sm.softmax(x, temperature), expected, 1e-6, 1e-4, f"gpu softmax {shape} {dtype} T={temperature}")
    temps = torch.rand(shape[0], device="cuda", generator=gen) + 0.5
    assert_close(sm.softmax(x, temps), torch.softmax(x.double() / temps.double()[:, None], -1), 1e-6, 1e-4, "per-row")
