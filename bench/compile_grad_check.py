"""Which parameters' gradients torch.compile changes in the model's training loss (Triton backend).

    python bench/compile_grad_check.py [--loss-impl chunked,logits]

The GPU run of tests/test_kernels_torch_compile.py found the compiled gradient of the tied embedding
0.7% off with the chunked LM-head loss (eager fp32: 3e-8 from an fp64 computation). This prints, per
parameter, the largest error of eager fp32 and of each compile mode against fp64: `aot_eager` runs
AOTAutograd's graphs without inductor's code generation, so an error only under `inductor` is in the
generated code or the layouts it gives the custom ops; one under both is in the graphs themselves.
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
    import torch._inductor.config as inductor_config

    print(f"torch {torch.__version__}, device {device}, allow_tf32 {torch.backends.cuda.matmul.allow_tf32}, "
          f"custom op layout {getattr(inductor_config, 'custom_op_default_layout_constraint', '?')}")
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
        for mode in ("aot_eager", "inductor", "inductor-no-padding"):
            torch._dynamo.reset()
            backend = mode.split("-")[0]
            with torch._inductor.config.patch(comprehensive_padding=mode != "inductor-no-padding"):
                runs[mode] = grads(model, torch.compile(model, backend=backend, fullgraph=True), x, y)
        print(f"\nloss_impl {loss_impl}: loss " + ", ".join(f"{k} {v[0].item():.7f}" for k, v in runs.items()))
        print(f"{'parameter':<28}{'max |grad|':>11}" + "".join(f"{k:>21}" for k in runs))
        for name, g64 in exact.items():
            row = "".join(f"{(run[1][name].double() - g64).abs().max().item():>21.3e}" for run in runs.values())
            print(f"{name:<28}{g64.abs().max().item():>11.3e}{row}")


if __name__ == "__main__":
    main()
