"""ModelConfig: the shape of a Kiln decoder, saved as `config.json` beside its weights.

One frozen dataclass describes both families Kiln runs:
- Llama style: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention.
- GPT-2 style: LayerNorm, learned positions, GELU MLP (tanh approximation), biases,
  tied input/output embeddings.

`qk_norm` adds an RMSNorm over each query and key head (a gain of head_dim for the queries and
one for the keys, the model's norm_eps) between the qkv projection and the rotary embedding, as
Qwen3 does; it bounds the attention logits' scale, which steadies training at high learning rates.

`rope_scaling` stretches the rotary frequencies the way Hugging Face's Llama does for
long-context checkpoints: {"rope_type": "linear", "factor": f} divides every frequency by f;
{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
"original_max_position_embeddings"} (Llama 3.1 / 3.2) divides the low frequencies by f, keeps
the high ones, and blends between them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned")
MLPS = ("swiglu", "gelu")
QUANTIZATIONS = ("int8",)  # weight formats model/quantize.py converts a loaded model to (--quantization)
ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    d_model: int
    d_ff: int
    max_seq_len: int
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    positions: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default=None, hash=False)  # see the module docstring; None = plain RoPE
    mlp: str = "swiglu"
    tie_embeddings: bool = False
    bias: bool = False  # biases on every linear layer (GPT-2)
    attention_bias: bool | None = None  # q/k/v/o biases; None -> same as `bias` (Qwen2-like: True)
    head_dim: int | None = None  # None -> d_model // n_head
    qk_norm: bool = False  # RMSNorm over each query and key head before rotary (Qwen3)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # more ids that end a sequence (a chat model's end of turn: Hugging Face configs list them)
    extra_eos_token_ids: tuple[int, ...] = field(default=(), hash=False)

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid model config: {msg}")

        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        object.__setattr__(self, "extra_eos_token_ids", tuple(self.extra_eos_token_ids or ()))  # JSON gives a list
        need(all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size
                 for i in self.extra_eos_token_ids),
             f"extra_eos_token_ids must be token ids in [0, {self.vocab_size}), got {list(self.extra_eos_token_ids)}")
        need(self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}")
        need(self.positions in POSITIONS, f"positions must be one of {POSITIONS}, got {self.positions!r}")
        need(self.mlp in MLPS, f"mlp must be one of {MLPS}, got {self.mlp!r}")
        need(self.n_head % self.n_kv_head == 0,
             f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.head_dim is None:
            need(self.d_model % self.n_head == 0,
                 f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head}) when head_dim is unset")
        if self.positions == "rope":
            need(self.dim_per_head % 2 == 0, f"rotary positions need an even head dim, got {self.dim_per_head}")
        if self.rope_scaling is not None:
            need(self.positions == "rope", "rope_scaling needs positions = 'rope'")
            need(isinstance(self.rope_scaling, dict), f"rope_scaling must be a dict, got {self.rope_scaling!r}")
            kind = self.rope_scaling.get("rope_type")
            need(kind in ROPE_SCALING_KEYS,
                 f"rope_scaling rope_type must be one of {tuple(ROPE_SCALING_KEYS)}, got {kind!r}")
            keys = ROPE_SCALING_KEYS[kind]
            extra = sorted(set(self.rope_scaling) - set(keys) - {"rope_type"})
            need(not extra, f"rope_scaling of type {kind!r} takes {', '.join(keys)}; unknown: {extra}")
            for key in keys:
                value = self.rope_scaling.get(key)
                need(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
                     f"rope_scaling {key} must be a number > 0, got {value!r}")
            if kind == "llama3":
                need(self.rope_scaling["high_freq_factor"] > self.rope_scaling["low_freq_factor"],
                     "rope_scaling high_freq_factor must be greater than low_freq_factor")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_head

    @property
    def has_attention_bias(self) -> bool:
        return self.bias if self.attention_bias is None else self.attention_bias

    def num_params(self, include_embeddings: bool = True) -> int:
        d, hd = self.d_model, self.dim_per_head
        qkv_out = hd * (self.n_head + 2 * self.n_kv_head)
        attn = d * qkv_out + self.n_head * hd * d
        attn += qkv_out * self.has_attention_bias + d * self.bias
        mlp_up = self.d_ff * (2 if self.mlp == "swiglu" else 1)
        mlp = d * mlp_up + self.d_ff * d + (mlp_up + d) * self.bias
        norms = 2 * d * (2 if self.norm == "layernorm" else 1) + 2 * hd * self.qk_norm
        total = self.n_layer * (attn + mlp + norms) + d * (2 if self.norm == "layernorm" else 1)
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
            if self.positions == "learned":
                total += self.max_seq_len * d
        return total

    def to_dict(self) -> dict:
        return {"model_type": "kiln", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields - {"model_type"})
        if unknown:
            raise ValueError(f"unknown model config keys: {unknown}; allowed: {sorted(fields)}")
        return cls(**{k: v for k, v in data.items() if k in fields})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
