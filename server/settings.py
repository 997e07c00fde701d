"""Server settings: the `kiln serve` flags, parsed once into a frozen `ServerSettings`.

`build_parser()` defines the flags (shared by `kiln serve` and `python -m server`);
`ServerSettings.from_args()` turns parsed flags into settings and checks them. The app
reads only the HTTP-side fields; `__main__` uses the model-loading ones (`model_dir`, `device`,
`dtype`, `max_batch_size`, `max_model_len`, `threads`, the KV-cache, prefill and compile options).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from model.cli import add_kv_cache_dtype_arg, add_model_args, add_speculative_arg
from model.speculative import MAX_SPECULATIVE_TOKENS

DEFAULT_MODEL_NAME = "kiln-default"  # served name of the shipped default model
# sequences decoded together by default: a GPU serves many streams in one step (vLLM's default is
# 256 too); 2-8 CPU cores gain little past a handful, and each running row costs every step time
DEFAULT_MAX_BATCH_SIZE = {"cuda": 256, "cpu": 8}


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str = DEFAULT_MODEL_NAME
    model_dir: str | None = None  # None: the shipped default model
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    device: str = "auto"
    dtype: str | None = None
    quantization: str | None = None  # "int8": int8 matrices (CPU, fp32 activations; model/quantize.py)
    prefill_dtype: str = "auto"  # CPU fp32/int8 models: prompts and scoring in "fp32" (auto) or "bf16"
    max_batch_size: int | None = None  # sequences running (decoded together) at once; None: by device
    max_queue: int = 256  # sequences that may wait for a slot; more -> 429
    max_model_len: int | None = None  # context length cap (default: the model's)
    kv_block_size: int = 16  # tokens per KV-cache block
    kv_cache_dtype: str = "auto"  # what the KV pool holds: the model's dtype (auto), or fp32 / bf16 (CPU)
    num_kv_blocks: int | None = None  # KV pool size (default: from memory, see --gpu-memory-fraction)
    gpu_memory_fraction: float = 0.9  # CUDA: share of the device's memory the server may use
    enable_prefix_caching: bool = True
    max_prefill_tokens: int | None = None  # prompt tokens per step (chunked prefill); default by device
    cuda_graphs: bool = True  # CUDA: replay decode steps from captured graphs
    async_scheduling: bool | None = None  # read sampled ids back one step late (None: on CUDA only)
    speculative_tokens: int | None = None  # prompt-lookup drafts per step for greedy requests (None: default, 0: off)
    compile: bool = False  # torch.compile the decode step (CPU: inductor C++; CUDA: before graph capture)
    engine_process: bool = False  # run the engine (and its worker thread) in a child process of its own
    max_body_bytes: int = 8 * 1024 * 1024  # larger request bodies -> 413
    threads: int | None = None  # torch intra-op threads (default: available cores)
    shutdown_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    log_level: str = "info"
    chat_template: str | None = None  # a Jinja chat template for /v1/chat/completions (default: the tokenizer's)
    # "auto": requests that leave out temperature / top_p / top_k get the model's generation_config.json values
    # (vLLM's default); "none": OpenAI's defaults (1.0, 1.0, off)
    generation_config: str = "auto"

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(bool(self.served_model_name), "--served-model-name must not be empty")
        need(self.generation_config in ("auto", "none"),
             f"--generation-config must be auto or none, got {self.generation_config!r}")
        need(0 <= self.port <= 65535, f"--port must be in [0, 65535], got {self.port}")
        need(self.max_batch_size is None or self.max_batch_size >= 1,
             f"--max-batch-size must be >= 1, got {self.max_batch_size}")
        need(self.max_queue >= 1, f"--max-queue must be >= 1, got {self.max_queue}")
        need(self.max_model_len is None or self.max_model_len >= 2,
             f"--max-model-len must be >= 2, got {self.max_model_len}")
        need(self.quantization is None or (self.device != "cuda" and self.dtype in (None, "auto", "fp32")),
             f"--quantization {self.quantization} runs on the CPU in fp32: it cannot be combined with "
             f"--device {self.device} --dtype {self.dtype or 'auto'}")
        need(self.prefill_dtype in ("auto", "fp32", "bf16"),
             f"--prefill-dtype must be one of auto, fp32, bf16; got {self.prefill_dtype!r}")
        need(self.kv_cache_dtype in ("auto", "fp32", "bf16"),
             f"--kv-cache-dtype must be one of auto, fp32, bf16; got {self.kv_cache_dtype!r}")
        need(self.kv_block_size >= 1, f"--kv-block-size must be >= 1, got {self.kv_block_size}")
        need(self.num_kv_blocks is None or self.num_kv_blocks >= 2,
             f"--num-kv-blocks must be >= 2, got {self.num_kv_blocks}")
        need(0.0 < self.gpu_memory_fraction <= 1.0,
             f"--gpu-memory-fraction must be in (0, 1], got {self.gpu_memory_fraction}")
        need(self.max_prefill_tokens is None or self.max_prefill_tokens >= 1,
             f"--max-prefill-tokens must be >= 1, got {self.max_prefill_tokens}")
        need(self.speculative_tokens is None or 0 <= self.speculative_tokens <= MAX_SPECULATIVE_TOKENS,
             f"--speculative-tokens must be in [0, {MAX_SPECULATIVE_TOKENS}], got {self.speculative_tokens}")
        need(self.max_body_bytes >= 1024, f"--max-body-bytes must be >= 1024, got {self.max_body_bytes}")
        need(self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}")
        need(self.shutdown_timeout_s >= 0, f"--shutdown-timeout must be >= 0, got {self.shutdown_timeout_s}")
        need(self.api_key is None or bool(self.api_key), "--api-key must not be empty")
        if self.chat_template is not None:
            from model.chat_template import ChatTemplate

            try:
                ChatTemplate(self.chat_template)
            except ValueError as e:
                raise ValueError(f"--chat-template: {e}") from None

    def batch_size_for(self, device_type: str) -> int:
        """--max-batch-size, or the default for the device the model runs on."""
        return self.max_batch_size or DEFAULT_MAX_BATCH_SIZE.get(device_type, DEFAULT_MAX_BATCH_SIZE["cpu"])

    @property
    def num_threads(self) -> int:
        if self.threads:
            return self.threads
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerSettings:
        name = args.served_model_name
        if name is None:
            name = DEFAULT_MODEL_NAME if args.model is None else Path(args.model).resolve().name
        # an empty --api-key is refused (a `--api-key "$KEY"` with KEY unset), not read as "no key"
        api_key = args.api_key if args.api_key is not None else os.environ.get("KILN_API_KEY") or None
        chat_template = None
        if args.chat_template is not None:
            try:
                chat_template = Path(args.chat_template).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"--chat-template {args.chat_template!r}: cannot read it "
                                 f"({e.strerror if isinstance(e, OSError) else e})") from None
            if not chat_template.strip():
                raise ValueError(f"--chat-template {args.chat_template!r} is empty")
        return cls(served_model_name=name, model_dir=args.model, host=args.host, port=args.port,
                   chat_template=chat_template,
                   api_key=api_key, device=args.device,
                   dtype=args.dtype, quantization=args.quantization, prefill_dtype=args.prefill_dtype,
                   max_batch_size=args.max_batch_size,
                   max_queue=args.max_queue,
                   max_model_len=args.max_model_len, kv_block_size=args.kv_block_size,
                   kv_cache_dtype=args.kv_cache_dtype,
                   num_kv_blocks=args.num_kv_blocks, gpu_memory_fraction=args.gpu_memory_fraction,
                   enable_prefix_caching=not args.no_prefix_caching, max_prefill_tokens=args.max_prefill_tokens,
                   cuda_graphs=not args.no_cuda_graphs, compile=args.compile, engine_process=args.engine_process,
                   async_scheduling=args.async_scheduling, speculative_tokens=args.speculative_tokens,
                   max_body_bytes=args.max_body_bytes, threads=args.threads,
                   shutdown_timeout_s=args.shutdown_timeout, log_level=args.log_level,
                   generation_config=args.generation_config)


def _int_at_least(low: int):
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {n}")
        return n

    return parse


def _fraction(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not 0.0 < x <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {x}")
    return x


def build_parser(prog: str = "kiln serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Serve a model over an OpenAI-compatible HTTP API.")
    add_model_args(p)  # --model, --device, --dtype, --quantization, --prefill-dtype: as kiln generate and ppl take them
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=_int_at_least(0), default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--served-model-name", default=None,
                   help=f"the `model` name clients use (default: the directory name; {DEFAULT_MODEL_NAME!r} "
                        "for the default model)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on /v1/* (also read from $KILN_API_KEY)")
    p.add_argument("--max-batch-size", type=_int_at_least(1), default=None,
                   help=f"sequences running (decoded together) at once (default: {DEFAULT_MAX_BATCH_SIZE['cuda']} "
                        f"on CUDA, {DEFAULT_MAX_BATCH_SIZE['cpu']} on the CPU)")
    p.add_argument("--max-queue", type=_int_at_least(1), default=256,
                   help="sequences that may wait for a slot before requests get 429 (default: 256)")
    p.add_argument("--max-model-len", type=_int_at_least(2), default=None,
                   help="cap on prompt + generated tokens (default: the model's context length)")
    p.add_argument("--kv-block-size", type=_int_at_least(1), default=16,
                   help="tokens per block of the paged KV cache (default: 16)")
    p.add_argument("--num-kv-blocks", type=_int_at_least(2), default=None,
                   help="size of the KV block pool (default: from free memory on CUDA, see "
                        "--gpu-memory-fraction; two full-length sequences per batch row on the CPU)")
    p.add_argument("--gpu-memory-fraction", type=_fraction, default=0.9,
                   help="CUDA: fraction of the GPU's memory the server may fill, KV pool included (default: 0.9)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the KV blocks of prompt prefixes shared between requests")
    p.add_argument("--max-prefill-tokens", type=_int_at_least(1), default=None,
                   help="prompt tokens computed per scheduler step; longer prompts are prefilled in chunks "
                        "between decode steps (default: 2048 on CUDA, 512 on the CPU)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile at start-up, falling back to eager if "
                        "compilation fails. CPU: inductor builds C++ with the system compiler, for batch buckets "
                        "up to --max-batch-size. CUDA: one graph for every bucket, compiled before the CUDA "
                        "graphs are captured (measured on an H100: the same kernels, 16%% slower; the step's small "
                        "ops already run as fused Triton kernels)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="CUDA: run every decode step eagerly instead of replaying captured graphs")
    p.add_argument("--async-scheduling", dest="async_scheduling", action="store_const", const=True, default=None,
                   help="queue each decode step before reading the previous step's sampled ids back, so host "
                        "work overlaps the device's (the default on CUDA; on the CPU nothing overlaps)")
    p.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_const", const=False,
                   help="read each step's sampled ids back before queuing the next step")
    add_speculative_arg(p)
    add_kv_cache_dtype_arg(p)
    p.add_argument("--engine-process", action="store_true",
                   help="run the engine in a process of its own, so that HTTP and streaming do not share a GIL "
                        "with it (a small model on a GPU makes tokens faster than one process sends them; on a "
                        "CPU the two processes compete for the cores instead)")
    p.add_argument("--max-body-bytes", type=_int_at_least(1024), default=8 * 1024 * 1024,
                   help="largest accepted request body; larger gets 413 (default: 8 MiB)")
    p.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="torch CPU threads (default: the available cores)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests get to finish (default: 30)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template for /v1/chat/completions (default: the one the model's tokenizer "
                        "ships; without either, chat requests get 400)")
    p.add_argument("--generation-config", default="auto", choices=("auto", "none"),
                   help="auto (default): requests that leave out temperature, top_p or top_k get the values the "
                        "model's generation_config.json recommends, as in vLLM; none: OpenAI's defaults")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p
