"""Training on a CPU in the native module's kernels (model/native, through `model.cpu_training`'s torch custom
ops): causal self-attention (`causal_attention_lse`, `causal_attention_backward`; `native_causal_attention` with
autograd), its output, log-sum-exp and gradients against fp64 SDPA; the chunked loss's rows (`loss_rows_`)
against the torch ops; the model with them against the model without; `kiln train` using them, resuming bit
for bit.
"""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from model import cpu_training
from model.config import ModelConfig
from model.transformer import Transformer
from training.train import train

from test_native_decode import native_module  # noqa: F401 -- the fixture
from test_training_train import data_dir, deterministic, tiny_config  # noqa: F401 -- data_dir: a fixture


@pytest.fixture(scope="module")
def registered(native_module):  # noqa: F811
    assert cpu_training.use_native_module(native_module)
    return native_module


def reference(qkv: torch.Tensor, grad: torch.Tensor, H: int, Hkv: int):
    """fp64 SDPA on (B, T, H + 2 Hkv, D): (output (B, T, H, D), log-sum-exp (B, H, T), d qkv)."""
    qkv = qkv.detach().double().requires_grad_()
    q, k, v = (x.transpose(1, 2) for x in (qkv[:, :, :H], qkv[:, :, H:H + Hkv], qkv[:, :, H + Hkv:]))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
    out.transpose(1, 2).backward(grad.double())
    T, D = q.shape[2], q.shape[3]
    scores = (q @ k.repeat_interleave(H // Hkv, dim=1).transpose(-1, -2)) * D ** -0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    return out.transpose(1, 2).detach(), torch.logsumexp(scores, dim=-1).detach(), qkv.grad


def native(qkv: torch.Tensor, grad: torch.Tensor, H: int, Hkv: int):
    qkv = qkv.detach().requires_grad_()
    out = cpu_training.native_causal_attention(qkv[:, :, :H], qkv[:, :, H:H + Hkv], qkv[:, :, H + Hkv:])
    out.backward(grad)
    return out.detach(), qkv.grad


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str, scale: float | None = None) -> None:
    """|got - want| <= rel * scale everywhere; scale: want's largest magnitude unless given."""
    err = (got.double() - want).abs()
    scale = want.abs().max().item() if scale is None else scale
    assert err.max().item() <= rel * scale, (f"{what}: max abs error {err.max().item():.3e} (mean "
                                             f"{err.mean().item():.3e}) against a largest value of {scale:.3e}")


SHAPES = [
    (1, 1, 4, 1, 16),  # one token
    (2, 17, 4, 1, 16),  # GQA 4:1
    (1, 33, 6, 2, 32),  # GQA 3:1
    (2, 130, 3, 3, 32),  # MHA: two blocks of 128 query rows
    (1, 300, 4, 2, 64),  # keys in two chunks of 256, five query blocks
]


@pytest.mark.parametrize("B, T, H, Hkv, D", SHAPES)
def test_output_lse_and_gradients_match_fp64(registered, B, T, H, Hkv, D):
    """fp32 q, k and v as strided views of one qkv tensor (as the model passes them); large logits (x 3) so
    that the softmax is peaked."""
    g = torch.Generator().manual_seed(T * 7 + H)
    qkv = torch.randn(B, T, H + 2 * Hkv, D, generator=g) * 3
    grad = torch.randn(B, T, H, D, generator=g)
    want_out, want_lse, want_grad = reference(qkv, grad, H, Hkv)
    out, lse = registered.causal_attention_lse(qkv[:, :, :H], qkv[:, :, H:H + Hkv], qkv[:, :, H + Hkv:], D ** -0.5)
    assert out.shape == (B, T, H, D) and lse.shape == (B, H, T) and lse.dtype == torch.float32
    assert_close(out, want_out, 1e-5, "output")
    assert_close(lse, want_lse, 1e-6, "log-sum-exp")
    out, got_grad = native(qkv, grad, H, Hkv)
    assert out.dtype == torch.float32
    assert_close(out, want_out, 1e-5, "output through the op")
    for name, part in (("dq", slice(0, H)), ("dk", slice(H, H + Hkv)), ("dv", slice(H + Hkv, None))):
        # (one token: dq is 0 exactly, and fp32 rounding of o against v is what is left)
        assert_close(got_grad[:, :, part], want_grad[:, :, part], 1e-5, name, want_grad.abs().max().item())


@pytest.fixture(scope="module")
def bf16_ready(registered):
    if not registered.attention_bf16_ready():
        pytest.skip("this torch or CPU has no bf16 micro-kernel")


def sdpa_bf16(qkv: torch.Tensor, grad: torch.Tensor, H: int, Hkv: int):
    """torch's SDPA on bf16 (B, T, H + 2 Hkv, D): (output (B, T, H, D), d qkv), both bf16."""
    qkv = qkv.detach().requires_grad_()
    y = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (qkv[:, :, :H], qkv[:, :, H:H + Hkv],
                                                                       qkv[:, :, H + Hkv:])),
                                       is_causal=True, enable_gqa=True).transpose(1, 2)
    y.backward(grad)
    return y.detach(), qkv.grad


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want).abs().max().item()


