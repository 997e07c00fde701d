"""The engine in a process of its own (`kiln serve --engine-process`), as vLLM runs its engine core.

In one process the event loop (HTTP, SSE framing, JSON) and the scheduler's worker thread share one
GIL, so every token's Python on either side delays the other: behind a fast engine (a small model on a
GPU) the server passes a fraction of the engine's pace (`bench/http_overhead.py`). Here the worker
thread, the engine and the engine-side metrics live in a child process (spawned: CUDA starts there);
this process keeps HTTP, streaming and the tokenizer the routes read.

`EngineProcess` has the `Scheduler` interface the app uses (submit, submit_score, abort, abort_score,
start, stop, state, engine, render_metrics). The child runs an ordinary `Scheduler`: its outputs, which
it would hand to an event loop, go through `_Outlet` over a pipe instead. Messages (pickled):

    parent -> child: ("submit", gid, prompts, params, n, stream), ("abort", gid),
                     ("score", jid, inputs, stride), ("abort_score", jid), ("metrics", rid), ("stop", timeout)
    child -> parent: ("state", state, error, info), ("out", [(gid, item, last), ...], posted),
                     ("settle", jid, result, error), ("metrics", rid, text), ("stopped",)

A refusal the in-process scheduler raises from `submit` (queue full, not ready, too many sequences)
arrives as the submission's first item, a `Rejected` with the same status. If the child dies, the
requests in flight fail (500) and the server exits as on a failed load.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Any, Callable

from .metrics import ServerMetrics
from .scheduler import (CREATED, FAILED, READY, STARTING, STOPPED, STOPPING, Failed, Generation,
                        NotReady, QueueFull, Rejected, Scheduler, SequenceOutput, ServingState, _settle,
                        rejection)

log = logging.getLogger("kiln.server")

# the metric families this process observes (HTTP requests, the served name, its own event loop);
# every other family is the engine process's
API_METRICS = frozenset({"kiln_requests", "kiln_model_info", "kiln_event_loop_delay_seconds"})
METRICS_TIMEOUT_S = 10.0


class RemoteEngine:
    """What the routes read of the engine in this process: its tokenizer and limits."""

    def __init__(self, tokenizer, info: dict[str, Any]):
        self.tokenizer = tokenizer
        self.max_seq_len: int = info["max_seq_len"]
        self.max_batch_size: int = info["max_batch_size"]


def _portable_error(error: BaseException | None) -> BaseException | None:
    """An exception the parent can unpickle and the routes still sort by class (NotReady, ValueError, ...)."""
    if error is None or isinstance(error, (NotReady, QueueFull)):
        return error
    return ValueError(str(error)) if isinstance(error, ValueError) else RuntimeError(str(error))


class EngineProcess(ServingState):
    def __init__(self, loader: Callable[[], Any], tokenizer_loader: Callable[[], Any], metrics: ServerMetrics,
                 max_queue: int = 256, log_level: str = "info"):
        """`loader`: builds the engine in the child (picklable: a module-level function or a partial of one);
        `tokenizer_loader`: the same model's tokenizer, loaded here."""
        self._loader = loader
        self._tokenizer_loader = tokenizer_loader
        self.metrics = metrics
        self.max_queue = max_queue
        self.log_level = log_level
        self.engine: RemoteEngine | None = None
        self.load_error: BaseException | None = None
        self.on_fatal: Callable[[], None] | None = None
        self._state = CREATED
        self._lock = threading.Lock()  # guards sends on the pipe and the id maps
        self._ids = itertools.count()
        self._generations: dict[int, Generation] = {}  # gid -> generation, until its last item arrives
        self._jobs: dict[int, asyncio.Future] = {}
        self._job_ids: dict[int, int] = {}  # id(future) -> jid
        self._metrics_requests: dict[int, asyncio.Future] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn = None
        self._process = None
        self._reader: threading.Thread | None = None

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._state != CREATED:
            raise RuntimeError(f"the engine process was already started (state {self._state})")
        self._loop = loop
        self._state = STARTING
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_engine_main, name="kiln-engine", daemon=True,
                                        args=(child_conn, self._loader, self.metrics.model_name, self.max_queue,
                                              self.log_level))
        self._process.start()
        child_conn.close()
        self._reader = threading.Thread(target=self._read, name="kiln-engine-reader", daemon=True)
        self._reader.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop accepting; the child aborts what is in flight (handlers get a 503) and exits. Blocking."""
        if self._state in (CREATED, STOPPED):
            self._state = STOPPED
            return
        if self._state in (STARTING, READY):
            self._state = STOPPING
        self._send(("stop", timeout))
        deadline = None if timeout is None else time.monotonic() + timeout + 10.0
        if self._reader is not None:
            self._reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if self._process is not None:
            self._process.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if self._process.is_alive():
                log.warning("the engine process did not stop in time; killing it")
                self._process.kill()
                self._process.join(5.0)
        self._state = STOPPED

    # ---- submissions (event-loop thread) ----------------------------------------------------
    def submit(self, prompts: list[list[int]], params: list, n: int = 1, stream: bool = True) -> Generation:
        generation = Generation(prompts, params, n, stream)
        if self._state != READY:
            raise NotReady(self.not_ready_message())
        with self._lock:
            gid = next(self._ids)
            generation.remote_id = gid
            self._generations[gid] = generation
        self._send(("submit", gid, prompts, params, n, stream))
        return generation

    def submit_score(self, inputs: list, stride: int | None) -> asyncio.Future:
        future = (self._loop or asyncio.get_running_loop()).create_future()
        if self._state != READY:
            raise NotReady(self.not_ready_message())
        with self._lock:
            jid = next(self._ids)
            self._jobs[jid] = future
            self._job_ids[id(future)] = jid
        self._send(("score", jid, inputs, stride))
        return future

    def abort(self, generation: Generation) -> None:
        if generation.cancelled or generation.remote_id is None:
            return
        generation.cancelled = True
        self._generations.pop(generation.remote_id, None)  # what still arrives for it is dropped
        self._send(("abort", generation.remote_id))

    def abort_score(self, future: asyncio.Future) -> None:
        jid = self._job_ids.pop(id(future), None)
        if jid is not None:
            self._jobs.pop(jid, None)
            self._send(("abort_score", jid))

    async def render_metrics(self) -> bytes:
        """This process's families, then the engine process's (asked for over the pipe)."""
        ours = self.metrics.render(lambda name: name in API_METRICS or name.startswith("process_"))
        if self._state not in (STARTING, READY):
            return ours
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            rid = next(self._ids)
            self._metrics_requests[rid] = future
        try:
            self._send(("metrics", rid))
            return ours + await asyncio.wait_for(future, METRICS_TIMEOUT_S)
        except (asyncio.TimeoutError, OSError):
            return ours  # the engine is busy or gone: its families are missing from this scrape
        finally:
            self._metrics_requests.pop(rid, None)

    def _send(self, message: tuple) -> None:
        with self._lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError):  # the child is gone: the reader fails what is in flight
                pass

    # ---- what the child sends (reader thread) ----------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "out":
                self._call_soon(self._deliver, message[1], message[2])
            elif kind == "settle":
                self._call_soon(self._settle, *message[1:])
            elif kind == "metrics":
                self._call_soon(self._metrics_reply, *message[1:])
            elif kind == "state":
                self._on_state(*message[1:])
            elif kind == "stopped":
                break
        if self._state in (STARTING, READY):  # the child died on its own
            self.load_error = self.load_error or RuntimeError("the engine process exited")
            self._process.join(5.0)
            log.error("the engine process exited (exit code %s); stopping the server", self._process.exitcode)
            self._state = FAILED
            self._call_soon(self._fail_all, "internal error: the engine process exited")
            if self.on_fatal is not None:
                self.on_fatal()

    def _on_state(self, state: str, error: str | None, info: dict | None) -> None:
        if state == READY:
            try:
                self.engine = RemoteEngine(self._tokenizer_loader(), info)
            except Exception as e:  # noqa: BLE001 - reported like a failed load
                state, error = FAILED, f"loading the tokenizer failed: {e}"
                log.error("%s", error)
            else:
                if self._state == STARTING:
                    self._state = READY
        if state == FAILED:  # (the engine process has logged why)
            self.load_error = RuntimeError(error)
            self._state = FAILED
            if self.on_fatal is not None:
                self.on_fatal()

    def _call_soon(self, fn: Callable, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    # ---- on the event loop -------------------------------------------------------------------
    def _deliver(self, items: list[tuple[int, Any, bool]], posted: float) -> None:
        """(gid, item, whether it is the submission's last: the engine process counts) for each output."""
        self._note_delivery(posted)  # (the pipe's time too: monotonic clocks agree across processes)
        for gid, item, last in items:
            generation = self._generations.pop(gid, None) if last else self._generations.get(gid)
            if generation is not None:
                generation.queue.put_nowait(item)

    def _settle(self, jid: int, result: Any, error: BaseException | None) -> None:
        future = self._jobs.pop(jid, None)
        if future is not None:
            self._job_ids.pop(id(future), None)
            _settle(future, result, error)

    def _metrics_reply(self, rid: int, text: bytes) -> None:
        future = self._metrics_requests.get(rid)
        if future is not None and not future.done():
            future.set_result(text)

    def _fail_all(self, message: str) -> None:
        for generation in self._generations.values():
            generation.queue.put_nowait(Failed(message, 500))
        self._generations.clear()
        for jid in list(self._jobs):
            self._settle(jid, None, RuntimeError(message))


# ---- the child process ----------------------------------------------------------------------------
class _StubFuture:
    """Where the child's scheduler settles a perplexity job: the result goes to the parent."""

    def __init__(self, jid: int):
        self.jid = jid
        self._done = False

    def done(self) -> bool:
        return self._done


class _Outlet:
    """Stands in for the event loop the child's scheduler hands its results to: they go over the pipe.

    It also keeps the child's side of the id maps: a submission is forgotten once its last output (or a
    refusal, or a failure) has gone out, a perplexity job once it is settled."""

    def __init__(self, conn):
        self.conn = conn
        self.lock = threading.Lock()  # guards sends and the maps (command thread and worker thread)
        self.generations: dict[int, Generation] = {}  # gid -> the child's Generation
        self.gids: dict[int, tuple[int, list[int]]] = {}  # id(generation.queue) -> (gid, [sequences left])
        self.jobs: dict[int, _StubFuture] = {}  # jid -> the child's future

    def add_generation(self, gid: int, generation: Generation) -> None:
        with self.lock:
            self.generations[gid] = generation
            self.gids[id(generation.queue)] = (gid, [len(generation)])

    def forget(self, gid: int) -> None:
        """An aborted submission: nothing more of it goes to the parent."""
        with self.lock:
            generation = self.generations.pop(gid, None)
            if generation is not None:
                self.gids.pop(id(generation.queue), None)

    def _tagged(self, queue, item) -> tuple[int, Any, bool] | None:
        """(gid, item, last) for an output of `queue`'s submission (None: forgotten); forgets the submission
        when `item` is its last (lock held)."""
        entry = self.gids.get(id(queue))
        if entry is None:
            return None
        gid, left = entry
        if isinstance(item, SequenceOutput) and item.finish_reason is not None:
            left[0] -= 1
        last = isinstance(item, (Rejected, Failed)) or left[0] == 0
        if last:
            del self.gids[id(queue)]
            self.generations.pop(gid, None)
        return gid, item, last

    def send(self, message: tuple) -> None:
        with self.lock:
            try:
                self.conn.send(message)
            except (OSError, ValueError):  # the parent is gone; the command loop sees EOF and stops
                pass

    def call_soon_threadsafe(self, fn: Callable, *args: Any) -> None:
        if getattr(fn, "__func__", None) is Scheduler._deliver:
            outbox, posted = args
            with self.lock:
                items = [tagged for tagged in (self._tagged(queue, item) for queue, item in outbox) if tagged]
            if items:
                self.send(("out", items, posted))
        elif fn is _settle:
            future, result, error = args
            future._done = True
            with self.lock:
                self.jobs.pop(future.jid, None)
            self.send(("settle", future.jid, result, _portable_error(error)))
        else:
            raise RuntimeError(f"the engine process cannot run {fn!r} on the API's event loop")


def _exit_if_loading(scheduler: Scheduler) -> None:
    """A stop during the model's load leaves the loading thread inside torch's C++ (the stop does not wait
    for it: nothing is in flight), and finalizing the interpreter under it aborts (`terminate called without
    an active exception`, status 134): the child then exits at once instead, as `python -m server` does."""
    if scheduler.loading:
        logging.shutdown()
        os._exit(0)


def _engine_main(conn, loader: Callable[[], Any], model_name: str, max_queue: int, log_level: str) -> None:
    """The child: an ordinary Scheduler on its worker thread; this thread reads the parent's commands."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # the parent shuts the server down and tells this process
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    outlet = _Outlet(conn)
    scheduler = Scheduler(loader, ServerMetrics(model_name, process_namespace="kiln_engine"), max_queue=max_queue)

    def ready() -> None:
        engine = scheduler.engine
        outlet.send(("state", READY, None, {"max_seq_len": engine.max_seq_len,
                                            "max_batch_size": engine.max_batch_size}))

    def failed() -> None:
        outlet.send(("state", FAILED, str(scheduler.load_error), None))

    scheduler.on_ready, scheduler.on_fatal = ready, failed
    scheduler.start(outlet)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            scheduler.stop(5.0)
            _exit_if_loading(scheduler)
            return
        kind = message[0]
        if kind == "submit":
            _, gid, prompts, params, n, stream = message
            generation = Generation(prompts, params, n, stream)
            outlet.add_generation(gid, generation)  # before the worker can hand out its first output
            try:
                scheduler.submit_generation(generation)
            except (QueueFull, NotReady, ValueError) as e:
                outlet.call_soon_threadsafe(scheduler._deliver, [(generation.queue, rejection(e, "n"))],
                                            time.monotonic())
        elif kind == "abort":
            with outlet.lock:
                generation = outlet.generations.get(message[1])
            if generation is not None:
                scheduler.abort(generation)
                outlet.forget(message[1])
        elif kind == "score":
            _, jid, inputs, stride = message
            future = _StubFuture(jid)
            with outlet.lock:
                outlet.jobs[jid] = future
            try:
                scheduler.submit_score(inputs, stride, future=future)
            except (QueueFull, NotReady, ValueError) as e:
                with outlet.lock:
                    outlet.jobs.pop(jid, None)
                outlet.send(("settle", jid, None, _portable_error(e)))
        elif kind == "abort_score":
            with outlet.lock:
                future = outlet.jobs.pop(message[1], None)
            if future is not None:
                scheduler.abort_score(future)
        elif kind == "metrics":
            outlet.send(("metrics", message[1], scheduler.metrics.render(lambda name: name not in API_METRICS)))
        elif kind == "stop":
            scheduler.stop(message[1])
            outlet.send(("stopped",))
            _exit_if_loading(scheduler)
            return
