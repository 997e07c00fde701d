"""The worker thread on its own: aborts within a step, no busy wait, shutdown, engine failures."""

from __future__ import annotations

import asyncio
import time

import pytest
from fastapi.testclient import TestClient

from model.cli import default_model_dir, load_engine
from model.engine import SamplingParams
from server.app import create_app
from server.metrics import ServerMetrics
from model.requests import TokenLogprob
from model.tokenizer import load_tokenizer
from server.scheduler import (Accepted, Failed, Generation, NotReady, QueueFull, Rejected, Scheduler,
                              SequenceOutput)
from server.settings import ServerSettings


class CountingEngine:
    """A real engine that counts its steps and `has_work` checks, and can be made to fail or slow down."""

    def __init__(self, engine, delay: float = 0.0):
        self._engine = engine
        self.delay = delay
        self.steps = 0
        self.checks = 0
        self.fail_next_step = False

    @property
    def has_work(self):
        self.checks += 1
        return self._engine.has_work

    def step(self):
        self.steps += 1
        time.sleep(self.delay)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("simulated device failure")
        return self._engine.step()

    def __getattr__(self, name):
        return getattr(self._engine, name)


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def engine(llama_dir, request):
    """Both ways the engine returns ids: at the end of each step, or one step late (CUDA's default)."""
    return CountingEngine(load_engine(str(llama_dir), "cpu", None, max_batch_size=2,
                                      async_scheduling=request.param), delay=0.01)


def before_each_forward(engine: CountingEngine, hook) -> None:
    """Call hook(max_tokens) before every batched forward of the perplexity tasks the engine makes from now
    on (max_tokens: the forward's token budget the scheduler passed, None for the task's own)."""
    make_task = engine.score_task

    def score_task(*args, **kwargs):
        task = make_task(*args, **kwargs)
        advance = task.advance

        def hooked(max_tokens=None):
            hook(max_tokens)
            advance(max_tokens)

        task.advance = hooked
        return task

    engine.score_task = score_task


def long_params(n: int = 50) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


async def next_item(generation, timeout: float = 10.0):
    return await asyncio.wait_for(generation.queue.get(), timeout)


def test_abort_frees_the_slot_within_one_step(engine):
    async def scenario():
        scheduler = Scheduler(engine, ServerMetrics("t"), max_queue=4)
        scheduler.start(asyncio.get_running_loop())
        generation = scheduler.submit([[5, 6, 7]], [long_params()])
        assert isinstance(await next_item(generation), Accepted)
        assert isinstance(await next_item(generation), SequenceOutput)
        assert engine.num_free_slots == 1
        steps_at_abort = engine.steps
        scheduler.abort(generation)
        deadline = time.monotonic() + 5
        while engine.num_free_slots != 2:  # read-only peek at the worker's engine
            assert time.monotonic() < deadline, "the slot was never freed"
            await asyncio.sleep(0.001)
        assert engine.steps - steps_at_abort <= 1, engine.steps - steps_at_abort
        assert not engine.running and not engine.waiting
        await asyncio.to_thread(scheduler.stop)

    asyncio.run(scenario())


def test_idle_worker_sleeps(engine):
    async def scenario():
        scheduler = Scheduler(engine, ServerMetrics("t"), max_queue=4)
        scheduler.start(asyncio.get_running_loop())
        generation = scheduler.submit([[5]], [long_params(3)])
        while not (isinstance(item := await next_item(generation), SequenceOutput) and item.finish_reason):
            pass
        await asyncio.sleep(0.05)
        checks, steps = engine.checks, engine.steps
        await asyncio.sleep(0.3)
        assert engine.steps == steps and engine.checks - checks <= 1, (engine.checks - checks, "busy loop")
        await asyncio.to_thread(scheduler.stop)

    asyncio.run(scenario())


