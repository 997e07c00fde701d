"""TrainConfig: everything a training run needs, read from TOML plus `--set key=value` overrides.

A config file has the training settings at the top level and the model shape in a
`[model]` table:

    seq_len = 256
    micro_batch_size = 16
    lr = 3e-3
    [model]
    family = "llama"
    n_layer = 4

`--set lr=1e-3 --set model.n_layer=6` overrides single keys (values are TOML: strings need
no quotes, `none` clears an optional key). Relative paths (`data_dir`, `out_dir`) are taken
from the current directory, not from the config file's. The resolved config is saved in
every checkpoint and as `train_config.json` in the run directory.

Batch arithmetic: one optimizer step sees `batch_tokens` tokens =
`micro_batch_size * seq_len * grad_accum_steps * world_size`. Give either `batch_tokens`
or `grad_accum_steps` (the other is derived; 0 = derive); both must agree when both are set.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from model.config import ModelConfig

FAMILIES = ("llama", "gpt2")
OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PARALLEL = ("ddp", "fsdp")
LOSS_IMPLS = ("chunked", "logits")
RESIDUALS = ("fp32", "autocast")
DEVICES = ("auto", "cpu", "cuda")
ATTN_BACKENDS = ("auto", "torch", "triton")
VOCAB_MULTIPLE = 64  # an embedding with a multiple-of-64 row count keeps matmuls on fast tiles


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key and what is allowed."""


