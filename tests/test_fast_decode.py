"""The lean decode step (folded norms, flat loop) against the plain forward: same tokens, same logprobs."""

from __future__ import annotations

import pytest
import torch

from model import fast_decode
from model.cli import load_engine
from model.engine import Engine, SamplingParams

PROMPTS = ["The quick brown", "def add(a, b):", "To be, or not", "床前明月光"]


def run(engine: Engine, prompts: list[list[int]], lengths: list[int]):
    """Requests of different lengths; the last two join after two steps, so rows join and leave."""
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=2) for n in lengths]
    requests = [engine.add_request(p, q) for p, q in zip(prompts[:2], params[:2])]
    logprobs = {}
    for step in range(1000):
        if step == 2:
            requests += [engine.add_request(p, q) for p, q in zip(prompts[2:], params[2:])]
        for out in engine.step():
            logprobs.setdefault(out.request.request_id, []).extend(lp.logprob for lp in out.logprobs)
        if step >= 2 and not engine.has_work:
            break
    return [r.output_ids for r in requests], [logprobs[r.request_id] for r in requests]


@pytest.mark.parametrize("fold", [True, False])
def test_fast_path_equals_plain_path(hf_dir, fold, monkeypatch):
    packed_calls = []
    if not fold:  # the large-model variant: norms applied as modules, no weight copies
        monkeypatch.setattr(fast_decode, "FOLD_LIMIT_BYTES", 0)
        # from PACKED_DECODE_MIN_BATCH (4) rows on, its matrices go through the prefill's oneDNN packs
        real = fast_decode._packed_linear

        def spy(x, weight, bias, module):
            packed_calls.append(getattr(module, "_kiln_packed", None) is not None)
            return real(x, weight, bias, module)

        monkeypatch.setattr(fast_decode, "_packed_linear", spy)
    fast = load_engine(str(hf_dir), "cpu", max_batch_size=4)
    assert fast._decode_plan is not None and fast._decode_plan.folded == fold
    plain = Engine(fast.model, fast.tokenizer, max_batch_size=4, fast_decode=False)
    assert_same_runs(fast, plain)
    if not fold and fast.model.blocks[0].attn.qkv.forward.__name__ == "_packed_forward":  # (oneDNN available)
        assert packed_calls and all(packed_calls)


def assert_same_runs(engine: Engine, reference: Engine, batches=([20], [14, 6, 11, 9]),
                     tolerance: float = 1e-4) -> float:
    """Batch 1, then rows of different lengths joining and leaving mid-run: the same greedy tokens,
    logprobs within `tolerance`; returns the largest logprob difference."""
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    worst = 0.0
    for lengths in batches:
        got_ids, got_lps = run(engine, prompts[: len(lengths)], lengths)
        want_ids, want_lps = run(reference, prompts[: len(lengths)], lengths)
        assert got_ids == want_ids
        diff = max(abs(a - b) for g, w in zip(got_lps, want_lps) for a, b in zip(g, w))
        assert diff < tolerance, f"max logprob difference {diff:.2e}"
        worst = max(worst, diff)
    return worst


def test_plan_does_not_touch_the_model(llama_dir):
    engine = load_engine(str(llama_dir), "cpu")
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    list(engine.generate(engine.tokenizer.encode("hello"), SamplingParams(max_tokens=5, temperature=0.0)))
    after = engine.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_compiled_step_equals_eager(hf_dir):
    """`kiln serve --compile`: the decode step through inductor gives the eager step's tokens and
    logprobs, for batches that pad up to a bucket (3 rows -> 4) and shrink as rows finish."""
    compiled = load_engine(str(hf_dir), "cpu", max_batch_size=4, compile=True)
    if compiled.compile_seconds is None:
        pytest.skip(f"torch.compile is unavailable here: {compiled.compile_error}")
    assert compiled._decode_plan._buckets == [1, 2, 4]
    eager = Engine(compiled.model, compiled.tokenizer, max_batch_size=4)
    assert_same_runs(compiled, eager, batches=([12], [14, 6, 11, 9]))


def test_compile_failure_falls_back_to_eager(llama_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fast_decode.DecodePlan, "compile", broken)
    engine = load_engine(str(llama_dir), "cpu", compile=True)
    assert engine.compile_seconds is None and "no C++ compiler" in engine.compile_error
    out = [t for o in engine.generate([5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0)) for t in o.token_ids]
    assert len(out) == 4
