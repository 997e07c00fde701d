"""CPU prompt forwards and scoring in bf16 (`Engine(prefill_dtype=...)`, `kiln serve --prefill-dtype`).

An fp32 model on the CPU can run its prompt forwards and scoring through a bf16 copy of itself
(`cpu_packing.bf16_copy`): several times faster on CPUs with AMX. The copy writes its keys and values
into the engine's fp32 cache and reads them back (chunked prefill, prefix hits), and the fp32 decode
steps then read what it wrote.
"""

from __future__ import annotations

import pytest
import torch

import model.cpu_packing as cpu_packing
from model.checkpoint import load_model
from model.cpu_packing import bf16_copy
from model.engine import Engine, SamplingParams
from model.quantize import quantize_model
from model.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def bf16_exact(path) -> torch.nn.Module:
    """The fixture model with every weight rounded to a bf16 number (as a checkpoint stored in bf16 loads)."""
    model = load_model(path, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


def prompt_ids(engine: Engine, n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, engine.vocab_limit, (n,), generator=g).tolist()


def test_bf16_copy_is_a_separate_bf16_model_with_the_same_forward(hf_dir):
    model = bf16_exact(hf_dir)
    twin = bf16_copy(model)
    params = list(twin.parameters())
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert not {p.data_ptr() for p in params} & {p.data_ptr() for p in model.parameters()}
    assert (twin.lm_head.weight is twin.embed.weight) == (model.lm_head.weight is model.embed.weight)
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a.to(torch.bfloat16), b), name  # exact: the weights were bf16 numbers
    tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(tokens).log_softmax(-1), twin(tokens).float().log_softmax(-1)
    err = (got - want).abs()
    assert err.max() < 0.15 and err.mean() < 0.02, (err.max().item(), err.mean().item())
    assert err.max() > 0  # it did compute in bf16


def test_auto_keeps_prompts_in_fp32_even_with_amx_and_bf16_exact_weights(llama_dir, monkeypatch):
    """bf16 prompts are asked for, never picked: they would move prompt logprobs by ~1e-2 and mix bf16 keys and
    values with the fp32 paths' (short prompts through the native step, the prefix cache)."""
    tokenizer = load_tokenizer(llama_dir)
    exact, raw = bf16_exact(llama_dir), load_model(llama_dir, "cpu")
    monkeypatch.setattr(cpu_packing, "amx_bf16", lambda: True)
    for model in (exact, raw):
        engine = Engine(model, tokenizer, prefill_dtype="auto")
        assert engine.prefill_dtype == torch.float32 and engine.prefill_model is model
    assert Engine(exact, tokenizer).prefill_model is exact  # the default
    assert Engine(exact, tokenizer, prefill_dtype="bf16").prefill_dtype == torch.bfloat16  # asked for: done
    monkeypatch.setattr(cpu_packing, "amx_bf16", lambda: False)
    assert Engine(raw, tokenizer, prefill_dtype="bf16").prefill_dtype == torch.bfloat16


def test_prefill_dtypes_that_do_not_apply_are_refused(llama_dir):
    tokenizer = load_tokenizer(llama_dir)
    with pytest.raises(ValueError, match="one of auto, fp32, bf16; got 'fp16'"):
        Engine(load_model(llama_dir, "cpu"), tokenizer, prefill_dtype="fp16")
    bf16_model = load_model(llama_dir, "cpu", dtype="bf16")
    with pytest.raises(ValueError, match="fp32 models on the CPU; this model is bfloat16 on cpu"):
        Engine(bf16_model, tokenizer, prefill_dtype="fp32")
    assert Engine(bf16_model, tokenizer, prefill_dtype="bf16").prefill_model is bf16_model  # its own dtype


