"""Prompt-lookup speculation (model/speculative.py, Engine(speculative_tokens=)): the drafts, and greedy
outputs with it exactly as without it (tokens, text, finish reasons; logprobs within 1e-4), in fewer steps."""

from __future__ import annotations

import random

import pytest

from model.cli import load_engine
from model.engine import Engine, SamplingParams
from model.speculative import DEFAULT_SPECULATIVE_TOKENS, PromptLookup

from test_native_decode import native_module  # noqa: F401 -- the fixture


def propose(seq: list[int], k: int, lookup: PromptLookup | None = None) -> list[int]:
    lookup = lookup or PromptLookup()
    return lookup.propose(lambda lo, hi: seq[lo:hi], len(seq), k)


def brute_force(seq: list[int], k: int, min_n: int = 2, max_n: int = 4) -> list[int]:
    """The latest earlier occurrence of the longest suffix n-gram (max_n down to min_n); what follows it."""
    for n in range(max_n, min_n - 1, -1):
        if len(seq) < n + 1:
            continue
        for start in range(len(seq) - n - 1, -1, -1):
            if seq[start: start + n] == seq[-n:]:
                return seq[start + n: min(start + n + k, len(seq))]
    return []


def test_lookup_proposes_what_followed_the_latest_match():
    assert propose([1, 2, 3, 4, 9, 1, 2, 3], 3) == [4, 9, 1]
    assert propose([1, 2, 3, 4, 9, 1, 2, 3], 1) == [4]
    assert propose([7, 2, 3, 5, 8, 2, 3, 6, 1, 2, 3], 2) == [6, 1]  # the latest of two matches
    # the longest suffix n-gram wins over a later, shorter one
    assert propose([5, 1, 2, 3, 7, 8, 2, 3, 6, 5, 1, 2, 3], 2) == [7, 8]
    assert propose([1, 2, 3, 1, 2], 5) == [3, 1, 2]  # stops at the end of the sequence
    assert propose([1, 2, 3, 4, 5, 6], 3) == []  # no earlier match
    assert propose([1, 2, 1], 3) == []  # 1-grams are not used (min_n 2)
    assert propose([4, 4, 4], 3) == [4]
    assert propose([1, 2, 3, 1, 2], 0) == []
    with pytest.raises(ValueError, match="min_n"):
        PromptLookup(min_n=3, max_n=2)


def test_lookup_extended_step_by_step_equals_a_fresh_search():
    rng = random.Random(0)
    for _ in range(20):
        seq = [rng.randrange(4) for _ in range(rng.randrange(1, 60))]
        lookup = PromptLookup()
        for length in range(1, len(seq) + 1):
            k = rng.randrange(1, 5)
            assert propose(seq[:length], k, lookup) == brute_force(seq[:length], k), (seq[:length], k)


REPEAT = "the cat the cat the cat"  # 10 tokens with the tests' tokenizer


def run(engine: Engine, jobs: list[tuple[str, SamplingParams]], stagger: bool = True):
    """Submit the jobs (the second half two steps later when `stagger`), step to the end; per job its
    tokens, text, logprobs and finish reason, and the number of steps taken."""
    requests, pending = [], list(jobs)
    first = pending[: len(pending) // 2] if stagger else pending
    pending = pending[len(first):]
    for prompt, params in first:
        requests.append(engine.add_request(engine.tokenizer.encode(prompt), params))
    results: dict[int, dict] = {}
    steps = 0
    while engine.has_work or pending:
        if steps == 2:
            for prompt, params in pending:
                requests.append(engine.add_request(engine.tokenizer.encode(prompt), params))
            pending = []
        outputs = engine.step()
        for r in engine.running:  # blocks for the known tokens, none left over from rejected drafts
            assert len(r.blocks) <= engine.cache.blocks_needed(r.num_tokens), (len(r.blocks), r.num_tokens)
        for out in outputs:
            res = results.setdefault(out.request.request_id, {"ids": [], "text": "", "lps": [], "finish": None})
            res["ids"] += out.token_ids
            res["text"] += out.text
            res["lps"] += [(lp.token_id, lp.logprob, [t for t, _ in lp.top]) for lp in out.logprobs]
            res["finish"] = out.finish_reason
        steps += 1
        assert steps < 2000
    pool = engine.pool
    assert pool.num_free == pool.num_blocks - 1 and engine.num_free_slots == engine.max_batch_size  # no leak
    return [results[r.request_id] for r in requests], steps


def assert_same(got: list[dict], want: list[dict]) -> None:
    for g, w in zip(got, want):
        assert g["ids"] == w["ids"] and g["text"] == w["text"] and g["finish"] == w["finish"]
        assert [(t, top) for t, _, top in g["lps"]] == [(t, top) for t, _, top in w["lps"]]
        diffs = [abs(a - b) for (_, a, _), (_, b, _) in zip(g["lps"], w["lps"])]
        assert max(diffs, default=0.0) < 1e-4, f"max logprob difference {max(diffs):.2e}"


def engines(model_dir, **options) -> tuple[Engine, Engine]:
    spec = load_engine(str(model_dir), "cpu", **options)
    plain = Engine(spec.model, spec.tokenizer, max_batch_size=spec.max_batch_size, max_seq_len=spec.max_seq_len,
                   block_size=spec.block_size, num_blocks=spec.pool.num_blocks, speculative_tokens=0)
    assert spec.speculating and spec.speculative_tokens == options.get("speculative_tokens",
                                                                          DEFAULT_SPECULATIVE_TOKENS)
    assert not plain.speculating
    return spec, plain


def test_greedy_batch_one_gives_the_same_tokens_in_fewer_steps(hf_dir):
    spec, plain = engines(hf_dir, max_batch_size=1)
    jobs = [(REPEAT, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=2))]
    got, spec_steps = run(spec, jobs)
    want, plain_steps = run(plain, jobs)
    assert_same(got, want)
    assert spec.num_draft_tokens > 0 and spec.num_accepted_tokens > 0, "the test prompt drafted nothing"
    assert spec_steps == plain_steps - spec.num_accepted_tokens  # each accepted draft saved a step
    assert plain.num_draft_tokens == 0


