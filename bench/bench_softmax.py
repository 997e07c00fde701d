"""Benchmark kernels.softmax (fused, fp32 out, temperature) against torch.softmax on CUDA.

    python bench/bench_softmax.py [--dtypes fp32,bf16] [--rep 200] [--cuda-graph]

Prints device, versions, and per shape: time, effective bandwidth (bytes read + written
/ time) and the ratio to the fastest PyTorch baseline measured in the same run
(``torch.softmax(x, -1)`` for temperature 1, ``torch.softmax(x / T, -1)`` otherwise;
16-bit inputs use ``torch.softmax(x, -1, dtype=torch.float32)``, which upcasts inside
the kernel). Targets on H100: >= 1.3x at 4096x8192 fp32, >= 2x at 64x128256 fp32.
``--cuda-graph`` times CUDA-graph replays of each call (Triton's ``do_bench_cudagraph``), for both
sides: GPU time without the host's launch cost, which is how the sampler runs inside a captured
decode step, and what small shapes (64 rows, two launches) are otherwise bound by.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = [(4096, 8192), (64, 128256), (1, 128256), (256, 128256), (4096, 32000), (32768, 1024)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32,bf16,fp16")
    parser.add_argument("--rep", type=int, default=200, help="do_bench repetition time in ms")
    parser.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays (GPU time only)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_softmax.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine")

    import triton
    import triton.testing

    from kernels import softmax as sm

    if args.cuda_graph:
        bench = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=args.rep, return_mode="median")  # noqa: E731
    else:
        bench = lambda fn: triton.testing.do_bench(fn, rep=args.rep, return_mode="median")  # noqa: E731
    timing = "CUDA-graph replays" if args.cuda_graph else "eager calls (host launch cost included)"
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{timing}")
    print(f"{'shape':>14} {'dtype':>5} {'T':>4} {'kiln ms':>9} {'GB/s':>7} {'torch ms':>9} {'GB/s':>7} {'ratio':>6}")
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for n_rows, n_cols in SHAPES:
            x = torch.randn(n_rows, n_cols, device="cuda").mul_(4).to(dtype)
            for temperature in (1.0, 0.7):
                kiln = lambda: sm.softmax(x, temperature)  # noqa: E731
                baselines = _baselines(x, temperature)
                expected = baselines[0]()
                err = (kiln() - expected.float()).abs().max().item()
                if err > 1e-5:
                    raise SystemExit(f"kiln softmax disagrees with torch at {n_rows}x{n_cols} {dtype_name}: {err:.2e}")
                t_kiln = bench(kiln)
                t_torch = min(bench(fn) for fn in baselines)
                moved = x.numel() * x.element_size() + x.numel() * 4  # read x, write fp32 probs
                print(
                    f"{f'{n_rows}x{n_cols}':>14} {dtype_name:>5} {temperature:>4} {t_kiln:9.4f} "
                    f"{moved / t_kiln / 1e6:7.0f} {t_torch:9.4f} {moved / t_torch / 1e6:7.0f} {t_torch / t_kiln:6.2f}x"
                )


def _baselines(x: torch.Tensor, temperature: float) -> list:
    """PyTorch ways to get fp32 probabilities of x / temperature; the fastest one counts."""
    if temperature == 1.0:
        if x.dtype == torch.float32:
            return [lambda: torch.softmax(x, -1)]
        return [lambda: torch.softmax(x, -1, dtype=torch.float32), lambda: torch.softmax(x.float(), -1)]
    if x.dtype == torch.float32:
        return [lambda: torch.softmax(x / temperature, -1)]
    return [lambda: torch.softmax(x / temperature, -1, dtype=torch.float32), lambda: torch.softmax(x.float() / temperature, -1)]


if __name__ == "__main__":
    main()
