"""GPU serving benchmark (issue 8): Kiln against Hugging Face transformers, random weights, one run.

    python bench/serve_bench.py [--shapes gpt2-124m,llama-1.1b | --tiny] [--device auto|cpu|cuda]
                                [--dtype bf16|fp16|fp32] [--new-tokens 256] [--batches 1,32,128]
                                [--online-requests 200] [--online-rates 2,8,32] [--skip-hf] [--skip-online]
                                [--markdown] [--json FILE]

For each shape it builds a seeded random-weight HF model from a config (`GPT2LMHeadModel` of GPT-2
124M's shape, `LlamaForCausalLM` of the Llama 1.1B shape: hidden 2048, 22 layers, 32/4 heads, MLP
5632, vocab 32000, untied), saves it with `save_pretrained` into a temp dir with the tokenizer of the
shipped default model (vocab 8192: prompts are random ids below that; Kiln samples over the
tokenizer's ids only), and measures, in the same process and sitting:

- HBM bandwidth: a device-to-device copy of --copy-mib (1 GiB), bytes = 2 x size, best of 5.
  roofline tok/s = bandwidth / weight bytes (every parameter once, tied ones once, as ANCHORS.md);
  "of roofline" = Kiln's batch-1 decode tok/s / roofline tok/s. On the CPU the same numbers are
  printed but mean little (a tiny model sits in cache).
- offline, in-process: Kiln's `Engine` (all requests added at once, `step()` until done; greedy,
  `ignore_eos`, `min_tokens` = `max_tokens`) against HF eager `generate` (no compile;
  `min_new_tokens` = `max_new_tokens`, `do_sample=False`) on the same random 32-token prompts, at
  each --batches size. tok/s = batch x new tokens / seconds, best of --reps after a short warm-up;
  loading is not timed. Batch 1 is the decode latency row (target >= 10x HF), larger batches the
  throughput rows (target >= 3x HF); HF OOM is reported as "oom".
- online: a live `python -m server` (`--max-batch-size` --online-batch) on a loopback port and a
  bounded asyncio load generator (--online-clients processes, the requests dealt among them, so that
  reading the events does not hold the client back): --online-requests requests per rate, Poisson
  arrivals (seeded), random token-id prompts of uniform length in --online-prompt-len, uniform
  output lengths in --online-output-len (`ignore_eos`, `min_tokens` = `max_tokens`), streamed from /v1/completions.
  Per rate: p50/p99 TTFT (send to the first streamed chunk), ITL (gaps between streamed chunks; tok/chunk
  above 1 means the server sent several tokens per chunk, its event loop behind the engine),
  TPOT ((last chunk - first chunk) / (tokens - 1), per request), output tok/s (completed requests'
  tokens / the rate's wall time). Each rate stops after --online-time-limit seconds: requests still
  running (or not yet sent) are cancelled and counted, never waited on. /metrics is scraped around
  each rate (the server's p99 engine step and event-loop delay during it, as histogram bucket bounds:
  a loop delay near the step time or above means HTTP and streaming, not the engine, held tokens
  back) and at the end (prefix-cache hit tokens / queried tokens, preemptions).

Correctness, same run: Kiln's batch-1 greedy tokens against HF's (HF restricted to the tokenizer's
ids, as Kiln is, when the model's vocab is larger) over the first min(32, new tokens) tokens. On fp32
CPU at least the first min(16, ...) must agree; elsewhere (bf16) the count is only reported. The
exit status is 1 when that check fails, a phase raised, an online request failed or the server did
not stop cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import random
import re
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_serving import TOKENIZER_FILES, cpu_info, glue_value_flag, kiln_server, prepare_tokenizer  # noqa: E402

DTYPE_NAMES = ("bf16", "fp16", "fp32")
TARGET_ROOFLINE = 0.70  # batch-1 decode of the Llama 1.1B shape, fraction of the weight-read roofline
TARGET_BATCH1 = 10.0  # Kiln / HF at batch 1
TARGET_BATCHED = 3.0  # Kiln / HF at the larger batches
CHECK_TOKENS = 32  # greedy tokens compared against HF
MUST_AGREE = 16  # ... of which this many must agree on fp32 CPU
CLIENT_START_S = 60.0  # how long a load-generator process may take to start (import httpx) and say so


@dataclass(frozen=True)
class ModelShape:
    name: str
    family: str  # "gpt2" | "llama"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int | None  # None: the tokenizer's
    context: int
    tied: bool
    init_std: float = 0.02
    vocab_pad: int = 0  # extra rows beyond the tokenizer's (tiny shapes: exercise a larger model vocab)


SHAPES = {
    "gpt2-124m": ModelShape("gpt2-124m", "gpt2", 768, 12, 12, 12, 3072, 50257, 1024, tied=True),
    "llama-1.1b": ModelShape("llama-1.1b", "llama", 2048, 22, 32, 4, 5632, 32000, 2048, tied=False),
}
# CPU smoke shapes; std 0.1 so the fp32 greedy check is not decided by near-ties
TINY_SHAPES = {
    "tiny-gpt2": ModelShape("tiny-gpt2", "gpt2", 64, 2, 4, 4, 256, None, 512, tied=True, init_std=0.1),
    "tiny-llama": ModelShape("tiny-llama", "llama", 64, 2, 4, 2, 128, None, 512, tied=False, init_std=0.1,
                             vocab_pad=256),
}
ALL_SHAPES = {**SHAPES, **TINY_SHAPES}

# defaults that differ between the real run and --tiny
FULL_DEFAULTS = dict(new_tokens=256, batches="1,32,128", online_requests=200, online_rates="2,8,32",
                     online_prompt_len="16:256", online_output_len="16:256", online_batch=32)
TINY_DEFAULTS = dict(new_tokens=32, batches="1,8", online_requests=20, online_rates="4,16",
                     online_prompt_len="8:96", online_output_len="8:48", online_batch=8)


def log(msg: str) -> None:
    print(f"[serve_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- small helpers
def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolation percentile (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"serve_bench.py: {what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise SystemExit(f"serve_bench.py: {what} must be integers >= 1, got {text!r}")
    return values


def parse_float_list(text: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"serve_bench.py: {what} must be comma-separated numbers, got {text!r}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise SystemExit(f"serve_bench.py: {what} must be numbers > 0, got {text!r}")
    return values


def parse_range(text: str, what: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        a, b = int(lo), int(hi if sep else lo)
    except ValueError:
        raise SystemExit(f"serve_bench.py: {what} must be LO:HI, got {text!r}") from None
    if not 1 <= a <= b:
        raise SystemExit(f"serve_bench.py: {what} must satisfy 1 <= LO <= HI, got {text!r}")
    return a, b


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom)


def poisson_arrivals(n: int, rate: float, rng: random.Random) -> list[float]:
    """Send times (seconds from the start) of n requests of a Poisson process of `rate` per second."""
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def prompt_pool(tokenizer) -> list[int]:
    special = set(tokenizer.special_tokens.values())
    return [i for i in range(tokenizer.n_vocab) if i not in special]


def random_prompts(pool: list[int], count: int, length: int, seed) -> list[list[int]]:
    rng = random.Random(str(seed))
    return [rng.choices(pool, k=length) for _ in range(count)]


# ---------------------------------------------------------------------------- models
def hf_config(shape: ModelShape, vocab: int, eos: int):
    if shape.family == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(vocab_size=vocab, n_positions=shape.context, n_embd=shape.hidden, n_layer=shape.layers,
                          n_head=shape.heads, n_inner=shape.intermediate, activation_function="gelu_new",
                          layer_norm_epsilon=1e-5, initializer_range=shape.init_std, tie_word_embeddings=shape.tied,
                          bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.context,
                       rms_norm_eps=1e-5, tie_word_embeddings=shape.tied, initializer_range=shape.init_std,
                       bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)


def model_vocab(shape: ModelShape, tokenizer_vocab: int) -> int:
    if shape.vocab is None:
        return tokenizer_vocab + shape.vocab_pad
    if shape.vocab < tokenizer_vocab:
        raise SystemExit(f"serve_bench.py: shape {shape.name} has vocab {shape.vocab}, smaller than the "
                         f"tokenizer's {tokenizer_vocab}; use a smaller tokenizer (--tokenizer)")
    return shape.vocab


def build_model_dir(shape: ModelShape, tokenizer_dir: Path, out_dir: Path, device, dtype, seed: int) -> dict:
    """Seeded random HF model of `shape`, built on `device`, saved in `dtype` + the tokenizer files."""
    import torch
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    vocab = model_vocab(shape, tokenizer.n_vocab)
    config = hf_config(shape, vocab, tokenizer.eos_id)
    cls = GPT2LMHeadModel if shape.family == "gpt2" else LlamaForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(config)
    if next(model.parameters()).device.type != device.type:
        model = model.to(device)
    model = model.to(dtype).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            (out_dir / name).write_bytes((tokenizer_dir / name).read_bytes())
    params = sum(p.numel() for p in model.parameters())  # shared (tied) parameters once
    del model
    free_memory(device)
    return {"vocab": vocab, "tokenizer_vocab": tokenizer.n_vocab, "hf_params": params}


def load_hf(model_dir: Path, device, dtype, attn: str):
    import transformers
    from transformers import AutoModelForCausalLM

    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation=attn, **{dtype_kw: dtype})
    if next(model.parameters()).dtype != dtype:
        model = model.to(dtype)
    return model.to(device).eval()


def hf_generate(model, prompts: list[list[int]], new_tokens: int, device, vocab_limit: int | None = None):
    """Greedy HF generate of exactly `new_tokens` per prompt; returns (B, new_tokens) ids on the host."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class VocabLimit(LogitsProcessor):
        """Only ids below `vocab_limit` (the tokenizer's ids, the ones Kiln samples from)."""

        def __call__(self, input_ids, scores):
            scores[:, vocab_limit:] = float("-inf")
            return scores

    processors = LogitsProcessorList([VocabLimit()]) if vocab_limit is not None else None
    ids = torch.tensor(prompts, device=device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, use_cache=True,
                             logits_processor=processors)
    if tuple(out.shape) != (len(prompts), len(prompts[0]) + new_tokens):
        raise RuntimeError(f"HF generate returned shape {tuple(out.shape)}, expected "
                           f"{(len(prompts), len(prompts[0]) + new_tokens)}")
    return out[:, len(prompts[0]):]


