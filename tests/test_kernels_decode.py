"""kernels.decode: split-KV decode attention over the paged KV cache vs the torch reference.

CPU tests run the kernels in the Triton interpreter (key tiles of 16) at tiny shapes:
a pool whose blocks are handed out to the rows in shuffled order (no two rows share a
block, spare blocks and the tail of each row's last block hold noise), rows of lengths
1/17/33... in one batch, block sizes 16, 12 (not a power of two, so key tiles straddle
blocks), 1, and one big block per row (the slot cache), GQA 4:1 and 3:1, head dims
16/32, fp32/fp16, explicit and automatic split counts. The reference is itself checked
against a dense computation that gathers each row's keys by hand. Without CUDA this
module turns the interpreter on (TRITON_INTERPRET=1) before anything imports triton.
GPU tests run the compiled kernels at the benchmark shapes in bf16/fp16.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels import _utils  # noqa: E402
from kernels import attention as attn  # noqa: E402
from kernels import decode as dec  # noqa: E402
from kernel_checks import assert_close, requires_cuda, skip_unless_interpreted  # noqa: E402

on_cpu_interpreter = skip_unless_interpreted(dec)

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
SLOT = None  # block_size for "one block per row, as big as the longest row" (the slot cache)


def make_pool(lengths, n_heads, n_kv_heads, head_dim, block_size, dtype, seed, device="cpu",
              spare_blocks=3, spare_columns=1, table_fill="random"):
    """A filled paged pool, one query per row; returns (q, k_cache, v_cache, block_table, lengths).

    Each row gets ceil(length / block_size) blocks drawn from a shuffled permutation of
    the pool (no sharing), plus ``spare_blocks`` blocks nobody owns. The table has
    ``spare_columns`` columns beyond the longest row's need; its unused entries hold
    random valid ids (``table_fill="random"``, i.e. other rows' blocks), zeros, or ids
    far outside the pool (``"invalid"``), all of which the kernels must ignore.
    ``block_size=SLOT`` gives one block per row of the longest row's length.
    """
    gen = torch.Generator().manual_seed(seed)
    if block_size is SLOT:
        block_size, spare_columns = max(lengths), 0
    needed = [-(-length // block_size) for length in lengths]
    max_blocks = max(needed) + spare_columns
    num_blocks = sum(needed) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    fill_gen = torch.Generator().manual_seed(seed + 1)  # the fill does not change the pool's draws
    if table_fill == "random":
        table = torch.randint(0, num_blocks, (len(lengths), max_blocks), generator=fill_gen)
    elif table_fill == "zeros":
        table = torch.zeros(len(lengths), max_blocks, dtype=torch.long)
    else:
        table = torch.randint(num_blocks + 1000, 2**30, (len(lengths), max_blocks), generator=fill_gen)
        table[:, ::2] = -7
    used = 0
    for row, n in enumerate(needed):
        table[row, :n] = perm[used: used + n]
        used += n
    shape = (num_blocks, block_size, n_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn(len(lengths), n_heads, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(lengths, dtype=torch.int32)
    return (q.to(device), k_cache.to(device), v_cache.to(device), table.to(torch.int32).to(device),
            lens.to(device))


def dense_attention(q, k_cache, v_cache, block_table, lengths, scale=None):
    """Independent check of the reference: gather each row's keys block by block, then SDPA (fp64)."""
    block_size, n_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // n_kv_heads
    outs = []
    for row in range(q.shape[0]):
        length = int(lengths[row])
        n_blocks = -(-length // block_size)
        blocks = [int(block_table[row, j]) for j in range(n_blocks)]
        k = torch.cat([k_cache[b] for b in blocks])[:length].double()  # (L, Hkv, D)
        v = torch.cat([v_cache[b] for b in blocks])[:length].double()
        k = k.transpose(0, 1).repeat_interleave(group, dim=0)[None]  # (1, H, L, D)
        v = v.transpose(0, 1).repeat_interleave(group, dim=0)[None]
        outs.append(F.scaled_dot_product_attention(q[row, :, None].double()[None], k, v, scale=scale)[0, :, 0])
    return torch.stack(outs)  # (B, H, D) fp64


# ----------------------------------------------------------------------------- CPU (interpreter)

CASES = [
    # (lengths, H, Hkv, D, block_size, dtype, num_splits)
    ([1, 17, 33], 8, 2, 16, 16, torch.float32, None),  # GQA 4:1, automatic splits
    ([1, 17, 33], 8, 2, 16, 16, torch.float16, 3),
    ([33, 5], 3, 1, 32, 12, torch.float32, 4),  # GQA 3:1, 12-key blocks, more splits than tiles
    ([40], 4, 4, 16, 12, torch.float16, 1),  # no split: the first kernel writes the output
    ([33, 49, 1], 12, 4, 16, 12, torch.float32, 7),  # GQA 3:1
    ([26, 1, 17], 8, 2, 32, 1, torch.float32, 2),  # one position per block
    ([33, 49, 1], 12, 4, 16, SLOT, torch.float32, None),  # slot cache: one block per row
    ([17, 40], 8, 2, 32, SLOT, torch.float16, 3),
]


def _case_id(case):
    lengths, n_heads, n_kv_heads, head_dim, block_size, dtype, num_splits = case
    bs = "slot" if block_size is SLOT else block_size
    return f"L{lengths}-H{n_heads}-Hkv{n_kv_heads}-D{head_dim}-bs{bs}-{str(dtype)[6:]}-splits{num_splits}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_reference_matches_dense_gather(case):
    lengths, n_heads, n_kv_heads, head_dim, block_size, dtype, _ = case
    q, k_cache, v_cache, table, lens = make_pool(lengths, n_heads, n_kv_heads, head_dim, block_size, dtype, seed=3)
    out = dec.decode_attention_reference(q, k_cache, v_cache, table, lens)
    assert out.dtype == dtype and out.shape == q.shape
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-3, 1e-3)  # the reference rounds to q's dtype
    assert_close(out, dense_attention(q, k_cache, v_cache, table, lens), atol, rtol, f"reference {case}")


@on_cpu_interpreter
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_decode_matches_reference(case):
    lengths, n_heads, n_kv_heads, head_dim, block_size, dtype, num_splits = case
    q, k_cache, v_cache, table, lens = make_pool(
        lengths, n_heads, n_kv_heads, head_dim, block_size, dtype, seed=len(lengths)
    )
    out = dec.decode_attention(q, k_cache, v_cache, table, lens, num_splits=num_splits)
    expected = dec.decode_attention_reference(q, k_cache, v_cache, table, lens)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, expected, *TOL[dtype], what=f"decode {case}")


