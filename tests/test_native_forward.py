"""The CPU forward's fused elementwise steps (model/native: add_norm, rope_, silu_mul) against torch.

A prompt's or a scoring window's forward on a CPU runs them when the engine has the native module
(`Transformer.cpu_ops`); they must give the plain forward's numbers, with and without the KV cache,
for Llama-style and GPT-2-style models, and never run where autograd is recording.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import cpu_packing, fast_decode
from model.cli import load_engine
from model.config import ModelConfig
from model.engine import Engine, SamplingParams
from model.kv_cache import NULL_BLOCK, KVCache
from model.transformer import RMSNorm, Transformer, apply_rope, rope_tables

from cache_helpers import Sequences
from test_native_decode import native_module  # noqa: F401 -- the fixture

NONE = torch.empty(0)

LLAMA = ModelConfig(vocab_size=300, n_layer=2, n_head=6, n_kv_head=2, d_model=96, d_ff=80, max_seq_len=64)
QWEN3 = ModelConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=80, max_seq_len=64,
                    head_dim=32, qk_norm=True, tie_embeddings=True)
GPT2 = ModelConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=4, d_model=64, d_ff=256, max_seq_len=64,
                   norm="layernorm", positions="learned", mlp="gelu", tie_embeddings=True, bias=True)


def close(got: torch.Tensor, want: torch.Tensor, atol: float = 2e-5) -> None:
    diff = (got - want).abs()
    assert diff.max().item() <= atol + 1e-5 * want.abs().max().item(), (
        f"max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}")


@pytest.mark.parametrize("rms", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_norm(native_module, rms, with_residual):
    g = torch.Generator().manual_seed(0)
    h, residual = (torch.randn(37, 96, generator=g) * 3 for _ in range(2))
    gain, shift = torch.randn(96, generator=g), torch.randn(96, generator=g)
    stream = h + residual if with_residual else h.clone()
    if rms:
        norm = RMSNorm(96, 1e-5)
        norm.weight.data.copy_(gain)
        want = norm(stream)
    else:
        want = F.layer_norm(stream, (96,), gain, shift, 1e-5)
    got = native_module.add_norm(h, residual if with_residual else NONE, gain, NONE if rms else shift, rms, 1e-5)
    close(got, want)
    assert torch.equal(h, stream)  # h now holds the residual stream


def test_rope_in_place(native_module):
    config = ModelConfig(vocab_size=10, n_layer=1, n_head=4, n_kv_head=2, d_model=64, d_ff=8, max_seq_len=40)
    cos, sin = rope_tables(config)
    H, Hkv, D = 4, 2, 16
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(3 * 7, (H + 2 * Hkv) * D, generator=g)
    positions = torch.randint(0, 40, (3 * 7,), generator=g)
    heads = qkv[:, : (H + Hkv) * D].view(-1, 1, H + Hkv, D)
    want = torch.cat([apply_rope(heads, cos[positions][:, None, None], sin[positions][:, None, None])
                      .reshape(-1, (H + Hkv) * D), qkv[:, (H + Hkv) * D:]], dim=1)
    native_module.rope_(qkv, positions, cos, sin, H + Hkv, D)
    close(qkv, want)
    assert torch.equal(qkv[:, (H + Hkv) * D:], want[:, (H + Hkv) * D:])  # values untouched
    with pytest.raises(RuntimeError, match="position out of range"):
        native_module.rope_(qkv, torch.full((21,), 40), cos, sin, H + Hkv, D)


def test_silu_mul(native_module):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 2 * 50, generator=g) * 4
    x[0, :6] = torch.tensor([0.0, -0.0, 88.0, -88.0, 1e4, -1e4])  # 0, saturation both ways, exp underflow
    gate, up = x.split(50, dim=1)
    close(native_module.silu_mul(x), F.silu(gate) * up, atol=1e-6)
    with pytest.raises(RuntimeError, match="even width"):
        native_module.silu_mul(torch.zeros(2, 5))
    with pytest.raises(RuntimeError, match="contiguous 2-D fp32"):
        native_module.silu_mul(x.t())


@pytest.mark.parametrize("config", [LLAMA, QWEN3, GPT2], ids=["llama", "qwen3", "gpt2"])
def test_cpu_forward_equals_the_plain_forward(native_module, config):
    """Whole sequences (all logits, and the last position only) and prefill + decode over the paged cache."""
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # gains other than ones (and different per norm), so a swapped or skipped one shows
                p.normal_(1.0, 0.5)
    tokens = torch.randint(0, config.vocab_size, (3, 19), generator=torch.Generator().manual_seed(3))
    index = torch.tensor([18, 0, 7])
    results = []
    for ops in (None, native_module):
        model.cpu_ops = ops
        with torch.inference_mode():
            out = [model(tokens), model(tokens, output_index=index), model(tokens, return_hidden=True)]
            cache = Sequences(KVCache(config, num_blocks=20, block_size=4, max_seq_len=32))
            a, b = cache.allocate(), cache.allocate()
            for slot, n in ((a, 9), (b, 5)):  # prompts of different lengths
                out.append(model(tokens[slot, :n][None], kv_cache=cache.kv, batch=cache.batch([slot], [n])))
                cache.advance([slot], [n])
            for step in range(3):  # decode steps over two rows at different positions
                new = torch.stack([tokens[0, 9 + step: 10 + step], tokens[1, 5 + step: 6 + step]])
                out.append(model(new, kv_cache=cache.kv, batch=cache.batch([a, b], [1, 1])))
                cache.advance([a, b], [1, 1])
            # chunks of two prompts in one forward: 4 and 2 new tokens (the second row padded) at 12 and 8
            new = torch.stack([tokens[0, 12:16], torch.cat([tokens[1, 8:10], tokens[1, :2]])])
            hidden = model(new, kv_cache=cache.kv, batch=cache.batch([a, b], [4, 2]), return_hidden=True)
            out += [hidden[0], hidden[1, :2]]
            cache.advance([a, b], [4, 2])
            out.append(cache.kv.k[:, NULL_BLOCK + 1:].clone())  # (padded tokens write their keys to the null block)
        results.append(out)
    for got, want in zip(results[1], results[0]):
        close(got, want)


def _attention_reference(q, k, v, starts, lengths):
    """Query t of row b (at position starts[b] + t) over keys 0..min(starts[b] + t, lengths[b] - 1), in fp64."""
    B, T, H, _ = q.shape
    S = k.shape[1]
    limit = torch.minimum(starts[:, None] + torch.arange(T) + 1, lengths[:, None])  # (B, T) keys seen
    mask = torch.arange(S)[None, None, :] < limit[:, :, None]  # (B, T, S)
    q, k, v = (x.transpose(1, 2).double() for x in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=H != k.shape[1])
    return y.transpose(1, 2).float()


@pytest.mark.parametrize("B, T, H, Hkv, D, S, starts, lengths", [
    (1, 17, 4, 1, 16, 17, [0], [17]),  # a prompt, GQA 4:1
    (2, 33, 6, 2, 32, 40, [0, 7], [33, 40]),  # rows at different positions (a chunk after a cached prefix)
    (2, 5, 6, 2, 32, 40, [3, 38], [8, 40]),  # padded queries (the first row's past its length) see every key
    (1, 1, 3, 1, 16, 5, [4], [5]),  # one query
    (3, 70, 9, 3, 64, 700, [630, 0, 100], [700, 70, 170]),  # GQA 3:1; keys in two chunks of 512
    (2, 600, 2, 2, 64, 1200, [0, 600], [600, 1200]),  # MHA; queries in many tasks, keys in three chunks
])
def test_causal_attention(native_module, B, T, H, Hkv, D, S, starts, lengths):
    """The native prompt attention against SDPA in fp64, reading q, k and v as strided views of one tensor
    (as the CPU forward passes the qkv product's heads)."""
    g = torch.Generator().manual_seed(B * T + S)
    qkv = torch.randn(B, S, H + 2 * Hkv, D, generator=g) * 2
    q, k, v = qkv[:, :T, :H], qkv[:, :, H:H + Hkv], qkv[:, :, H + Hkv:]
    starts, lengths = torch.tensor(starts), torch.tensor(lengths)
    got = native_module.causal_attention(q, k, v, starts, lengths, D ** -0.5)
    assert got.shape == (B, T, H, D) and got.is_contiguous()
    close(got, _attention_reference(q, k, v, starts, lengths), atol=1e-5)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def test_causal_attention_compiles_a_bounded_set_of_products(native_module):
    """torch keeps a compiled micro-kernel per product shape for each thread's life: prompts of every length
    must reuse a few shapes, or a long-running server grows without end (it did, ~10 MB per 200 new lengths
    here, before the query rows and key chunks were padded to fixed sizes)."""
    rng = torch.Generator().manual_seed(0)
    one = torch.zeros(1, dtype=torch.long)
    marks = []
    for i, T in enumerate(torch.randint(1, 700, (400,), generator=rng).tolist()):
        qkv = torch.randn(1, T, 3, 64, generator=rng)
        native_module.causal_attention(qkv[:, :, :1], qkv[:, :, 1:2], qkv[:, :, 2:], one, torch.tensor([T]), 0.125)
        if i in (199, 399):
            marks.append(_rss_mb())
    assert marks[1] - marks[0] < 4, f"memory grew by {marks[1] - marks[0]:.1f} MB over 200 more prompt lengths"


def test_causal_attention_rejects_bad_input(native_module):
    q, k = torch.zeros(1, 4, 4, 16), torch.zeros(1, 8, 2, 16)
    one, eight = torch.tensor([0]), torch.tensor([8])
    for args, message in [((q, k, k, one, torch.tensor([9])), "length <= 8"),
                          ((q, k, k, torch.tensor([-1]), eight), "start >= 0"),
                          ((q, torch.zeros(1, 8, 3, 16), torch.zeros(1, 8, 3, 16), one, eight), "multiple of Hkv"),
                          ((q, k, k[:, :4], one, eight), r"\(B, S, Hkv, D\)"),
                          ((q.double(), k, k, one, eight), "fp32"),
                          ((q, k, k, one.int(), eight), "int64")]:
        with pytest.raises(RuntimeError, match=message):
            native_module.causal_attention(*args, 0.25)


class _Refuses:
    def __getattr__(self, name):
        raise AssertionError(f"cpu_ops.{name} was used where it must not be")


def test_cpu_ops_stay_out_of_autograd_and_other_dtypes():
    """Training (grad enabled) and 16-bit models run the torch ops, whatever cpu_ops holds."""
    torch.manual_seed(0)
    model = Transformer(LLAMA)
    model.cpu_ops = _Refuses()
    tokens = torch.randint(0, LLAMA.vocab_size, (2, 9))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    assert model.embed.weight.grad is not None
    with torch.no_grad():
        model.to(torch.bfloat16)(tokens)


def test_engine_prompts_and_scores_through_the_cpu_ops(llama_dir, native_module, monkeypatch):
    """An engine with the native module: long prompts (past the native prefill) and scoring run the fused CPU
    forward, with the plain engine's greedy tokens and logprobs."""
    engine = load_engine(str(llama_dir), "cpu", max_batch_size=2, enable_prefix_caching=False, prefill_dtype="fp32")
    assert engine.model.cpu_ops is None  # the suite runs with KILN_NO_NATIVE=1
    engine._enable_native(native_module)
    assert engine.native_decode and engine.model.cpu_ops is native_module
    used = []
    real = native_module.add_norm

    class Counting:
        def __getattr__(self, name):
            return getattr(native_module, name)

        def add_norm(self, *args):
            used.append(1)
            return real(*args)

    engine.model.cpu_ops = Counting()
    monkeypatch.setattr(fast_decode, "NATIVE_PREFILL_MAX_TOKENS", 8)  # longer prompts run the forward
    monkeypatch.setattr(fast_decode, "NATIVE_PREFILL_MAX_TOKENS_PACKED", 8)
    prompt = engine.tokenizer.encode("the quick brown fox jumps over the lazy dog " * 3)
    assert 8 < len(prompt) < 50
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
    got = list(engine.generate(prompt, params))
    got_scores = engine.score([prompt])
    assert used
    engine.model.cpu_ops = None
    plain = Engine(engine.model, engine.tokenizer, max_batch_size=2, fast_decode=False, prefill_dtype="fp32",
                   enable_prefix_caching=False)
    want = list(plain.generate(prompt, params))
    want_scores = plain.score([prompt])
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert max(abs(a.logprob - b.logprob) for g, w in zip(got, want) for a, b in zip(g.logprobs, w.logprobs)) < 1e-4
    assert max(abs(a - b) for a, b in zip(got_scores[0].logprobs[1:], want_scores[0].logprobs[1:])) < 1e-4


@pytest.mark.parametrize("num_top", [0, 1, 5])
def test_token_logprobs(native_module, num_top):
    """The target's logprob and the top logprobs, read from logits in place, over the first `vocab_limit`
    columns (a strided view), against log_softmax + gather + topk."""
    g = torch.Generator().manual_seed(4)
    full = torch.randn(23, 1003, generator=g) * 5
    full[3, :40] = 30.0  # ties at the top: lower ids first
    full[4, 7] = 200.0  # one id takes (almost) all the mass
    logits = full[:, :1000]
    targets = torch.randint(0, 1000, (23,), generator=g)
    targets[4] = 7
    table = logits.log_softmax(-1)
    lp, top, ids = native_module.token_logprobs(logits, targets, 1000, num_top)
    close(lp, table.gather(-1, targets[:, None])[:, 0], atol=1e-5)
    assert top.shape == ids.shape == (23, num_top)
    if num_top:
        want_top, want_ids = table.topk(num_top, dim=-1)
        close(top, want_top, atol=1e-5)
        assert torch.equal(ids[:3], want_ids[:3]) and torch.equal(ids[5:], want_ids[5:])
        assert ids[3].tolist() == list(range(num_top))
        assert ids[4, 0] == 7 and abs(lp[4].item()) < 1e-6
    with pytest.raises(RuntimeError, match="target id out of range"):
        native_module.token_logprobs(logits, torch.full((23,), 1000), 1000, num_top)


def test_scoring_and_echo_logprobs_through_the_cpu_ops(llama_dir, native_module):
    """`chunked_logprobs` with the native op: scores and echo's prompt logprobs with their top ids equal the
    torch path's."""
    engine = load_engine(str(llama_dir), "cpu", max_batch_size=2, enable_prefix_caching=False, prefill_dtype="fp32")
    prompt = engine.tokenizer.encode("the quick brown fox jumps over the lazy dog")
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=True, logprobs=3)
    runs = []
    for ops in (None, native_module):
        engine.model.cpu_ops = ops
        out = list(engine.generate(prompt, params))
        runs.append((out[0].prompt_logprobs[1:], engine.score([prompt])[0].logprobs[1:]))
    (want_echo, want_scores), (got_echo, got_scores) = runs
    assert [(p.token_id, [i for i, _ in p.top]) for p in got_echo] == \
        [(p.token_id, [i for i, _ in p.top]) for p in want_echo]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(got_echo, want_echo)) < 1e-5
    assert max(abs(a - b) for a, b in zip(got_scores, want_scores)) < 1e-5


