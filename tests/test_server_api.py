"""The HTTP API in-process (httpx through Starlette's TestClient, lifespan included).

A tiny Llama is overfit on three texts (`train_parrot`), so greedy decoding recites them:
completions are compared with a separately loaded engine's greedy output, stop strings
and Chinese characters split across tokens are real, and echo + logprobs are compared
with the perplexity endpoint and `engine.score`.
"""

from __future__ import annotations

import json
import math
import threading
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from model.cli import load_engine
from model.engine import Engine, SamplingParams
from server.app import create_app
from server.settings import ServerSettings
from server.testing import train_parrot

TEXTS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "The quick brown fox jumps over the lazy dog.",
]
NAME = "parrot"


@pytest.fixture(scope="module")
def parrot_dir(llama_dir, tmp_path_factory):
    return train_parrot(llama_dir, TEXTS, tmp_path_factory.mktemp("parrot"))


@pytest.fixture(scope="module")
def ref(parrot_dir):
    """A second engine on the same weights: the reference the server is compared with."""
    return load_engine(str(parrot_dir), "cpu", None, max_batch_size=1)


@pytest.fixture(scope="module")
def client(parrot_dir):
    engine = load_engine(str(parrot_dir), "cpu", None, max_batch_size=4)
    app = create_app(engine, ServerSettings(served_model_name=NAME, max_queue=32, max_body_bytes=64 * 1024))
    with TestClient(app) as c:
        yield c


def room(ref, ids) -> int:
    """The most tokens a prompt of len(ids) may ask for in this context."""
    return ref.max_seq_len + 1 - len(ids)


def greedy_reference(ref, ids, max_tokens, **kw):
    outs = list(ref.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)))
    return "".join(o.text for o in outs), [t for o in outs for t in o.token_ids], outs[-1].finish_reason


def sse_chunks(response) -> list[dict]:
    """Parse an SSE body: every event is `data: ...`; the last is [DONE]."""
    events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def stream(client, body) -> list[dict]:
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_chunks(r)


def metric_values(client) -> dict[tuple[str, tuple], float]:
    text = client.get("/metrics").text
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return values


# ---- completions --------------------------------------------------------------------------
@pytest.mark.parametrize("text,prompt", list(zip(TEXTS, ["床前", "To be, or", "The quick"])),
                         ids=["chinese", "hamlet", "pangram"])
def test_completion_equals_engine_greedy(client, ref, text, prompt):
    ids = ref.tokenizer.encode(prompt)
    expected, tokens, finish = greedy_reference(ref, ids, room(ref, ids))
    assert finish == "stop" and prompt + expected == text  # the parrot recites its text, then EOS
    r = client.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": room(ref, ids),
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == NAME and body["id"].startswith("cmpl-")
    assert isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "text": expected, "logprobs": None, "finish_reason": "stop"}]
    P = len(ids)
    assert body["usage"] == {"prompt_tokens": P, "completion_tokens": len(tokens), "total_tokens": P + len(tokens)}
    # the same through token ids, and with max_tokens cutting it short
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 5, "temperature": 0})
    short, _, _ = greedy_reference(ref, ids, 5)
    assert r.json()["choices"][0]["text"] == short and r.json()["choices"][0]["finish_reason"] == "length"


