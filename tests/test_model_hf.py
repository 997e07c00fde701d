"""Kiln's model against Hugging Face transformers on tiny random GPT-2 and Llama (GQA) dirs."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from model.checkpoint import CheckpointError, load_model
from model.kv_cache import KVCache

from cache_helpers import Sequences


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> None:
    diff = (a.float() - b.float()).abs()
    assert diff.max().item() <= atol, f"max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}"


def random_tokens(n_vocab: int, shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_vocab, shape, generator=g)


@torch.no_grad()
def test_full_forward_matches_hf(hf_dir):
    ref = hf_model(hf_dir)
    model = load_model(hf_dir)
    tokens = random_tokens(ref.config.vocab_size, (3, 37))
    close(model(tokens), ref(tokens).logits)


@torch.no_grad()
def test_incremental_decode_matches_full_forward(hf_dir):
    model = load_model(hf_dir)
    tokens = random_tokens(model.config.vocab_size, (1, 20), seed=1)
    full = model(tokens)[0]  # (T, V)
    cache = Sequences(KVCache(model.config, num_blocks=17, block_size=4, max_seq_len=32))
    slot = cache.allocate()
    # prefill 7 tokens, then one at a time
    batch = cache.batch([slot], [7])
    out = model(tokens[:, :7], kv_cache=cache.kv, batch=batch)
    cache.advance([slot], [7])
    close(out[0], full[:7])
    for t in range(7, 20):
        batch = cache.batch([slot], [1])
        out = model(tokens[:, t: t + 1], kv_cache=cache.kv, batch=batch)
        cache.advance([slot], [1])
        close(out[0, 0], full[t])


@torch.no_grad()
def test_mixed_batch_joined_midway_equals_alone(hf_dir):
    """Sequences of different lengths in one batch, one prefilled while others decode."""
    model = load_model(hf_dir)
    V = model.config.vocab_size
    seqs = [random_tokens(V, (1, n), seed=10 + n)[0] for n in (12, 5, 17)]
    alone = [model(s[None])[0] for s in seqs]
    cache = Sequences(KVCache(model.config, num_blocks=33, block_size=4, max_seq_len=32))
    # slot order deliberately not consecutive
    slots = [cache.allocate() for _ in range(4)]
    order = [slots[2], slots[0], slots[3]]
    prefill = [4, 3, 6]
    # first two sequences start together (padded prefill)
    b = cache.batch(order[:2], prefill[:2])
    toks = torch.zeros(2, 4, dtype=torch.long)
    toks[0, :4], toks[1, :3] = seqs[0][:4], seqs[1][:3]
    out = model(toks, kv_cache=cache.kv, batch=b)
    cache.advance(order[:2], prefill[:2])
    close(out[0, :4], alone[0][:4])
    close(out[1, :3], alone[1][:3])
    pos = [4, 3, 0]
    active = [0, 1]
    step = 0
    while any(pos[i] < len(seqs[i]) for i in range(3)):
        if step == 3:  # the third sequence joins mid-way
            b = cache.batch([order[2]], [prefill[2]])
            out = model(seqs[2][None, :6], kv_cache=cache.kv, batch=b)
            cache.advance([order[2]], [prefill[2]])
            close(out[0], alone[2][:6])
            pos[2] = 6
            active.append(2)
        live = [i for i in active if pos[i] < len(seqs[i])]
        b = cache.batch([order[i] for i in live], [1] * len(live))
        toks = torch.stack([seqs[i][pos[i]: pos[i] + 1] for i in live])
        out = model(toks, kv_cache=cache.kv, batch=b)
        cache.advance([order[i] for i in live], [1] * len(live))
        for row, i in enumerate(live):
            close(out[row, 0], alone[i][pos[i]])
            pos[i] += 1
        step += 1


@torch.no_grad()
def test_loss_matches_hf(hf_dir):
    ref = hf_model(hf_dir)
    model = load_model(hf_dir)
    tokens = random_tokens(ref.config.vocab_size, (2, 30), seed=3)
    ref_loss = ref(tokens, labels=tokens).loss
    targets = tokens[:, 1:]
    loss = model(tokens[:, :-1], targets)
    assert math.isclose(loss.item(), ref_loss.item(), rel_tol=1e-5), (loss.item(), ref_loss.item())


def test_sharded_and_missing_dirs(tmp_path, llama_dir):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointError, match="unknown model_type 'bert'"):
        load_model(bad)


@torch.no_grad()
def test_kiln_save_load_roundtrip_sharded(tmp_path, llama_dir):
    from model.checkpoint import save_model

    model = load_model(llama_dir)
    save_model(model, tmp_path / "kiln", max_shard_bytes=40_000)
    assert (tmp_path / "kiln" / "model.safetensors.index.json").is_file()
    again = load_model(tmp_path / "kiln")
    tokens = random_tokens(model.config.vocab_size, (1, 9))
    assert torch.equal(model(tokens), again(tokens))


def test_num_params_counts_every_parameter(hf_dir):
    model = load_model(hf_dir)
    assert model.config.num_params() == sum(p.numel() for p in model.parameters())


# ---- rotary scaling (Llama 3.1 / 3.2, linear) and Qwen2 -------------------------------------------
def save_tiny_hf(out, tokenizer_dir, family: str = "llama", **extra):
    """A tiny random Hugging Face model of `family` (llama, mistral, qwen2 or qwen3) with `extra` config fields."""
    import transformers

    from conftest import _copy_tokenizer, _sharpen, hf_vocab_size

    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    config_cls, model_cls = getattr(transformers, prefix + "Config"), getattr(transformers, prefix + "ForCausalLM")
    torch.manual_seed(0)
    fields = dict(vocab_size=hf_vocab_size(tokenizer_dir), hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = model_cls(config_cls(**{**fields, **extra})).eval()
    _sharpen(model, 3.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # Qwen2's q/k/v biases: HF initializes them to zero
                p.normal_(0.0, 0.5)
            if name.endswith(("q_norm.weight", "k_norm.weight")):  # Qwen3's head norms: HF's are ones
                p.normal_(1.0, 0.5)
    model.save_pretrained(str(out))
    _copy_tokenizer(tokenizer_dir, out)
    return out


# head dim 16, theta 10000: wavelengths 6.3, 19.9, 62.8, 199, ... positions. With original length 64 and
# low/high factors 1/4, llama3 keeps the first, blends the next two and stretches the rest.
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
LINEAR = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}


@pytest.mark.parametrize("rope", [LLAMA3, LINEAR], ids=["llama3", "linear"])
@torch.no_grad()
def test_rope_scaling_matches_hf(tmp_path, tokenizer_dir, rope):
    from model.transformer import rope_tables

    path = save_tiny_hf(tmp_path / "m", tokenizer_dir, rope_parameters=dict(rope))
    ref, model = hf_model(path), load_model(path)
    assert model.config.rope_scaling == {k: v for k, v in rope.items() if k != "rope_theta"}
    plain = rope_tables(dataclasses.replace(model.config, rope_scaling=None))
    assert not torch.allclose(model.rope_cos, plain[0])  # the scaling changes the tables: the test can fail
    tokens = random_tokens(ref.config.vocab_size, (2, 120), seed=4)
    close(model(tokens), ref(tokens).logits)
    served_and_exported_match(path, ref, model, tokens, tmp_path, prompt_len=70, new_tokens=24, seed=5)


def served_and_exported_match(path, ref, model, tokens, tmp_path, prompt_len: int, new_tokens: int, seed: int):
    """The served path (KV cache, decode steps) gives HF generate's greedy ids, and `kiln export` to Kiln's
    format and back to Hugging Face's keeps the config and HF's logits on `tokens`; returns the HF export."""
    from model.cli import load_engine
    from model.engine import SamplingParams
    from training.export import main as export_main

    engine = load_engine(str(path), "cpu", None, max_batch_size=1)
    prompt = random_tokens(ref.config.vocab_size, (1, prompt_len), seed=seed)
    want = ref.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0, prompt_len:].tolist()
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    assert [t for out in engine.generate(prompt[0].tolist(), params) for t in out.token_ids] == want
    assert export_main([str(path), "--out", str(tmp_path / "kiln")]) == 0
    assert load_model(tmp_path / "kiln").config == model.config
    assert export_main([str(tmp_path / "kiln"), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    close(hf_model(tmp_path / "hf")(tokens).logits, ref(tokens).logits)
    return tmp_path / "hf"


@torch.no_grad()
def test_qwen2_matches_hf(tmp_path, tokenizer_dir):
    path = save_tiny_hf(tmp_path / "q", tokenizer_dir, family="qwen2", tie_word_embeddings=True)
    ref, model = hf_model(path), load_model(path)
    assert model.config.has_attention_bias and not model.config.bias and model.config.tie_embeddings
    tokens = random_tokens(ref.config.vocab_size, (2, 40), seed=6)
    close(model(tokens), ref(tokens).logits)
    windowed = save_tiny_hf(tmp_path / "w", tokenizer_dir, family="qwen2", use_sliding_window=True, sliding_window=32,
                            max_window_layers=0)
    assert load_model(windowed).config.max_seq_len == 32  # full attention is the window's only within it


@torch.no_grad()
def test_qwen3_matches_hf(tmp_path, tokenizer_dir):
    """Qwen3: an RMSNorm over each query and key head (gains of their own) before rotary, and a head dim that
    is not hidden / heads; logits, the served path's greedy tokens, and `kiln export` both ways."""
    path = save_tiny_hf(tmp_path / "q", tokenizer_dir, family="qwen3", head_dim=32, tie_word_embeddings=True)
    ref, model = hf_model(path), load_model(path)
    assert model.config.qk_norm and model.config.dim_per_head == 32 and not model.config.has_attention_bias
    assert model.config.num_params() == sum(p.numel() for p in model.parameters())
    tokens = random_tokens(ref.config.vocab_size, (2, 40), seed=6)
    close(model(tokens), ref(tokens).logits)
    exported = served_and_exported_match(path, ref, model, tokens, tmp_path, prompt_len=30, new_tokens=16, seed=8)
    assert json.loads((exported / "config.json").read_text())["model_type"] == "qwen3"


