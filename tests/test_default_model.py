"""The shipped default model: it loads with no --model, and its held-out loss is what its card says.

`model/default/eval.json` records the loss measured on `tests/data/default_heldout.jsonl`
(documents from the corpus's validation split, never trained on) when the model was
exported; MODEL_CARD.md reports the same numbers. A broken export (wrong tensor mapping,
wrong dtype, a different tokenizer) scores near the uniform loss ln(V) ~ 9 and fails here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from model.cli import default_model_dir, load_engine
from model.engine import SamplingParams
from training.evaluate import evaluate_texts

from test_native_decode import native_module  # noqa: F401 -- the fixture

HELDOUT = Path(__file__).parent / "data" / "default_heldout.jsonl"
TOLERANCE = 0.02  # nats; fp32 on any x86 CPU reproduces the recorded value far closer than this


@pytest.fixture(scope="module")
def engine():
    return load_engine(None, "cpu")


@pytest.fixture(params=["torch", "native"])
def either_engine(request, engine):
    """The engine on the torch path (the suite's), then as `kiln serve` runs it: the native decode step and the
    native elementwise steps in the CPU forward (model/native)."""
    if request.param == "torch":
        yield engine
        return
    module = request.getfixturevalue("native_module")
    native = load_engine(None, "cpu")
    native._enable_native(module)
    yield native


def test_default_model_ships_with_the_package():
    path = default_model_dir()
    for name in ("config.json", "tokenizer.tiktoken", "tokenizer_config.json", "tokenizer.json", "eval.json",
                 "MODEL_CARD.md"):
        assert (path / name).is_file(), f"{name} missing from {path}"
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert size <= 48 * 2**20, f"default model dir is {size / 2**20:.1f} MiB; the budget is 48 MiB"


def test_heldout_loss_matches_the_card(either_engine):
    engine = either_engine
    texts = [json.loads(line)["text"] for line in HELDOUT.read_text(encoding="utf-8").splitlines()]
    recorded = json.loads((default_model_dir() / "eval.json").read_text())
    totals = evaluate_texts(engine, texts).as_dict()
    assert totals["loss"] <= recorded["heldout_sample_loss"] + TOLERANCE, (totals, recorded)
    assert totals["loss"] < 0.6 * math.log(engine.tokenizer.n_vocab)  # far from uniform


def test_default_model_writes_text(engine):
    """Sampled as `kiln generate` samples (temperature 0.8; seeded here), in three of the corpus's styles.
    (Greedy decoding of a small model falls into loops sooner, e.g. "Ok(Ok(Ok(...".)"""
    for prompt in ("The function returns", "And the LORD said", "The SELECT statement"):
        ids = engine.tokenizer.encode(prompt)
        params = SamplingParams(max_tokens=24, temperature=0.8, seed=1)
        text = "".join(o.text for o in engine.generate(ids, params))
        words = text.split()
        assert len(words) >= 10 and sum(w.isascii() for w in words) >= 0.9 * len(words), (prompt, text)


def test_greedy_text_does_not_depend_on_the_prompt_path(either_engine):
    """The same greedy request gives the same text whether its prompt went through the native step (short
    prompts), the forward (echo, which needs prompt logprobs) or the prefix cache, and echo's prompt logprobs
    are the fp32 scores. (With bf16 prompts on AMX, once the default, " to" and " signature" swapped after
    "The function", and echo's logprobs were ~1e-2 off.)"""
    engine = either_engine
    assert engine.prefill_dtype == torch.float32  # the default, on any CPU
    for prompt in ("The function", "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
                   "In the beginning God created the heaven and the earth. And the earth was without form"):
        ids = engine.tokenizer.encode(prompt)
        texts = []
        for echo in (False, True, False):  # the third run finds the prompt's blocks in the prefix cache
            outs = list(engine.generate(ids, SamplingParams(max_tokens=8, temperature=0.0, logprobs=0,
                                                            prompt_logprobs=echo)))
            texts.append("".join(o.text for o in outs))
            if echo:
                got = [lp.logprob for lp in outs[0].prompt_logprobs[1:]]
                want = engine.score([ids])[0].logprobs[1:]
                assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4, (prompt, got, want)
        assert texts[0] == texts[1] == texts[2], (prompt, texts)


def test_evaluate_writes_eval_json(tmp_path, llama_dir, capsys):
    """`python -m training.evaluate --heldout FILE --write-eval` records what test_heldout_loss_matches_the_card
    reads, for the model it scored (how a new default model's eval.json is made)."""
    import shutil

    from training import evaluate

    model_dir = tmp_path / "model"
    shutil.copytree(llama_dir, model_dir)
    (tmp_path / "corpus" / "val").mkdir(parents=True)
    (tmp_path / "corpus" / "val" / "docs.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in ("The quick brown fox.", "def add(a, b): return a + b")))
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"text": "To be, or not to be, that is the question."}) + "\n")
    argv = ["--model", str(model_dir), "--corpus", str(tmp_path / "corpus")]
    assert evaluate.main([*argv, "--heldout", str(heldout), "--write-eval", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    record = json.loads((model_dir / "eval.json").read_text())
    assert record["heldout_sample_loss"] == round(report["heldout_sample"]["loss"], 4) > 0
    assert record["val_tokens"] == report["all"]["tokens"] > 0 and record["heldout_sample"] == str(heldout)
    with pytest.raises(SystemExit):
        evaluate.main([*argv, "--write-eval"])
    assert "--write-eval needs --heldout" in capsys.readouterr().err
