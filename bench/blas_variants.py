"""The Llama 1.1B decode step's matrix-vector products on cuBLAS, each way PyTorch can launch them.

    python bench/blas_variants.py [--rows 1,4] [--rep 20] [--chain 22] [--inductor]
    python bench/blas_variants.py --check-only --tiny        # CPU smoke: each variant's product checked

Why: in a batch-1 decode step of the 1.1B shape (bench/RESULTS.md, fourth and sixth GPU leases) cuBLAS runs
the qkv and o products at 1.4-1.7 TB/s and the down product as split-K plus a reduction kernel at 2.0 TB/s,
where gate+up and the LM head reach 2.5-2.6 and a copy 3.0. Kiln calls `F.linear` (cuBLAS's default
heuristics on a row-major (N, K) weight). Each variant below computes the same product another way:

- `F.linear`: what the model runs now (the baseline of each ratio);
- `torch.mv`: the matrix-vector entry point (one row only);
- `x @ W^T, W^T stored (K, N)`: the weight kept transposed (a load-time layout choice), so cuBLAS gets the
  other operand order;
- `cuBLASLt`: `torch.backends.cuda.preferred_blas_library("cublaslt")`, other heuristics and kernels;
- `fp32 reduction`: `allow_bf16_reduced_precision_reduction = False`, which changes what split-K may do;
- `inductor` (`--inductor`): `torch.compile(mode="max-autotune-no-cudagraphs")` of `F.linear`, which
  autotunes Triton templates against cuBLAS.

Each is captured in a CUDA graph with `--chain` launches a replay over that many copies of the weights (as a
step runs its 22 layers; L2 flushed between replays) and reported in us a launch and GB/s of weight bytes,
with its ratio to `F.linear`; every variant's output is first checked against an fp32 product.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # decode_configs' CUDA-graph timer

PRODUCTS = [("qkv", 2560, 2048), ("o", 2048, 2048), ("gate+up", 11264, 2048), ("down", 2048, 5632),
            ("lm head", 32000, 2048)]
TINY = [("qkv", 40, 48), ("down", 24, 88)]


@contextlib.contextmanager
def cublaslt():
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


@contextlib.contextmanager
def fp32_reduction():
    previous = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = previous


def variants(x: torch.Tensor, layers: list[torch.Tensor], on_gpu: bool, inductor: bool) -> list:
    """(name, product as a function of one layer's (N, K) weight, context to launch it in) for each variant."""
    plain = contextlib.nullcontext
    out = [("F.linear", lambda w: F.linear(x, w), plain)]
    if x.shape[0] == 1:
        out.append(("torch.mv", lambda w: torch.mv(w, x[0]).unsqueeze(0), plain))
    transposed = {id(w): w.t().contiguous() for w in layers}  # (K, N) copies, made once
    out.append(("x @ W^T, W^T stored (K, N)", lambda w: x @ transposed[id(w)], plain))
    if on_gpu and hasattr(torch.backends.cuda, "preferred_blas_library"):
        out.append(("cuBLASLt", lambda w: F.linear(x, w), cublaslt))
    if on_gpu and hasattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction"):
        out.append(("fp32 reduction", lambda w: F.linear(x, w), fp32_reduction))
    if inductor:
        torch._dynamo.config.recompile_limit = 64  # one compile per product shape and row count
        compiled = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
        out.append(("inductor max-autotune", lambda w: compiled(x, w), plain))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4", help="rows per product (decode batch sizes), comma-separated")
    parser.add_argument("--rep", type=int, default=20, help="do_bench repetition time in ms")
    parser.add_argument("--chain", type=int, default=22,
                        help="launches per graph replay, each on its own copy of the weights (22: the 1.1B layers)")
    parser.add_argument("--products", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--inductor", action="store_true",
                        help="also torch.compile(F.linear, mode='max-autotune-no-cudagraphs') (tens of seconds each)")
    parser.add_argument("--check-only", action="store_true", help="check each variant's product, no timing")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (with --check-only, on the CPU)")
    args = parser.parse_args(argv)
    try:
        rows_list = [int(r) for r in args.rows.split(",")]
    except ValueError:
        parser.error(f"--rows {args.rows!r}: comma-separated positive integers, e.g. 1,4")
    if any(r < 1 for r in rows_list) or args.chain < 1:
        parser.error("--rows and --chain must be >= 1")
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.check_only:
        sys.exit("blas_variants.py needs a CUDA GPU to time (torch.cuda.is_available() is False on this machine); "
                 "--check-only --tiny checks the variants on the CPU")
    dev, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    wanted = set(args.products.split(",")) if args.products else None
    shapes = [p for p in (TINY if args.tiny else PRODUCTS) if not wanted or p[0] in wanted]
    print(f"device: {torch.cuda.get_device_name() if on_gpu else 'cpu'} | torch {torch.__version__} | "
          f"{str(dtype)[6:]} | " + ("checks only" if args.check_only else
                                     f"CUDA-graph replay (L2 flushed), {args.chain} launch(es) a replay, us a "
                                     "launch; GB/s of weight bytes"), flush=True)
    failures = 0
    for rows in rows_list:
        for name, n, k in shapes:
            gen = torch.Generator().manual_seed(n + k)
            w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(dev, dtype)
            x = torch.randn(rows, k, generator=gen).to(dev, dtype)
            want = x.double() @ w.double().T
            layers = [w] + [w.clone() for _ in range(0 if args.check_only else args.chain - 1)]
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
            results = []
            for label, product, context in variants(x, layers, on_gpu, args.inductor):
                with context():
                    got = product(w)
                    err = (got.double() - want).abs().max().item()
                    if got.shape != want.shape or err > tol * (1 + want.abs().max().item()):
                        failures += 1
                        print(f"  {name} rows {rows} {label}: WRONG (max err {err:.3g})", flush=True)
                        continue
                    if args.check_only:
                        results.append((0.0, label))
                        continue
                    from decode_configs import graph_time

                    t = 1e3 * graph_time(lambda product=product: [product(layer) for layer in layers],
                                         args.rep) / len(layers)
                results.append((t, label))
            if args.check_only:
                print(f"{name} {n}x{k} rows {rows}: {len(results)} variants equal the fp64 product", flush=True)
                continue
            base = results[0][0] if results and results[0][1] == "F.linear" else None
            print(f"\n{name} {n}x{k}, rows {rows}:", flush=True)
            for t, label in sorted(results):
                ratio = f"{base / t:5.2f}x" if base else "  -  "
                print(f"  {t:7.1f} us {n * k * 2 / t / 1e3:6.0f} GB/s {ratio}  {label}", flush=True)
    if args.check_only:
        print("checked: " + ("every variant equals the fp64 product" if not failures
                             else f"{failures} variant(s) differ from the fp64 product"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