def test_an_int8_model_prompts_through_a_bf16_copy_of_its_dequantized_weights(hf_dir, monkeypatch):
    """Its layers become bf16 linears of what the int8 model multiplies by (its own LM head, even when
    tied), so prompt logprobs stay within bf16 rounding of the int8 model's fp32 ones; auto keeps fp32."""
    quantized, tokenizer = load_model(hf_dir, "cpu"), load_tokenizer(hf_dir)
    quantize_model(quantized, "int8")
    twin = bf16_copy(quantized)
    for name, module in quantized.named_modules():
        if hasattr(module, "tiles"):  # an Int8Linear: the copy holds its dequantized weight in bf16
            torch.testing.assert_close(twin.get_submodule(name).weight, module.weight.to(torch.bfloat16),
                                       rtol=0, atol=0)
    assert twin.lm_head.weight is not twin.embed.weight
    monkeypatch.setattr(cpu_packing, "amx_bf16", lambda: True)
    assert Engine(quantized, tokenizer, prefill_dtype="auto").prefill_dtype == torch.float32
    engines = {pd: Engine(quantized, tokenizer, prefill_dtype=pd) for pd in ("fp32", "bf16")}
    ids = prompt_ids(engines["fp32"], 30)
    scores = {pd: torch.tensor(e.score([ids])[0].logprobs[1:]) for pd, e in engines.items()}
    err = (scores["bf16"] - scores["fp32"]).abs()
    assert 0 < err.mean() < 0.01 and err.max() < 0.05, (err.mean(), err.max())


def test_bf16_prefill_fills_the_fp32_cache_that_decode_reads(llama_dir):
    """A 40-token prompt in chunks of 16: each chunk of the bf16 forward reads the earlier chunks' keys back
    from the fp32 cache; the cache then holds what the fp32 prefill writes, to bf16 rounding, and the prompt
    logprobs, scores and decoded tokens' logprobs stay close to the fp32 engine's."""
    model, tokenizer = bf16_exact(llama_dir), load_tokenizer(llama_dir)
    kw = dict(max_prefill_tokens=16, enable_prefix_caching=False, num_blocks=32, block_size=8)
    fp32 = Engine(model, tokenizer, prefill_dtype="fp32", **kw)
    bf16 = Engine(model, tokenizer, prefill_dtype="bf16", **kw)
    assert bf16.cache.k.dtype == torch.float32
    calls = []
    bf16.prefill_model.register_forward_hook(lambda *_: calls.append(1))
    ids = prompt_ids(fp32, 40)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0, prompt_logprobs=True)
    outs = {name: list(e.generate(ids, params)) for name, e in (("fp32", fp32), ("bf16", bf16))}
    assert len(calls) == 3  # three prompt chunks through the copy
    used = slice(0, 5)  # 40 prompt + 5 decoded positions in 8-token blocks: blocks 0-5 (the pool's first ones)
    for pool in ("k", "v"):
        a, b = getattr(fp32.cache, pool)[:, used], getattr(bf16.cache, pool)[:, used]
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)
        assert not torch.equal(a, b)
    lp = {name: torch.tensor([t.logprob for t in o[0].prompt_logprobs[1:]]) for name, o in outs.items()}
    err = (lp["bf16"] - lp["fp32"]).abs()
    assert len(lp["fp32"]) == 39 and err.max() < 0.05 and 0 < err.mean() < 0.01, (err.max(), err.mean())
    tokens = {name: [t for out in o for t in out.token_ids] for name, o in outs.items()}
    if tokens["bf16"] == tokens["fp32"]:  # (random weights: a near-tie may flip a greedy pick)
        decoded = {name: torch.tensor([t.logprob for out in o for t in out.logprobs[-len(out.token_ids):]
                                       if out.token_ids]) for name, o in outs.items()}
        torch.testing.assert_close(decoded["bf16"], decoded["fp32"], rtol=0, atol=0.1)
    scores = {name: e.score([ids])[0] for name, e in (("fp32", fp32), ("bf16", bf16))}
    assert scores["bf16"].num_scored == 39
    assert scores["bf16"].mean_nll == pytest.approx(scores["fp32"].mean_nll, abs=0.02)
    assert scores["bf16"].mean_nll != scores["fp32"].mean_nll


def test_cli_and_server_take_the_flag():
    import argparse

    from model.cli import add_model_args
    from server.settings import ServerSettings

    p = argparse.ArgumentParser()
    add_model_args(p)
    assert p.parse_args([]).prefill_dtype == "auto"
    assert p.parse_args(["--prefill-dtype", "bf16"]).prefill_dtype == "bf16"
    with pytest.raises(SystemExit):
        p.parse_args(["--prefill-dtype", "fp16"])
    assert ServerSettings(prefill_dtype="bf16", quantization="int8").prefill_dtype == "bf16"