def test_queue_limit_and_states(engine):
    async def scenario():
        scheduler = Scheduler(engine, ServerMetrics("t"), max_queue=2)
        with pytest.raises(NotReady, match="loading"):
            scheduler.submit([[5]], [long_params()])
        scheduler.start(asyncio.get_running_loop())
        while not scheduler.ready:
            await asyncio.sleep(0.001)
        with pytest.raises(ValueError, match="at most 4 fit at once"):  # 2 waiting + 2 running
            scheduler.submit([[5]] * 5, [long_params()] * 5)
        # a burst into an idle server: the 2 free slots take 2 at the next step, 2 more may wait
        burst = [scheduler.submit([[5 + i]], [long_params()]) for i in range(4)]
        with pytest.raises(QueueFull, match="sequences are already waiting for"):
            scheduler.submit([[9]], [long_params()])
        await asyncio.to_thread(scheduler.stop)  # (the burst ends with a 503)
        for generation in burst:  # (taken: admitted, or refused only by the shutdown)
            first = await next_item(generation)
            assert isinstance(first, Accepted) or (isinstance(first, Rejected) and first.status == 503), first

        scheduler = Scheduler(engine, ServerMetrics("t"), max_queue=2)
        scheduler.start(asyncio.get_running_loop())
        while not scheduler.ready:
            await asyncio.sleep(0.001)
        running = scheduler.submit([[5], [6]], [long_params(), long_params()])  # fills both slots
        while len(engine.running) < 2 or scheduler._num_waiting:  # both prefilled (read-only peek)
            await asyncio.sleep(0.001)
        waiting = scheduler.submit([[7], [8]], [long_params(), long_params()])  # fills the queue
        with pytest.raises(QueueFull, match="2 sequences are already waiting"):
            scheduler.submit([[9]], [long_params()])
        with pytest.raises(QueueFull):
            scheduler.submit_score([[1, 2, 3]], None)
        # shutdown: everything in flight ends with a 503
        await asyncio.to_thread(scheduler.stop)
        for generation in (running, waiting):
            items = [generation.queue.get_nowait() for _ in range(generation.queue.qsize())]
            assert isinstance(items[-1], (Failed, Rejected)) and items[-1].status == 503, items[-1]
        assert engine.num_free_slots == 2 and not engine.has_work
        with pytest.raises(NotReady, match="shutting down"):
            scheduler.submit([[5]], [long_params()])

    asyncio.run(scenario())


def test_rejections_name_the_prompt(engine):
    async def scenario():
        scheduler = Scheduler(engine, ServerMetrics("t"), max_queue=8)
        scheduler.start(asyncio.get_running_loop())
        ok = SamplingParams(max_tokens=2)
        generation = scheduler.submit([[5], [5], [6] * 70, [6] * 70], [ok] * 4, n=2)
        item = await next_item(generation)
        assert isinstance(item, Rejected) and item.status == 400
        assert item.message.startswith("prompt 1: ") and "the prompt has 70 tokens" in item.message
        assert engine.num_free_slots == 2 and not engine.waiting  # nothing of it stays behind
        await asyncio.to_thread(scheduler.stop)

    asyncio.run(scenario())


def test_engine_failure_fails_requests_and_the_server_lives_on(engine):
    app = create_app(engine, ServerSettings(served_model_name="t"))
    with TestClient(app) as client:
        engine.fail_next_step = True
        r = client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 4})
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert error["type"] == "server_error" and "simulated device failure" in error["message"]
        assert engine.num_free_slots == 2
        r = client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        engine.fail_next_step = True
        with client.stream("POST", "/v1/completions", json={"prompt": [5], "max_tokens": 4, "stream": True}) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert "simulated device failure" in events[0] and events[-1] == "data: [DONE]"
        assert client.get("/health").status_code == 200