def test_qwen3_with_attention_bias_is_a_clear_error(tmp_path, tokenizer_dir):
    path = save_tiny_hf(tmp_path / "q", tokenizer_dir, family="qwen3", attention_bias=True)
    with pytest.raises(CheckpointError, match="qwen3 attention_bias=true is not supported"):
        load_model(path)


@torch.no_grad()
def test_mistral_matches_hf_and_its_window_caps_the_context(tmp_path, tokenizer_dir):
    path = save_tiny_hf(tmp_path / "m", tokenizer_dir, family="mistral", sliding_window=None)
    ref, model = hf_model(path), load_model(path)
    assert model.config.max_seq_len == 128
    tokens = random_tokens(ref.config.vocab_size, (2, 100), seed=7)
    close(model(tokens), ref(tokens).logits)
    windowed = save_tiny_hf(tmp_path / "w", tokenizer_dir, family="mistral", sliding_window=48)
    ref, model = hf_model(windowed), load_model(windowed)
    assert model.config.max_seq_len == 48  # Mistral 7B v0.1: window 4096 of 32768 positions
    close(model(tokens[:, :48]), ref(tokens[:, :48]).logits)


def test_unsupported_rope_scaling_is_a_clear_error(tmp_path, tokenizer_dir):
    path = save_tiny_hf(tmp_path / "y", tokenizer_dir)
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="rope scaling 'yarn' is not supported"):
        load_model(path)
    config["rope_scaling"] = {"type": "llama3", "factor": 8.0}  # transformers 4.x spelling, fields missing
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="needs low_freq_factor, high_freq_factor"):
        load_model(path)


