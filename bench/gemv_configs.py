"""Each launch config of kernels.gemv's kernel at the Llama 1.1B decode products, timed on CUDA.

    python bench/gemv_configs.py [--rows 1] [--rep 20] [--top 6] [--chain 22] [--kinds dot,best,fma]
    TRITON_INTERPRET=1 python bench/gemv_configs.py --check-only --tiny   # CPU smoke: every config checked

For each product (the qkv, gate/up and lm-head products with the residual add + RMSNorm fused in,
the o product plain, the down product with SwiGLU fused in), every (tensor cores or FMAs, BLOCK_N,
BLOCK_K, SPLIT_K, stages: by tile size on tensor cores, the FMA loads pipelined in 3 or left to the
warps) of a grid is launched directly (no autotuner), checked against the unfused ops in bf16 (a
config whose split-K partial sums were added up before they were all written shows here), and timed
as a CUDA-graph replay with L2 flushed between replays (with `--chain 22`, one replay runs the
product over 22 copies of the weights, as a step runs its layers: per-launch start-up overlaps as it
does in a step), beside Kiln's current path for that
product (add+norm kernel then cuBLAS, SwiGLU kernel then cuBLAS, or cuBLAS). The fastest configs
per product print first: what `kernels.gemv._configs` should offer its autotuner.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PRODUCTS = [  # name, N, K, prologue (bench_gemv's names), SPLIT_K choices
    ("add+rmsnorm+qkv", 2560, 2048, "rmsnorm", (1, 2, 4)),
    ("o", 2048, 2048, None, (1, 2, 4, 8)),
    ("add+rmsnorm+gate+up", 11264, 2048, "rmsnorm", (1, 2)),
    ("swiglu+down", 2048, 5632, "silu", (1, 2, 4, 8)),
    ("add+rmsnorm+lm head", 32000, 2048, "rmsnorm", (1, 2)),
]
TINY = [("add+rmsnorm+qkv", 40, 96, "rmsnorm", (1, 3)), ("o", 24, 64, None, (1, 2)),
        ("swiglu+down", 20, 80, "silu", (2,))]


def config_grid(kinds: set[str], splits: tuple[int, ...], block_m: int, min_block_n: int, configs: list) -> list:
    """(tensor cores?, BLOCK_N, BLOCK_K, SPLIT_K, stages, warps) for each config to try."""
    grid = []
    if "dot" in kinds:  # tensor cores (rows padded to 16), stages by tile size
        grid += [(True, bn, bk, sk, 4 if bn * bk <= 4096 else 3, 4)
                 for bn, bk, sk in itertools.product((16, 32, 64, 128), (128, 256, 512), splits)
                 if bn * bk <= 16384 and bn >= min_block_n]
    if "best" in kinds:  # the tensor-core configs kernels.gemv's autotuner is offered
        grid += [(True, c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"], c.num_stages, c.num_warps)
                 for c in configs if c.kwargs["DOT"] and c.kwargs["SPLIT_K"] in splits]
    if "fma" in kinds:  # FMAs: per-thread partial sums of (rows, BLOCK_N, BLOCK_K) within FMA_TILE; the loads
        # pipelined in 3 stages or left to the warps (1)
        from kernels.gemv import FMA_TILE

        grid += [(False, bn, bk, sk, stages, 4) for bn, bk, sk, stages in
                 itertools.product((2, 4, 8, 16), (256, 512, 1024), splits[:2], (3, 1))
                 if block_m * bn * bk <= FMA_TILE and bn >= min_block_n]
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--rep", type=int, default=20, help="do_bench repetition time in ms")
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--products", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--min-block-n", type=int, default=0, help="skip configs of fewer columns per program")
    parser.add_argument("--chain", type=int, default=1,
                        help="launches per graph replay, each on its own copy of the weights (22: the 1.1B layers)")
    parser.add_argument("--kinds", default="dot,fma",
                        help="tensor-core (dot: a grid; best: those kernels.gemv offers) and/or FMA (fma) configs")
    parser.add_argument("--pdl", action="store_true",
                        help="launch with programmatic dependent launch (kernels._utils.PDL; sm_90+): each launch of "
                             "a --chain prefetches its weights while the launch before it ends")
    parser.add_argument("--check-only", action="store_true",
                        help="check every config against the unfused ops, no timing (CUDA not needed)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (for --check-only under TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.check_only:
        sys.exit("gemv_configs.py needs a CUDA GPU to time (torch.cuda.is_available() is False on this machine); "
                 "--check-only --tiny runs the checks on the CPU's Triton interpreter")
    if args.pdl and not (on_gpu and torch.cuda.get_device_capability()[0] >= 9):
        sys.exit("gemv_configs.py: --pdl (programmatic dependent launch) needs a GPU of compute capability 9.0 "
                 "or later")
    import triton

    from bench_gemv import current_path, product_inputs
    from decode_configs import graph_time
    from kernels import gemv

    gemv._kernel(gemv.interpreting())  # binds `tl` into the kernel's module
    raw = triton.jit(gemv._gemv_kernel, do_not_specialize=["n_rows"])
    from kernels._utils import next_power_of_2

    # the interpreter's bf16 is unreliable: fp32 there (exact products), bf16 on the GPU
    dev, dtype, tol = ("cuda", torch.bfloat16, 3e-2) if on_gpu else ("cpu", torch.float32, 1e-4)
    rows = args.rows
    block_m, kinds = next_power_of_2(rows), set(args.kinds.split(","))
    wanted = set(args.products.split(",")) if args.products else None
    print(f"device: {torch.cuda.get_device_name() if on_gpu else 'cpu (Triton interpreter)'} | torch "
          f"{torch.__version__} | triton {triton.__version__} | {str(dtype)[6:]} | rows {rows} | "
          + ("checks only" if args.check_only else f"CUDA-graph replay (L2 flushed), {args.chain} launch(es) a "
             "replay, us a launch; GB/s of weight bytes"), flush=True)
    failures = 0
    prologues = {"rmsnorm": gemv._RMSNORM, "silu": gemv._SILU_MUL, None: gemv._PLAIN}
    for name, n, k, prologue_name, splits in TINY if args.tiny else PRODUCTS:
        if wanted and name not in wanted:
            continue
        w, x, residual, gain, h = product_inputs(rows, n, k, dtype, dev)
        current = current_path(prologue_name, x, residual, gain, h)
        prologue = prologues[prologue_name]
        want = current(w)
        want = (want[0] if isinstance(want, tuple) else want).float()
        inp = h if prologue == gemv._SILU_MUL else x
        out = torch.empty(rows, n, device=dev, dtype=dtype)
        summed = torch.empty_like(x)
        grid = config_grid(kinds, splits, block_m, args.min_block_n, gemv._configs())
        # the split-K scratch and arrival counters any config of the grid needs, sized as kernels.gemv sizes them
        partials_size, blocks = gemv._scratch_sizes(n, block_m, [(sk, bn, dot) for dot, bn, _, sk, _, _ in grid])
        partials = torch.empty(partials_size, device=dev, dtype=torch.float32)
        counters = torch.zeros(blocks, device=dev, dtype=torch.int32)
        # --chain: one graph launches the product over that many copies of the weights back to back, as a
        # step runs a layer's product after the last's, so a launch's own start-up and tail overlap
        layers = [w] + [w.clone() for _ in range(args.chain - 1)]

        def timed(fn):
            return 1e3 * graph_time(lambda: [fn(layer) for layer in layers], args.rep) / len(layers)

        t_now = 0.0 if args.check_only else timed(current)
        results, failed = [], 0
        for dot, bn, bk, sk, stages, warps in grid:

            def launch(w, dot=dot, bn=bn, bk=bk, sk=sk, stages=stages, warps=warps):
                raw[(-(-n // bn), sk)](
                    inp, residual, gain, summed, w, out, partials, counters,
                    inp.stride(0), residual.stride(0), summed.stride(0), w.stride(0), out.stride(0),
                    rows, n, k, 1e-5, PROLOGUE=prologue, HAS_RESIDUAL=prologue == gemv._RMSNORM,
                    DOT_PRECISION="tf32", PDL=args.pdl, **({"launch_pdl": True} if args.pdl else {}),
                    BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, DOT=dot, LOOP_STAGES=stages,
                    num_warps=warps, num_stages=stages)
                return out

            try:
                for _ in range(2 if args.check_only else 3):  # the counters must come back to zero between launches
                    out.zero_()
                    err = (launch(w).float() - want).abs().max().item()
                    if err > tol * (1 + want.abs().max().item()):
                        raise AssertionError(f"max err {err:.3g}")
                t = 0.0 if args.check_only else timed(launch)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile or is wrong is reported
                failed += 1
                print(f"  {name} DOT={dot} BLOCK_N={bn} BLOCK_K={bk} SPLIT_K={sk} stages={stages} warps={warps}: "
                      f"{type(exc).__name__}: {str(exc)[:160]}", flush=True)
                continue
            results.append((t, "dot" if dot else "fma", bn, bk, sk, stages, warps))
        if args.check_only:
            print(f"{name} {n}x{k}: {len(results)} configs equal the unfused ops, {failed} failed", flush=True)
            failures += failed
            continue
        results.sort()
        gbs = lambda t: n * k * 2 / t / 1e3  # noqa: E731
        print(f"\n{name} {n}x{k}: kiln now {t_now:.1f} us ({gbs(t_now):.0f} GB/s); {len(results)} configs", flush=True)
        for t, kind, bn, bk, sk, stages, warps in results[: args.top]:
            print(f"  {t:7.1f} us {gbs(t):6.0f} GB/s {t_now / t:5.2f}x  {kind} BLOCK_N={bn:<3} BLOCK_K={bk:<4} "
                  f"SPLIT_K={sk} stages={stages} warps={warps}", flush=True)
        if results:
            t = results[-1][0]
            print(f"  slowest {t:.1f} us ({gbs(t):.0f} GB/s)", flush=True)
    if args.check_only:
        print(f"checked: {'every config equals' if not failures else f'{failures} configs differ from'} "
              "the unfused ops")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
