"""kernels.cross_entropy: fused loss / logprob gather and its backward vs F.cross_entropy.

CPU tests run the kernels in the Triton interpreter (its chunk is 128 columns, so an
odd vocabulary of 1000 exercises the chunked online log-sum-exp). Without CUDA this
module turns the interpreter on (TRITON_INTERPRET=1) before anything imports triton.
GPU tests run the compiled kernels at real vocabulary sizes and skip without CUDA.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels import _utils  # noqa: E402
from kernels import cross_entropy as ce  # noqa: E402
from kernel_checks import assert_close as check_close, requires_cuda, skip_unless_interpreted  # noqa: E402

on_cpu_interpreter = skip_unless_interpreted(ce)


def assert_close(actual, expected, atol, rtol, what):
    check_close(actual, expected, atol, rtol, what, equal_nan=True)


def make_problem(n_rows, n_cols, dtype, seed, ignore_every=3, device="cpu"):
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(n_rows, n_cols, generator=gen, device=device) * 3).to(dtype)
    targets = torch.randint(0, n_cols, (n_rows,), generator=gen, device=device)
    if ignore_every:
        targets[::ignore_every] = -100
    return logits, targets


TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}


# ----------------------------------------------------------------------------- CPU (interpreter)


@on_cpu_interpreter
@pytest.mark.parametrize("n_rows,n_cols", [(1, 1), (5, 17), (4, 33), (7, 1000), (3, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_forward_backward(n_rows, n_cols, dtype, reduction):
    logits, targets = make_problem(n_rows, n_cols, dtype, seed=n_rows + n_cols, ignore_every=3 if n_rows > 1 else 0)
    x_kernel = logits.clone().requires_grad_()
    x_ref = logits.clone().requires_grad_()
    loss = ce.cross_entropy(x_kernel, targets, reduction=reduction)
    expected = F.cross_entropy(x_ref.float(), targets, reduction=reduction)
    atol, rtol = TOL[dtype]
    assert loss.dtype == dtype, "loss keeps the logits dtype, like F.cross_entropy"
    assert_close(loss, expected, atol, rtol, f"loss {n_rows}x{n_cols} {dtype} {reduction}")
    grad_out = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
    (g_kernel,) = torch.autograd.grad(loss, x_kernel, grad_out.to(loss.dtype))
    (g_ref,) = torch.autograd.grad(expected, x_ref, grad_out)
    assert g_kernel.dtype == dtype
    assert_close(g_kernel, g_ref, atol, rtol, f"grad {n_rows}x{n_cols} {dtype} {reduction}")


@on_cpu_interpreter
def test_custom_ignore_index_int32_targets_and_strided_logits():
    logits, targets = make_problem(6, 300, torch.float32, seed=5, ignore_every=0)
    targets[1] = targets[4] = 7
    wide = torch.randn(6, 400)
    wide[:, :300] = logits
    x = wide[:, :300].requires_grad_()  # row stride 400 != 300
    loss = ce.cross_entropy(x, targets.to(torch.int32), ignore_index=7)
    expected = F.cross_entropy(logits, targets, ignore_index=7)
    assert_close(loss, expected, 1e-5, 1e-5, "ignore_index=7 loss")
    (grad,) = torch.autograd.grad(loss, x)
    (grad_ref,) = torch.autograd.grad(F.cross_entropy(logits.requires_grad_(), targets, ignore_index=7), logits)
    assert_close(grad, grad_ref, 1e-6, 1e-5, "ignore_index=7 grad")
    assert bool((grad[1] == 0).all() and (grad[4] == 0).all()), "ignored rows must get zero gradient"


@on_cpu_interpreter
def test_all_rows_ignored_gives_nan_mean_like_torch():
    logits, _ = make_problem(3, 40, torch.float32, seed=1)
    targets = torch.full((3,), -100)
    assert torch.isnan(ce.cross_entropy(logits, targets)) and torch.isnan(F.cross_entropy(logits, targets))
    assert ce.cross_entropy(logits, targets, reduction="sum").item() == 0.0


@on_cpu_interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # the interpreter's numpy
def test_rows_of_huge_negative_logits_are_finite():
    """The online log-sum-exp starts at -inf: logits all below -1e30 (a bf16 row of finfo.min) still give
    the loss and gradient torch gives (log V for a constant row), not -inf."""
    logits = torch.full((2, 300), -1e31)
    logits[1, 7] = -2e31
    targets = torch.tensor([3, 7])
    x = logits.clone().requires_grad_(True)
    got = ce.cross_entropy(x, targets, reduction="none")
    assert_close(got, F.cross_entropy(logits, targets, reduction="none"), 1e-4, 1e-5, "huge negative rows")
    got.sum().backward()
    ref = logits.clone().requires_grad_(True)
    F.cross_entropy(ref, targets, reduction="none").sum().backward()
    assert_close(x.grad, ref.grad, 1e-6, 1e-5, "huge negative rows, gradient")


@on_cpu_interpreter
def test_out_of_range_target_gives_nan_not_garbage():
    logits, targets = make_problem(3, 40, torch.float32, seed=2, ignore_every=0)
    targets[1] = 40
    loss = ce.cross_entropy(logits, targets, reduction="none")
    assert torch.isnan(loss[1]) and not torch.isnan(loss[0]) and not torch.isnan(loss[2])
    with pytest.raises(IndexError):
        ce.cross_entropy_reference(logits, targets)


@on_cpu_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_token_logprobs(dtype):
    logits, targets = make_problem(9, 1000, dtype, seed=9, ignore_every=4)
    x = logits.clone().requires_grad_()
    logprobs = ce.token_logprobs(x, targets)
    expected = ce.token_logprobs_reference(logits, targets)
    assert logprobs.dtype == torch.float32 and logprobs.shape == (9,)
    assert_close(logprobs, expected, 1e-5, 1e-5, f"token_logprobs {dtype}")
    valid = targets != -100
    manual = torch.log_softmax(logits.float(), -1)[valid].gather(1, targets[valid, None])[:, 0]
    assert_close(logprobs[valid], manual, 1e-5, 1e-5, "vs log_softmax gather")
    (grad,) = torch.autograd.grad(logprobs.sum(), x)
    ref = logits.float().requires_grad_()
    (grad_ref,) = torch.autograd.grad(ce.token_logprobs_reference(ref, targets).sum(), ref)
    assert_close(grad, grad_ref, *TOL[dtype], what="token_logprobs grad")


@on_cpu_interpreter
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [None, 8, 37])
def test_linear_cross_entropy_matches_unfused(reduction, chunk_rows):
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(37, 16, generator=gen)
    weight = torch.randn(300, 16, generator=gen) * 0.3
    targets = torch.randint(0, 300, (37,), generator=gen)
    targets[::5] = -100
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = ce.linear_cross_entropy(h1, w1, targets, reduction=reduction, chunk_rows=chunk_rows)
    expected = ce.linear_cross_entropy_reference(h2, w2, targets, reduction=reduction)
    assert_close(loss, expected, 1e-5, 1e-5, f"linear CE loss {reduction} chunk={chunk_rows}")
    grads = torch.autograd.grad(loss * 1.7, (h1, w1))
    grads_ref = torch.autograd.grad(expected * 1.7, (h2, w2))
    for name, g, g_ref in zip(("hidden", "weight"), grads, grads_ref):
        assert_close(g, g_ref, 1e-5, 1e-4, f"linear CE d{name} {reduction} chunk={chunk_rows}")


@on_cpu_interpreter
def test_linear_cross_entropy_sums_a_16_bit_weight_gradient_in_fp32():
    """Over many chunks a 16-bit weight's gradient stays as close to the exact one as a single chunk's
    (summed in place in fp16 it drifts several times further: each chunk's sum would be rounded). Off CUDA the
    16-bit product is added separately (on CUDA cuBLAS adds it: test_gpu_16_bit_weight_gradients_...)."""
    assert not ce.fp32_accumulating_addmm(torch.device("cpu"), torch.float16)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(128, 16, generator=gen).half()
    weight = (torch.randn(300, 16, generator=gen) * 0.3).half()
    targets = torch.randint(0, 300, (128,), generator=gen)
    w64 = weight.double().requires_grad_()
    exact_loss = ce.linear_cross_entropy_reference(hidden.double(), w64, targets, reduction="sum")
    (exact,) = torch.autograd.grad(exact_loss, w64)
    errors = {}
    for rows in (128, 1):
        w = weight.clone().requires_grad_()
        (grad,) = torch.autograd.grad(ce.linear_cross_entropy(hidden, w, targets, reduction="sum", chunk_rows=rows), w)
        assert grad.dtype == torch.float16
        errors[rows] = (grad.double() - exact).abs().max().item()
    assert errors[1] <= 2.5 * errors[128], f"128 chunks: max error {errors[1]:.2e}, one chunk: {errors[128]:.2e}"


@on_cpu_interpreter
def test_linear_cross_entropy_gives_an_fp32_loss_for_16_bit_inputs():
    """A training run's logged loss: fp32, as F.cross_entropy gives under autocast (in fp16 it would be
    rounded to ~0.002 at a loss of 5.7, in bf16 to ~0.03)."""
    gen = torch.Generator().manual_seed(6)
    hidden, weight = torch.randn(20, 16, generator=gen).half(), (torch.randn(300, 16, generator=gen) * 0.3).half()
    targets = torch.randint(0, 300, (20,), generator=gen)
    loss = ce.linear_cross_entropy(hidden, weight, targets)
    assert loss.dtype == torch.float32
    exact = ce.linear_cross_entropy_reference(hidden.double(), weight.double(), targets)
    assert abs(loss.item() - exact.item()) < 1e-5


# ---------------------------------------------------------------------- linear_cross_entropy_torch (CPU path)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [None, 8, 37, 100])
def test_linear_cross_entropy_torch_matches_unfused(reduction, chunk_rows):
    """The chunked torch path (training on the CPU) against the whole-logits F.cross_entropy, fp64 on both
    sides so only the algorithm can differ: chunks of 8 and 37 rows over 37 rows, a row count that is not a
    multiple, and the default; ignored rows."""
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(37, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(300, 16, generator=gen, dtype=torch.float64) * 0.3
    targets = torch.randint(0, 300, (37,), generator=gen)
    targets[::5] = -100
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = ce.linear_cross_entropy_torch(h1, w1, targets, reduction=reduction, chunk_rows=chunk_rows)
    expected = F.cross_entropy(h2 @ w2.t(), targets, reduction=reduction)
    assert loss.dtype == torch.float32  # (the row passes run in fp32)
    assert_close(loss, expected, 1e-5, 1e-6, f"torch linear CE loss {reduction} chunk={chunk_rows}")
    grads = torch.autograd.grad(loss * 1.7, (h1, w1))
    grads_ref = torch.autograd.grad(expected * 1.7, (h2, w2))
    for name, g, g_ref in zip(("hidden", "weight"), grads, grads_ref):
        assert g.dtype == torch.float64
        assert_close(g, g_ref, 1e-6, 1e-5, f"torch linear CE d{name} {reduction} chunk={chunk_rows}")


def test_linear_cross_entropy_torch_in_bf16_as_autocast_would():
    """bf16 hidden and weight (what Transformer.loss passes under autocast): the loss within bf16's rounding of
    the logits of an fp32 reference, in fp32; the weight's gradient summed over 32 chunks in fp32 (as close to
    the exact one as one chunk's)."""
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(256, 32, generator=gen).bfloat16()
    weight = (torch.randn(1000, 32, generator=gen) * 0.2).bfloat16()
    targets = torch.randint(0, 1000, (256,), generator=gen)
    w64 = weight.double().requires_grad_()
    exact_loss = F.cross_entropy(hidden.double() @ w64.t(), targets, reduction="sum")
    (exact,) = torch.autograd.grad(exact_loss, w64)
    errors = {}
    for rows in (256, 8):
        w = weight.clone().requires_grad_()
        loss = ce.linear_cross_entropy_torch(hidden, w, targets, reduction="sum", chunk_rows=rows)
        assert loss.dtype == torch.float32
        assert abs(loss.item() - exact_loss.item()) < 1e-2 * abs(exact_loss.item())
        (grad,) = torch.autograd.grad(loss, w)
        assert grad.dtype == torch.bfloat16
        errors[rows] = (grad.double() - exact).abs().max().item()
    assert errors[8] <= 2.5 * errors[256], f"32 chunks: max error {errors[8]:.2e}, one chunk: {errors[256]:.2e}"


