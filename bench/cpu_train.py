"""A training step on the CPU: Kiln's (`training.train.optimizer_step` on `model.Transformer`) against Hugging
Face transformers' LlamaForCausalLM with the same recipe, and Kiln without its native CPU kernels.

    python bench/cpu_train.py [--threads 2] [--steps 6] [--precision fp32 bf16] [--compile] [--quick]

The models are random-init Llama shapes (RMSNorm, RoPE, SwiGLU, GQA, LM head tied to the embedding, vocab 8192:
training/configs/tiny.toml's, default-cpu.toml's and the default model's) with the same weights; one step is
forward, backward, clipping at 1.0 and AdamW (0.9, 0.95, eps 1e-8, weight decay 0.1 on matrices), on random
tokens, in fp32 or under bf16 autocast (fp32 master weights), as `kiln train` runs it on a CPU (eager, or with
--compile every side through torch.compile, as default-cpu.toml trains). "Kiln" is what `kiln train` runs:
self-attention (forward and backward) and the rows of the chunked LM head + loss in the native module's
kernels (model/native, built here if needed: `Transformer.use_native_kernels`); "Kiln (torch)" is the same
model with `F.scaled_dot_product_attention` and the loss rows in torch ops, what the CPU ran before. HF's loss
is `F.cross_entropy` on its fp32-cast logits (what its `labels=` path does). The sides alternate step by step;
the median step is reported, with each side's first loss (they start from the same weights and batch, so they
agree to rounding).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cpu_serving import cpu_info  # noqa: E402
from model import native  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.optim import build_optimizer  # noqa: E402
from training.train import autocast, optimizer_step  # noqa: E402

VOCAB = 8192
# (name, d_model, n_layer, n_head, n_kv_head, d_ff, batch, seq)
SHAPES = [
    ("tiny.toml", 192, 4, 6, 2, 512, 16, 256),
    ("default-cpu.toml", 256, 6, 8, 2, 704, 8, 512),
    ("the default model", 512, 8, 8, 2, 1152, 8, 512),
]
QUICK_SHAPES = [("tiny", 32, 1, 2, 1, 64, 2, 16)]


def kiln_side(d, n_layer, n_head, n_kv_head, d_ff, seq, weights, native_module):
    config = ModelConfig(vocab_size=VOCAB, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, d_model=d, d_ff=d_ff,
                         max_seq_len=seq, norm="rmsnorm", positions="rope", mlp="swiglu", tie_embeddings=True,
                         bias=False)
    model = Transformer(config, attn_backend="torch")
    if weights is not None:
        model.load_state_dict(weights)
    model.use_native_kernels(native_module)
    model.train()
    return model, build_optimizer(model, TrainConfig(), "cpu")


def hf_weights(kiln: Transformer, n_head: int, n_kv_head: int) -> dict[str, torch.Tensor]:
    """Kiln's weights in LlamaForCausalLM's names (qkv and gate/up split; Kiln's rotary layout is HF's)."""
    c = kiln.config
    D = c.dim_per_head
    state = {"model.embed_tokens.weight": kiln.embed.weight, "model.norm.weight": kiln.norm.weight}
    for i, block in enumerate(kiln.blocks):
        p = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split([n_head * D, n_kv_head * D, n_kv_head * D])
        gate, up = block.mlp.up.weight.split(c.d_ff)
        state.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                      p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": block.attn.proj.weight,
                      p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                      p + "mlp.down_proj.weight": block.mlp.down.weight,
                      p + "input_layernorm.weight": block.norm1.weight,
                      p + "post_attention_layernorm.weight": block.norm2.weight})
    return {k: v.detach().clone() for k, v in state.items()}


def hf_side(d, n_layer, n_head, n_kv_head, d_ff, seq, weights):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=d, intermediate_size=d_ff,
                                         num_hidden_layers=n_layer, num_attention_heads=n_head,
                                         num_key_value_heads=n_kv_head, max_position_embeddings=seq,
                                         rms_norm_eps=1e-5, tie_word_embeddings=True, attn_implementation="sdpa"))
    model.load_state_dict(weights, strict=False)  # (rotary buffers are computed, not loaded)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    return model, optimizer


def run_shape(shape, precision: str, steps: int, native_module, compile_: bool) -> dict:
    name, d, n_layer, n_head, n_kv_head, d_ff, batch, seq = shape
    torch.manual_seed(0)
    kiln, kiln_opt = kiln_side(d, n_layer, n_head, n_kv_head, d_ff, seq, None, native_module)
    weights = {k: v.clone() for k, v in kiln.state_dict().items()}
    plain, plain_opt = kiln_side(d, n_layer, n_head, n_kv_head, d_ff, seq, weights, None)
    hf, hf_opt = hf_side(d, n_layer, n_head, n_kv_head, d_ff, seq, hf_weights(kiln, n_head, n_kv_head))
    run = {m: torch.compile(m) if compile_ else m for m in (kiln, plain, hf)}
    amp = lambda: autocast(precision, torch.device("cpu"))  # noqa: E731
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def kiln_step(model, optimizer):
        def step(x, y):
            loss, _ = optimizer_step(run[model], optimizer, scaler, [(x, y)], 1, 1.0, amp,
                                     lambda last: contextlib.nullcontext())
            return loss.item()
        return step

    def hf_step(x, y):
        with amp():
            logits = run[hf](input_ids=x).logits
        loss = F.cross_entropy(logits.float().view(-1, VOCAB), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        return loss.item()

    sides = {"Kiln": kiln_step(kiln, kiln_opt), "Kiln (torch)": kiln_step(plain, plain_opt), "HF": hf_step}
    gen = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {k: [] for k in sides}
    first: dict[str, float] = {}
    warm = 2 if compile_ else 1  # (a compiled side's second step is its first without recompiling)
    for i in range(steps + warm):  # the first warm up (step 0 gives the first losses)
        tokens = torch.randint(0, VOCAB, (batch, seq + 1), generator=gen)
        x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        for side, step in sides.items():
            started = time.perf_counter()
            loss = step(x, y)
            if i == 0:
                first[side] = loss
            elif i >= warm:
                times[side].append(time.perf_counter() - started)
    tokens_per_step = batch * seq
    rate = {side: tokens_per_step / statistics.median(t) for side, t in times.items()}
    params = sum(p.numel() for p in kiln.parameters())
    return {"name": name, "params": params, "batch": batch, "seq": seq, "precision": precision, "rate": rate,
            "first": first}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="timed steps per side (after one warm-up step)")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    p.add_argument("--compile", action="store_true", help="every side through torch.compile")
    p.add_argument("--quick", action="store_true", help="one tiny shape, two steps (a smoke test)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    torch.set_num_threads(args.threads)
    import transformers

    shapes, steps = (QUICK_SHAPES, 2) if args.quick else (SHAPES, args.steps)
    os.environ.pop(native.DISABLE_ENV, None)
    module = native.load()
    kernels = "native" if module is not None and hasattr(module, "causal_attention_backward") else "torch"
    mode = "torch.compile" if args.compile else "eager"
    print(f"# {cpu_info()[0]}, {args.threads} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, Python {platform.python_version()}; {mode}; "
          f"median of {steps} steps, alternating; Kiln's attention and loss rows: {kernels}"
          + ("" if kernels == "native" else f" (the native module is unavailable: {native.error()})"))
    print("| shape | params | batch x seq | precision | Kiln tok/s | Kiln (torch) tok/s | HF tok/s | "
          "Kiln / HF | Kiln / Kiln (torch) | first losses (Kiln, torch, HF) |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---|")
    worst = 0.0
    for shape in shapes:
        for precision in args.precision:
            r = run_shape(shape, precision, steps, module, args.compile)
            rate, first = r["rate"], r["first"]
            worst = max(worst, max(abs(first["Kiln"] - first[s]) for s in first))
            print(f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['batch']} x {r['seq']} | {precision} | "
                  f"{rate['Kiln']:,.0f} | {rate['Kiln (torch)']:,.0f} | {rate['HF']:,.0f} | "
                  f"{rate['Kiln'] / rate['HF']:.2f}x | {rate['Kiln'] / rate['Kiln (torch)']:.2f}x | "
                  f"{first['Kiln']:.4f}, {first['Kiln (torch)']:.4f}, {first['HF']:.4f} |", flush=True)
    if worst > 2e-2:
        print(f"the first losses differ by {worst:.3g}: the sides do not compute the same model", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
