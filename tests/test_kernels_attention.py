"""kernels.attention: flash attention forward/backward (dense and varlen) vs the torch reference.

CPU tests run the kernels in the Triton interpreter at tiny, awkward shapes: lengths
1/17/33 (the interpreter tiles are 32x16 and 16x32, so blocks end mid-sequence),
GQA 4:1 and 3:1, head dims 16/32, fp32/fp16, causal with T < S, T > S and T == S.
Without CUDA this module turns the interpreter on (TRITON_INTERPRET=1) before anything
imports triton. GPU tests run the compiled kernels at real shapes in bf16/fp16 and
compare against an fp64 reference, next to the error of PyTorch's own bf16 attention.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels import _utils  # noqa: E402
from kernels import attention as attn  # noqa: E402
from kernel_checks import assert_close, requires_cuda, skip_unless_interpreted  # noqa: E402

on_cpu_interpreter = skip_unless_interpreted(attn)

TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (4e-3, 4e-3), torch.float64: (1e-10, 1e-10)}



def random_qkv(batch, n_heads, n_kv_heads, seqlen_q, seqlen_k, head_dim, dtype, seed, device="cpu"):
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    return (
        rand(batch, n_heads, seqlen_q, head_dim),
        rand(batch, n_kv_heads, seqlen_k, head_dim),
        rand(batch, n_kv_heads, seqlen_k, head_dim),
    )


def check_fwd_bwd(fn, ref_fn, inputs, dtype, what, seed=0):
    """Compare output and (dq, dk, dv) of fn against ref_fn on the same inputs."""
    leaves = [x.clone().requires_grad_() for x in inputs]
    ref_leaves = [x.clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    expected = ref_fn(*ref_leaves)
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype and out.shape == expected.shape
    assert_close(out, expected, atol, rtol, f"{what}: out")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_grads = torch.autograd.grad(expected, ref_leaves, grad_out)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.dtype == dtype and g.shape == g_ref.shape
        assert_close(g, g_ref, 2 * atol, 2 * rtol, f"{what}: {name}")


# ----------------------------------------------------------------------------- CPU (interpreter)

DENSE_CASES = [
    # (B, H, Hkv, T, S, D, causal, dtype)
    (2, 4, 1, 17, 17, 16, True, torch.float32),  # GQA 4:1, unaligned length
    (1, 3, 1, 1, 33, 32, True, torch.float32),  # GQA 3:1, single decode-like query
    (2, 4, 2, 33, 33, 16, False, torch.float16),
    (1, 6, 2, 17, 40, 16, True, torch.float16),  # GQA 3:1, T < S: query i at S - T + i
    (1, 2, 2, 33, 17, 16, True, torch.float32),  # T > S: the first 16 queries see no key
    (1, 2, 1, 1, 1, 32, False, torch.float32),
    (1, 4, 4, 33, 17, 32, False, torch.float16),
]


@on_cpu_interpreter
@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: "B{}-H{}-Hkv{}-T{}-S{}-D{}-{}-{}".format(*c[:6], "causal" if c[6] else "full", str(c[7])[6:]))
def test_flash_attention_matches_reference(case):
    batch, n_heads, n_kv_heads, seqlen_q, seqlen_k, head_dim, causal, dtype = case
    inputs = random_qkv(batch, n_heads, n_kv_heads, seqlen_q, seqlen_k, head_dim, dtype, seed=seqlen_q + head_dim)
    check_fwd_bwd(
        lambda q, k, v: attn.flash_attention(q, k, v, causal=causal),
        lambda q, k, v: attn.flash_attention_reference(q, k, v, causal=causal),
        inputs, dtype, f"dense {case}",
    )


@on_cpu_interpreter
def test_more_batch_x_heads_than_one_grid_axis_holds(monkeypatch):
    """CUDA stops grid axis 1 at 65535 programs: batch x heads folds onto axes 1 and 2. With the cap
    lowered to 3, B x H = 10 (and B x Hkv = 5 in the backward) runs as 3 x 4 programs, 2 of them past
    the end; dense and packed, forward and backward, all equal the reference."""
    monkeypatch.setattr(_utils, "MAX_GRID_Y", 3)
    assert _utils.grid_yz(10) == (3, 4) and _utils.grid_yz(2) == (2, 1)
    inputs = random_qkv(5, 2, 1, 9, 9, 16, torch.float32, seed=4)
    check_fwd_bwd(lambda q, k, v: attn.flash_attention(q, k, v, causal=True),
                  lambda q, k, v: attn.flash_attention_reference(q, k, v, causal=True),
                  inputs, torch.float32, "B x H over two grid axes")
    lengths = [3, 7, 1, 5, 2]
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(sum(lengths), h, 16, generator=gen) for h in (2, 1, 1))
    args = (cu, cu, max(lengths), max(lengths))
    check_fwd_bwd(lambda q, k, v: attn.flash_attention_varlen(q, k, v, *args, causal=True),
                  lambda q, k, v: attn.flash_attention_varlen_reference(q, k, v, *args, causal=True),
                  (q, k, v), torch.float32, "packed B x H over two grid axes")


@on_cpu_interpreter
def test_scale_argument_and_strided_inputs():
    # q/k/v as a model produces them: (B, T, H, D) projections viewed as (B, H, T, D).
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 17, 4, 16, generator=gen).transpose(1, 2)
    k = torch.randn(2, 21, 2, 16, generator=gen).transpose(1, 2)
    v = torch.randn(2, 21, 2, 16, generator=gen).transpose(1, 2)
    assert not q.is_contiguous()
    check_fwd_bwd(
        lambda q, k, v: attn.flash_attention(q, k, v, causal=True, scale=0.3),
        lambda q, k, v: attn.flash_attention_reference(q, k, v, causal=True, scale=0.3),
        (q, k, v), torch.float32, "strided, scale=0.3",
    )


def packed_and_unpacked(qkv, n_kv_heads, causal=True):
    """(out, d(qkv)) of flash_attention_packed, then of flash_attention on q/k/v views of the same tensor
    (autograd assembling d(qkv) from dQ, dK and dV), for one random output gradient."""
    B, T, heads, D = qkv.shape
    H = heads - 2 * n_kv_heads
    gen = torch.Generator(device=qkv.device).manual_seed(9)
    grad_out = torch.randn(B, T, H, D, generator=gen, device=qkv.device).to(qkv.dtype)
    results = []
    for packed in (True, False):
        leaf = qkv.detach().clone().requires_grad_()
        if packed:
            out = attn.flash_attention_packed(leaf, n_kv_heads, causal=causal)
        else:
            q, k, v = (x.transpose(1, 2) for x in leaf.split((H, n_kv_heads, n_kv_heads), dim=2))
            out = attn.flash_attention(q, k, v, causal=causal).transpose(1, 2)
        results.append((out, torch.autograd.grad(out, leaf, grad_out)[0]))
    return results


@on_cpu_interpreter
@pytest.mark.parametrize("case", [(2, 17, 4, 1, 16, True, torch.float32), (1, 33, 6, 2, 32, True, torch.float16),
                                  (2, 1, 2, 2, 16, True, torch.float32), (1, 20, 3, 3, 16, False, torch.float32)],
                         ids=lambda c: "B{}-T{}-H{}-Hkv{}-D{}-{}-{}".format(*c[:5], "causal" if c[5] else "full",
                                                                             str(c[6])[6:]))
def test_packed_attention_equals_attention_on_views_of_the_projection(case):
    """flash_attention_packed runs the same kernels on the same views: the same output bit for bit, and its
    backward writes into one d(qkv) what autograd otherwise assembles from dQ, dK and dV (a copy kernel)."""
    B, T, H, Hkv, D, causal, dtype = case
    qkv = torch.randn(B, T, H + 2 * Hkv, D, generator=torch.Generator().manual_seed(4)).to(dtype)
    (out, dqkv), (out_ref, dqkv_ref) = packed_and_unpacked(qkv, Hkv, causal)
    assert out.shape == (B, T, H, D) and out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out, out_ref)
    assert dqkv.shape == qkv.shape and dqkv.is_contiguous()
    assert torch.equal(dqkv, dqkv_ref), f"d(qkv) differs by {(dqkv - dqkv_ref).abs().max():.3e}"
    # and both against the plain-torch reference (the unpacked path's tests hold it to that already)
    q, k, v = (x.transpose(1, 2) for x in qkv.split((H, Hkv, Hkv), dim=2))
    atol, rtol = TOL[dtype]
    assert_close(out, attn.flash_attention_reference(q, k, v, causal=causal).transpose(1, 2), atol, rtol, "packed out")


@on_cpu_interpreter
def test_packed_attention_ops_fake_impls_match_the_real_ones():
    """torch.compile plans memory from the fake impls: their shapes and strides must be the real ones."""
    B, T, H, Hkv, D = 2, 17, 4, 2, 16
    gen = torch.Generator().manual_seed(6)
    qkv = torch.randn(B, T, H + 2 * Hkv, D, generator=gen)
    q, k, v = attn._unpack(qkv, H, Hkv)
    out, lse = attn._forward(q, k, v, None, None, T, T, True, 0.25)
    assert out.transpose(1, 2).is_contiguous()  # (B, T, H, D) memory: the next projection's input is a view
    for op, args in ((attn._forward.op, (q, k, v, None, None, T, T, True, 0.25)),
                     (attn._backward_packed.op, (torch.randn(B, T, H, D, generator=gen).transpose(1, 2), qkv, out,
                                                 lse, H, Hkv, True, 0.25))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_packed_attention_rejects_bad_head_counts():
    qkv = torch.randn(1, 8, 6, 16)
    with pytest.raises(ValueError, match="not H \\+ 2 \\* 3"):
        attn.flash_attention_packed(qkv, 3)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        attn.flash_attention_packed(torch.randn(1, 8, 7, 16), 2)  # H = 3 query heads over 2 kv heads
    with pytest.raises(ValueError, match="4-D"):
        attn.flash_attention_packed(qkv[0], 1)


VARLEN_CASES = [
    # (query lengths, key lengths, H, Hkv, D, causal, dtype)
    ([1, 17, 33], [1, 17, 40], 4, 1, 16, True, torch.float32),
    ([5, 0, 20], [9, 3, 20], 6, 2, 32, True, torch.float16),  # an empty sequence in the batch
    ([3, 20], [10, 4], 3, 3, 16, False, torch.float32),
    ([8, 2], [3, 7], 2, 1, 16, True, torch.float32),  # T > S in the first sequence
]


@on_cpu_interpreter
@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"q{c[0]}-k{c[1]}-H{c[2]}-Hkv{c[3]}-{'causal' if c[5] else 'full'}")
def test_flash_attention_varlen_matches_reference(case):
    lengths_q, lengths_k, n_heads, n_kv_heads, head_dim, causal, dtype = case
    cu_q = torch.tensor([0, *lengths_q]).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *lengths_k]).cumsum(0).to(torch.int32)
    gen = torch.Generator().manual_seed(sum(lengths_q))
    q = torch.randn(sum(lengths_q), n_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(sum(lengths_k), n_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(sum(lengths_k), n_kv_heads, head_dim, generator=gen).to(dtype)
    args = (cu_q, cu_k, max(lengths_q), max(lengths_k))
    check_fwd_bwd(
        lambda q, k, v: attn.flash_attention_varlen(q, k, v, *args, causal=causal),
        lambda q, k, v: attn.flash_attention_varlen_reference(q, k, v, *args, causal=causal),
        (q, k, v), dtype, f"varlen {case}",
    )


@on_cpu_interpreter
def test_varlen_equals_dense_per_sequence():
    # Two prompts packed into one launch give what two dense calls give.
    gen = torch.Generator().manual_seed(8)
    qs = [torch.randn(1, 4, t, 16, generator=gen) for t in (17, 5)]
    ks = [torch.randn(1, 2, t, 16, generator=gen) for t in (17, 5)]
    vs = [torch.randn(1, 2, t, 16, generator=gen) for t in (17, 5)]
    pack = lambda xs: torch.cat([x[0].transpose(0, 1) for x in xs])  # noqa: E731  (total, H, D)
    cu = torch.tensor([0, 17, 22], dtype=torch.int32)
    packed = attn.flash_attention_varlen(pack(qs), pack(ks), pack(vs), cu, cu, 17, 17)
    dense = torch.cat([attn.flash_attention(q, k, v)[0].transpose(0, 1) for q, k, v in zip(qs, ks, vs)])
    assert_close(packed, dense, 1e-6, 1e-5, "varlen vs dense")


@on_cpu_interpreter
def test_varlen_padding_tokens_get_zeros():
    # Packed buffers may be longer than cu_seqlens[-1]: those rows belong to no sequence.
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(12, 2, 16, generator=gen).requires_grad_()
    k = torch.randn(12, 1, 16, generator=gen).requires_grad_()
    v = torch.randn(12, 1, 16, generator=gen).requires_grad_()
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    out = attn.flash_attention_varlen(q, k, v, cu, cu, 7, 7)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert bool((t[10:] == 0).all()), f"{name} rows past cu_seqlens[-1] must be zero"
    expected = attn.flash_attention_varlen_reference(q, k, v, cu, cu, 7, 7)
    assert expected.shape == out.shape and bool((expected[10:] == 0).all())
    assert_close(out, expected, 1e-6, 1e-5, "packed rows")


def test_reference_agrees_with_sdpa():
    # T == S: bottom-right and top-left causal coincide; GQA via repeated K/V heads.
    q, k, v = random_qkv(2, 6, 2, 19, 19, 24, torch.float64, seed=1)
    for causal in (True, False):
        expected = F.scaled_dot_product_attention(
            q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), is_causal=causal
        )
        assert_close(attn.flash_attention_reference(q, k, v, causal=causal), expected, 1e-10, 1e-10, f"causal={causal}")
    # T < S: query i sits at position S - T + i (explicit bottom-right mask for SDPA).
    q, k, v = random_qkv(1, 2, 2, 5, 12, 8, torch.float64, seed=2)
    mask = torch.ones(5, 12, dtype=torch.bool).tril(diagonal=12 - 5)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5)
    assert_close(attn.flash_attention_reference(q, k, v, causal=True, scale=0.5), expected, 1e-10, 1e-10, "T<S")


def test_reference_rows_without_keys_are_zero():
    q, k, v = random_qkv(1, 2, 2, 6, 3, 8, torch.float32, seed=4)
    out = attn.flash_attention_reference(q, k, v, causal=True)
    assert bool((out[:, :, :3] == 0).all()), "queries before the first key must output zeros"
    assert torch.isfinite(out).all()


@on_cpu_interpreter
def test_available_and_errors_off_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not attn.available("cpu")
    q, k, v = random_qkv(1, 2, 2, 4, 4, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="flash_attention_reference"):
        attn.flash_attention(q, k, v)


def test_interpreter_is_usable_on_cpu_only_machines():
    if torch.cuda.is_available() or not _utils.triton_importable():
        pytest.skip("only meaningful on a CPU-only machine with triton installed")
    assert _utils.interpreting() and attn.available("cpu"), (
        "triton was imported before TRITON_INTERPRET=1 was set; the CPU kernel tests cannot run"
    )


@pytest.mark.parametrize(
    "shapes,kwargs,match",
    [
        (((1, 4, 8, 16), (1, 3, 8, 16), (1, 3, 8, 16)), {}, "multiple of n_kv_head"),
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 9, 16)), {}, "same shape"),
        (((1, 2, 8, 16), (1, 2, 8, 32), (1, 2, 8, 32)), {}, "head dim"),
        (((2, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {}, "batch"),
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"scale": -1.0}, "scale"),
        (((1, 2, 8), (1, 2, 8), (1, 2, 8)), {}, "4-D"),
        (((1, 2, 0, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {}, ">= 1"),
    ],
)
def test_dense_bad_inputs_raise_value_error(shapes, kwargs, match):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        attn.flash_attention_reference(q, k, v, **kwargs)


def test_triton_path_rejects_unsupported_head_dim_and_dtype_mix():
    q, k, v = random_qkv(1, 2, 2, 4, 4, 24, torch.float32, seed=0)
    with pytest.raises(ValueError, match="head dim 24"):
        attn.flash_attention(q, k, v)
    q, k, v = random_qkv(1, 2, 2, 4, 4, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="share a dtype"):
        attn.flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="not supported"):
        attn.flash_attention(q.double(), k.double(), v.double())


def test_varlen_bad_offsets_raise_value_error():
    q, k = torch.randn(10, 2, 16), torch.randn(10, 2, 16)
    good = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="non-decreasing"):
        attn.flash_attention_varlen_reference(q, k, k, torch.tensor([0, 6, 4], dtype=torch.int32), good, 6, 6)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        attn.flash_attention_varlen_reference(q, k, k, good, good, 3, 6)
    with pytest.raises(ValueError, match=r"\(B \+ 1,\)"):
        attn.flash_attention_varlen_reference(q, k, k, good, good[:2], 6, 6)
    with pytest.raises(ValueError, match="dtype"):
        attn.flash_attention_varlen_reference(q, k, k, good.float(), good, 6, 6)


# ----------------------------------------------------------------------------- GPU


def _err_vs_fp64(out, ref64):
    return (out.double() - ref64).abs().max().item()


def test_kernels_are_not_specialized_on_lengths():
    """Triton compiles a kernel anew for each integer argument's class (1, a multiple of 16, other) unless told
    not to: specialized on sequence lengths, a server would compile the attention kernels again, while its
    streams wait, for the first prompt of an odd length after tuning on powers of two. Every length argument
    (and the LSE strides that follow the length) must be listed, by names the kernel has."""
    if not attn.available("cuda" if torch.cuda.is_available() else "cpu"):
        pytest.skip("needs triton on a GPU or TRITON_INTERPRET=1")
    import triton

    kernels = attn._kernels(_utils.interpreting())
    for name in ("forward", "preprocess", "dkdv", "dq"):
        fn = getattr(kernels, name).fn
        jitted = fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn  # the jitted function
        if hasattr(jitted, "kwargs"):  # interpreted: the options as given
            listed = list(jitted.kwargs.get("do_not_specialize") or ())
        else:  # compiled: argument indices
            listed = [jitted.arg_names[i] if isinstance(i, int) else i for i in jitted.do_not_specialize]
        lengths = {"seqlen_q", "seqlen_k", "n_bh", "stride_lb", "stride_lh"} & set(jitted.arg_names)
        assert "seqlen_q" in lengths and lengths <= set(listed) <= set(jitted.arg_names), (name, listed)


@pytest.mark.skipif(not _utils.triton_importable(), reason="needs triton (configs are triton.Config objects)")
@pytest.mark.parametrize("name", ["FWD", "DKDV", "DQ"])
def test_config_pruning_follows_the_input_dtype(name):
    # fp32 inputs get the fp32 table (small tiles that do not spill), 16-bit ones the tensor-core
    # table, and every head dim keeps a config, at long and at short sequences
    table, fp32_table = getattr(attn, f"_{name}_CONFIGS"), getattr(attn, f"_{name}_CONFIGS_FP32")
    configs, prune = attn._configs(table, fp32_table), attn._pruner(table, fp32_table)
    assert len(configs) == len({(m, n, w, s) for m, n, w, s, _ in table + fp32_table})

    def shape(c):
        return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages

    for dtype, own in ((torch.float32, fp32_table), (torch.bfloat16, table), (torch.float16, table)):
        limits = {(m, n, w, s): d for m, n, w, s, d in own}
        q = torch.empty(0, dtype=dtype)
        for head_dim in (16, 32, 64, 128, 256):
            for bucket in (16, 1024):
                kept = prune(configs, {"Q": q, "HEAD_DIM": head_dim, "SEQ_BUCKET_Q": bucket, "SEQ_BUCKET_K": bucket})
                assert kept, (dtype, head_dim, bucket)
                for c in kept:
                    assert head_dim <= limits.get(shape(c), 0), (dtype, head_dim, shape(c))
        long = prune(configs, {"Q": q, "HEAD_DIM": 64, "SEQ_BUCKET_Q": 1024, "SEQ_BUCKET_K": 1024})
        assert {shape(c) for c in long} == {k for k, d in limits.items() if d >= 64}


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seqlens", [(1024, 1024), (1000, 1537), (1, 4097)])
def test_gpu_flash_attention_real_shapes(dtype, head_dim, causal, seqlens):
    seqlen_q, seqlen_k = seqlens
    q, k, v = random_qkv(2, 16, 4, seqlen_q, seqlen_k, head_dim, dtype, seed=0, device="cuda")
    _check_against_torch_in_dtype(q, k, v, causal, floor=1e-3 if dtype == torch.float16 else 8e-3)


def _check_against_torch_in_dtype(q, k, v, causal, floor, what=""):
    """Output and dq/dk/dv against an fp64 computation. PyTorch-in-dtype error sets the bar: the kernel
    may be at most 2x worse (plus a floor)."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    leaves64 = [x.double().requires_grad_() for x in (q, k, v)]
    leaves_lp = [x.clone().requires_grad_() for x in (q, k, v)]  # low-precision torch reference
    out = attn.flash_attention(*leaves, causal=causal)
    ref64 = attn.flash_attention_reference(*leaves64, causal=causal)
    lp_ref = _lowp_reference(*leaves_lp, causal=causal)
    assert _err_vs_fp64(out, ref64) <= 2 * _err_vs_fp64(lp_ref, ref64) + floor, (
        f"{what}out err {_err_vs_fp64(out, ref64):.3e} vs torch {q.dtype} err {_err_vs_fp64(lp_ref, ref64):.3e}"
    )
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad)
    grads64 = torch.autograd.grad(ref64, leaves64, grad.double())
    grads_lp = torch.autograd.grad(lp_ref, leaves_lp, grad)
    for name, g, g64, glp in zip(("dq", "dk", "dv"), grads, grads64, grads_lp):
        assert _err_vs_fp64(g, g64) <= 2 * _err_vs_fp64(glp, g64) + floor, (
            f"{what}{name} err {_err_vs_fp64(g, g64):.3e} vs torch {q.dtype} err {_err_vs_fp64(glp, g64):.3e}"
        )