def test_linear_cross_entropy_torch_traces_in_one_graph():
    """`kiln train --set compile=true` on a CPU: the chunked torch loss traces without a graph break (its range
    check stays out of the trace) and gives the eager loss and gradients."""
    gen = torch.Generator().manual_seed(8)
    hidden, weight = torch.randn(40, 16, generator=gen), torch.randn(300, 16, generator=gen) * 0.3
    targets = torch.randint(0, 300, (40,), generator=gen)
    targets[::7] = -100
    torch._dynamo.reset()
    compiled = torch.compile(ce.linear_cross_entropy_torch, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, ce.linear_cross_entropy_torch):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, w, targets, chunk_rows=16)
        results.append((loss, *torch.autograd.grad(loss, (h, w))))
    for got, want in zip(*results):
        assert_close(got, want, 1e-6, 1e-6, "compiled torch linear CE")


def test_linear_cross_entropy_torch_edge_cases():
    hidden, weight = torch.randn(6, 8), torch.randn(10, 8)
    every_ignored = torch.full((6,), -100)
    assert torch.isnan(ce.linear_cross_entropy_torch(hidden, weight, every_ignored))  # as F.cross_entropy
    assert ce.linear_cross_entropy_torch(hidden, weight, every_ignored, reduction="sum").item() == 0.0
    with pytest.raises(ValueError, match=r"target 10 is out of range \[0, 10\) \(ignore_index is -100\)"):
        ce.linear_cross_entropy_torch(hidden, weight, torch.tensor([0, 1, 10, 2, 3, 4]))
    with pytest.raises(ValueError, match='"mean" or "sum"'):
        ce.linear_cross_entropy_torch(hidden, weight, every_ignored, reduction="none")
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        ce.linear_cross_entropy_torch(hidden, weight, every_ignored, chunk_rows=0)
    with torch.no_grad():  # no gradient wanted: the loss alone
        targets = torch.arange(6)
        got = ce.linear_cross_entropy_torch(hidden, weight, targets, chunk_rows=4)
    assert abs(got.item() - F.cross_entropy(hidden @ weight.t(), targets).item()) < 1e-6


