"""The engine: greedy generation vs HF generate, perplexity vs HF loss, batching, stops, windows."""

from __future__ import annotations

import math

import pytest
import torch

from model.cli import load_engine
from model.engine import Engine, SamplingParams

PROMPTS = ["The quick brown", "def add(a, b):", "To be, or not", "床前明月光"]


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()


def greedy(n, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def run_alone(engine, ids, params):
    return [t for out in engine.generate(ids, params) for t in out.token_ids]


@torch.no_grad()
def test_greedy_generation_equals_hf_generate(hf_dir):
    engine = load_engine(str(hf_dir), "cpu")
    ref = hf_model(hf_dir)
    for prompt in PROMPTS:
        ids = engine.tokenizer.encode(prompt)
        ours = run_alone(engine, ids, greedy(20))
        theirs = ref.generate(torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                              pad_token_id=0)[0, len(ids):].tolist()
        assert ours == theirs, prompt


@torch.no_grad()
def test_perplexity_equals_exp_hf_loss(hf_dir):
    engine = load_engine(str(hf_dir), "cpu")
    ref = hf_model(hf_dir)
    text = "To be, or not to be, that is the question. SELECT name FROM users;"
    ids = engine.encode_for_scoring(text)
    result = engine.score([ids])[0]
    loss = ref(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert result.num_scored == len(ids) - 1
    assert math.isclose(result.perplexity, math.exp(loss), rel_tol=1e-5), (result.perplexity, math.exp(loss))


@torch.no_grad()
def test_sliding_window_scores_every_token_exactly_once(llama_dir):
    engine = load_engine(str(llama_dir), "cpu", max_seq_len=16)
    model = engine.model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, engine.vocab_limit, (40,), generator=g).tolist()
    for stride in (16, 8, 5):
        result = engine.score([ids], stride=stride)[0]
        assert result.logprobs[0] is None and result.num_scored == 39
        # recompute each token's logprob with its window's context by hand
        expected = [None] * 40
        prev_end, end = 1, 16
        while True:
            begin = max(0, end - 16)
            lp = model(torch.tensor([ids[begin:end]]))[0].log_softmax(-1)
            for p in range(prev_end, end):
                expected[p] = lp[p - begin - 1, ids[p]].item()
            if end == 40:
                break
            prev_end, end = end, min(end + min(stride, 15), 40)
        assert None not in expected[1:]
        got = result.logprobs
        assert all(abs(a - b) < 1e-4 for a, b in zip(got[1:], expected[1:])), stride


def test_scoring_batches_are_smaller_on_the_cpu(llama_dir):
    """Scoring forwards hold at most 2048 padded tokens on a CPU (4096 on CUDA), and a prefill chunk's
    (512) when advanced with that budget, as the server does while sequences decode; the scores do not
    depend on the forward size."""
    engine = load_engine(str(llama_dir), "cpu")
    assert engine.score_batch_tokens == 2048
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, engine.vocab_limit, (n,), generator=g).tolist() for n in [64] * 70 + [9, 33]]
    task = engine.score_task(seqs)
    forwards = []
    hook = engine.prefill_model.register_forward_hook(lambda m, args, out: forwards.append(args[0].numel()))
    while not task.done:
        task.advance()
    assert len(forwards) > 2 and max(forwards) <= 2048 and sum(forwards) >= 64 * 70
    forwards.clear()
    narrow = engine.score_task(seqs)
    while not narrow.done:  # as the server advances it while sequences decode
        narrow.advance(engine.max_prefill_tokens)
    hook.remove()
    assert max(forwards) <= engine.max_prefill_tokens == 512 and len(forwards) >= 4 * 70 * 64 // 2048
    wide = engine.score(seqs, batch_tokens=4096)
    for a, b, c in zip(task.results, wide, narrow.results):
        assert all(x is None and y is None or abs(x - y) < 1e-4 for x, y in zip(a.logprobs, b.logprobs))
        assert all(x is None and y is None or abs(x - y) < 1e-4 for x, y in zip(a.logprobs, c.logprobs))


