"""Async scheduling: the engine queues step k+1 before it reads step k's sampled ids back.

On the CPU the copies are synchronous, so what is tested here is the bookkeeping: every
request must get exactly the tokens, text, logprobs and finish reason the synchronous engine
gives, through stops found one step late, preemption, aborts and prefix caching, and every
block and slot must come back.
"""

from __future__ import annotations

import random

import pytest
import torch

from model.cli import load_engine
from model.engine import PENDING, Engine, SamplingParams

from test_paged_engine import QUESTIONS, SYSTEM, assert_pool_empty

pytestmark = pytest.mark.usefixtures("one_thread")


def twin(engine: Engine, **kw) -> Engine:
    """An engine over the same weights, with async scheduling."""
    options = dict(max_batch_size=engine.max_batch_size, block_size=engine.block_size,
                   num_blocks=engine.cache.num_blocks, max_prefill_tokens=engine.max_prefill_tokens)
    options.update(kw)
    return Engine(engine.model, engine.tokenizer, max_seq_len=engine.max_seq_len, async_scheduling=True, **options)


def run(engine: Engine, prompts, params, stagger: int = 1, abort_at: dict[int, int] | None = None):
    """Add the requests `stagger` steps apart and run to the end; abort_at {request index: step}.
    Returns, per request, everything its outputs carried."""
    requests, seen = [], {}
    step = 0

    def collect(outputs):
        for out in outputs:
            rec = seen.setdefault(out.request.request_id, {"ids": [], "text": "", "lps": [], "finish": None,
                                                           "prompt_lps": None})
            assert rec["finish"] is None, "an output after the request finished"
            rec["ids"] += out.token_ids
            rec["text"] += out.text
            rec["lps"] += [(lp.token_id, round(lp.logprob, 4), [(t, round(v, 4)) for t, v in lp.top or []])
                           for lp in out.logprobs]
            rec["finish"] = out.finish_reason
            if out.prompt_logprobs is not None:
                rec["prompt_lps"] = [(lp.token_id, lp.logprob and round(lp.logprob, 4)) for lp in out.prompt_logprobs]

    pending = list(zip(prompts, params))
    while pending or engine.has_work:
        if pending and step % stagger == 0:
            requests.append(engine.add_request(*pending.pop(0)))
        for i, at in (abort_at or {}).items():
            if at == step and i < len(requests):
                engine.abort(requests[i])
        collect(engine.step())
        step += 1
        assert step < 2000
    for r in requests:
        assert PENDING not in r.output_ids and r.num_pending == 0 and r.finished
    return requests, [seen.get(r.request_id) for r in requests]


def same_outputs(got, expected, what: str = "outputs") -> None:
    """Ids, text and finish exactly; logprobs to 1e-3: a batch of another shape may round a
    matmul differently on the CPU, moving a logprob by one unit in its 4th decimal."""
    assert len(got) == len(expected), what
    for i, (g, e) in enumerate(zip(got, expected)):
        if g is None or e is None:
            assert g is e, f"{what}: request {i}"
            continue
        exact = ("ids", "text", "finish")
        assert {k: g[k] for k in exact} == {k: e[k] for k in exact}, f"{what}: request {i}"
        for key in ("lps", "prompt_lps"):
            assert (g[key] is None) == (e[key] is None), f"{what}: request {i} {key}"
            (g_ids, g_lps), (e_ids, e_lps) = flat(g[key] or []), flat(e[key] or [])
            assert g_ids == e_ids, f"{what}: request {i} {key} ids"
            assert g_lps == pytest.approx(e_lps, abs=1e-3, nan_ok=True), f"{what}: request {i} {key}"


def flat(entries) -> tuple[list[int], list[float]]:
    """(ids, logprobs) of logprob entries (id, logprob or None, [(top id, logprob), ...] if any), in order."""
    ids, values = [], []
    for entry in entries:
        pairs = [(entry[0], float("nan") if entry[1] is None else entry[1]), *(entry[2] if len(entry) > 2 else [])]
        ids += [t for t, _ in pairs]
        values += [v for _, v in pairs]
    return ids, values