@pytest.mark.parametrize("k", [1, 3, 6])
def test_mixed_batches_with_stops_lengths_and_sampled_neighbours(llama_dir, k):
    """Greedy sequences beside seeded sampled ones, penalties, min_tokens, logit bias, stop strings and
    EOS, sequences joining mid-run and a context that ends generation: the same outputs as without."""
    spec, plain = engines(llama_dir, max_batch_size=4, speculative_tokens=k)
    probe = list(plain.generate(plain.tokenizer.encode(REPEAT), SamplingParams(max_tokens=30, temperature=0.0)))
    text = "".join(o.text for o in probe)
    frequent = max(set(t for o in probe for t in o.token_ids), key=[t for o in probe for t in o.token_ids].count)
    stop = text[len(text) // 2: len(text) // 2 + 3] if len(text) > 6 else "zz"
    jobs = [
        (REPEAT, SamplingParams(max_tokens=30, temperature=0.0, logprobs=3)),
        ("ab ab ab ab", SamplingParams(max_tokens=25, temperature=0.0, stop=(stop,), ignore_eos=True)),
        (REPEAT, SamplingParams(max_tokens=30, temperature=0.9, seed=7, ignore_eos=True)),
        ("a b a b a b a b", SamplingParams(max_tokens=20, temperature=0.0, min_tokens=5, ignore_eos=True)),
        # its most frequent id may not come before 8 ids are out, then it stops the sequence
        (REPEAT, SamplingParams(max_tokens=24, temperature=0.0, min_tokens=8, stop_token_ids=(frequent,))),
        (REPEAT, SamplingParams(max_tokens=20, temperature=0.0, frequency_penalty=0.5, ignore_eos=True)),
        (REPEAT, SamplingParams(max_tokens=20, temperature=0.0, logit_bias=((5, 3.0),), ignore_eos=True)),
        ("abcabcabc", SamplingParams(max_tokens=56, temperature=0.0, ignore_eos=True)),  # to the context
    ]
    mixed = []  # steps that verified drafts beside sequences without any
    real = spec._decode_speculative

    def watch(requests, drafts):
        mixed.append(len(drafts) < len(requests))
        return real(requests, drafts)

    spec._decode_speculative = watch
    got, _ = run(spec, jobs)
    want, _ = run(plain, jobs)
    assert_same(got, want)
    assert spec.num_accepted_tokens > 0
    assert k == 1 or any(mixed)
    assert got[4]["finish"] == "stop" and len(got[4]["ids"]) > 8 and got[4]["ids"][-1] == frequent
    assert got[-1]["finish"] == "length" and len(spec.tokenizer.encode(jobs[-1][0])) + len(got[-1]["ids"]) \
        == spec.max_seq_len + 1


def test_native_step_verifies_drafts_too(hf_dir, native_module):
    spec, plain = engines(hf_dir, max_batch_size=2)
    for engine in (spec, plain):
        engine._decode_plan.enable_native(native_module)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, logprobs=1)
    jobs = [(REPEAT, params), ("ab ab ab ab", params)]
    got, _ = run(spec, jobs)
    want, _ = run(plain, jobs)
    assert_same(got, want)
    assert spec.native_decode and spec.num_accepted_tokens > 0


