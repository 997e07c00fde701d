"""The server on a real socket (uvicorn in a thread, or `python -m server` in a subprocess).

The official openai SDK against it; 16 concurrent streams give the same greedy text as
each request alone; a client that disconnects mid-stream is aborted and frees its slot;
a full queue answers 429; SIGTERM shuts the process down cleanly.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model.cli import load_engine
from model.engine import SamplingParams
from server.__main__ import main
from server.app import create_app
from server.settings import DEFAULT_MODEL_NAME, ServerSettings, build_parser
from server.testing import LiveServer, SlowEngine, train_parrot

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
         "The quick brown fox jumps over the lazy dog."]




def gauges(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{label}}}" if label else s.name] = s.value
    return out


def first_data_line(lines) -> str:
    for line in lines:
        if line.startswith("data: "):
            return line
    raise AssertionError("the stream ended without data")


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def parrot_dir(llama_dir, tmp_path_factory):
    return train_parrot(llama_dir, TEXTS, tmp_path_factory.mktemp("parrot"))


@pytest.fixture(scope="module")
def parrot_server(parrot_dir):
    engine = load_engine(str(parrot_dir), "cpu", None, max_batch_size=4)
    with LiveServer(create_app(engine, ServerSettings(served_model_name="parrot"))) as server:
        yield server


# ---- the openai SDK ---------------------------------------------------------------------
def test_openai_sdk(parrot_server, parrot_dir):
    ref = load_engine(str(parrot_dir), "cpu", None, max_batch_size=1)
    client = openai.OpenAI(base_url=parrot_server.url + "/v1", api_key="unused", max_retries=0)
    prompt = "To be, or"
    ids = ref.tokenizer.encode(prompt)
    expected = "".join(o.text for o in ref.generate(ids, SamplingParams(max_tokens=60, temperature=0)))
    assert prompt + expected == TEXTS[0]

    completion = client.completions.create(model="parrot", prompt=prompt, max_tokens=60, temperature=0)
    assert completion.choices[0].text == expected and completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == len(ids)

    chunks = list(client.completions.create(model="parrot", prompt=prompt, max_tokens=60, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == completion.usage.completion_tokens
    assert [m.id for m in client.models.list()] == ["parrot"]

    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt=prompt)
    assert "gpt-4" in e.value.message and e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="parrot", prompt=prompt, temperature=-1)
    assert e.value.param == "temperature"
    # vLLM-style extensions go through extra_body
    out = client.completions.create(model="parrot", prompt=prompt, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True, "top_k": 1, "min_tokens": 5})
    assert out.usage.completion_tokens == 5


# ---- continuous batching ----------------------------------------------------------------
@pytest.mark.parametrize("pool", ["roomy", "tiny", "tiny-async"])
def test_concurrent_streams_equal_requests_alone(llama_dir, pool):
    """Continuous batching changes nothing in the text; nor does a KV pool so small (one 64-token
    sequence of 4-token blocks for 4 running rows) that requests are preempted and recomputed,
    nor reading the sampled ids back one step late (async scheduling, CUDA's default)."""
    options = {"block_size": 4, "num_blocks": 17} if pool.startswith("tiny") else {}
    options["async_scheduling"] = pool.endswith("async")
    engine = load_engine(str(llama_dir), "cpu", None, max_batch_size=4, **options)
    words = "The quick brown fox jumps over the lazy dog and then some more words appear".split()
    requests = [{"prompt": " ".join(words[: 1 + i % 9]), "max_tokens": 4 + 3 * i, "temperature": 0,
                 "ignore_eos": True, "stream": True} for i in range(16)]
    with LiveServer(create_app(engine, ServerSettings(served_model_name="tiny"))) as server:

        async def run(client, body):
            texts = []
            async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        texts.append(json.loads(line[6:])["choices"][0]["text"])
            return "".join(texts)

        async def alone_then_together():
            async with httpx.AsyncClient(timeout=60) as client:
                alone = [await run(client, body) for body in requests]
                together = await asyncio.gather(*(run(client, body) for body in requests))
            return alone, together

        alone, together = asyncio.run(alone_then_together())
        metrics = gauges(server.url)
    mismatched = [i for i, (a, b) in enumerate(zip(alone, together)) if a != b]
    assert not mismatched, [(alone[i], together[i]) for i in mismatched]
    assert len(set(alone)) > 8  # the requests really differ
    assert metrics["kiln_request_finish_total{finish_reason=length}"] == 32
    assert (metrics.get("kiln_num_preemptions_total", 0) > 0) == pool.startswith("tiny")
    assert metrics["kiln_num_requests_running"] == 0 and metrics["kiln_kv_cache_usage_ratio"] == 0


# ---- disconnects and admission control ---------------------------------------------------
@pytest.fixture(scope="module")
def slow_server(llama_dir):
    """One KV-cache slot, one waiting place, 30 ms steps."""
    engine = SlowEngine(load_engine(str(llama_dir), "cpu", None, max_batch_size=1), delay=0.03)
    app = create_app(engine, ServerSettings(served_model_name="slow", max_queue=1))
    with LiveServer(app) as server:
        server.engine = engine
        yield server


def test_disconnect_mid_stream_frees_the_slot(slow_server):
    url = slow_server.url
    before = gauges(url)
    body = {"prompt": [5, 6, 7], "max_tokens": 60, "ignore_eos": True, "stream": True}  # ~1.8 s if not aborted
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first_data_line(lines)
            time.sleep(0.1)
            assert gauges(url)["kiln_num_requests_running"] == 1
        # leaving the block closes the connection mid-stream
    started = time.monotonic()
    after = wait_for(lambda: (g := gauges(url))["kiln_num_requests_running"] == 0 and g, 5.0, "the slot to free")
    assert time.monotonic() - started < 1.0
    assert after["kiln_request_finish_total{finish_reason=abort}"] \
        - before.get("kiln_request_finish_total{finish_reason=abort}", 0) == 1
    assert after["kiln_generation_tokens_total"] - before.get("kiln_generation_tokens_total", 0) < 40
    assert slow_server.engine.num_free_slots == 1  # read-only peek: the slot is back


def test_disconnect_while_waiting_for_a_non_streaming_answer(slow_server):
    url = slow_server.url
    before = gauges(url)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(url + "/v1/completions", json={"prompt": [5], "max_tokens": 60, "ignore_eos": True}, timeout=0.3)
    after = wait_for(lambda: (g := gauges(url))["kiln_num_requests_running"] == 0 and g, 5.0, "the slot to free")
    assert after["kiln_request_finish_total{finish_reason=abort}"] \
        - before.get("kiln_request_finish_total{finish_reason=abort}", 0) == 1
    assert after["kiln_generation_tokens_total"] - before.get("kiln_generation_tokens_total", 0) < 40


def test_full_queue_answers_429(slow_server):
    url = slow_server.url
    results = {}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", url + "/v1/completions",
                           json={"prompt": [5], "max_tokens": 50, "ignore_eos": True, "stream": True}) as running:
            lines = running.iter_lines()  # kept referenced: closing this iterator would close the connection
            first_data_line(lines)  # the request now holds the one slot

            def waiting_request():
                results["waiting"] = httpx.post(url + "/v1/completions", json={"prompt": [9], "max_tokens": 2},
                                                timeout=30)

            waiter = threading.Thread(target=waiting_request)
            waiter.start()
            wait_for(lambda: gauges(url)["kiln_num_requests_waiting"] == 1, 5.0, "the second request to queue")
            r = client.post(url + "/v1/completions", json={"prompt": [9], "max_tokens": 2})
            assert r.status_code == 429, r.text
            assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"
            assert r.headers["retry-after"] == "1"
            assert client.post(url + "/v1/perplexity", json={"input": [[1, 2, 3]]}).status_code == 429
            sdk = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                sdk.completions.create(model="slow", prompt=[9], max_tokens=2)
        waiter.join(30)
    assert results["waiting"].status_code == 200, results["waiting"].text  # the queued one got its turn
    assert gauges(url)["kiln_requests_total{endpoint=/v1/completions,status=429}"] == 2