@dataclass(frozen=True)
class ModelShape:
    """The model's shape; `None` fields are filled from the family, the data and `seq_len`."""

    family: str = "llama"  # llama: RMSNorm, RoPE, SwiGLU, no biases; gpt2: LayerNorm, learned positions, GELU, biases
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None -> n_head (no grouped-query attention)
    d_model: int = 256
    d_ff: int | None = None  # None -> 4 * d_model (gpt2), 8/3 * d_model rounded up to 64 (llama)
    head_dim: int | None = None  # None -> d_model // n_head
    max_seq_len: int | None = None  # None -> the run's seq_len
    vocab_size: int | None = None  # None -> the tokenizer's n_vocab rounded up to a multiple of 64
    tie_embeddings: bool | None = None  # None -> True for gpt2, False for llama
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False  # RMSNorm over each query and key head before rotary (Qwen3; nanochat's QK norm)

    def __post_init__(self) -> None:
        _choice("model.family", self.family, FAMILIES)
        for name in ("n_layer", "n_head", "d_model"):
            _positive(f"model.{name}", getattr(self, name))
        for name in ("n_kv_head", "d_ff", "head_dim", "max_seq_len", "vocab_size"):
            if getattr(self, name) is not None:
                _positive(f"model.{name}", getattr(self, name))
        for name in ("rope_theta", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)}")

    def build(self, n_vocab: int, seq_len: int, bos_id: int | None = None, eos_id: int | None = None) -> ModelConfig:
        """The ModelConfig for a tokenizer with `n_vocab` ids and training windows of `seq_len`."""
        vocab = self.vocab_size if self.vocab_size is not None else -(-n_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        if vocab < n_vocab:
            raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {n_vocab} ids")
        max_seq_len = self.max_seq_len if self.max_seq_len is not None else seq_len
        if max_seq_len < seq_len:
            raise ConfigError(f"model.max_seq_len={max_seq_len} is shorter than seq_len={seq_len}")
        gpt2 = self.family == "gpt2"
        d_ff = self.d_ff
        if d_ff is None:
            d_ff = 4 * self.d_model if gpt2 else -(-int(8 * self.d_model / 3) // 64) * 64
        try:
            return ModelConfig(
                vocab_size=vocab, n_layer=self.n_layer, n_head=self.n_head,
                n_kv_head=self.n_kv_head if self.n_kv_head is not None else self.n_head,
                d_model=self.d_model, d_ff=d_ff, max_seq_len=max_seq_len,
                norm="layernorm" if gpt2 else "rmsnorm", norm_eps=self.norm_eps,
                positions="learned" if gpt2 else "rope", rope_theta=self.rope_theta,
                mlp="gelu" if gpt2 else "swiglu",
                tie_embeddings=self.tie_embeddings if self.tie_embeddings is not None else gpt2,
                bias=gpt2, head_dim=self.head_dim, qk_norm=self.qk_norm, bos_token_id=bos_id, eos_token_id=eos_id)
        except ValueError as e:
            raise ConfigError(f"[model]: {e}") from None


@dataclass(frozen=True)
class TrainConfig:
    model: ModelShape = dataclasses.field(default_factory=ModelShape)
    data_dir: str = ""  # a directory written by `kiln prepare`
    out_dir: str = "runs/kiln"  # checkpoints, metrics.jsonl, loss.png, tokenizer/
    seed: int = 1337
    # batch
    seq_len: int = 256
    micro_batch_size: int = 16  # sequences per forward pass, per process
    batch_tokens: int = 0  # tokens per optimizer step over all processes; 0 -> derived
    grad_accum_steps: int = 0  # micro-batches per optimizer step; 0 -> derived from batch_tokens
    batch_ramp_steps: int = 0  # grow the batch linearly from one micro-batch per process over this many steps
    # length: max_steps wins when both are set
    max_steps: int = 0
    max_tokens: int = 0
    # optimizer and schedule
    optimizer: str = "adamw"
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine/linear decay ends at lr * min_lr_ratio
    warmup_steps: int = 100
    decay_steps: int = 0  # step at which the decay reaches its floor; 0 -> max_steps
    schedule: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global gradient norm; 0 disables clipping
    # execution
    precision: str = "auto"  # auto: bf16 on GPUs that support it (else fp16) and CPUs with fast bf16 products; fp32
    compile: bool | None = None  # None: on for CUDA, off for CPU
    device: str = "auto"
    # auto: the Triton kernels on CUDA; on a CPU Kiln's native kernels (model/native: attention and the loss's
    # rows) where they build, else SDPA and torch ops; torch: SDPA and torch ops everywhere; triton: CUDA only
    attn_backend: str = "auto"
    # the LM head + loss in chunks of rows (Triton kernels on GPUs, torch ops on CPUs; no (tokens, vocab) logits),
    # or "logits": the whole logits, then the CE kernel (triton backend) or F.cross_entropy
    loss_impl: str = "chunked"
    # the residual stream between blocks under autocast: fp32 (the fp32 embeddings' dtype), or "autocast": in
    # the autocast dtype (bf16 / fp16), as Megatron-LM keeps it (--fp32-residual-connection off) and as models
    # trained in bf16 weights do. The norms still compute in fp32; the adds round to 16 bits; every elementwise
    # pass between the matmuls (norms, residual adds and their gradients) moves fewer bytes.
    residual: str = "fp32"
    parallel: str = "ddp"  # with several processes: ddp, or fsdp (FSDP2 fully_shard per block)
    peak_flops: float = 0.0  # for MFU; 0 -> looked up from the GPU name (H100: 989e12 bf16)
    # evaluation, logging, checkpoints
    eval_interval: int = 250  # steps; 0 evaluates only at the end
    eval_batches: int = 20  # validation micro-batches per evaluation, split across processes
    log_interval: int = 10
    checkpoint_interval: int = 1000  # steps; 0 saves only at the end (and on Ctrl-C)
    keep_checkpoints: int = 3  # newest checkpoints kept; 0 keeps all

    def __post_init__(self) -> None:
        for name in ("seq_len", "micro_batch_size", "log_interval"):
            _positive(name, getattr(self, name))
        for name in ("batch_tokens", "grad_accum_steps", "batch_ramp_steps", "max_steps", "max_tokens",
                     "warmup_steps", "decay_steps", "eval_interval", "eval_batches", "checkpoint_interval",
                     "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("device", self.device, DEVICES)
        _choice("attn_backend", self.attn_backend, ATTN_BACKENDS)
        _choice("loss_impl", self.loss_impl, LOSS_IMPLS)
        _choice("residual", self.residual, RESIDUALS)
        _choice("parallel", self.parallel, PARALLEL)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("weight_decay", "eps", "grad_clip", "peak_flops"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")

    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each of `world_size` processes (at full batch)."""
        per_micro = self.micro_batch_size * self.seq_len * world_size
        if self.batch_tokens == 0:
            return self.grad_accum_steps or 1
        if self.batch_tokens % per_micro:
            raise ConfigError(
                f"batch_tokens={self.batch_tokens} is not a multiple of micro_batch_size * seq_len * world_size "
                f"= {self.micro_batch_size} * {self.seq_len} * {world_size} = {per_micro}")
        accum = self.batch_tokens // per_micro
        if self.grad_accum_steps and self.grad_accum_steps != accum:
            raise ConfigError(f"grad_accum_steps={self.grad_accum_steps} disagrees with batch_tokens="
                              f"{self.batch_tokens} (which gives {accum} on {world_size} process(es)); set one")
        return accum

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        return build_config(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Check a TOML/JSON value against a field's type; ints pass for floats, "auto"/None for optionals."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if args else annotation
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "auto")):
        if optional:
            return None
        raise ConfigError(f"{name} cannot be empty")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if base is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if base is bool and isinstance(value, str) and value.lower() in ("true", "false", "on", "off"):
        return value.lower() in ("true", "on")
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"{name} must be a {base.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"allowed: {', '.join(prefix + n for n in names)}")
    values = {}
    for name, value in data.items():
        if name == "model" and cls is TrainConfig:
            if isinstance(value, ModelShape):
                values[name] = value
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"model must be a table of model settings, got {value!r}")
            values[name] = _build(ModelShape, value, "model.")
        else:
            values[name] = _coerce(prefix + name, value, hints[name])
    return cls(**values)


def build_config(data: Mapping[str, Any]) -> TrainConfig:
    """A TrainConfig from a nested dict (a parsed TOML file or a saved config)."""
    return _build(TrainConfig, data, "")


def parse_override(item: str) -> tuple[list[str], Any]:
    """`model.n_layer=6` -> (["model", "n_layer"], 6); the value is TOML, else a bare string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        path, value = parse_override(item)
        if len(path) > 2 or (len(path) == 2 and path[0] != "model"):
            raise ConfigError(f"--set {item!r}: keys are NAME or model.NAME")
        if len(path) == 2 and not isinstance(data.setdefault("model", {}), dict):
            raise ConfigError(f"--set {item!r}: model must be a table of model settings, got {data['model']!r}")
        target = data["model"] if len(path) == 2 else data
        target[path[-1]] = value
    return data


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                base: Mapping[str, Any] | None = None) -> TrainConfig:
    """TOML file (or `base`, a saved config dict, or the defaults) + `key=value` overrides."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = read_toml(path)
    return build_config(apply_overrides(data, overrides))
