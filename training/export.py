"""`kiln export`: a training checkpoint -> a model directory the server (or transformers) loads.

    kiln export RUN_DIR|CHECKPOINT|MODEL_DIR --out DIR [--overwrite] [--dtype fp32|bf16|fp16]
                [--format kiln|hf] [--max-shard-mb N]

RUN_DIR is a `kiln train --out` directory (its latest checkpoint is exported) or one
checkpoint file. The output directory gets the weights, config.json and the tokenizer files
the data was prepared with (stored inside every checkpoint). A MODEL_DIR (a directory Kiln
serves: `kiln export model/default --format hf --out kiln-default-hf` gives the shipped model
as a Hugging Face directory, for `lm_eval --model hf` or transformers) is converted the same
way, with the tokenizer files beside its weights:

- `--format kiln` (default): Kiln's own layout (model.checkpoint.save_model): config.json with
  model_type "kiln" + model.safetensors (fused qkv / gate-up tensors).
- `--format hf`: a Hugging Face directory: config.json with model_type "gpt2", "llama" or "qwen3" and
  safetensors under Hugging Face's tensor names (the inverse of model.checkpoint.map_gpt2 /
  map_llama: q/k/v and gate/up split out, GPT-2's Conv1D weights transposed), plus
  tokenizer.json; `AutoModelForCausalLM.from_pretrained(DIR)` loads it. Only models of these
  families' exact shapes convert; anything else is refused with the reason.

`--max-shard-mb N` splits the weights into shards of at most N MB with an index file
(`model.safetensors.index.json`, Hugging Face's convention, which both loaders read).
Weights are written in fp32 unless `--dtype` says otherwise.

An --out directory that exists and is not empty is refused unless `--overwrite` is given;
then the weights, config.json and tokenizer files are replaced (weight shards of an earlier
export included) and any other files in it (a model card, eval results) are kept.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from model.checkpoint import CheckpointError, build_model, load_model, save_model, save_state_dict
from model.config import ModelConfig
from model.transformer import Transformer

from .checkpointing import CheckpointNotFound, load_checkpoint, resolve_checkpoint
from .data import TOKENIZER_FILES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMATS = ("kiln", "hf")
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked; the message says why."""


def load_trained_model(source: str | Path) -> tuple[Transformer, dict, Path]:
    """(fp32 model on the CPU, the checkpoint dict, the checkpoint path) for a run dir or checkpoint file;
    for a model directory (config.json, no checkpoints) the dict holds only its tokenizer files."""
    source = Path(source)
    if source.is_dir() and (source / "config.json").is_file() and not any(source.glob("checkpoint-*.pt")):
        model = load_model(source, "cpu", torch.float32)
        files = {name: (source / name).read_bytes() for name in TOKENIZER_FILES if (source / name).is_file()}
        return model, {"tokenizer_files": files}, source / "config.json"
    path = resolve_checkpoint(source)
    state = load_checkpoint(path)
    config = ModelConfig.from_dict(state["model_config"])
    model = build_model(config, state["model"], torch.device("cpu"), torch.float32)
    return model, state, path


def tokenizer_files(state: dict, checkpoint: Path) -> dict[str, bytes]:
    """The tokenizer stored in the checkpoint, else the run directory's tokenizer/ copy."""
    files = dict(state.get("tokenizer_files") or {})
    if not files:
        run_tokenizer = checkpoint.parent / "tokenizer"
        files = {name: (run_tokenizer / name).read_bytes() for name in TOKENIZER_FILES
                 if (run_tokenizer / name).is_file()}
    if not files:
        raise ExportError(f"{checkpoint} holds no tokenizer files and {checkpoint.parent / 'tokenizer'} is missing")
    return files


def hf_family(config: ModelConfig) -> str:
    """"gpt2", "llama" or "qwen3" (Llama's shape with per-head q/k norms) when the config is exactly that
    family's shape; otherwise ExportError."""
    def mismatch(family: str, reasons: list[str]) -> ExportError:
        return ExportError(f"this model cannot be written as Hugging Face {family}: {', '.join(reasons)}")

    if config.norm == "layernorm" or config.positions == "learned" or config.mlp == "gelu":
        reasons = [f"{name}={getattr(config, name)!r} (gpt2 needs {want!r})" for name, want in
                   (("norm", "layernorm"), ("positions", "learned"), ("mlp", "gelu"), ("bias", True),
                    ("has_attention_bias", True), ("qk_norm", False)) if getattr(config, name) != want]
        if config.n_kv_head != config.n_head:
            reasons.append(f"n_kv_head={config.n_kv_head} (gpt2 has no grouped-query attention)")
        if config.dim_per_head * config.n_head != config.d_model:
            reasons.append(f"head_dim={config.dim_per_head} (gpt2 needs d_model / n_head)")
        if reasons:
            raise mismatch("gpt2", reasons)
        return "gpt2"
    family = "qwen3" if config.qk_norm else "llama"
    reasons = [f"{name}={getattr(config, name)!r} ({family} needs {want!r})" for name, want in
               (("norm", "rmsnorm"), ("positions", "rope"), ("mlp", "swiglu"), ("bias", False),
                ("has_attention_bias", False)) if getattr(config, name) != want]
    if reasons:
        raise mismatch(family, reasons)
    return family


