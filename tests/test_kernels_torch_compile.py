"""The Triton kernels under torch.compile, as training runs them (`kiln train` compiles on GPUs).

Each launcher is a custom op (`kernels._utils.kernel_op`), so Dynamo sees one opaque call per
launch instead of tracing Triton's launcher. The checks compile with ``fullgraph=True``: one graph
break would fail them. Forward values and gradients must equal the eager ones. On the CPU they
run the kernels in Triton's interpreter, which Dynamo cannot trace at all without the ops.
"""

from __future__ import annotations

import pytest
import torch

from kernel_checks import assert_close
from kernels import attention, cross_entropy
from model.checkpoint import build_model
from model.config import ModelConfig
from model.transformer import Transformer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not attention.available(DEVICE), reason="needs triton (and TRITON_INTERPRET=1 on CPU)")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled_and_eager(fn, *inputs):
    """(compiled loss, grads), (eager loss, grads) of fn(*inputs) w.r.t. the float inputs."""
    results = []
    for f in (torch.compile(fn, fullgraph=True), fn):
        leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        loss = f(*leaves)
        loss.backward()
        results.append((loss.detach(), [x.grad for x in leaves if x.is_floating_point()]))
    return results


def test_flash_attention_compiles_in_one_graph():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(2, 4, 33, 16, device=DEVICE, generator=gen)
    k = torch.randn(2, 2, 33, 16, device=DEVICE, generator=gen)
    v = torch.randn(2, 2, 33, 16, device=DEVICE, generator=gen)

    def fn(q, k, v):
        out = attention.flash_attention(q * 2.0, k, v, causal=True)
        return (out * out).sum()

    (loss, grads), (ref_loss, ref_grads) = compiled_and_eager(fn, q, k, v)
    assert_close(loss, ref_loss, 1e-4, 1e-5, "compiled attention loss")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_close(g, r, 1e-5, 1e-5, f"compiled d{name}")


def test_cross_entropy_and_linear_cross_entropy_compile_in_one_graph():
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    logits = torch.randn(17, 1000, device=DEVICE, generator=gen)
    targets = torch.randint(0, 1000, (17,), device=DEVICE, generator=gen)
    targets[3] = -100
    (loss, grads), (ref_loss, ref_grads) = compiled_and_eager(
        lambda x, t: cross_entropy.cross_entropy(x * 1.5, t), logits, targets)
    assert_close(loss, ref_loss, 1e-5, 1e-5, "compiled cross-entropy")
    assert_close(grads[0], ref_grads[0], 1e-6, 1e-5, "compiled cross-entropy grad")

    hidden = torch.randn(33, 16, device=DEVICE, generator=gen)
    weight = torch.randn(1000, 16, device=DEVICE, generator=gen)
    (loss, grads), (ref_loss, ref_grads) = compiled_and_eager(
        lambda h, w, t: cross_entropy.linear_cross_entropy(h * 1.0, w, t, chunk_rows=8), hidden, weight,
        torch.cat([targets, targets[:16]]))
    assert_close(loss, ref_loss, 1e-5, 1e-5, "compiled linear cross-entropy")
    for name, g, r in zip(("hidden", "weight"), grads, ref_grads):
        assert_close(g, r, 1e-5, 1e-5, f"compiled linear cross-entropy d{name}")


GPT2_STYLE = dict(norm="layernorm", positions="learned", mlp="gelu", tie_embeddings=True, bias=True)