@pytest.mark.parametrize("B, T, H, Hkv, D", SHAPES)
def test_bf16_inputs_multiply_in_bf16(registered, bf16_ready, B, T, H, Hkv, D):
    """bf16 q, k, v (bf16 autocast) go through bf16 products with fp32 sums: bf16 results as close to fp64 on
    the same inputs as bf16 allows (errors of a few 1e-3 of the largest value, what rounding the results to bf16
    costs), no farther than SDPA's in bf16; the log-sum-exp (fp32, from exact products of bf16 numbers) to fp32's
    precision."""
    g = torch.Generator().manual_seed(T * 7 + H)
    qkv = (torch.randn(B, T, H + 2 * Hkv, D, generator=g) * 3).bfloat16()
    grad = torch.randn(B, T, H, D, generator=g).bfloat16()
    want_out, want_lse, want_grad = reference(qkv, grad, H, Hkv)
    q, k, v = qkv[:, :, :H], qkv[:, :, H:H + Hkv], qkv[:, :, H + Hkv:]
    out, lse = registered.causal_attention_lse(q, k, v, D ** -0.5)
    dq, dk, dv = registered.causal_attention_backward(q, k, v, out, grad, lse, D ** -0.5)
    assert out.dtype == dq.dtype == dk.dtype == dv.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert_close(out, want_out, 1.2e-2, "output")
    assert_close(lse, want_lse, 1e-6, "log-sum-exp")
    got_grad = torch.cat([dq, dk, dv], dim=2)
    for name, part in (("dq", slice(0, H)), ("dk", slice(H, H + Hkv)), ("dv", slice(H + Hkv, None))):
        assert_close(got_grad[:, :, part], want_grad[:, :, part], 1.2e-2, name, want_grad.abs().max().item())
    sdpa_out, sdpa_grad = sdpa_bf16(qkv, grad, H, Hkv)
    assert max_error(out, want_out) <= 1.25 * max_error(sdpa_out, want_out) + 1e-6
    assert max_error(got_grad, want_grad) <= 1.25 * max_error(sdpa_grad, want_grad) + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 3])
def test_one_row_and_kv_head_is_split_over_the_threads(registered, threads, dtype):
    """One (row, kv head) task and several threads: its query blocks are dealt out to pieces whose key and
    value gradients are summed at the end; the same gradients as one thread doing it all (fp32, and bf16
    products)."""
    if dtype == torch.bfloat16 and not registered.attention_bf16_ready():
        pytest.skip("this torch or CPU has no bf16 micro-kernel")
    B, T, H, Hkv, D = 1, 200, 2, 1, 32  # 64 positions x 2 heads per block: 4 blocks
    g = torch.Generator().manual_seed(3)
    qkv = (torch.randn(B, T, H + 2 * Hkv, D, generator=g) * 2).to(dtype)
    grad = torch.randn(B, T, H, D, generator=g).to(dtype)
    _, _, want = reference(qkv, grad, H, Hkv)
    q, k, v = qkv[:, :, :H], qkv[:, :, H:H + Hkv], qkv[:, :, H + Hkv:]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, lse = registered.causal_attention_lse(q, k, v, D ** -0.5)
        got = torch.cat(registered.causal_attention_backward(q, k, v, out, grad, lse, D ** -0.5), dim=2)
    finally:
        torch.set_num_threads(saved)
    assert got.dtype == dtype
    assert_close(got, want, 1e-5 if dtype == torch.float32 else 1e-2, f"gradient on {threads} threads")


