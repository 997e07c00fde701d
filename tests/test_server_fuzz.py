"""Schemathesis fuzzes every operation of /openapi.json on a live server: no input may give a 5xx.

Valid and invalid bodies (wrong types, out-of-range numbers, huge ints, odd unicode...)
derived from the schema; a few dozen per operation, derandomized so runs repeat.
"""

from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from model.cli import load_engine  # noqa: E402
from server.app import create_app  # noqa: E402
from server.settings import ServerSettings  # noqa: E402
from server.testing import LiveServer  # noqa: E402

# KILN_FUZZ_EXAMPLES=500 for a longer, randomized hunt
EXAMPLES_PER_OPERATION = int(os.environ.get("KILN_FUZZ_EXAMPLES", "30"))
DERANDOMIZE = "KILN_FUZZ_EXAMPLES" not in os.environ


@pytest.fixture(scope="module")
def live_server(llama_dir):
    engine = load_engine(str(llama_dir), "cpu", None, max_batch_size=4)
    # a small queue: big n x prompts requests get a quick 400 instead of minutes of generation
    settings_ = ServerSettings(served_model_name="tiny", max_queue=16, max_body_bytes=256 * 1024,
                               chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    with LiveServer(create_app(engine, settings_)) as server:
        yield server


OPERATIONS = ["POST /v1/completions", "POST /v1/chat/completions", "POST /v1/perplexity", "POST /tokenize",
              "POST /detokenize", "GET /tokenizer_info", "GET /v1/models", "GET /v1/models/{model_id}",
              "GET /health", "GET /metrics"]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_input_gives_a_server_error(live_server, mode):
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_url(live_server.url + "/openapi.json")
    operations = {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}
    assert sorted(operations) == sorted(OPERATIONS)
    seen: dict[str, set[int]] = {}
    for name, operation in operations.items():
        if mode == "negative" and operation.method.upper() == "GET":
            continue  # no body: nothing the schema constrains to break

        @given(case=operation.as_strategy(GenerationMode(mode)))
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=DERANDOMIZE, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            response = case.call(base_url=live_server.url, timeout=30)
            seen.setdefault(name, set()).add(response.status_code)
            assert response.status_code < 500, (name, case.body, response.status_code, response.text[:500])
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text

        check()
    if mode == "positive":
        assert 200 in seen["POST /v1/completions"] and 200 in seen["POST /v1/perplexity"], seen
        assert 200 in seen["POST /v1/chat/completions"], seen
    else:
        assert 400 in seen["POST /v1/completions"] and 400 in seen["POST /v1/perplexity"], seen
        assert 400 in seen["POST /v1/chat/completions"], seen
