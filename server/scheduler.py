"""The continuous-batching loop: one worker thread owns the engine, the asyncio loop only queues.

HTTP handlers call `submit()` / `submit_score()` / `abort()` (cheap, thread-safe, never
touching the engine) and then await their own asyncio queue or future. The worker thread
sleeps on a condition variable while there is nothing to do; otherwise each iteration:

1. applies aborts (a disconnected client's sequences leave the batch and free their
   slot and KV-cache blocks before the next step),
2. adds submitted sequences to the engine (`engine.add_request`, which also validates:
   a rejection goes back to the handler as `Rejected`, so it can answer 400),
3. advances the perplexity jobs by one batched forward (`engine.score_task`, batched across
   jobs), so a long text never stalls the running streams for more than one forward,
4. runs one `engine.step()`: waiting sequences get a slot and KV blocks, are prefilled (long
   prompts in chunks) and join the running decode batch; finished ones leave at once,
5. hands every sequence's `SequenceOutput` to its handler's queue with one
   `loop.call_soon_threadsafe` per iteration, and updates the metrics.

Admission control: at most `max_queue` sequences wait for a slot (submitted but not yet
prefilled), beyond the ones the free slots take at the next step; `submit()` raises
`QueueFull` beyond that (HTTP 429) instead of queueing without bound, and `NotReady` (HTTP
503) while the model loads or the server stops.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from model.engine import Engine, Request, SamplingParams, ScoreResult, TokenLogprob
from model.scoring import ScoreTask

from .metrics import ServerMetrics

log = logging.getLogger("kiln.server")

# A step this much slower than the recent median, and at least this long, is logged (debug): every running
# stream waited for it (a kernel compiling or tuning, a preemption, a long prefill chunk).
SLOW_STEP_FACTOR, SLOW_STEP_MIN_S = 10.0, 0.25
LAGGING_LOOP_S = 0.25  # a step's outputs waiting this long for the event loop are logged (debug, once a second)

# scheduler states
CREATED, STARTING, READY, STOPPING, STOPPED, FAILED = "created", "starting", "ready", "stopping", "stopped", "failed"


class QueueFull(Exception):
    """The waiting queue is full (HTTP 429)."""


class NotReady(Exception):
    """The model is loading, failed to load, or the server is stopping (HTTP 503)."""


# ---- what the worker sends to a handler's queue -------------------------------------------
@dataclass(frozen=True)
class Accepted:
    """All sequences of the submission are in the engine."""


@dataclass(frozen=True)
class Rejected:
    """The engine refused the submission (bad parameters, prompt too long...)."""

    message: str
    status: int = 400
    param: str | None = None  # the request field at fault, when the engine names one


@dataclass(frozen=True)
class Failed:
    """The submission ended without finishing (engine error, shutdown)."""

    message: str
    status: int = 500


@dataclass(frozen=True)
class SequenceOutput:
    """One step's output of one sequence of a submission."""

    index: int  # which sequence of the submission
    token_ids: tuple[int, ...]  # generated this step (0 or 1)
    text: str  # newly showable text (whole characters, stop strings removed)
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: str | None
    prompt_logprobs: list[TokenLogprob] | None  # on the first output, when asked for


QueueItem = Accepted | Rejected | Failed | SequenceOutput


def rejection(error: QueueFull | NotReady | ValueError, param: str | None) -> Rejected:
    """A refusal `submit` or `submit_score` raised, as the item that says it: a full queue 429, not ready 503,
    an input it cannot take 400 naming `param`."""
    if isinstance(error, QueueFull):
        return Rejected(str(error), 429)
    if isinstance(error, NotReady):
        return Rejected(str(error), 503)
    return Rejected(str(error), 400, param)


def drain(queue: asyncio.Queue[QueueItem], first: QueueItem) -> list[QueueItem]:
    """`first` and whatever else is already waiting in `queue`, with each sequence's consecutive outputs merged
    into one (their tokens, text and logprobs in order; the last one's finish reason).

    A stream reads its queue through this: when the event loop falls behind the engine (a small model's steps
    come faster than one server process can send their events), the tokens that piled up go out as one chunk
    per sequence, not one each, so the cost of sending stays bounded by the loop's pace instead of growing
    with the backlog (vLLM merges a request's pending outputs the same way). Nothing is waited for: an
    up-to-date stream still gets every token in its own chunk. Reading stops at a `Failed`, which comes last
    (the stream ends there)."""
    items: list[QueueItem] = []
    latest: dict[int, int] = {}  # sequence index -> where in `items` its merged output is
    item = first
    while True:
        at = latest.get(item.index) if isinstance(item, SequenceOutput) else None
        if at is None:
            if isinstance(item, SequenceOutput):
                latest[item.index] = len(items)
            items.append(item)
        else:
            before = items[at]
            items[at] = SequenceOutput(item.index, before.token_ids + item.token_ids, before.text + item.text,
                                       before.logprobs + item.logprobs, item.finish_reason, before.prompt_logprobs)
        if isinstance(item, Failed) or queue.empty():
            return items
        item = queue.get_nowait()