# ---- the command line --------------------------------------------------------------------
def test_settings_from_flags(tmp_path):
    args = build_parser().parse_args([])
    settings = ServerSettings.from_args(args)
    assert settings.served_model_name == DEFAULT_MODEL_NAME and settings.host == "127.0.0.1"
    assert settings.port == 8000 and settings.api_key is None and settings.num_threads >= 1
    args = build_parser().parse_args(["--model", str(tmp_path), "--port", "0", "--max-queue", "3",
                                      "--threads", "2", "--api-key", "k"])
    settings = ServerSettings.from_args(args)
    assert (settings.served_model_name, settings.max_queue, settings.num_threads, settings.api_key) == \
        (tmp_path.name, 3, 2, "k")
    args = build_parser().parse_args(["--kv-block-size", "32", "--num-kv-blocks", "100", "--gpu-memory-fraction",
                                      "0.5", "--no-prefix-caching", "--max-prefill-tokens", "64", "--no-cuda-graphs",
                                      "--compile", "--no-async-scheduling", "--speculative-tokens", "0",
                                      "--kv-cache-dtype", "bf16"])
    settings = ServerSettings.from_args(args)
    got = (settings.kv_block_size, settings.num_kv_blocks, settings.gpu_memory_fraction,
           settings.enable_prefix_caching, settings.max_prefill_tokens, settings.cuda_graphs, settings.compile,
           settings.async_scheduling, settings.speculative_tokens, settings.kv_cache_dtype)
    assert got == (32, 100, 0.5, False, 64, False, True, False, 0, "bf16")
    assert ServerSettings.from_args(build_parser().parse_args([])).kv_cache_dtype == "auto"
    assert ServerSettings.from_args(build_parser().parse_args([])).speculative_tokens is None  # the engine's default
    assert ServerSettings.from_args(build_parser().parse_args([])).async_scheduling is None  # auto: CUDA only
    assert ServerSettings.from_args(build_parser().parse_args(["--async-scheduling"])).async_scheduling is True
    default = ServerSettings.from_args(build_parser().parse_args([]))
    assert (default.batch_size_for("cuda"), default.batch_size_for("cpu")) == (256, 8)  # by device
    chosen = ServerSettings.from_args(build_parser().parse_args(["--max-batch-size", "3"]))
    assert (chosen.batch_size_for("cuda"), chosen.batch_size_for("cpu")) == (3, 3)
    for bad in (["--port", "-1"], ["--max-batch-size", "0"], ["--device", "tpu"], ["--max-queue", "x"],
                ["--kv-block-size", "0"], ["--num-kv-blocks", "1"], ["--gpu-memory-fraction", "1.5"],
                ["--gpu-memory-fraction", "nan"], ["--max-prefill-tokens", "0"], ["--speculative-tokens", "16"],
                ["--speculative-tokens", "-1"], ["--kv-cache-dtype", "fp8"]):
        with pytest.raises(SystemExit) as e:
            main(bad)
        assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "missing")])
    assert e.value.code == 2


