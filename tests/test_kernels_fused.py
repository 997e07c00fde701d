"""The fused inference kernels (kernels.norm, kernels.rope, kernels.activation) against their references.

CPU tests run them in the Triton interpreter at tiny, awkward shapes (odd widths, one row,
GQA 3:1, padding tokens aimed at the null block) in fp32/fp16; GPU tests run the compiled
kernels in bf16 at the Llama 1.1B shape and skip without CUDA.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels import activation, norm, rope  # noqa: E402
from kernel_checks import assert_close, requires_cuda, skip_unless_interpreted  # noqa: E402
from model.transformer import RMSNorm, apply_rope, rope_tables  # noqa: E402
from model.config import ModelConfig  # noqa: E402

on_cpu_interpreter = skip_unless_interpreted(norm)
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def _inputs(shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 2).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- add + norm


def check_add_norm(shape, dtype, device, rms, with_residual, with_bias):
    d = shape[-1]
    x, residual = _inputs(shape, dtype, device, 1), _inputs(shape, dtype, device, 2)
    weight = 1 + 0.1 * _inputs((d,), dtype, device, 3)
    bias = 0.1 * _inputs((d,), dtype, device, 4) if with_bias else None
    res = residual if with_residual else None
    normed, summed = norm.add_norm(x, res, weight, bias, 1e-5, rms)
    want_normed, want_summed = norm.add_norm_reference(x, res, weight, bias, 1e-5, rms)
    atol, rtol = TOL[dtype]
    what = f"add_norm {shape} {dtype} rms={rms} residual={with_residual} bias={with_bias}"
    assert normed.dtype == dtype and normed.shape == x.shape
    assert_close(summed, want_summed, 0, 0, what + " summed")  # one rounding of the same fp32 sum
    assert_close(normed, want_normed, atol, rtol, what + " normed")
    if not with_residual:
        assert summed is x


@on_cpu_interpreter
@pytest.mark.parametrize("shape", [(1, 1, 48), (3, 5, 17), (2, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rms,with_bias", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_norm_matches_reference(shape, dtype, rms, with_bias, with_residual):
    check_add_norm(shape, dtype, "cpu", rms, with_residual, with_bias)


def test_reference_rms_norm_is_the_models():
    """add_norm_reference(rms=True) is Kiln's RMSNorm module, bit for bit (and LayerNorm is F.layer_norm)."""
    module = RMSNorm(40, 1e-5)
    with torch.no_grad():
        module.weight.copy_(1 + 0.1 * torch.randn(40))
    x = torch.randn(3, 7, 40).to(torch.bfloat16)
    module = module.to(torch.bfloat16)
    normed, summed = norm.add_norm_reference(x, None, module.weight, eps=1e-5)
    assert torch.equal(normed, module(x)) and summed is x


@on_cpu_interpreter
def test_add_norm_rejects_bad_input():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"weight has shape \(7,\)"):
        norm.add_norm(x, None, torch.ones(7))
    with pytest.raises(ValueError, match="residual must be None or a tensor of x's shape"):
        norm.add_norm(x, torch.randn(2, 9), torch.ones(8))
    with pytest.raises(ValueError, match="bias applies to LayerNorm only"):
        norm.add_norm(x, None, torch.ones(8), torch.zeros(8), rms=True)
    with pytest.raises(ValueError, match="eps must be > 0"):
        norm.add_norm(x, None, torch.ones(8), eps=0.0)


@on_cpu_interpreter
@pytest.mark.parametrize("rms", [True, False])
def test_add_norm_strided_weight_and_mixed_dtype_reference(rms):
    """A strided weight/bias view is read as its values (the kernel wants unit stride); the reference
    returns x's dtype even with fp32 weights, as the kernel does."""
    x = _inputs((3, 8), torch.float32, "cpu", 1)
    weight = _inputs((16,), torch.float32, "cpu", 2)[::2]
    bias = None if rms else _inputs((24,), torch.float32, "cpu", 3)[::3]
    got, _ = norm.add_norm(x, None, weight, bias, rms=rms)
    want, _ = norm.add_norm_reference(x, None, weight.contiguous(), None if bias is None else bias.contiguous(),
                                      rms=rms)
    assert_close(got, want, 1e-5, 1e-5, "strided weight")
    half = x.half()
    assert norm.add_norm_reference(half, None, weight.contiguous(), rms=True)[0].dtype == torch.float16