@pytest.mark.parametrize("bf16_products", [False, True])
def test_the_op_under_bf16_autocast(registered, bf16_products, monkeypatch):
    """What the op hands the native functions for bf16 inputs: bf16 where the module's bf16 micro-kernel runs
    (`_bf16_products`), else fp32 (widened; the results rounded back); bf16 results either way, differentiable,
    close to fp64. Mixed dtypes (autocast can leave q and k fp32 beside a bf16 v) count as bf16."""
    if bf16_products and not registered.attention_bf16_ready():
        pytest.skip("this torch or CPU has no bf16 micro-kernel")
    monkeypatch.setattr(cpu_training, "_bf16_products", bf16_products)
    seen = []
    lse_fn, backward_fn = registered.causal_attention_lse, registered.causal_attention_backward
    monkeypatch.setattr(cpu_training, "_native_module", type("Spy", (), {
        "causal_attention_lse": staticmethod(lambda *a: seen.append({x.dtype for x in a[:3]}) or lse_fn(*a)),
        "causal_attention_backward": staticmethod(lambda *a: seen.append({x.dtype for x in a[:5]}) or
                                                   backward_fn(*a))}))
    B, T, H, Hkv, D = 2, 70, 4, 2, 32
    g = torch.Generator().manual_seed(1)
    qkv = (torch.randn(B, T, H + 2 * Hkv, D, generator=g) * 2).bfloat16()
    grad = torch.randn(B, T, H, D, generator=g).bfloat16()
    want_out, _, want_grad = reference(qkv, grad, H, Hkv)
    out, got_grad = native(qkv, grad, H, Hkv)
    want_dtype = torch.bfloat16 if bf16_products else torch.float32
    assert seen == [{want_dtype}, {want_dtype}]
    assert out.dtype == got_grad.dtype == torch.bfloat16
    assert_close(out, want_out, 1.2e-2, "output")
    assert_close(got_grad, want_grad, 1.2e-2, "gradient")
    if not bf16_products:  # fp32 math on the widened inputs: no farther from fp64 than SDPA in bf16
        assert max_error(got_grad, want_grad) <= max_error(sdpa_bf16(qkv, grad, H, Hkv)[1], want_grad)
    seen.clear()
    q = qkv[:, :, :H].float().requires_grad_()
    mixed = cpu_training.native_causal_attention(q, qkv[:, :, H:H + Hkv].float(), qkv[:, :, H + Hkv:])
    mixed.backward(grad.float())
    assert seen == [{want_dtype}, {want_dtype}] and mixed.dtype == q.grad.dtype == torch.float32
    assert_close(mixed, want_out, 1.2e-2, "output of mixed inputs")


LLAMA = ModelConfig(vocab_size=320, n_layer=2, n_head=6, n_kv_head=2, d_model=96, d_ff=128, max_seq_len=80)
QWEN3 = ModelConfig(vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96, max_seq_len=80,
                    head_dim=32, qk_norm=True, tie_embeddings=True)
GPT2 = ModelConfig(vocab_size=320, n_layer=2, n_head=4, n_kv_head=4, d_model=64, d_ff=256, max_seq_len=80,
                   norm="layernorm", positions="learned", mlp="gelu", tie_embeddings=True, bias=True)