def test_stops_inside_a_step_count_and_cache_like_single_steps(llama_dir):
    """A sequence that stops partway through a step's drafts: the drafts after the stop are not counted as
    accepted (steps saved == accepted drafts), and the blocks the step completed reach the prefix cache, as
    single steps would have put them there (a follow-up request finds as many cached tokens)."""
    # blocks of one token: every step completes a block, so a stop on any step's first token shows
    spec, plain = engines(llama_dir, max_batch_size=1, block_size=1)
    checked = 0
    for prompt in ("the cat the cat the cat", "ab ab ab ab", "abcabcabc", "a b a b a b a b"):
        ids = spec.tokenizer.encode(prompt)
        probe = [t for o in plain.generate(ids, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
                 for t in o.token_ids]
        # stop ids first seen in the output, and prompt ids the output repeats (drafts can hold those)
        for stop in dict.fromkeys(probe[1:12] + [t for t in ids if t in probe]):
            found = []
            for engine in (spec, plain):
                engine.pool.__init__(engine.pool.num_blocks, True)  # an empty prefix cache
                accepted = engine.num_accepted_tokens
                params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop_token_ids=(stop,))
                got, steps = run(engine, [(prompt, params)])
                follow = engine.add_request(ids + got[0]["ids"], SamplingParams(max_tokens=1, temperature=0.0))
                while engine.has_work:
                    engine.step()
                found.append((got[0]["ids"], steps + engine.num_accepted_tokens - accepted, follow.num_cached_prompt))
            assert found[0] == found[1], (prompt, stop, found)
            checked += 1
    assert checked >= 8 and spec.num_accepted_tokens > 0


@pytest.mark.parametrize("drafts", ["wrong", "right"])
def test_forced_drafts_with_a_stop_inside_a_step(llama_dir, monkeypatch, drafts):
    """Drafts forced wrong (all rejected) or right (the greedy continuation itself), with a stop id inside
    a step: the same outputs as without; steps saved == drafts counted as accepted (none past the stop);
    the rejected rows' blocks given back at once (`run` checks); and the blocks a step completed, even one
    whose first token stops the request, in the prefix cache (a follow-up finds every computed position)."""
    spec, plain = engines(llama_dir, max_batch_size=1, block_size=1)
    ids = spec.tokenizer.encode(REPEAT)
    probe = [t for o in plain.generate(ids, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
             for t in o.token_ids]
    never = next(t for t in range(spec.vocab_limit) if t not in probe and t not in spec.eos_ids)

    def propose(self, tokens, length, k):
        done = length - len(ids)  # output ids so far
        return [never] * k if drafts == "wrong" else probe[done: done + k]

    monkeypatch.setattr(PromptLookup, "propose", propose)
    firsts = [i for i, t in enumerate(probe) if i >= 5 and t not in probe[:i]]  # first seen at index >= 5
    assert len(firsts) >= 3
    for index in firsts[:4]:
        found = []
        for engine in (spec, plain):
            accepted = engine.num_accepted_tokens
            params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=(probe[index],))
            got, steps = run(engine, [(REPEAT, params)])
            follow = engine.add_request(ids + got[0]["ids"], SamplingParams(max_tokens=1, temperature=0.0))
            while engine.has_work:
                engine.step()
            found.append((got[0]["ids"], steps + engine.num_accepted_tokens - accepted, follow.num_cached_prompt))
        assert found[0] == found[1] and found[0][0] == probe[: index + 1], (index, found)
        assert found[0][2] == len(ids) + index  # every computed position was cached
    assert spec.num_draft_tokens > 0 and (spec.num_accepted_tokens == 0) == (drafts == "wrong")


def test_tiny_pool_preemption_and_prefix_cache_hits(llama_dir):
    """Drafts only take free blocks; preempted sequences recompute; a repeated prompt hits the prefix cache."""
    spec, plain = engines(llama_dir, max_batch_size=3, block_size=4, num_blocks=20)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    jobs = [(REPEAT, params), (REPEAT, params), ("a b a b a b a b", params), (REPEAT, params)]
    got, _ = run(spec, jobs, stagger=False)
    want, _ = run(plain, jobs, stagger=False)
    assert_same(got, want)
    assert spec.num_preemptions > 0 and spec.num_accepted_tokens > 0
    assert spec.pool.hit_tokens > 0


def test_no_drafts_without_greedy_or_with_async_scheduling(llama_dir):
    spec, _ = engines(llama_dir, max_batch_size=2)
    sampled = SamplingParams(max_tokens=20, temperature=0.8, seed=1, ignore_eos=True)
    run(spec, [(REPEAT, sampled)])
    assert spec.num_draft_tokens == 0
    spec.async_scheduling = True
    assert not spec.speculating
    run(spec, [(REPEAT, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))])
    assert spec.num_draft_tokens == 0


def test_speculative_tokens_is_checked(llama_dir):
    with pytest.raises(ValueError, match=r"speculative_tokens must be in \[0, 15\]"):
        load_engine(str(llama_dir), "cpu", speculative_tokens=16)
    with pytest.raises(ValueError, match="speculative_tokens"):
        load_engine(str(llama_dir), "cpu", speculative_tokens=-1)