def _amx(native_module):
    if not (cpu_packing.amx_bf16() and native_module.amx_ready()):
        pytest.skip("no AMX tiles (or no bf16 micro-kernel in this torch) here")


@pytest.mark.parametrize("rows, k, outputs, bias", [(300, 96, 200, True), (129, 64, 128, False), (1, 32, 7, True)])
def test_amx_linear_has_fp32_precision(native_module, rows, k, outputs, bias):
    """Three bf16 parts of each activation times a bf16-exact weight: no further from fp64 than F.linear in fp32
    (row and output counts past one tile, and a last tile of outputs cut short); one part is bf16's error."""
    _amx(native_module)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(rows, k, generator=g)
    w = (torch.randn(outputs, k, generator=g) * 0.1).bfloat16().float()
    b = torch.randn(outputs, generator=g) if bias else None
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    scale = want.abs().max().item()
    fp32_err = (F.linear(x, w, b).double() - want).abs().max().item()
    packed = native_module.amx_pack(w)
    errs = [(native_module.amx_linear(x, packed, NONE if b is None else b, outputs, parts, NONE).double() - want)
            .abs().max().item() for parts in (1, 2, 3)]
    assert errs[2] <= 2 * fp32_err + 1e-7 * scale, (errs, fp32_err)
    assert errs[0] > 30 * errs[2], errs  # one part alone is a bf16 product: the parts are what make it exact
    # per-output scales (int8 layers): y = (x . w) * scale + bias
    s = torch.rand(outputs, generator=g) + 0.5
    want = F.linear(x.double(), w.double()) * s.double() + (0 if b is None else b.double())
    got = native_module.amx_linear(x, packed, NONE if b is None else b, outputs, 3, s)
    close(got, want.float(), atol=2 * fp32_err * 1.5 + 1e-7 * scale)
    with pytest.raises(RuntimeError, match="does not hold"):
        native_module.amx_linear(x, packed, NONE, outputs + 64, 3, NONE)


