"""kernels.decode: split-KV decode attention over the slot cache vs the torch reference.

CPU tests run the kernels in the Triton interpreter (key tiles of 16) at tiny shapes:
rows of lengths 1/17/33 in one batch, GQA 4:1 and 3:1, head dims 16/32, fp32/fp16,
explicit and automatic split counts, slots in shuffled order. Without CUDA this module
turns the interpreter on (TRITON_INTERPRET=1) before anything imports triton. GPU
tests run the compiled kernels at the benchmark shapes in bf16/fp16.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels import _utils  # noqa: E402
from kernels import attention as attn  # noqa: E402
from kernels import decode as dec  # noqa: E402
from kernel_checks import assert_close, requires_cuda, skip_unless_interpreted  # noqa: E402

on_cpu_interpreter = skip_unless_interpreted(dec)

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}



def make_cache(lengths, n_heads, n_kv_heads, head_dim, num_slots, max_seq_len, dtype, seed, device="cpu"):
    """A filled slot cache, rows placed in shuffled slots, one query per row."""
    gen = torch.Generator(device=device).manual_seed(seed)
    batch = len(lengths)
    k_cache = torch.randn(num_slots, n_kv_heads, max_seq_len, head_dim, generator=gen, device=device).to(dtype)
    v_cache = torch.randn(num_slots, n_kv_heads, max_seq_len, head_dim, generator=gen, device=device).to(dtype)
    q = torch.randn(batch, n_heads, head_dim, generator=gen, device=device).to(dtype)
    slots = torch.randperm(num_slots, generator=torch.Generator().manual_seed(seed))[:batch].to(device)
    return q, k_cache, v_cache, slots.to(torch.int32), torch.tensor(lengths, dtype=torch.int32, device=device)


# ----------------------------------------------------------------------------- CPU (interpreter)

CASES = [
    # (lengths, H, Hkv, D, dtype, num_splits)
    ([1, 17, 33], 8, 2, 16, torch.float32, None),  # GQA 4:1, automatic splits
    ([1, 17, 33], 8, 2, 16, torch.float16, 3),
    ([33, 5], 3, 1, 32, torch.float32, 4),  # GQA 3:1, more splits than a row has blocks
    ([40], 4, 4, 16, torch.float16, 1),  # no split: the first kernel writes the output
    ([33, 49, 1], 12, 4, 16, torch.float32, 7),  # GQA 3:1
]


@on_cpu_interpreter
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c[0]}-H{c[1]}-Hkv{c[2]}-D{c[3]}-{str(c[4])[6:]}-splits{c[5]}")
def test_decode_matches_reference(case):
    lengths, n_heads, n_kv_heads, head_dim, dtype, num_splits = case
    q, k_cache, v_cache, slots, lens = make_cache(lengths, n_heads, n_kv_heads, head_dim, 5, 50, dtype, seed=len(lengths))
    out = dec.decode_attention(q, k_cache, v_cache, slots, lens, num_splits=num_splits)
    expected = dec.decode_attention_reference(q, k_cache, v_cache, slots, lens)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, expected, *TOL[dtype], what=f"decode {case}")


@on_cpu_interpreter
def test_split_count_does_not_change_the_result():
    q, k_cache, v_cache, slots, lens = make_cache([45, 2], 4, 2, 16, 3, 48, torch.float32, seed=1)
    outs = [dec.decode_attention(q, k_cache, v_cache, slots, lens, num_splits=n) for n in (1, 2, 5, 16)]
    for n, out in zip((2, 5, 16), outs[1:]):
        assert_close(out, outs[0], 1e-6, 1e-6, f"num_splits={n} vs 1")


@on_cpu_interpreter
def test_scale_int64_slots_and_strided_query():
    q, k_cache, v_cache, slots, lens = make_cache([17, 30], 6, 2, 16, 4, 32, torch.float32, seed=2)
    q_strided = torch.randn(2, 16, 6).transpose(1, 2)  # (B, H, D) view with non-unit strides
    out = dec.decode_attention(q_strided, k_cache, v_cache, slots.long(), lens, scale=0.2, num_splits=2)
    expected = dec.decode_attention_reference(q_strided, k_cache, v_cache, slots, lens, scale=0.2)
    assert_close(out, expected, 1e-5, 1e-5, "scale=0.2, int64 slots, strided q")


def test_reference_equals_last_row_of_causal_prefill():
    # Decoding token t against a cache of t keys is the last query row of causal attention.
    gen = torch.Generator().manual_seed(5)
    seqlen, n_heads, n_kv_heads, head_dim = 13, 6, 2, 8
    q_all = torch.randn(1, n_heads, seqlen, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(1, n_kv_heads, seqlen, head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(1, n_kv_heads, seqlen, head_dim, generator=gen, dtype=torch.float64)
    k_cache = torch.zeros(3, n_kv_heads, 20, head_dim, dtype=torch.float64)
    v_cache = torch.zeros_like(k_cache)
    k_cache[2, :, :seqlen], v_cache[2, :, :seqlen] = k[0], v[0]
    out = dec.decode_attention_reference(
        q_all[:, :, -1], k_cache, v_cache, torch.tensor([2]), torch.tensor([seqlen], dtype=torch.int32)
    )
    expected = attn.flash_attention_reference(q_all, k, v, causal=True)[:, :, -1]
    assert_close(out, expected, 1e-12, 1e-12, "decode reference vs causal prefill")


def test_choose_num_splits():
    # H100 (132 SMs): batch 1 with 8 kv heads and an 8k cache fills the GPU with 64 splits.
    assert dec.choose_num_splits(1, 8, 8192, n_sms=132) == 64
    assert dec.choose_num_splits(32, 8, 2048, n_sms=132) == 2
    assert dec.choose_num_splits(64, 8, 2048, n_sms=132) == 1  # enough programs already
    assert dec.choose_num_splits(1, 8, 256, n_sms=132) == 2  # >= 128 keys per split
    assert dec.choose_num_splits(1, 1, 100, n_sms=132) == 1


@on_cpu_interpreter
def test_available_and_errors_off_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not dec.available("cpu")
    q, k_cache, v_cache, slots, lens = make_cache([3], 2, 2, 16, 1, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="decode_attention_reference"):
        dec.decode_attention(q, k_cache, v_cache, slots, lens)


def test_interpreter_is_usable_on_cpu_only_machines():
    if torch.cuda.is_available() or not _utils.triton_importable():
        pytest.skip("only meaningful on a CPU-only machine with triton installed")
    assert _utils.interpreting() and dec.available("cpu"), (
        "triton was imported before TRITON_INTERPRET=1 was set; the CPU kernel tests cannot run"
    )


def _bad(**overrides):
    q, k_cache, v_cache, slots, lens = make_cache([3, 4], 4, 2, 16, 3, 8, torch.float32, seed=0)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, slots=slots, lengths=lens)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(q=torch.randn(2, 3, 16)), "multiple of"),
        (dict(q=torch.randn(2, 4, 8)), "head dim"),
        (dict(v_cache=torch.randn(3, 2, 9, 16)), "one shape"),
        (dict(lengths=torch.tensor([0, 4], dtype=torch.int32)), r"lengths must be in \[1"),
        (dict(lengths=torch.tensor([3, 9], dtype=torch.int32)), "max_seq_len=8"),
        (dict(slots=torch.tensor([0, 3], dtype=torch.int32)), "num_slots=3"),
        (dict(slots=torch.tensor([0], dtype=torch.int32)), r"must both be \(2,\)"),
        (dict(lengths=torch.tensor([3.0, 4.0])), "dtype"),
        (dict(num_splits=0), "num_splits"),
        (dict(scale=0.0), "scale"),
    ],
)
def test_bad_inputs_raise_value_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        dec.decode_attention_reference(**_bad(**overrides))


def test_triton_path_rejects_unsupported_head_dim():
    q, k_cache, v_cache, slots, lens = make_cache([3], 2, 2, 24, 1, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="head dim 24"):
        dec.decode_attention(q, k_cache, v_cache, slots, lens)


# ----------------------------------------------------------------------------- GPU


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "lengths,n_heads,n_kv_heads,head_dim,max_seq_len",
    [
        ([8192], 32, 8, 128, 8192),  # bench shape: batch 1, long cache
        ([2048] * 8 + [1, 100, 2047, 1500] * 6, 32, 8, 128, 2048),  # batch 32, mixed lengths
        ([3000, 17], 12, 12, 64, 4096),  # MHA, head dim 64
        ([500, 999], 16, 2, 256, 1024),
    ],
)
def test_gpu_decode_real_shapes(dtype, lengths, n_heads, n_kv_heads, head_dim, max_seq_len):
    q, k_cache, v_cache, slots, lens = make_cache(
        lengths, n_heads, n_kv_heads, head_dim, len(lengths) + 3, max_seq_len, dtype, seed=0, device="cuda"
    )
    expected = dec.decode_attention_reference(q.double(), k_cache.double(), v_cache.double(), slots, lens)
    for num_splits in (None, 1, 16):
        out = dec.decode_attention(q, k_cache, v_cache, slots, lens, num_splits=num_splits)
        assert_close(out, expected, *TOL[dtype], what=f"gpu decode {dtype} splits={num_splits}")
