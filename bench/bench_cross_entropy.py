"""Benchmark kernels.cross_entropy against F.cross_entropy on CUDA: speed and peak memory.

    python bench/bench_cross_entropy.py [--dtype bf16] [--compile] [--rep 100]

Per shape (N rows x V vocabulary): forward time, forward+backward time and the peak
memory a training step adds on top of the logits (``max_memory_allocated`` minus what
was allocated before), for kiln's fused kernel and for ``F.cross_entropy`` (plus
``torch.compile(F.cross_entropy)`` with ``--compile``); ratios are against the
fastest PyTorch baseline in the same run. A second table compares the chunked
``linear_cross_entropy`` with ``F.cross_entropy(hidden @ weight.T)``. Target on H100
at 8192x128256 bf16: lower peak memory than F.cross_entropy and >= 1.0x its speed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHAPES = [(8192, 128256), (4096, 32000), (16384, 50257), (512, 128256)]
LINEAR_SHAPES = [(8192, 4096, 128256), (16384, 2048, 32000)]  # (N, C, V)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--compile", action="store_true", help="add torch.compile(F.cross_entropy) as a baseline")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cross_entropy.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine")

    import triton
    import triton.testing

    from kernels import cross_entropy as ce

    dtype = DTYPES[args.dtype]
    bench = lambda fn, **kw: triton.testing.do_bench(fn, rep=args.rep, return_mode="median", **kw)  # noqa: E731
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | {args.dtype}")
    baselines = {"F.cross_entropy": F.cross_entropy}
    if args.compile:
        baselines["compiled F.ce"] = torch.compile(F.cross_entropy)

    print(f"{'N x V':>14} {'impl':>16} {'fwd ms':>8} {'fwd+bwd ms':>11} {'peak MiB':>9} {'fwd x':>6} {'f+b x':>6}")
    for n_rows, n_cols in SHAPES:
        logits = torch.randn(n_rows, n_cols, device="cuda").mul_(2).to(dtype).requires_grad_()
        targets = torch.randint(0, n_cols, (n_rows,), device="cuda")
        targets[::7] = -100
        expected = F.cross_entropy(logits.float(), targets)
        err = (ce.cross_entropy(logits, targets).float() - expected).abs().item()
        # the loss is returned in the logits dtype (as F.cross_entropy's is): allow its rounding
        if err > 1e-2 + torch.finfo(dtype).eps * expected.abs().item():
            raise SystemExit(f"kiln cross_entropy disagrees with F.cross_entropy at {n_rows}x{n_cols}: {err:.2e}")
        rows = {}
        for name, fn in {"kiln fused": ce.cross_entropy, **baselines}.items():
            with torch.no_grad():
                t_fwd = bench(lambda: fn(logits, targets))
            t_both = bench(lambda: fn(logits, targets).backward(), grad_to_none=[logits])
            rows[name] = (t_fwd, t_both, _peak_mib(lambda: fn(logits, targets).backward(), logits))
        best_fwd = min(r[0] for n, r in rows.items() if n != "kiln fused")
        best_both = min(r[1] for n, r in rows.items() if n != "kiln fused")
        for name, (t_fwd, t_both, peak) in rows.items():
            print(f"{f'{n_rows}x{n_cols}':>14} {name:>16} {t_fwd:8.3f} {t_both:11.3f} {peak:9.0f} "
                  f"{best_fwd / t_fwd:5.2f}x {best_both / t_both:5.2f}x")
        del logits

    print(f"\n{'N x C x V':>20} {'impl':>18} {'fwd+bwd ms':>11} {'peak MiB':>9} {'ratio':>6}")
    for n_rows, hidden_dim, n_cols in LINEAR_SHAPES:
        hidden = torch.randn(n_rows, hidden_dim, device="cuda", dtype=dtype, requires_grad=True)
        weight = (torch.randn(n_cols, hidden_dim, device="cuda") * 0.02).to(dtype).requires_grad_()
        targets = torch.randint(0, n_cols, (n_rows,), device="cuda")
        impls = {
            "kiln linear+CE": lambda: ce.linear_cross_entropy(hidden, weight, targets),
            "matmul + F.ce": lambda: F.cross_entropy(hidden @ weight.t(), targets),
        }
        results = {}
        for name, fn in impls.items():
            results[name] = (bench(lambda: fn().backward(), grad_to_none=[hidden, weight]),
                             _peak_mib(lambda: fn().backward(), hidden, weight))
        baseline = results["matmul + F.ce"][0]
        for name, (t_both, peak) in results.items():
            print(f"{f'{n_rows}x{hidden_dim}x{n_cols}':>20} {name:>18} {t_both:11.3f} {peak:9.0f} {baseline / t_both:5.2f}x")
        del hidden, weight


def _peak_mib(step, *leaves) -> float:
    """Peak memory a step allocates beyond what exists before it, in MiB."""
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    for leaf in leaves:
        leaf.grad = None
    return peak / 2**20


if __name__ == "__main__":
    main()