def test_windows_longer_than_the_budget_are_scored_in_chunks(llama_dir):
    """While sequences decode, a window longer than a forward may take runs in chunks of the budget through
    the task's own KV cache (no forward over max_tokens ids), with the scores of whole-window forwards:
    texts past the context (sliding windows, strides), short ones beside them, odd budgets."""
    engine = load_engine(str(llama_dir), "cpu")
    C = engine.max_seq_len  # 64
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, engine.vocab_limit, (n,), generator=g).tolist() for n in (150, 64, 7, 40, 1, 90)]
    forwards = []
    hook = engine.prefill_model.register_forward_hook(lambda m, args, out: forwards.append(args[0].shape))
    for stride, budget in ((None, 16), (C // 4, 13), (C, 32), (None, 1)):
        want = engine.score(seqs, stride=stride)
        forwards.clear()
        task = engine.score_task(seqs, stride=stride)
        calls = 0
        while not task.done:
            task.advance(budget)
            calls += 1
        assert max(shape.numel() for shape in forwards) <= budget, (budget, forwards)
        assert task.progress[0] == task.progress[1] and calls >= sum(len(ids) for ids in seqs) // C
        for a, b in zip(task.results, want):
            assert a.logprobs[0] is None and all(x is not None for x in a.logprobs[1:])
            diff = max((abs(x - y) for x, y in zip(a.logprobs[1:], b.logprobs[1:])), default=0.0)
            assert diff < 1e-4, (stride, budget, diff)
    hook.remove()


@torch.no_grad()
def test_batched_requests_joining_midway_equal_alone(hf_dir):
    engine = load_engine(str(hf_dir), "cpu", max_batch_size=3)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    lengths = [12, 5, 9, 15]
    alone = [run_alone(engine, ids, greedy(n)) for ids, n in zip(prompts, lengths)]
    # 4 requests over 3 slots: the last waits for a free slot; two join after the first step
    requests = [engine.add_request(prompts[0], greedy(lengths[0]))]
    engine.step()
    requests += [engine.add_request(p, greedy(n)) for p, n in zip(prompts[1:], lengths[1:])]
    while engine.has_work:
        engine.step()
        assert len(engine.running) <= 3
    assert [r.output_ids for r in requests] == alone
    assert engine.num_free_slots == 3 and engine.pool.num_used == 0


def test_stop_string_split_across_tokens_is_not_returned(llama_dir):
    engine = load_engine(str(llama_dir), "cpu")
    ids = engine.tokenizer.encode("The quick brown")
    full = "".join(out.text for out in engine.generate(ids, greedy(24)))
    assert len(full) > 6
    stop = full[3:6]
    outs = list(engine.generate(ids, greedy(24, stop=(stop,))))
    text = "".join(out.text for out in outs)
    assert text == full[: full.find(stop)]
    assert outs[-1].finish_reason == "stop"


def test_max_tokens_min_tokens_and_eos(llama_dir):
    engine = load_engine(str(llama_dir), "cpu")
    ids = engine.tokenizer.encode("hello")
    outs = list(engine.generate(ids, greedy(7)))
    assert sum(len(o.token_ids) for o in outs) == 7 and outs[-1].finish_reason == "length"
    # make EOS the greedy choice: it stops at once unless ignore_eos / min_tokens say otherwise
    head = engine.model.lm_head
    head.bias = torch.nn.Parameter(torch.zeros(head.weight.shape[0]))
    with torch.no_grad():
        head.bias[engine.eos_id] = 1e4
    engine = Engine(engine.model, engine.tokenizer)  # the decode plan folds weights when it is built
    outs = list(engine.generate(ids, SamplingParams(max_tokens=7, temperature=0.0)))
    assert outs[-1].finish_reason == "stop" and sum(len(o.token_ids) for o in outs) == 1
    outs = list(engine.generate(ids, SamplingParams(max_tokens=7, temperature=0.0, min_tokens=3)))
    assert sum(len(o.token_ids) for o in outs) == 4 and outs[-1].finish_reason == "stop"
    outs = list(engine.generate(ids, SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)))
    assert sum(len(o.token_ids) for o in outs) == 7
    # EOS generated under ignore_eos adds no text (special tokens are skipped, as vLLM does by default)
    assert all(o.token_ids == [engine.eos_id] for o in outs) and "".join(o.text for o in outs) == ""


def test_prompt_logprobs_equal_scoring(llama_dir):
    engine = load_engine(str(llama_dir), "cpu")
    ids = engine.tokenizer.encode("To be, or not to be")
    outs = list(engine.generate(ids, SamplingParams(max_tokens=0, prompt_logprobs=True, logprobs=2)))
    prompt_lps = outs[0].prompt_logprobs
    assert [p.token_id for p in prompt_lps] == ids and prompt_lps[0].logprob is None
    scored = engine.score([ids])[0].logprobs
    assert all(abs(a.logprob - b) < 1e-5 for a, b in zip(prompt_lps[1:], scored[1:]))
    assert all(len(p.top) == 2 for p in prompt_lps[1:])


def test_same_seed_same_tokens(llama_dir):
    engine = load_engine(str(llama_dir), "cpu", max_batch_size=2)
    ids = engine.tokenizer.encode("Once")
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=42, ignore_eos=True)
    assert run_alone(engine, ids, params) == run_alone(engine, ids, params)
    other = SamplingParams(max_tokens=12, temperature=1.0, seed=43, ignore_eos=True)
    assert run_alone(engine, ids, params) != run_alone(engine, ids, other)


