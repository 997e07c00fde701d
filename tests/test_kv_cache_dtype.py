"""`--kv-cache-dtype bf16`: a CPU KV pool of half the bytes, read and written the same way on every path.

Keys and values are rounded to bf16 as they are stored and widened back when read, so every path that
reads the cache (prompt chunks, the plain forward, the lean torch step, the native step, speculation)
sees the same rounded numbers: they agree with each other as closely as fp32 rounding lets them (a
last-bit difference in fp32 can round a key the other way, ~4e-3 relative), and with an fp32 cache
to ~1e-2 in logprobs, the same greedy tokens on a trained model. Scoring (/v1/perplexity) keeps
its own cache in the model's dtype.
"""

from __future__ import annotations

import logging

import pytest
import torch

from model.cli import load_engine
from model.engine import Engine, SamplingParams
from model.kv_cache import resolve_kv_cache_dtype
from server.loading import load_configured_engine
from server.settings import ServerSettings

from test_fast_decode import assert_same_runs

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = ([24], [14, 6, 11, 9])  # batch 1, then rows joining and leaving


def test_resolve_kv_cache_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_kv_cache_dtype("auto", torch.float32, cpu) == torch.float32
    assert resolve_kv_cache_dtype("auto", torch.bfloat16, cuda) == torch.bfloat16
    assert resolve_kv_cache_dtype("bf16", torch.float32, cpu) == torch.bfloat16
    assert resolve_kv_cache_dtype("fp32", torch.bfloat16, cpu) == torch.float32
    assert resolve_kv_cache_dtype("bf16", torch.bfloat16, cuda) == torch.bfloat16  # = the model's: allowed
    with pytest.raises(ValueError, match="on cuda the cache holds the model's dtype \\(bfloat16\\): use auto"):
        resolve_kv_cache_dtype("fp32", torch.bfloat16, cuda)
    with pytest.raises(ValueError, match="must be one of auto, fp32, bf16; got 'fp8'"):
        resolve_kv_cache_dtype("fp8", torch.float32, cpu)


@pytest.fixture(scope="module")
def default_fp32():
    """The shipped default model (trained: its greedy tokens are not near-ties) with an fp32 cache, torch path."""
    return load_engine(None, "cpu", max_batch_size=4, native=False)


def test_a_bf16_cache_halves_the_pool_and_keeps_the_greedy_tokens(default_fp32):
    engine = Engine(default_fp32.model, default_fp32.tokenizer, max_batch_size=4, native=False, kv_cache_dtype="bf16")
    assert engine.cache.k.dtype == engine.cache.v.dtype == torch.bfloat16
    assert engine.cache.num_blocks == default_fp32.cache.num_blocks  # the same pool, half the bytes
    assert 2 * engine.cache.k.nbytes == default_fp32.cache.k.nbytes
    assert engine.decode_path == "eager" and default_fp32.cache.k.dtype == torch.float32
    worst = assert_same_runs(engine, default_fp32, LENGTHS, tolerance=3e-2)
    assert worst > 1e-5  # it did round: an fp32 cache under the bf16 name would match to fp32 rounding


def test_every_path_reads_the_bf16_cache_alike(default_fp32):
    """The plain forward (module calls, the prompt chunks' cast on store and load) against the lean torch step
    (its own store and load; greedy requests also speculate through it), both over a bf16 cache: the same
    tokens, logprobs within 5e-3 (five times closer than either is to an fp32 cache's). A path that kept its
    keys in fp32, or read the bf16 bits wrongly, would move by far more."""
    model, tokenizer = default_fp32.model, default_fp32.tokenizer
    lean = Engine(model, tokenizer, max_batch_size=4, native=False, kv_cache_dtype="bf16")
    plain = Engine(model, tokenizer, max_batch_size=4, fast_decode=False, kv_cache_dtype="bf16")
    assert lean._decode_plan is not None and plain._decode_plan is None
    assert_same_runs(lean, plain, LENGTHS, tolerance=5e-3)


def test_prompt_logprobs_come_from_the_rounded_cache_and_scoring_does_not(default_fp32):
    """Echo (prompt logprobs through the engine's cache) moves with the cache's dtype; /v1/perplexity's scoring
    keeps a cache of its own in the model's dtype, so it matches the fp32 engine's echo."""
    engine = Engine(default_fp32.model, default_fp32.tokenizer, max_batch_size=1, native=False,
                    kv_cache_dtype="bf16")
    ids = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog, and then it runs away again.")
    params = SamplingParams(max_tokens=0, prompt_logprobs=True, logprobs=0)

    def echo(e: Engine) -> list[float]:
        return [t.logprob for t in list(e.generate(ids, params))[0].prompt_logprobs[1:]]

    fp32, bf16 = echo(default_fp32), echo(engine)
    scored = engine.score([ids])[0].logprobs[1:]
    assert max(abs(a - b) for a, b in zip(scored, fp32)) < 1e-5
    assert 1e-5 < max(abs(a - b) for a, b in zip(bf16, fp32)) < 3e-2


def test_the_server_loads_a_bf16_cache_and_says_so(caplog):
    settings = ServerSettings(kv_cache_dtype="bf16", max_batch_size=2)
    with caplog.at_level(logging.INFO, logger="kiln.server"):
        engine = load_configured_engine(settings)
    assert engine.cache.k.dtype == torch.bfloat16
    assert any("MiB of bfloat16" in r.getMessage() for r in caplog.records)
    out = list(engine.generate(engine.tokenizer.encode("Once upon"), SamplingParams(max_tokens=4, temperature=0)))
    assert sum(len(o.token_ids) for o in out) == 4
    with pytest.raises(ValueError, match="--kv-cache-dtype must be one of auto, fp32, bf16; got 'fp8'"):
        ServerSettings(kv_cache_dtype="fp8")