def test_non_streaming_outputs_arrive_together_at_the_end(engine):
    """stream=False: nothing reaches the event loop until the sequence finishes; then every step's output."""
    async def scenario():
        scheduler = Scheduler(engine, ServerMetrics("t"), max_queue=4)
        scheduler.start(asyncio.get_running_loop())
        held = scheduler.submit([[5, 6, 7]], [long_params(12)], stream=False)
        streamed = scheduler.submit([[5, 6, 7]], [long_params(12)])
        assert isinstance(await next_item(held), Accepted)
        assert isinstance(await next_item(streamed), Accepted)
        first = await next_item(streamed)
        assert isinstance(first, SequenceOutput) and first.finish_reason is None
        assert held.queue.empty()  # the streamed twin has output already; the held one not yet
        outputs = [await next_item(held) for _ in range(12)]
        assert [len(o.token_ids) for o in outputs] == [1] * 12
        assert [o.finish_reason for o in outputs] == [None] * 11 + ["length"]
        streamed_outputs = [first] + [await next_item(streamed) for _ in range(11)]
        assert [o.token_ids for o in outputs] == [o.token_ids for o in streamed_outputs]
        await asyncio.to_thread(scheduler.stop)

    asyncio.run(scenario())


def test_long_perplexity_job_interleaves_with_decoding(engine):
    """A text of many windows is scored one batched forward per loop turn, with decode steps between, each
    forward no longer than a prefill chunk while the sequence decodes."""
    steps_at_forward, budgets = [], []
    before_each_forward(engine, lambda max_tokens: (steps_at_forward.append(engine.steps), budgets.append(max_tokens)))

    async def scenario():
        scheduler = Scheduler(engine, ServerMetrics("t"), max_queue=4)
        scheduler.start(asyncio.get_running_loop())
        generation = scheduler.submit([[5, 6, 7]], [long_params(60)])
        assert isinstance(await next_item(generation), Accepted)
        assert isinstance(await next_item(generation), SequenceOutput)
        ids = [(7 * i) % 200 + 1 for i in range(64 * 70)]  # ~140 windows of 64: three forwards
        results = await asyncio.wait_for(scheduler.submit_score([ids], None), 60)
        assert results[0].num_scored == len(ids) - 1
        assert len(steps_at_forward) >= 3
        assert all(b > a for a, b in zip(steps_at_forward, steps_at_forward[1:])), steps_at_forward
        assert budgets[0] == engine.max_prefill_tokens  # the 60-token sequence is still decoding
        scheduler.abort(generation)
        await asyncio.to_thread(scheduler.stop)

    asyncio.run(scenario())


def test_queue_time_ends_at_the_first_prefill_chunk(llama_dir):
    """A prompt prefilled in 3 chunks (3 steps of 50 ms): its queue time is ~0, not 2 steps; a perplexity
    job's token counter counts the tokens scored (not each input's first token)."""
    engine = CountingEngine(load_engine(str(llama_dir), "cpu", None, max_batch_size=2, max_prefill_tokens=4),
                            delay=0.05)
    metrics = ServerMetrics("t")

    async def scenario():
        scheduler = Scheduler(engine, metrics, max_queue=4)
        scheduler.start(asyncio.get_running_loop())
        while not scheduler.ready:
            await asyncio.sleep(0.001)
        generation = scheduler.submit([list(range(5, 15))], [long_params(2)])
        items = [await next_item(generation) for _ in range(3)]
        assert items[-1].finish_reason == "length"
        assert (await asyncio.wait_for(scheduler.submit_score([[5, 6, 7], [8, 9]], None), 10)) is not None
        await asyncio.to_thread(scheduler.stop)

    asyncio.run(scenario())
    value = metrics.registry.get_sample_value
    assert value("kiln_request_queue_time_seconds_count") == 1
    assert value("kiln_request_queue_time_seconds_sum") < 0.03  # (the third chunk starts ~0.1 s after arrival)
    assert engine.steps >= 4  # 3 prefill chunks, then the second token's decode
    assert value("kiln_perplexity_tokens_total") == 2 + 1


