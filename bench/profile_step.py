"""Where a decode step's time goes: host Python (cProfile) and device kernels (torch.profiler).

    python bench/profile_step.py [--shape llama-1.1b] [--batch 1] [--steps 64] [--device auto] [--compile] [--no-cuda-graphs]
    python bench/profile_step.py --shape tiny-llama --device cpu --steps 8   # the CPU smoke run

Builds the seeded random model of a `bench/serve_bench.py` shape, starts `--batch` greedy
requests of 32-token prompts in an Engine (the server's defaults: CUDA graphs and async
scheduling on CUDA), runs them past prefill, then over `--steps` decode steps reports:
wall time per step, the host functions that take it (cProfile, by own time), and on CUDA the
GPU kernel time per step (torch.profiler) -- so a step that is slower than its GPU work shows
what the host is doing instead. A diagnostic for tuning, not a headline benchmark.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import serve_bench  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-1.1b", choices=sorted(serve_bench.ALL_SHAPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=64, help="decode steps profiled (each tool gets its own run)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default=None, choices=serve_bench.DTYPE_NAMES,
                   help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the shipped default model's)")
    p.add_argument("--top", type=int, default=25, help="rows of each table")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (on CUDA before the graphs are captured)")
    p.add_argument("--gemv", action="store_true",
                   help="decode steps through kernels.gemv (norm / SwiGLU fused into the products; "
                        "Transformer.fused_gemv, off by default)")
    p.add_argument("--pdl", action="store_true",
                   help="with --gemv: programmatic dependent launch for the products (kernels._utils.PDL; sm_90+)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="eager decode: the host profile then shows every kernel launch's own cost")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch", "steps", "top"):
        if getattr(args, name) < 1:
            raise SystemExit(f"profile_step.py: --{name} must be >= 1, got {getattr(args, name)}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("profile_step.py: --device cuda, but torch.cuda.is_available() is False here")
    if args.compile:  # a compile failure's traceback (it names the frame Dynamo could not trace)
        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("kiln.cuda_graphs").setLevel(logging.DEBUG)
    device = torch.device(args.device)
    if args.pdl:
        serve_bench.enable_pdl("profile_step.py", args.gemv, device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    shape = serve_bench.ALL_SHAPES[args.shape]

    from model.checkpoint import DTYPES, load_model
    from model.cli import default_model_dir
    from model.engine import Engine, SamplingParams
    from model.tokenizer import load_tokenizer

    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else default_model_dir()
    prompt_len, total = 32, 32 + 4 * (args.steps + 8)  # room for the three runs below and warm-up
    if total > shape.context:
        raise SystemExit(f"profile_step.py: --steps {args.steps} needs {total} positions; "
                         f"{shape.name} has {shape.context}")
    with tempfile.TemporaryDirectory(prefix="kiln-profile-") as tmp:
        serve_bench.build_model_dir(shape, tokenizer_dir, Path(tmp), device, DTYPES[dtype], seed=0)
        model = load_model(tmp, device=device, dtype=dtype)
        tokenizer = load_tokenizer(tmp)
    model.fused_gemv = args.gemv
    engine = Engine(model, tokenizer, max_batch_size=args.batch, cuda_graphs=not args.no_cuda_graphs,
                    compile=args.compile, speculative_tokens=0)  # one token per sequence per step
    print(f"{shape.name} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, {dtype}, "
          f"batch {args.batch}; torch {torch.__version__}; decode path: {engine.decode_path}; "
          f"CUDA graphs: {engine._graphs is not None}; async scheduling: {engine.async_scheduling}; "
          f"gemv: {args.gemv}; PDL: {args.pdl}"
          + (f"; compiled in {engine.compile_seconds:.1f} s" if engine.compile_seconds is not None else "")
          + (f"; not compiled: {engine.compile_error}" if engine.compile_error else ""))

    pool = serve_bench.prompt_pool(tokenizer)
    prompts = serve_bench.random_prompts(pool, args.batch, prompt_len, seed=0)
    params = SamplingParams(max_tokens=total - prompt_len, temperature=0.0, ignore_eos=True)
    requests = [engine.add_request(p, params) for p in prompts]
    while any(len(r.output_ids) < 8 for r in requests):  # prefill and a few warm-up decode steps
        engine.step()

    def steps(n: int) -> float:
        serve_bench.sync(device)
        start = time.perf_counter()
        for _ in range(n):
            engine.step()
        serve_bench.sync(device)
        return time.perf_counter() - start

    wall = steps(args.steps)
    per_step_ms = wall / args.steps * 1e3
    print(f"\nwall: {per_step_ms:.3f} ms per decode step ({args.batch / (wall / args.steps):,.0f} tok/s)")

    profiler = cProfile.Profile()
    profiler.enable()
    steps(args.steps)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
    print(f"\nhost: cProfile over {args.steps} steps, by own time (per-step ms = tottime / {args.steps})")
    print("\n".join(line for line in text.getvalue().splitlines()[4:] if line.strip()))

    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            steps(args.steps)
        events = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in events) / args.steps
        # device-side events (kernels, memcpys, memsets): what a graph replay still pays ~2 us of launch for each
        device_ops = sum(e.count for e in events if e.self_device_time_total > 0 and e.device_type.name == "CUDA")
        print(f"\ndevice: {gpu_us / 1e3:.3f} ms of GPU kernel time per step, against {per_step_ms:.3f} ms of wall "
              f"({gpu_us / 1e3 / per_step_ms:.0%} busy); {device_ops / args.steps:.0f} device ops per step")
        print(events.table(sort_by="self_device_time_total", row_limit=args.top))
    for r in requests:
        engine.abort(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