def test_amx_linears_route_only_exact_weights_and_stay_out_of_autograd(native_module):
    _amx(native_module)
    torch.manual_seed(0)
    model = Transformer(LLAMA).eval()
    plain = Transformer(LLAMA).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
        model.blocks[0].mlp.down.weight[0, 0] += 1e-4  # no longer a bf16 number: keeps the fp32 path
    plain.load_state_dict(model.state_dict())
    n = cpu_packing.amx_linears(model, native_module)
    assert n == 4 * LLAMA.n_layer + 1 - 1  # every block's four products and the LM head, less the one changed
    assert getattr(model.blocks[0].mlp.down, "_kiln_amx", None) is None
    assert cpu_packing.amx_linears(model, native_module) == n  # again: nothing new, the same count
    tokens = torch.randint(0, LLAMA.vocab_size, (2, 21), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        close(model(tokens), plain(tokens))
    loss = model(tokens[:, :-1], tokens[:, 1:])  # grad enabled: F.linear, so backward works
    loss.backward()
    assert model.blocks[1].attn.qkv.weight.grad is not None
    with torch.no_grad():  # a weight changed in place after packing: its layer takes the plain path
        model.blocks[1].attn.qkv.weight.mul_(0.5)
        plain.blocks[1].attn.qkv.weight.mul_(0.5)
    with torch.inference_mode():
        close(model(tokens), plain(tokens))
    # oneDNN packing after (another engine on the model) re-routes the forwards; routing again restores them
    qkv = model.blocks[0].attn.qkv
    cpu_packing.pack_linears(model)
    assert qkv.forward.__func__ is not cpu_packing._amx_forward
    assert cpu_packing.amx_linears(model, native_module) == n and qkv.forward.__func__ is cpu_packing._amx_forward


def test_amx_int8_layers(llama_dir, native_module):
    """An int8 model's layers on AMX: the int8 values as bf16, the row scales on the outputs; the same numbers
    as the int8 model's own (dequantizing) forward."""
    _amx(native_module)
    from model.quantize import Int8Linear

    engine = load_engine(str(llama_dir), "cpu", max_batch_size=2, quantization="int8", prefill_dtype="fp32")
    model = engine.model
    tokens = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        want = model(tokens)
        n = cpu_packing.amx_linears(model, native_module)
        assert n == sum(isinstance(m, Int8Linear) for m in model.modules()) == 4 * model.config.n_layer + 1
        close(model(tokens), want)


def test_engine_prompts_on_amx_equal_the_fp32_path(llama_dir, native_module, monkeypatch):
    """An engine with the native module on an AMX CPU: a bf16-exact model's prompt and scoring products run on
    the tiles, with the plain fp32 engine's tokens and logprobs."""
    _amx(native_module)
    engine = load_engine(str(llama_dir), "cpu", max_batch_size=2, enable_prefix_caching=False, prefill_dtype="fp32")
    with torch.no_grad():
        for p in engine.model.parameters():
            p.copy_(p.bfloat16().float())
    plain = Engine(engine.model, engine.tokenizer, max_batch_size=2, fast_decode=False, prefill_dtype="fp32",
                   enable_prefix_caching=False)
    monkeypatch.setattr(fast_decode, "NATIVE_PREFILL_MAX_TOKENS", 8)
    monkeypatch.setattr(fast_decode, "NATIVE_PREFILL_MAX_TOKENS_PACKED", 8)
    prompt = engine.tokenizer.encode("the quick brown fox jumps over the lazy dog " * 3)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=1, prompt_logprobs=True)
    want = list(plain.generate(prompt, params)), plain.score([prompt])[0].logprobs[1:]
    engine._enable_native(native_module)
    assert engine.amx_linears == 4 * engine.config.n_layer + 1 and "AMX" in engine.prefill_math
    got = list(engine.generate(prompt, params)), engine.score([prompt])[0].logprobs[1:]
    assert [o.token_ids for o in got[0]] == [o.token_ids for o in want[0]]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(got[0][0].prompt_logprobs[1:],
                                                          want[0][0].prompt_logprobs[1:])) < 1e-4
    assert max(abs(a - b) for a, b in zip(got[1], want[1])) < 1e-4