def test_streaming_equals_non_streaming(client, ref):
    ids = ref.tokenizer.encode(TEXTS[1])[:3]
    expected, tokens, _ = greedy_reference(ref, ids, 30)
    chunks = stream(client, {"prompt": [ids], "max_tokens": 30, "temperature": 0,
                             "stream_options": {"include_usage": True}})
    *text_chunks, usage_chunk = chunks
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == expected
    for c in text_chunks:
        assert set(c) == {"id", "object", "created", "model", "choices", "usage"} and c["usage"] is None
        assert c["object"] == "text_completion" and c["model"] == NAME and len(c["choices"]) == 1
    assert [c["choices"][0]["finish_reason"] for c in text_chunks] == [None] * (len(text_chunks) - 1) + ["length"]
    assert len({c["id"] for c in chunks}) == 1
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 3, "completion_tokens": 30, "total_tokens": 33}
    # without include_usage: no usage key and no usage chunk
    chunks = stream(client, {"prompt": [ids], "max_tokens": 30, "temperature": 0})
    assert all("usage" not in c and len(c["choices"]) == 1 for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected


def test_chinese_streams_whole_characters(client, ref):
    ids = ref.tokenizer.encode("床")
    expected, tokens, _ = greedy_reference(ref, ids, room(ref, ids))
    assert "床" + expected == TEXTS[0]
    chunks = stream(client, {"prompt": "床", "max_tokens": room(ref, ids), "temperature": 0})
    texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == expected
    assert all("\ufffd" not in t for t in texts), texts
    # characters really were split across tokens: more tokens than chunks with text
    assert len(tokens) > sum(1 for t in texts if t) + 5, (len(tokens), texts)


def _split_stop(ref, ids):
    """A 3-character stop string that starts inside one generated token and ends in a later one."""
    text, tokens, _ = greedy_reference(ref, ids, 60)
    pieces = [ref.tokenizer.decode([t]) for t in tokens]
    offset = 0
    for piece, nxt in zip(pieces, pieces[1:]):
        offset += len(piece)
        if offset > 10 and len(piece) >= 2 and nxt and piece.isascii() and nxt.isascii():
            stop = text[offset - 2: offset + 1]
            if text.find(stop) == offset - 2:
                return text, stop
    raise AssertionError(f"no usable token boundary in {pieces}")


def test_stop_string_split_across_tokens(client, ref):
    ids = ref.tokenizer.encode(TEXTS[1])[:3]
    text, stop = _split_stop(ref, ids)
    expected = text[: text.find(stop)]
    assert len(expected) > 8
    body = {"prompt": ids, "max_tokens": 60, "temperature": 0, "stop": ["zzz", stop]}
    r = client.post("/v1/completions", json=body)
    assert r.json()["choices"][0] == {"index": 0, "text": expected, "logprobs": None, "finish_reason": "stop"}
    chunks = stream(client, body)
    texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == expected, (texts, stop)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # a single string works too
    r = client.post("/v1/completions", json={**body, "stop": stop})
    assert r.json()["choices"][0]["text"] == expected


def _offsets(client, body) -> tuple[str, list[str], list[int], str]:
    choice = client.post("/v1/completions", json={**body, "logprobs": 0}).json()["choices"][0]
    lp = choice["logprobs"]
    return choice["text"], lp["tokens"], lp["text_offset"], choice["finish_reason"]


def test_text_offsets_count_characters_held_back_for_a_stop_string(client, ref):
    ids = ref.tokenizer.encode(TEXTS[1])[:3]
    body = {"prompt": ids, "max_tokens": 30, "temperature": 0}
    text, tokens, offsets, _ = _offsets(client, body)
    # as OpenAI and vLLM count them, offsets start at the end of the prompt's text, echoed or not
    prompt_text = ref.tokenizer.decode(ids)
    assert offsets[0] == len(prompt_text)
    for token, offset in zip(tokens, offsets):
        assert (prompt_text + text)[offset: offset + len(token)] == token, (token, offset, text)
    # a stop string that never matches, but whose first characters appear early: they are held back
    # until the next token shows they do not start it; the offsets must not move
    held = text[4:6]
    assert held in text
    for stop in (held + "\x00", [held + "\x00", "zz"]):
        got = _offsets(client, {**body, "stop": stop})
        assert got[:3] == (text, tokens, offsets), (stop, got)
        chunks = stream(client, {**body, "stop": stop, "logprobs": 0})
        assert [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]] == offsets
    # with echo too (and the prompt's own tokens count from 0)
    echo_text, echo_tokens, echo_offsets, _ = _offsets(client, {**body, "stop": held + "\x00", "echo": True})
    assert echo_text == prompt_text + text
    assert echo_offsets[len(ids):] == offsets and echo_offsets[0] == 0
    chunks = stream(client, {**body, "stop": held + "\x00", "echo": True, "logprobs": 0})
    assert [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]] == echo_offsets  # streamed alike


