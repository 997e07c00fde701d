"""Benchmark kernels.gemv (a decode step's matrix-vector products, norm or SwiGLU fused in) on CUDA.

    python bench/bench_gemv.py [--dtype bf16] [--rep 50] [--rows 1,4]
    TRITON_INTERPRET=1 python bench/bench_gemv.py --check-only --tiny --dtype fp32   # CPU smoke

Shapes are the Llama 1.1B decode step's products (d 2048, qkv 2560, MLP 5632, LM head 32000), at
`--rows` rows per call (the decode batch). Each variant is captured in a CUDA graph and timed by
replaying it (triton.testing.do_bench, median, L2 flushed between replays: in a decode step each
layer's weights come from HBM), so the numbers are GPU time only, as in the server's captured step.
What each Kiln kernel replaces, and the baselines timed beside it (the ratio is to the faster):
- `gemv`: the product alone; cuBLAS (`F.linear`).
- `rmsnorm_gemv` (qkv, gate+up): the residual add + RMSNorm, then the product; Kiln's current path
  (the fused add+norm Triton kernel, then cuBLAS) and the torch ops through torch.compile.
- `silu_mul_gemv` (down): SwiGLU, then the product; Kiln's current path (the SwiGLU Triton kernel,
  then cuBLAS) and the torch ops through torch.compile.
GB/s counts the weight matrix's bytes only (what bounds a batch-1 step). Every variant's output is
checked against the unfused ops first (`--check-only` stops there).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # decode_configs' CUDA-graph timer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (name, N, K, prologue) of the 1.1B Llama shape; tiny: odd sizes for the interpreter
LLAMA_1B = [("qkv", 2560, 2048, "rmsnorm"), ("o", 2048, 2048, None), ("gate+up", 11264, 2048, "rmsnorm"),
            ("down", 2048, 5632, "silu"), ("lm head", 32000, 2048, "rmsnorm")]
TINY = [("qkv", 40, 48, "rmsnorm"), ("o", 48, 48, None), ("down", 48, 40, "silu")]


def torch_add_rms_norm(x, residual, weight, eps=1e-5):
    summed = residual + x
    xf = summed.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(summed) * weight, summed


def product_inputs(rows: int, n: int, k: int, dtype: torch.dtype, dev: str):
    """(weight (N, K), x and residual (rows, K), norm gain (K,), h = [gate; up] (rows, 2K)) for one product,
    seeded by its shape."""
    gen = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(dev, dtype)
    x, residual = (torch.randn(rows, k, generator=gen).to(dev, dtype) for _ in range(2))
    gain = (1 + 0.1 * torch.randn(k, generator=gen)).to(dev, dtype)
    h = torch.randn(rows, 2 * k, generator=gen).to(dev, dtype)
    return w, x, residual, gain, h


def current_path(prologue: str | None, x, residual, gain, h):
    """Kiln's path today for a product ("rmsnorm", "silu" or None), as a function of the weight: the fused
    add+norm or SwiGLU Triton kernel then cuBLAS, or cuBLAS alone."""
    from kernels.activation import silu_mul
    from kernels.norm import add_norm

    if prologue == "rmsnorm":
        return lambda w: (lambda normed, summed: (F.linear(normed, w), summed))(
            *add_norm(x, residual, gain, None, 1e-5, True))
    if prologue == "silu":
        return lambda w: F.linear(silu_mul(h), w)
    return lambda w: F.linear(x, w)


def problems(rows: int, dtype: torch.dtype, shapes, dev: str):
    """(label, weight bytes, kiln fn, [(baseline name, fn)]) per product."""
    from kernels.gemv import gemv, rmsnorm_gemv, silu_mul_gemv

    out = []
    for name, n, k, prologue in shapes:
        w, x, residual, gain, h = product_inputs(rows, n, k, dtype, dev)
        weight_bytes = w.numel() * w.element_size()
        now = current_path(prologue, x, residual, gain, h)
        current = lambda now=now, w=w: now(w)  # noqa: E731
        if prologue == "rmsnorm":
            kiln = lambda x=x, r=residual, g=gain, w=w: rmsnorm_gemv(x, r, g, w)  # noqa: E731
            plain = lambda x=x, r=residual, g=gain, w=w: (  # noqa: E731
                lambda normed, summed: (F.linear(normed, w), summed))(*torch_add_rms_norm(x, r, g))
            label = f"add+rmsnorm+{name}"
        elif prologue == "silu":
            kiln = lambda h=h, w=w: silu_mul_gemv(h, w)  # noqa: E731
            plain = lambda h=h, w=w: F.linear(F.silu(h[:, : h.shape[1] // 2]) * h[:, h.shape[1] // 2:], w)  # noqa: E731
            label = f"swiglu+{name}"
        else:
            kiln = lambda x=x, w=w: gemv(x, w)  # noqa: E731
            plain = current
            label = name
        baselines = [("kiln now" if prologue else "cuBLAS", current)]
        if prologue:
            baselines.append(("torch.compile", plain))
        out.append((f"{label} {n}x{k}", weight_bytes, kiln, baselines))
    return out


def _tensors(result):
    return result if isinstance(result, tuple) else (result,)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--rep", type=int, default=50, help="do_bench repetition time in ms")
    parser.add_argument("--rows", default="1,4", help="rows per call (decode batch sizes), comma-separated")
    parser.add_argument("--check-only", action="store_true",
                        help="compare each kernel with the unfused ops and stop (no timing; CUDA not needed)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (for --check-only under TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    shapes = TINY if args.tiny else LLAMA_1B
    dtype = DTYPES[args.dtype]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not args.check_only:
        sys.exit("bench_gemv.py needs a CUDA GPU to time (torch.cuda.is_available() is False on this machine); "
                 "--check-only --tiny runs the correctness checks on the CPU's Triton interpreter")
    rows_list = [int(r) for r in args.rows.split(",")]
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for rows in rows_list:
        for label, _, kiln, baselines in problems(rows, dtype, shapes, dev):
            got = _tensors(kiln())
            want = _tensors(baselines[-1][1]())
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, atol=tol, rtol=tol, msg=lambda m: f"{label}, {rows} rows: {m}")
    print(f"checked: gemv, rmsnorm_gemv, silu_mul_gemv equal the unfused ops ({args.dtype}, rows {args.rows})")
    if args.check_only:
        return
    import triton

    from decode_configs import graph_time

    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{args.dtype} | Llama 1.1B decode products | CUDA-graph replay, us; GB/s of weight bytes")
    print(f"{'product':>28} {'rows':>4} {'kiln us':>8} {'GB/s':>6} {'baseline':>14} {'us':>8} {'GB/s':>6} "
          f"{'vs best':>8}")
    for rows in rows_list:
        for label, weight_bytes, kiln, baselines in problems(rows, dtype, shapes, dev):
            t_kiln = 1e3 * graph_time(kiln, args.rep)
            timed = []
            for base_name, fn in baselines:
                if base_name == "torch.compile":
                    torch._dynamo.reset()
                    fn = torch.compile(fn, fullgraph=True)
                timed.append((base_name, 1e3 * graph_time(fn, args.rep)))
            best_name, best = min(timed, key=lambda item: item[1])
            print(f"{label:>28} {rows:>4} {t_kiln:8.1f} {weight_bytes / t_kiln / 1e3:6.0f} {best_name:>14} "
                  f"{best:8.1f} {weight_bytes / best / 1e3:6.0f} {best / t_kiln:7.2f}x")


if __name__ == "__main__":
    main()