def test_backward_autotuning_restores_the_logits_it_overwrites(monkeypatch):
    """linear_cross_entropy runs the backward kernel in place (gradient over the logits). On a key's first
    launch the GPU autotuner runs every config on the same buffer: without restoring it after each run,
    the launch that counts reads gradients instead of logits (found on an H100: the first call's gradients
    were 1% off). Built here as on a GPU, without launching."""
    pytest.importorskip("triton")
    monkeypatch.setattr(_utils, "interpreting", lambda: False)
    kernels = ce._kernels.__wrapped__(False)
    assert kernels.backward.fn.restore_value == ["GradLogits"]


@on_cpu_interpreter
def test_available_and_errors_off_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not ce.available("cpu")
    with pytest.raises(ValueError, match="cross_entropy_reference"):
        ce.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))


def test_interpreter_is_usable_on_cpu_only_machines():
    if torch.cuda.is_available() or not _utils.triton_importable():
        pytest.skip("only meaningful on a CPU-only machine with triton installed")
    assert _utils.interpreting() and ce.available("cpu"), (
        "triton was imported before TRITON_INTERPRET=1 was set; the CPU kernel tests cannot run"
    )


def test_reference_without_triton(monkeypatch):
    monkeypatch.setattr(_utils, "triton_importable", lambda: False)
    logits, targets = make_problem(4, 10, torch.float32, seed=3)
    assert_close(ce.cross_entropy_reference(logits, targets), F.cross_entropy(logits, targets), 0, 0, "reference")
    with pytest.raises(ValueError, match="triton >= 3.6 is not installed"):
        ce.cross_entropy(logits, targets)