def test_min_tokens_holds_off_stop_strings(client, ref):
    ids = ref.tokenizer.encode(TEXTS[1])[:3]
    body = {"prompt": ids, "max_tokens": 30, "temperature": 0}
    text, tokens, offsets, _ = _offsets(client, body)
    offsets = [o - len(ref.tokenizer.decode(ids)) for o in offsets]  # into the output text
    stop = tokens[0]
    assert stop.strip() and stop in text
    r = client.post("/v1/completions", json={**body, "stop": stop}).json()
    assert r["choices"][0]["text"] == "" and r["usage"]["completion_tokens"] == 1
    for m in (1, 3, 6):
        # as in vLLM, a match must end in the text of token m + 1 or later
        start = offsets[m] - len(stop) + 1
        at = text.find(stop, max(0, start))
        expected = (text[:at], "stop") if at >= 0 else (text, "length")
        r = client.post("/v1/completions", json={**body, "stop": stop, "min_tokens": m}).json()
        assert (r["choices"][0]["text"], r["choices"][0]["finish_reason"]) == expected, m
        assert r["usage"]["completion_tokens"] > m


def test_echo_of_a_prompt_ending_inside_a_character_is_not_repeated(client, ref):
    tok = ref.tokenizer
    ids = tok.encode("To be ") + [tok.mergeable_ranks["明".encode()[:1]]]  # the first byte of a 3-byte character
    prompt_text = tok.decode(ids)
    assert prompt_text.endswith("\ufffd")
    body = {"prompt": ids, "max_tokens": 4, "temperature": 0}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    echoed = client.post("/v1/completions", json={**body, "echo": True}).json()["choices"][0]["text"]
    # the output text starts with the split character (whole, or U+FFFD): it is shown once
    assert echoed == prompt_text[:-1] + plain
    only = client.post("/v1/completions", json={**body, "echo": True, "max_tokens": 0, "logprobs": 0}).json()
    assert only["choices"][0]["text"] == prompt_text


def test_a_tiny_temperature_is_greedy(client, ref):
    ids = ref.tokenizer.encode(TEXTS[2])[:3]
    expected, _, _ = greedy_reference(ref, ids, 10)
    for t in (1e-38, 5e-324, 1e-6):
        r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 10, "temperature": t, "top_p": 0.9})
        assert r.json()["choices"][0]["text"] == expected, t


def test_same_seed_same_text_and_n_choices(client):
    body = {"prompt": "The quick", "max_tokens": 12, "temperature": 1.0, "ignore_eos": True}
    a = client.post("/v1/completions", json={**body, "seed": 5}).json()["choices"][0]["text"]
    b = client.post("/v1/completions", json={**body, "seed": 5}).json()["choices"][0]["text"]
    c = client.post("/v1/completions", json={**body, "seed": 6}).json()["choices"][0]["text"]
    assert a == b
    both = client.post("/v1/completions", json={**body, "seed": 5, "n": 2, "prompt": ["The quick", "To be"]}).json()
    assert [ch["index"] for ch in both["choices"]] == [0, 1, 2, 3]
    assert both["choices"][0]["text"] == a and both["choices"][1]["text"] == c  # choice j is seeded seed + j
    assert both["usage"]["completion_tokens"] == 4 * 12


