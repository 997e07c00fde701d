"""Model directories: load and save Kiln's own, load Hugging Face `gpt2`, `llama`, `mistral`, `qwen2`, `qwen3`.

A Kiln model directory is `config.json` (ModelConfig, model_type "kiln") +
`model.safetensors` (or shards + `model.safetensors.index.json`) + tokenizer files.
Hugging Face directories of model_type `gpt2`, `llama` (rotary scaling `linear` and `llama3`
included: Llama 3.1 / 3.2), `mistral`, `qwen2` and `qwen3` (its per-head q/k norms) load too (a
sliding attention window caps the context at the window, where full attention is the same): their
config is translated to a ModelConfig and their tensor names are mapped onto Kiln's fused
layout (q/k/v -> qkv, gate/up -> up; GPT-2's Conv1D weights are transposed).
Only safetensors are read: a pickle is never loaded.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ROPE_SCALING_KEYS, ModelConfig
from .transformer import Transformer, skipped_init

log = logging.getLogger("kiln.checkpoint")

SUPPORTED_TYPES = ("kiln", "gpt2", "llama", "mistral", "qwen2", "qwen3")
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")  # Llama's tensor names (Qwen2: + q/k/v biases, Qwen3: + q/k norms)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the message says why and what is expected."""


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; allowed: auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def read_config(model_dir: Path) -> dict:
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {str(model_dir)!r} does not exist or is not a directory")
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{str(model_dir)!r} has no config.json: not a model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def config_from_hf(cfg: dict, generation: dict | None = None) -> ModelConfig:
    """A Hugging Face config.json as a ModelConfig; `generation` (generation_config.json) may name more
    end-of-sequence ids (chat models' end of turn), as vLLM reads them."""
    model_type = cfg.get("model_type")
    eos_ids = _id_list(cfg.get("eos_token_id"))
    eos = eos_ids[0] if eos_ids else None
    vocab = cfg.get("vocab_size")
    extra_eos = tuple(i for i in dict.fromkeys(eos_ids + _id_list((generation or {}).get("eos_token_id")))
                      if i != eos and isinstance(vocab, int) and 0 <= i < vocab)
    if model_type == "gpt2":
        act = cfg.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(f"gpt2 activation_function {act!r} is not supported (gelu_new only)")
        if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
            raise CheckpointError("gpt2 scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
        if cfg.get("scale_attn_weights") is False:
            raise CheckpointError("gpt2 scale_attn_weights=false is not supported")
        d = cfg["n_embd"]
        return ModelConfig(
            vocab_size=cfg["vocab_size"], n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_kv_head=cfg["n_head"],
            d_model=d, d_ff=cfg.get("n_inner") or 4 * d, max_seq_len=cfg.get("n_positions", 1024),
            norm="layernorm", norm_eps=cfg.get("layer_norm_epsilon", 1e-5), positions="learned", mlp="gelu",
            tie_embeddings=cfg.get("tie_word_embeddings", True), bias=True,
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=eos, extra_eos_token_ids=extra_eos)
    if model_type in LLAMA_LIKE:
        if cfg.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{model_type} hidden_act {cfg['hidden_act']!r} is not supported (silu only)")
        if cfg.get("mlp_bias"):
            raise CheckpointError(f"{model_type} mlp_bias=true is not supported")
        if model_type in ("llama", "qwen3") and cfg.get("attention_bias"):
            raise CheckpointError(f"{model_type} attention_bias=true is not supported (Kiln's q/k/v biases are "
                                  "Qwen2's: no o_proj bias)")
        theta, scaling = _hf_rope(cfg, model_type)
        n_head = cfg["num_attention_heads"]
        max_seq_len = cfg.get("max_position_embeddings", 2048)
        window = cfg.get("sliding_window") if model_type == "mistral" or cfg.get("use_sliding_window") else None
        if window and int(window) < max_seq_len:  # full causal attention is the window's within the window
            log.info("%s: sliding attention window %d: context capped at %d tokens (of %d positions)", model_type,
                     int(window), int(window), max_seq_len)
            max_seq_len = int(window)
        return ModelConfig(
            vocab_size=cfg["vocab_size"], n_layer=cfg["num_hidden_layers"], n_head=n_head,
            n_kv_head=cfg.get("num_key_value_heads") or n_head, d_model=cfg["hidden_size"],
            d_ff=cfg["intermediate_size"], max_seq_len=max_seq_len,
            norm="rmsnorm", norm_eps=cfg.get("rms_norm_eps", 1e-6), positions="rope", rope_theta=theta,
            rope_scaling=scaling, mlp="swiglu", tie_embeddings=cfg.get("tie_word_embeddings", False), bias=False,
            attention_bias=True if model_type == "qwen2" else False, head_dim=cfg.get("head_dim"),
            qk_norm=model_type == "qwen3",
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=eos, extra_eos_token_ids=extra_eos)
    raise CheckpointError(f"unknown model_type {model_type!r}; supported: {', '.join(SUPPORTED_TYPES)}")


def read_generation_config(model_dir: str | Path) -> dict:
    """A Hugging Face model's generation_config.json, or {} when there is none or it is not a readable JSON
    object (it only adds end-of-sequence ids and sampling defaults: losing it is not an error)."""
    path = Path(model_dir) / "generation_config.json"
    try:
        raw = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return raw if isinstance(raw, dict) else {}


SAMPLING_KEYS = ("temperature", "top_p", "top_k")  # the generation_config.json fields requests default to


def read_sampling_defaults(model_dir: str | Path) -> tuple[dict[str, float | int], list[str]]:
    """The sampling parameters a model's generation_config.json recommends (Qwen3: temperature 0.6, top_p
    0.95, top_k 20), which requests that leave them out get, as in vLLM (`--generation-config auto`).

    Returns (the usable ones, a note for each field that is present but out of range or not a number, so it
    is ignored). No file, or one that is not a JSON object: nothing. top_k 0 means off, as in HF."""
    raw = read_generation_config(model_dir)
    from .sampling import MAX_TEMPERATURE

    valid = {"temperature": lambda v: isinstance(v, (int, float)) and 0 <= v <= MAX_TEMPERATURE,
             "top_p": lambda v: isinstance(v, (int, float)) and 0 < v <= 1,
             "top_k": lambda v: isinstance(v, int) and v >= -1}
    defaults, ignored = {}, []
    for key in SAMPLING_KEYS:
        if raw.get(key) is None:
            continue
        value = raw[key]
        if isinstance(value, bool) or not valid[key](value):
            ignored.append(f"{key}={value!r}")
            continue
        defaults[key] = max(value, 0) if key == "top_k" else float(value)
    return defaults, ignored


def _id_list(value) -> list[int]:
    """A Hugging Face token-id field (an int, a list of ints, or null) as a list."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _hf_rope(cfg: dict, model_type: str) -> tuple[float, dict | None]:
    """(rope_theta, Kiln's rope_scaling) from a Hugging Face config: `rope_parameters` (transformers 5)
    or `rope_scaling` (4.x) with `rope_theta` beside it."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_SCALING_KEYS:
        raise CheckpointError(f"{model_type} rope scaling {rope_type!r} is not supported "
                              f"(supported: default, {', '.join(ROPE_SCALING_KEYS)})")
    if rope.get("attention_factor") not in (None, 1, 1.0):
        raise CheckpointError(f"{model_type} rope scaling attention_factor={rope['attention_factor']!r} is not "
                              "supported (1.0 only)")
    missing = [key for key in ROPE_SCALING_KEYS[rope_type] if key not in rope]
    if missing:
        raise CheckpointError(f"{model_type} rope scaling {rope_type!r} needs {', '.join(missing)}")
    return theta, {"rope_type": rope_type, **{key: rope[key] for key in ROPE_SCALING_KEYS[rope_type]}}


def load_config(model_dir: str | Path) -> ModelConfig:
    raw = read_config(Path(model_dir))
    model_type = raw.get("model_type")
    if model_type == "kiln":
        try:
            return ModelConfig.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{model_dir}/config.json: {e}") from None
    try:
        return config_from_hf(raw, read_generation_config(model_dir))
    except ValueError as e:  # a ModelConfig check
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{model_dir}/config.json: {e}") from None


def read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    else:
        pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
        hint = f" (found {pickles}: pickle checkpoints are never loaded; convert them to safetensors)" if pickles else ""
        raise CheckpointError(f"{str(model_dir)!r} has no model.safetensors or model.safetensors.index.json{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"shard {path} named in the index is missing")
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def _strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in tensors.items()}


def map_gpt2(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    t = _strip_prefix(tensors, "transformer.")
    out = {"embed.weight": t["wte.weight"], "pos_embed.weight": t["wpe.weight"],
           "norm.weight": t["ln_f.weight"], "norm.bias": t["ln_f.bias"]}
    out["lm_head.weight"] = t["wte.weight"] if config.tie_embeddings else t["lm_head.weight"]
    for i in range(config.n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        # Conv1D stores (in, out): transpose to nn.Linear's (out, in)
        out.update({
            b + "norm1.weight": t[h + "ln_1.weight"], b + "norm1.bias": t[h + "ln_1.bias"],
            b + "attn.qkv.weight": t[h + "attn.c_attn.weight"].t(), b + "attn.qkv.bias": t[h + "attn.c_attn.bias"],
            b + "attn.proj.weight": t[h + "attn.c_proj.weight"].t(), b + "attn.proj.bias": t[h + "attn.c_proj.bias"],
            b + "norm2.weight": t[h + "ln_2.weight"], b + "norm2.bias": t[h + "ln_2.bias"],
            b + "mlp.up.weight": t[h + "mlp.c_fc.weight"].t(), b + "mlp.up.bias": t[h + "mlp.c_fc.bias"],
            b + "mlp.down.weight": t[h + "mlp.c_proj.weight"].t(), b + "mlp.down.bias": t[h + "mlp.c_proj.bias"],
        })
    return out


def map_llama(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    t = _strip_prefix(tensors, "model.")
    out = {"embed.weight": t["embed_tokens.weight"], "norm.weight": t["norm.weight"]}
    out["lm_head.weight"] = t["embed_tokens.weight"] if config.tie_embeddings else t["lm_head.weight"]
    for i in range(config.n_layer):
        h, b = f"layers.{i}.", f"blocks.{i}."
        a = h + "self_attn."
        out.update({
            b + "norm1.weight": t[h + "input_layernorm.weight"],
            b + "attn.qkv.weight": torch.cat([t[a + "q_proj.weight"], t[a + "k_proj.weight"], t[a + "v_proj.weight"]]),
            b + "attn.proj.weight": t[a + "o_proj.weight"],
            b + "norm2.weight": t[h + "post_attention_layernorm.weight"],
            b + "mlp.up.weight": torch.cat([t[h + "mlp.gate_proj.weight"], t[h + "mlp.up_proj.weight"]]),
            b + "mlp.down.weight": t[h + "mlp.down_proj.weight"],
        })
        if config.qk_norm:
            out[b + "attn.q_norm.weight"] = t[a + "q_norm.weight"]
            out[b + "attn.k_norm.weight"] = t[a + "k_norm.weight"]
        if config.has_attention_bias:
            out[b + "attn.qkv.bias"] = torch.cat([t[a + "q_proj.bias"], t[a + "k_proj.bias"], t[a + "v_proj.bias"]])
            if a + "o_proj.bias" in t:
                out[b + "attn.proj.bias"] = t[a + "o_proj.bias"]
    return out


def build_model(config: ModelConfig, state_dict: dict[str, torch.Tensor], device: torch.device,
                dtype: torch.dtype, attn_backend: str = "auto", tie_head: bool = True) -> Transformer:
    """A model from its tensors: built on the meta device, then given them as they are (assign), so nothing
    is allocated, initialized or copied twice. A config that ties embeddings makes the LM head the
    embedding (a stored head is ignored, as transformers does) unless `tie_head` is False: then the
    state's own head stays (an int8 model's bf16 copy keeps the head that model serves with)."""
    with torch.device("meta"), skipped_init():
        model = Transformer(config, attn_backend=attn_backend)
    state_dict = dict(state_dict)
    if config.tie_embeddings:
        state_dict.setdefault("lm_head.weight", state_dict["embed.weight"])
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise CheckpointError(f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, param in model.state_dict().items():
        if param.shape != state_dict[name].shape:
            raise CheckpointError(f"tensor {name}: shape {tuple(state_dict[name].shape)} in the checkpoint, "
                                  f"{tuple(param.shape)} expected from the config")
    model.load_state_dict({name: t.to(device=device, dtype=dtype).contiguous() for name, t in state_dict.items()},
                          assign=True)
    if config.tie_embeddings and tie_head:
        model.lm_head.weight = model.embed.weight
    model.init_rope()
    return model.to(dtype).eval()


def load_model(model_dir: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
               attn_backend: str = "auto") -> Transformer:
    """Load a Kiln or Hugging Face (gpt2/llama/mistral/qwen2/qwen3) model directory."""
    started = time.perf_counter()
    model_dir = Path(model_dir)
    device = torch.device(device)
    raw = read_config(model_dir)
    config = load_config(model_dir)
    tensors = read_safetensors(model_dir)
    try:
        if raw.get("model_type") == "gpt2":
            tensors = map_gpt2(tensors, config)
        elif raw.get("model_type") in LLAMA_LIKE:
            tensors = map_llama(tensors, config)
    except KeyError as e:
        raise CheckpointError(f"{model_dir}: tensor {e.args[0]!r} expected for model_type "
                              f"{raw.get('model_type')!r} is missing") from None
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype, device)
    model = build_model(config, tensors, device, torch_dtype, attn_backend)
    model.load_seconds = time.perf_counter() - started
    return model


def save_model(model: Transformer, out_dir: str | Path, dtype: torch.dtype | None = None,
               max_shard_bytes: int | None = None) -> None:
    """Write Kiln's format: config.json + model.safetensors (or shards + index)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.save(out_dir / "config.json")
    state = {}
    for name, tensor in model.state_dict().items():
        if model.config.tie_embeddings and name == "lm_head.weight":
            continue  # tied: stored once, as embed.weight
        tensor = tensor.detach()
        state[name] = (tensor.to(dtype) if dtype is not None else tensor).contiguous().cpu()
    save_state_dict(state, out_dir, max_shard_bytes)


def _save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, readable like any other file the user writes: safetensors >= 0.8
    creates its files owner-only (0600), which a server run as another user could not load."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save_state_dict(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int | None = None) -> None:
    for stale in list(out_dir.glob("model*.safetensors")) + list(out_dir.glob("model.safetensors.index.json")):
        stale.unlink()
    total = sum(t.numel() * t.element_size() for t in state.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        _save_file(state, out_dir / "model.safetensors")
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save_file(shard, out_dir / fname)
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
