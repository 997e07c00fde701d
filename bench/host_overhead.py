"""The engine's host time per generated token, with the model's arithmetic taken out.

    python bench/host_overhead.py [--batches 1,32,128] [--tokens 128] [--reps 3] [--profile N] [--quick]

A seeded random model of one layer (d_model 16, the shipped tokenizer's 8,192 ids) makes the forward
nearly free, so a decode step's time is the engine's own work: scheduling, block bookkeeping, building
the sampling call, reading ids back, detokenizing, stop and length checks. On a GPU that Python is
what a small model's large batches can wait on: GPT-2 124M's step on the H100 grew by ~12 us per added
sequence between batch 32 and 128 (fifth lease), where the added cache reads and products should take
well under 1 us (an estimate: that step was not profiled).

Rows: greedy; sampled (temperature 0.8, top-p 0.95); greedy with `logprobs: 1`; each on the engine's
CPU path as `kiln serve` runs it ("cpu") and with async scheduling on the eager path ("async", the
bookkeeping a CUDA step does: ids read back one step late, the step's inputs left on the device).
Per batch size, microseconds per generated token (requests of 4-token prompts and --tokens new tokens,
`ignore_eos`, prefix caching on; best of --reps): "engine / all", all = the wall time of the
`Engine.step` calls over the tokens, engine = that less the time inside the model's forward (or the
lean decode step) and the sampling call, which run on this CPU here and are device work on a GPU (the
eager path's forward still carries its Python module calls, which a CUDA graph replaces).
`--profile N` prints cProfile's top functions for batch N, greedy, async path.
"""

from __future__ import annotations

import argparse
import cProfile
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=0.8, top_p=0.95),
         "greedy+logprobs": dict(temperature=0.0, logprobs=1)}


def null_model(out: Path) -> Path:
    """A one-layer model of width 16 with the shipped tokenizer (seeded: the same ids every run); its (tied)
    embedding is scaled up so that its next-token distributions are peaked like a trained model's."""
    import torch

    from model.checkpoint import save_model
    from model.cli import default_model_dir
    from model.config import ModelConfig
    from model.tokenizer import load_tokenizer
    from model.transformer import Transformer

    tokenizer = load_tokenizer(default_model_dir())
    config = ModelConfig(vocab_size=tokenizer.n_vocab, n_layer=1, n_head=2, n_kv_head=1, d_model=16, d_ff=32,
                         max_seq_len=1024, tie_embeddings=True, eos_token_id=tokenizer.eos_id)
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():  # peaked next-token distributions, as a trained model's are (top-p keeps a few ids)
        model.embed.weight.normal_(0.0, 1.0)
    save_model(model, out)
    tokenizer.save(out)
    return out


class Timed:
    """Wall time spent inside a callable (the model's forward, the sampling call), summed."""

    def __init__(self, fn):
        self.fn = fn
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started

    def __getattr__(self, name):  # the wrapped object's other attributes (a decode plan's native module)
        return getattr(self.fn, name)


def instrument(engine) -> list[Timed]:
    """Time the engine's model forward, its lean decode step (native or torch) when it has one, and its calls
    of `model.sampling.sample`: the arithmetic a GPU does."""
    import model.engine

    timers = [Timed(engine.model.forward)]
    engine.model.forward = timers[0]
    if engine._decode_plan is not None:
        engine._decode_plan = Timed(engine._decode_plan)
        timers.append(engine._decode_plan)
    if not isinstance(model.engine.sample, Timed):
        model.engine.sample = Timed(model.engine.sample)
    return timers + [model.engine.sample]


def generate(engine, batch: int, tokens: int, options: dict, timers: list[Timed] = ()) -> tuple[float, float, int]:
    """(seconds in `Engine.step`, seconds of it in the timed calls, tokens generated), `batch` requests at once."""
    from model.engine import SamplingParams

    params = SamplingParams(max_tokens=tokens, min_tokens=tokens, ignore_eos=True, **options)
    for i in range(batch):
        engine.add_request([1 + i % 97, 2 + i % 89, 3, 4], params)
    inner = sum(t.seconds for t in timers)
    seconds, produced = 0.0, 0
    while engine.has_work:
        started = time.perf_counter()
        outputs = engine.step()
        seconds += time.perf_counter() - started
        produced += sum(len(o.token_ids) for o in outputs)
    return seconds, sum(t.seconds for t in timers) - inner, produced


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,32,128", help="batch sizes, comma-separated (1,32,128)")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per request (128)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per cell, the best kept (3)")
    p.add_argument("--profile", type=int, default=None, metavar="N", help="also profile batch N, greedy")
    p.add_argument("--quick", action="store_true", help="smoke test: batches 1 and 4, 8 tokens, one repetition")
    args = p.parse_args(argv)
    try:
        batches = [int(x) for x in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches takes integers, comma-separated; got {args.batches!r}")
    if args.quick:
        batches, args.tokens, args.reps = [1, 4], 8, 1
    if min(batches) < 1 or args.tokens < 2 or args.reps < 1:
        p.error("--batches and --reps must be >= 1, --tokens >= 2")

    import torch

    from model.cli import load_engine

    torch.set_num_threads(1)  # the host work is one thread's; the tiny products gain nothing from more
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(null_model(Path(tmp) / "null"))
        engines = {"cpu": load_engine(model_dir, "cpu", max_batch_size=max(batches), speculative_tokens=0),
                   "async": load_engine(model_dir, "cpu", max_batch_size=max(batches), speculative_tokens=0,
                                        native=False, fast_decode=False, async_scheduling=True)}
        timers = {name: instrument(engine) for name, engine in engines.items()}
        print(f"host: {platform.processor() or platform.machine()}; Python {platform.python_version()}, torch "
              f"{torch.__version__}; one-layer d16 model, 4-token prompts + {args.tokens} new tokens; per generated "
              f"token, best of {args.reps}: engine us (Engine.step wall time less the forward or decode step and "
              "the sampling call) / all us")
        print("decode paths: " + ", ".join(f"{name}: {engine.decode_path}" for name, engine in engines.items()))
        header = ["mode", "path"] + [f"batch {b}" for b in batches]
        print("  ".join(f"{h:>16}" for h in header))
        for mode, options in MODES.items():
            for name, engine in engines.items():
                generate(engine, max(batches), 4, options)  # warm-up: first-use allocations
                cells = []
                for batch in batches:
                    runs = [generate(engine, batch, args.tokens, options, timers[name]) for _ in range(args.reps)]
                    cells.append(min(((s - inner) / n, s / n) for s, inner, n in runs))
                shown = [mode, name] + [f"{1e6 * e:.1f} / {1e6 * a:.1f}" for e, a in cells]
                print("  ".join(f"{c:>16}" for c in shown), flush=True)
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            generate(engines["async"], args.profile, args.tokens, MODES["greedy"])
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