def test_a_dropped_perplexity_job_stops_scoring(llama_dir):
    """abort_score (the client went away): the job's forwards stop; a job sharing none runs on."""
    engine = CountingEngine(load_engine(str(llama_dir), "cpu", None, max_batch_size=2), delay=0.0)
    forwards = []
    before_each_forward(engine, lambda _: (forwards.append(time.monotonic()), time.sleep(0.02)))
    metrics = ServerMetrics("t")
    ids = [(7 * i) % 200 + 1 for i in range(64 * 200)]  # ~400 windows of 64: many forwards

    async def scenario():
        scheduler = Scheduler(engine, metrics, max_queue=4)
        scheduler.start(asyncio.get_running_loop())
        future = scheduler.submit_score([ids], None)
        while len(forwards) < 2:
            await asyncio.sleep(0.005)
        scheduler.abort_score(future)
        while scheduler._score_runs:  # read-only peek: the run is dropped
            await asyncio.sleep(0.005)
        done = len(forwards)
        await asyncio.sleep(0.1)
        assert len(forwards) == done and not future.done()  # no more forwards; the caller owns the future
        short = await asyncio.wait_for(scheduler.submit_score([[5, 6, 7]], None), 10)  # the server scores on
        assert short[0].num_scored == 2
        await asyncio.to_thread(scheduler.stop)

    asyncio.run(scenario())
    assert metrics.registry.get_sample_value("kiln_perplexity_requests_total", {"status": "abort"}) == 1


def test_a_step_far_slower_than_the_recent_ones_is_logged_at_debug(caplog):
    """Each step's duration goes to kiln_engine_step_seconds; one both >= SLOW_STEP_MIN_S and SLOW_STEP_FACTOR
    times the recent median is logged at debug (how a stall mid-serving, a kernel compiling, shows in a log),
    and nothing is logged while steps run at their usual pace or before there is a median to compare with."""
    import logging

    from server import scheduler as sched

    class Idle:  # the engine attributes the log line reads
        running = [object(), object()]

        def step(self):
            return []

    metrics = ServerMetrics("m")
    s = Scheduler(Idle(), metrics)
    caplog.set_level(logging.DEBUG, logger="kiln.server")
    s._note_step(1.0)  # no history yet: nothing to compare with
    for _ in range(20):
        s._note_step(0.002)
    s._note_step(0.019)  # slower, but not a stall
    assert not [r for r in caplog.records if "slow engine step" in r.message]
    s._note_step(sched.SLOW_STEP_MIN_S)
    slow = [r.getMessage() for r in caplog.records if "slow engine step" in r.getMessage()]
    assert len(slow) == 1 and "2 sequences running" in slow[0] and "median of the last 22 (2.0 ms)" in slow[0]
    assert "kiln_engine_step_seconds_count 23.0" in metrics.render().decode()



def test_event_loop_delay_measures_how_long_outputs_wait_for_a_busy_loop(caplog):
    """kiln_event_loop_delay_seconds: from the worker posting a step's outputs to the event loop handing
    them to the streams; a loop kept busy for 0.3 s (as by sending a backlog of events) shows as 0.3 s, and
    is logged at debug (once a second at most); a prompt delivery is not."""
    import logging

    from server import scheduler as sched

    metrics = ServerMetrics("m")
    s = Scheduler(object(), metrics)
    caplog.set_level(logging.DEBUG, logger="kiln.server")

    async def run() -> list[SequenceOutput]:
        s._loop = asyncio.get_running_loop()
        generation = Generation([[1]], [SamplingParams()])
        got = []
        for busy in (0.0, sched.LAGGING_LOOP_S + 0.05, sched.LAGGING_LOOP_S + 0.05):
            s._post([(generation.queue, SequenceOutput(0, (5,), "x", (), None, None))])  # as the worker does
            time.sleep(busy)  # the loop is busy elsewhere
            got.append(await asyncio.wait_for(generation.queue.get(), 5))
        return got

    assert [out.token_ids for out in asyncio.run(run())] == [(5,)] * 3
    text = metrics.render().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("kiln_event_loop_delay_seconds_")}
    assert values["kiln_event_loop_delay_seconds_count"] == 3
    assert 2 * (sched.LAGGING_LOOP_S + 0.05) <= values["kiln_event_loop_delay_seconds_sum"] < 3.0, values
    lagging = [r.getMessage() for r in caplog.records if "event loop behind the engine" in r.getMessage()]
    assert len(lagging) == 1, lagging  # the second lag came within a second of the first

