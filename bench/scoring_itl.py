"""Inter-token latency of a stream while a perplexity job runs beside it, on a live `kiln serve`.

    python bench/scoring_itl.py [--model DIR] [--kiln-args "--prefill-dtype bf16"] [--runs 2]
                                [--texts 60] [--text-tokens 1000] [--stream-tokens 400]

Starts `python -m server` (the default model unless --model; `--max-batch-size 8`, every core) through
bench/cpu_serving.py's `kiln_server`, then per run: one streamed completion
("The function", temperature 0.8, seeded, EOS ignored) in a thread, and 0.3 s later a
`/v1/perplexity` request for `--texts` random id lists of `--text-tokens` ids each. Prints the
scoring request's wall time and the stream's inter-token gaps (p50, p99, max), the time between
consecutive SSE chunks as the client receives them. The server runs decode steps and scoring
forwards on one worker thread, so every scoring forward delays the stream by its length.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_serving import kiln_server  # noqa: E402  (starts kiln serve, waits for /health, SIGTERMs it)


def quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def one_run(url: str, run: int, args: argparse.Namespace, pool: list[int]) -> dict:
    import httpx

    rng = random.Random(run)
    ids = [rng.choices(pool, k=args.text_tokens) for _ in range(args.texts)]
    arrivals: list[float] = []

    def stream() -> None:
        body = {"prompt": "The function", "max_tokens": args.stream_tokens, "temperature": 0.8, "seed": run,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.perf_counter())

    thread = threading.Thread(target=stream)
    thread.start()
    time.sleep(0.3)
    started = time.perf_counter()
    r = httpx.post(url + "/v1/perplexity", json={"input": ids}, timeout=600)
    scoring_s = time.perf_counter() - started
    thread.join()
    if r.status_code != 200:
        raise RuntimeError(f"/v1/perplexity answered {r.status_code}: {r.text[:300]}")
    gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:]))
    return {"scoring_s": scoring_s, "chunks": len(arrivals), "p50_ms": 1e3 * quantile(gaps, 0.5),
            "p99_ms": 1e3 * quantile(gaps, 0.99), "max_ms": 1e3 * gaps[-1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory (default: the shipped default model)")
    p.add_argument("--kiln-args", default="", help='extra flags for kiln serve, e.g. "--prefill-dtype bf16"')
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--texts", type=int, default=60)
    p.add_argument("--text-tokens", type=int, default=1000)
    p.add_argument("--stream-tokens", type=int, default=400)
    args = p.parse_args(argv)
    from model.cli import default_model_dir
    from model.tokenizer import load_tokenizer

    model_dir = Path(args.model) if args.model else default_model_dir()
    tokenizer = load_tokenizer(model_dir)
    special = set(tokenizer.special_tokens.values())
    pool = [i for i in range(tokenizer.n_vocab) if i not in special]  # ordinary ids
    threads = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="kiln-scoring-itl-") as tmp, \
            kiln_server(model_dir, threads, 8, shlex.split(args.kiln_args), Path(tmp) / "server.log") as server:
        print(f"python bench/scoring_itl.py {shlex.join(argv if argv is not None else sys.argv[1:])}")
        for run in range(args.runs):
            r = one_run(server["url"], run, args, pool)
            print(f"run {run}: scoring {r['scoring_s']:.1f} s; stream ITL p50 {r['p50_ms']:.1f} ms, p99 "
                  f"{r['p99_ms']:.1f} ms, max {r['max_ms']:.0f} ms ({r['chunks']} chunks)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
