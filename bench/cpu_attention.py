"""Attention on the CPU: Kiln's native causal attention against PyTorch's SDPA (its CPU flash kernel).

    python bench/cpu_attention.py [--threads N] [--reps 5] [--quick]

Two tables. Prompts: what a prompt's or a scoring window's forward computes per layer on a CPU
(`Transformer._forward_cpu`): fp32 queries (B, T, H, D) and keys/values (B, T, Hkv, D) as views of the qkv
product, causal, GQA. The baseline is `F.scaled_dot_product_attention(is_causal=True, enable_gqa=...)` on the
same views plus the transpose to (B * T, H * D) that the output projection needs (the native call returns that
layout). Training: forward and backward (`model.cpu_training.native_causal_attention`, what `kiln train` runs on a
CPU) against SDPA's forward and backward through autograd, on the same views, in fp32 and in bf16 (the dtype
under bf16 autocast), Kiln's bf16 both ways: "bf16 products" (bf16 operands, fp32 sums: what `kiln train` runs
where the bf16 micro-kernel runs, AVX-512 and up) and "fp32 math" (widened inside, as on other CPUs);
the gradients of q, k and v are compared to an fp64 reference. Both sides are timed in the same run, best of
--reps.
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
# (name, B, T, H, Hkv, D): training micro-batches
TRAIN_SHAPES = [
    ("training/configs/tiny.toml", 16, 256, 6, 2, 32),
    ("training/configs/default-cpu.toml", 8, 512, 8, 2, 32),
    ("the default model, 8 x 512", 8, 512, 8, 2, 64),
    ("GPT-2 124M heads, 4 x 1024", 4, 1024, 12, 12, 64),
    ("one 2048-token row", 1, 2048, 8, 2, 64),
]
MAX_ERROR = 1e-4
# the largest gradient error against fp64, relative to the largest fp64 gradient: fp32 and bf16 inputs
MAX_GRAD_ERROR = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


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
    return train_table(module, QUICK_SHAPES if args.quick else TRAIN_SHAPES, reps)


def train_table(module, shapes, reps: int) -> int:
    """Forward + backward, Kiln's native op against SDPA through autograd; returns the exit status."""
    from model import cpu_training
    from model.cpu_training import native_causal_attention, use_native_module

    if not use_native_module(module):
        print("cpu_attention.py: the native module has no training attention here", file=sys.stderr)
        return 1
    variants = [(torch.float32, False, "fp32"), (torch.bfloat16, False, "bf16, fp32 math")]
    if module.attention_bf16_ready():
        variants.append((torch.bfloat16, True, "bf16, bf16 products"))
    print()
    print(f"Training: forward + backward, causal; the gradients' largest error against fp64, relative to the "
          f"largest gradient; best of {reps}")
    print("| shape | B x T | H / Hkv, D | dtype | SDPA ms | Kiln ms | Kiln GFLOP/s | Kiln/SDPA | "
          "SDPA grad error | Kiln grad error |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    failed = False
    g = torch.Generator().manual_seed(0)
    for name, B, T, H, Hkv, D in shapes:
        qkv64 = torch.randn(B, T, H + 2 * Hkv, D, generator=g, dtype=torch.float64)
        grad64 = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
        reference = _grads(qkv64, grad64, H, Hkv, _sdpa)
        for dtype, bf16_products, label in variants:
            cpu_training._bf16_products = bf16_products
            qkv, grad = qkv64.to(dtype), grad64.to(dtype)
            errors = {}
            for side, attend in (("SDPA", _sdpa), ("Kiln", native_causal_attention)):
                got = _grads(qkv, grad, H, Hkv, attend)
                errors[side] = (got.double() - reference).abs().max().item() / reference.abs().max().item()
            base = best_ms(lambda: _grads(qkv, grad, H, Hkv, _sdpa), reps)
            ours = best_ms(lambda: _grads(qkv, grad, H, Hkv, native_causal_attention), reps)
            flops = 3.5 * 4 * B * H * D * T * (T + 1) / 2  # forward's two products, backward's five
            print(f"| {name} | {B} x {T} | {H} / {Hkv}, {D} | {label} | {base:.1f} | "
                  f"{ours:.1f} | {flops / ours / 1e6:.0f} | {base / ours:.2f}x | {errors['SDPA']:.1e} | "
                  f"{errors['Kiln']:.1e} |", flush=True)
            failed |= errors["Kiln"] > MAX_GRAD_ERROR[dtype]
    if failed:
        print("cpu_attention.py: Kiln's gradients are off (see the table)", file=sys.stderr)
        return 1
    return 0


def _sdpa(q, k, v):  # (B, T, H, D) views in and out, as the model's attention calls it
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=q.shape[2] != k.shape[2])
    return y.transpose(1, 2)


def _grads(qkv: torch.Tensor, grad: torch.Tensor, H: int, Hkv: int, attend) -> torch.Tensor:
    """The gradient of (attend(q, k, v) * grad).sum() with respect to qkv (B, T, H + 2 Hkv, D)."""
    qkv = qkv.detach().requires_grad_()
    attend(qkv[:, :, :H], qkv[:, :, H:H + Hkv], qkv[:, :, H + Hkv:]).backward(grad)
    return qkv.grad


if __name__ == "__main__":
    sys.exit(main())
