"""The paged KV cache in the engine: block pool, prefix caching, chunked prefill, preemption.

The reference everywhere is the engine with one block per sequence (block_size =
max_seq_len, the unpaged slot layout) and no prefix caching, fed one request at a time.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from model.cli import load_engine
from model.engine import Engine, SamplingParams
from model.kv_cache import BlockPool, KVCache, block_hashes

pytestmark = pytest.mark.usefixtures("one_thread")

SYSTEM = "The quick brown fox jumps over the lazy dog. "
QUESTIONS = ["What is the sky?", "Why is grass green?", "def add(a, b):", "床前明月光", "To be, or not"]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def unpaged(path) -> Engine:
    engine = load_engine(str(path), "cpu", max_batch_size=1, enable_prefix_caching=False)
    config = engine.config
    return Engine(engine.model, engine.tokenizer, max_batch_size=1, block_size=config.max_seq_len,
                  num_blocks=2, enable_prefix_caching=False)


def run_alone(engine: Engine, ids: list[int], params: SamplingParams) -> list[int]:
    return [t for out in engine.generate(ids, params) for t in out.token_ids]


def run_all(engine: Engine, prompts: list[list[int]], params: list[SamplingParams], stagger: int = 2):
    """Add the requests a few steps apart (they join a running batch), run to the end."""
    requests = []
    for ids, p in zip(prompts, params):
        requests.append(engine.add_request(ids, p))
        for _ in range(stagger):
            engine.step()
            assert_block_tables_mirror_blocks(engine)
    while engine.has_work:
        engine.step()
        assert_block_tables_mirror_blocks(engine)
    return requests


def assert_block_tables_mirror_blocks(engine: Engine) -> None:
    """The engine's per-slot block tables (what decode steps read) hold each running request's blocks."""
    expected = np.zeros_like(engine._block_tables)  # NULL_BLOCK (0) wherever no request's block is
    for r in engine.running:
        expected[r.slot, : len(r.blocks)] = r.blocks
    assert (engine._block_tables == expected).all()


def assert_pool_empty(engine: Engine) -> None:
    pool = engine.pool
    assert pool.num_used == 0 and all(r == 0 for r in pool.ref), "a block is still referenced"
    assert pool.num_free == pool.num_blocks - 1
    assert engine.num_free_slots == engine.max_batch_size and not engine.has_work
    assert (engine._block_tables == 0).all(), "a released slot still has a block table"


@torch.no_grad()
def test_paged_prefix_cached_batch_equals_unpaged_alone(hf_dir):
    ref = unpaged(hf_dir)
    engine = load_engine(str(hf_dir), "cpu", max_batch_size=3, block_size=4)
    prompts = [engine.tokenizer.encode(SYSTEM + q) for q in QUESTIONS]
    lengths = [9, 4, 12, 7, 10]
    expected = [run_alone(ref, ids, greedy(n)) for ids, n in zip(prompts, lengths)]
    requests = run_all(engine, prompts, [greedy(n) for n in lengths])
    assert [r.output_ids for r in requests] == expected
    # every request after the first found the shared system prompt's full blocks
    shared = len(engine.tokenizer.encode(SYSTEM)) // 4 * 4
    assert all(r.num_cached_prompt >= shared - 4 for r in requests[1:]), [r.num_cached_prompt for r in requests]
    assert engine.pool.hit_tokens >= 4 * (shared - 4) > 0
    assert_pool_empty(engine)
    # the same batch again: now whole prompts (all but the last partial block) come from the cache
    again = run_all(engine, prompts, [greedy(n) for n in lengths], stagger=0)
    assert [r.output_ids for r in again] == expected
    assert all(r.num_cached_prompt == (len(r.prompt_ids) - 1) // 4 * 4 for r in again)
    assert_pool_empty(engine)


@torch.no_grad()
def test_sharing_a_block_never_changes_the_other_sequence(llama_dir):
    """Two identical prompts at once share blocks (refcount 2); both decode the same tokens."""
    ref = unpaged(llama_dir)
    engine = load_engine(str(llama_dir), "cpu", max_batch_size=2, block_size=4)
    ids = engine.tokenizer.encode(SYSTEM)
    first = engine.add_request(ids, greedy(20))
    engine.step()
    second = engine.add_request(ids, greedy(20))
    engine.step()
    shared = first.blocks[: len(ids) // 4 - (1 if len(ids) % 4 == 0 else 0)]
    assert second.blocks[: len(shared)] == shared and all(engine.pool.ref[b] == 2 for b in shared)
    while engine.has_work:
        engine.step()
    assert first.output_ids == second.output_ids == run_alone(ref, ids, greedy(20))
    assert_pool_empty(engine)


@torch.no_grad()
def test_chunked_prefill_equals_whole_prefill_tokens_and_prompt_logprobs(hf_dir):
    ref = unpaged(hf_dir)
    engine = load_engine(str(hf_dir), "cpu", max_batch_size=3, block_size=4, max_prefill_tokens=5)
    prompts = [engine.tokenizer.encode(SYSTEM + q) for q in QUESTIONS[:3]]
    params = greedy(6, logprobs=1, prompt_logprobs=True)
    expected = [list(ref.generate(ids, params)) for ids in prompts]
    # the first request decodes while the others are prefilled 5 tokens per step
    first = engine.add_request(prompts[0], params)
    outputs = {}
    steps_with_decode_and_prefill = 0
    while not first.output_ids:
        engine.step()
    rest = [engine.add_request(ids, params) for ids in prompts[1:]]
    while engine.has_work:
        before = {r: r.num_computed for r in rest}
        for out in engine.step():
            outputs.setdefault(out.request, []).append(out)
        grew = [r.num_computed - before[r] for r in rest if r.slot is not None and not r.output_ids]
        assert all(n <= 5 for n in grew)
        if grew and first.slot is not None:
            steps_with_decode_and_prefill += 1
    assert steps_with_decode_and_prefill >= 3  # the long prompts really were cut into chunks
    for request, want in zip(rest, expected[1:]):
        got = outputs[request]
        assert [t for o in got for t in o.token_ids] == [t for o in want for t in o.token_ids]
        ours, theirs = got[0].prompt_logprobs, want[0].prompt_logprobs
        assert [p.token_id for p in ours] == request.prompt_ids
        assert ours[0].logprob is None
        assert all(abs(a.logprob - b.logprob) < 1e-4 and a.top[0][0] == b.top[0][0]
                   for a, b in zip(ours[1:], theirs[1:]))
    assert_pool_empty(engine)


@torch.no_grad()
def test_prompt_logprobs_are_complete_when_the_prefix_is_cached(llama_dir):
    """echo needs every prompt position's hidden state: a prefix-cache hit must not skip them."""
    engine = load_engine(str(llama_dir), "cpu", max_batch_size=1, block_size=4)
    ids = engine.tokenizer.encode(SYSTEM)
    run_alone(engine, ids, greedy(2))  # caches the prompt's blocks
    outs = list(engine.generate(ids, SamplingParams(max_tokens=0, prompt_logprobs=True, logprobs=0)))
    scored = engine.score([ids])[0].logprobs
    got = outs[0].prompt_logprobs
    assert len(got) == len(ids) and all(abs(a.logprob - b) < 1e-5 for a, b in zip(got[1:], scored[1:]))