def test_every_eos_id_of_the_config_and_generation_config_ends_a_sequence(tmp_path, llama_dir):
    """Chat models list several end ids (Llama 3 Instruct: <|end_of_text|>, <|eom_id|>, <|eot_id|>) in
    config.json and generation_config.json; each ends a sequence, as in vLLM."""
    import shutil

    from model.cli import load_engine
    from model.engine import SamplingParams

    path = tmp_path / "chat"
    shutil.copytree(llama_dir, path)
    prompt = [3, 4, 5]
    plain = load_engine(str(path), "cpu", None)
    first = next(iter(plain.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))))
    end = first.token_ids[0]  # make greedy's first token an end-of-turn id
    assert plain.eos_id == 0  # the tokenizer's EOS
    config = json.loads((path / "config.json").read_text())
    # Llama 3.1 Instruct: config [<|end_of_text|>, <|eom_id|>, <|eot_id|>], tokenizer EOS <|eot_id|>; an id past
    # the vocabulary is dropped, not an error
    config["eos_token_id"] = [end, 9999999]
    (path / "config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, end]}))
    engine = load_engine(str(path), "cpu", None)
    assert engine.config.eos_token_id == end and engine.config.extra_eos_token_ids == (0,)
    assert engine.eos_ids == {0, end}
    outs = list(engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0)))
    assert [t for o in outs for t in o.token_ids] == [end] and outs[-1].finish_reason == "stop"
    # ignore_eos and min_tokens cover it as they cover EOS
    outs = list(engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)))
    assert len([t for o in outs for t in o.token_ids]) == 8
    outs = list(engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, min_tokens=3)))
    ids = [t for o in outs for t in o.token_ids]
    assert end not in ids[:3] and len(ids) >= 3
    # kiln export to Kiln's format keeps the ids; --format hf writes them as a list
    from training.export import main as export_main

    assert export_main([str(path), "--out", str(tmp_path / "kiln")]) == 0
    assert load_model(tmp_path / "kiln").config.extra_eos_token_ids == (0,)
    assert export_main([str(tmp_path / "kiln"), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == [end, 0]