def test_bad_requests_are_rejected_with_clear_messages(llama_dir):
    engine = load_engine(str(llama_dir), "cpu")
    for temperature in (-1, 1e39):
        with pytest.raises(ValueError, match=r"temperature must be in \[0, 10000\]"):
            engine.add_request([1, 2], SamplingParams(temperature=temperature))
    with pytest.raises(ValueError, match="maximum context length is 64 tokens"):
        engine.add_request([1] * 60, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="out of range"):
        engine.add_request([10**6], SamplingParams())
    assert not engine.has_work


def test_context_cap_beyond_the_model_is_refused_not_clipped(llama_dir):
    # like vLLM's --max-model-len check: a larger cap than the model's context is an error
    engine = load_engine(str(llama_dir), "cpu", max_seq_len=40)
    assert engine.max_seq_len == 40
    for bad in (65, 100_000, 1):
        with pytest.raises(ValueError, match=rf"max_seq_len {bad} is out of range: .*context length is 64 tokens"):
            Engine(engine.model, engine.tokenizer, max_seq_len=bad)
    assert Engine(engine.model, engine.tokenizer, max_seq_len=64).max_seq_len == 64


def test_prefill_groups_keep_padding_bounded():
    from model.engine import prefill_groups

    assert prefill_groups([]) == []
    assert prefill_groups([5]) == [[0]]
    # a 3-token and a 40-token prompt are not padded together; similar ones are
    assert prefill_groups([3, 40, 4, 38]) == [[0, 2], [3, 1]]
    assert prefill_groups([10] * 6) == [list(range(6))]
    # the padded-token budget splits a large batch of equal prompts
    assert prefill_groups([100] * 5, max_tokens=250) == [[0, 1], [2, 3], [4]]


@torch.no_grad()
def test_penalties_follow_the_generated_counts(llama_dir):
    """Greedy with penalties equals a by-hand replay: logits - freq * count - pres * (count > 0)."""
    engine = load_engine(str(llama_dir), "cpu", max_batch_size=1)
    prompt = engine.tokenizer.encode("The quick brown")
    params = greedy(16, presence_penalty=0.7, frequency_penalty=1.3)
    for _ in range(2):  # the second run reuses the slot: its counts must start from zero
        out = run_alone(engine, prompt, params)
        counts = torch.zeros(engine.config.vocab_size)
        seq = list(prompt)
        for tok in out:
            logits = engine.model(torch.tensor([seq]))[0, -1]
            logits = logits - 1.3 * counts - 0.7 * (counts > 0).float()
            assert tok == logits[: engine.vocab_limit].argmax().item()
            counts[tok] += 1
            seq.append(tok)
    assert out != run_alone(engine, prompt, greedy(16))  # the penalties changed something