def loss_and_grads(model, tokens, targets, compiled=False):
    model.zero_grad(set_to_none=True)
    run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
    loss = run(tokens, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("config", [LLAMA, QWEN3, GPT2], ids=["llama", "qwen3", "gpt2"])
def test_the_model_trains_the_same_through_it(registered, config, monkeypatch):
    """A training forward and backward with `use_native_kernels` against the same weights through SDPA and the
    torch loss rows: the same loss and gradients (fp32); torch.compile captures it in one graph (fullgraph) with
    the same result; both native functions really run (counted), and not at all without `use_native_kernels`."""
    torch.manual_seed(0)
    plain = Transformer(config, attn_backend="torch")
    fast = Transformer(config, attn_backend="torch")
    fast.load_state_dict(plain.state_dict())
    assert fast.use_native_kernels(registered) and fast.native_kernels and not plain.native_kernels
    calls = []
    lse, rows = registered.causal_attention_lse, registered.loss_rows_
    monkeypatch.setattr(cpu_training, "_native_module", type("Spy", (), {
        "causal_attention_lse": staticmethod(lambda *a: calls.append("attention") or lse(*a)),
        "causal_attention_backward": registered.causal_attention_backward,
        "loss_rows_": staticmethod(lambda *a: calls.append("loss") or rows(*a))}))
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, config.vocab_size, (3, 77), generator=g)
    targets = torch.randint(0, config.vocab_size, (3, 77), generator=g)
    want_loss, want = loss_and_grads(plain, tokens, targets)
    assert calls == []
    for compiled in (False, True):
        loss, got = loss_and_grads(fast, tokens, targets, compiled)
        assert set(calls) == {"attention", "loss"}, calls
        assert torch.allclose(loss, want_loss, rtol=1e-6, atol=1e-6), (loss, want_loss)
        for name, grad in got.items():
            assert_close(grad, want[name].double(), 2e-5, name)
        calls.clear()
    with torch.no_grad():  # evaluation (no autograd) takes the native forward as well
        assert torch.allclose(fast(tokens, targets), want_loss, rtol=1e-6, atol=1e-6)
        assert set(calls) == {"attention", "loss"}, calls


@pytest.mark.parametrize("config", [LLAMA, QWEN3, GPT2], ids=["llama", "qwen3", "gpt2"])
def test_the_model_under_bf16_autocast(registered, config):
    """Training under bf16 autocast (bf16 attention products where they pay here): the loss and every gradient
    as close to the fp32 model's as the same model through SDPA in bf16 gets (relative norms, 1.5x slack)."""
    torch.manual_seed(0)
    plain = Transformer(config, attn_backend="torch")
    fast = Transformer(config, attn_backend="torch")
    fast.load_state_dict(plain.state_dict())
    assert fast.use_native_kernels(registered)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, config.vocab_size, (3, 77), generator=g)
    targets = torch.randint(0, config.vocab_size, (3, 77), generator=g)
    want_loss, want = loss_and_grads(plain, tokens, targets)  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sdpa_loss, sdpa = loss_and_grads(plain, tokens, targets)
        loss, got = loss_and_grads(fast, tokens, targets)
    assert abs(loss.item() - want_loss.item()) <= 1.5 * abs(sdpa_loss.item() - want_loss.item()) + 1e-4

    def distance(grads: dict[str, torch.Tensor]) -> float:
        return max(((grads[n].double() - w).norm() / w.norm()).item() for n, w in want.items())

    assert distance(got) <= 1.5 * distance(sdpa), (distance(got), distance(sdpa))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("need_grad", [True, False])