class Generation:
    """One completion request: its sequences (prompt x n), and the queue its outputs arrive on."""

    def __init__(self, prompts: list[list[int]], params: list[SamplingParams], n: int = 1, stream: bool = True):
        if len(prompts) != len(params):
            raise ValueError("one SamplingParams per sequence is needed")
        self.prompts = prompts  # one per sequence: prompt i's n choices are consecutive
        self.n = n
        # False: the handler only needs the whole result, so a sequence's outputs are held on the
        # worker and delivered together when it finishes (no event-loop wake-up per token)
        self.stream = stream
        self.params = params
        self.queue: asyncio.Queue[QueueItem] = asyncio.Queue()
        self.arrival = time.monotonic()
        self.cancelled = False  # set under the scheduler lock
        self.remote_id: int | None = None  # its id in the engine process (server/engine_process.py), if any
        self._requests: list[Request] = []  # worker-only

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class ScoreJob:
    """One perplexity request: texts (encoded on the worker) or id lists, and where the result goes."""

    inputs: list[str | list[int]]
    stride: int | None
    future: asyncio.Future
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # the client went away (set by the worker)


@dataclass
class _ScoreRun:  # worker-only: one resumable engine scoring task serving one or more jobs
    task: ScoreTask
    jobs: list[tuple[ScoreJob, int]]  # each job and how many of the task's sequences are its own


@dataclass
class _Sequence:  # worker-only bookkeeping of one engine request
    generation: Generation
    index: int
    request: Request
    prefilled: bool = False
    last_token_at: float | None = None
    held: list = field(default_factory=list)  # outputs not yet delivered (non-streaming generations)


class ServingState:
    """The load/serve/stop state the routes read, of a `Scheduler` or an `EngineProcess`."""

    _state: str
    load_error: BaseException | None
    metrics: ServerMetrics
    _lag_logged: float = 0.0  # when a lagging event loop was last logged

    @property
    def state(self) -> str:
        return self._state

    @property
    def ready(self) -> bool:
        return self._state == READY

    def not_ready_message(self) -> str:
        if self._state in (CREATED, STARTING):
            return "the model is still loading; retry in a moment"
        if self._state == FAILED:
            return f"the model failed to load: {self.load_error}"
        return "the server is shutting down"

    def _note_delivery(self, posted: float) -> None:
        """(event-loop thread) A step's outputs posted at `posted` (time.monotonic) are being handed to their
        streams now: observe the wait, and log it (debug, once a second) when the loop lags far behind."""
        now = time.monotonic()
        lag = now - posted
        self.metrics.event_loop_delay.observe(lag)
        if lag >= LAGGING_LOOP_S and now - self._lag_logged >= 1.0 and log.isEnabledFor(logging.DEBUG):
            self._lag_logged = now
            log.debug("event loop behind the engine: a step's outputs waited %.3f s to be handed to the streams "
                      "(HTTP and streaming, not the engine, held them)", lag)


