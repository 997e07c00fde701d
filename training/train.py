"""`kiln train`: the training loop (AMP, gradient accumulation, clipping, eval, DDP/FSDP).

    kiln train --config FILE.toml [--set key=value ...] [--data DIR] [--out DIR] [--max-steps N]
               [--resume] [--no-progress]
    python -m training --config ...                     (the same)

Multi-GPU (data parallel, one process per GPU, launched by torchrun):

    torchrun --standalone --nproc_per_node=8 -m training --config training/configs/gpt2-124m.toml
    torchrun --standalone --nproc_per_node=8 $(which kiln) train --config ...   (kiln detects torchrun's env)

Each process reads its own disjoint slice of every global batch from the memory-mapped token
file, gradients are averaged by DDP (NCCL on GPUs, Gloo on CPUs), and gradient accumulation
shrinks so that a step still sees `batch_tokens` tokens (`batch_tokens` must be a multiple of
micro_batch_size * seq_len * processes). The data stream does not depend on the number of
processes: sequence i of the stream is the same window of the file whatever the layout, so a
run can resume on a different number of GPUs. `--set parallel=fsdp` shards parameters,
gradients and optimizer state with FSDP2 (`fully_shard` per block) for models whose
optimizer state does not fit one GPU; parameters are still initialized whole on each GPU.
Multi-node: `torchrun --nnodes=N --node_rank=R --master_addr=HOST ...`, as for any DDP job.

The loop (per optimizer step): LR from the schedule; `accum` micro-batches of forward under
autocast (bf16 by default on GPUs and on CPUs with fast bf16 products; fp16 with a GradScaler; else
fp32) and backward with gradient sync only on the last; unscale, clip the global norm, step, update the scaler.
Parameters and optimizer state stay fp32. A NaN/inf loss or gradient norm stops the run with
the step (under fp16 the scaler skips such steps instead). Validation loss and perplexity every
`eval_interval` steps; `metrics.jsonl` and `loss.png` in `--out`; checkpoints every
`checkpoint_interval` steps, at the end, and on Ctrl-C (SIGINT/SIGTERM finish the current
step, save, and exit with code 130; under torchrun the processes agree to stop at the next
`log_interval` step; a second Ctrl-C aborts without saving). `--resume` continues from the
latest checkpoint in `--out`, bit-for-bit on the same hardware and process layout; it refuses a
model config or a `--data` tokenizer other than the run's. Progress: a bar on a terminal, else
(or with `--no-progress`) a line per `log_interval` steps.

Files in `--out`: checkpoint-NNNNNNN.pt (see checkpointing.py), metrics.jsonl (one object per
logged step: step, tokens, loss, lr, grad_norm, tokens_per_second, mfu on GPUs, loss_scale under
fp16, val_loss and val_perplexity when evaluated), loss.png, train_config.json, tokenizer/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from model.config import ModelConfig
from model.cpu_packing import BF16_SPEEDUP, amx_bf16, bf16_matmul_speedup
from model.transformer import Transformer

from .checkpointing import (CHECKPOINT_FORMAT, CheckpointNotFound, apply_training_state, atomic_save,
                            capture_rng, checkpoint_path, gather_model_state, gather_optimizer_state,
                            latest_checkpoint, list_checkpoints, load_checkpoint, prune_checkpoints,
                            restore_rng)
from .config import ConfigError, TrainConfig, load_config
from .data import TOKENIZER_FILES, DataError, WindowSampler, load_meta, open_tokens, read_windows
from .optim import accum_at, build_optimizer, config_lr, planned_steps, set_lr

PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
              "A10": 125e12, "B200": 2250e12}  # dense bf16 tensor-core peaks


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm; the message has the step."""