def test_logit_bias_forces_and_bans_tokens(client, ref):
    ids = ref.tokenizer.encode(TEXTS[2])[:3]
    _, greedy_ids, _ = greedy_reference(ref, ids, 4)
    # +100 on one id: every sampled token is that id; logprobs report the model's own distribution
    forced = greedy_ids[2]
    body = {"prompt": ids, "max_tokens": 4, "temperature": 1.0, "seed": 3, "logprobs": 1,
            "logit_bias": {str(forced): 100}, "ignore_eos": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == [ref.tokenizer.decode([forced])] * 4
    unbiased = ref.score([ids + [forced]])[0].logprobs[-1]
    assert lp["token_logprobs"][0] == pytest.approx(unbiased, abs=1e-4)
    # -100 on greedy's first token: greedy picks another, and the stream agrees with the body
    body = {"prompt": ids, "max_tokens": 4, "temperature": 0, "logit_bias": {str(greedy_ids[0]): -100.0}}
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    out = list(ref.generate(ids, SamplingParams(max_tokens=4, temperature=0.0, logit_bias=((greedy_ids[0], -100.0),))))
    assert out[0].token_ids[0] != greedy_ids[0]
    assert text == "".join(o.text for o in out)
    assert "".join(c["choices"][0]["text"] for c in stream(client, body)) == text


def test_largest_seed_with_n_choices_wraps_like_torch(client):
    # choice j is seeded seed + j; past 2**64 - 1 that wraps, as torch takes seeds modulo 2**64
    body = {"prompt": "The quick", "max_tokens": 12, "temperature": 1.0, "ignore_eos": True}
    r = client.post("/v1/completions", json={**body, "seed": 2**64 - 1, "n": 2})
    assert r.status_code == 200, r.text
    minus_one = client.post("/v1/completions", json={**body, "seed": -1}).json()["choices"][0]["text"]
    zero = client.post("/v1/completions", json={**body, "seed": 0}).json()["choices"][0]["text"]
    assert [c["text"] for c in r.json()["choices"]] == [minus_one, zero]


def test_generation_logprobs(client, ref):
    ids = ref.tokenizer.encode(TEXTS[2])[:3]
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0, "logprobs": 3})
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 8
    for token, value, top, offset in zip(*(lp[k] for k in ("tokens", "token_logprobs", "top_logprobs",
                                                           "text_offset"))):
        assert 1 <= len(top) <= 4 and top[token] == value  # the chosen token is always among them
        assert value == max(top.values())  # greedy
        if token != ref.tokenizer.eos_token:  # EOS keeps its logprob but adds no text
            assert (ref.tokenizer.decode(ids) + choice["text"])[offset: offset + len(token)] == token
    assert lp["text_offset"][0] == len(ref.tokenizer.decode(ids))  # offsets count from the prompt's start


