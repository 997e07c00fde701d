"""lm-eval's `local-completions` model against a live server, on the tiny offline tasks in lm_eval_tasks/.

lm-eval tokenizes through the server (`tokenizer_backend=remote`: /tokenizer_info,
/tokenize, /detokenize) and scores with echo + logprobs; every loglikelihood it reports
must equal the engine's own scoring of the same token ids, and every generation the
engine's greedy output for the same prompt and stop strings.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from model.cli import load_engine
from model.engine import SamplingParams
from server.app import create_app
from server.settings import ServerSettings
from server.testing import LiveServer, train_parrot

lm_eval = pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "lm_eval_tasks"
TEXTS = ["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
         "The quick brown fox jumps over the lazy dog.",
         "床前明月光，疑是地上霜。举头望明月，低头思故乡。"]
TOL = 1e-4  # same weights, KV-cache prefill vs plain forward: fp32 noise only


@pytest.fixture(scope="module")
def parrot_dir(llama_dir, tmp_path_factory):
    return train_parrot(llama_dir, TEXTS, tmp_path_factory.mktemp("parrot"))


def continuation_logprob(ref, context: list[int], continuation: list[int]) -> float:
    logprobs = ref.score([context + continuation])[0].logprobs
    return sum(logprobs[len(context):])


def encode_pair(ref, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces move to the continuation; the whole is encoded, then cut."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = ref.tokenizer.encode(context + continuation)
    context_ids = ref.tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def test_lm_eval_local_completions_matches_the_engine(parrot_dir, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    monkeypatch.chdir(ROOT)  # the task yamls name their data files relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    engine = load_engine(str(parrot_dir), "cpu", None, max_batch_size=4)
    ref = load_engine(str(parrot_dir), "cpu", None, max_batch_size=1)
    C = ref.max_seq_len
    with LiveServer(create_app(engine, ServerSettings(served_model_name="parrot"))) as server:
        results = simple_evaluate(
            model="local-completions",
            model_args=f"model=parrot,base_url={server.url}/v1/completions,tokenizer_backend=remote,"
                       f"num_concurrent=2,max_retries=1,max_length={C}",
            tasks=["kiln_mc", "kiln_rolling", "kiln_gen"],
            task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
            log_samples=True, batch_size=1, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    samples = results["samples"]

    # multiple choice: one loglikelihood per choice
    diffs = []
    for sample in samples["kiln_mc"]:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            ll, is_greedy = resp[0]
            expected = continuation_logprob(ref, *encode_pair(ref, context, continuation))
            diffs.append(abs(ll - expected))
    assert len(diffs) == 11 and max(diffs) < TOL, f"max {max(diffs):.2e} mean {sum(diffs) / len(diffs):.2e}"
    assert results["results"]["kiln_mc"]["acc,none"] == 1.0  # the parrot knows its lines

    # rolling loglikelihood: lm-eval keeps max_length - 1 = C - 1 tokens per request (one is generated) and
    # windows predict C - 2 tokens after one of context; each window is scored by the engine
    diffs = []
    for sample in samples["kiln_rolling"]:
        (text,) = sample["arguments"][0]
        ids = ref.tokenizer.encode(text)
        windows = map(make_disjoint_window, get_rolling_token_windows(
            token_list=ids, prefix_token=ref.tokenizer.eos_id, max_seq_len=C - 2, context_len=1))
        expected = sum(continuation_logprob(ref, list(ctx), list(cont)) for ctx, cont in windows)
        diffs.append(abs(sample["resps"][0][0] - expected))
    assert len(diffs) == 2 and max(diffs) < TOL, f"max {max(diffs):.2e}"
    assert len(ref.tokenizer.encode(samples["kiln_rolling"][1]["arguments"][0][0])) > C  # several windows

    # generation: greedy until ":" (or EOS), 24 tokens at most
    for sample in samples["kiln_gen"]:
        context, gen_kwargs = sample["arguments"][0]
        ids = ref.tokenizer.encode(context)
        outs = ref.generate(ids, SamplingParams(max_tokens=24, temperature=0.0, stop=(":",)))
        assert sample["resps"][0][0] == "".join(o.text for o in outs), context
    assert math.isclose(results["results"]["kiln_gen"]["exact_match,none"], 2 / 3)