class _NoScheduler:
    def __init__(self):
        self.aborted = []

    def abort(self, generation):
        self.aborted.append(generation)


def _sequence_outputs(tokenizer, text: str, index: int) -> list[SequenceOutput]:
    """One output per token of `text`, with logprobs (offsets into the choice's text), the last finishing."""
    ids = tokenizer.encode(text)
    outs, offset = [], 0
    for i, token_id in enumerate(ids):
        piece = tokenizer.decode([token_id])
        lp = TokenLogprob(token_id, -0.25 * (i + 1), [(token_id, -0.25 * (i + 1)), (ids[0], -3.0)], offset)
        outs.append(SequenceOutput(index, (token_id,), piece, (lp,), "length" if i == len(ids) - 1 else None,
                                   None))
        offset += len(piece)
    return outs


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_a_lagging_stream_sends_its_backlog_as_one_chunk_per_choice(chat):
    """When outputs pile up in a stream's queue (the event loop behind the engine), each choice's pending
    tokens go out as one chunk whose text and logprobs are exactly those of the per-token chunks; a stream
    that keeps up still gets one chunk per token."""
    from server.chat import ChatFormat
    from server.completions import TEXT_FORMAT, ChoiceBuilder, _stream_chunks

    tokenizer = load_tokenizer(default_model_dir())
    texts = ["The kiln fires the clay.", "Glaze melts at high heat!"]
    per_choice = [_sequence_outputs(tokenizer, t, i) for i, t in enumerate(texts)]
    interleaved = [out for pair in zip(*per_choice) for out in pair] + [
        out for outs in per_choice for out in outs[min(map(len, per_choice)):]]

    async def run(backlog: bool) -> list[dict]:
        generation = Generation([[1], [1]], [SamplingParams(), SamplingParams()], n=2)
        builders = [ChoiceBuilder(i, tokenizer, [1], False, 1) for i in range(2)]
        fmt = ChatFormat(tokenizer, 1) if chat else TEXT_FORMAT
        chunks = _stream_chunks(generation, _NoScheduler(), builders, "id", 0, "m", None, fmt)
        got = [await chunks.__anext__() for _ in fmt.opening(builders)]
        if backlog:
            for out in interleaved:
                generation.queue.put_nowait(out)
            got += [chunk async for chunk in chunks]
        else:
            for out in interleaved:
                generation.queue.put_nowait(out)
                got.append(await chunks.__anext__())
            assert [chunk async for chunk in chunks] == []
        return got

    def per_index(chunks: list[dict]) -> dict[int, dict]:
        seen: dict[int, dict] = {}
        for chunk in chunks:
            (choice,) = chunk["choices"]
            acc = seen.setdefault(choice["index"], {"text": "", "logprobs": {}, "chunks": 0, "finish": None})
            acc["chunks"] += 1
            acc["text"] += choice["delta"].get("content", "") if chat else choice["text"]
            for key, values in (choice["logprobs"] or {}).items():
                acc["logprobs"].setdefault(key, []).extend(values)
            acc["finish"] = choice["finish_reason"]
        return seen

    one_by_one, merged = per_index(asyncio.run(run(False))), per_index(asyncio.run(run(True)))
    opening = 1 if chat else 0
    for i, text in enumerate(texts):
        assert one_by_one[i]["chunks"] == len(per_choice[i]) + opening
        assert merged[i]["chunks"] == 1 + opening, merged[i]
        assert merged[i]["text"] == one_by_one[i]["text"] == text
        assert merged[i]["logprobs"] == one_by_one[i]["logprobs"]
        assert len(merged[i]["logprobs"]["content" if chat else "tokens"]) == len(per_choice[i])
        assert merged[i]["finish"] == one_by_one[i]["finish"] == "length"


