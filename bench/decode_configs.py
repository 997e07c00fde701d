"""Diagnose kernels.decode on CUDA: GPU time of each split-kernel config and split count.

    python bench/decode_configs.py [--dtype bf16] [--rep 50] [--block-size 16] [--layout nhd|hnd]

bench/bench_decode.py times whole eager calls (what a caller pays, host work included)
with the autotuner's pick. This script instead forces one launch config at a time and
times CUDA-graph replays of the call, so only GPU time counts (as in the server's
graph-captured decode step), next to SDPA on the same rows' dense K/V replayed the same
way. It is for tuning the kernel's configs and `choose_num_splits`, not a headline result.
``--layout hnd`` stores the pool's blocks head-major (a block's positions of one kv head contiguous, as
FlashInfer's HND layout does) instead of Kiln's (num_blocks, block_size, Hkv, D): the kernel reads any
strides, so this times whether the cache layout limits it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_decode's helpers

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = [(1, 32, 8, 8192, 128), (32, 32, 8, 2048, 128)]  # the two targets
CONFIGS = [(16, 2, 3), (16, 4, 2), (32, 2, 3), (32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 4, 4),
           (64, 8, 2), (128, 4, 2), (128, 8, 3)]  # (BLOCK_N, num_warps, num_stages)


def graph_time(fn, rep: int) -> float:
    """Milliseconds per replay of ``fn`` captured in a CUDA graph (median, L2 flushed between)."""
    import triton.testing

    fn()  # compile / warm up outside the capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, rep=rep, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--rep", type=int, default=50, help="do_bench repetition time in ms")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--layout", default="nhd", choices=("nhd", "hnd"),
                        help="the pool's storage: Kiln's (blocks, positions, kv heads, dim) or head-major blocks")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_configs.py needs a CUDA GPU")
    import triton

    from bench_decode import dense_rows, paged_problem
    from kernels import _utils
    from kernels import decode as dec

    dtype, block_size = DTYPES[args.dtype], args.block_size
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{args.dtype} | block_size {block_size} | layout {args.layout} | times: CUDA-graph replay, GPU only")
    tuner = dec._kernels(False).split.fn
    all_configs = list(tuner.configs)
    gen = torch.Generator(device="cuda").manual_seed(0)
    n_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch, n_heads, n_kv_heads, length, head_dim in SHAPES:
        q, k_cache, v_cache, table, lengths = paged_problem(batch, n_heads, n_kv_heads, length, head_dim,
                                                            block_size, dtype, gen, args.layout)
        k_dense = dense_rows(k_cache, table, length).contiguous()
        v_dense = dense_rows(v_cache, table, length).contiguous()
        kv_bytes = 2 * k_dense.numel() * k_dense.element_size()
        t_sdpa = graph_time(lambda: F.scaled_dot_product_attention(q[:, :, None], k_dense, v_dense,
                                                                   enable_gqa=n_heads != n_kv_heads), args.rep)
        expected = dec.decode_attention_reference(q, k_cache, v_cache, table, lengths).float()
        default_splits = dec.choose_num_splits(batch, n_kv_heads, table.shape[1] * block_size, n_sms)
        print(f"\nB{batch} H{n_heads} Hkv{n_kv_heads} L{length} D{head_dim}: SDPA {t_sdpa * 1e3:.1f} us "
              f"({kv_bytes / t_sdpa / 1e6:.0f} GB/s); default splits {default_splits}")
        print(f"{'BLOCK_N':>7} {'warps':>5} {'stages':>6} {'splits':>6} {'us':>8} {'GB/s':>6} {'vs SDPA':>8}")
        splits_list = sorted({max(1, default_splits // 4), max(1, default_splits // 2), default_splits,
                              min(128, default_splits * 2)})
        for block_n, warps, stages in CONFIGS:
            tuner.configs = [_utils.config(BLOCK_N=block_n, num_warps=warps, num_stages=stages)]
            tuner.cache.clear()
            for splits in splits_list:
                def run(splits=splits):
                    return dec.decode_attention(q, k_cache, v_cache, table, lengths, num_splits=splits)

                try:
                    err = (run().float() - expected).abs().max().item()
                    t = graph_time(run, args.rep)
                except Exception as exc:  # noqa: BLE001 (a config that does not compile: report, go on)
                    print(f"{block_n:>7} {warps:>5} {stages:>6} {splits:>6} failed: {type(exc).__name__}: {exc}"[:200])
                    break
                flag = "" if err < 2e-2 else f"  WRONG (max err {err:.2e})"
                print(f"{block_n:>7} {warps:>5} {stages:>6} {splits:>6} {t * 1e3:8.1f} {kv_bytes / t / 1e6:6.0f} "
                      f"{t_sdpa / t:7.2f}x{flag}")
    tuner.configs = all_configs
    tuner.cache.clear()


if __name__ == "__main__":
    main()
