"""Benchmark the fused inference kernels (add+RMSNorm, rope+KV-cache write, SwiGLU) on CUDA.

    python bench/bench_fused.py [--dtype bf16] [--rep 50] [--rows 1,32,2048]
    TRITON_INTERPRET=1 python bench/bench_fused.py --check-only --tiny --dtype fp16 --rows 1,3,40   # CPU smoke

Shapes are the Llama 1.1B serving shape (d 2048, 32 query / 4 kv heads of 64, MLP 5632), at
`--rows` tokens per call: 1 and 32 are decode steps, 2048 a prefill chunk. Each variant is
captured in a CUDA graph and timed by replaying it (triton.testing.do_bench, median), so the
numbers are GPU time only, as in the server's graph-captured decode step, where what these
kernels save is mostly launches: at batch 1 each torch op is a ~2-5 us kernel of almost no
work. Baselines: the torch ops the model runs without fusion (eager, replayed from the same
kind of graph), and the same ops through torch.compile (inductor fuses the elementwise parts);
the ratio is to the faster of the two. Each variant's output is checked against the torch ops
first (`--check-only` stops there, and with `--tiny` shapes runs on the CPU's Triton interpreter).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # decode_configs' CUDA-graph timer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Shape:
    d_model: int = 2048
    n_head: int = 32
    n_kv_head: int = 4
    head_dim: int = 64
    d_ff: int = 5632
    num_blocks: int = 512
    block_size: int = 16
    max_seq: int = 2048


LLAMA_1B = Shape()  # the Llama 1.1B serving shape
TINY = Shape(d_model=48, n_head=6, n_kv_head=2, head_dim=16, d_ff=40, num_blocks=24, block_size=4, max_seq=64)


def torch_add_rms_norm(x, residual, weight, eps=1e-5):
    """The model's unfused ops: the residual add, then model.transformer.RMSNorm."""
    summed = residual + x
    xf = summed.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(summed) * weight, summed


def torch_rope_cache(shape: Shape, qkv, positions, cos, sin, k_cache, v_cache, blocks, offsets):
    """The model's unfused ops: table gathers, apply_rope, and the two cache index_put_."""
    B, T, _ = qkv.shape
    H, Hkv, D = shape.n_head, shape.n_kv_head, shape.head_dim
    qk = qkv[..., : (H + Hkv) * D].view(B, T, H + Hkv, D)
    v = qkv[..., (H + Hkv) * D:].view(B, T, Hkv, D)
    c, s = cos[positions][:, :, None, :], sin[positions][:, :, None, :]
    qk = torch.addcmul(qk * c, qk.roll(D // 2, dims=-1), s).type_as(qk)
    k_cache[blocks, offsets] = qk[:, :, H:]
    v_cache[blocks, offsets] = v
    return qk[:, :, :H]


def torch_silu_mul(h):
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def problems(rows: int, dtype: torch.dtype, shape: Shape = LLAMA_1B, dev: str = "cuda"):
    """(name, kiln fn, torch fn) at `rows` tokens (one row of `rows` tokens when > 32: a prefill chunk)."""
    from kernels.activation import silu_mul
    from kernels.norm import add_norm
    from kernels.rope import rope_cache_write
    from model.config import ModelConfig
    from model.transformer import rope_tables

    B, T = (rows, 1) if rows <= 32 else (1, rows)
    x = torch.randn(B, T, shape.d_model, device=dev, dtype=dtype)
    residual = torch.randn_like(x)
    weight = torch.randn(shape.d_model, device=dev, dtype=dtype)
    config = ModelConfig(vocab_size=8, n_layer=1, n_head=shape.n_head, n_kv_head=shape.n_kv_head,
                         d_model=shape.n_head * shape.head_dim, d_ff=shape.d_ff, max_seq_len=shape.max_seq)
    cos, sin = (t.to(dev, dtype) for t in rope_tables(config))  # the model's tables are in its dtype
    qkv = torch.randn(B, T, (shape.n_head + 2 * shape.n_kv_head) * shape.head_dim, device=dev, dtype=dtype)
    positions = torch.randint(0, shape.max_seq, (B, T), device=dev)
    slots = torch.randperm(shape.num_blocks * shape.block_size, device=dev)[: B * T].view(B, T)
    blocks, offsets = slots // shape.block_size, slots % shape.block_size
    k_pool = torch.zeros(1, shape.num_blocks, shape.block_size, shape.n_kv_head, shape.head_dim, device=dev,
                         dtype=dtype)
    v_pool = torch.zeros_like(k_pool)
    h = torch.randn(B, T, 2 * shape.d_ff, device=dev, dtype=dtype)
    return [
        ("add + rmsnorm", lambda: add_norm(x, residual, weight, None, 1e-5, True),
         lambda: torch_add_rms_norm(x, residual, weight)),
        ("rope + cache write", lambda: rope_cache_write(qkv, shape.n_head, shape.n_kv_head, positions, k_pool,
                                                        v_pool, blocks, offsets, cos, sin, layer=0),
         lambda: torch_rope_cache(shape, qkv, positions, cos, sin, k_pool[0], v_pool[0], blocks, offsets)),
        ("silu * up", lambda: silu_mul(h), lambda: torch_silu_mul(h)),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--rep", type=int, default=50, help="do_bench repetition time in ms")
    parser.add_argument("--rows", default="1,32,2048", help="tokens per call, comma-separated")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--check-only", action="store_true",
                        help="compare each kernel with the torch ops and stop (no timing; CUDA not needed)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (for --check-only under TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    shape = TINY if args.tiny else LLAMA_1B
    dtype = DTYPES[args.dtype]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not args.check_only:
        sys.exit("bench_fused.py needs a CUDA GPU to time (torch.cuda.is_available() is False on this machine); "
                 "--check-only --tiny runs the correctness checks on the CPU's Triton interpreter")
    for rows in (int(r) for r in args.rows.split(",")):
        for name, kiln, plain in problems(rows, dtype, shape, dev):
            got, want = kiln(), plain()
            for g, w in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, want))):
                torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2, msg=lambda m: f"{name}, {rows} rows: {m}")
    print(f"checked: add + rmsnorm, rope + cache write, silu * up equal the torch ops ({args.dtype}, rows {args.rows})")
    if args.check_only:
        return
    import triton

    from decode_configs import graph_time

    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{args.dtype} | d {shape.d_model}, heads {shape.n_head}/{shape.n_kv_head}x{shape.head_dim}, "
          f"MLP {shape.d_ff} | CUDA-graph replay, us")
    print(f"{'kernel':>20} {'rows':>5} {'kiln':>8} {'torch':>8} {'compiled':>9} {'vs best':>8}")
    for rows in (int(r) for r in args.rows.split(",")):
        for name, kiln, plain in problems(rows, dtype, shape, dev):
            t_kiln = 1e3 * graph_time(kiln, args.rep)  # us
            t_plain = 1e3 * graph_time(plain, args.rep)
            t_comp = float("nan")
            if not args.no_compile:
                torch._dynamo.reset()
                t_comp = 1e3 * graph_time(torch.compile(plain, fullgraph=True), args.rep)
            best = min(t for t in (t_plain, t_comp) if t == t)
            print(f"{name:>20} {rows:>5} {t_kiln:8.1f} {t_plain:8.1f} {t_comp:9.1f} {best / t_kiln:7.2f}x")


if __name__ == "__main__":
    main()
