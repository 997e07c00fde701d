"""Decode throughput on the CPU by sampling mode: greedy, temperature 1, temperature 0.8 with top-p 0.95.

    python bench/cpu_sampling.py [--model DIR] [--checkout DIR] [--quick]

The shipped default model (or --model) in an in-process Engine (native decode step when built),
16-token prompts + 128 new tokens: one request alone (best of 5) and 8 at once (best of 3). It
shows what sampling costs on top of the decode step (`model/sampling.py`); `--checkout` runs another
checkout's code (a worktree of an older commit) for a before/after in one sitting.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory (default: the shipped default model)")
    p.add_argument("--checkout", default=str(Path(__file__).resolve().parents[1]),
                   help="the Kiln checkout whose code runs (default: this one)")
    p.add_argument("--quick", action="store_true", help="smoke test: 8 new tokens, one repetition")
    args = p.parse_args(argv)
    os.environ.pop("KILN_NO_NATIVE", None)
    sys.path.insert(0, args.checkout)
    from model.cli import load_engine
    from model.engine import SamplingParams

    # speculative_tokens=0: greedy would otherwise verify drafts, and the modes would not compare steps alike
    engine = load_engine(args.model, "cpu", max_batch_size=8, native=True, speculative_tokens=0)
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog while the")[:16]
    modes = [("greedy", dict(temperature=0.0)), ("T=1", dict(temperature=1.0)),
             ("T=0.8 top_p=0.95", dict(temperature=0.8, top_p=0.95))]
    new_tokens, reps = (8, 1) if args.quick else (128, 5)
    print(f"decode path: {engine.decode_path}; tok/s, 16-token prompts + {new_tokens} new tokens")
    for name, options in modes:
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, **options)

        def run(n: int) -> float:
            requests = [engine.add_request(prompt + [i], params) for i in range(n)]
            started = time.perf_counter()
            while engine.has_work:
                engine.step()
            assert all(len(r.output_ids) == new_tokens for r in requests)
            return n * new_tokens / (time.perf_counter() - started)

        run(1), run(8)  # warm-up
        alone, together = max(run(1) for _ in range(reps)), max(run(8) for _ in range(max(1, reps - 2)))
        print(f"{name:>18}: batch 1 {alone:7,.0f}   8 at once {together:7,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