@pytest.mark.parametrize(
    "logits,targets,reduction,match",
    [
        (torch.randn(3), torch.zeros(3, dtype=torch.long), "mean", "2-D"),
        (torch.randn(3, 4), torch.zeros(2, dtype=torch.long), "mean", "rows"),
        (torch.randn(3, 4), torch.zeros(3), "mean", "dtype"),
        (torch.randn(3, 4), torch.zeros(3, dtype=torch.long), "avg", "reduction"),
        (torch.randn(3, 0), torch.zeros(3, dtype=torch.long), "mean", "at least one class"),
    ],
)
def test_bad_inputs_raise_value_error(logits, targets, reduction, match):
    with pytest.raises(ValueError, match=match):
        ce.cross_entropy_reference(logits, targets, reduction=reduction)


def test_linear_cross_entropy_rejects_bad_inputs():
    hidden, weight, targets = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="differ in C"):
        ce.linear_cross_entropy_reference(hidden, torch.randn(10, 7), targets)
    with pytest.raises(ValueError, match="dtype"):
        ce.linear_cross_entropy_reference(hidden, weight.half(), targets)
    with pytest.raises(ValueError, match='"mean" or "sum"'):
        ce.linear_cross_entropy(hidden, weight, targets, reduction="none")
    with pytest.raises(ValueError, match=r"at least one class row \(V >= 1\)"):
        ce.linear_cross_entropy(hidden, torch.randn(0, 8), targets)