# ---- echo + logprobs: what lm-eval reads -----------------------------------------------------
def test_echo_prompt_logprobs_equal_perplexity_endpoint(client, ref):
    text = "To be, or not to be, that is the question."
    r = client.post("/v1/completions", json={"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 0
    p = client.post("/v1/perplexity", json={"input": text, "return_tokens": True}).json()
    tokens = p["data"][0]["tokens"]
    assert [t["token"] for t in tokens] == lp["tokens"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and tokens[0]["logprob"] is None
    diffs = [abs(a - t["logprob"]) for a, t in zip(lp["token_logprobs"][1:], tokens[1:])]
    assert max(diffs) < 1e-4, f"max {max(diffs):.2e} mean {sum(diffs) / len(diffs):.2e}"
    # and the perplexity endpoint is engine.score on engine.encode_for_scoring, as `kiln ppl`
    expected = ref.score([ref.encode_for_scoring(text)])[0]
    assert p["data"][0]["num_tokens"] == expected.num_scored == len(tokens) - 1
    assert math.isclose(p["data"][0]["perplexity"], expected.perplexity, rel_tol=1e-5)
    assert math.isclose(p["data"][0]["mean_nll"], expected.mean_nll, rel_tol=1e-5)


def test_lm_eval_scoring_request_shape(client, ref):
    """lm-eval: nested ids, max_tokens 1, echo, logprobs 1; arrays hold prompt + 1 even when EOS comes next."""
    ids = ref.tokenizer.encode(TEXTS[2])  # the whole text: the parrot's next token is EOS
    body = {"model": NAME, "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["finish_reason"] == "stop" and choice["text"] == TEXTS[2]
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
    assert lp["tokens"][-1] == ref.tokenizer.eos_token
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(t, dict) and t for t in lp["top_logprobs"][1:])
    expected = ref.score([ids + [ref.tokenizer.eos_id]])[0].logprobs
    diffs = [abs(a - b) for a, b in zip(lp["token_logprobs"][1:], expected[1:])]
    assert max(diffs) < 1e-4, f"max {max(diffs):.2e}"
    # a prompt that fills the whole context is accepted (lm-eval's rolling windows)
    full = (ids * 10)[: ref.max_seq_len]
    r = client.post("/v1/completions", json={**body, "prompt": [full]})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == ref.max_seq_len + 1


def test_perplexity_batch_and_ids(client, ref):
    texts = [TEXTS[1], "hello there", TEXTS[0]]
    ids = ref.encode_for_scoring(TEXTS[2])
    r = client.post("/v1/perplexity", json={"model": NAME, "input": texts})
    body = r.json()
    assert body["object"] == "perplexity" and body["model"] == NAME
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and "tokens" not in body["data"][0]
    for d, text in zip(body["data"], texts):
        expected = ref.score([ref.encode_for_scoring(text)])[0]
        assert math.isclose(d["perplexity"], expected.perplexity, rel_tol=1e-5), (d, expected.perplexity)
    n = sum(len(ref.encode_for_scoring(t)) for t in texts)
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}
    r = client.post("/v1/perplexity", json={"input": [ids, ids[:5]], "stride": 8})
    assert math.isclose(r.json()["data"][0]["perplexity"], ref.score([ids], stride=8)[0].perplexity, rel_tol=1e-5)


# ---- tokenizer endpoints, models, health, openapi --------------------------------------------
def test_tokenizer_endpoints(client, ref):
    tok = ref.tokenizer
    r = client.post("/tokenize", json={"prompt": "<|endoftext|>", "add_special_tokens": False})
    assert r.json() == {"tokens": [tok.eos_id], "count": 1, "max_model_len": ref.max_seq_len}
    r = client.post("/tokenize", json={"prompt": TEXTS[0]})
    assert r.json()["tokens"] == ref.encode_for_scoring(TEXTS[0])
    r = client.post("/detokenize", json={"tokens": r.json()["tokens"]})
    assert r.json() == {"prompt": TEXTS[0]}
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["eos_token_id"] == tok.eos_id
    assert info["vocab_size"] == tok.n_vocab and info["model_max_length"] == ref.max_seq_len
    assert info["pad_token_id"] == tok.pad_id and info["pad_token"] == tok.id_to_token_text(tok.pad_id)
    r = client.post("/detokenize", json={"tokens": [1, tok.n_vocab]})
    assert r.status_code == 400 and str(tok.n_vocab) in r.json()["error"]["message"]


def test_models_health_openapi(client, ref):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [NAME]
    assert models["data"][0]["object"] == "model" and models["data"][0]["max_model_len"] == ref.max_seq_len
    assert client.get(f"/v1/models/{NAME}").json()["id"] == NAME
    assert client.get("/v1/models/other").status_code == 404
    assert client.get("/health").json() == {"status": "ok"}
    head = client.head("/health")
    assert head.status_code == 200 and head.content == b""
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert {"/v1/completions", "/v1/perplexity", "/tokenize", "/detokenize", "/tokenizer_info", "/v1/models",
            "/health", "/metrics"} <= set(paths)
    # bad bodies get 400 with the OpenAI error body, not FastAPI's 422, and the schema says so
    assert "422" not in json.dumps(schema) and "HTTPValidationError" not in schema["components"]["schemas"]
    assert paths["/v1/completions"]["post"]["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"}


def test_a_model_name_with_a_slash_is_found_by_name(parrot_dir):
    engine = load_engine(str(parrot_dir), "cpu", None, max_batch_size=1)
    with TestClient(create_app(engine, ServerSettings(served_model_name="org/parrot-1"))) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["org/parrot-1"]
        assert c.get("/v1/models/org/parrot-1").json()["id"] == "org/parrot-1"
        assert c.get("/v1/models/org%2Fparrot-1").json()["id"] == "org/parrot-1"
        r = c.get("/v1/models/org/other")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_curl_form_content_type_is_read_as_json(client):
    # `curl -d '{...}'` sends application/x-www-form-urlencoded
    r = client.post("/v1/perplexity", content=json.dumps({"input": "hello there"}),
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    r = client.post("/v1/completions", content=json.dumps({"prompt": "hi", "max_tokens": 2}),
                    headers={"content-type": ""})
    assert r.status_code == 200, r.text


# ---- errors -------------------------------------------------------------------------------
ERROR_CASES = [
    # (path, body, status, param, message fragment)
    ("/v1/completions", {"prompt": 5}, 400, "prompt", "prompt"),
    ("/v1/completions", {}, 400, "prompt", "prompt"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", "temperature"),
    # past float32's range a temperature is infinity and top-k/top-p lose the ranking they cut by
    ("/v1/completions", {"prompt": "hi", "temperature": 1e39, "top_k": 3}, 400, "temperature", "10000"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs", "logprobs"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n", "n"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "echo"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 9, "max_tokens": 3}, 400, "min_tokens", "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of", "best_of"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**70}, 400, "seed", "seed"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes please"}, 400, "stream", "stream"),
    ("/v1/completions", {"prompt": "hi", "echo": "yes"}, 400, "echo", "valid boolean"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "3"}, 400, "max_tokens", "valid integer"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, 400, "logprobs", "valid integer"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options",
     "only allowed when stream is true"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [100000]}, 400, "stop_token_ids", "100000"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [-1]}, 400, "stop_token_ids", "-1"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"100000": 1}}, 400, "logit_bias", "100000 is out of range"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"the": 1}}, 400, "logit_bias", "integer strings, got 'the'"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"-1": 1}}, 400, "logit_bias", "got '-1'"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"9" * 5000: 1}}, 400, "logit_bias", "999... is out of range"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"99999999999": 1}}, 400, "logit_bias",
     "99999999999 is out of range"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias", "[-100, 100], got 101"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": "1"}}, 400, "logit_bias", "valid number"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias",
     "at most 300"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": [[]]}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": [1, 100000]}, 400, "prompt", "100000"),
    ("/v1/completions", {"prompt": [1, 100000], "stream": True}, 400, "prompt", "100000"),
    ("/v1/completions", {"prompt": [7] * 70}, 400, "prompt",
     "maximum context length is 64 tokens, but the prompt has 70 tokens"),
    ("/v1/completions", {"prompt": [7], "max_tokens": 65}, 400, "max_tokens", "1 prompt tokens + 65 max_tokens"),
    ("/v1/completions", {"prompt": ["a", "b"], "n": 20}, 400, "n", "at most 36 fit at once"),
    ("/v1/perplexity", {"input": ["a"] * 40}, 400, "input", "40 texts to score (inputs) but at most 36 fit at once"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "gpt-4"),
    ("/v1/perplexity", {"input": "h"}, 400, "input", "at least 2"),
    ("/v1/perplexity", {"input": "hi there", "stride": 0}, 400, "stride", "stride"),
    ("/v1/perplexity", {"input": "hi there", "stride": 1000}, 400, "stride", "stride must be in [1, 64]"),
    ("/v1/perplexity", {"input": "hi there", "model": "x"}, 404, "model", "'x'"),
    ("/v1/perplexity", {"input": [[1, 2], [3]]}, 400, "input", "input 1 has 1 token"),
    ("/v1/completions", {"prompt": "hi", "stop": ["x"] * 17}, 400, "stop", "stop: List should have at most 16 items"),
    ("/tokenize", {"prompt": 3}, 400, "prompt", "prompt: Input should be a valid string"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens", "tokens"),
]


