"""/v1/chat/completions in-process: the model's chat template rendered as transformers renders it, the
generation equal to /v1/completions on the same ids, chat shapes (streamed through the openai SDK too),
and clear 400s (no template, tools, a template that refuses the messages)."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
from fastapi.testclient import TestClient

from model.chat_template import ChatTemplate
from model.cli import load_engine
from server.app import create_app
from server.settings import ServerSettings

# Zephyr-style, with the checks real templates make (alternating roles) and the globals they use
TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('the system message must come first') }}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "The quick brown fox"},
            {"role": "assistant", "content": "jumps over"},
            {"role": "user", "content": [{"type": "text", "text": "the lazy"}, {"type": "text", "text": "dog?"}]}]


@pytest.fixture(scope="module")
def chat_dir(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat")
    shutil.copytree(llama_dir, out, dirs_exist_ok=True)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    model_config = json.loads((out / "config.json").read_text())
    model_config["max_position_embeddings"] = 256  # rotary positions: the weights do not depend on it
    (out / "config.json").write_text(json.dumps(model_config))
    return out


@pytest.fixture(scope="module")
def client(chat_dir):
    engine = load_engine(str(chat_dir), "cpu", None, max_batch_size=4)
    with TestClient(create_app(engine, ServerSettings(served_model_name="chat"))) as c:
        yield c


def hf_ids(chat_dir, messages, **kw) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(chat_dir))
    flat = [{**m, "content": "\n".join(p["text"] for p in m["content"]) if isinstance(m["content"], list)
             else m["content"]} for m in messages]
    out = tok.apply_chat_template(flat, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_chat_equals_a_completion_of_the_rendered_template(client, chat_dir):
    ids = hf_ids(chat_dir, MESSAGES, add_generation_prompt=True)
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 2,
            "ignore_eos": True}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    chat = r.json()
    assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-")
    assert chat["usage"]["prompt_tokens"] == len(ids) and chat["usage"]["completion_tokens"] == 12
    plain = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 12, "temperature": 0, "logprobs": 2,
                                                 "ignore_eos": True}).json()["choices"][0]
    choice = chat["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": plain["text"]}
    assert choice["finish_reason"] == "length"
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == plain["logprobs"]["tokens"]
    assert [c["logprob"] for c in content] == pytest.approx(plain["logprobs"]["token_logprobs"])
    assert all(len(c["top_logprobs"]) == 2 and bytes(c["bytes"]).decode("utf-8", "replace") for c in content)
    # continue_final_message: the prompt ends inside the assistant's unfinished turn
    partial = MESSAGES[:2] + [{"role": "assistant", "content": "jumps"}]
    r = client.post("/v1/chat/completions", json={"messages": partial, "max_tokens": 2, "temperature": 0,
                                                  "add_generation_prompt": False, "continue_final_message": True})
    want = hf_ids(chat_dir, partial, continue_final_message=True)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(want)
    # the template trims the content: a trailing space is matched as transformers matches it
    partial[-1]["content"] = "jumps "
    r = client.post("/v1/chat/completions", json={"messages": partial, "max_tokens": 2, "temperature": 0,
                                                  "add_generation_prompt": False, "continue_final_message": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(hf_ids(chat_dir, partial, continue_final_message=True))


def test_streamed_through_the_openai_sdk(client):
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
    whole = sdk.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=10, temperature=0, seed=1)
    chunks = list(sdk.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=10, temperature=0,
                                              stream=True, stream_options={"include_usage": True}, n=2))
    assert chunks[0].choices[0].delta.role == "assistant"
    for index in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)
        assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (
        ["length", "length"], ["stop", "stop"], ["length", "stop"], ["stop", "length"])
    assert chunks[-1].usage.completion_tokens == 2 * whole.usage.completion_tokens and not chunks[-1].choices


def test_chat_errors(client, llama_dir):
    def error(body, status=400):
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == status, r.text
        return r.json()["error"]

    assert error({"messages": []})["param"] == "messages"
    assert error({"messages": [{"role": "wizard", "content": "hi"}]})["param"].startswith("messages")
    err = error({"messages": [MESSAGES[1], MESSAGES[0]]})
    assert err["param"] == "messages" and "the system message must come first" in err["message"]
    assert error({"messages": MESSAGES, "tools": [{"type": "function"}]})["param"] == "tools"
    # tool choices without tools, and the legacy function-calling fields, are refused, not ignored
    for field, value in (("tool_choice", "required"), ("tool_choice", {"type": "function"}),
                         ("functions", [{"name": "f"}]), ("function_call", "auto")):
        err = error({"messages": MESSAGES, field: value})
        assert err["param"] == field and "tool calling" in err["message"], err
    image = {"type": "image_url", "image_url": {"url": "data:,"}}
    err = error({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]})
    assert err["message"].count("only text content parts are supported") == 1 and "'image_url'" in err["message"]
    assert error({"messages": MESSAGES, "top_logprobs": 2})["param"] == "top_logprobs"
    assert client.post("/v1/chat/completions", json={"messages": MESSAGES, "top_logprobs": 0,
                                                     "max_tokens": 1}).status_code == 200
    assert error({"messages": MESSAGES, "continue_final_message": True})["param"] == "continue_final_message"
    assert error({"messages": MESSAGES, "response_format": {"type": "json_object"}})["param"] == "response_format"
    long = [{"role": "user", "content": "fox " * 600}]
    err = error({"messages": long})  # no max_tokens sent: the message quotes none
    assert err["param"] == "messages" and "the messages (rendered by the chat template) have" in err["message"], err
    assert "max_tokens" not in err["message"], err
    # the field the client sent is the one named (the openai SDK's max_completion_tokens)
    assert error({"messages": MESSAGES, "max_completion_tokens": 10**6})["param"] == "max_completion_tokens"
    assert error({"messages": MESSAGES, "max_tokens": 10**6})["param"] == "max_tokens"
    assert error({"messages": MESSAGES, "model": "other"}, 404)["param"] == "model"
    assert error({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]})["param"] == \
        "messages"
    # a template whose own code fails (not raise_exception) is the request's 400 too
    engine = load_engine(str(llama_dir), "cpu", None)
    for broken, name in (("{{ 1 / 0 }}", "ZeroDivisionError"), ("{% for i in range(10**9) %}{% endfor %}", "")):
        with TestClient(create_app(engine, ServerSettings(served_model_name="base", chat_template=broken))) as base:
            r = base.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 400 and name in r.json()["error"]["message"], r.text
    # a base model without a template: a clear 400, not a 404 or a guess at a format
    with TestClient(create_app(engine, ServerSettings(served_model_name="base"))) as base:
        r = base.post("/v1/chat/completions", json={"messages": MESSAGES})
        assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
    # --chat-template gives one (and a broken one is refused at start-up)
    with TestClient(create_app(engine, ServerSettings(served_model_name="base", chat_template=TEMPLATE))) as base:
        r = base.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text
    with pytest.raises(ValueError, match="--chat-template: the chat template does not compile"):
        ServerSettings(chat_template="{% for %}")


def test_explicit_nulls_are_defaults(client):
    """What OpenAI and vLLM accept: null for an optional field means the field was not sent."""
    nulls = {"n": None, "stream": None, "logprobs": None, "top_logprobs": None, "stop": None, "seed": None,
             "temperature": None, "tool_choice": None, "tools": None, "stream_options": None, "max_tokens": None}
    body = {"messages": [{"role": "user", "content": "hi", "name": None}], "max_completion_tokens": 3, **nulls}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["choices"][0]["logprobs"] is None
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "echo": None, "n": None,
                                             "stream": None, "logprobs": None, "best_of": None, "suffix": None})
    assert r.status_code == 200, r.text
    r = client.post("/v1/chat/completions", json={"messages": None})  # a required field sent as null: missing
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_template_variables_and_a_broken_shipped_template(chat_dir, tmp_path):
    """chat_template_kwargs reach the template (Qwen3's enable_thinking); a template the model ships that
    does not compile answers each chat request with a 400 naming it (and --chat-template as the way out)."""
    template = TEMPLATE.replace("<|assistant|>\n", "<|assistant|>\n{% if terse %}Briefly: {% endif %}")
    config_path = chat_dir / "tokenizer_config.json"
    original = config_path.read_text()
    try:
        config_path.write_text(json.dumps({**json.loads(original), "chat_template": template}))
        engine = load_engine(str(chat_dir), "cpu", None)
        with TestClient(create_app(engine, ServerSettings(served_model_name="chat"))) as c:
            body = {"messages": MESSAGES[:2], "max_tokens": 1}
            plain = c.post("/v1/chat/completions", json=body).json()["usage"]["prompt_tokens"]
            terse = c.post("/v1/chat/completions", json={**body, "chat_template_kwargs": {"terse": True}}).json()
            assert terse["usage"]["prompt_tokens"] == len(hf_ids(chat_dir, MESSAGES[:2], add_generation_prompt=True,
                                                                terse=True)) > plain
        config_path.write_text(json.dumps({**json.loads(original), "chat_template": "{% for m in messages %}"}))
        engine = load_engine(str(chat_dir), "cpu", None)
        with TestClient(create_app(engine, ServerSettings(served_model_name="chat"))) as c:
            r = c.post("/v1/chat/completions", json={"messages": MESSAGES[:2]})
            assert r.status_code == 400 and "--chat-template" in r.json()["error"]["message"], r.text
    finally:
        config_path.write_text(original)


def test_template_renders_as_transformers_whatever_the_tokenizer_lacks():
    """A tokenizer without a BOS or pad token leaves them undefined ("" in the prompt, not "None"),
    chat_template_kwargs cannot break the render or replace the special tokens, and a `{% generation %}`
    block (TRL's assistant_only_loss writes them into fine-tuned models' templates) renders its body in its
    own scope: the same text as transformers' apply_chat_template."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer(models.WordLevel(
        {"<unk>": 0, "<|endoftext|>": 1}, unk_token="<unk>")), eos_token="<|endoftext|>")
    tokens = {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": None}
    turns = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
    generation = ("{% for m in messages %}{% set turn = 'said' %}<|{{ m.role }}|>{% if m.role == 'assistant' %}"
                  "{% generation %}{% set turn = 'answered' %}{{ m.content }}{{ eos_token }}{% endgeneration %}"
                  "{% else %}{{ m.content }}{% endif %} {{ turn }}\n{% endfor %}")
    cases = [("{{ bos_token }}{{ pad_token }}" + turns, "<|user|>The quick brown fox<|endoftext|><|assistant|>jumps "
              "over<|endoftext|>"),
             (turns + "{% if terse %}Briefly: {% endif %}", "<|user|>The quick brown fox<|endoftext|><|assistant|>"
              "jumps over<|endoftext|>Briefly: "),
             (generation, "<|user|>The quick brown fox said\n<|assistant|>jumps over<|endoftext|> said\n")]
    for template, want in cases:
        assert hf.apply_chat_template(MESSAGES[1:3], chat_template=template, tokenize=False, terse=True) == want
        extra = {"terse": True, "self": 1, "bos_token": "<s>", "raise_exception": 0}
        assert ChatTemplate(template).render(MESSAGES[1:3], False, tokens, extra=extra) == want, template


def test_the_template_renders_off_the_event_loop(client, monkeypatch):
    """A template is the model's code and a long conversation renders slowly: never on the event loop,
    where it would stall every other request's tokens."""
    where = []
    render = ChatTemplate.render

    def recording_render(self, *args, **kwargs):
        try:
            asyncio.get_running_loop()
            where.append("event loop")
        except RuntimeError:
            where.append("worker thread")
        return render(self, *args, **kwargs)

    monkeypatch.setattr(ChatTemplate, "render", recording_render)
    for stream in (False, True):
        r = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2, "stream": stream})
        assert r.status_code == 200, r.text
    assert where == ["worker thread", "worker thread"]