@pytest.mark.parametrize("loss_impl,style", [("chunked", "llama"), ("logits", "llama"), ("chunked", "gpt2")])
def test_training_forward_and_backward_compile_in_one_graph(loss_impl, style):
    """The model's training loss with the Triton backend (flash attention + chunked LM-head CE, or whole
    logits + the CE kernel; GPT-2 style, attention straight from the packed qkv projection)."""
    config = ModelConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2 if style == "llama" else 4, d_model=64,
                         d_ff=96, max_seq_len=32, **(GPT2_STYLE if style == "gpt2" else {}))
    torch.manual_seed(0)
    model = build_model(config, Transformer(config).state_dict(), torch.device(DEVICE), torch.float32,
                        attn_backend="triton").train()
    model.loss_impl = loss_impl
    x = torch.randint(0, 300, (2, 17), device=DEVICE)
    y = torch.randint(0, 300, (2, 17), device=DEVICE)
    compiled = torch.compile(model, fullgraph=True)
    losses, grads = [], []
    for forward in (compiled, model):
        model.zero_grad(set_to_none=True)
        loss = forward(x, targets=y)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert_close(losses[0], losses[1], 1e-5, 1e-5, "compiled training loss")
    # The bar for the gradients is eager fp32's own distance from an fp64 computation (PyTorch's
    # attention and loss), not bitwise agreement: the compiled graph may sum in another order.
    reference = build_model(config, model.state_dict(), torch.device(DEVICE), torch.float64,
                            attn_backend="torch").train()
    reference.loss_impl = loss_impl
    reference(x, targets=y).backward()
    for name, p64 in reference.named_parameters():
        scale = p64.grad.abs().max().item()
        err_compiled = (grads[0][name].double() - p64.grad).abs().max().item()
        err_eager = (grads[1][name].double() - p64.grad).abs().max().item()
        assert err_compiled <= 2 * err_eager + 1e-5 * scale, (
            f"compiled grad of {name}: max err {err_compiled:.3e} vs fp64, eager fp32's {err_eager:.3e} "
            f"(largest grad {scale:.3e})"
        )


def test_the_ops_check_the_device_when_they_run(monkeypatch):
    """Traced code skips check_triton_device (Dynamo cannot follow it); the op checks when it runs."""
    from kernels import _utils

    monkeypatch.setattr(_utils, "triton_available", lambda device: False)
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="flash_attention needs a CUDA tensor"):
        attention._forward.op(q, q, q, None, None, 4, 4, True, 0.25)
    with pytest.raises(ValueError, match="linear_cross_entropy needs a CUDA tensor"):
        cross_entropy._linear.op(q[0, 0], q[0, 0], torch.zeros(4, dtype=torch.long), -100, "mean", None, False)


@torch.no_grad()
def test_rope_cache_write_into_a_later_layer_compiles_with_dynamic_shapes():
    """The fused rope op writes layer 1 of the pool under torch.compile(dynamic=True) where eager does.
    (Handed the view pool[1] instead, torch 2.13's auto-functionalization puts the writes at the
    pool's offset 0; the model hands the pool and the layer index.)"""
    from kernels import rope

    H, Hkv, D = 4, 2, 16
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    pools = [torch.zeros(2, 5, 4, Hkv, D, device=DEVICE) for _ in range(4)]
    qkv = torch.randn(2, 1, (H + 2 * Hkv) * D, device=DEVICE, generator=gen)
    positions = torch.tensor([[3], [5]], device=DEVICE)
    blocks, offsets = torch.tensor([[1], [2]], device=DEVICE), torch.tensor([[0], [3]], device=DEVICE)

    def fn(qkv, k_pool, v_pool):
        q = rope.rope_cache_write(qkv, H, Hkv, positions, k_pool, v_pool, blocks, offsets, layer=1)
        return q * 2.0, k_pool[1].sum()

    got = torch.compile(fn, fullgraph=True, dynamic=True)(qkv, pools[0], pools[1])
    want = fn(qkv, pools[2], pools[3])
    assert_close(got[0], want[0], 0, 0, "compiled q")
    assert_close(got[1], want[1], 1e-5, 1e-5, "compiled read of the written layer")
    assert_close(pools[0], pools[2], 0, 0, "k pool")
    assert_close(pools[1], pools[3], 0, 0, "v pool")
    assert float(pools[2][1].abs().sum()) > 0 and float(pools[2][0].abs().sum()) == 0