# ------------------------------------------------------------------------------ process layout
@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(config: TrainConfig) -> Runtime:
    """One process, or one of torchrun's (RANK / WORLD_SIZE / LOCAL_RANK in the environment)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want = config.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available; use device=cpu or auto")
    device = torch.device(f"cuda:{local_rank}") if want == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    return Runtime(device, rank, local_rank, world_size, owns)


def resolve_precision(config: TrainConfig, device: torch.device, resumed: str | None = None) -> str:
    """precision=auto: bf16 autocast on GPUs that support it, else fp16; on a CPU, bf16 where its bf16 matrix
    products run at least BF16_SPEEDUP times fp32's: with AMX (a training step of the default model's shape
    1.9x fp32's, the tiny config's 1.2x, the same loss curve) or where a timed product says so (AVX-512 BF16
    on an AMD EPYC: 1.7-1.9x and 1.3x), else fp32 (bf16 emulated or no faster). `resumed`: the precision the
    run being resumed chose for itself, kept so that a resumed run computes as the uninterrupted one did."""
    if config.precision != "auto":
        return config.precision
    if resumed is not None:
        return resumed
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if amx_bf16() or bf16_matmul_speedup() >= BF16_SPEEDUP else "fp32"


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def peak_flops(config: TrainConfig, device: torch.device) -> float | None:
    if config.peak_flops:
        return config.peak_flops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def _all_reduce(values: list[float], runtime: Runtime, op=None) -> list[float]:
    if not runtime.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


# ------------------------------------------------------------------------------ one step
def optimizer_step(train_model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], accum: int, grad_clip: float,
                   amp: Callable[[], Any], no_sync: Callable[[bool], Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward/backward over `accum` micro-batches, then clip and step. Returns (mean loss, grad norm).

    `no_sync(last)` gives the context for one backward: gradient sync only on the last.
    Nothing here reads a value back to the host, so the GPU is never waited on.
    """
    loss_sum = None
    for i, (x, y) in enumerate(micro_batches):
        with no_sync(i == accum - 1):
            with amp():
                loss = train_model(x, y)  # (,) mean cross-entropy over B * T tokens
            scaler.scale(loss / accum).backward()
        loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
    grad_norm = None
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / accum, grad_norm


