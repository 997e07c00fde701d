"""Benchmark kernels.decode.decode_attention (flash-decoding over the paged KV cache) on CUDA.

    python bench/bench_decode.py [--dtype bf16] [--rep 200] [--block-size 16]

One new query per sequence against a cache of L keys, bf16, GQA H=32 / Hkv=8, D=128.
Kiln reads a paged pool (num_blocks, block_size, Hkv, D) through a block table whose
blocks are handed out in shuffled order (block_size 16 by default), as a serving
engine's allocator would after some churn. Every row has the same length so the
PyTorch baselines need no mask (their best case), and the baselines get each row's
K/V already gathered into dense (B, Hkv, L, D) tensors, the gather NOT timed: they
are timed at their best, not with the copy a model would have to make. Baselines in
the same run: SDPA (default dispatch, ``enable_gqa=True``), SDPA pinned to the flash
backend, SDPA on K/V repeated to H heads (the repeat is timed: a model must do it
every step), and grouped matmul + softmax (gpt-fast style). The ``gather+sdpa``
column is what a model without the kernel pays per step: gather the blocks through
the table, then SDPA (informational; not part of the ratio). Prints time, K/V
bandwidth (the rows' K/V bytes) and the ratio to the fastest baseline. Targets on
H100: >= 2x at B1 L8192, >= 1x at B32 L2048.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# (batch, n_heads, n_kv_heads, cached length, head dim)
SHAPES = [(1, 32, 8, 8192, 128), (32, 32, 8, 2048, 128), (1, 32, 8, 32768, 128), (8, 32, 8, 4096, 128),
          (64, 32, 8, 1024, 128), (1, 32, 32, 4096, 128), (16, 16, 4, 2048, 64)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--rep", type=int, default=200, help="do_bench repetition time in ms")
    parser.add_argument("--block-size", type=int, default=16, help="positions per cache block (any int >= 1)")
    args = parser.parse_args()
    if args.block_size < 1:
        parser.error("--block-size must be >= 1")
    if not torch.cuda.is_available():
        sys.exit("bench_decode.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine")

    import triton
    import triton.testing

    from kernels import decode as dec

    dtype = DTYPES[args.dtype]
    block_size = args.block_size
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{args.dtype} | block_size {block_size}")
    print(f"{'B':>3} {'H':>3} {'Hkv':>3} {'L':>6} {'D':>4} {'splits':>6} {'kiln us':>8} {'GB/s':>6} "
          f"{'best torch':>22} {'us':>8} {'GB/s':>6} {'ratio':>6} {'gather+sdpa us':>14}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for batch, n_heads, n_kv_heads, length, head_dim in SHAPES:
        q, k_cache, v_cache, block_table, lengths = paged_problem(batch, n_heads, n_kv_heads, length, head_dim,
                                                                  block_size, dtype, gen)
        n_sms = torch.cuda.get_device_properties(0).multi_processor_count
        splits = dec.choose_num_splits(batch, n_kv_heads, block_table.shape[1] * block_size, n_sms)

        def kiln():
            return dec.decode_attention(q, k_cache, v_cache, block_table, lengths)

        def gather():
            return dense_rows(k_cache, block_table, length), dense_rows(v_cache, block_table, length)

        k_dense, v_dense = (t.contiguous() for t in gather())
        baselines = _baselines(q, k_dense, v_dense)
        expected = dec.decode_attention_reference(q, k_cache, v_cache, block_table, lengths).float()
        err = (kiln().float() - expected).abs().max().item()
        if err > 2e-2:
            raise SystemExit(f"kiln decode disagrees with the reference at B{batch} L{length}: max err {err:.2e}")
        err = (baselines["sdpa(enable_gqa)"]()[:, :, 0].float() - expected).abs().max().item()
        if err > 2e-2:
            raise SystemExit(f"the dense baseline K/V do not match the pool at B{batch} L{length}: max err {err:.2e}")
        t_kiln = triton.testing.do_bench(kiln, rep=args.rep, return_mode="median")
        times = {}
        for name, fn in baselines.items():
            try:
                times[name] = triton.testing.do_bench(fn, rep=args.rep, return_mode="median")
            except RuntimeError:  # backend unavailable for this shape/dtype/build
                continue
        best = min(times, key=times.get)
        gqa = n_heads != n_kv_heads

        def gather_sdpa():
            k, v = gather()
            return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=gqa)

        t_gather = triton.testing.do_bench(gather_sdpa, rep=args.rep, return_mode="median")
        kv_bytes = 2 * k_dense.numel() * k_dense.element_size()  # the rows' keys and values, read once
        print(
            f"{batch:>3} {n_heads:>3} {n_kv_heads:>3} {length:>6} {head_dim:>4} {splits:>6} {t_kiln * 1e3:8.1f} "
            f"{kv_bytes / t_kiln / 1e6:6.0f} {best:>22} {times[best] * 1e3:8.1f} {kv_bytes / times[best] / 1e6:6.0f} "
            f"{times[best] / t_kiln:6.2f}x {t_gather * 1e3:14.1f}"
        )


def paged_problem(batch, n_heads, n_kv_heads, length, head_dim, block_size, dtype, gen, layout="nhd"):
    """Random q (B, H, D) and a paged K/V pool holding `length` keys per row in shuffled blocks:
    (q, k_cache, v_cache, block_table (B, max_blocks) int32, lengths (B,) int32), on CUDA.

    The pool is (num_blocks, block_size, Hkv, D) either way; ``layout`` "nhd" stores it so (Kiln's KVCache,
    vLLM's layout: a kv head's positions 2 KB apart at Hkv 8, D 128), "hnd" stores it (num_blocks, Hkv,
    block_size, D) and passes a transposed view (a block's positions of one kv head contiguous)."""
    q = torch.randn(batch, n_heads, head_dim, device="cuda", dtype=dtype)
    max_blocks = -(-length // block_size)
    num_blocks = batch * max_blocks
    if layout not in ("nhd", "hnd"):
        raise ValueError(f"layout must be 'nhd' or 'hnd', got {layout!r}")
    if layout == "hnd":
        k_cache = torch.randn(num_blocks, n_kv_heads, block_size, head_dim, device="cuda", dtype=dtype).transpose(1, 2)
    else:
        k_cache = torch.randn(num_blocks, block_size, n_kv_heads, head_dim, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)  # (preserves the strides)
    block_table = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32).view(batch, max_blocks)
    lengths = torch.full((batch,), length, device="cuda", dtype=torch.int32)
    return q, k_cache, v_cache, block_table, lengths


def dense_rows(cache, block_table, length):
    """Each row's first `length` positions, (B, Hkv, L, D), as model/attention.py gathers them."""
    return cache[block_table].flatten(1, 2)[:, :length].transpose(1, 2)


def _baselines(q, k_cache, v_cache) -> dict:
    """Torch baselines on dense (B, Hkv, L, D) K/V (each row's keys already gathered from the pool)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, n_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[1]
    group = n_heads // n_kv_heads
    q4 = q[:, :, None, :]  # (B, H, 1, D)
    gqa = group > 1

    def sdpa_default():
        return F.scaled_dot_product_attention(q4, k_cache, v_cache, enable_gqa=gqa)

    def sdpa_flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q4, k_cache, v_cache, enable_gqa=gqa)

    def sdpa_repeated_kv():
        k = k_cache.repeat_interleave(group, dim=1) if gqa else k_cache
        v = v_cache.repeat_interleave(group, dim=1) if gqa else v_cache
        return F.scaled_dot_product_attention(q4, k, v)

    def grouped_matmul():
        qg = q.view(batch, n_kv_heads, group, head_dim)  # (B, Hkv, G, D)
        scores = torch.matmul(qg, k_cache.transpose(-1, -2)) * (1.0 / math.sqrt(head_dim))  # (B, Hkv, G, L)
        return torch.matmul(torch.softmax(scores.float(), -1).to(q.dtype), v_cache)

    return {"sdpa(enable_gqa)": sdpa_default, "sdpa flash": sdpa_flash, "sdpa repeat_kv": sdpa_repeated_kv,
            "grouped matmul": grouped_matmul}


if __name__ == "__main__":
    main()
