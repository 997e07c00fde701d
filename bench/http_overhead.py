"""What Kiln's HTTP side costs per streamed token: the real server in front of an engine whose step is a fixed wait.

    python bench/http_overhead.py [--streams 32,128] [--step-ms 0.8,2] [--tokens 256] [--probes 16]
                                  [--http auto|httptools|h11] [--quick]

A GPU decode step mostly waits on the device with the GIL released; here `time.sleep(step_ms)` stands in
for it, and each step gives every running stream one token (the shipped default model's tokenizer
validates the requests; no model runs). The real app (`server.app.create_app`) serves that engine under
uvicorn on loopback, in this process as `kiln serve` runs it; a load generator in another process opens
--streams streamed completions of --tokens tokens at once and, once they stream, a third process sends
--probes one-token requests 20 ms apart. Per case:

- tok/s served: completion tokens the streams received per second of wall time; alone: the same
  engine stepped without the server (its pace if HTTP cost nothing); served/alone: what the HTTP side
  leaves of it (the worker thread and the event loop share one GIL).
- chunks/s and tok/chunk: streamed chunks (above 1 token each when the loop fell behind the engine and
  sent a stream's pending tokens together).
- server CPU ms per 1k tokens: this process's CPU time over the run.
- probe TTFT p50 / max: how long a new request waits for its token behind the running streams.
- loop delay p99: the server's `kiln_event_loop_delay_seconds` over the run (a bucket's upper bound).

It measures the host, not a GPU: run it on the machine that serves (on a lent GPU machine, its CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PROBE_GAP_S = 0.02


class FixedStepEngine:
    """A real engine's request handling with a step that waits `step_s` and gives each request one token."""

    def __init__(self, engine, step_s: float):
        self._engine = engine
        self.step_s = step_s
        self.active = []
        self.steps = 0
        token = engine.tokenizer.encode(" kiln")[0]
        self._token, self._text = token, engine.tokenizer.decode([token])

    def add_request(self, prompt_ids, params):
        request = self._engine.add_request(prompt_ids, params)  # validation, as the server's engine does it
        self._engine.waiting.remove(request)
        self.active.append(request)
        return request

    def abort(self, request):
        if request in self.active:
            self.active.remove(request)
        request.finish_reason = request.finish_reason or "abort"

    @property
    def has_work(self) -> bool:
        return bool(self.active)

    @property
    def running(self):
        return list(self.active)

    @property
    def waiting(self):
        return []

    @property
    def num_free_slots(self) -> int:
        return max(0, self._engine.max_batch_size - len(self.active))

    def step(self):
        from model.requests import StepOutput

        time.sleep(self.step_s)
        self.steps += 1
        outputs = []
        for request in list(self.active):
            request.output_ids.append(self._token)
            finish = "length" if len(request.output_ids) >= request.params.max_tokens else None
            if finish:
                request.finish_reason = finish
                self.active.remove(request)
            outputs.append(StepOutput(request, [self._token], self._text, [], finish))
        return outputs

    def __getattr__(self, name):
        return getattr(self._engine, name)


def fixed_engine(step_s: float, max_batch_size: int) -> FixedStepEngine:
    """A loader (module-level, so that --engine-process can run it in the engine process)."""
    from model.cli import load_engine

    return FixedStepEngine(load_engine(None, "cpu", max_batch_size=max_batch_size), step_s)


def engine_alone(engine, streams: int, tokens: int, step_s: float) -> float:
    """Tokens per second of the engine stepped directly (no server), same streams and lengths."""
    from model.engine import SamplingParams

    fake = FixedStepEngine(engine, step_s)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    for _ in range(streams):
        fake.add_request([1, 2, 3], params)
    started = time.perf_counter()
    produced = 0
    while fake.has_work:
        produced += len(fake.step())
    return produced / (time.perf_counter() - started)