def test_chat_template_flag(tmp_path, capsys):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    settings = ServerSettings.from_args(build_parser().parse_args(["--chat-template", str(template)]))
    assert settings.chat_template == template.read_text()
    (tmp_path / "empty.jinja").write_text("  \n")
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}")
    for path, said in (("missing.jinja", "cannot read it"), ("empty.jinja", "is empty"),
                       ("broken.jinja", "does not compile")):
        with pytest.raises(SystemExit) as e:
            main(["--chat-template", str(tmp_path / path)])
        assert e.value.code == 2 and said in capsys.readouterr().err


def test_empty_api_key_flag_is_refused_not_dropped(tmp_path, monkeypatch, capsys):
    # `--api-key "$KEY"` with KEY unset must not start a server that needs no key
    monkeypatch.delenv("KILN_API_KEY", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["--api-key", "", "--model", str(tmp_path / "missing")])  # refused before the model is looked for
    assert e.value.code == 2
    assert capsys.readouterr().err == "kiln serve: error: --api-key must not be empty\n"
    monkeypatch.setenv("KILN_API_KEY", "from-env")
    assert ServerSettings.from_args(build_parser().parse_args([])).api_key == "from-env"
    assert ServerSettings.from_args(build_parser().parse_args(["--api-key", "k"])).api_key == "k"
    monkeypatch.setenv("KILN_API_KEY", "")
    assert ServerSettings.from_args(build_parser().parse_args([])).api_key is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(*flags: str) -> tuple[subprocess.Popen, str]:
    """`python -m server` in a subprocess (the shipped model unless --model is given), once healthy."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KILN_NO_NATIVE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--threads", "1",
                             "--log-level", "warning", *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.TransportError:
            assert proc.poll() is None, proc.stdout.read()
            return False

    try:
        wait_for(healthy, 60.0, "the server to come up")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, url


def test_python_m_server_serves_and_stops_on_sigterm(parrot_dir):
    proc, url = _start_server("--model", str(parrot_dir), "--served-model-name", "parrot", "--max-batch-size", "2")
    try:
        r = httpx.post(url + "/v1/completions", json={"prompt": "The quick", "max_tokens": 20, "temperature": 0})
        assert r.json()["choices"][0]["text"] == TEXTS[1][len("The quick"):]
        r = httpx.post(url + "/v1/perplexity", content=json.dumps({"input": TEXTS[1]}))  # as `curl -d` does
        assert r.status_code == 200 and r.json()["data"][0]["perplexity"] < 1.5
        with httpx.Client() as client:  # one keep-alive connection, as SDK clients hold
            client.get(url + "/health")
            started = time.perf_counter()
            for _ in range(20):
                assert client.get(url + "/health").status_code == 200
            # each answer without Nagle's wait for a delayed ACK (~40 ms: 0.8 s for 20); a few ms when it is off
            assert time.perf_counter() - started < 0.5
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


SLOW_LOADER = """
import time
import torch