@pytest.mark.parametrize("path,body,status,param,fragment", ERROR_CASES)
def test_error_bodies(client, path, body, status, param, fragment):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == {400: "invalid_request_error", 404: "not_found_error"}[status]
    assert error["param"] == param
    assert fragment in error["message"], error["message"]


def test_malformed_requests(client):
    for content in (b"{not json", b"[1, 2]", b"\xff\xfe", b'{"prompt": NaN}', b'"just a string"'):
        r = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400, (content, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/v1/completions", content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "the request body is empty" in r.json()["error"]["message"], r.text
    r = client.post("/v1/completions", content=b'{"prompt": "hi"}', headers={"content-type": "text/xml"})
    assert r.status_code == 400, r.text
    assert "sent with Content-Type: application/json (got 'text/xml')" in r.json()["error"]["message"]
    r = client.get("/v1/completions")
    assert r.status_code == 405 and "GET" in r.json()["error"]["message"]
    r = client.get("/v2/everything")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_oversized_body_is_413(client):
    big = json.dumps({"prompt": "x" * 70_000})
    r = client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit applies to the bytes received
        for i in range(0, len(big), 8192):
            yield big[i: i + 8192].encode()

    r = client.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "65536 bytes" in r.json()["error"]["message"]


def test_api_key(parrot_dir):
    engine = load_engine(str(parrot_dir), "cpu", None, max_batch_size=1)
    app = create_app(engine, ServerSettings(served_model_name=NAME, api_key="s3cret"))
    with TestClient(app) as c:
        body = {"prompt": "hi", "max_tokens": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 401, r.text
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models").status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/completions", json=body, headers=ok).status_code == 200
        # the scheme is case-insensitive (RFC 7235)
        assert c.post("/v1/completions", json=body, headers={"Authorization": "bearer s3cret"}).status_code == 200
        # lm-eval sends the key only to /v1/completions: the tokenizer endpoints stay open, like vLLM's
        assert c.get("/tokenizer_info").status_code == 200
        assert c.post("/tokenize", json={"prompt": "hi"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200


def test_503_while_the_model_loads(parrot_dir):
    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return load_engine(str(parrot_dir), "cpu", None, max_batch_size=1)

    app = create_app(slow_loader, ServerSettings(served_model_name=NAME))
    with TestClient(app) as c:
        for method, path, body in (("get", "/health", None), ("post", "/v1/completions", {"prompt": "hi"}),
                                   ("post", "/tokenize", {"prompt": "hi"}),
                                   ("post", "/v1/perplexity", {"input": "hi there"})):
            r = c.request(method, path, json=body)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["type"] == "service_unavailable" and "loading" in r.json()["error"]["message"]
        assert c.get("/metrics").status_code == 200
        release.set()
        deadline = time.monotonic() + 30
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the model never became ready"
            time.sleep(0.02)
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_shutdown_while_the_model_loads_does_not_wait_for_the_load(parrot_dir):
    """SIGTERM or Ctrl-C during a large model's load (tens of seconds on a CPU) exits at once: nothing is in
    flight yet. It used to wait for the load to finish, past a container's stop grace period."""
    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return load_engine(str(parrot_dir), "cpu", None, max_batch_size=1)

    app = create_app(slow_loader, ServerSettings(served_model_name=NAME))
    started = time.monotonic()
    with TestClient(app) as c:
        assert c.get("/health").status_code == 503
    assert time.monotonic() - started < 10
    scheduler = app.state.kiln.scheduler
    release.set()  # the load returns into a stopped scheduler: its worker ends without serving
    scheduler._thread.join(30)
    assert not scheduler._thread.is_alive() and not scheduler.ready


# ---- metrics ------------------------------------------------------------------------------
def test_metrics_move(client, ref):
    ids = ref.tokenizer.encode(TEXTS[1])[:5]
    before = metric_values(client)
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 7, "temperature": 0})
    assert r.status_code == 200
    client.post("/v1/completions", json={"prompt": "hi", "model": "nope"})
    client.post("/v1/perplexity", json={"input": TEXTS[2]})
    after = metric_values(client)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("kiln_prompt_tokens_total") == 5
    assert delta("kiln_generation_tokens_total") == 7
    assert delta("kiln_requests_total", endpoint="/v1/completions", status="200") == 1
    assert delta("kiln_requests_total", endpoint="/v1/completions", status="404") == 1
    assert delta("kiln_requests_total", endpoint="/v1/perplexity", status="200") == 1
    assert delta("kiln_request_finish_total", finish_reason="length") == 1
    assert delta("kiln_time_to_first_token_seconds_count") == 1
    assert delta("kiln_inter_token_latency_seconds_count") == 6
    assert delta("kiln_e2e_request_latency_seconds_count") == 1
    assert delta("kiln_request_queue_time_seconds_count") == 1
    assert delta("kiln_engine_step_seconds_count") >= 7  # a step per token at least (prefill, six decodes)
    # the loop delivered the non-streamed request's outputs twice: its acceptance, then every token at the end
    assert delta("kiln_event_loop_delay_seconds_count") == 2
    assert delta("kiln_perplexity_requests_total", status="ok") == 1
    assert delta("kiln_perplexity_latency_seconds_count") == 1
    # the first token has no context: it is not scored
    assert delta("kiln_perplexity_tokens_total") == len(ref.encode_for_scoring(TEXTS[2])) - 1
    assert after[("kiln_e2e_request_latency_seconds_sum", ())] > before.get(("kiln_e2e_request_latency_seconds_sum",
                                                                               ()), 0.0)
    assert after[("kiln_num_requests_running", ())] == 0 and after[("kiln_num_requests_waiting", ())] == 0
    assert after[("kiln_kv_cache_usage_ratio", ())] == 0
    cache = client.app.state.kiln.scheduler.engine.cache
    config = {"block_size": str(cache.block_size), "num_blocks": str(cache.num_blocks), "cache_dtype": "float32",
              "enable_prefix_caching": "true"}
    assert after[("kiln_cache_config_info", tuple(sorted(config.items())))] == 1
    # the process's standard families (prometheus_client's, as a default registry would have): this process's memory
    rss = after[("process_resident_memory_bytes", ())]
    assert abs(rss - resident_bytes()) < 0.1 * rss and after[("process_cpu_seconds_total", ())] > 0


def resident_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_greedy_speculation_keeps_the_text_and_counts_its_drafts(client, ref):
    """Greedy requests verify prompt-lookup drafts (on by default): the same text as an engine without
    speculation, streamed or not, and the drafts show in /metrics."""
    plain = Engine(ref.model, ref.tokenizer, max_batch_size=1, speculative_tokens=0)
    ids = ref.tokenizer.encode("To be, or not to be, or not to be, or not")
    n = min(30, room(ref, ids))
    want, want_ids, _ = greedy_reference(plain, ids, n, ignore_eos=True)
    body = {"prompt": ids, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    before = metric_values(client)
    got = client.post("/v1/completions", json=body).json()
    streamed = stream(client, body)
    after = metric_values(client)

    def delta(name):
        return after.get((name, ()), 0.0) - before.get((name, ()), 0.0)

    assert got["choices"][0]["text"] == want and got["usage"]["completion_tokens"] == len(want_ids)
    assert "".join(c["choices"][0]["text"] for c in streamed if c["choices"]) == want
    drafts, accepted = delta("kiln_spec_decode_draft_tokens_total"), delta("kiln_spec_decode_accepted_tokens_total")
    assert drafts > 0 and 0 < accepted <= drafts, (drafts, accepted)
    # one inter-token gap per step, not a zero for each further token a step emits
    assert delta("kiln_inter_token_latency_seconds_count") == 2 * (len(want_ids) - 1) - accepted


def test_prefix_cache_metrics_count_a_repeated_prompt(client, ref):
    ids = ref.tokenizer.encode(TEXTS[0] + TEXTS[1])[:40]  # 2 full blocks of 16 and a partial one
    body = {"prompt": ids, "max_tokens": 3, "temperature": 0}
    first = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    before = metric_values(client)
    again = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    after = metric_values(client)

    def delta(name):
        return after.get((name, ()), 0.0) - before.get((name, ()), 0.0)

    assert again == first
    assert delta("kiln_prefix_cache_queries_total") == 40
    assert delta("kiln_prefix_cache_hits_total") == 32  # the full blocks; the rest is recomputed
    # echo (lm-eval's loglikelihood) computes every position's logits and looks nothing up: not a query
    before = metric_values(client)
    client.post("/v1/completions", json={**body, "echo": True, "logprobs": 1, "max_tokens": 1})
    after_echo = metric_values(client)
    for name in ("kiln_prefix_cache_queries_total", "kiln_prefix_cache_hits_total"):
        assert after_echo.get((name, ()), 0.0) == before.get((name, ()), 0.0), name
    assert after[("kiln_num_preemptions_total", ())] == 0
    assert 0 <= after[("kiln_kv_cache_slots_used_ratio", ())] <= 1