class Scheduler(ServingState):
    def __init__(self, engine: Engine | Callable[[], Engine], metrics: ServerMetrics, max_queue: int = 256):
        # an engine, or a zero-argument loader run on the worker thread (the app answers 503 meanwhile)
        self._loader: Callable[[], Engine] | None = None if hasattr(engine, "step") else engine
        self.engine: Engine | None = engine if self._loader is None else None
        self.metrics = metrics
        self.max_queue = max_queue
        self.load_error: BaseException | None = None
        self.on_fatal: Callable[[], None] | None = None  # called (from the worker) when loading fails
        self.on_ready: Callable[[], None] | None = None  # called (from the worker) once the engine is ready
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._state = CREATED
        self._incoming: list[Generation] = []
        self._aborts: list[Generation] = []
        self._score_jobs: list[ScoreJob] = []
        self._score_cancels: list[asyncio.Future] = []  # perplexity jobs whose client went away
        self._score_runs: collections.deque[_ScoreRun] = collections.deque()  # worker-only, started jobs
        self._seen_totals: dict[str, int] = {}  # worker-only: engine totals already added to the counters
        self._num_waiting = 0  # sequences submitted and not yet prefilled (incl. pending score inputs)
        self._sequences: dict[int, _Sequence] = {}  # request_id -> sequence; worker-only
        self._unstarted: list[_Sequence] = []  # admitted, no prefill chunk run yet (for queue time); worker-only
        self._step_seconds: collections.deque[float] = collections.deque(maxlen=128)  # worker-only, recent steps
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- state -----------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    # ---- lifecycle (called from the event loop / lifespan) ----------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            if self._state != CREATED:
                raise RuntimeError(f"the scheduler was already started (state {self._state})")
            self._loop = loop
            self._state = STARTING
        self._thread = threading.Thread(target=self._run, name="kiln-scheduler", daemon=True)
        self._thread.start()

    @property
    def loading(self) -> bool:
        """Whether the worker is still inside the model's load (a loader was given and has not returned);
        the engine process (`server.engine_process`) has no such state here."""
        return self._loader is not None and self.engine is None and self._thread is not None and \
            self._thread.is_alive()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop accepting, abort what is in flight (handlers get a 503), join the worker. Blocking.

        While the model is still loading nothing can be in flight, so it does not wait for the load (a large
        model's takes tens of seconds, past a container's stop grace period): the worker, a daemon thread,
        sees STOPPING when the load returns and ends, or ends with the process."""
        with self._wakeup:
            if self._state == CREATED:
                self._state = STOPPED
                return
            loading = self.loading
            if self._state in (STARTING, READY):
                self._state = STOPPING
            self._wakeup.notify()
        if self._thread is not None and not loading:
            self._thread.join(timeout)

    # ---- submissions (event-loop thread) ----------------------------------------------------
    def submit(self, prompts: list[list[int]], params: list[SamplingParams], n: int = 1,
               stream: bool = True) -> Generation:
        """One sequence per (prompt, params) pair; `n` consecutive sequences share a prompt.

        With stream=False each sequence's outputs arrive together when it finishes."""
        return self.submit_generation(Generation(prompts, params, n, stream))

    def submit_generation(self, generation: Generation) -> Generation:
        """`submit` for a Generation made by the caller (the engine process registers it first)."""
        self._enqueue(len(generation), lambda: self._incoming.append(generation))
        return generation

    def submit_score(self, inputs: list[str | list[int]], stride: int | None,
                     future: asyncio.Future | None = None) -> asyncio.Future:
        """A perplexity job; its result (or error) settles `future` (default: a new one of the event loop)."""
        if future is None:
            future = (self._loop or asyncio.get_running_loop()).create_future()
        job = ScoreJob(inputs, stride, future)
        self._enqueue(len(inputs), lambda: self._score_jobs.append(job), "texts to score (inputs)")
        return job.future

    def _enqueue(self, units: int, add: Callable[[], None], what: str = "sequences (prompts x n)") -> None:
        engine = self.engine
        most = self.max_queue + (engine.max_batch_size if engine is not None else 0)
        if units > most:
            raise ValueError(f"this request needs {units} {what} but at most {most} fit at once "
                             "(the server's --max-queue waiting + --max-batch-size running); split it into "
                             "smaller requests")
        with self._wakeup:
            if self._state != READY:
                raise NotReady(self.not_ready_message())
            # the sequences that free slots take at the next step do not wait: a burst fills them too
            # (num_free_slots is read without the worker's help: at worst one step stale)
            free = engine.num_free_slots if engine is not None else 0
            if self._num_waiting + units > self.max_queue + free:
                raise QueueFull(f"the server is busy: {self._num_waiting} sequences are already waiting for "
                                f"{free} free slot(s) (at most {self.max_queue} may wait); retry later")
            self._num_waiting += units
            add()
            self._wakeup.notify()

    def abort_score(self, future: asyncio.Future) -> None:
        """Drop a perplexity job (client gone): not started, it never is; running, its forwards stop
        once no other job shares them. Its future is left to the caller."""
        with self._wakeup:
            self._score_cancels.append(future)
            self._wakeup.notify()

    def abort(self, generation: Generation) -> None:
        """Drop a submission (client gone): its sequences free their slots before the next step."""
        with self._wakeup:
            if generation.cancelled:
                return
            generation.cancelled = True
            self._aborts.append(generation)
            self._wakeup.notify()

    async def render_metrics(self) -> bytes:
        """/metrics: the text exposition of everything this server observes."""
        return self.metrics.render()

    # ---- the worker thread --------------------------------------------------------------------
    def _run(self) -> None:
        if self._loader is not None:
            try:
                self.engine = self._loader()
            except BaseException as e:  # noqa: BLE001 - reported to the operator, the server exits
                log.error("loading the model failed: %s", e)
                self.load_error = e
                with self._lock:
                    self._state = FAILED
                if self.on_fatal is not None:
                    self.on_fatal()
                return
        engine = self.engine
        with self._lock:
            ready = self._state == STARTING
            if ready:
                self._state = READY
        if ready:
            self.metrics.set_cache_config(engine.cache)
            if self.on_ready is not None:
                self.on_ready()
        self._update_gauges()
        while True:
            with self._wakeup:
                while not (self._incoming or self._aborts or self._score_jobs or self._score_runs
                           or self._score_cancels or self._state != READY
                           or engine.has_work):
                    self._wakeup.wait()
                incoming, self._incoming = self._incoming, []
                aborts, self._aborts = self._aborts, []
                jobs, self._score_jobs = self._score_jobs, []
                cancels, self._score_cancels = self._score_cancels, []
                stopping = self._state != READY
            outbox: list[tuple[asyncio.Queue, QueueItem]] = []
            if stopping:
                self._shutdown(incoming, jobs, outbox)
                self._post(outbox)
                break
            try:
                for generation in aborts:
                    self._abort(generation)
                for generation in incoming:
                    self._admit(generation, outbox)
                if cancels:
                    jobs = self._cancel_scoring(cancels, jobs)
                if jobs:
                    self._start_scoring(jobs)
                if self._score_runs:
                    self._advance_scoring()
                if engine.has_work:
                    self._step(outbox)
            except Exception as e:  # noqa: BLE001 - a bug or OOM must not kill the server
                log.exception("engine step failed; aborting the requests in flight")
                self._fail_all(f"internal error while generating: {type(e).__name__}: {e}", 500, outbox)
            with self._lock:
                self._num_waiting = (sum(len(g) for g in self._incoming) + len(engine.waiting)
                                     + sum(len(j.inputs) for j in self._score_jobs))
            self._update_gauges()  # before the results go out: a client that sees them sees these too
            self._post(outbox)
        with self._lock:
            self._state = STOPPED
        self._update_gauges()

    def _admit(self, generation: Generation, outbox: list) -> None:
        if generation.cancelled:
            return
        engine = self.engine
        requests: list[Request] = []
        try:
            for prompt_ids, params in zip(generation.prompts, generation.params):
                requests.append(engine.add_request(prompt_ids, params))
        except Exception as e:  # noqa: BLE001
            for request in requests:
                engine.abort(request)
            if isinstance(e, ValueError):
                many = len(generation) > generation.n
                where = f"prompt {len(requests) // generation.n}: " if many else ""
                outbox.append((generation.queue, Rejected(where + str(e), 400, getattr(e, "param", None))))
            else:
                log.exception("add_request failed")
                outbox.append((generation.queue, Rejected(f"internal error: {type(e).__name__}: {e}", 500)))
            return
        generation._requests = requests
        for index, request in enumerate(requests):
            seq = _Sequence(generation, index, request)
            self._sequences[request.request_id] = seq
            self._unstarted.append(seq)
        outbox.append((generation.queue, Accepted()))

    def _abort(self, generation: Generation) -> None:
        self._unstarted = [seq for seq in self._unstarted if seq.generation is not generation]
        for request in generation._requests:
            if self._sequences.pop(request.request_id, None) is not None:
                self.engine.abort(request)
                self.metrics.request_finish.labels(finish_reason="abort").inc()
        generation._requests = []

    def _step(self, outbox: list) -> None:
        started = time.monotonic()
        outputs = self.engine.step()
        now = time.monotonic()
        self._note_step(now - started)
        m = self.metrics
        if self._unstarted:  # queue time: until the step that ran the sequence's first prefill chunk
            waiting = []
            for seq in self._unstarted:
                if seq.request.num_computed > 0 or seq.request.finished:
                    m.request_queue_time.observe(started - seq.generation.arrival)
                else:
                    waiting.append(seq)
            self._unstarted = waiting
        generated = 0
        gaps: dict[float, int] = {}  # inter-token gap -> sequences that had it (most share the last step's)
        for out in outputs:
            seq = self._sequences.get(out.request.request_id)
            if seq is None:
                continue
            generation = seq.generation
            if not seq.prefilled:  # the first output of a sequence comes from its (last) prefill step
                seq.prefilled = True
                m.prompt_tokens.inc(len(seq.request.prompt_ids))
            if out.token_ids:
                generated += len(out.token_ids)
                if seq.last_token_at is None:
                    m.time_to_first_token.observe(now - generation.arrival)
                elif seq.last_token_at != now:  # one gap per step: a speculative step's tokens arrive together
                    gap = now - seq.last_token_at
                    gaps[gap] = gaps.get(gap, 0) + 1
                seq.last_token_at = now
            output = SequenceOutput(seq.index, tuple(out.token_ids), out.text, tuple(out.logprobs),
                                    out.finish_reason, out.prompt_logprobs)
            if generation.stream:
                outbox.append((generation.queue, output))
            elif out.finish_reason is None:
                seq.held.append(output)
            else:
                outbox.extend((generation.queue, held) for held in seq.held)
                outbox.append((generation.queue, output))
            if out.finish_reason is not None:
                del self._sequences[out.request.request_id]
                m.e2e_request_latency.observe(now - generation.arrival)
                m.request_finish.labels(finish_reason=out.finish_reason).inc()
        # once per step, not per token: a batch's worth of metric updates is host time the next step waits for
        if generated:
            m.generation_tokens.inc(generated)
        for gap, count in gaps.items():
            m.inter_token_latency.observe_many(gap, count)

    def _note_step(self, seconds: float) -> None:
        """Observe a step's duration; log one far slower than the recent ones (debug: which steps stalled the
        streams, next to what else the log says happened then)."""
        self.metrics.engine_step.observe(seconds)
        recent = self._step_seconds
        if seconds >= SLOW_STEP_MIN_S and len(recent) >= 16 and log.isEnabledFor(logging.DEBUG):
            typical = statistics.median(recent)
            if seconds > SLOW_STEP_FACTOR * typical:
                log.debug("slow engine step: %.3f s, %.0fx the median of the last %d (%.1f ms); %d sequences running",
                          seconds, seconds / typical, len(recent), typical * 1e3, len(self.engine.running))
        recent.append(seconds)

    def _start_scoring(self, jobs: list[ScoreJob]) -> None:
        """Encode and validate new perplexity jobs; each becomes (part of) a resumable engine task."""
        by_stride: dict[int | None, list[ScoreJob]] = {}
        for job in jobs:
            by_stride.setdefault(job.stride, []).append(job)
        for stride, group in by_stride.items():
            encoded: list[tuple[ScoreJob, list[list[int]]]] = []
            for job in group:
                try:
                    encoded.append((job, [self._encode_for_scoring(i, x) for i, x in enumerate(job.inputs)]))
                except ValueError as e:
                    self._finish_score(job, error=e)
            if len(encoded) > 1:  # one task over all jobs: windows of similar length batch together
                try:
                    task = self.engine.score_task([ids for _, seqs in encoded for ids in seqs], stride=stride)
                except ValueError:
                    pass  # one task per job below, so the error reaches the right client
                else:
                    self._score_runs.append(_ScoreRun(task, [(job, len(seqs)) for job, seqs in encoded]))
                    continue
            for job, seqs in encoded:
                try:
                    task = self.engine.score_task(seqs, stride=stride)
                    self._score_runs.append(_ScoreRun(task, [(job, len(seqs))]))
                except ValueError as e:
                    self._finish_score(job, error=e)

    def _cancel_scoring(self, futures: list[asyncio.Future], jobs: list[ScoreJob]) -> list[ScoreJob]:
        """Mark the jobs of these futures cancelled; returns the new jobs still to start. A run whose
        jobs are all cancelled is dropped (one shared with a live job runs on for it)."""
        gone = {id(f) for f in futures}
        for job in jobs + [job for run in self._score_runs for job, _ in run.jobs]:
            if id(job.future) in gone and not job.cancelled:
                job.cancelled = True
                self.metrics.perplexity_requests.labels(status="abort").inc()
        self._score_runs = collections.deque(run for run in self._score_runs
                                             if not all(job.cancelled for job, _ in run.jobs))
        return [job for job in jobs if not job.cancelled]

    def _advance_scoring(self) -> None:
        """One batched scoring forward, so running streams get a decode step in between; while any are
        running, of at most a prefill chunk's tokens (--max-prefill-tokens), so their pace holds as it does
        through a long prompt's prefill."""
        run = self._score_runs[0]
        engine = self.engine
        try:
            run.task.advance(engine.max_prefill_tokens if engine.running else None)
        except Exception as e:  # noqa: BLE001 - the clients get a 500, the server lives on
            log.exception("scoring failed")
            self._score_runs.popleft()
            error = RuntimeError(f"internal error while scoring: {type(e).__name__}: {e}")
            for job, _ in run.jobs:
                self._finish_score(job, error=error)
            return
        if run.task.done:
            self._score_runs.popleft()
            results = run.task.results
            for job, count in run.jobs:
                if not job.cancelled:
                    self._finish_score(job, results=results[:count])
                results = results[count:]

    def _encode_for_scoring(self, index: int, item: str | list[int]) -> list[int]:
        ids = self.engine.encode_for_scoring(item) if isinstance(item, str) else list(item)
        if len(ids) < 2:
            raise ValueError(f"input {index} has {len(ids)} token(s); perplexity needs at least 2")
        return ids

    def _finish_score(self, job: ScoreJob, results: list[ScoreResult] | None = None,
                      error: BaseException | None = None) -> None:
        m = self.metrics
        m.perplexity_requests.labels(status="ok" if error is None else "error").inc()
        if error is None:
            m.perplexity_latency.observe(time.monotonic() - job.arrival)
            m.perplexity_tokens.inc(sum(r.num_scored for r in results))
        self._resolve(job.future, results, error)

    def _fail_all(self, message: str, status: int, outbox: list) -> None:
        failed: dict[int, Generation] = {}
        for seq in list(self._sequences.values()):
            try:
                self.engine.abort(seq.request)
            except Exception:  # noqa: BLE001 - best effort: the engine is already in trouble
                log.exception("abort failed")
            failed[id(seq.generation)] = seq.generation
            self.metrics.request_finish.labels(finish_reason="error").inc()
        self._sequences.clear()
        self._unstarted.clear()
        for generation in failed.values():
            outbox.append((generation.queue, Failed(message, status)))

    def _shutdown(self, incoming: list[Generation], jobs: list[ScoreJob], outbox: list) -> None:
        message = "the server is shutting down"
        self._fail_all(message, 503, outbox)
        for generation in incoming:
            outbox.append((generation.queue, Rejected(message, 503)))
        for job in jobs + [job for run in self._score_runs for job, _ in run.jobs]:
            self._resolve(job.future, None, NotReady(message))
        self._score_runs.clear()

    # ---- handing results to the event loop ------------------------------------------------------
    def _post(self, outbox: list[tuple[asyncio.Queue, QueueItem]]) -> None:
        if outbox:
            self._call_soon(self._deliver, outbox, time.monotonic())

    def _deliver(self, outbox: list[tuple[asyncio.Queue, QueueItem]], posted: float) -> None:
        """(event-loop thread) Hand a step's outputs to their queues; observe how long they waited for the loop."""
        self._note_delivery(posted)
        for queue, item in outbox:
            queue.put_nowait(item)

    def _resolve(self, future: asyncio.Future, result: Any, error: BaseException | None) -> None:
        self._call_soon(_settle, future, result, error)

    def _call_soon(self, fn: Callable, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _update_gauges(self) -> None:
        m, engine = self.metrics, self.engine
        m.num_requests_waiting.set(self._num_waiting)
        if engine is not None:
            m.num_requests_running.set(len(engine.running))
            m.kv_cache_usage_ratio.set(engine.cache.usage())
            m.kv_cache_slots_used_ratio.set(1.0 - engine.num_free_slots / engine.max_batch_size)
            # the engine keeps running totals; the counters advance by what is new since the last look
            pool = engine.pool
            seen = self._seen_totals
            for counter, key, total in ((m.prefix_cache_queries, "queries", pool.queried_tokens),
                                        (m.prefix_cache_hits, "hits", pool.hit_tokens),
                                        (m.num_preemptions, "preemptions", engine.num_preemptions),
                                        (m.spec_decode_draft_tokens, "drafts", engine.num_draft_tokens),
                                        (m.spec_decode_accepted_tokens, "accepted", engine.num_accepted_tokens)):
                if total > seen.get(key, 0):
                    counter.inc(total - seen.get(key, 0))
                seen[key] = total


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