def slow_loader(settings):  # torch's C++ at work, as a real load of a large model is
    a = torch.randn(1000, 1000)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        a = torch.tanh(a @ a)
    raise RuntimeError("stopped too late")
"""
SLOW_LOAD = """
import sys
import server.loading as loading
from slow_loader import slow_loader

loading.load_configured_engine = slow_loader  # (an importable function: --engine-process loads in a child)
sys.argv = ["server", *sys.argv[1:]]
from server.__main__ import main
main()
"""


@pytest.mark.parametrize("engine_process", [False, True], ids=["one-process", "engine-process"])
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_during_the_model_load_exits_at_once_and_cleanly(sig, status, engine_process, tmp_path):
    """A large model takes tens of seconds to load on a CPU; SIGTERM (docker stop) or Ctrl-C then must not wait
    for the load (the scheduler's stop had joined the loading thread for up to 30 s), nor abort at exit (an
    interpreter finalizing under a thread in torch's C++ ended in `terminate called`, status 134; with
    --engine-process, the engine process did so)."""
    (tmp_path / "slow_loader.py").write_text(SLOW_LOADER)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]), "KILN_NO_NATIVE": "1"}
    flags = ["--port", str(port), "--threads", "1", *(["--engine-process"] if engine_process else [])]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_LOAD, *flags], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def loading():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 503
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                return False

        wait_for(loading, 60.0, "the server to answer while loading")
        time.sleep(0.5)
        started = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == status, proc.stdout.read()
        assert time.monotonic() - started < 10
        out = proc.stdout.read()
        assert "terminate called" not in out and "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_served_connections_turn_nagle_off():
    """The socket kiln serve listens on names TCP as its protocol, so asyncio sets TCP_NODELAY on every
    connection it accepts (it checks sock.proto): a response's body is not held back behind its headers."""
    from server.__main__ import _bind

    sock = _bind("127.0.0.1", 0)

    async def accept_one() -> list[int]:
        seen = []

        async def handle(reader, writer):
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=sock)
        async with server:
            reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            await reader.read()  # until the server closes it
            writer.close()
        return seen

    [nodelay] = asyncio.run(accept_one())
    assert nodelay != 0