def hf_config(config: ModelConfig, family: str, dtype: torch.dtype) -> dict:
    bos = config.bos_token_id if config.bos_token_id is not None else config.eos_token_id
    common = {"vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_embeddings,
              "bos_token_id": bos,
              "eos_token_id": [config.eos_token_id, *config.extra_eos_token_ids] if config.extra_eos_token_ids
              else config.eos_token_id, "torch_dtype": HF_DTYPE_NAMES[dtype],
              "use_cache": True}
    if family == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], **common,
                "n_positions": config.max_seq_len, "n_ctx": config.max_seq_len, "n_embd": config.d_model,
                "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.d_ff,
                "activation_function": "gelu_new", "layer_norm_epsilon": config.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True}
    model_type, architecture = ("qwen3", "Qwen3ForCausalLM") if family == "qwen3" else ("llama", "LlamaForCausalLM")
    return {"model_type": model_type, "architectures": [architecture], **common,
            "hidden_size": config.d_model, "intermediate_size": config.d_ff, "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head,
            "head_dim": config.dim_per_head, "max_position_embeddings": config.max_seq_len,
            "rms_norm_eps": config.norm_eps, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "rope_theta": config.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta, **(config.rope_scaling or {})}}


def hf_state_dict(model: Transformer, family: str) -> dict[str, torch.Tensor]:
    """Kiln tensor names -> Hugging Face's (the inverse of map_gpt2 / map_llama; qwen3 is llama's + q/k norms)."""
    config = model.config
    s = {name: t.detach() for name, t in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    if family == "gpt2":
        p = "transformer."
        out.update({p + "wte.weight": s["embed.weight"], p + "wpe.weight": s["pos_embed.weight"],
                    p + "ln_f.weight": s["norm.weight"], p + "ln_f.bias": s["norm.bias"]})
        for i in range(config.n_layer):
            h, b = f"{p}h.{i}.", f"blocks.{i}."
            # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out)
            out.update({
                h + "ln_1.weight": s[b + "norm1.weight"], h + "ln_1.bias": s[b + "norm1.bias"],
                h + "attn.c_attn.weight": s[b + "attn.qkv.weight"].t(),
                h + "attn.c_attn.bias": s[b + "attn.qkv.bias"],
                h + "attn.c_proj.weight": s[b + "attn.proj.weight"].t(),
                h + "attn.c_proj.bias": s[b + "attn.proj.bias"],
                h + "ln_2.weight": s[b + "norm2.weight"], h + "ln_2.bias": s[b + "norm2.bias"],
                h + "mlp.c_fc.weight": s[b + "mlp.up.weight"].t(), h + "mlp.c_fc.bias": s[b + "mlp.up.bias"],
                h + "mlp.c_proj.weight": s[b + "mlp.down.weight"].t(), h + "mlp.c_proj.bias": s[b + "mlp.down.bias"],
            })
    else:
        H, Hkv, D, F = config.n_head, config.n_kv_head, config.dim_per_head, config.d_ff
        out.update({"model.embed_tokens.weight": s["embed.weight"], "model.norm.weight": s["norm.weight"]})
        for i in range(config.n_layer):
            h, b = f"model.layers.{i}.", f"blocks.{i}."
            qkv = s[b + "attn.qkv.weight"]  # rows: [q (H*D); k (Hkv*D); v (Hkv*D)]
            up = s[b + "mlp.up.weight"]  # rows: [gate (F); up (F)]
            out.update({
                h + "input_layernorm.weight": s[b + "norm1.weight"],
                h + "self_attn.q_proj.weight": qkv[: H * D],
                h + "self_attn.k_proj.weight": qkv[H * D: (H + Hkv) * D],
                h + "self_attn.v_proj.weight": qkv[(H + Hkv) * D:],
                h + "self_attn.o_proj.weight": s[b + "attn.proj.weight"],
                h + "post_attention_layernorm.weight": s[b + "norm2.weight"],
                h + "mlp.gate_proj.weight": up[:F], h + "mlp.up_proj.weight": up[F:],
                h + "mlp.down_proj.weight": s[b + "mlp.down.weight"],
            })
            if config.qk_norm:
                out[h + "self_attn.q_norm.weight"] = s[b + "attn.q_norm.weight"]
                out[h + "self_attn.k_norm.weight"] = s[b + "attn.k_norm.weight"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = s["lm_head.weight"]
    return out


def write_tokenizer(files: dict[str, bytes], out_dir: Path, need_hf_json: bool) -> None:
    """The tokenizer files, as the run (or model directory) had them. For Hugging Face (`need_hf_json`):
    a tokenizer.json if there was none, and a tokenizer_config.json that makes transformers read it as
    Kiln does, naming the tokens Kiln trained with."""
    for name, content in files.items():
        (out_dir / name).write_bytes(content)
    if not need_hf_json:
        return
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(out_dir)
    if "tokenizer.json" not in files:
        (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer.to_hf_json(), ensure_ascii=False),
                                                encoding="utf-8")
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    # transformers keeps tokenizer.json as written only through PreTrainedTokenizerFast: a model's own class
    # (transformers 5's LlamaTokenizer) rebuilds Llama 2's normalization and gives other ids at a leading space
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.setdefault("eos_token", tokenizer.eos_token)  # Kiln may have inferred it (a bare tokenizer.json)
    if tokenizer.bos_token is not None:
        config.setdefault("bos_token", tokenizer.bos_token)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an --out that is not a directory, or one that already holds files (unless overwrite)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {str(out)!r} is a file, not a directory; pick a directory path")
    if out.is_dir() and not overwrite and any(out.iterdir()):
        raise ExportError(f"--out {str(out)!r} already exists and is not empty; pick another directory, or pass "
                          "--overwrite to replace the model files in it")


def export(source: str | Path, out_dir: str | Path, dtype: str = "fp32", fmt: str = "kiln",
           max_shard_mb: float | None = None, overwrite: bool = False) -> Path:
    """Write the model directory; returns the checkpoint that was exported.

    A non-empty `out_dir` is refused unless `overwrite`, which replaces the model files in it."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if max_shard_mb is not None and not (math.isfinite(max_shard_mb) and max_shard_mb > 0):
        raise ExportError(f"--max-shard-mb must be a finite number > 0 (MB, 1 MB = 10^6 bytes), got {max_shard_mb}")
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    model, state, checkpoint = load_trained_model(source)
    family = hf_family(model.config) if fmt == "hf" else None  # refuse before writing anything
    files = tokenizer_files(state, checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = DTYPES[dtype]
    max_bytes = int(max_shard_mb * 1_000_000) if max_shard_mb else None
    if family is None:
        save_model(model, out, dtype=torch_dtype, max_shard_bytes=max_bytes)
    else:
        tensors = {name: t.to(torch_dtype).contiguous() for name, t in hf_state_dict(model, family).items()}
        save_state_dict(tensors, out, max_bytes)
        (out / "config.json").write_text(json.dumps(hf_config(model.config, family, torch_dtype), indent=2) + "\n")
    write_tokenizer(files, out, need_hf_json=family is not None)
    return checkpoint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln export", description="Write a servable model directory from a "
                                                                "training checkpoint (or convert a model directory).")
    p.add_argument("source", metavar="RUN_DIR|CHECKPOINT|MODEL_DIR",
                   help="a `kiln train --out` directory (its latest checkpoint), a checkpoint-*.pt file, or a "
                        "model directory (e.g. model/default) to convert")
    p.add_argument("--out", required=True, metavar="DIR", help="model directory to write (new or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an --out that already holds files, replacing its weights, config and tokenizer")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="weights dtype (default fp32)")
    p.add_argument("--format", dest="fmt", default="kiln", choices=FORMATS,
                   help="kiln (Kiln's layout) or hf (Hugging Face gpt2/llama)")
    p.add_argument("--max-shard-mb", type=float, default=None, metavar="N",
                   help="split weights into shards of at most N MB (1 MB = 10^6 bytes)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        checkpoint = export(args.source, args.out, dtype=args.dtype, fmt=args.fmt, max_shard_mb=args.max_shard_mb,
                            overwrite=args.overwrite)
    except (ExportError, CheckpointNotFound, CheckpointError, OSError) as e:
        print(f"kiln export: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"exported {checkpoint} -> {args.out} ({args.fmt}, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
