"""The static-buffer decode step behind the CUDA graphs: buckets, padding rows, block tables.

On the CPU the step runs eagerly (capture=False) with the Triton decode kernel in the
interpreter: everything but the capture itself. On a GPU the captured graphs must give the
same greedy tokens as the eager engine.
"""

from __future__ import annotations

import pytest
import torch

from cache_helpers import Sequences
from model.checkpoint import build_model
from model.config import ModelConfig
from model.cuda_graphs import GraphedDecode, batch_buckets
from model.kv_cache import NULL_BLOCK, KVCache
from model.transformer import Transformer

pytest.importorskip("triton")


def tiny_model(backend: str, device: str = "cpu") -> Transformer:
    config = ModelConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96, max_seq_len=32)
    torch.manual_seed(0)
    weights = Transformer(config).state_dict()
    return build_model(config, weights, torch.device(device), torch.float32, attn_backend=backend)


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(300)[-2:] == [256, 300]


@torch.no_grad()
def test_static_step_with_padding_rows_equals_the_plain_decode():
    model = tiny_model("triton")
    cache = Sequences(KVCache(model.config, num_blocks=40, block_size=4, max_seq_len=32))
    g = torch.Generator().manual_seed(1)
    lengths = [9, 3, 14, 6]
    seqs = [cache.allocate() for _ in lengths]
    tokens = torch.randint(0, 300, (4, 15), generator=g)
    for turn in range(max(lengths)):  # grow the rows in turns: their blocks interleave in the pool
        live = [s for s in seqs if cache.lengths[s] < lengths[s]]
        batch = cache.batch(live, [1] * len(live))
        model(torch.stack([tokens[s, cache.lengths[s]: cache.lengths[s] + 1] for s in live]), kv_cache=cache.kv,
              batch=batch)
        cache.advance(live, [1] * len(live))
    assert any(b - a != 1 for t in cache.tables for a, b in zip(t, t[1:]))  # really paged
    k0, v0 = cache.kv.k.clone(), cache.kv.v.clone()
    graphed = GraphedDecode(model, cache.kv, max_batch_size=6, capture=False)
    assert [graphed.bucket(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, 6]
    real = [b for b in range(cache.kv.num_blocks) if b != NULL_BLOCK]
    # all four rows (bucket 4, no padding), then three (bucket 4: row 3 is padding now, and its
    # stale inputs from the first call must not write into sequence 3's blocks), then one
    for rows in (seqs, seqs[:3], seqs[1:2]):
        step = torch.stack([tokens[s, lengths[s]: lengths[s] + 1] for s in rows])  # (B, 1)
        batch = cache.batch(rows, [1] * len(rows))
        for buf, src in ((cache.kv.k, k0), (cache.kv.v, v0)):
            buf.copy_(src)
        want = model(step, kv_cache=cache.kv, batch=batch)[:, -1]
        k_want, v_want = cache.kv.k.clone(), cache.kv.v.clone()
        for buf, src in ((cache.kv.k, k0), (cache.kv.v, v0)):
            buf.copy_(src)
        got = graphed(step, batch)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cache.kv.k[:, real], k_want[:, real])  # padding wrote only the null block
        torch.testing.assert_close(cache.kv.v[:, real], v_want[:, real])


def test_needs_the_triton_backend():
    model = tiny_model("torch")
    with pytest.raises(ValueError, match="triton attention backend"):
        GraphedDecode(model, KVCache(model.config, num_blocks=9, block_size=4), 2, capture=False)


def _gpu_model(tokenizer, dtype: torch.dtype, **shape):
    """A seeded random model of ``shape`` on the GPU with the Triton backend (head dim in TRITON_HEAD_DIMS)."""
    config = ModelConfig(vocab_size=tokenizer.n_vocab, max_seq_len=64, **shape)
    torch.manual_seed(0)
    return build_model(config, Transformer(config).state_dict(), torch.device("cuda"), dtype, attn_backend="triton")


def _greedy(engine, max_tokens: int) -> list[list[int]]:
    """Three prompts decoded greedily together to the end: their output token ids."""
    from model.engine import SamplingParams

    prompts = [engine.tokenizer.encode(p) for p in ("The quick brown", "def add(a, b):", "To be")]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    requests = [engine.add_request(ids, params) for ids in prompts]
    while engine.has_work:
        engine.step()
    return [r.output_ids for r in requests]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@torch.no_grad()