# ---------------------------------------------------------------------------- bandwidth
def measure_bandwidth(device, mib: int, reps: int = 5) -> dict:
    """Best-of-`reps` copy bandwidth of a `mib` MiB buffer on `device`: bytes read + written per second."""
    import torch

    nbytes = mib * 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up (first touch, allocator)
    best = float("inf")
    if device.type == "cuda":
        inner = 10
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                dst.copy_(src)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3 / inner)
    else:
        for _ in range(reps):
            started = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - started)
    del src, dst
    free_memory(device)
    return {"bytes": nbytes, "seconds": best, "gb_s": 2 * nbytes / best / 1e9}


# ---------------------------------------------------------------------------- offline
def batch_failure(exc: Exception, what: str, out: dict) -> str:
    """Status of a batch that raised: "oom", or "error" (recorded in out["errors"], traceback printed)."""
    if is_oom(exc):
        log(f"  {what}: out of memory")
        return "oom"
    traceback.print_exc()
    out["errors"].append(f"{what}: {type(exc).__name__}: {exc}")
    return "error"


def best_of(fn, reps: int):
    """(best seconds, result of the first timed call) over `reps` calls of fn(rep)."""
    best, first = float("inf"), None
    for rep in range(reps):
        seconds, result = fn(rep)
        best = min(best, seconds)
        first = result if first is None else first
    return best, first


def bench_hf(model_dir: Path, device, dtype, args, prompts_for, vocab_limit: int | None) -> dict:
    """HF eager generate at each batch size; plus the greedy tokens of the check (untimed)."""
    model = load_hf(model_dir, device, dtype, args.hf_attn)
    out: dict = {"tok_s": {}, "status": {}, "errors": []}
    try:
        for batch in args.batches:
            log(f"  HF generate, batch {batch}")
            try:
                hf_generate(model, prompts_for(batch, "warmup"), min(8, args.new_tokens), device)

                def timed(rep: int, batch=batch):
                    prompts = prompts_for(batch, rep)
                    sync(device)
                    started = time.perf_counter()
                    hf_generate(model, prompts, args.new_tokens, device)
                    sync(device)
                    return time.perf_counter() - started, None

                seconds, _ = best_of(timed, args.reps)
                out["tok_s"][batch] = batch * args.new_tokens / seconds
                out["status"][batch] = "ok"
            except Exception as e:  # noqa: BLE001 - OOM is a result; anything else an error, other batches go on
                out["tok_s"][batch] = None
                out["status"][batch] = batch_failure(e, f"HF batch {batch}", out)
                free_memory(device)
        check = min(CHECK_TOKENS, args.new_tokens)
        out["greedy"] = hf_generate(model, prompts_for(1, 0), check, device, vocab_limit)[0].tolist()
    finally:
        model = None  # noqa: F841 (free it before the engine loads)
        free_memory(device)
    return out


