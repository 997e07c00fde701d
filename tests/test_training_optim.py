"""training/optim.py and training/config.py: schedules, parameter groups, config parsing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from model.cli import default_model_dir
from model.config import ModelConfig
from model.transformer import Transformer
from training.config import ConfigError, ModelShape, TrainConfig, load_config
from training.optim import (accum_at, build_optimizer, decay_split, lr_at, planned_steps, sequences_before)

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


def test_lr_schedule_exact_values():
    kw = dict(lr=6e-4, warmup_steps=100, decay_steps=1100, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == 6e-4 / 100
    assert lr_at(49, **kw) == 6e-4 * 50 / 100
    assert lr_at(99, **kw) == 6e-4  # warmup end
    assert lr_at(100, **kw) == 6e-4  # decay starts at the peak
    assert lr_at(600, **kw) == pytest.approx(6e-5 + (6e-4 - 6e-5) * 0.5, rel=1e-15)  # mid-decay: cos(pi/2) = 0
    assert lr_at(350, **kw) == pytest.approx(6e-5 + 5.4e-4 * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-15)
    assert lr_at(1100, **kw) == pytest.approx(6e-5, rel=1e-15)  # end: 10% of peak
    assert lr_at(5000, **kw) == pytest.approx(6e-5, rel=1e-15)
    assert lr_at(600, **kw, schedule="linear") == pytest.approx(3.3e-4, rel=1e-15)
    assert lr_at(600, **kw, schedule="constant") == 6e-4
    values = [lr_at(s, **kw) for s in range(100, 1101)]
    assert all(a >= b for a, b in zip(values, values[1:])), "cosine decay must be monotone"


def test_weight_decay_groups_matrices_and_embeddings_only():
    config = ModelConfig(vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, d_model=16, d_ff=32, max_seq_len=16,
                         norm="layernorm", positions="learned", mlp="gelu", bias=True, tie_embeddings=True)
    model = Transformer(config)
    decay, no_decay = decay_split(model)
    assert decay == ["embed.weight", "pos_embed.weight"] + [
        f"blocks.{i}.{n}.weight" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")]
    assert "lm_head.weight" not in decay + no_decay  # tied: the embedding, counted once
    # per block: 2 norms x (weight, bias) + 4 linear biases; then the final norm's weight and bias
    assert all(n.endswith(".bias") or "norm" in n for n in no_decay) and len(no_decay) == 2 * 8 + 2
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1), "cpu")
    assert isinstance(optimizer, torch.optim.AdamW)
    g_decay, g_none = optimizer.param_groups
    assert g_decay["weight_decay"] == 0.1 and g_none["weight_decay"] == 0.0
    assert g_decay["betas"] == (0.9, 0.95) and g_decay["eps"] == 1e-8
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters())
    adafactor = build_optimizer(model, TrainConfig(optimizer="adafactor"), "cpu")
    assert isinstance(adafactor, torch.optim.Adafactor) and adafactor.param_groups[1]["weight_decay"] == 0.0


def test_qk_norm_builds_qwen3_style_models_whose_head_norms_take_no_weight_decay(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[model]\nn_layer = 2\nn_head = 4\nn_kv_head = 2\nd_model = 64\n")
    config = load_config(path, ["model.qk_norm=true"])
    model_config = config.model.build(300, 32)
    assert model_config.qk_norm and not load_config(path).model.build(300, 32).qk_norm
    model = Transformer(model_config)
    decay, no_decay = decay_split(model)
    heads = [f"blocks.{i}.attn.{n}.weight" for i in range(2) for n in ("q_norm", "k_norm")]
    assert set(heads) <= set(no_decay) and not set(heads) & set(decay)
    assert model_config.num_params() == sum(p.numel() for p in model.parameters())


def test_batch_ramp_and_planned_steps():
    assert [accum_at(s, 8, 4) for s in range(6)] == [1, 2, 4, 6, 8, 8]
    assert [accum_at(s, 8, 0) for s in range(3)] == [8, 8, 8]
    assert sequences_before(6, 8, 4, 2) == (1 + 2 + 4 + 6 + 8 + 8) * 2
    assert sequences_before(3, 8, 0, 2) == 48
    config = TrainConfig(seq_len=10, micro_batch_size=2, max_tokens=1000, batch_ramp_steps=4)
    # ramp steps see (1+2+4+6) * 2 * 10 = 260 tokens, then 160 per step: ceil(740 / 160) = 5 more
    assert planned_steps(config, 8, 2) == 4 + 5
    assert planned_steps(TrainConfig(max_tokens=1000, max_steps=3), 8, 2) == 3


def test_shipped_configs_load_and_build():
    tiny = load_config(CONFIGS / "tiny.toml")
    model = tiny.model.build(8192, tiny.seq_len)
    assert 2e6 < model.num_params() < 6e6 and model.norm == "rmsnorm" and model.n_kv_head == 2
    gpt2 = load_config(CONFIGS / "gpt2-124m.toml")
    model = gpt2.model.build(50257, gpt2.seq_len)
    assert model.vocab_size == 50304 and model.tie_embeddings and model.positions == "learned"
    assert abs(model.num_params() - 124.4e6) < 0.1e6
    assert gpt2.grad_accum(1) == 16 and gpt2.grad_accum(8) == 2
    default = load_config(CONFIGS / "default-cpu.toml")  # the CPU recipe (the default model until 2026-11-26)
    model = default.model.build(8192, default.seq_len, eos_id=8191)
    assert 6e6 < model.num_params() < 7e6 and model.max_seq_len == 512
    gpu = load_config(CONFIGS / "default.toml")  # the shipped model's (trained on an H100)
    model = gpu.model.build(8192, gpu.seq_len, eos_id=8191)
    shipped = ModelConfig.load(default_model_dir() / "config.json")
    assert model == shipped, (model, shipped)  # the recipe builds the shape that ships
    assert 20e6 < model.num_params() < 30e6 and model.max_seq_len == 1024 and model.n_kv_head == 2
    # it ships in model/default (issue 7: at most 48 MiB with the tokenizer files), as bf16 weights
    others = sum(p.stat().st_size for p in default_model_dir().iterdir() if not p.name.endswith(".safetensors"))
    assert 2 * model.num_params() + others <= 47 * 2**20, "the GPU default model would not fit the 48 MiB budget"
    assert gpu.grad_accum(1) == 1 and gpu.max_tokens == 100_000_000


def test_overrides_types_and_errors(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('lr = 1e-3\nmax_steps = 10\n[model]\nfamily = "gpt2"\n')
    config = load_config(path, ["lr=2e-3", "model.n_layer=6", "precision=bf16", "compile=false",
                                "model.d_ff=none", "warmup_steps=5"])
    assert (config.lr, config.model.n_layer, config.precision, config.compile) == (2e-3, 6, "bf16", False)
    assert config.model == ModelShape(family="gpt2", n_layer=6) and config.warmup_steps == 5
    assert TrainConfig.from_dict(config.to_dict()) == config
    for override, message in [
        ("lrr=1", "unknown config key.*lrr.*allowed: .*lr"),
        ("model.n_layers=2", "unknown config key.*model.n_layers"),
        ("lr=fast", "lr must be a float, got 'fast'"),
        ("precision=fp8", "precision must be one of auto, fp32, bf16, fp16; got 'fp8'"),
        ("model.family=bert", "model.family must be one of llama, gpt2"),
        ("max_steps=-1", "max_steps must be >= 0"),
        ("lr", "--set expects key=value"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(path, [override])
    with pytest.raises(ConfigError, match="not a multiple of micro_batch_size"):
        TrainConfig(batch_tokens=1000, seq_len=16, micro_batch_size=4).grad_accum(1)
    with pytest.raises(ConfigError, match="disagrees"):
        TrainConfig(batch_tokens=128, grad_accum_steps=3, seq_len=16, micro_batch_size=4).grad_accum(1)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