def test_tool_messages_reach_the_template(llama_dir):
    """A tool message's tool_call_id (and a message's name) is passed to the template, as transformers
    passes it; fields not sent stay undefined there."""
    template = ("{% for m in messages %}{% if m.role == 'tool' and m.tool_call_id != 'call_7' %}"
                "{{ raise_exception('tool_call_id: ' ~ (m.tool_call_id if m.tool_call_id is defined"
                " else 'undefined')) }}"
                "{% endif %}{% if m.name is defined %}[{{ m.name }}]{% endif %}{{ m.role }}: {{ m.content }}\n"
                "{% endfor %}assistant:")
    engine = load_engine(str(llama_dir), "cpu", None)
    with TestClient(create_app(engine, ServerSettings(served_model_name="t", chat_template=template))) as c:
        messages = [{"role": "user", "content": "weather?", "name": "ann"},
                    {"role": "tool", "content": "sunny", "tool_call_id": "call_7"}]
        r = c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
        assert r.status_code == 200, r.text
        expected = len(engine.tokenizer.encode("[ann]user: weather?\ntool: sunny\nassistant:"))
        assert r.json()["usage"]["prompt_tokens"] == expected
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "tool", "content": "sunny"}], "max_tokens": 1})
        assert r.status_code == 400 and "tool_call_id: undefined" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("mode", ["auto", "none"])