def test_graphed_engine_equals_eager_engine_on_gpu(tokenizer_dir):
    from model.engine import Engine
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    # head dim 16: the Triton backend (and so the graphs) needs a head dim in TRITON_HEAD_DIMS
    model = _gpu_model(tokenizer, torch.float32, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96)
    # a fixed pool: sizing it from free memory depends on what else holds the GPU (parallel tests)
    eager = Engine(model, tokenizer, max_batch_size=4, cuda_graphs=False, num_blocks=64)
    graphed = Engine(model, tokenizer, max_batch_size=4, cuda_graphs=True, num_blocks=64)
    assert eager._graphs is None
    assert graphed._graphs is not None and graphed._graphs.enabled
    assert _greedy(graphed, 20) == _greedy(eager, 20)


@torch.no_grad()
def test_compiled_static_step_equals_the_eager_one():
    """compile=True: the step through torch.compile (fullgraph, one dynamic-shape graph, the Triton
    decode kernel an opaque custom op) gives the eager step's logits and cache writes."""
    model = tiny_model("triton")
    cache = Sequences(KVCache(model.config, num_blocks=40, block_size=4, max_seq_len=32))
    g = torch.Generator().manual_seed(2)
    lengths = [7, 12, 3]
    seqs = [cache.allocate() for _ in lengths]
    tokens = torch.randint(0, 300, (3, 13), generator=g)
    for turn in range(max(lengths)):
        live = [s for s in seqs if cache.lengths[s] < lengths[s]]
        batch = cache.batch(live, [1] * len(live))
        model(torch.stack([tokens[s, cache.lengths[s]: cache.lengths[s] + 1] for s in live]), kv_cache=cache.kv,
              batch=batch)
        cache.advance(live, [1] * len(live))
    torch._dynamo.reset()
    compiled = GraphedDecode(model, cache.kv, max_batch_size=4, capture=False, compile=True)
    assert compiled.compile_error is None and compiled.compile_seconds > 0
    eager = GraphedDecode(model, cache.kv, max_batch_size=4, capture=False)
    k0, v0 = cache.kv.k.clone(), cache.kv.v.clone()
    for rows in (seqs, seqs[:1], seqs[1:]):  # buckets 4 (one padding row), 1 and 2
        step = torch.stack([tokens[s, lengths[s]: lengths[s] + 1] for s in rows])
        batch = cache.batch(rows, [1] * len(rows))
        results = []
        for graphed in (eager, compiled):
            cache.kv.k.copy_(k0)
            cache.kv.v.copy_(v0)
            logits = graphed(step, batch)
            results.append((logits, cache.kv.k.clone(), cache.kv.v.clone()))
        (want, k_want, v_want), (got, k_got, v_got) = results
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(k_got, k_want)
        torch.testing.assert_close(v_got, v_want)
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs a GPU of compute capability 9.0 or later")
@torch.no_grad()
def test_graphed_gemv_steps_with_programmatic_dependent_launch_equal_those_without_on_gpu(tokenizer_dir):
    """kernels._utils.PDL: the fused-gemv decode step's products launched with programmatic dependent launch
    (each may start before the kernel ahead of it ends, and waits for its outputs) inside CUDA graphs give the
    same greedy tokens as the same step launched plainly."""
    from kernels import _utils
    from model.engine import Engine
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    model = _gpu_model(tokenizer, torch.bfloat16, n_layer=3, n_head=4, n_kv_head=2, d_model=256, d_ff=512)
    model.fused_gemv = True
    outputs = {}
    try:
        for pdl in (False, True):
            _utils.set_pdl(pdl)
            engine = Engine(model, tokenizer, max_batch_size=4, cuda_graphs=True, num_blocks=64)
            assert engine._graphs is not None and engine._graphs.enabled
            outputs[pdl] = _greedy(engine, 24)
    finally:
        _utils.set_pdl(False)
    assert all(len(ids) == 24 for ids in outputs[True])
    assert outputs[True] == outputs[False]