def kiln_generate(engine, prompts: list[list[int]], new_tokens: int):
    """All requests at once, step() until done; (seconds, requests)."""
    from model.engine import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, min_tokens=new_tokens)
    sync(engine.device)
    started = time.perf_counter()
    requests = [engine.add_request(p, params) for p in prompts]
    while engine.has_work:
        engine.step()
    sync(engine.device)
    seconds = time.perf_counter() - started
    for r in requests:
        if len(r.output_ids) != new_tokens or r.finish_reason != "length":
            raise RuntimeError(f"Kiln generated {len(r.output_ids)} tokens (finish {r.finish_reason!r}), "
                               f"expected {new_tokens}")
    return seconds, requests


def bench_kiln(model_dir: Path, device, dtype_name: str, args, prompts_for) -> dict:
    """Kiln's Engine in-process: one engine per batch size (same loaded model), warm-up then best of reps."""
    from model.attention import resolve_backend
    from model.checkpoint import load_model
    from model.engine import Engine
    from model.tokenizer import load_tokenizer

    started = time.perf_counter()
    model = load_model(model_dir, device=device, dtype=dtype_name)
    model.fused_gemv = args.gemv
    tokenizer = load_tokenizer(model_dir)
    load_s = time.perf_counter() - started
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
    params = sum(p.numel() for p in model.parameters())
    out: dict = {"load_s": load_s, "weight_bytes": weight_bytes, "params": params, "tok_s": {}, "status": {},
                 "preemptions": 0, "attn_backend": None, "errors": []}
    prompt_len = args.prompt_len
    try:
        for batch in args.batches:
            log(f"  Kiln engine, batch {batch}")
            # enough blocks for every sequence at full length (+1 block each of headroom): no preemption
            # (the pool must also hold one sequence of the model's full context, which the engine checks)
            per_seq = -(-(prompt_len + args.new_tokens) // args.kv_block_size) + 1
            num_blocks = max(batch * per_seq, -(-model.config.max_seq_len // args.kv_block_size) + 1) + 1
            engine = None
            try:
                # (speculative_tokens=0: the rows measure decode steps, one token per sequence each)
                engine = Engine(model, tokenizer, max_batch_size=batch, block_size=args.kv_block_size,
                                num_blocks=num_blocks, compile=args.compile, speculative_tokens=0)
                out["attn_backend"] = resolve_backend(model.attn_backend, engine.device, model.config.dim_per_head)
                out.setdefault("decode_path", {})[batch] = engine.decode_path
                if args.compile:
                    out.setdefault("compile", {})[batch] = (engine.compile_seconds, engine.compile_error)
                kiln_generate(engine, prompts_for(batch, "warmup"), min(8, args.new_tokens))
                seconds, requests = best_of(
                    lambda rep, batch=batch, engine=engine: kiln_generate(engine, prompts_for(batch, rep),
                                                                          args.new_tokens), args.reps)
                out["tok_s"][batch] = batch * args.new_tokens / seconds
                out["status"][batch] = "ok"
                out["preemptions"] += engine.num_preemptions
                if batch == 1:
                    out["greedy"] = requests[0].output_ids[: min(CHECK_TOKENS, args.new_tokens)]
                    # the same step with each step's ids read back before the next is queued
                    engine.async_scheduling = not engine.async_scheduling
                    seconds, _ = best_of(lambda rep, engine=engine: kiln_generate(engine, prompts_for(1, rep),
                                                                                  args.new_tokens), args.reps)
                    engine.async_scheduling = not engine.async_scheduling
                    out["scheduling"] = {"async": engine.async_scheduling, "other_tok_s": args.new_tokens / seconds}
            except Exception as e:  # noqa: BLE001 - OOM is a result; anything else an error, other batches go on
                out["tok_s"][batch] = None
                out["status"][batch] = batch_failure(e, f"Kiln batch {batch}", out)
            finally:
                del engine
                free_memory(device)
        if "greedy" not in out:  # batch 1 was not among --batches: run the check on its own
            engine = Engine(model, tokenizer, max_batch_size=1, block_size=args.kv_block_size,
                            num_blocks=-(-model.config.max_seq_len // args.kv_block_size) + 2, speculative_tokens=0)
            _, requests = kiln_generate(engine, prompts_for(1, 0), min(CHECK_TOKENS, args.new_tokens))
            out["greedy"] = requests[0].output_ids
            del engine
    finally:
        del model
        free_memory(device)
    return out


# ---------------------------------------------------------------------------- online
async def stream_one(client, url: str, prompt: list[int], out_len: int) -> dict:
    """One streamed completion; timings from the moment the request is sent."""
    body = {"prompt": prompt, "max_tokens": out_len, "min_tokens": out_len, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    rec: dict = {"prompt_len": len(prompt), "output_len": out_len, "ttft": None, "itl": [], "tokens": 0,
                 "latency": None, "error": None, "done": False}
    sent = time.monotonic()
    last = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode("utf-8", "replace")
                rec["error"] = f"HTTP {r.status_code}: {text[:300]}"
                return rec
            finished = False
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, ": ping" keep-alives
                data = line[5:].strip()
                if data == "[DONE]":
                    finished = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec["error"] = f"stream error: {chunk['error'].get('message')}"
                    return rec
                now = time.monotonic()
                if chunk.get("choices"):
                    if rec["ttft"] is None:
                        rec["ttft"] = now - sent
                    else:
                        rec["itl"].append(now - last)
                    last = now
                if chunk.get("usage"):
                    rec["tokens"] = chunk["usage"]["completion_tokens"]
        if not finished:
            rec["error"] = "stream ended without [DONE]"
        elif rec["tokens"] != out_len:
            rec["error"] = f"asked for {out_len} tokens, usage says {rec['tokens']}"
        elif rec["ttft"] is None:
            rec["error"] = "no token chunk in the stream"
        else:
            rec["latency"] = last - sent
            rec["done"] = True
            rec["finished_at"] = time.monotonic()
    except Exception as e:  # noqa: BLE001 (asyncio.CancelledError is not an Exception: it propagates)
        rec["error"] = f"{type(e).__name__}: {e}"
    return rec


def online_workload(pool: list[int], n: int, rate: float, prompt_range: tuple[int, int],
                    output_range: tuple[int, int], seed) -> list[dict]:
    """n requests (send time, prompt ids, output length); seeded per rate so prompts never repeat
    across rates (which would turn into prefix-cache hits)."""
    rng = random.Random(f"online-{seed}-{rate}")
    arrivals = poisson_arrivals(n, rate, rng)
    return [{"at": at, "prompt": rng.choices(pool, k=rng.randint(*prompt_range)),
             "out_len": rng.randint(*output_range)} for at in arrivals]


async def run_load(url: str, workload: list[dict], time_limit: float,
                   start: float | None = None) -> tuple[list[dict], float, int, int]:
    """Send the workload at its arrival times, for at most `time_limit` seconds from `start` (a
    `time.monotonic()` value shared by the load processes; None: now).

    Returns (records of the streams that ended, wall seconds, cancelled in flight, never sent)."""
    import httpx

    records: list[dict] = []
    limits = httpx.Limits(max_connections=len(workload) + 4, max_keepalive_connections=len(workload) + 4)
    timeout = httpx.Timeout(time_limit + 60.0, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        start = time.monotonic() if start is None else start

        launched: set[int] = set()

        async def launch(i: int, item: dict) -> None:
            await asyncio.sleep(max(0.0, start + item["at"] - time.monotonic()))
            launched.add(i)
            records.append(await stream_one(client, url, item["prompt"], item["out_len"]))

        tasks = {asyncio.create_task(launch(i, item)): i for i, item in enumerate(workload)}
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, start + time_limit - time.monotonic()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        in_flight = sum(tasks[t] in launched for t in pending)
        if pending:
            wall = time.monotonic() - start
        else:
            ends = [r["finished_at"] for r in records if r.get("finished_at")]
            wall = (max(ends) if ends else time.monotonic()) - start
    return records, wall, in_flight, len(pending) - in_flight


def _load_process(url: str, workload: list[dict], time_limit: float, go, start, queue) -> None:
    import httpx  # noqa: F401  (imported before saying ready: the first send is not delayed by it)

    queue.put("ready")
    go.wait()
    queue.put(asyncio.run(run_load(url, workload, time_limit, start.value)))


def run_load_processes(url: str, workload: list[dict], time_limit: float,
                       clients: int) -> tuple[list[dict], float, int, int]:
    """`run_load` with the requests dealt round-robin to `clients` processes that share one start time (one
    asyncio process reading every streamed event can fall behind a fast server and add its own backlog to
    the latencies it measures); 1: in this process. Returns what `run_load` does, for the whole workload."""
    if clients <= 1 or len(workload) < 2:
        return asyncio.run(run_load(url, workload, time_limit))
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    go, start = spawn.Event(), spawn.Value("d", 0.0)
    shares = [workload[i::clients] for i in range(clients)]
    queues = [spawn.Queue() for _ in shares]
    procs = [spawn.Process(target=_load_process, args=(url, share, time_limit, go, start, queue), daemon=True)
             for share, queue in zip(shares, queues)]
    for proc in procs:
        proc.start()
    try:
        for queue in queues:
            if queue.get(timeout=CLIENT_START_S) != "ready":
                raise RuntimeError("a load-generator process did not start")
        start.value = time.monotonic() + 0.05  # every process is waiting on `go`: the schedule starts now
        go.set()
        results = [queue.get(timeout=time_limit + 120.0) for queue in queues]
    finally:
        for proc in procs:
            proc.join(timeout=30 if go.is_set() else 0)  # not started: nothing to wait for
            if proc.is_alive():
                proc.kill()
    return ([r for records, _, _, _ in results for r in records], max(wall for _, wall, _, _ in results),
            sum(in_flight for _, _, in_flight, _ in results), sum(unsent for _, _, _, unsent in results))


def summarize(records: list[dict], wall: float, cancelled: int, not_sent: int, rate: float, requests: int) -> dict:
    done = [r for r in records if r["done"]]
    errors = [r["error"] for r in records if r["error"]]
    ttft = [r["ttft"] for r in done]
    itl = [x for r in done for x in r["itl"]]
    tpot = [(r["latency"] - r["ttft"]) / (r["tokens"] - 1) for r in done if r["tokens"] > 1]
    latency = [r["latency"] for r in done]
    tokens = sum(r["tokens"] for r in done)

    def ms(values: list[float], q: float):
        v = percentile(values, q)
        return None if v is None else v * 1e3

    return {"rate": rate, "requests": requests, "completed": len(done), "cancelled": cancelled, "not_sent": not_sent,
            "errors": len(errors), "error_messages": errors[:5], "wall_s": wall,
            "output_tokens": tokens, "prompt_tokens": sum(r["prompt_len"] for r in done),
            # streamed chunks of the completed requests: fewer than tokens when a token's text was held back
            # (part of a UTF-8 character) or when the server's event loop fell behind the engine and sent a
            # stream's pending tokens as one chunk, so an ITL gap can span more than one token
            "chunks": sum(len(r["itl"]) + 1 for r in done),
            "output_tok_s": tokens / wall if wall > 0 else None,
            "requests_per_s": len(done) / wall if wall > 0 else None,
            "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99),
            "itl_p50_ms": ms(itl, 50), "itl_p99_ms": ms(itl, 99),
            "tpot_p50_ms": ms(tpot, 50), "tpot_p99_ms": ms(tpot, 99),
            "e2e_p50_s": percentile(latency, 50), "e2e_p99_s": percentile(latency, 99)}


METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {"name" or "name{labels}": value}, comments skipped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = METRIC_LINE.match(line)
        if m:
            with contextlib.suppress(ValueError):
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def histogram_quantile(before: dict[str, float], after: dict[str, float], name: str, q: float) -> float | None:
    """The q-quantile (0-1) of what histogram `name` observed between two scrapes, as Prometheus's
    histogram_quantile reads it: the upper bound of the first bucket holding it (None: nothing observed)."""
    prefix = name + '_bucket{le="'
    bounds = sorted((float(key[len(prefix):-2]), after[key] - before.get(key, 0.0))
                    for key in after if key.startswith(prefix))
    if not bounds or bounds[-1][1] <= 0:
        return None
    return next(le for le, count in bounds if count >= q * bounds[-1][1])


def bench_online(model_dir: Path, pool: list[int], device, dtype_name: str, args, workdir: Path) -> dict:
    import httpx

    extra = ["--device", device.type, "--dtype", dtype_name, "--kv-block-size", str(args.kv_block_size),
             *shlex.split(args.server_args)]
    out: dict = {"rates": [], "server_args": extra}
    server_log = Path(args.server_log) if args.server_log else workdir / f"kiln-serve-{model_dir.name}.log"
    with kiln_server(model_dir, args.threads, args.online_batch, extra, server_log) as server:
        out["health_s"] = server["health_s"]
        url = server["url"]
        log(f"  server up in {server['health_s']:.1f} s; warm-up requests")
        lo, hi = args.online_prompt_len
        warm = [{"at": 0.0, "prompt": p, "out_len": min(8, args.online_output_len[1])}
                for p in random_prompts(pool, min(4, args.online_batch), hi, "online-warmup")]
        warm += [{"at": 0.0, "prompt": p, "out_len": 4} for p in random_prompts(pool, 1, lo, "online-warmup-2")]
        for line in server_log.read_text().splitlines():  # the server's start-up warm-up (GPU servers)
            if "compiled and tuned" in line:
                out["warm_up"] = line.strip()
                log(f"  server log: {out['warm_up']}")
        records, _, _, _ = asyncio.run(run_load(url, warm, args.online_time_limit))
        bad = [r["error"] for r in records if r["error"]]
        if bad:
            raise RuntimeError(f"warm-up requests failed: {bad[:3]}")
        def scrape() -> dict[str, float]:
            response = httpx.get(url + "/metrics", timeout=30.0, trust_env=False)
            return parse_metrics(response.text) if response.status_code == 200 else {}

        metrics = scrape()
        for rate in args.online_rates:
            log(f"  online: {args.online_requests} requests at {rate:g} req/s (limit {args.online_time_limit:g} s)")
            workload = online_workload(pool, args.online_requests, rate, args.online_prompt_len,
                                       args.online_output_len, args.seed)
            records, wall, cancelled, not_sent = run_load_processes(url, workload, args.online_time_limit,
                                                                    args.online_clients)
            summary = summarize(records, wall, cancelled, not_sent, rate, len(workload))
            before, metrics = metrics, scrape()
            # the server's side of the same rate: its engine steps, and how long their outputs waited for the
            # event loop (HTTP and streaming) before going out
            for key, name in (("step_p99_ms", "kiln_engine_step_seconds"),
                              ("loop_delay_p99_ms", "kiln_event_loop_delay_seconds")):
                value = histogram_quantile(before, metrics, name, 0.99)
                summary[key] = None if value is None else value * 1e3
            log(f"    {summary['completed']} done, {cancelled} cancelled in flight, {not_sent} not sent (time limit), "
                f"{summary['errors']} errors, "
                f"{summary['output_tok_s'] or 0:,.0f} out tok/s")
            out["rates"].append(summary)
        metrics = scrape()
    out["exit_code"] = server["exit_code"]
    keep = ("kiln_prefix_cache_hits_total", "kiln_prefix_cache_queries_total", "kiln_num_preemptions_total",
            "kiln_generation_tokens_total", "kiln_prompt_tokens_total")
    out["metrics"] = {k: metrics[k] for k in keep if k in metrics}
    out["metrics"].update({k: v for k, v in metrics.items() if k.startswith("kiln_request_finish_total")})
    return out


# ---------------------------------------------------------------------------- one shape
def run_shape(shape: ModelShape, tokenizer_dir: Path, workdir: Path, device, args, bandwidth: dict,
              result: dict, dump=lambda: None) -> dict:
    """Fill `result` phase by phase (calling `dump` after each, so a killed run keeps what it measured)."""
    from model.checkpoint import DTYPES
    from model.tokenizer import load_tokenizer

    dtype = DTYPES[args.dtype]
    result.update({"shape": asdict(shape), "name": shape.name, "errors": []})
    model_dir = workdir / shape.name

    def phase(name: str, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - report, keep the other phases' numbers
            traceback.print_exc()
            result["errors"].append(f"{name}: {type(e).__name__}: {e}")
            free_memory(device)
            return None
        finally:
            dump()

    log(f"{shape.name}: building the random model on {device} ({args.dtype})")
    started = time.perf_counter()
    result["model"] = phase("build", lambda: build_model_dir(shape, tokenizer_dir, model_dir, device, dtype,
                                                             args.seed))
    result["build_s"] = time.perf_counter() - started
    if result["model"] is None:
        return result
    tokenizer = load_tokenizer(model_dir)
    pool = prompt_pool(tokenizer)
    vocab_limit = tokenizer.n_vocab if result["model"]["vocab"] > tokenizer.n_vocab else None
    result["check_vocab_limit"] = vocab_limit

    def prompts_for(batch: int, rep) -> list[list[int]]:
        return random_prompts(pool, batch, args.prompt_len, (args.seed, shape.name, batch, rep))

    if not args.skip_hf:
        result["hf"] = phase("hf", lambda: bench_hf(model_dir, device, dtype, args, prompts_for, vocab_limit))
    result["kiln"] = phase("kiln", lambda: bench_kiln(model_dir, device, args.dtype, args, prompts_for))
    for side in ("hf", "kiln"):  # a batch that raised (not OOM) is an error of the run; the others still count
        result["errors"] += [f"{side}: {e}" for e in (result.get(side) or {}).get("errors", [])]
    kiln, hf = result.get("kiln"), result.get("hf")
    if kiln:
        b1 = kiln["tok_s"].get(1)
        roofline = bandwidth["gb_s"] * 1e9 / kiln["weight_bytes"]
        result["roofline_tok_s"] = roofline
        result["roofline_fraction"] = b1 / roofline if b1 else None
        if hf and hf["tok_s"].get(1):
            result["hf_roofline_fraction"] = hf["tok_s"][1] / roofline
    if kiln and hf:
        result["ratios"] = {b: (kiln["tok_s"][b] / hf["tok_s"][b] if kiln["tok_s"].get(b) and hf["tok_s"].get(b)
                                else None) for b in args.batches}
        want, got = hf.get("greedy", []), kiln.get("greedy", [])
        same = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        result["greedy"] = {"agree": same, "compared": min(len(want), len(got)), "hf": want, "kiln": got}
    if not args.skip_online:
        result["online"] = phase("online", lambda: bench_online(model_dir, pool, device, args.dtype, args, workdir))
    return result


# ---------------------------------------------------------------------------- report
def environment(device) -> dict:
    import importlib.metadata

    import torch
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        name, memory = cpu_info()[0], None
    info = {"device": name, "device_type": device.type, "device_memory_bytes": memory, "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": datetime.date.today().isoformat(), "threads": torch.get_num_threads()}
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        info["triton"] = importlib.metadata.version("triton")
    return info


def fmt_num(x, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def fmt_ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def met(value, target: float) -> str:
    return "-" if value is None else ("yes" if value >= target else "no")


def decode_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        kiln, hf = r.get("kiln") or {}, r.get("hf") or {}
        frac = r.get("roofline_fraction")
        is_target = r["name"] == "llama-1.1b"
        ratio = (r.get("ratios") or {}).get(1)
        rows.append([r["name"], f"{kiln['params'] / 1e6:,.1f}M" if kiln else "-",
                     f"{kiln['weight_bytes'] / 1e9:.3f} GB" if kiln else "-",
                     fmt_num((kiln.get("tok_s") or {}).get(1)), fmt_num(r.get("roofline_tok_s")),
                     "-" if frac is None else f"{100 * frac:.1f}%" + (
                         f" (>= {100 * TARGET_ROOFLINE:.0f}%: {met(frac, TARGET_ROOFLINE)})" if is_target else ""),
                     fmt_num((hf.get("tok_s") or {}).get(1)),
                     "-" if r.get("hf_roofline_fraction") is None else f"{100 * r['hf_roofline_fraction']:.1f}%",
                     fmt_ratio(ratio) + (f" (>= {TARGET_BATCH1:.0f}x: {met(ratio, TARGET_BATCH1)})"
                                         if ratio is not None else "")])
    return rows


DECODE_HEADER = ["shape", "params", "weights", "Kiln b1 tok/s", "roofline tok/s", "Kiln of roofline",
                 "HF b1 tok/s", "HF of roofline", "Kiln/HF"]
OFFLINE_HEADER = ["shape", "batch", "HF tok/s", "Kiln tok/s", "Kiln/HF", "target", "met"]
ONLINE_HEADER = ["shape", "rate req/s", "done", "cancelled", "not sent", "errors", "wall s", "out tok/s", "TTFT p50 ms",
                 "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "TPOT p50 ms", "TPOT p99 ms", "tok/chunk",
                 "step p99 ms <=", "loop delay p99 ms <="]


def offline_rows(results: list[dict], batches: list[int]) -> list[list[str]]:
    rows = []
    for r in results:
        kiln, hf = r.get("kiln") or {}, r.get("hf") or {}
        for b in batches:
            ratio = (r.get("ratios") or {}).get(b)
            target = TARGET_BATCH1 if b == 1 else TARGET_BATCHED

            def cell(side: dict) -> str:
                status = (side.get("status") or {}).get(b)
                return status if status not in (None, "ok") else fmt_num((side.get("tok_s") or {}).get(b))
            rows.append([r["name"], str(b), cell(hf) if hf else "skipped", cell(kiln) if kiln else "error",
                         fmt_ratio(ratio), f">= {target:.0f}x", met(ratio, target)])
    return rows


def online_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        for s in (r.get("online") or {}).get("rates", []):
            rows.append([r["name"], f"{s['rate']:g}", str(s["completed"]), str(s["cancelled"]), str(s["not_sent"]),
                         str(s["errors"]),
                         f"{s['wall_s']:.1f}", fmt_num(s["output_tok_s"]), fmt_num(s["ttft_p50_ms"], 1),
                         fmt_num(s["ttft_p99_ms"], 1), fmt_num(s["itl_p50_ms"], 1), fmt_num(s["itl_p99_ms"], 1),
                         fmt_num(s["tpot_p50_ms"], 1), fmt_num(s["tpot_p99_ms"], 1),
                         fmt_num(s["output_tokens"] / s["chunks"] if s["chunks"] else None, 2),
                         fmt_num(s.get("step_p99_ms"), 1), fmt_num(s.get("loop_delay_p99_ms"), 1)])
    return rows


def check_lines(r: dict, args) -> list[str]:
    lines = []
    g = r.get("greedy")
    if g:
        limit = r.get("check_vocab_limit")
        note = f", HF limited to the tokenizer's {limit} ids as Kiln is" if limit else ""
        lines.append(f"{r['name']}: greedy tokens, Kiln == HF at batch 1: {g['agree']}/{g['compared']} agree{note}")
    online = r.get("online")
    if online:
        m = online.get("metrics", {})
        hits, queries = m.get("kiln_prefix_cache_hits_total"), m.get("kiln_prefix_cache_queries_total")
        cache = ("-" if hits is None or queries is None else
                 f"{hits:,.0f}/{queries:,.0f} prompt tokens ({100 * hits / queries if queries else 0:.1f}%)")
        pre = m.get("kiln_num_preemptions_total")
        lines.append(f"{r['name']}: server /health after {online['health_s']:.1f} s, prefix-cache hits {cache}, "
                     f"preemptions {fmt_num(pre)}, exit code after SIGTERM {online.get('exit_code')}")
        for s in online["rates"]:
            if s["error_messages"]:
                lines.append(f"{r['name']} rate {s['rate']:g}: errors {s['error_messages']}")
    if r.get("kiln"):
        k = r["kiln"]
        lines.append(f"{r['name']}: Kiln load {k['load_s']:.1f} s, attention backend {k['attn_backend']}, "
                     f"offline preemptions {k['preemptions']}")
        if k.get("decode_path"):
            lines.append(f"{r['name']}: decode path by batch: "
                         + ", ".join(f"{b}: {path}" for b, path in k["decode_path"].items()))
        for b, (seconds, error) in (k.get("compile") or {}).items():
            lines.append(f"{r['name']}: --compile at batch {b}: "
                         + (f"compiled in {seconds:.1f} s" if seconds is not None else f"not compiled ({error})"))
        sched, b1 = k.get("scheduling"), (k.get("tok_s") or {}).get(1)
        if sched and b1:
            on, off = (b1, sched["other_tok_s"]) if sched["async"] else (sched["other_tok_s"], b1)
            lines.append(f"{r['name']}: batch 1 with async scheduling {on:,.0f} tok/s, reading ids back every "
                         f"step {off:,.0f} tok/s ({on / off:.2f}x; the default here is "
                         f"{'async' if sched['async'] else 'per-step'})")
    for e in r["errors"]:
        lines.append(f"{r['name']}: FAILED {e}")
    return lines


def table(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        return (["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
                + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in [header] + rows]


def render(report: dict, args, markdown: bool) -> str:
    info, results, bw = report["environment"], report["results"], report["bandwidth"]
    device_line = (f"{info['device']}; torch {info['torch']}, transformers {info['transformers']}"
                   + (f", triton {info['triton']}" if info.get("triton") else "")
                   + (f", CUDA {info['cuda']}" if info.get("device_type") == "cuda" else
                      f", {info['threads']} CPU threads") + f"; {args.dtype}")
    shapes = "; ".join(f"{r['name']} ({r['shape']['family']}: h{r['shape']['hidden']} L{r['shape']['layers']} "
                       f"heads {r['shape']['heads']}/{r['shape']['kv_heads']} ff{r['shape']['intermediate']} "
                       f"vocab {(r.get('model') or {}).get('vocab', '?')})" for r in results)
    kind = "HBM" if info["device_type"] == "cuda" else "CPU memory (not HBM; cache-resident tiny models)"
    lines = []
    if markdown:
        lines += [f"## Serving benchmark (issue 8): Kiln vs HF transformers, {info['date']}", "",
                  f"`{report['command']}`", ""]
    else:
        lines += [f"command: {report['command']}", f"date: {info['date']}"]
    lines += [f"Device: {device_line}. Shapes: {shapes}. Prompts: random ids, {args.prompt_len} tokens; "
              f"{args.new_tokens} new tokens (greedy, EOS ignored); HF eager `generate` "
              f"({args.hf_attn} attention, no compile); best of {args.reps} after a warm-up.",
              f"{kind} copy bandwidth: {bw['gb_s']:,.0f} GB/s ({bw['bytes'] / 2**20:,.0f} MiB copy, read + write, "
              f"best of 5); roofline tok/s = bandwidth / weight bytes.", ""]
    lines += ["**Batch-1 decode**", ""] if markdown else ["batch-1 decode:"]
    lines += table(DECODE_HEADER, decode_rows(results), markdown) + [""]
    lines += (["**Offline throughput (in-process engine vs HF generate, same prompts)**", ""] if markdown
              else ["offline throughput:"])
    lines += table(OFFLINE_HEADER, offline_rows(results, args.batches), markdown) + [""]
    if not args.skip_online:
        ranges = (f"{args.online_requests} requests per rate, Poisson arrivals, prompts "
                  f"{args.online_prompt_len[0]}-{args.online_prompt_len[1]} tokens, outputs "
                  f"{args.online_output_len[0]}-{args.online_output_len[1]} tokens, --max-batch-size "
                  f"{args.online_batch}, at most {args.online_time_limit:g} s per rate, "
                  f"{args.online_clients} load-generator process{'es' if args.online_clients > 1 else ''}")
        lines += ([f"**Online (live server over loopback HTTP, streamed; {ranges})**", ""] if markdown
                  else [f"online ({ranges}):"])
        lines += table(ONLINE_HEADER, online_rows(results), markdown) + [""]
    checks = [line for r in results for line in check_lines(r, args)]
    if markdown:
        lines += [line + "." for line in checks]
        lines += ["", "Targets (H100, 1.1B shape): batch-1 decode >= 70% of the weight-read roofline and >= 10x HF "
                  "eager; batch 32 and 128 >= 3x HF eager."]
    else:
        lines += ["checks:"] + [f"  {line}" for line in checks]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Defaults without --tiny: " + ", ".join(f"{k}={v}" for k, v in
                                                                            FULL_DEFAULTS.items())
                                + ". With --tiny: " + ", ".join(f"{k}={v}" for k, v in TINY_DEFAULTS.items()))
    p.add_argument("--shapes", default=None,
                   help=f"comma-separated shapes among {', '.join(ALL_SHAPES)} (default: gpt2-124m,llama-1.1b; "
                        "with --tiny: tiny-gpt2,tiny-llama)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and small counts (the CPU smoke test)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES, help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens per offline sequence (256)")
    p.add_argument("--prompt-len", type=int, default=32, help="offline prompt length in tokens (32)")
    p.add_argument("--batches", default=None, help="offline batch sizes (1,32,128)")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions per offline measurement, best kept (2)")
    p.add_argument("--kv-block-size", type=int, default=16, help="Kiln KV block size, offline and served (16)")
    p.add_argument("--hf-attn", default="sdpa", choices=("sdpa", "eager"), help="HF attention implementation")
    p.add_argument("--copy-mib", type=int, default=None, 
                   help="bandwidth copy size in MiB (CUDA 1024, CPU 256, --tiny on CPU 64)")
    p.add_argument("--online-requests", type=int, default=None, help="requests per rate (200)")
    p.add_argument("--online-rates", default=None, help="Poisson arrival rates, requests/s (2,8,32)")
    p.add_argument("--online-prompt-len", default=None, help="uniform prompt length range LO:HI (16:256)")
    p.add_argument("--online-output-len", default=None, help="uniform output length range LO:HI (16:256)")
    p.add_argument("--online-batch", type=int, default=None, help="the server's --max-batch-size (32)")
    p.add_argument("--online-clients", type=int, default=None,
                   help="load-generator processes, the requests dealt among them (default: a quarter of the "
                        "CPUs, 1 to 4)")
    p.add_argument("--online-time-limit", type=float, default=None,
                   help="seconds per rate before outstanding requests are cancelled (CUDA 120, CPU 60)")
    p.add_argument("--server-args", default="", help='extra kiln serve flags, e.g. --server-args="--no-prefix-caching"')
    p.add_argument("--server-log", default=None, metavar="FILE",
                   help="write the live server's log here (default: a temporary directory; one shape per run)")
    p.add_argument("--threads", type=int, default=None, 
                   help="torch CPU threads here and in the server (all cores; --tiny on CPU: 1)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the shipped default model's)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile Kiln's decode step in the offline engine (CUDA: before graph capture); "
                        'pass --server-args="--compile" for the live server too')
    p.add_argument("--gemv", action="store_true",
                   help="the offline engine's decode steps of up to 4 rows through kernels.gemv, the norm and SwiGLU "
                        "fused into the products (Transformer.fused_gemv, off by default; not the live server)")
    p.add_argument("--pdl", action="store_true",
                   help="with --gemv: those products launched with programmatic dependent launch "
                        "(kernels._utils.PDL; CUDA, compute capability 9.0+)")
    p.add_argument("--skip-hf", action="store_true", help="no HF measurements (no ratios, no greedy check)")
    p.add_argument("--skip-online", action="store_true", help="no live server / load generator")
    p.add_argument("--markdown", action="store_true", help="print a Markdown section for bench/RESULTS.md")
    p.add_argument("--json", default=None, metavar="FILE", 
                   help="also write everything as JSON (rewritten after each phase)")
    p.add_argument("--seed", type=int, default=0)
    return p


def resolve_args(args: argparse.Namespace, cuda_available: bool) -> argparse.Namespace:
    defaults = TINY_DEFAULTS if args.tiny else FULL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "auto":
        args.device = "cuda" if cuda_available else "cpu"
    if args.device == "cuda" and not cuda_available:
        raise SystemExit("serve_bench.py: --device cuda, but torch.cuda.is_available() is False here")
    names = [s.strip() for s in (args.shapes or ("tiny-gpt2,tiny-llama" if args.tiny else
                                                 "gpt2-124m,llama-1.1b")).split(",") if s.strip()]
    unknown = [n for n in names if n not in ALL_SHAPES]
    if unknown or not names:
        raise SystemExit(f"serve_bench.py: unknown shape(s) {unknown}; choose from {', '.join(ALL_SHAPES)}")
    if args.device == "cpu" and any(n in SHAPES for n in names):
        raise SystemExit("serve_bench.py: the GPT-2 124M / Llama 1.1B shapes are for a GPU; on the CPU run "
                         "the tiny shapes: pass --tiny (or --device cuda on a machine with a GPU)")
    args.shape_list = [ALL_SHAPES[n] for n in names]
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.batches = parse_int_list(args.batches, "--batches")
    args.online_rates = parse_float_list(args.online_rates, "--online-rates")
    args.online_prompt_len = parse_range(args.online_prompt_len, "--online-prompt-len")
    args.online_output_len = parse_range(args.online_output_len, "--online-output-len")
    if args.online_time_limit is None:
        args.online_time_limit = 120.0 if args.device == "cuda" else 60.0
    if args.copy_mib is None:
        args.copy_mib = 1024 if args.device == "cuda" else (64 if args.tiny else 256)
    if args.online_clients is None:
        args.online_clients = max(1, min(4, (os.cpu_count() or 1) // 4))
    for name in ("new_tokens", "prompt_len", "reps", "kv_block_size", "online_requests", "online_batch",
                 "online_clients", "copy_mib"):
        if getattr(args, name) < 1:
            raise SystemExit(f"serve_bench.py: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.online_time_limit > 0:
        raise SystemExit("serve_bench.py: --online-time-limit must be > 0")
    for shape in args.shape_list:
        if args.prompt_len + args.new_tokens > shape.context:
            raise SystemExit(f"serve_bench.py: --prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} "
                             f"exceeds {shape.name}'s context of {shape.context}")
        if not args.skip_online and args.online_prompt_len[1] + args.online_output_len[1] > shape.context:
            raise SystemExit(f"serve_bench.py: the longest online request exceeds {shape.name}'s context of "
                             f"{shape.context}")
    return args


def enable_pdl(script: str, gemv: bool, device) -> None:
    """--pdl: programmatic dependent launch for the kernels.gemv step (kernels._utils.set_pdl), or exit naming
    what is missing (--gemv, or a CUDA device of compute capability 9.0+)."""
    if not gemv:
        raise SystemExit(f"{script}: --pdl applies to the kernels.gemv step: add --gemv")
    from kernels import _utils

    try:
        _utils.set_pdl(True, device)
    except ValueError as exc:
        raise SystemExit(f"{script}: --pdl: {exc}") from None


def exit_problems(report: dict, args) -> list[str]:
    problems = []
    for r in report["results"]:
        problems += [f"{r['name']}: {e}" for e in r["errors"]]
        g = r.get("greedy")
        if g and args.device == "cpu" and args.dtype == "fp32":
            need = min(MUST_AGREE, g["compared"])
            if g["agree"] < need:
                problems.append(f"{r['name']}: Kiln's greedy tokens differ from HF's at token {g['agree']} "
                                f"(fp32 CPU: the first {need} must agree)")
        online = r.get("online")
        if online:
            errors = sum(s["errors"] for s in online["rates"])
            if errors:
                problems.append(f"{r['name']}: {errors} online request(s) failed")
            if online.get("exit_code") != 0:
                problems.append(f"{r['name']}: kiln serve exited with {online.get('exit_code')} after SIGTERM")
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(glue_value_flag(argv, "--server-args"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    args = resolve_args(args, torch.cuda.is_available())
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads is None:  # tiny matmuls: one thread is faster, and immune to neighbours on a shared CPU
        args.threads = 1 if (args.tiny and args.device == "cpu") else len(os.sched_getaffinity(0))
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.pdl:
        enable_pdl("serve_bench.py", args.gemv, device)
    command = shlex.join(["python", "bench/serve_bench.py", *argv])
    report: dict = {"command": command, "environment": environment(device), "results": []}
    report["config"] = {k: v for k, v in vars(args).items() if k != "shape_list"}

    def dump() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=str))

    log(f"device {report['environment']['device']}: measuring copy bandwidth ({args.copy_mib} MiB)")
    report["bandwidth"] = measure_bandwidth(device, args.copy_mib)
    with tempfile.TemporaryDirectory(prefix="kiln-serve-bench-") as tmp:
        workdir = Path(tmp)
        tokenizer_dir = prepare_tokenizer(args.tokenizer, workdir, 8192)
        for shape in args.shape_list:
            result: dict = {"name": shape.name}
            report["results"].append(result)
            run_shape(shape, tokenizer_dir, workdir, device, args, report["bandwidth"], result, dump)
    problems = exit_problems(report, args)
    report["problems"] = problems
    dump()
    print(render(report, args, args.markdown), end="")
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