@torch.no_grad()
def test_preemption_under_a_tiny_pool_completes_every_request(hf_dir):
    ref = unpaged(hf_dir)
    max_seq_len = 40
    # 11 blocks of 4 = one 40-token sequence (+ the null block): four requests cannot all fit
    engine = load_engine(str(hf_dir), "cpu", max_batch_size=4, max_seq_len=max_seq_len, block_size=4,
                         num_blocks=11)
    prompts = [engine.tokenizer.encode(q) for q in QUESTIONS[:4]]
    lengths = [24, 20, 28, 18]
    params = [greedy(n, logprobs=0) for n in lengths]
    expected = [run_alone(ref, ids, p) for ids, p in zip(prompts, params)]
    requests = run_all(engine, prompts, params, stagger=1)
    assert engine.num_preemptions > 0 and any(r.num_preemptions for r in requests)
    assert [r.output_ids for r in requests] == expected
    assert all(r.finish_reason == "length" for r in requests)
    assert_pool_empty(engine)


@torch.no_grad()
def test_random_workload_with_aborts_returns_every_block(llama_dir):
    engine = load_engine(str(llama_dir), "cpu", max_batch_size=4, block_size=4, num_blocks=30,
                         max_prefill_tokens=8)
    rng = random.Random(0)
    words = engine.tokenizer.encode(SYSTEM + " ".join(QUESTIONS))
    live = []
    for step in range(150):
        if rng.random() < 0.3:
            ids = words[: rng.randint(1, 40)] if rng.random() < 0.5 else [rng.randrange(200) for _ in range(9)]
            live.append(engine.add_request(ids, SamplingParams(max_tokens=rng.randint(0, 20), temperature=0.8,
                                                               seed=step, ignore_eos=True)))
        if live and rng.random() < 0.1:
            engine.abort(live.pop(rng.randrange(len(live))))
        engine.step()
        used = sum(len(r.blocks) for r in engine.running)
        assert engine.pool.num_used <= used  # shared blocks count once
        live = [r for r in live if not r.finished]
    while engine.has_work:
        engine.step()
    assert_pool_empty(engine)
    assert engine.pool.hit_tokens > 0


