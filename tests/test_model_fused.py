"""The fused serving forward (`Transformer._forward_fused`) against the plain one.

With the triton backend and no autograd, a forward over the KV cache runs the fused
add+norm, rope+cache-write and SwiGLU kernels. On the CPU they run in the Triton
interpreter: a chunked, padded prefill of rows of different lengths and then decode steps
must give the plain forward's logits and the same cache contents, for both model families.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cache_helpers import Sequences  # noqa: E402
from kernel_checks import assert_close, requires_cuda  # noqa: E402
from kernels import norm  # noqa: E402
from model.checkpoint import build_model  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.kv_cache import NULL_BLOCK, KVCache  # noqa: E402
from model.transformer import Transformer  # noqa: E402

FAMILIES = {
    "llama": dict(n_head=6, n_kv_head=2, d_model=96, d_ff=80),
    "gpt2": dict(n_head=4, n_kv_head=4, d_model=64, d_ff=128, norm="layernorm", positions="learned", mlp="gelu",
                 tie_embeddings=True, bias=True),
    "qwen3": dict(n_head=4, n_kv_head=2, d_model=64, d_ff=80, head_dim=32, qk_norm=True),  # head norms before rope
}


def tiny(family: str, device: str, dtype: torch.dtype) -> Transformer:
    config = ModelConfig(vocab_size=200, n_layer=2, max_seq_len=48, **FAMILIES[family])
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a dropped term shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return build_model(config, model.state_dict(), torch.device(device), dtype, attn_backend="triton")


def run(model: Transformer, fused: bool, steps, tokens, gemv: bool = False):
    """Prefill and decode on a fresh cache; returns each step's logits at the real positions and the cache."""
    model.fused_inference, model.fused_gemv = fused, gemv
    seqs = Sequences(KVCache(model.config, num_blocks=40, block_size=4, max_seq_len=48,
                             device=tokens.device, dtype=next(model.parameters()).dtype))
    rows = [seqs.allocate() for _ in range(tokens.shape[0])]
    outputs = []
    for num_new in steps:  # per row: tokens this step (0: the row sits out)
        live = [r for r, n in zip(rows, num_new) if n]
        counts = [n for n in num_new if n]
        batch = seqs.batch(live, counts)
        chunk = torch.zeros(len(live), max(counts), dtype=torch.long, device=tokens.device)
        for i, (r, n) in enumerate(zip(live, counts)):
            chunk[i, :n] = tokens[r, seqs.lengths[r]: seqs.lengths[r] + n]
        logits = model(chunk, kv_cache=seqs.kv, batch=batch)  # (B, T, V)
        outputs.append(torch.cat([logits[i, :n] for i, n in enumerate(counts)]))
        seqs.advance(live, counts)
    return outputs, seqs.kv


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_fused_forward_equals_the_plain_one(family):
    if not norm.available("cpu"):
        pytest.skip("needs triton and TRITON_INTERPRET=1 set before triton is imported")
    check(family, "cpu", torch.float32, 1e-4)


def check(family: str, device: str, dtype: torch.dtype, tol: float) -> None:
    model = tiny(family, device, dtype)
    tokens = torch.randint(0, 200, (3, 20), generator=torch.Generator().manual_seed(1)).to(device)
    # a padded prefill of three lengths, a second chunk for one row while the others decode, then decode
    steps = [[5, 9, 2], [1, 4, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1]]
    got, kv_got = run(model, True, steps, tokens)
    want, kv_want = run(model, False, steps, tokens)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, tol, tol, f"{family} {dtype} step {i} logits")
    real = torch.arange(kv_got.num_blocks, device=device) != NULL_BLOCK
    for name in ("k", "v"):
        assert_close(getattr(kv_got, name)[:, real], getattr(kv_want, name)[:, real], tol, tol, f"{family} {name} cache")


@torch.no_grad()
def test_gemv_decode_steps_equal_the_fused_forward(monkeypatch):
    """`fused_gemv`: steps of at most `kernels.gemv.FMA_MAX_ROWS` (4) tokens of a Llama-style model run norm +
    qkv, o, norm + gate/up and SwiGLU + down as `kernels.gemv` products (longer steps and GPT-2-style models
    keep `_forward_fused`), with the same logits and cache writes."""
    if not norm.available("cpu"):
        pytest.skip("needs triton and TRITON_INTERPRET=1 set before triton is imported")
    check_gemv(monkeypatch, "cpu", 1e-4)


@requires_cuda
@torch.no_grad()
def test_gemv_decode_steps_equal_the_fused_forward_on_gpu(monkeypatch):
    check_gemv(monkeypatch, "cuda", 1e-3)  # tf32 matmuls in both; fp32 everywhere else