def test_loss_rows_equal_the_torch_ops(registered, dtype, need_grad):
    """A chunk's rows (losses; the logits' gradient written over them) against `chunk_rows_torch`, with ignored
    rows (their loss and gradient 0), peaked and flat rows, a vocabulary that is no multiple of the vector width;
    rows taken as a strided view (the row stride is read)."""
    from kernels.cross_entropy import chunk_rows_torch

    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(37, 1000, generator=g) * torch.linspace(0.1, 12, 37)[:, None]).to(dtype)
    wide = torch.zeros(37, 1100, dtype=dtype)
    wide[:, :1000] = logits
    targets = torch.randint(0, 1000, (37,), generator=g)
    targets[[3, 20]] = -100
    row_scale = (targets != -100).float() / 35
    want_logits = logits.clone()
    want = chunk_rows_torch(want_logits, targets, -100, row_scale, need_grad)
    got_logits = wide[:, :1000]
    got = registered.loss_rows_(got_logits, targets, -100, row_scale, need_grad)
    assert got.dtype == torch.float32 and got[3] == got[20] == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if need_grad:  # the same fp32 values, then one rounding to the logits' dtype
        torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-7 if dtype == torch.float32 else 4e-6)
        assert (got_logits[3] == 0).all() and (wide[:, 1000:] == 0).all()
    else:
        assert torch.equal(got_logits, logits)


def test_loss_rows_reject_bad_input(registered):
    logits, scale = torch.zeros(2, 8), torch.ones(2)
    for args, message in [((logits, torch.tensor([0, 8]), -100, scale), "target 8 of row 1 is out of range"),
                          ((logits.half(), torch.tensor([0, 1]), -100, scale), "fp32 or bf16"),
                          ((logits, torch.tensor([0, 1]).int(), -100, scale), "int64"),
                          ((logits.t(), torch.tensor([0, 1]), -100, scale), "contiguous rows")]:
        with pytest.raises(RuntimeError, match=message):
            registered.loss_rows_(*args, True)


def test_chunked_loss_with_native_rows_equals_the_torch_rows(registered):
    """`linear_cross_entropy_torch(rows=native_loss_rows)`: the loss and both gradients equal the torch ops'
    (fp32 and bf16 inputs, several chunks, mean with ignored rows), eager and compiled in one graph; fp16
    logits fall back to the torch ops."""
    from kernels.cross_entropy import linear_cross_entropy_torch

    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        hidden = torch.randn(300, 48, generator=g).to(dtype)
        weight = (torch.randn(520, 48, generator=g) * 0.3).to(dtype)
        targets = torch.randint(0, 520, (300,), generator=g)
        targets[::7] = -100
        results = []
        for rows, compiled in ((None, False), (cpu_training.native_loss_rows, False),
                               (cpu_training.native_loss_rows, True)):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()

            def run(h, w, rows=rows):
                return linear_cross_entropy_torch(h, w, targets, chunk_rows=64, rows=rows)

            loss = (torch.compile(run, backend="aot_eager", fullgraph=True) if compiled else run)(h, w)
            loss.backward()
            results.append((loss.detach(), h.grad, w.grad))
        for got in results[1:]:
            for a, b in zip(got, results[0]):
                tol = 1e-6 if dtype == torch.float32 else 1e-2
                torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_without_the_module_nothing_changes(monkeypatch):
    model = Transformer(LLAMA, attn_backend="torch")
    assert not model.use_native_kernels(None) and not model.native_kernels
    assert not model.use_native_kernels(object())  # a module built without the fp32 micro-kernel
    monkeypatch.setattr(cpu_training, "_native_module", None)
    with pytest.raises(RuntimeError, match="use_native_kernels"):
        cpu_training.native_causal_attention(torch.zeros(1, 2, 2, 16), torch.zeros(1, 2, 1, 16),
                                          torch.zeros(1, 2, 1, 16))


def test_backward_rejects_bad_input(registered):
    q, k = torch.zeros(1, 8, 4, 16), torch.zeros(1, 8, 2, 16)
    lse = torch.zeros(1, 4, 8)
    for args, message in [((q, k, k, q, q, torch.zeros(1, 4, 7)), r"lse must be \(B, H, T\)"),
                          ((q, k, k[:, :4], q, q, lse), r"\(B, T, Hkv, D\)"),
                          ((q, torch.zeros(1, 8, 3, 16), torch.zeros(1, 8, 3, 16), q, q, lse), "multiple of Hkv"),
                          ((q, k, k, q[:, :4], q, lse), "shaped like q"),
                          ((q.double(), k, k, q, q, lse), "fp32"),
                          ((q.bfloat16(), k, k, q, q, lse), "of one dtype"),
                          ((q[..., :15].bfloat16(), k[..., :15].bfloat16(), k[..., :15].bfloat16(),
                            q[..., :15].bfloat16(), q[..., :15].bfloat16(), lse), "even head dim")]:
        with pytest.raises(RuntimeError, match=message):
            registered.causal_attention_backward(*args, 0.25)


