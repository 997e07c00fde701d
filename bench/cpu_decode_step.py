"""The CPU decode step alone, in-process: the torch path against the native step (fp32 and bf16 weights).

    python bench/cpu_decode_step.py [--model DIR] [--threads N] [--batches 1 8] [--contexts 16 128 256 448]
                                    [--round-bf16] [--int8] [--bf16-kv] [--quick] [--markdown] [--json FILE]

For each batch size B and context length P, B requests with P-token prompts are prefilled by the
engine, then one decode step at that state (`DecodePlan.__call__`: embedding to logits, the new
keys/values written into the paged cache) at position P - 1 of each row is timed on each path in turn: the torch path
(`model/fast_decode.py`: one flat loop of torch ops, norm gains folded, the LM head prepacked for
oneDNN; the strongest in-process alternative, and what runs without a C++ compiler), the native
step with fp32 matrices, and the native step with bf16 matrices when the weights are exactly bf16
numbers (the shipped default is; `--round-bf16` rounds a model's weights first), and with `--int8` the
native step over a copy of the model quantized as `--quantization int8` does, and with `--bf16-kv` the
native step (its automatic matrices) over a bf16 copy of the KV cache (`--kv-cache-dtype bf16`). Each call rewrites
the same cache slot, so the state does not change between calls. Time: median of 5 rounds.
Speed-up = torch time / path time. Correctness in the same run: each native path's logits against
the torch path's; the exit status is 1 if any differs by more than 1e-3 (int8 weights are other
weights, and a bf16 cache other keys and values: their differences are reported, not held to it).

Model: `--model DIR` (default: the shipped default model), loaded as fp32 on the CPU.
`--quick` shrinks the workload for a smoke test (numbers meaningless).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

TOLERANCE = 1e-3
UNCHECKED = ("native int8", "native bf16 KV")  # other weights, other keys and values: not held to TOLERANCE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: the shipped default model)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 8)")
    parser.add_argument("--contexts", type=int, nargs="+", help="context lengths (default 16 128 256 448)")
    parser.add_argument("--round-bf16", action="store_true", help="round the weights to bf16 numbers first")
    parser.add_argument("--int8", action="store_true", help="also time the native step on int8 matrices")
    parser.add_argument("--bf16-kv", action="store_true", help="also time the native step over a bf16 KV cache")
    parser.add_argument("--quick", action="store_true", help="tiny workload for a smoke test")
    parser.add_argument("--markdown", action="store_true", help="print a markdown section")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    args.batches = args.batches or ([1, 3] if args.quick else [1, 8])
    args.contexts = args.contexts or ([8, 40] if args.quick else [16, 128, 256, 448])
    for name in ("batches", "contexts"):
        bad = [v for v in getattr(args, name) if v < 1]
        if bad:
            parser.error(f"--{name} {bad[0]}: must be >= 1")
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: must be >= 1")
    return args


def time_call(fn, calls: int, rounds: int = 5) -> float:
    """Median seconds per call over `rounds` rounds of `calls` calls, after a warm-up."""
    for _ in range(max(2, calls // 10)):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from model import native as native_step
    from model.checkpoint import load_model
    from model.cli import default_model_dir
    from model.engine import Engine, SamplingParams
    from model.fast_decode import DecodePlan
    from model.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else default_model_dir()

    def load():
        model = load_model(model_dir, device="cpu", dtype="fp32")
        if args.round_bf16:
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.copy_(parameter.bfloat16().float())
        return model

    model = load()
    engine = Engine(model, load_tokenizer(model_dir), max_batch_size=max(args.batches), native=False,
                    speculative_tokens=0)
    plan = engine._decode_plan
    if plan is None:
        print("this model has no CPU decode plan (not a CPU torch-backend model)", file=sys.stderr)
        return 1
    config = engine.config
    too_long = [p for p in args.contexts if p + 1 > engine.max_seq_len]
    if too_long:
        print(f"--contexts {too_long[0]}: this model's context is {engine.max_seq_len} tokens", file=sys.stderr)
        return 2

    saved = os.environ.pop(native_step.DISABLE_ENV, None)  # the test suite sets it; this script measures it
    try:
        module = native_step.load(build=True)
    finally:
        if saved is not None:
            os.environ[native_step.DISABLE_ENV] = saved
    # one plan per path over the same model and cache, each packed once
    paths: list[tuple[str, DecodePlan]] = [("torch", plan)]
    if module is not None:
        fp32 = DecodePlan(engine.model)
        fp32.enable_native(module, torch.float32)
        paths.append(("native fp32", fp32))
        auto = DecodePlan(engine.model)
        auto.enable_native(module)
        if auto.native_dtype == torch.bfloat16:
            paths.append(("native bf16", auto))
        if args.int8:
            from model.quantize import quantize_model

            quantized = load()  # a second copy: the engine's model keeps its fp32 matrices
            quantize_model(quantized, "int8")
            int8 = DecodePlan(quantized)
            int8.enable_native(module)
            paths.append(("native int8", int8))
        if args.bf16_kv:
            paths.append(("native bf16 KV", auto))

    rows = []
    ok = True
    calls = 20 if args.quick else 200
    vocab = config.vocab_size
    for batch_size in args.batches:
        for context in args.contexts:
            # rows prefilled early decode while later ones prefill: room enough that none finishes
            params = SamplingParams(max_tokens=engine.max_seq_len - context + 1, temperature=0.0, ignore_eos=True)
            requests = [engine.add_request([(7 * i + 11 * j) % (vocab - 1) + 1 for j in range(context)], params)
                        for i in range(batch_size)]
            while any(r.num_computed < context for r in requests):
                engine.step()
            tokens = torch.tensor([[r.prompt_ids[-1]] for r in requests])
            batch = engine.cache.batch([r.blocks for r in requests], [context - 1] * batch_size, [1] * batch_size)
            row = {"batch": batch_size, "context": context, "ms": {}, "max_abs_diff": {}}
            reference = None
            # the bf16 KV path reads a rounded copy of the same cache state (what --kv-cache-dtype bf16 holds)
            bf16_kv = SimpleNamespace(k=engine.cache.k.bfloat16(), v=engine.cache.v.bfloat16()) if args.bf16_kv \
                else None
            for name, path in paths:
                def step(path=path, cache=bf16_kv if name == "native bf16 KV" else engine.cache):
                    return path(tokens, cache, batch)

                logits = step()
                if reference is None:
                    reference = logits
                else:
                    diff = (logits - reference).abs().max().item()
                    row["max_abs_diff"][name] = diff
                    ok &= diff <= TOLERANCE or name in UNCHECKED
                row["ms"][name] = time_call(step, calls) * 1e3
            for r in requests:
                engine.abort(r)
            while engine.has_work:
                engine.step()
            rows.append(row)

    command = "python bench/cpu_decode_step.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    report = {
        "date": datetime.date.today().isoformat(), "command": command, "model": str(model_dir),
        "shape": f"h{config.d_model} L{config.n_layer} heads {config.n_head}/{config.n_kv_head} "
                 f"hd{config.dim_per_head} ff{config.d_ff} vocab {config.vocab_size}",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__},
        "native": module is not None, "paths": [name for name, _ in paths], "rows": rows, "ok": ok,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report, markdown=args.markdown))
    if not ok:
        print(f"FAIL: a native path's logits differ from the torch path's by more than {TOLERANCE}", file=sys.stderr)
    return 0 if ok else 1


def render(report: dict, markdown: bool = False) -> str:
    paths = report["paths"]
    header = ["batch", "context", *[f"{p} ms" for p in paths], *[f"{p} speed-up" for p in paths[1:]]]
    lines = []
    if markdown:
        lines += [f"## CPU decode step, {report['date']}", "", f"`{report['command']}`", "",
                  f"Model {report['model']} ({report['shape']}); {report['machine']['threads']} threads, torch "
                  f"{report['machine']['torch']}. Speed-up = torch path time / path time, same process.", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---:" for _ in header) + "|")
    for row in report["rows"]:
        ms = row["ms"]
        cells = [str(row["batch"]), str(row["context"]), *[f"{ms[p]:.3f}" for p in paths],
                 *[f"{ms['torch'] / ms[p]:.2f}x" for p in paths[1:]]]
        lines.append("| " + " | ".join(cells) + " |")
    if not report["native"]:
        lines.append("\n(the native step could not be built here: torch path only)")
    diffs = [d for row in report["rows"] for name, d in row["max_abs_diff"].items() if name not in UNCHECKED]
    if diffs:
        lines.append(f"\nmax |native logits - torch logits|: {max(diffs):.2e} (tolerance {TOLERANCE})")
    for name, what in zip(UNCHECKED, ("int8", "bf16 KV"), strict=True):
        other = [row["max_abs_diff"][name] for row in report["rows"] if name in row["max_abs_diff"]]
        if other:
            lines.append(f"max |{what} logits - torch logits|: {max(other):.2e} (not held to the tolerance)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