def check_gemv(monkeypatch, device: str, tol: float) -> None:
    from kernels import gemv

    prologues = []
    real_launch = gemv._launch

    def spy(prologue, *args):
        prologues.append(prologue)
        return real_launch(prologue, *args)

    monkeypatch.setattr(gemv, "_launch", spy)
    tokens = torch.randint(0, 200, (3, 20), generator=torch.Generator().manual_seed(1)).to(device)
    # a 27-token padded prefill and a 6-token step (3 rows x 2): too many rows; then 3-row decode steps
    steps = [[5, 9, 2], [1, 2, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1]]
    for family in ("llama", "gpt2"):
        model = tiny(family, device, torch.float32)
        got, kv_got = run(model, True, steps, tokens, gemv=True)
        want, kv_want = run(model, True, steps, tokens)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, tol, tol, f"{family} step {i} logits")
        real = torch.arange(kv_got.num_blocks, device=device) != NULL_BLOCK  # padding's writes race in the null block
        for name in ("k", "v"):
            assert_close(getattr(kv_got, name)[:, real], getattr(kv_want, name)[:, real], tol, tol,
                         f"{family} {name} cache")
        if family == "llama":  # 3 steps x 2 layers x (norm + qkv, o, norm + gate/up, SwiGLU + down)
            assert sorted(prologues) == [gemv._PLAIN] * 6 + [gemv._RMSNORM] * 12 + [gemv._SILU_MUL] * 6, prologues
            prologues.clear()
    assert not prologues, "the GPT-2-style model took the gemv path"


def test_training_and_the_torch_backend_never_take_the_fused_path(monkeypatch):
    import model.transformer as transformer

    def boom(*args, **kwargs):
        raise AssertionError("fused path taken")

    monkeypatch.setattr(transformer.Transformer, "_forward_fused", boom)
    config = ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_kv_head=2, d_model=32, d_ff=32, max_seq_len=16)
    model = Transformer(config, attn_backend="torch")
    seqs = Sequences(KVCache(config, num_blocks=8, block_size=4, max_seq_len=16))
    seq = seqs.allocate()
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=seqs.kv, batch=seqs.batch([seq], [3]))
    loss = model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    loss.backward()


@requires_cuda
@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_fused_forward_equals_the_plain_one_on_gpu(family):
    check(family, "cuda", torch.float32, 1e-3)  # tf32 matmuls in both; fp32 everywhere else


@torch.no_grad()
def test_engine_on_the_triton_backend_equals_the_torch_backend(tokenizer_dir):
    """The GPU serving path minus the graph capture: an async-scheduled engine over the Triton backend
    (fused forward, decode kernel, prefill flash attention; all interpreted here) gives the torch-backend
    engine's greedy tokens through prefix caching, a chunked prefill and a preemption."""
    if not norm.available("cpu"):
        pytest.skip("needs triton and TRITON_INTERPRET=1 set before triton is imported")
    from model.engine import Engine, SamplingParams
    from model.tokenizer import load_tokenizer
    from test_paged_engine import QUESTIONS, SYSTEM, assert_pool_empty, run_all

    tokenizer = load_tokenizer(tokenizer_dir)
    config = ModelConfig(vocab_size=tokenizer.n_vocab, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96,
                         max_seq_len=64)
    torch.manual_seed(0)
    weights = Transformer(config).state_dict()
    for name, w in weights.items():  # sharper than the 0.02 init, so attention (and a rotation bug) shows
        if w.dim() > 1:
            w.mul_(6.0 if "qkv" in name else 3.0)
    prompts = [tokenizer.encode(SYSTEM + q) for q in QUESTIONS[:3]]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (12, 14, 12)]
    outputs = {}
    for backend in ("torch", "triton"):
        model = build_model(config, weights, torch.device("cpu"), torch.float32, attn_backend=backend)
        # 12 blocks of 4 (11 is the least a 40-token context allows): the sequences outgrow the pool
        # together, so one is preempted
        engine = Engine(model, tokenizer, max_batch_size=3, max_seq_len=40, block_size=4, num_blocks=12,
                        max_prefill_tokens=12, async_scheduling=True, native=False)
        requests = run_all(engine, prompts, params, stagger=1)
        outputs[backend] = [r.output_ids for r in requests]
        assert engine.num_preemptions > 0 and engine.pool.hit_tokens > 0
        assert_pool_empty(engine)
    assert outputs["triton"] == outputs["torch"]