def test_a_port_in_use_or_a_directory_without_a_model_is_said_before_loading(parrot_dir, tmp_path, capsys,
                                                                             monkeypatch):
    """One line and exit 2, before any model is loaded (the loader would fail the test if called)."""
    import model.cli

    monkeypatch.setattr(model.cli, "load_engine", lambda *a, **k: pytest.fail("the model was loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as e:
            main(["--model", str(parrot_dir), "--port", str(port)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kiln serve: error: cannot listen on 127.0.0.1:{port}: ") and err.count("\n") == 1, err
    assert "another server is listening there" in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "empty"), "--port", str(_free_port())])
    assert e.value.code == 2
    assert "has no config.json: not a model directory" in capsys.readouterr().err


@pytest.mark.parametrize("engine_process", [False, True], ids=["one-process", "engine-process"])
@pytest.mark.parametrize("deadline", ["long", "short"])
def test_sigterm_lets_streams_end_cleanly(deadline, engine_process):
    """SIGTERM mid-stream: with time left before --shutdown-timeout the stream finishes; with none,
    it ends with an error event and [DONE]. Never a body cut off mid-stream; the process exits 0."""
    proc, url = _start_server("--shutdown-timeout", "30" if deadline == "long" else "0.5",
                              *(["--engine-process"] if engine_process else []))
    try:
        body = {"prompt": "The quick brown fox", "max_tokens": 120 if deadline == "long" else 500,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", url + "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                first_data_line(lines)
                proc.send_signal(signal.SIGTERM)
                events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events[-3:]
        chunks = [json.loads(e) for e in events[:-1]]
        if deadline == "long":
            assert chunks[-2]["choices"][0]["finish_reason"] == "length"
            assert chunks[-1]["usage"]["completion_tokens"] == 120  # every token, none cut off
            assert len("".join(c["choices"][0]["text"] for c in chunks[:-1])) > 50
        else:
            assert "shutting down" in chunks[-1]["error"]["message"], chunks[-1]
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_perplexity_client_that_goes_away_stops_its_job(slow_server):
    url = slow_server.url
    before = gauges(url)
    ids = [(7 * i) % 200 + 1 for i in range(64 * 1500)]  # ~3,000 windows: seconds of forwards
    with pytest.raises(httpx.ReadTimeout):  # the client gives up (curl's Ctrl-C, the playground's Stop)
        httpx.post(url + "/v1/perplexity", json={"input": [ids]}, timeout=0.3)
    key = "kiln_perplexity_requests_total{status=abort}"
    after = wait_for(lambda: (g := gauges(url)).get(key, 0) - before.get(key, 0) == 1 and g, 10.0,
                     "the job to be dropped")
    assert after.get("kiln_perplexity_requests_total{status=ok}", 0) == before.get(
        "kiln_perplexity_requests_total{status=ok}", 0)
    r = httpx.post(url + "/v1/perplexity", json={"input": "The quick brown fox"}, timeout=30)
    assert r.status_code == 200  # and the server scores on


# ---- --engine-process: the engine in a process of its own -------------------------------------
def _children(pid: int) -> list[int]:
    """The server's engine process(es): its spawned children (not multiprocessing's resource tracker)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split() if b"spawn_main" in Path(f"/proc/{x}/cmdline").read_bytes()]


def _start_time(pid: int) -> float:
    """A process's start (seconds since the epoch), from /proc as prometheus_client's ProcessCollector reads it."""
    ticks = os.sysconf("SC_CLK_TCK")
    started = float(Path(f"/proc/{pid}/stat").read_bytes().split(b")")[-1].split()[19]) / ticks
    boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime "))
    return boot + started


def test_engine_process_serves_the_same_and_stops_on_sigterm(parrot_dir):
    """`--engine-process`: completions (streamed or not, n=2), perplexity, refusals and /metrics as in one
    process, the engine's metric families and the API's each once; SIGTERM ends both processes cleanly."""
    proc, url = _start_server("--model", str(parrot_dir), "--served-model-name", "parrot", "--max-batch-size", "2",
                              "--max-queue", "2", "--engine-process")
    try:
        [engine_pid] = _children(proc.pid)
        r = httpx.post(url + "/v1/completions", json={"prompt": "The quick", "max_tokens": 20, "temperature": 0,
                                                      "n": 2, "logprobs": 1})
        assert r.status_code == 200, r.text
        assert [c["text"] for c in r.json()["choices"]] == [TEXTS[1][len("The quick"):]] * 2
        assert len(r.json()["choices"][0]["logprobs"]["tokens"]) == r.json()["usage"]["completion_tokens"] // 2
        body = {"prompt": "To be, or", "max_tokens": 30, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body) as s:
            events = [line[len("data: "):] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
        assert len(text) > 20 and TEXTS[0][len("To be, or"):].startswith(text), text
        r = httpx.post(url + "/v1/perplexity", json={"input": [TEXTS[1], TEXTS[0]]})
        assert r.status_code == 200 and all(d["perplexity"] < 1.5 for d in r.json()["data"]), r.text
        # refusals keep their status and shape: too many sequences at once (the engine process admits them)
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": 5})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        r = httpx.post(url + "/v1/completions", json={"prompt": [9999999], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        r = httpx.post(url + "/v1/perplexity", json={"input": "x", "stride": 0})
        assert r.status_code in (400, 422), r.text
        text = httpx.get(url + "/metrics").text
        families = [f.name for f in text_string_to_metric_families(text)]
        assert len(families) == len(set(families)), "a metric family exported twice"
        m = gauges(url)
        assert m["kiln_generation_tokens_total"] >= 40 and m["kiln_perplexity_requests_total{status=ok}"] == 1
        assert m["kiln_requests_total{endpoint=/v1/completions,status=200}"] == 2
        assert m["kiln_event_loop_delay_seconds_count"] >= 3
        # the engine process labels the cache it built: 2 rows x 2 sequences of 64 tokens in blocks of 16, + 1
        assert [k for k in m if k.startswith("kiln_cache_config_info{")] == \
            ["kiln_cache_config_info{block_size=16,cache_dtype=float32,enable_prefix_caching=true,num_blocks=17}"], m
        # each process's memory: the HTTP process's as process_*, the engine process's (the model's) as kiln_engine_*
        for prefix, pid in (("process", proc.pid), ("kiln_engine_process", engine_pid)):
            assert m[f"{prefix}_start_time_seconds"] == pytest.approx(_start_time(pid), abs=0.1), prefix
            assert m[f"{prefix}_resident_memory_bytes"] > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stdout.read()
        wait_for(lambda: not os.path.exists(f"/proc/{engine_pid}"), 10.0, "the engine process to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_engine_process_disconnect_aborts_and_its_death_fails_requests():
    """A stream whose client goes away is aborted in the engine process; if that process dies, requests in
    flight get an error (not a hang) and the server exits 1 saying why."""
    proc, url = _start_server("--engine-process", "--max-batch-size", "2")
    try:
        [engine_pid] = _children(proc.pid)
        body = {"prompt": "Once upon a time", "max_tokens": 900, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body) as s:
            first_data_line(s.iter_lines())
        wait_for(lambda: gauges(url).get("kiln_request_finish_total{finish_reason=abort}") == 1, 10.0,
                 "the abort to reach the engine process")
        wait_for(lambda: gauges(url)["kiln_num_requests_running"] == 0, 10.0, "the slot to be freed")
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as s:
            lines = s.iter_lines()
            first_data_line(lines)
            os.kill(engine_pid, signal.SIGKILL)
            events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "engine process exited" in json.loads(events[-2])["error"]["message"]
        assert proc.wait(timeout=30) == 1
        assert "could not load the model: the engine process exited" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_engine_process_load_failure_exits_1(tmp_path):
    """A model the engine process cannot load: the error is printed and the server exits 1."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "kiln", "vocab_size": 8}')
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KILN_NO_NATIVE": "1"}
    proc = subprocess.run([sys.executable, "-m", "server", "--port", str(port), "--model", str(bad), "--threads", "1",
                           "--engine-process"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "kiln serve: error: could not load the model:" in proc.stderr