# ------------------------------------------------------------------------------ metrics
class MetricsLog:
    """`metrics.jsonl` (one object per logged step) and `loss.png` beside the checkpoints."""

    def __init__(self, out_dir: Path, resume_step: int | None):
        self.path = out_dir / "metrics.jsonl"
        self.plot_path = out_dir / "loss.png"
        kept: list[str] = []
        if resume_step is not None and self.path.is_file():  # drop what was logged after the checkpoint
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        plot_losses(self.path, self.plot_path)


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["tokens"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(8, 5))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", markersize=4)
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(".loss.png.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


# ------------------------------------------------------------------------------ the run
@dataclass
class TrainResult:
    step: int
    tokens: int
    loss: float | None
    val_loss: float | None
    checkpoint: Path | None
    interrupted: bool = False
    metrics: list[dict] = field(default_factory=list)


class StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second Ctrl-C aborts at once."""

    def __init__(self, announce: Callable[[str], None] | None = None) -> None:
        self.requested = False
        self.announce = announce  # says that the first signal was heard (the main process only)
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested and self.announce is not None:
            self.announce("stopping after this step and saving a checkpoint (Ctrl-C again: quit without saving)")
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _tokenizer_files(data_dir: Path, meta: dict) -> dict[str, bytes]:
    for source in (data_dir / meta.get("tokenizer", "tokenizer"), Path(meta.get("tokenizer_dir", ""))):
        files = {name: (source / name).read_bytes() for name in TOKENIZER_FILES if (source / name).is_file()}
        if files:
            return files
    raise DataError(f"no tokenizer files in {data_dir / 'tokenizer'} or {meta.get('tokenizer_dir')!r}; "
                    "run `kiln prepare` again")


class Trainer:
    """Owns the model, optimizer, data position and output directory of one training run."""

    def __init__(self, config: TrainConfig, runtime: Runtime, resume: bool = False, progress: bool = True):
        self.config, self.runtime, self.progress = config, runtime, progress
        if not config.data_dir:
            raise ConfigError("no data directory: pass --data DIR (from `kiln prepare`) or set data_dir")
        self.data_dir, self.out_dir = Path(config.data_dir), Path(config.out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ConfigError(f"--out {self.out_dir} is a file, not a directory: choose another --out")
        self.meta = load_meta(self.data_dir)
        self.train_tokens = open_tokens(self.data_dir, "train", self.meta)
        self.val_tokens = open_tokens(self.data_dir, "val", self.meta)
        self.model_config = config.model.build(self.meta["vocab_size"], config.seq_len, self.meta.get("bos_id"),
                                               self.meta["eos_id"])
        self.full_accum = config.grad_accum(runtime.world_size)
        self.sequences_per_micro = config.micro_batch_size * runtime.world_size
        self.max_steps = planned_steps(config, self.full_accum, self.sequences_per_micro)
        self.sampler = WindowSampler(len(self.train_tokens), config.seq_len, config.seed)
        self.step = self.tokens = self.data_position = 0
        self.last_saved_step = -1

        checkpoint = self._find_resume_checkpoint(resume)
        resumed = None
        if checkpoint is not None:  # checkpoints from before the timed choice lack it: auto was bf16 on AMX CPUs only
            legacy = "bf16" if amx_bf16() else "fp32"
            resumed = checkpoint.get("precision", None if runtime.device.type == "cuda" else legacy)
        self.precision = resolve_precision(config, runtime.device, resumed)
        if runtime.distributed and runtime.device.type == "cpu" and config.precision == "auto":
            choice = [self.precision]  # one timed choice for every process: rank 0's
            dist.broadcast_object_list(choice, src=0)
            self.precision = choice[0]
        self.precision_note = ""  # why precision=auto chose what it did, for the start line
        if config.precision == "auto" and runtime.device.type == "cpu":
            self.precision_note = (" (auto: the resumed run's choice)" if resumed is not None else
                                   " (auto: this CPU has AMX)" if amx_bf16() else
                                   f" (auto: this CPU's bf16 products ran {bf16_matmul_speedup():.1f}x fp32's)")
        if config.attn_backend == "triton":
            from kernels.attention import available

            if not available(runtime.device):
                raise ConfigError(f"attn_backend=triton needs a CUDA device with triton installed; this run is on "
                                  f"{runtime.device}: use attn_backend=auto (triton where it can run) or torch")
        torch.manual_seed(config.seed)
        self.model = Transformer(self.model_config, attn_backend=config.attn_backend).to(runtime.device)
        self.model.loss_impl = config.loss_impl
        self.model.autocast_residual = config.residual == "autocast"
        self.native_note = self._native_kernels(config, runtime)
        self.flops_per_token = 6 * sum(p.numel() for p in self.model.parameters())  # before sharding
        if runtime.distributed and config.parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in self.model.blocks:
                fully_shard(block)
            fully_shard(self.model)
        self.optimizer = build_optimizer(self.model, config, runtime.device.type)
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=self.precision == "fp16")
        if checkpoint is not None:
            self._restore(checkpoint)
        compile_on = config.compile if config.compile is not None else runtime.device.type == "cuda"
        self.forward_model: nn.Module = torch.compile(self.model) if compile_on else self.model
        self.train_model: nn.Module = self.forward_model
        if runtime.distributed and config.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [runtime.local_rank] if runtime.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.forward_model, device_ids=device_ids,
                                                       gradient_as_bucket_view=True)
        self.peak_flops = peak_flops(config, runtime.device)
        # Reading the loss back every step stalls a GPU's queue; on one CPU process it is free.
        self.read_back_every_step = not runtime.distributed and runtime.device.type == "cpu"
        if runtime.is_main:
            self._prepare_out_dir()
        self.metrics = MetricsLog(self.out_dir, self.step if checkpoint is not None else None) \
            if runtime.is_main else None

    # -- setup ---------------------------------------------------------------------------------
    def _find_resume_checkpoint(self, resume: bool) -> dict | None:
        latest = latest_checkpoint(self.out_dir)
        if not resume:
            if latest is not None:
                raise ConfigError(f"{self.out_dir} already has checkpoints ({latest.name}); pass --resume to "
                                  "continue that run, or choose another --out")
            return None
        if latest is None:
            if self.runtime.is_main:
                print(f"--resume: no checkpoint in {self.out_dir}; starting from step 0", file=sys.stderr)
            return None
        state = load_checkpoint(latest)
        # the data first: another tokenizer's data also changes the model config (vocab size, BOS/EOS ids), and
        # the way out is other data, not another config
        saved_files = state.get("tokenizer_files") or {}
        files = _tokenizer_files(self.data_dir, self.meta)
        changed = sorted(name for name in set(saved_files) & set(files) if saved_files[name] != files[name])
        if changed:
            raise ConfigError(f"--data {self.data_dir} was tokenized with another tokenizer than the run in "
                              f"{self.out_dir} ({', '.join(changed)} differ): its ids mean other tokens to these "
                              "weights; resume with data from the run's own tokenizer")
        saved = ModelConfig.from_dict(state["model_config"])
        if saved != self.model_config:
            old, new = saved.to_dict(), self.model_config.to_dict()
            differ = [f"{name}: checkpoint {old.get(name)!r}, now {new.get(name)!r}"
                      for name in dict.fromkeys([*old, *new]) if old.get(name) != new.get(name)]
            raise ConfigError(f"the model in {latest} differs from this config's ({'; '.join(differ)}); "
                              "resume with the run's own config (omit --config)")
        return state

    def _native_kernels(self, config: TrainConfig, runtime: Runtime) -> str:
        """On a CPU with attn_backend=auto, self-attention (forward and backward) and the chunked loss's rows in
        Kiln's native kernels (model/native, built once per machine) instead of SDPA (1.2-2x its speed in fp32,
        1.8-3.1x in bf16 with bf16 products: bench/cpu_attention.py) and torch ops (2.6-3x). Returns a note for
        the start line."""
        if runtime.device.type != "cpu" or config.attn_backend != "auto":
            return ""
        from model import native

        if native.disabled():
            return ""
        if native.load(build=False) is None and runtime.is_main:
            print(f"kiln train: building Kiln's native CPU kernels in {native.build_dir()} (once; about half a "
                  "minute)...", file=sys.stderr, flush=True)
        if self.model.use_native_kernels(native.load(build=True)):
            from model.cpu_training import bf16_products

            bf16 = self.precision == "bf16" and bf16_products()
            return "; attention and loss in Kiln's native kernels" + (" (attention's products in bf16)" if bf16 else "")
        why = native.error() or "this torch build lacks the fp32 micro-kernel (cpublas::brgemm) they use"
        return f"; attention in torch SDPA (the native kernels are unavailable: {why})"

    def _restore(self, state: dict) -> None:
        apply_training_state(self.model, self.optimizer, state["model"], state["optimizer"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
        self.step, self.tokens, self.data_position = state["step"], state["tokens"], state["data_position"]
        self.last_saved_step = self.step

    def _prepare_out_dir(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.config.save(self.out_dir / "train_config.json")
        self.tokenizer_files = _tokenizer_files(self.data_dir, self.meta)
        tokenizer_dir = self.out_dir / "tokenizer"
        tokenizer_dir.mkdir(exist_ok=True)
        for name, content in self.tokenizer_files.items():
            (tokenizer_dir / name).write_bytes(content)

    # -- data ----------------------------------------------------------------------------------
    def _to_device(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.from_numpy(windows)  # (B, T + 1) int64
        if self.runtime.device.type == "cuda":
            batch = batch.pin_memory().to(self.runtime.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]  # inputs, next-token targets: (B, T) each

    def micro_batches(self, accum: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """This process's micro-batches of the current step: global sequences
        position + (m * world + rank) * B ... + B - 1 for micro-batch m."""
        B, W, r = self.config.micro_batch_size, self.runtime.world_size, self.runtime.rank
        for m in range(accum):
            offsets = self.sampler.offsets(self.data_position + (m * W + r) * B, B)
            yield self._to_device(read_windows(self.train_tokens, offsets, self.config.seq_len + 1))

    def _no_sync(self, last: bool):
        if last or not self.runtime.distributed:
            if self.runtime.distributed and self.config.parallel == "fsdp":
                self.model.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.config.parallel == "fsdp":
            self.model.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.train_model.no_sync()

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss over fixed windows (the same ones every time), all processes."""
        n_val = len(self.val_tokens)
        if n_val < 2 or self.config.eval_batches == 0:
            return None
        length = min(self.config.seq_len, n_val - 1)
        B, W = self.config.micro_batch_size, self.runtime.world_size
        # the same windows whatever the number of processes: eval_batches * B, split evenly
        per_rank = min(self.config.eval_batches * B, (n_val - 1) // length) // W
        if per_rank == 0:
            return None
        first = self.runtime.rank * per_rank
        self.model.eval()
        total, count = 0.0, 0
        for start in range(first, first + per_rank, B):
            n = min(B, first + per_rank - start)
            offsets = np.arange(start, start + n, dtype=np.int64) * length
            x, y = self._to_device(read_windows(self.val_tokens, offsets, length + 1))
            with autocast(self.precision, self.runtime.device):
                loss = self.forward_model(x, y)
            total += loss.float().item() * n
            count += n
        self.model.train()
        total, count = _all_reduce([total, count], self.runtime)
        return total / count

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        fsdp = self.runtime.distributed and self.config.parallel == "fsdp"
        path = checkpoint_path(self.out_dir, self.step)
        if fsdp or self.runtime.is_main:  # gathering a sharded model is collective
            model_state = gather_model_state(self.model)
            optimizer_state = gather_optimizer_state(self.model, self.optimizer)
        if self.runtime.is_main:
            atomic_save({
                "format": CHECKPOINT_FORMAT, "step": self.step, "tokens": self.tokens,
                "data_position": self.data_position, "model": model_state, "optimizer": optimizer_state,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None, "rng": capture_rng(),
                "precision": self.precision,
                "train_config": self.config.to_dict(), "model_config": self.model_config.to_dict(),
                "data_meta": self.meta, "tokenizer_files": self.tokenizer_files,
            }, path)
            prune_checkpoints(self.out_dir, self.config.keep_checkpoints)
        if self.runtime.distributed:
            dist.barrier()
        self.last_saved_step = self.step
        return path

    # -- the loop ------------------------------------------------------------------------------
    def run(self, on_step: Callable[[int], None] | None = None) -> TrainResult:
        from tqdm import tqdm

        config, runtime = self.config, self.runtime
        check_every_step = self.read_back_every_step
        records: list[dict] = []
        loss_value = val_loss = None
        interrupted = False
        # a live bar on a terminal; otherwise (--no-progress, output to a file) one line per log_interval
        use_bar = self.progress and runtime.is_main and sys.stderr.isatty()
        log_lines = runtime.is_main and not use_bar
        if runtime.is_main:
            autocast_note = "fp32" if self.precision == "fp32" else f"{self.precision} autocast, fp32 weights"
            autocast_note += self.precision_note + self.native_note
            where = f"{runtime.world_size} processes" if runtime.distributed else str(runtime.device)
            print(f"kiln train: {self.flops_per_token // 6:,} parameters on {where}, {autocast_note}; "
                  f"steps {self.step}..{self.max_steps}", file=sys.stderr, flush=True)
        bar = tqdm(total=self.max_steps, initial=self.step, unit="step", dynamic_ncols=True, disable=not use_bar)
        last_time, last_tokens = time.perf_counter(), self.tokens
        start_time, start_step = last_time, self.step
        # first step with a non-finite loss or gradient norm, tracked on the device: no per-step sync
        first_bad = torch.full((), -1, dtype=torch.int64, device=runtime.device)
        with StopFlag(announce=(lambda m: bar.write(m, file=sys.stderr)) if runtime.is_main else None) as stop:
            while self.step < self.max_steps:
                step = self.step
                lr = config_lr(config, step, self.max_steps)
                set_lr(self.optimizer, lr)
                accum = accum_at(step, self.full_accum, config.batch_ramp_steps)
                loss, grad_norm = optimizer_step(
                    self.train_model, self.optimizer, self.scaler, self.micro_batches(accum), accum,
                    config.grad_clip, lambda: autocast(self.precision, runtime.device), self._no_sync)
                self.step += 1
                if self.precision != "fp16":  # under fp16 the GradScaler skips such steps instead
                    finite = torch.isfinite(loss)
                    if grad_norm is not None:
                        finite = finite & torch.isfinite(grad_norm)
                    first_bad = torch.where(~finite & (first_bad < 0), self.step, first_bad)
                self.data_position += accum * self.sequences_per_micro
                self.tokens += accum * self.sequences_per_micro * config.seq_len
                bar.update(1)
                if on_step is not None:  # (a test hook: a signal it sends counts as arriving during this step)
                    on_step(self.step)
                # (the step a Ctrl-C stops at is logged too, so metrics.jsonl and loss.png show it; under
                # several processes the stop is agreed on at log_interval steps, which are logged anyway)
                log_now = (self.step % config.log_interval == 0 or self.step == self.max_steps
                           or (stop.requested and not runtime.distributed))
                eval_now = self.step == self.max_steps or bool(
                    config.eval_interval and self.step % config.eval_interval == 0)
                record: dict[str, Any] | None = None
                # Under several processes, stopping is agreed on at the steps that read values back.
                agreed_stop = False
                if log_now or eval_now or check_every_step:
                    norm_value = float(grad_norm) if grad_norm is not None else None
                    loss_value, stop_votes = _all_reduce([float(loss), float(stop.requested)], runtime)
                    loss_value /= runtime.world_size
                    self._check_finite(loss_value, norm_value, int(first_bad))
                    agreed_stop = stop_votes > 0
                if log_now or eval_now:
                    now = time.perf_counter()
                    tokens_per_second = (self.tokens - last_tokens) / max(now - last_time, 1e-9)
                    last_time, last_tokens = now, self.tokens
                    record = {"step": self.step, "tokens": self.tokens, "loss": loss_value, "lr": lr,
                              "grad_norm": norm_value, "tokens_per_second": round(tokens_per_second, 1)}
                    postfix = {"loss": f"{loss_value:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens_per_second:,.0f}"}
                    if self.peak_flops:
                        record["mfu"] = self.flops_per_token * tokens_per_second / self.peak_flops
                        postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
                    if self.precision == "fp16":
                        record["loss_scale"] = self.scaler.get_scale()
                    bar.set_postfix(postfix, refresh=False)
                    if log_lines and log_now:
                        left = (now - start_time) / (self.step - start_step) * (self.max_steps - self.step)
                        fields = " | ".join(f"{k} {v}" for k, v in postfix.items())
                        print(f"step {self.step}/{self.max_steps} | {fields} | eta {_duration(left)}",
                              file=sys.stderr, flush=True)
                if eval_now:
                    val_loss = self.evaluate()
                    if val_loss is not None:
                        record.update(val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 700.0)))
                        if runtime.is_main:
                            bar.write(f"step {self.step}: val loss {val_loss:.4f}, "
                                      f"perplexity {record['val_perplexity']:.2f}", file=sys.stderr)
                    last_time = time.perf_counter()  # evaluation time is not training throughput
                if record is not None:
                    records.append(record)
                    if self.metrics is not None:
                        self.metrics.write(record)
                        if eval_now:
                            self.metrics.plot()
                if config.checkpoint_interval and self.step % config.checkpoint_interval == 0:
                    self.save_checkpoint()
                if (stop.requested and not runtime.distributed) or agreed_stop:
                    interrupted = True
                    break
        bar.close()
        path = checkpoint_path(self.out_dir, self.step)
        if self.last_saved_step != self.step:
            path = self.save_checkpoint()
        if self.metrics is not None:
            if self.metrics.path.stat().st_size:
                self.metrics.plot()
            message = (f"interrupted at step {self.step}; saved {path} (continue with --resume)" if interrupted
                       else f"done: {self.step} steps, {self.tokens:,} tokens; checkpoint {path}")
            print(message, file=sys.stderr)
        return TrainResult(self.step, self.tokens, loss_value, val_loss, path, interrupted, records)

    def _check_finite(self, loss: float, grad_norm: float | None, first_bad: int) -> None:
        """Raise if this step's (all-process) loss or gradient norm, or an earlier step's, was not finite."""
        if self.precision == "fp16":
            return  # the GradScaler skips steps with inf/NaN gradients and lowers its scale
        bad = [f"loss {loss}"] if not math.isfinite(loss) else []
        if grad_norm is not None and not math.isfinite(grad_norm):
            bad.append(f"gradient norm {grad_norm}")
        if bad or first_bad >= 0:
            step = first_bad if first_bad >= 0 else self.step
            last = list_checkpoints(self.out_dir)
            hint = f"; the last checkpoint is {last[-1]}" if last else ""
            raise TrainingDiverged(f"non-finite loss or gradient norm at step {step} (at step {self.step}: "
                                   f"{', '.join(bad) or 'finite again'}){hint}; lower lr or raise warmup_steps")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, sec = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def train(config: TrainConfig, resume: bool = False, progress: bool = True,
          on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Run (or resume) training to the end; returns the final state and the logged records."""
    runtime = setup_runtime(config)
    try:
        return Trainer(config, runtime, resume=resume, progress=progress).run(on_step)
    finally:
        if runtime.owns_process_group:
            dist.destroy_process_group()


# ------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln train", description="Pretrain a Kiln model on token files from "
                                                               "`kiln prepare` (single process or under torchrun).")
    p.add_argument("--config", metavar="FILE.toml", help="training config (optional with --resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set lr=1e-3 --set model.n_layer=6 (repeatable)")
    p.add_argument("--data", metavar="DIR", help="token directory from `kiln prepare` (sets data_dir)")
    p.add_argument("--out", metavar="DIR", help="output directory for checkpoints and logs (sets out_dir)")
    p.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps to train (sets max_steps)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a line per log_interval steps instead (also when stderr is not a terminal)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data_dir={json.dumps(args.data)}")
    if args.out is not None:
        overrides.append(f"out_dir={json.dumps(args.out)}")
    if args.max_steps is not None:
        if args.max_steps <= 0:
            raise ConfigError(f"--max-steps must be a positive integer, got {args.max_steps}")
        overrides.append(f"max_steps={args.max_steps}")
    if args.config is not None:
        return load_config(args.config, overrides)
    if not args.resume:
        raise ConfigError("--config FILE.toml is required (omit it only with --resume --out DIR)")
    if args.out is None:
        raise ConfigError("--resume without --config needs --out DIR (the run to continue)")
    latest = latest_checkpoint(args.out)
    if latest is None:
        raise ConfigError(f"--resume: {args.out} has no checkpoint, and no --config was given to start one")
    return load_config(base=load_checkpoint(latest)["train_config"], overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        result = train(config, resume=args.resume, progress=not args.no_progress)
    except (ConfigError, DataError, CheckpointNotFound) as e:
        _fail(str(e), 2)
    except OSError as e:  # an --out that cannot be written, a full disk
        _fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e), 2)
    except TrainingDiverged as e:
        _fail(str(e), 1)
    except KeyboardInterrupt:  # a second Ctrl-C: stop without the final checkpoint
        print("kiln train: aborted", file=sys.stderr)
        return 130
    return 130 if result.interrupted else 0


def _fail(message: str, code: int) -> None:
    print(f"kiln train: error: {message}", file=sys.stderr)
    raise SystemExit(code)


if __name__ == "__main__":
    sys.exit(main())