async def _stream(client, url: str, max_tokens: int, started=None) -> dict:
    """One streamed completion; `started` (an Event) is set at its first chunk."""
    body = {"prompt": [1, 2, 3], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    sent, ttft, chunks, used = time.perf_counter(), None, 0, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - sent
                    if started is not None:
                        started.set()
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
    return {"ttft": ttft, "chunks": chunks, "tokens": used}


def load(url: str, streams: int, tokens: int, probes: int, started, queue) -> None:
    """A load generator process: `streams` streams of `tokens` at once (probes = 0; `started` is set when
    they stream), or else `probes` one-token requests PROBE_GAP_S apart from 0.1 s after `started` (their
    own process, so that reading the long streams' events does not delay them)."""
    import httpx

    async def probe(client, i: int) -> dict:
        await asyncio.sleep(0.1 + PROBE_GAP_S * i)
        return await _stream(client, url, 1)

    async def main():
        limits = httpx.Limits(max_connections=streams + probes + 4)
        async with httpx.AsyncClient(timeout=300, limits=limits, trust_env=False) as client:
            if probes:
                await asyncio.to_thread(started.wait, 300)
                return 0.0, await asyncio.gather(*[probe(client, i) for i in range(probes)])
            begun = time.perf_counter()
            runs = await asyncio.gather(*[_stream(client, url, tokens, started) for _ in range(streams)])
            return time.perf_counter() - begun, runs

    queue.put(asyncio.run(main()))


def run_case(engine, streams: int, tokens: int, probes: int, step_s: float, http: str = "auto",
             engine_process: bool = False) -> dict:
    import functools

    import httpx

    from serve_bench import histogram_quantile, parse_metrics
    from server.app import create_app
    from server.settings import ServerSettings
    from server.testing import LiveServer

    if engine_process:  # the same engine, built in the engine process
        app = create_app(functools.partial(fixed_engine, step_s, engine.max_batch_size),
                         ServerSettings(engine_process=True, log_level="warning"))
    else:
        app = create_app(FixedStepEngine(engine, step_s))
    with LiveServer(app, http=http) as server:
        deadline = time.monotonic() + 120
        while httpx.get(server.url + "/health", trust_env=False).status_code != 200:  # (the engine loading)
            if time.monotonic() > deadline:
                raise RuntimeError("the server never became ready")
            time.sleep(0.05)
        metrics = parse_metrics(httpx.get(server.url + "/metrics", trust_env=False).text)
        spawn = mp.get_context("spawn")
        queues, started = (spawn.Queue(), spawn.Queue()), spawn.Event()
        clients = [spawn.Process(target=load, args=(server.url, streams, tokens, 0, started, queues[0])),
                   spawn.Process(target=load, args=(server.url, 0, 0, probes, started, queues[1]))]
        for client in clients:  # the interpreters start (a second or so) before the server's CPU is counted
            client.start()
        cpu = time.process_time()
        wall, long_runs = queues[0].get(timeout=600)
        cpu = time.process_time() - cpu
        _, probe_runs = queues[1].get(timeout=600)
        for client in clients:
            client.join()
        after = parse_metrics(httpx.get(server.url + "/metrics", trust_env=False).text)
    served = sum(r["tokens"] for r in long_runs)
    if served != streams * tokens:
        raise RuntimeError(f"the streams received {served} tokens, expected {streams * tokens}")
    chunks = sum(r["chunks"] for r in long_runs)
    ttfts = sorted(r["ttft"] for r in probe_runs)
    delay = histogram_quantile(metrics, after, "kiln_event_loop_delay_seconds", 0.99)
    return {"streams": streams, "step_ms": step_s * 1e3, "served_tok_s": served / wall,
            "chunks_s": chunks / wall, "tok_per_chunk": served / chunks,
            "cpu_ms_per_1k": 1e6 * cpu / (served + len(probe_runs)),
            "probe_ttft_p50_ms": 1e3 * ttfts[len(ttfts) // 2] if ttfts else None,
            "probe_ttft_max_ms": 1e3 * ttfts[-1] if ttfts else None,
            "loop_delay_p99_ms": None if delay is None else delay * 1e3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", default="32,128", help="concurrent streams per case, comma-separated (32,128)")
    p.add_argument("--step-ms", default="0.8,2", help="engine step times in ms, comma-separated (0.8,2)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per stream (256)")
    p.add_argument("--probes", type=int, default=16, help="one-token requests sent while the streams run (16)")
    p.add_argument("--http", choices=("auto", "httptools", "h11"), default="auto",
                   help="uvicorn's HTTP implementation (auto: httptools when installed, as `kiln serve` runs)")
    p.add_argument("--engine-process", action="store_true",
                   help="serve with the engine in a process of its own (`kiln serve --engine-process`)")
    p.add_argument("--quick", action="store_true", help="smoke test: 4 streams of 8 tokens, 2 probes, one step time")
    args = p.parse_args(argv)
    try:
        streams = [int(x) for x in args.streams.split(",")]
        steps = [float(x) for x in args.step_ms.split(",")]
    except ValueError:
        p.error(f"--streams takes integers and --step-ms numbers, comma-separated; got {args.streams!r}, "
                f"{args.step_ms!r}")
    if args.quick:
        streams, steps, args.tokens, args.probes = [4], [1.0], 8, 2
    if min(streams) < 1 or min(steps) < 0 or args.tokens < 1 or args.probes < 0:
        p.error("--streams and --tokens must be >= 1, --step-ms and --probes >= 0")

    import importlib.util

    import torch
    import uvicorn

    if args.http == "auto":  # as uvicorn resolves it
        args.http = "httptools" if importlib.util.find_spec("httptools") else "h11"

    from model.cli import load_engine

    engine = load_engine(None, "cpu", max_batch_size=max(streams) + args.probes)
    print(f"host: {platform.processor() or platform.machine()}, {mp.cpu_count()} CPUs; Python "
          f"{platform.python_version()}, torch {torch.__version__}, uvicorn {uvicorn.__version__} "
          f"(HTTP: {args.http}){', engine process' if args.engine_process else ''}; "
          f"{args.tokens} tokens per stream, {args.probes} probes")
    header = ("streams", "step ms", "alone tok/s", "served tok/s", "served/alone", "chunks/s", "tok/chunk",
              "CPU ms/1k tok", "probe TTFT p50 ms", "max ms", "loop delay p99 ms <=")
    print("  ".join(header))
    for step_ms in steps:
        for n in streams:
            alone = engine_alone(engine, n, args.tokens, step_ms / 1e3)
            r = run_case(engine, n, args.tokens, args.probes, step_ms / 1e3, args.http, args.engine_process)

            def num(x, digits=0):
                return "-" if x is None else f"{x:,.{digits}f}"

            cells = (str(n), f"{step_ms:g}", num(alone), num(r["served_tok_s"]),
                     f"{r['served_tok_s'] / alone:.2f}x", num(r["chunks_s"]), num(r["tok_per_chunk"], 2),
                     num(r["cpu_ms_per_1k"], 1), num(r["probe_ttft_p50_ms"], 1), num(r["probe_ttft_max_ms"], 1),
                     num(r["loop_delay_p99_ms"], 1))
            print("  ".join(c.rjust(len(h)) for c, h in zip(cells, header)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