def test_requests_that_leave_out_sampling_get_the_generation_config_values(chat_dir, tmp_path, monkeypatch, mode):
    """As vLLM (--generation-config auto): temperature / top_p / top_k that a completion or chat request leaves
    out (or sends as null) come from the model's generation_config.json (Qwen3's 0.6 / 0.95 / 20); given ones
    win; --generation-config none keeps OpenAI's defaults."""
    path = tmp_path / "m"
    shutil.copytree(chat_dir, path)
    (path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "eos_token_id": 0}))
    engine = load_engine(str(path), "cpu", None, max_batch_size=4)
    app = create_app(engine, ServerSettings(served_model_name="chat", model_dir=str(path), generation_config=mode))
    seen = []
    with TestClient(app) as c:
        scheduler = app.state.kiln.scheduler
        submit = scheduler.submit
        monkeypatch.setattr(scheduler, "submit", lambda prompts, params, *a, **k: seen.append(params[0]) or
                            submit(prompts, params, *a, **k))
        chat = {"messages": MESSAGES, "max_tokens": 2}
        for path_, body in [("/v1/completions", {"prompt": "The quick", "max_tokens": 2}),
                            ("/v1/completions", {"prompt": "The quick", "max_tokens": 2, "temperature": 0.2,
                                                 "top_p": None, "top_k": -1}),
                            ("/v1/chat/completions", chat),
                            ("/v1/chat/completions", {**chat, "top_k": 5, "temperature": 0})]:
            r = c.post(path_, json=body)
            assert r.status_code == 200, r.text
    got = [(p.temperature, p.top_p, p.top_k) for p in seen]
    model = (0.6, 0.95, 20) if mode == "auto" else (1.0, 1.0, 0)
    assert got == [model, (0.2, model[1], 0), model, (0.0, model[1], 5)]


def test_generation_config_sampling_values_out_of_range_are_ignored_by_name(tmp_path):
    from model.checkpoint import read_sampling_defaults

    assert read_sampling_defaults(tmp_path) == ({}, [])  # no file
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": -1, "top_p": 0.9, "top_k": "20", "max_new_tokens": 5}))
    assert read_sampling_defaults(tmp_path) == ({"top_p": 0.9}, ["temperature=-1", "top_k='20'"])
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    assert read_sampling_defaults(tmp_path) == ({}, [])
    with pytest.raises(ValueError, match="--generation-config must be auto or none"):
        ServerSettings(generation_config="vllm")