# ----------------------------------------------------------------------------- GPU


@requires_cuda
@pytest.mark.parametrize("n_rows,n_cols", [(4096, 32000), (1024, 128256), (3, 50257)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_cross_entropy_real_shapes(n_rows, n_cols, dtype):
    logits, targets = make_problem(n_rows, n_cols, dtype, seed=0, device="cuda")
    x = logits.clone().requires_grad_()
    loss = ce.cross_entropy(x, targets)
    ref_x = logits.double().requires_grad_()
    expected = F.cross_entropy(ref_x, targets)  # fp64 reference
    # The loss comes back in the logits dtype, as F.cross_entropy's does: rounding to bf16
    # alone is off by up to half its 2**-7 relative spacing (0.06 at a loss of 16).
    atol, rtol = {torch.bfloat16: (1e-2, 4e-3), torch.float16: (1e-2, 1e-3), torch.float32: (1e-5, 1e-3)}[dtype]
    assert_close(loss, expected, atol, rtol, f"gpu loss {dtype}")
    (grad,) = torch.autograd.grad(loss, x)
    (grad_ref,) = torch.autograd.grad(expected, ref_x)
    # Gradients are stored in the logits dtype: compare with the fp64 gradient at that precision.
    atol = 1e-6 if dtype == torch.float32 else 2e-2 / n_rows
    assert_close(grad, grad_ref, atol, 1e-2, f"gpu grad {dtype}")
    assert_close(ce.token_logprobs(logits, targets), -F.cross_entropy(logits.double(), targets, reduction="none"),
                 atol, rtol, f"gpu logprobs {dtype}")


@requires_cuda
def test_gpu_cross_entropy_uses_less_memory_than_torch():
    logits, targets = make_problem(2048, 128256, torch.bfloat16, seed=1, device="cuda")
    logits.requires_grad_()

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(logits, targets).backward()
        torch.cuda.synchronize()
        logits.grad = None
        return torch.cuda.max_memory_allocated() - base

    ours, theirs = peak(ce.cross_entropy), peak(F.cross_entropy)
    assert ours < theirs, f"fused CE peak {ours / 2**20:.0f} MiB, F.cross_entropy {theirs / 2**20:.0f} MiB"


@requires_cuda
def test_gpu_linear_cross_entropy():
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(4096, 1024, device="cuda", generator=gen, dtype=torch.bfloat16)
    weight = (torch.randn(32000, 1024, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    targets = torch.randint(0, 32000, (4096,), device="cuda", generator=gen)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    loss = ce.linear_cross_entropy(h1, w1, targets)
    expected = ce.linear_cross_entropy_reference(h2, w2, targets)
    assert_close(loss, expected, 2e-2, 1e-2, "gpu linear CE loss")
    g1 = torch.autograd.grad(loss, (h1, w1))
    g2 = torch.autograd.grad(expected, (h2, w2))
    for name, a, b in zip(("hidden", "weight"), g1, g2):
        assert_close(a, b, 2e-2 * b.abs().max().item(), 5e-2, f"gpu linear CE d{name}")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_16_bit_weight_gradients_are_summed_by_cublas_into_fp32(dtype, monkeypatch):
    """On CUDA each chunk's weight-gradient product is added into the fp32 sum by cuBLAS (addmm with out_dtype):
    the same gradient as the 16-bit product added separately (that path kept where addmm cannot), at least as
    close to an fp64 computation, over many chunks."""
    assert ce.fp32_accumulating_addmm(torch.device("cuda"), dtype), "torch.addmm(out_dtype=fp32) in place"
    gen = torch.Generator(device="cuda").manual_seed(4)
    hidden = torch.randn(2048, 256, device="cuda", generator=gen).to(dtype)
    weight = (torch.randn(8000, 256, device="cuda", generator=gen) * 0.05).to(dtype)
    targets = torch.randint(0, 8000, (2048,), device="cuda", generator=gen)
    w64 = weight.double().requires_grad_()
    (exact,) = torch.autograd.grad(ce.linear_cross_entropy_reference(hidden.double(), w64, targets), w64)
    grads = {}
    for fused in (True, False):
        monkeypatch.setattr(ce, "fp32_accumulating_addmm", lambda device, dtype, fused=fused: fused)
        w = weight.clone().requires_grad_()
        (grads[fused],) = torch.autograd.grad(ce.linear_cross_entropy(hidden, w, targets, chunk_rows=128), w)
    errors = {fused: (g.double() - exact).abs().max().item() for fused, g in grads.items()}
    scale = exact.abs().max().item()
    assert_close(grads[True].float(), grads[False].float(), 2e-2 * scale, 2e-2, f"cuBLAS-summed d(weight) {dtype}")
    assert errors[True] <= 1.05 * errors[False] + 1e-3 * scale, errors


@requires_cuda
def test_gpu_linear_cross_entropy_first_launch_tunes_on_the_real_logits(monkeypatch):
    """The in-place backward tuned afresh (in-memory and on-disk choices set aside) gives exact fp32 gradients."""
    tuner = ce._kernels(False).backward.fn
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(tuner, "cache_results", False, raising=False)
    gen = torch.Generator(device="cuda").manual_seed(3)
    hidden = torch.randn(512, 256, device="cuda", generator=gen)
    weight = torch.randn(50257, 256, device="cuda", generator=gen) * 0.05  # a vocabulary no other test tunes
    targets = torch.randint(0, 50257, (512,), device="cuda", generator=gen)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    g1 = torch.autograd.grad(ce.linear_cross_entropy(h1, w1, targets, chunk_rows=128), (h1, w1))  # (fp32 GEMMs)
    g2 = torch.autograd.grad(ce.linear_cross_entropy_reference(h2, w2, targets), (h2, w2))
    for name, a, b in zip(("hidden", "weight"), g1, g2):
        assert_close(a.double(), b, 1e-6 * b.abs().max().item(), 1e-4, f"first-launch linear CE d{name}")
