"""Training throughput at the GPT-2 124M shape: Kiln's training step vs a plain nanoGPT-style loop.

    python bench/train_bench.py [--batch 32] [--seq 1024] [--steps 30] [--warmup 10] [--attn-backend auto]
                                [--loss-impl chunked|logits] [--residual fp32|autocast]
                                [--sdpa default|cudnn|flash|efficient] [--profile 3]

Both sides run the same recipe on random tokens: bf16 autocast, fp32 master weights, fused
AdamW (weight decay on matrices only), global-norm clipping at 1.0, `torch.compile`, one
micro-batch per step. Kiln's side is `training.train.optimizer_step` on `model.Transformer`
(its attention and cross-entropy go through the Triton kernels when attn_backend resolves to
"triton"); the baseline is nanoGPT's model (SDPA attention, `F.cross_entropy`) in a plain loop.
`--sdpa` restricts PyTorch's `scaled_dot_product_attention` to one backend on both sides (the
baseline's attention, and Kiln's with `--attn-backend torch`): on an H100 its cuDNN backend is the
fastest attention measured (bench/RESULTS.md). Prints tokens/s and MFU = 6 * params * tokens/s / peak (989e12 for H100 bf16 dense; attention
FLOPs ignored, as nanoGPT does), and Kiln's ratio to the baseline measured in the same run.

Needs a CUDA GPU; `--device cpu` with a small shape (e.g. --n-layer 2 --d-model 64 --vocab 512
--batch 2 --seq 64 --steps 2 --warmup 1 --no-compile) only smoke-tests the script.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import ModelConfig  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.optim import build_optimizer  # noqa: E402
from training.train import optimizer_step  # noqa: E402

H100_BF16_PEAK = 989e12
SDPA_BACKENDS = {"default": None, "cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION",
                 "efficient": "EFFICIENT_ATTENTION"}


def sdpa_backend(name: str):
    """A context that restricts F.scaled_dot_product_attention to one backend (none for "default")."""
    if SDPA_BACKENDS[name] is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[name])])


# ----------------------------------------------------------------------------- the baseline
class NanoBlock(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class NanoGPT(nn.Module):
    """nanoGPT's model.py, condensed: the baseline every GPT-2 trainer is compared with."""

    def __init__(self, vocab: int, seq: int, d: int, n_layer: int, n_head: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.h = nn.ModuleList(NanoBlock(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))


def nano_step(model, optimizer, x, y, amp) -> torch.Tensor:
    with amp():
        loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


# ----------------------------------------------------------------------------- measuring
def measure(step, batches, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per step after `warmup` steps (compilation, autotuning)."""
    for i in range(warmup):
        step(*batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for i in range(steps):
        loss = step(*batches[i % len(batches)])
    float(loss.detach())  # waits for the last step
    return (time.perf_counter() - started) / steps


# Where a profiled step's time goes: kernel (or, on the CPU, op) names by what they compute, first match wins.
CATEGORIES = [
    ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|splitKreduce|triton_tem_|aten::(mm|addmm|bmm|_scaled_mm)$"),
    ("attention", r"attn_|flash|fmha|sdpa|scaled_dot_product|cudnn.*(attn|mha)"),
    ("loss", r"cross_entropy|nll_loss|log_softmax|logsumexp"),
    ("optimizer + clipping", r"(?i)adam|multi_tensor|foreach|optimizer"),
    ("fused elementwise (inductor)", r"^triton_(poi|per|red)_"),
    ("other elementwise / norms", r"elementwise|vectorized|layer_norm|reduce_kernel|embedding|index|copy|cat"),
]


def profile_breakdown(label: str, step, batches, steps: int, device: torch.device, top: int = 12) -> str:
    """`steps` more steps under torch.profiler: their kernel time per step by category and the top kernels
    (on the CPU: ops' own CPU time, which smoke-tests the grouping)."""
    import re

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            loss = step(*batches[i % len(batches)])
        float(loss.detach())
    if device.type == "cuda":
        rows = [(e.key, e.self_device_time_total) for e in prof.key_averages()
                if e.self_device_time_total > 0 and e.device_type.name == "CUDA"]
    else:
        rows = [(e.key, e.self_cpu_time_total) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(us for _, us in rows) or 1.0
    by_category: dict[str, float] = {}
    for name, us in rows:
        category = next((c for c, pattern in CATEGORIES if re.search(pattern, name)), "other")
        by_category[category] = by_category.get(category, 0.0) + us
    what = "GPU kernel time" if device.type == "cuda" else "CPU op time"
    lines = [f"{label} profile: {total / steps / 1e3:.1f} ms of {what} a step ({steps} steps)"]
    for category, us in sorted(by_category.items(), key=lambda item: -item[1]):
        lines.append(f"  {category:30s} {us / steps / 1e3:8.2f} ms  {100 * us / total:5.1f}%")
    lines.append("  top:")
    for name, us in sorted(rows, key=lambda item: -item[1])[:top]:
        lines.append(f"  {us / steps / 1e3:8.2f} ms  {100 * us / total:5.1f}%  {name[:90]}")
    return "\n".join(lines)


def random_batches(n: int, batch: int, seq: int, vocab: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")


def bench_kiln(args, batches, device: torch.device, amp, compile_on: bool) -> tuple[int, float]:
    """(parameters, seconds per step) of model.Transformer driven by training.train.optimizer_step."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=args.vocab, n_layer=args.n_layer, n_head=args.n_head, n_kv_head=args.n_head,
                         d_model=args.d_model, d_ff=4 * args.d_model, max_seq_len=args.seq, norm="layernorm",
                         positions="learned", mlp="gelu", tie_embeddings=True, bias=True)
    model = Transformer(config, attn_backend=args.attn_backend).to(device)
    model.loss_impl = args.loss_impl
    model.autocast_residual = args.residual == "autocast"
    params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, TrainConfig(lr=6e-4), device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    forward = torch.compile(model, mode=args.compile_mode) if compile_on else model

    def step(x, y):
        return optimizer_step(forward, optimizer, scaler, [(x, y)], 1, 1.0, amp,
                              lambda last: contextlib.nullcontext())[0]

    seconds = measure(step, batches, args.warmup, args.steps, device)
    if args.profile:
        print(profile_breakdown("kiln", step, batches, args.profile, device), flush=True)
    return params, seconds


def bench_nanogpt(args, batches, device: torch.device, amp, compile_on: bool) -> float:
    """Seconds per step of the nanoGPT baseline with the same optimizer settings."""
    torch.manual_seed(0)
    nano = NanoGPT(args.vocab, args.seq, args.d_model, args.n_layer, args.n_head).to(device)
    decay = [p for p in nano.parameters() if p.dim() >= 2]
    no_decay = [p for p in nano.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda" or None)
    forward = torch.compile(nano, mode=args.compile_mode) if compile_on else nano

    def step(x, y):
        return nano_step(forward, optimizer, x, y, amp)

    seconds = measure(step, batches, args.warmup, args.steps, device)
    if args.profile:
        print(profile_breakdown("nanoGPT", step, batches, args.profile, device), flush=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--attn-backend", default="auto", choices=("auto", "torch", "triton"))
    p.add_argument("--loss-impl", default="chunked", choices=("chunked", "logits"),
                   help="Kiln's loss on the triton backend: chunked LM head + cross-entropy, or whole logits "
                        "then the fused cross-entropy kernel")
    p.add_argument("--residual", default="fp32", choices=("fp32", "autocast"),
                   help="Kiln's residual stream under autocast (training's `residual`): fp32, or the autocast dtype "
                        "(the baseline keeps nanoGPT's fp32 stream)")
    p.add_argument("--sdpa", default="default", choices=tuple(SDPA_BACKENDS),
                   help="PyTorch SDPA backend for both sides (default: PyTorch's own choice)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile's mode for both sides (max-autotune-no-cudagraphs: inductor times Triton "
                        "matmul templates against cuBLAS and can fuse elementwise epilogues into them)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile this many more steps of each side: kernel time by category, top kernels")
    p.add_argument("--peak-flops", type=float, default=H100_BF16_PEAK)
    p.add_argument("--skip-baseline", action="store_true",
                   help="time Kiln alone (comparing Kiln variants; a ratio needs the baseline in the same run)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("train_bench: needs a CUDA GPU and none is available (torch "
              f"{torch.__version__}); `--device cpu` with a small shape only smoke-tests the script", file=sys.stderr)
        return 1
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compile_on = not args.no_compile
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    def amp():
        return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    batches = random_batches(4, args.batch, args.seq, args.vocab, device)
    tokens_per_step = args.batch * args.seq
    results = {}

    with sdpa_backend(args.sdpa):  # set while compiling: the traced graph keeps the backend chosen then
        params, results["kiln"] = bench_kiln(args, batches, device, amp, compile_on)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not args.skip_baseline:
            results["nanoGPT"] = bench_nanogpt(args, batches, device, amp, compile_on)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    precision = "bf16 autocast" if dtype == torch.bfloat16 else "fp32"
    print(f"device {name}; torch {torch.__version__}; triton {triton_version}; {precision}; "
          f"compile {args.compile_mode if compile_on else 'off'}; attn_backend {args.attn_backend}; "
          f"loss {args.loss_impl}; Kiln's residual stream {args.residual}; SDPA backend {args.sdpa}")
    print(f"shape: {params / 1e6:.1f}M params (layers {args.n_layer}, d_model {args.d_model}, heads {args.n_head}, "
          f"vocab {args.vocab}); B x T = {args.batch} x {args.seq}; {args.steps} timed steps after {args.warmup}")
    for label, seconds in results.items():
        tokens_per_second = tokens_per_step / seconds
        mfu = 6 * params * tokens_per_second / args.peak_flops
        mfu_text = f"  MFU {100 * mfu:5.1f}%" if device.type == "cuda" else ""
        print(f"{label:8s} {1000 * seconds:8.1f} ms/step  {tokens_per_second:12,.0f} tokens/s{mfu_text}")
    if "nanoGPT" in results:
        print(f"kiln / nanoGPT throughput: {results['nanoGPT'] / results['kiln']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
