"""Which parameters' gradients torch.compile changes in the model's training loss (Triton backend).

    python bench/compile_grad_check.py [--loss-impl chunked,logits]

Prints, per parameter, the largest gradient error of eager fp32 and of each compile mode against an
fp64 computation, in that order: `aot_eager` runs AOTAutograd's graphs without inductor's code
generation, so an error only under `inductor` is in the generated code, one under both in the graphs,
and one in whichever run comes first in something a process does once. That last is what the fourth GPU
lease found (bench/RESULTS.md): the chunked loss's in-place backward, autotuned on its first launch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import build_model  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.transformer import Transformer  # noqa: E402


def grads(model, forward, x, y):
    model.zero_grad(set_to_none=True)
    loss = forward(x, targets=y)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loss-impl", default="chunked,logits")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, allow_tf32 {torch.backends.cuda.matmul.allow_tf32}")
    config = ModelConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96, max_seq_len=32)
    torch.manual_seed(0)
    weights = Transformer(config).state_dict()
    x = torch.randint(0, 300, (2, 17), device=device)
    y = torch.randint(0, 300, (2, 17), device=device)
    for loss_impl in args.loss_impl.split(","):
        model = build_model(config, weights, device, torch.float32, attn_backend="triton").train()
        model.loss_impl = loss_impl
        reference = build_model(config, weights, device, torch.float64, attn_backend="torch").train()
        reference.loss_impl = loss_impl
        _, exact = grads(reference, reference, x, y)
        runs = {"eager": grads(model, model, x, y)}
        for backend in ("aot_eager", "inductor"):
            torch._dynamo.reset()
            runs[backend] = grads(model, torch.compile(model, backend=backend, fullgraph=True), x, y)
        print(f"\nloss_impl {loss_impl}: loss " + ", ".join(f"{k} {v[0].item():.7f}" for k, v in runs.items()))
        print(f"{'parameter':<28}{'max |grad|':>11}" + "".join(f"{k:>21}" for k in runs))
        for name, g64 in exact.items():
            row = "".join(f"{(run[1][name].double() - g64).abs().max().item():>21.3e}" for run in runs.values())
            print(f"{name:<28}{g64.abs().max().item():>11.3e}{row}")


if __name__ == "__main__":
    main()