def mixed_workload(engine: Engine, ref_text: str, ref_ids: list[int]):
    tok = engine.tokenizer
    prompts = [tok.encode(SYSTEM + q) for q in QUESTIONS] + [tok.encode(SYSTEM), tok.encode("Hello")]
    stop_text = ref_text[len(ref_text) // 2: len(ref_text) // 2 + 3]  # hit halfway through the greedy text
    params = [
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=(stop_text,)),
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop_token_ids=(ref_ids[5],)),
        SamplingParams(max_tokens=20, temperature=0.9, top_k=40, top_p=0.9, seed=7, logprobs=3),
        SamplingParams(max_tokens=20, temperature=0.7, seed=3, presence_penalty=0.5, frequency_penalty=0.4),
        SamplingParams(max_tokens=12, temperature=0.0, min_tokens=6, stop_token_ids=(ref_ids[1],),
                       prompt_logprobs=True, logprobs=1),
        SamplingParams(max_tokens=0, prompt_logprobs=True),
        SamplingParams(max_tokens=18, temperature=1.0, seed=11),
    ]
    return prompts, params


@torch.no_grad()
def test_async_equals_sync_on_a_mixed_workload(hf_dir):
    sync = load_engine(str(hf_dir), "cpu", max_batch_size=4, block_size=4, max_prefill_tokens=16)
    assert not sync.async_scheduling  # the CPU default
    prompt = sync.tokenizer.encode(SYSTEM + QUESTIONS[0])
    ref = list(sync.generate(prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)))
    ref_text, ref_ids = "".join(o.text for o in ref), [t for o in ref for t in o.token_ids]
    prompts, params = mixed_workload(sync, ref_text, ref_ids)

    _, expected = run(sync, prompts, params)
    engine = twin(sync)
    requests, got = run(engine, prompts, params)
    same_outputs(got, expected)
    # the workload did what it is meant to: stops found mid-stream, a length finish, an empty one
    assert [e["finish"] for e in expected[:2]] == ["stop", "stop"] and len(expected[0]["ids"]) < 24
    assert len(expected[4]["ids"]) >= 6
    assert expected[5]["ids"] == [] and expected[5]["prompt_lps"]
    assert_pool_empty(engine)
    assert engine.pool.hit_tokens > 0  # the shared system prompt came from the prefix cache


