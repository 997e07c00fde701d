"""Why is Hugging Face `generate` slower in serve_bench than in shared/ANCHORS.md? (a GPU diagnostic)

    python bench/hf_step_check.py [--shape llama-1.1b] [--device cuda] [--new-tokens 64]

On the lent H100 serve_bench measured HF eager `generate` at 13 tok/s at batch 1 on the Llama 1.1B
shape (65-77 ms per step at every batch size, so host-bound), where ANCHORS.md records 66 tok/s
(15 ms per step) for the same transformers version. A baseline that slow inflates Kiln/HF, so this
times, on the same random model, batch 1 greedy decoding several ways:

- `generate` exactly as serve_bench calls it (attention mask, `min_new_tokens`, `pad_token_id`);
- `generate` with only `max_new_tokens` (what a user would type);
- a bare loop of `model(ids, past_key_values=...)` + argmax (no generate machinery);
- the bare loop's forward alone under `torch.profiler`: kernel launches per step;

and prints the CUDA-related environment (a `CUDA_LAUNCH_BLOCKING=1` would make every launch wait).
Each line: ms per step and tok/s, best of --reps.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve_bench  # noqa: E402  (shapes and the HF model config serve_bench builds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-1.1b", choices=sorted(serve_bench.ALL_SHAPES))
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.reps < 1 or args.prompt_len < 1:
        p.error("--new-tokens must be >= 2, --reps and --prompt-len >= 1")

    import torch
    import transformers
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    warnings.filterwarnings("ignore", category=FutureWarning)  # newer transformers rename past_key_values
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = serve_bench.ALL_SHAPES[args.shape]
    vocab = shape.vocab or 512
    env = {k: v for k, v in os.environ.items() if k.startswith(("CUDA", "TORCH", "PYTORCH", "NCCL", "OMP"))}
    print(f"{args.shape} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{str(dtype).removeprefix('torch.')}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"torch threads {torch.get_num_threads()}, CPU {os.cpu_count()} cores")
    print(f"environment: {env or 'no CUDA/TORCH/OMP variables'}")

    config = serve_bench.hf_config(shape, vocab, eos=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = (GPT2LMHeadModel if shape.family == "gpt2" else LlamaForCausalLM)(config)
    model = model.to(dtype).eval()
    ids = torch.randint(1, vocab, (1, args.prompt_len), device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn) -> float:
        fn()  # warm-up
        best = float("inf")
        for _ in range(args.reps):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - start)
        return best

    n = args.new_tokens

    def as_bench() -> None:
        serve_bench.hf_generate(model, ids.tolist(), n, device)

    def plain() -> None:
        model.generate(ids, max_new_tokens=n, do_sample=False)

    def loop() -> None:
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(n - 1):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    with torch.inference_mode():
        for name, fn in (("generate as serve_bench calls it", as_bench), ("generate, max_new_tokens only", plain),
                         ("bare loop: model(token, past_key_values) + argmax", loop)):
            seconds = timed(fn)
            print(f"{name:<52} {seconds / n * 1e3:8.2f} ms/step {n / seconds:9.1f} tok/s")
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            model(token, past_key_values=cache, use_cache=True)
            sync()
        events = prof.key_averages()
        launch_calls = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
        launches = sum(e.count for e in events if e.key in launch_calls)
        cpu_ms = sum(e.self_cpu_time_total for e in events) / 1e3
        print(f"one decode forward: {launches} kernel launches, {cpu_ms:.1f} ms of host time under the profiler")
        print(events.table(sort_by="self_cpu_time_total", row_limit=8))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
