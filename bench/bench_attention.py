"""Benchmark kernels.attention.flash_attention (forward, forward+backward) against SDPA on CUDA.

    python bench/bench_attention.py [--dtype bf16] [--mode fwd,fwd_bwd] [--no-causal] [--gqa 4]

Shapes follow the FlashAttention papers: 16k tokens per batch (B = 16384 / S),
H = 2048 / D heads, S from 1k to 16k, D 64 and 128. Baselines in the same run:
``F.scaled_dot_product_attention`` pinned to the flash backend, to the cuDNN backend
(when this build has it) and to memory-efficient attention; the ratio columns are
kiln's speed over flash and over the fastest of them. With ``--gqa G`` the kernel
reads H / G kv heads; SDPA gets ``enable_gqa=True``. Targets on H100: forward and
forward+backward >= 1.0x SDPA flash (causal); stretch >= 0.9x cuDNN.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--mode", default="fwd,fwd_bwd", help="comma list of fwd,fwd_bwd")
    parser.add_argument("--no-causal", action="store_true", help="full (non-causal) attention")
    parser.add_argument("--gqa", type=int, default=1, help="query heads per kv head")
    parser.add_argument("--seqlens", default="1024,2048,4096,8192,16384")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine")

    import triton
    import triton.testing

    from kernels import attention as attn

    causal = not args.no_causal
    dtype = DTYPES[args.dtype]
    print(
        f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
        f"{args.dtype} | causal={causal} | gqa={args.gqa}:1"
    )
    print(
        f"{'mode':>8} {'B':>3} {'H':>3} {'Hkv':>3} {'S':>6} {'D':>4} {'kiln ms':>9} {'TFLOP/s':>8} "
        f"{'flash':>8} {'cudnn':>8} {'effic.':>8} {'vs flash':>9} {'vs best':>8}"
    )
    for mode in args.mode.split(","):
        for head_dim in (int(d) for d in args.head_dims.split(",")):
            for seqlen in (int(s) for s in args.seqlens.split(",")):
                batch, n_heads = max(1, 16384 // seqlen), 2048 // head_dim
                n_kv_heads = max(1, n_heads // args.gqa)
                shape = (batch, n_heads, n_kv_heads, seqlen, head_dim)
                _bench_one(attn, triton.testing.do_bench, mode, shape, dtype, causal, args.rep)


def _bench_one(attn, do_bench, mode, shape, dtype, causal, rep) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, n_heads, n_kv_heads, seqlen, head_dim = shape
    q = torch.randn(batch, n_heads, seqlen, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(batch, n_kv_heads, seqlen, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(batch, n_kv_heads, seqlen, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    grad_out = torch.randn(batch, n_heads, seqlen, head_dim, device="cuda", dtype=dtype)
    gqa = n_kv_heads != n_heads

    def kiln():
        return attn.flash_attention(q, k, v, causal=causal)

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

        return run

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None),
        "effic.": SDPBackend.EFFICIENT_ATTENTION,
    }
    with torch.no_grad():  # agree with PyTorch before timing anything
        ours = kiln().float()
        for backend in backends.values():
            try:
                theirs = sdpa(backend)().float() if backend is not None else None
            except RuntimeError:
                continue
            if theirs is not None:
                err = (ours - theirs).abs().max().item()
                if err > 5e-2:
                    raise SystemExit(f"kiln attention disagrees with SDPA at {shape}: max err {err:.2e}")
                break
        del ours

    def timed(fn):
        if mode == "fwd":
            with torch.no_grad():
                return do_bench(fn, rep=rep, return_mode="median")
        return do_bench(lambda: fn().backward(grad_out), rep=rep, grad_to_none=[q, k, v], return_mode="median")

    t_kiln = timed(kiln)
    times = {}
    for name, backend in backends.items():
        try:
            times[name] = timed(sdpa(backend)) if backend is not None else None
        except RuntimeError:  # backend unavailable for this shape/dtype/build
            times[name] = None
    flops = 4 * batch * n_heads * seqlen * seqlen * head_dim * (0.5 if causal else 1.0)
    if mode == "fwd_bwd":
        flops *= 3.5  # backward is 2.5x the forward matmuls
    measured = [t for t in times.values() if t is not None]
    fmt = lambda t: f"{t:8.3f}" if t is not None else f"{'n/a':>8}"  # noqa: E731
    vs_flash = f"{times['flash'] / t_kiln:8.2f}x" if times["flash"] else f"{'n/a':>9}"
    vs_best = f"{min(measured) / t_kiln:7.2f}x" if measured else f"{'n/a':>8}"
    print(
        f"{mode:>8} {batch:>3} {n_heads:>3} {n_kv_heads:>3} {seqlen:>6} {head_dim:>4} {t_kiln:9.3f} "
        f"{flops / t_kiln / 1e9:8.1f} {fmt(times['flash'])} {fmt(times['cudnn'])} {fmt(times['effic.'])} "
        f"{vs_flash} {vs_best}"
    )


if __name__ == "__main__":
    main()