def test_draining_a_backlog_stops_at_a_failure():
    from server.completions import TEXT_FORMAT, ChoiceBuilder, _stream_chunks

    tokenizer = load_tokenizer(default_model_dir())
    outs = _sequence_outputs(tokenizer, "one two three four", 0)

    async def run() -> tuple[list[dict], _NoScheduler]:
        generation = Generation([[1]], [SamplingParams()])
        scheduler = _NoScheduler()
        chunks = _stream_chunks(generation, scheduler, [ChoiceBuilder(0, tokenizer, [1], False, None)],
                                "id", 0, "m", None, TEXT_FORMAT)
        for out in outs[:2]:
            generation.queue.put_nowait(out)
        generation.queue.put_nowait(Failed("the engine failed", 500))
        generation.queue.put_nowait(outs[2])
        return [chunk async for chunk in chunks], scheduler

    chunks, scheduler = asyncio.run(run())
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["".join(o.text for o in outs[:2])]
    assert chunks[-1]["error"]["message"] == "the engine failed"
    assert scheduler.aborted == []  # a failed submission is over: nothing left to abort


def test_a_value_observed_many_times_at_once_counts_as_that_many_observations():
    """BatchHistogram.observe_many(v, k), used for a step's shared inter-token gap, renders exactly as k
    observe(v) calls (it updates prometheus_client's sum and bucket directly: this fails if those move)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from server.metrics import ITL_BUCKETS, BatchHistogram

    def render(update) -> list[str]:
        registry = CollectorRegistry()
        histogram = BatchHistogram("h_seconds", "h", buckets=ITL_BUCKETS, registry=registry)
        update(histogram)
        return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]

    values = [(0.0123, 7), (0.0004, 1), (3.0, 2), (0.0123, 3), (100.0, 4)]
    one_by_one = render(lambda h: [h.observe(v) for v, k in values for _ in range(k)])
    at_once = render(lambda h: [h.observe_many(v, k) for v, k in values])
    assert at_once == one_by_one
    assert 'h_seconds_bucket{le="0.025"} 11.0' in at_once and "h_seconds_count 17.0" in at_once


def test_a_refusal_that_arrives_as_an_item_answers_as_a_raised_one():
    """With --engine-process the engine process admits submissions, so a full queue or a server not ready
    arrives as the submission's first item: it must answer as `admission_errors` does for the raised kind."""
    from server.completions import admission_errors, refusal_error
    from server.errors import APIError

    for raised, item in ((QueueFull("busy"), Rejected("busy", 429)), (NotReady("loading"), Rejected("loading", 503)),
                         (ValueError("too many"), Rejected("too many", 400, "n"))):
        with pytest.raises(APIError) as e:
            with admission_errors("n"):
                raise raised
        got = refusal_error(item)
        assert (got.status, got.message, got.param, got.code, got.headers) == \
            (e.value.status, e.value.message, e.value.param, e.value.code, e.value.headers)
    # what both give (OpenAI's statuses; Retry-After where waiting helps)
    busy, loading, bad = (refusal_error(r) for r in (Rejected("busy", 429), Rejected("loading", 503),
                                                     Rejected("too many", 400, "n")))
    assert (busy.status, busy.code, busy.headers) == (429, "queue_full", {"Retry-After": "1"})
    assert (loading.status, loading.code, loading.headers) == (503, "not_ready", {"Retry-After": "1"})
    assert (bad.status, bad.param, bad.code, bad.headers) == (400, "n", None, None)