def _lowp_reference(q, k, v, causal):
    """Attention computed the way eager PyTorch would in q's dtype (SDPA math, repeated K/V)."""
    group = q.shape[1] // k.shape[1]
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device).tril(seqlen_k - seqlen_q) if causal else None
    scores = (q @ k.repeat_interleave(group, 1).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), -1).to(q.dtype) @ v.repeat_interleave(group, 1)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_flash_attention_varlen(dtype):
    lengths = [1, 700, 2048, 33, 1500]
    cu = torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(sum(lengths), 32, 128, device="cuda", generator=gen).to(dtype)
    k = torch.randn(sum(lengths), 8, 128, device="cuda", generator=gen).to(dtype)
    v = torch.randn(sum(lengths), 8, 128, device="cuda", generator=gen).to(dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    leaves32 = [x.float().requires_grad_() for x in (q, k, v)]
    out = attn.flash_attention_varlen(*leaves, cu, cu, max(lengths), max(lengths))
    ref = attn.flash_attention_varlen_reference(*leaves32, cu, cu, max(lengths), max(lengths))
    assert_close(out, ref, 2e-2, 2e-2, f"gpu varlen out {dtype}")
    grad = torch.randn_like(out)
    for name, g, g_ref in zip(
        ("dq", "dk", "dv"), torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, leaves32, grad.float())
    ):
        assert_close(g, g_ref, 5e-2, 5e-2, f"gpu varlen {name} {dtype}")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_packed_attention_at_the_gpt2_training_shape(dtype):
    """GPT-2 124M's attention (12 heads of 64, 1024 tokens) from one packed projection: the same output as
    attention on views of it, the same d(qkv) as autograd assembles, and both within the real-shapes bar."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    qkv = torch.randn(4, 1024, 36, 64, generator=gen, device="cuda").to(dtype)
    (out, dqkv), (out_ref, dqkv_ref) = packed_and_unpacked(qkv, 12)
    assert torch.equal(out, out_ref)
    assert_close(dqkv, dqkv_ref, 1e-3, 1e-3, f"gpu packed d(qkv) {dtype}")
    q, k, v = (x.transpose(1, 2) for x in qkv.split((12, 12, 12), dim=2))
    _check_against_torch_in_dtype(q, k, v, True, floor=1e-3 if dtype == torch.float16 else 8e-3, what="packed: ")


@requires_cuda
def test_gpu_fp32_inputs_use_exact_dots():
    q, k, v = random_qkv(1, 4, 2, 300, 300, 64, torch.float32, seed=5, device="cuda")
    out = attn.flash_attention(q, k, v)
    assert_close(out, attn.flash_attention_reference(q, k, v), 1e-5, 1e-4, "fp32 (ieee dots, not tf32)")


@requires_cuda
def test_gpu_batch_x_heads_past_one_grid_axis():
    """B x H = 2,100 x 32 = 67,200 programs per query block: more than CUDA's 65,535 on grid axis 1.
    The bar is the real-shapes test's (at most 2x PyTorch's own bf16 error, plus a floor): among 34M
    bf16 gradients a few land an element-wise tolerance's width away from an fp32 reference."""
    q, k, v = random_qkv(2100, 32, 8, 8, 8, 64, torch.bfloat16, seed=6, device="cuda")
    _check_against_torch_in_dtype(q, k, v, causal=True, floor=8e-3, what="B x H > 65535: ")
