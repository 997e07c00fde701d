"""`Engine(release_weights=True)` (the server, kiln generate and kiln ppl): a large fp32 model on the CPU keeps each
linear layer's matrix only as its oneDNN pack, so the packs take the place of the fp32 originals instead of
doubling them. Every path must give what it gave with the originals, and the originals must really be gone.

A "large" model is one past `fast_decode.FOLD_LIMIT_BYTES` (256 MiB); the tests set the limit to 0 so the tiny
fixtures take that path.
"""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch

from model import cpu_packing, fast_decode
from model import native as native_step
from model.checkpoint import load_model
from model.cli import load_engine
from model.engine import Engine, SamplingParams
from model.tokenizer import load_tokenizer
from server.loading import load_configured_engine
from server.settings import ServerSettings

from test_fast_decode import assert_same_runs
from test_native_decode import bf16_checkpoint, native_module  # noqa: F401 -- a fixture

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not cpu_packing.available(), reason="this torch build cannot pack for oneDNN")]


@pytest.fixture
def large(monkeypatch):
    monkeypatch.setattr(fast_decode, "FOLD_LIMIT_BYTES", 0)


def linears(model) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.usefixtures("large")
@pytest.mark.parametrize("fixture", ["llama_dir", "gpt2_dir"])
def test_the_originals_are_freed_and_the_torch_path_gives_the_same_tokens(fixture, request):
    """The torch decode step (batch 1 to 4, so below and above PACKED_DECODE_MIN_BATCH), prompts and echo
    through the packs alone: the same greedy tokens and logprobs within 1e-4 as the plain forward on the
    originals. Weak references to the original matrices die: nothing (the plan, the packing) holds them. GPT-2's
    LM head is tied to its embedding, which the lookup still reads: that one stays."""
    model_dir = request.getfixturevalue(fixture)
    model = load_model(model_dir)
    tied = model.lm_head.weight is model.embed.weight
    originals = [weakref.ref(m.weight) for m in linears(model) if m.weight is not model.embed.weight]
    sizes = sum(m.in_features * m.out_features * 4 for m in linears(model) if m.weight is not model.embed.weight)
    engine = Engine(model, load_tokenizer(model_dir), max_batch_size=4, native=False, release_weights=True)
    gc.collect()
    assert all(ref() is None for ref in originals)
    assert engine.released_bytes == sizes > 0
    assert engine._decode_plan.calls_modules and engine.decode_path == "eager"
    released = [m for m in linears(model) if m.weight.numel() == 0]
    assert len(released) == len(originals)
    assert (model.lm_head.weight.numel() > 0) == tied == (fixture == "gpt2_dir")
    reference = load_engine(str(model_dir), "cpu", max_batch_size=4, fast_decode=False)
    assert_same_runs(engine, reference)
    ids = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    echo = SamplingParams(max_tokens=0, prompt_logprobs=True, logprobs=0)
    got, want = (list(e.generate(ids, echo))[0].prompt_logprobs[1:] for e in (engine, reference))
    assert max(abs(a.logprob - b.logprob) for a, b in zip(got, want)) < 1e-4
    got, want = (e.score([ids])[0].logprobs[1:] for e in (engine, reference))
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4


