"""Time the long-row softmax plan's variants (kernels.softmax.LONG_ROW_PLAN) on CUDA, CUDA-graph replays.

    python bench/softmax_variants.py [--rep 30] [--shapes 64x128256,256x128256]

Rows longer than one block run two passes: chunk stats, then each chunk normalized. The variants differ
in how pass 2 meets the L2 cache that still holds part of x from pass 1 (chunks taken last-first, L2
eviction hints) and in the chunk length. Each is checked against torch.softmax, then timed beside it
(fp32, temperature 1); the ratio is torch's time over the variant's.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rep", type=int, default=30)
    p.add_argument("--shapes", default="64x128256,256x128256,8x128256")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("softmax_variants.py needs a CUDA GPU")
    import triton
    import triton.testing

    from kernels import softmax as sm

    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"CUDA-graph replays, fp32, T=1; default plan {sm.LONG_ROW_PLAN}")
    bench = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=args.rep, return_mode="median")  # noqa: E731
    for shape in args.shapes.split(","):
        n_rows, n_cols = map(int, shape.split("x"))
        x = torch.randn(n_rows, n_cols, device="cuda").mul_(4)
        expected = torch.softmax(x, -1)
        t_torch = bench(lambda: torch.softmax(x, -1))
        moved = x.numel() * 8
        print(f"{shape}: torch.softmax {t_torch * 1e3:.1f} us ({moved / t_torch / 1e6:.0f} GB/s)")
        for reverse, hints, chunk in itertools.product((False, True), (False, True), (4096, 8192, 16384)):
            fn = lambda: sm._softmax(x, 1.0, reverse=reverse, l2_hints=hints, chunk=chunk)  # noqa: E731
            err = (fn() - expected).abs().max().item()
            if err > 1e-5:
                print(f"  reverse={reverse} hints={hints} chunk={chunk}: WRONG, max error {err:.2e}")
                continue
            t = bench(fn)
            print(f"  reverse={reverse!s:5} hints={hints!s:5} chunk={chunk:5}  {t * 1e3:6.1f} us "
                  f"{moved / t / 1e6:6.0f} GB/s  {t_torch / t:5.2f}x")


if __name__ == "__main__":
    main()
