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