@torch.no_grad()
def test_ids_are_read_back_one_step_late(llama_dir):
    engine = load_engine(str(llama_dir), "cpu", async_scheduling=True)
    decodes = []
    decode = engine._decode
    engine._decode = lambda requests: decodes.append(len(requests)) or decode(requests)
    request = engine.add_request([1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert engine.step() == []  # prefilled and sampled, not read back
    assert request.output_ids == [PENDING] and request.num_pending == 1
    first = engine.step()  # queues the first decode, then reads the first id
    assert [o.token_ids for o in first] == [request.output_ids[:1]]
    assert request.output_ids[1] == PENDING and request.num_computed == 4
    outs = []
    while engine.has_work:
        outs += engine.step()
    assert [o.finish_reason for o in outs] == [None, "length"]
    assert len(request.output_ids) == 3 and PENDING not in request.output_ids
    # no decode past the last id was queued: max_tokens is known when a step is planned
    assert decodes == [1, 1]
    assert_pool_empty(engine)


@torch.no_grad()
def test_abort_while_an_id_is_in_flight(llama_dir):
    engine = load_engine(str(llama_dir), "cpu", max_batch_size=2, async_scheduling=True)
    a = engine.add_request([5, 6, 7], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    b = engine.add_request([8, 9], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    engine.step()
    engine.step()
    assert a.num_pending == 1
    engine.abort(a)
    assert a.finish_reason == "abort" and PENDING not in a.output_ids and a.num_pending == 0
    outs = []
    while engine.has_work:
        outs += engine.step()
    assert all(o.request is b for o in outs) and b.finish_reason == "length" and len(b.output_ids) == 10
    assert_pool_empty(engine)


@torch.no_grad()
def test_preemption_with_async_scheduling(hf_dir):
    engine = load_engine(str(hf_dir), "cpu", max_batch_size=4, max_seq_len=40, block_size=4, num_blocks=11)
    prompts = [engine.tokenizer.encode(q) for q in QUESTIONS[:4]]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0) for n in (24, 20, 28, 18)]
    _, expected = run(engine, prompts, params)
    engine = twin(engine)
    requests, got = run(engine, prompts, params)
    assert engine.num_preemptions > 0
    same_outputs(got, expected)
    assert_pool_empty(engine)


@torch.no_grad()
def test_random_workload_with_aborts(llama_dir):
    sync = load_engine(str(llama_dir), "cpu", max_batch_size=4, block_size=4, num_blocks=30, max_prefill_tokens=8)
    rng = random.Random(1)
    words = sync.tokenizer.encode(SYSTEM + " ".join(QUESTIONS))
    prompts, params, aborts = [], [], {}
    for i in range(24):
        prompts.append(words[: rng.randint(1, 40)] if rng.random() < 0.5 else [rng.randrange(200) for _ in range(9)])
        params.append(SamplingParams(max_tokens=rng.randint(0, 20), temperature=0.8, seed=i,
                                     stop_token_ids=(rng.randrange(200),), ignore_eos=rng.random() < 0.5))
        if rng.random() < 0.2:
            aborts[i] = 2 * i + rng.randint(0, 6)
    _, expected = run(sync, prompts, params, stagger=2, abort_at=aborts)
    engine = twin(sync)
    _, got = run(engine, prompts, params, stagger=2, abort_at=aborts)
    # an abort lands at the same step in both, but async has read one id fewer by then
    for i, (e, g) in enumerate(zip(expected, got)):
        if i in aborts:
            assert e is None or g is None or e["ids"][: len(g["ids"])] == g["ids"]
        else:
            same_outputs([g], [e], f"request {i}")
    assert_pool_empty(engine)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: there the copies really are asynchronous")
@torch.no_grad()
def test_async_equals_sync_on_gpu(llama_dir):
    sync = load_engine(str(llama_dir), "cuda", "fp32", max_batch_size=4, block_size=4, max_prefill_tokens=16,
                       async_scheduling=False, num_blocks=256)  # fixed: free memory varies with parallel tests
    prompt = sync.tokenizer.encode(SYSTEM + QUESTIONS[0])
    ref = list(sync.generate(prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)))
    prompts, params = mixed_workload(sync, "".join(o.text for o in ref), [t for o in ref for t in o.token_ids])
    _, expected = run(sync, prompts, params)
    engine = twin(sync)
    assert engine.async_scheduling
    _, got = run(engine, prompts, params)
    # batch shapes differ by the dropped rows, so GPU kernels may round logprobs differently
    assert [(g["ids"], g["text"], g["finish"]) for g in got] == [(e["ids"], e["text"], e["finish"]) for e in expected]
    assert_pool_empty(engine)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: CPU tensors never sync")
@torch.no_grad()
def test_decode_steps_never_sync_on_gpu(tokenizer_dir):
    """Once every request is past its prefill, a step queues its graph replay, sampling (greedy,
    seeded top-k/top-p, penalties, min_tokens, logprobs) and copies without waiting for the GPU:
    torch's sync debug mode turns any hidden host<->device sync (a pageable copy, `.item()`) into
    an error. (Reading a step's ids back waits on a CUDA event one step later, by design.)"""
    from model.checkpoint import build_model
    from model.config import ModelConfig
    from model.tokenizer import load_tokenizer
    from model.transformer import Transformer

    tokenizer = load_tokenizer(tokenizer_dir)
    # head dim 16: the Triton backend, so the decode step is a CUDA graph replay
    config = ModelConfig(vocab_size=tokenizer.n_vocab, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96,
                         max_seq_len=128)
    torch.manual_seed(0)
    model = build_model(config, Transformer(config).state_dict(), torch.device("cuda"), torch.bfloat16)
    engine = Engine(model, tokenizer, max_batch_size=8, block_size=4, num_blocks=256)
    assert engine.async_scheduling and engine.uses_cuda_graphs
    prompts = [engine.tokenizer.encode(SYSTEM + q) for q in QUESTIONS] + [engine.tokenizer.encode("Hello")]
    params = [
        SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=0.9, top_k=40, top_p=0.9, seed=7, logprobs=3),
        SamplingParams(max_tokens=40, temperature=0.7, seed=3, presence_penalty=0.5, frequency_penalty=0.4),
        SamplingParams(max_tokens=40, temperature=0.0, min_tokens=30),
        SamplingParams(max_tokens=40, temperature=1.0),
    ]
    requests = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    while any(len(r.output_ids) < 3 for r in requests):  # prefills (echo-free) and a few decode steps
        engine.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    while engine.has_work:
        engine.step()
    assert all(len(r.output_ids) == 40 or r.finish_reason == "stop" for r in requests)
    assert_pool_empty(engine)
