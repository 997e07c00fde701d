"""Prompt attention on the CPU: Kiln's native causal attention against PyTorch's SDPA (its CPU flash kernel).

    python bench/cpu_attention.py [--threads N] [--reps 5] [--quick]

What a prompt's or a scoring window's forward computes per layer on a CPU (`Transformer._forward_cpu`):
fp32 queries (B, T, H, D) and keys/values (B, T, Hkv, D) as views of the qkv product, causal, GQA. The
baseline is `F.scaled_dot_product_attention(is_causal=True, enable_gqa=...)` on the same views plus the
transpose to (B * T, H * D) that the output projection needs (the native call returns that layout);
both are timed in the same run, best of --reps, and checked against each other (max abs difference).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cpu_serving import cpu_info  # noqa: E402

# (name, B, T, H, Hkv, D)
SHAPES = [
    ("default model, one prompt", 1, 512, 8, 2, 64),
    ("default model, scoring 8 x 512", 8, 512, 8, 2, 64),
    ("default model, 1024 tokens", 1, 1024, 8, 2, 64),
    ("default model, 2048 tokens", 1, 2048, 8, 2, 64),
    ("GPT-2 124M heads, 512 tokens", 1, 512, 12, 12, 64),
    ("GPT-2 124M heads, 4 x 1024", 4, 1024, 12, 12, 64),
    ("Llama 1.1B heads, 512 tokens", 1, 512, 32, 4, 64),
]
QUICK_SHAPES = [("tiny GQA", 2, 40, 4, 2, 16), ("tiny MHA", 1, 33, 3, 3, 32)]
MAX_ERROR = 1e-4


def best_ms(fn, reps: int) -> float:
    fn()  # warm-up (the first call also builds the micro-kernels)
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own count)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per shape and side (best is kept)")
    p.add_argument("--quick", action="store_true", help="smoke test: two tiny shapes, one repetition")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error(f"--reps must be >= 1, got {args.reps}")
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    os.environ.pop("KILN_NO_NATIVE", None)
    from model import native

    module = native.load()
    if module is None or not hasattr(module, "causal_attention"):
        print(f"cpu_attention.py: the native module's causal attention is not available here: "
              f"{native.error() or 'this torch has no fp32 micro-kernel'}", file=sys.stderr)
        return 1
    shapes, reps = (QUICK_SHAPES, 1) if args.quick else (SHAPES, args.reps)
    print(f"{cpu_info()[0]}, {torch.get_num_threads()} threads; torch {torch.__version__}; fp32, causal; "
          f"SDPA = F.scaled_dot_product_attention + the transpose to (B * T, H * D); best of {reps}")
    print("| shape | B x T | H / Hkv, D | SDPA ms | Kiln ms | Kiln GFLOP/s | Kiln/SDPA | max abs diff |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    worst = 0.0
    g = torch.Generator().manual_seed(0)
    for name, B, T, H, Hkv, D in shapes:
        qkv = torch.randn(B, T, H + 2 * Hkv, D, generator=g)
        q, k, v = qkv[:, :, :H], qkv[:, :, H:H + Hkv], qkv[:, :, H + Hkv:]
        starts, lengths = torch.zeros(B, dtype=torch.long), torch.full((B,), T, dtype=torch.long)

        def sdpa():
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=H != Hkv)
            return y.transpose(1, 2).reshape(B * T, H * D)

        def kiln():
            return module.causal_attention(q, k, v, starts, lengths, D ** -0.5).view(B * T, H * D)

        diff = (kiln() - sdpa()).abs().max().item()
        worst = max(worst, diff)
        base, ours = best_ms(sdpa, reps), best_ms(kiln, reps)
        flops = 4 * B * H * D * T * (T + 1) / 2  # scores and weighted values over the keys each query sees
        print(f"| {name} | {B} x {T} | {H} / {Hkv}, {D} | {base:.2f} | {ours:.2f} | {flops / ours / 1e6:.0f} | "
              f"{base / ours:.2f}x | {diff:.1e} |")
    if worst > MAX_ERROR:
        print(f"cpu_attention.py: Kiln and SDPA differ by {worst:.2e} (more than {MAX_ERROR:g})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