@pytest.mark.usefixtures("large")
def test_a_released_model_refuses_what_needs_the_originals(llama_dir):
    engine = load_engine(str(llama_dir), "cpu", native=False, release_weights=True)
    with pytest.raises(ValueError, match="released to another engine"):
        Engine(engine.model, engine.tokenizer)
    qkv = engine.model.blocks[0].attn.qkv
    with pytest.raises(RuntimeError, match="keeps only its oneDNN pack .* got torch.float64"):
        qkv(torch.zeros(1, qkv.in_features, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="requiring grad"):
        qkv(torch.zeros(1, qkv.in_features, requires_grad=True))
    # the matrix itself is still there, in the pack, for whoever needs it (the native step's copy)
    reference = load_model(llama_dir).blocks[0].attn.qkv.weight
    assert torch.equal(cpu_packing.dense_weight(qkv), reference)


def test_models_that_fold_or_compile_keep_their_weights(llama_dir):
    """Small (folded) models: the plan holds folded copies and nothing is released, as with compile."""
    engine = load_engine(str(llama_dir), "cpu", native=False, release_weights=True)
    assert engine._decode_plan.folded and engine.released_bytes == 0
    assert not cpu_packing.released(engine.model)
    Engine(engine.model, engine.tokenizer)  # another engine on it is fine


@pytest.mark.usefixtures("large")
@pytest.mark.parametrize("fixture", ["llama_dir", "gpt2_dir"])
def test_the_native_step_builds_its_tiles_from_the_packs(fixture, native_module, monkeypatch, tmp_path,  # noqa: F811
                                                         request):
    """A bf16 checkpoint past the fold limit, released: the native step's bf16 tiles come from the packs
    (`dense_weight`), and with NATIVE_MAX_BATCH 2 rows joining and leaving cross between the native step and
    the torch path. Tokens and logprobs equal the plain forward's on a copy that kept its originals."""
    monkeypatch.delenv(native_step.DISABLE_ENV, raising=False)
    bf16_checkpoint(request.getfixturevalue(fixture), tmp_path)
    engine = load_engine(str(tmp_path), "cpu", max_batch_size=4, native=True, prefill_dtype="fp32",
                         release_weights=True)
    assert engine.released_bytes > 0 and engine.decode_path == "native (bfloat16 matrices)"
    reference = load_engine(str(tmp_path), "cpu", max_batch_size=4, fast_decode=False, prefill_dtype="fp32")
    assert_same_runs(engine, reference)
    monkeypatch.setattr(fast_decode, "NATIVE_MAX_BATCH", 2)
    assert_same_runs(engine, reference)


@pytest.mark.usefixtures("large")
def test_the_server_releases_and_says_so(llama_dir, caplog):
    settings = ServerSettings(model_dir=str(llama_dir), max_batch_size=2)
    with caplog.at_level(logging.INFO, logger="kiln.server"):
        engine = load_configured_engine(settings)
    assert engine.released_bytes > 0 and cpu_packing.released(engine.model)
    assert any("fp32 matrices only as oneDNN packs" in r.getMessage() for r in caplog.records)
    out = list(engine.generate(engine.tokenizer.encode("Once upon"), SamplingParams(max_tokens=4, temperature=0)))
    assert sum(len(o.token_ids) for o in out) == 4


@pytest.mark.parametrize("fixture", ["llama_dir", "gpt2_dir"])
def test_releasing_packs_a_model_whose_packs_would_not_fit_beside_it(fixture, monkeypatch, request):
    """Packs that replace their originals need room for one matrix at a time, plus the whole of those that stay
    (GPT-2's LM head, tied to the embedding): with memory for that and no more, release packs the model where
    plain packing refuses, and one byte less refuses both."""
    model_dir = request.getfixturevalue(fixture)
    model = load_model(model_dir)
    tied = [m for m in linears(model) if m.weight is model.embed.weight]
    sizes = [m.weight.numel() * 4 for m in linears(model) if m.weight is not model.embed.weight]
    needed = sum(m.weight.numel() * 4 for m in tied) + max(sizes)
    assert needed < sum(sizes) + sum(m.weight.numel() * 4 for m in tied)
    monkeypatch.setattr(cpu_packing, "available_memory", lambda: 2 * needed)  # (packs may take half of it)
    assert cpu_packing.pack_linears(model) == 0
    assert cpu_packing.pack_linears(model, release=True) == len(linears(model)) and cpu_packing.released(model)
    monkeypatch.setattr(cpu_packing, "available_memory", lambda: 2 * needed - 2)
    assert cpu_packing.pack_linears(load_model(model_dir), release=True) == 0