@on_cpu_interpreter
@pytest.mark.parametrize("num_splits", [1, 3])
def test_more_batch_x_kv_heads_than_one_grid_axis_holds(monkeypatch, num_splits):
    """batch x kv heads folds onto grid axes 1 and 2 (CUDA stops axis 1 at 65535; here at 4)."""
    monkeypatch.setattr(_utils, "MAX_GRID_Y", 4)
    q, k_cache, v_cache, table, lens = make_pool([5, 17, 1, 9, 12], 4, 2, 16, 4, torch.float32, seed=2)
    out = dec.decode_attention(q, k_cache, v_cache, table, lens, num_splits=num_splits)  # 10 -> 4 x 3 programs
    assert_close(out, dec.decode_attention_reference(q, k_cache, v_cache, table, lens), 1e-5, 1e-5,
                 what=f"decode over two grid axes, {num_splits} split(s)")


@on_cpu_interpreter
def test_split_count_does_not_change_the_result():
    q, k_cache, v_cache, table, lens = make_pool([45, 2], 4, 2, 16, 12, torch.float32, seed=1)
    outs = [dec.decode_attention(q, k_cache, v_cache, table, lens, num_splits=n) for n in (1, 2, 5, 16)]
    for n, out in zip((2, 5, 16), outs[1:]):
        assert_close(out, outs[0], 1e-6, 1e-6, f"num_splits={n} vs 1")


@on_cpu_interpreter
def test_unused_table_entries_are_never_read():
    # Entries past a row's last used block: other rows' blocks, zeros, or ids far outside the pool.
    args = [make_pool([17, 5, 30], 6, 2, 16, 12, torch.float32, seed=4, spare_columns=2, table_fill=fill)
            for fill in ("random", "zeros", "invalid")]
    assert torch.equal(args[0][1], args[2][1])  # same pool, same used blocks: only the unused entries differ
    outs = [dec.decode_attention(*a, num_splits=2) for a in args]
    refs = [dec.decode_attention_reference(*a) for a in args]
    for out, ref in zip(outs, refs):
        assert torch.equal(out, outs[0]) and torch.equal(ref, refs[0])


