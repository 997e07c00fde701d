"""The training loss on the CPU: `Transformer.loss` runs the chunked LM head + cross-entropy in torch
(`kernels.cross_entropy.linear_cross_entropy_torch`), which must give the whole-logits path's loss and
gradients."""

from __future__ import annotations

import pytest
import torch

import kernels.cross_entropy as ce
from model.config import ModelConfig
from model.transformer import Transformer

CONFIG = ModelConfig(vocab_size=300, n_layer=1, n_head=2, n_kv_head=1, d_model=32, d_ff=48, max_seq_len=16)


def losses_and_grads(autocast: torch.dtype | None, tie: bool):
    config = ModelConfig(**{**CONFIG.__dict__, "tie_embeddings": tie})
    torch.manual_seed(0)
    weights = Transformer(config).state_dict()
    tokens = torch.randint(0, 300, (3, 15), generator=torch.Generator().manual_seed(1))
    targets = tokens[:, 1:].clone()
    targets[0, :4] = -100  # ignored positions
    results = []
    for loss_impl in ("chunked", "logits"):
        model = Transformer(config, attn_backend="torch")
        model.load_state_dict(weights)
        model.loss_impl = loss_impl
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = model(tokens[:, :-1], targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    return results


@pytest.fixture
def chunked_calls(monkeypatch) -> list[tuple]:
    """(hidden shape, hidden dtype, weight dtype) of each call of the chunked torch loss, as it happens."""
    calls = []
    real = ce.linear_cross_entropy_torch

    def spy(hidden, weight, *args, **kwargs):
        calls.append((hidden.shape, hidden.dtype, weight.dtype))
        return real(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(ce, "linear_cross_entropy_torch", spy)
    return calls


@pytest.mark.parametrize("tie", [False, True])
def test_the_cpu_loss_is_chunked_and_equals_the_whole_logits_one(tie, chunked_calls):
    (loss, grads), (ref_loss, ref_grads) = losses_and_grads(None, tie)
    assert chunked_calls == [((42, 32), torch.float32, torch.float32)]  # the chunked path ran once, not the logits one
    assert loss.dtype == torch.float32 and abs(loss.item() - ref_loss.item()) < 1e-6
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert (g - ref_grads[name]).abs().max().item() < 1e-6, name


def test_the_cpu_loss_under_bf16_autocast(chunked_calls):
    """bf16 autocast (precision=auto on CPUs with fast bf16 products): the chunked path gets bf16 hidden states and
    LM head, as the LM head's linear layer would under autocast, returns an fp32 loss (not rounded to bf16's
    ~0.03 at this size), and the fp32 master weights get fp32 gradients close to the whole-logits path's."""
    (loss, grads), (ref_loss, ref_grads) = losses_and_grads(torch.bfloat16, False)
    assert chunked_calls == [((42, 32), torch.bfloat16, torch.bfloat16)]
    assert loss.dtype == torch.float32 and loss.item() != loss.bfloat16().float().item()
    assert abs(loss.item() - ref_loss.item()) < 1e-3
    for name, g in grads.items():
        assert g.dtype == torch.float32
        scale = max(ref_grads[name].abs().max().item(), 1e-3)
        assert (g - ref_grads[name]).abs().max().item() < 2e-2 * scale, name


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_an_autocast_residual_stream_is_carried_in_the_autocast_dtype(style):
    """`autocast_residual` (training's residual = "autocast"): under bf16 autocast every block reads and writes
    a bf16 residual stream (fp32 master weights otherwise make it fp32), the loss and the fp32 weights' gradients
    stay near the fp32 stream's; without autocast it changes nothing."""
    extra = dict(norm="layernorm", positions="learned", mlp="gelu", tie_embeddings=True, bias=True) if style == "gpt2" \
        else {}
    config = ModelConfig(**{**CONFIG.__dict__, "n_layer": 2, **extra})
    torch.manual_seed(0)
    model = Transformer(config, attn_backend="torch")
    tokens = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(1))
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
    results = {}
    for on in (False, True):
        model.autocast_residual = on
        for autocast in (False, True):
            seen.clear()
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            stream = torch.bfloat16 if on and autocast else torch.float32
            assert seen == [(stream, stream)] * 2, (on, autocast, seen)
            assert loss.dtype == torch.float32
            results[on, autocast] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert torch.equal(results[True, False][0], results[False, False][0])  # no autocast: the flag changes nothing
    (loss, grads), (ref_loss, ref_grads) = results[True, True], results[False, True]
    assert abs(loss.item() - ref_loss.item()) < 2e-2
    for name, g in grads.items():
        assert g.dtype == torch.float32
        scale = max(ref_grads[name].abs().max().item(), 1e-3)
        assert (g - ref_grads[name]).abs().max().item() < 5e-2 * scale, name