def test_kiln_train_uses_it_and_resumes_bit_for_bit(registered, data_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    """`kiln train` on a CPU (attn_backend=auto) runs the native attention and says so; its losses follow the
    SDPA run's (the same arithmetic up to fp32 rounding); stopped and resumed it repeats itself exactly."""
    from model import native as native_build

    monkeypatch.delenv(native_build.DISABLE_ENV, raising=False)
    knobs = dict(max_steps=6, precision="fp32", checkpoint_interval=3, eval_interval=3)
    whole = train(tiny_config(data_dir, tmp_path / "whole", **knobs), progress=False)
    assert "; attention and loss in Kiln's native kernels; steps 0..6" in capsys.readouterr().err
    sdpa = train(tiny_config(data_dir, tmp_path / "sdpa", attn_backend="torch", **knobs), progress=False)
    assert "attention in" not in capsys.readouterr().err
    for a, b in zip(whole.metrics, sdpa.metrics):
        assert abs(a["loss"] - b["loss"]) < 1e-3, (a["loss"], b["loss"])

    def interrupt(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the loop finishes step 3 and saves

    first = train(tiny_config(data_dir, tmp_path / "cut", **knobs), progress=False, on_step=interrupt)
    assert first.interrupted and first.step == 3
    second = train(tiny_config(data_dir, tmp_path / "cut", **knobs), resume=True, progress=False)
    assert deterministic(first.metrics + second.metrics) == deterministic(whole.metrics)


def test_kiln_train_in_bf16_says_where_attention_multiplies_in_bf16(registered, data_dir, tmp_path, monkeypatch,
                                                                    capsys):  # noqa: F811
    """precision=bf16 on a CPU: the start line says the attention's products are bf16 where the module's bf16
    micro-kernel runs (not in fp32 runs); the loss follows the fp32 run's."""
    from model import native as native_build

    monkeypatch.delenv(native_build.DISABLE_ENV, raising=False)
    runs = {}
    for precision in ("bf16", "fp32"):
        runs[precision] = train(tiny_config(data_dir, tmp_path / precision, max_steps=3, precision=precision,
                                            eval_interval=0, checkpoint_interval=0), progress=False)
        err = capsys.readouterr().err
        says = "; attention and loss in Kiln's native kernels (attention's products in bf16)" in err
        assert says == (precision == "bf16" and registered.attention_bf16_ready()), err
    for a, b in zip(runs["bf16"].metrics, runs["fp32"].metrics):
        assert abs(a["loss"] - b["loss"]) < 2e-2, (a["loss"], b["loss"])


def test_kiln_train_says_when_the_native_kernels_are_missing(data_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Without a C++ compiler (the build fails) training goes on with SDPA, and the start line says why."""
    from model import native as native_build

    monkeypatch.delenv(native_build.DISABLE_ENV, raising=False)
    monkeypatch.setattr(native_build, "load", lambda build=True: None)
    monkeypatch.setattr(native_build, "error", lambda: "CalledProcessError: no c++ compiler")
    result = train(tiny_config(data_dir, tmp_path / "run", max_steps=2, precision="fp32", eval_interval=0),
                   progress=False)
    assert math.isfinite(result.metrics[-1]["loss"])
    err = capsys.readouterr().err
    assert "building Kiln's native CPU kernels" in err
    assert ("; attention in torch SDPA (the native kernels are unavailable: CalledProcessError: no c++ compiler); "
            "steps 0..2") in err