@on_cpu_interpreter
def test_scale_int64_table_strided_pool_and_query():
    # Non-contiguous caches with different strides for K and V (K one half of a combined
    # K/V pool, V stored head-major and viewed back), an int64 table and lengths, a
    # transposed query and a custom scale.
    q, k_cache, v_cache, table, lens = make_pool([17, 30], 6, 2, 16, 12, torch.float32, seed=2)
    k_view = torch.stack([k_cache, v_cache], dim=2)[:, :, 0]  # (num_blocks, block_size, Hkv, D) of a 5-D pool
    v_view = v_cache.transpose(1, 2).contiguous().transpose(1, 2)  # same values, (block, head, pos, dim) memory
    assert not k_view.is_contiguous() and not v_view.is_contiguous() and k_view.stride() != v_view.stride()
    q_strided = torch.randn(2, 16, 6).transpose(1, 2)  # (B, H, D) view with non-unit strides
    out = dec.decode_attention(q_strided, k_view, v_view, table.long(), lens.long(), scale=0.2, num_splits=2)
    expected = dec.decode_attention_reference(q_strided, k_cache, v_cache, table, lens, scale=0.2)
    assert_close(out, expected, 1e-5, 1e-5, "scale=0.2, int64 table, strided pool and q")
    assert_close(expected, dense_attention(q_strided, k_cache, v_cache, table, lens, scale=0.2), 1e-5, 1e-5,
                 "reference vs dense, scale=0.2")


@on_cpu_interpreter
def test_empty_batch():
    q, k_cache, v_cache, table, lens = make_pool([3], 4, 2, 16, 4, torch.float32, seed=0)
    out = dec.decode_attention(q[:0], k_cache, v_cache, table[:0], lens[:0])
    assert out.shape == (0, 4, 16)
    assert dec.decode_attention_reference(q[:0], k_cache, v_cache, table[:0], lens[:0]).shape == (0, 4, 16)


def test_reference_equals_last_row_of_causal_prefill():
    # Decoding token t against a cache of t keys is the last query row of causal attention.
    gen = torch.Generator().manual_seed(5)
    seqlen, n_heads, n_kv_heads, head_dim, block_size = 13, 6, 2, 8, 5
    q_all = torch.randn(1, n_heads, seqlen, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(1, n_kv_heads, seqlen, head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(1, n_kv_heads, seqlen, head_dim, generator=gen, dtype=torch.float64)
    k_cache = torch.randn(6, block_size, n_kv_heads, head_dim, generator=gen, dtype=torch.float64)
    v_cache = torch.randn_like(k_cache)
    blocks = [4, 0, 2]  # positions 0-4 in block 4, 5-9 in block 0, 10-12 in block 2
    for j, blk in enumerate(blocks):
        part = slice(j * block_size, min((j + 1) * block_size, seqlen))
        n = part.stop - part.start
        k_cache[blk, :n] = k[0, :, part].transpose(0, 1)
        v_cache[blk, :n] = v[0, :, part].transpose(0, 1)
    out = dec.decode_attention_reference(
        q_all[:, :, -1], k_cache, v_cache, torch.tensor([blocks + [1]]), torch.tensor([seqlen], dtype=torch.int32)
    )
    expected = attn.flash_attention_reference(q_all, k, v, causal=True)[:, :, -1]
    assert_close(out, expected, 1e-12, 1e-12, "decode reference vs causal prefill")


def test_choose_num_splits():
    # H100 (132 SMs): batch 1 with 8 kv heads and an 8k capacity fills the GPU with 64 splits.
    assert dec.choose_num_splits(1, 8, 8192, n_sms=132) == 64
    assert dec.choose_num_splits(32, 8, 2048, n_sms=132) == 1  # 256 programs: every SM has one
    assert dec.choose_num_splits(16, 8, 2048, n_sms=132) == 4  # 128 programs: a few SMs idle
    assert dec.choose_num_splits(64, 8, 2048, n_sms=132) == 1  # enough programs already
    assert dec.choose_num_splits(1, 8, 256, n_sms=132) == 2  # >= 128 keys per split
    assert dec.choose_num_splits(1, 1, 100, n_sms=132) == 1
    assert dec.choose_num_splits(0, 8, 2048, n_sms=132) >= 1  # empty batch: no division by zero


@on_cpu_interpreter
def test_available_and_errors_off_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not dec.available("cpu")
    q, k_cache, v_cache, table, lens = make_pool([3], 2, 2, 16, 4, torch.float32, seed=0)
    with pytest.raises(ValueError, match="decode_attention_reference"):
        dec.decode_attention(q, k_cache, v_cache, table, lens)


def test_interpreter_is_usable_on_cpu_only_machines():
    if torch.cuda.is_available() or not _utils.triton_importable():
        pytest.skip("only meaningful on a CPU-only machine with triton installed")
    assert _utils.interpreting() and dec.available("cpu"), (
        "triton was imported before TRITON_INTERPRET=1 was set; the CPU kernel tests cannot run"
    )


def _bad(**overrides):
    # Pool of 3 blocks of 4 positions, 2 kv heads, D 16; table (2, 2): capacity 8.
    gen = torch.Generator().manual_seed(0)
    args = dict(
        q=torch.randn(2, 4, 16, generator=gen),
        k_cache=torch.randn(3, 4, 2, 16, generator=gen),
        v_cache=torch.randn(3, 4, 2, 16, generator=gen),
        block_table=torch.tensor([[2, 0], [1, 9]], dtype=torch.int32),  # row 1's second entry unused
        lengths=torch.tensor([7, 4], dtype=torch.int32),
    )
    args.update(overrides)
    return args


def test_good_inputs_pass_validation():
    out = dec.decode_attention_reference(**_bad())  # the out-of-pool id 9 is in row 1's unused part
    assert out.shape == (2, 4, 16)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(q=torch.randn(2, 3, 16)), "multiple of"),
        (dict(q=torch.randn(2, 4, 8)), "head dim"),
        (dict(v_cache=torch.randn(3, 5, 2, 16)), "one shape"),
        (dict(k_cache=torch.randn(3, 2, 16)), "k_cache must be 4-D"),
        (dict(v_cache=torch.randn(3, 4, 2, 16, dtype=torch.float64)), "share a dtype"),
        (dict(lengths=torch.tensor([0, 4], dtype=torch.int32)), r"lengths must be in \[1"),
        (dict(lengths=torch.tensor([3, 9], dtype=torch.int32)), r"max_blocks \* block_size = 2 \* 4 = 8"),
        (dict(block_table=torch.tensor([[3, 0], [1, 9]], dtype=torch.int32)), r"block_table\[0, 0\] = 3"),
        (dict(block_table=torch.tensor([[2, 0], [-1, 0]], dtype=torch.int32)), r"num_blocks=3"),
        (dict(lengths=torch.tensor([7, 5], dtype=torch.int32)), r"block_table\[1, 1\] = 9"),  # now used
        (dict(block_table=torch.tensor([[0, 1]], dtype=torch.int32)), r"must be \(2, max_blocks\)"),
        (dict(block_table=torch.tensor([0, 1], dtype=torch.int32)), "block_table must be 2-D"),
        (dict(block_table=torch.zeros(2, 2)), "block_table has dtype"),
        (dict(block_table=torch.zeros(2, 0, dtype=torch.int32)), "empty cache or block table"),
        (dict(lengths=torch.tensor([3.0, 4.0])), "lengths has dtype"),
        (dict(lengths=torch.tensor([3], dtype=torch.int32)), r"and \(2,\)"),
        (dict(num_splits=0), "num_splits"),
        (dict(scale=0.0), "scale"),
    ],
)
def test_bad_inputs_raise_value_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        dec.decode_attention_reference(**_bad(**overrides))