# ----------------------------------------------------------------------------- rope + cache write


def check_rope(B, T, H, Hkv, D, dtype, device, with_rope, seed=0):
    block_size = 4
    num_blocks = max(9, 2 + -(-B * T // block_size))  # the null block and a slot for every token, with room
    qkv = _inputs((B, T, (H + 2 * Hkv) * D), dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    positions = torch.randint(0, 30, (B, T), generator=gen).to(device)
    # distinct cache slots per token (no two tokens write one place), except padding tokens,
    # which all go to the null block 0, offset 0, as the engine sends them
    slots = torch.randperm((num_blocks - 1) * block_size, generator=gen)[: B * T].view(B, T) + block_size
    blocks, offsets = slots // block_size, slots % block_size
    if T > 1:
        blocks[0, -1], offsets[0, -1] = 0, 0
    blocks, offsets = blocks.to(device), offsets.to(device)
    config = ModelConfig(vocab_size=8, n_layer=1, n_head=H, n_kv_head=Hkv, d_model=H * D, d_ff=8, max_seq_len=32)
    cos, sin = (t.to(device=device, dtype=dtype) for t in rope_tables(config)) if with_rope else (None, None)
    caches = [_inputs((num_blocks, block_size, Hkv, D), dtype, device, seed + 2 + i) for i in range(4)]
    k_got, v_got, k_want, v_want = caches[0], caches[1], caches[0].clone(), caches[1].clone()
    q = rope.rope_cache_write(qkv, H, Hkv, positions, k_got, v_got, blocks, offsets, cos, sin)
    q_want = rope.rope_cache_write_reference(qkv, H, Hkv, positions, k_want, v_want, blocks, offsets, cos, sin)
    atol, rtol = TOL[dtype]
    what = f"rope B{B} T{T} H{H}/{Hkv} D{D} {dtype} rope={with_rope}"
    assert q.shape == (B, T, H, D) and q.dtype == dtype
    assert_close(q, q_want, atol, rtol, what + " q")
    real = torch.arange(num_blocks, device=device) != 0  # the null block's content is never read
    assert_close(k_got[real], k_want[real], atol, rtol, what + " k cache")
    assert_close(v_got[real], v_want[real], 0, 0, what + " v cache")
    return q, cos, sin, positions, qkv


@on_cpu_interpreter
@pytest.mark.parametrize("B,T,H,Hkv,D", [(1, 1, 4, 4, 16), (2, 3, 6, 2, 16), (3, 5, 3, 1, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_rope", [True, False])
def test_rope_cache_write_matches_reference(B, T, H, Hkv, D, dtype, with_rope):
    check_rope(B, T, H, Hkv, D, dtype, "cpu", with_rope)


@on_cpu_interpreter
def test_rope_reference_is_the_models_rotation():
    """The rotation is model.transformer.apply_rope's (fp32 tables)."""
    q, cos, sin, positions, qkv = check_rope(2, 3, 6, 2, 16, torch.float32, "cpu", True)
    qk = qkv[..., : 8 * 16].view(2, 3, 8, 16)
    want = apply_rope(qk, cos[positions][:, :, None, :], sin[positions][:, :, None, :])[:, :, :6]
    assert_close(q, want, 1e-6, 1e-6, "q against apply_rope")


@on_cpu_interpreter
def test_rope_rejects_bad_input():
    cache = torch.zeros(4, 4, 2, 16)
    idx = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="qkv's last dim is 96, expected"):
        rope.rope_cache_write(torch.randn(1, 1, 96), 4, 2, idx, cache, cache.clone(), idx, idx)
    with pytest.raises(ValueError, match="must match the cache's 2 kv heads"):
        rope.rope_cache_write(torch.randn(1, 1, 128), 4, 4, idx, cache, cache.clone(), idx, idx)
    with pytest.raises(ValueError, match="cos and signed_sin go together"):
        rope.rope_cache_write(torch.randn(1, 1, 128), 4, 2, idx, cache, cache.clone(), idx, idx, torch.ones(8, 16))
    with pytest.raises(ValueError, match="head dim 8 is not supported"):
        small = torch.zeros(4, 4, 2, 8)
        rope.rope_cache_write(torch.randn(1, 1, 64), 4, 2, idx, small, small.clone(), idx, idx)
    # ids out of range would write outside the pool or read outside the rope tables: refused on CPU tensors
    qkv, cos = torch.randn(1, 2, 128), torch.ones(8, 16)
    ok = torch.zeros(1, 2, dtype=torch.long)
    for name, bad, match in (("blocks", 4, r"write_blocks\[0, 1\] = 4 is outside \[0, num_blocks = 4\)"),
                             ("blocks", -1, "write_blocks"),
                             ("offsets", 4, r"write_offsets\[0, 1\] = 4 is outside \[0, block_size = 4\)"),
                             ("positions", 8, r"positions\[0, 1\] = 8 is outside \[0, the rope tables' max_seq_len"),
                             ("positions", -1, "positions")):
        ids = torch.tensor([[0, bad]])
        args = dict(positions=ok, write_blocks=ok, write_offsets=ok)
        args[{"blocks": "write_blocks", "offsets": "write_offsets", "positions": "positions"}[name]] = ids
        for fn in (rope.rope_cache_write, rope.rope_cache_write_reference):
            with pytest.raises(ValueError, match=match):
                fn(qkv, 4, 2, args["positions"], cache, cache.clone(), args["write_blocks"], args["write_offsets"],
                   cos, cos)


# ----------------------------------------------------------------------------- silu * up


@on_cpu_interpreter
@pytest.mark.parametrize("shape", [(1, 1, 2), (2, 3, 200), (5, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_mul_matches_reference(shape, dtype):
    h = _inputs(shape, dtype, "cpu", 5)
    got = activation.silu_mul(h)
    want = activation.silu_mul_reference(h)
    assert got.shape == (*shape[:-1], shape[-1] // 2) and got.dtype == dtype
    atol, rtol = TOL[dtype]
    assert_close(got, want, atol, rtol, f"silu_mul {shape} {dtype}")


@on_cpu_interpreter
def test_silu_mul_of_an_empty_width():
    h = torch.randn(2, 0)
    assert activation.silu_mul(h).shape == activation.silu_mul_reference(h).shape == (2, 0)


def test_silu_mul_rejects_an_odd_width():
    with pytest.raises(ValueError, match="last dim must be even"):
        activation.silu_mul_reference(torch.randn(2, 5))


# ----------------------------------------------------------------------------- GPU


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_kernels_at_llama_shapes_on_gpu(dtype):
    for rms, with_bias in ((True, False), (False, True)):
        for shape in ((1, 1, 2048), (4, 333, 2048)):
            check_add_norm(shape, dtype, "cuda", rms, True, with_bias)
    for B, T in ((1, 1), (32, 1), (3, 77)):
        check_rope(B, T, 32, 4, 64, dtype, "cuda", True, seed=B)
        check_rope(B, T, 12, 12, 64, dtype, "cuda", False, seed=B)
    for shape in ((1, 1, 2 * 5632), (7, 100, 2 * 5632)):
        h = _inputs(shape, dtype, "cuda", 6)
        # tl.exp and torch's expf may differ in the last fp32 bit: one 16-bit rounding apart at most
        assert_close(activation.silu_mul(h), activation.silu_mul_reference(h), *TOL[dtype], f"silu_mul {shape}")