def test_prefill_warm_up_tunes_every_length_pair_once(tokenizer_dir, monkeypatch):
    """The server's start-up warm-up (`Engine.warm_up_prefill`): on the Triton backend flash attention runs
    once per pair of query and key length buckets a prefill step can meet (queries up to the prefill chunk and
    no more than keys, keys up to the context: whole prompts, later chunks, prefix-cache hits; the kernel tunes
    per pair), then one short prompt runs through the model, leaving the engine idle with every block back in
    the pool; on the torch backend nothing."""
    if not norm.available("cpu"):
        pytest.skip("needs triton and TRITON_INTERPRET=1 set before triton is imported")
    import kernels.attention
    from model.engine import Engine
    from model.tokenizer import load_tokenizer
    from test_paged_engine import assert_pool_empty

    tokenizer = load_tokenizer(tokenizer_dir)
    config = ModelConfig(vocab_size=tokenizer.n_vocab, n_layer=1, n_head=4, n_kv_head=2, d_model=64, d_ff=96,
                         max_seq_len=128)
    weights = Transformer(config).state_dict()
    seen = []
    real = kernels.attention.flash_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape[2], k.shape[2], q.shape[1], k.shape[1], q.dtype))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(kernels.attention, "flash_attention", spy)
    # queries up to the prefill chunk (64), keys up to the context (100: its bucket, 65..128, tuned at 100)
    pairs = [(16, 16), (16, 32), (32, 32), (16, 64), (32, 64), (64, 64), (16, 100), (32, 100), (64, 100)]
    for backend, expected in (("triton", pairs), ("torch", [])):
        model = build_model(config, weights, torch.device("cpu"), torch.float32, attn_backend=backend)
        engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=100, block_size=8, num_blocks=40,
                        max_prefill_tokens=64, native=False)
        assert engine.warm_up_prefill() == expected
        assert not engine.has_work
        assert_pool_empty(engine)
    # the pairs with the model's heads and dtype, then the prompt's prefill
    assert seen == [(t, s, 4, 2, torch.float32) for t, s in pairs] + [(16, 16, 4, 2, torch.float32)]


def _launch_class(value, name: str, free: set[str]):
    """What Triton compiles a launch anew for, per argument: a tensor's dtype and whether its address is 16-byte
    aligned, an integer's class (1, a multiple of 16, other; 64-bit or not) unless the kernel does not specialize
    on it, a float's type only; the autotuning keys' values (the attention kernels' length buckets and group
    size); None and flags as they are. (Constexprs, passed by keyword, are compared as they are.)"""
    if name in free:
        return None
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, float):
        return float
    if isinstance(value, int) and not isinstance(value, bool) and name not in ("SEQ_BUCKET_Q", "SEQ_BUCKET_K",
                                                                                 "group_size"):
        return ("one" if value == 1 else "x16" if value % 16 == 0 else "other", abs(value) >= 2**31)
    return value


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_serving_after_the_warm_up_compiles_and_tunes_nothing_new(tokenizer_dir, monkeypatch, family):
    """On a GPU each Triton launch unlike any before it (another autotuning key, another specialization of an
    argument) compiles or tunes while every running stream waits: after `Engine.warm_up_prefill`, a staggered
    workload of prompts of all lengths (chunked, batched, decoding side by side, some sharing a prefix through
    the prefix cache) must launch nothing new. Recorded here on the interpreter, launch by launch."""
    if not norm.available("cpu"):
        pytest.skip("needs triton and TRITON_INTERPRET=1 set before triton is imported")
    import random

    from kernels import _utils
    from model.engine import Engine, SamplingParams
    from model.tokenizer import load_tokenizer

    seen: dict[tuple, str] = {}
    phase = ["warm-up"]
    real_getitem = _utils.TritonKernel.__getitem__

    def recording_getitem(self, grid):
        launch = real_getitem(self, grid)
        free = set(self.fn.kwargs.get("do_not_specialize") or ())

        def run(*args, **kwargs):
            classes = tuple((n, _launch_class(a, n, free)) for a, n in zip(args, self.fn.arg_names))
            key = (self.fn.fn.__name__, classes + tuple(kwargs.items()))
            seen.setdefault(key, phase[0])
            return launch(*args, **kwargs)

        return run

    monkeypatch.setattr(_utils.TritonKernel, "__getitem__", recording_getitem)
    tokenizer = load_tokenizer(tokenizer_dir)
    config = ModelConfig(vocab_size=tokenizer.n_vocab, n_layer=1, max_seq_len=64, **FAMILIES[family])
    model = build_model(config, Transformer(config).state_dict(), torch.device("cpu"), torch.float32,
                        attn_backend="triton")
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=64, block_size=8, num_blocks=60,
                    max_prefill_tokens=32, native=False)
    engine.warm_up_prefill()
    phase[0] = "serving"
    rng = random.Random(0)
    shared = [rng.randrange(tokenizer.n_vocab) for _ in range(24)]
    for i in range(10):
        ids = [rng.randrange(tokenizer.n_vocab) for _ in range(rng.randint(1, 50))]
        if i % 3 == 2:
            ids = shared + ids[:20]  # a prefix-cache hit: the prompt's rest attends over cached keys
        engine.add_request(ids, SamplingParams(max_tokens=rng.randint(1, 6), temperature=0.0, ignore_eos=True))
        for _ in range(rng.randint(0, 2)):
            engine.step()
    while engine.has_work:
        engine.step()
    assert engine.pool.hit_tokens > 0
    kernels_run = {k[0] for k in seen}
    assert {"attn_fwd_kernel", "_rope_cache_kernel", "_add_norm_kernel", "_decode_split_kernel"} <= kernels_run
    new = [k for k, when in seen.items() if when == "serving"]
    warm = {k[0]: dict(k[1]) for k, when in seen.items() if when == "warm-up"}
    assert not new, "launched first while serving: " + "; ".join(
        f"{name} {[(n, warm.get(name, {}).get(n), c) for n, c in args if warm.get(name, {}).get(n) != c]}"
        for name, args in new)