def test_triton_path_rejects_unsupported_head_dim():
    q, k_cache, v_cache, table, lens = make_pool([3], 2, 2, 24, 4, torch.float32, seed=0)
    with pytest.raises(ValueError, match="head dim 24"):
        dec.decode_attention(q, k_cache, v_cache, table, lens)


# ----------------------------------------------------------------------------- GPU


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "lengths,n_heads,n_kv_heads,head_dim,block_size",
    [
        ([8192], 32, 8, 128, 16),  # bench shape: batch 1, long cache
        ([2048] * 8 + [1, 100, 2047, 1500] * 6, 32, 8, 128, 16),  # batch 32, mixed lengths
        ([3000, 17], 12, 12, 64, 12),  # MHA, head dim 64, blocks not a power of two
        ([500, 999], 16, 2, 256, SLOT),  # slot cache: one block per row
        ([4000, 1, 777], 32, 8, 128, 512),  # big blocks
    ],
)
def test_gpu_decode_real_shapes(dtype, lengths, n_heads, n_kv_heads, head_dim, block_size):
    q, k_cache, v_cache, table, lens = make_pool(
        lengths, n_heads, n_kv_heads, head_dim, block_size, dtype, seed=0, device="cuda"
    )
    expected = dec.decode_attention_reference(q.double(), k_cache.double(), v_cache.double(), table, lens)
    for num_splits in (None, 1, 16):
        out = dec.decode_attention(q, k_cache, v_cache, table, lens, num_splits=num_splits)
        assert_close(out, expected, *TOL[dtype], what=f"gpu decode {dtype} splits={num_splits}")


@requires_cuda
def test_gpu_batch_x_kv_heads_past_one_grid_axis():
    """8,200 rows x 8 kv heads = 65,600 programs per split: more than CUDA's 65,535 on grid axis 1."""
    q, k_cache, v_cache, table, lens = make_pool([3, 17, 40, 9] * 2050, 32, 8, 64, 16, torch.bfloat16, seed=3,
                                                 device="cuda")
    expected = dec.decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), table, lens)
    for num_splits in (None, 1):
        out = dec.decode_attention(q, k_cache, v_cache, table, lens, num_splits=num_splits)
        assert_close(out, expected, *TOL[torch.bfloat16], what=f"B x Hkv > 65535, splits={num_splits}")