def test_block_pool_refcounts_lru_eviction_and_errors():
    pool = BlockPool(5)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    assert (a, b, c) == (1, 2, 3) and pool.num_free == 1
    h = block_hashes(list(range(12)), 4)
    assert len(h) == 3 and h == block_hashes(list(range(14)), 4)  # partial blocks have no hash
    assert block_hashes(list(range(8)), 4, parent=h[0], start_block=1) == h[1:2]
    pool.register(a, h[0])
    pool.register(b, h[1])
    pool.register(c, h[0])  # the first writer of a hash keeps it
    pool.release([a, b, c])  # b then a become evictable (reverse order); c is plain free
    assert pool.num_free == 4 and pool.num_used == 0
    assert pool.lookup(h) == [a, b] and pool.ref[a] == pool.ref[b] == 1  # stops at the first miss
    pool.release([a, b])
    assert [pool.allocate() for _ in range(2)] == [3, 4]  # never-hashed blocks go first
    assert pool.allocate() == b  # then the least recently released cached block is evicted
    assert pool.lookup(h) == [a]  # b's hash is gone with it
    with pytest.raises(RuntimeError, match="out of blocks"):
        pool.allocate()
    with pytest.raises(ValueError, match="not allocated"):
        pool.release([a, a])


def test_pool_sizes_are_checked(llama_dir):
    engine = load_engine(str(llama_dir), "cpu", max_batch_size=1)
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        Engine(engine.model, engine.tokenizer, block_size=16, num_blocks=3)
    with pytest.raises(ValueError, match="at least 2 blocks"):
        BlockPool(1)
    cache = KVCache(engine.config, num_blocks=9, block_size=8)
    with pytest.raises(ValueError, match="do not fit"):
        cache.batch([[1]], [4], [5])  # positions 4..8 need a second block


def test_decode_batch_fields():
    """The decode-step builder (one token per row) addresses the right block, offset and mask."""
    from model.kv_cache import CacheBatch

    tables = [[7, 3, 9], [4], [5, 6]]
    batch = CacheBatch.build(tables, [9, 2, 4], [1, 1, 1], block_size=4, max_seq_len=16, device=torch.device("cpu"))
    assert batch.positions.tolist() == [[9], [2], [4]]
    assert batch.write_blocks.tolist() == [[9], [4], [6]] and batch.write_offsets.tolist() == [[1], [2], [0]]
    assert batch.block_table.tolist() == [[7, 3, 9], [4, 0, 0], [5, 6, 0]] and batch.lengths.tolist() == [10, 3, 5]
    assert batch.kv_len == 10 and batch.contiguous_from is None
    assert batch.mask.shape == (3, 1, 1, 10) and batch.mask.sum(-1).flatten().tolist() == [10, 3, 5]
    one = CacheBatch.build([[2, 3, 4]], [8], [1], block_size=4, max_seq_len=16, device=torch.device("cpu"))
    assert one.contiguous_from == 2 and one.mask is None and one.block_table.tolist() == [[2, 3, 4]]


def test_decode_batch_from_table_rows_equals_the_list_built_one(llama_dir):
    """KVCache.decode_batch (the engine's per-slot tables as array rows, wider than needed and padded
    with the null block) gives the fields the list-based builder gives; rows must cover their position."""
    config = load_engine(str(llama_dir), "cpu", max_batch_size=1).config
    cache = KVCache(config, num_blocks=12, block_size=4, max_seq_len=40)
    tables = [[7, 3, 9], [4], [5, 6]]
    rows = np.zeros((3, cache.max_blocks_per_seq), dtype=np.int64)
    for i, t in enumerate(tables):
        rows[i, : len(t)] = t
    for with_mask in (True, False):
        want = cache.batch(tables, [9, 2, 4], [1, 1, 1], with_mask=with_mask)
        got = cache.decode_batch(rows, [0, 1, 2], [9, 2, 4], with_mask=with_mask)
        for field in ("positions", "write_blocks", "write_offsets", "block_table", "lengths", "mask"):
            a, b = getattr(got, field), getattr(want, field)
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), field
        assert (got.kv_len, got.contiguous_from) == (want.kv_len, want.contiguous_from) == (10, None)
    assert cache.decode_batch(rows, [2], [7]).contiguous_from == 5  # one row, consecutive blocks 5, 6
    reordered = cache.decode_batch(rows, [2, 0], [4, 9])  # any rows of the table, in any order
    assert reordered.block_table.tolist() == [[5, 6, 0], [7, 3, 9]] and reordered.write_blocks.tolist() == [[6], [9]]
    with pytest.raises(ValueError, match="row 1's block table does not cover its new position 4"):
        cache.decode_batch(rows, [0, 1, 2], [9, 4, 4])  # table row 1 holds one block: position 4 needs a second
