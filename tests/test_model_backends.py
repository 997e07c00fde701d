"""The model on the Triton backend equals the torch backend (kernels interpreted on CPU)."""

from __future__ import annotations

import pytest
import torch

from model.checkpoint import build_model
from model.config import ModelConfig
from model.kv_cache import KVCache

from cache_helpers import Sequences
from model.transformer import Transformer

pytest.importorskip("triton")


def close(a, b, atol=2e-4):
    diff = (a.float() - b.float()).abs()
    assert diff.max().item() <= atol, f"max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}"


def test_triton_backend_forward_decode_and_loss_match_torch():
    config = ModelConfig(vocab_size=300, n_layer=2, n_head=6, n_kv_head=2, d_model=96, d_ff=80, max_seq_len=32)
    torch.manual_seed(0)
    weights = Transformer(config).state_dict()
    torch_model = build_model(config, weights, torch.device("cpu"), torch.float32, attn_backend="torch")
    triton_model = build_model(config, weights, torch.device("cpu"), torch.float32, attn_backend="triton")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, torch_model.config.vocab_size, (2, 11), generator=g)
    with torch.no_grad():
        close(triton_model(tokens), torch_model(tokens))
        # prefill one sequence, then one decode step over a batch of two slots of different lengths
        caches = [Sequences(KVCache(m.config, num_blocks=9, block_size=4, max_seq_len=16))
                  for m in (torch_model, triton_model)]
        outs = []
        for model, cache in zip((torch_model, triton_model), caches):
            a, b = cache.allocate(), cache.allocate()
            for slot, n in ((a, 5), (b, 3)):
                model(tokens[slot, :n][None], kv_cache=cache.kv, batch=cache.batch([slot], [n]))
                cache.advance([slot], [n])
            step = torch.stack([tokens[0, 5:6], tokens[1, 3:4]])
            outs.append(model(step, kv_cache=cache.kv, batch=cache.batch([a, b], [1, 1])))
        close(outs[1], outs[0])
    with pytest.raises(ValueError, match="head dim"):
        bad = ModelConfig(vocab_size=300, n_layer=1, n_head=4, n_kv_head=2, d_model=40, d_ff=8, max_seq_len=8)
        Transformer(bad, attn_backend="triton")(tokens[:, :3])
    loss_ref = torch_model(tokens[:, :-1], tokens[:, 1:])
    loss = triton_model(tokens[:, :-1], tokens[:, 1:])
    assert abs(loss.item() - loss_ref.item()) < 1e-4, (loss.item(), loss_ref.item())


@pytest.mark.parametrize("loss_impl", ["chunked", "logits"])
def test_triton_training_loss_and_gradients_match_torch(loss_impl):
    """Both loss paths of the triton backend (chunked LM head + loss, or whole logits + the CE kernel)
    give the torch backend's loss and gradients."""
    config = ModelConfig(vocab_size=300, n_layer=1, n_head=2, n_kv_head=1, d_model=32, d_ff=48, max_seq_len=16)
    torch.manual_seed(0)
    weights = Transformer(config).state_dict()
    tokens = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    targets = tokens[:, 1:].clone()
    targets[0, :2] = -100  # ignored positions
    grads = []
    for backend in ("torch", "triton"):
        model = build_model(config, weights, torch.device("cpu"), torch.float32, attn_backend=backend)
        model.loss_impl = loss_impl
        loss = model(tokens[:, :-1], targets)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref_loss, ref), (got_loss, got) = grads
    close(got_loss, ref_loss, 1e-5)
    for name, g in got.items():
        close(g, ref[name], 1e-5)


def test_chunked_loss_runs_its_matmuls_in_the_autocast_dtype(monkeypatch):
    """Under autocast the chunked LM-head loss gets 16-bit hidden states and weight, as the LM head
    (a linear layer) would, not the fp32 master weight; its loss and gradients match the whole-logits path."""
    import kernels.cross_entropy as ce

    config = ModelConfig(vocab_size=300, n_layer=1, n_head=2, n_kv_head=1, d_model=32, d_ff=48, max_seq_len=16)
    torch.manual_seed(0)
    weights = Transformer(config).state_dict()
    tokens = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    seen = []
    real = ce.linear_cross_entropy

    def spy(hidden, weight, *args, **kwargs):
        seen.append((hidden.dtype, weight.dtype))
        return real(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(ce, "linear_cross_entropy", spy)
    results = []
    for loss_impl in ("chunked", "logits"):
        model = build_model(config, weights, torch.device("cpu"), torch.float32, attn_backend="triton")
        model.loss_impl = loss_impl
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        assert model.lm_head.weight.grad.dtype == torch.float32
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert seen == [(torch.float16, torch.float16)]
    (loss, grads), (ref_loss, ref_grads) = results
    close(loss, ref_loss, 2e-3)
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().item()
        close(g, ref_grads[name], 2e-3 * max(scale, 1.0))


def test_auto_backend_resolves_inside_a_compiled_graph():
    """The compiled CUDA decode step resolves "auto" while Dynamo traces it: the lookup must be traceable
    (an importlib call there failed the whole compile on a GPU, which then served eagerly). Traced here for a
    CUDA device without one: resolving reads no device."""
    from model.attention import resolve_backend

    def step(x):
        backend = resolve_backend("auto", torch.device("cuda"), 64)
        return x + 1 if backend == "triton" else x - 1

    torch._dynamo.reset()
    try:
        got = torch.compile(step, backend="eager", fullgraph=True)(torch.zeros(2))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, step(torch.zeros(2)))
