"""--quantization int8 (model/quantize.py): int8 matrices with a scale per row, on the torch path and the
native decode step, and what the CLI and the server accept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.cli import load_engine
from model.engine import Engine, SamplingParams
from model.quantize import Int8Linear, pack_tiles, quantize_model, quantize_rows, unpack_tiles

from test_fast_decode import PROMPTS, assert_same_runs
from test_native_decode import avx2_module, native_module, scalar_module  # noqa: F401 -- fixtures

HELDOUT = Path(__file__).parent / "data" / "default_heldout.jsonl"


def test_rows_round_to_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(37, 50) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different scales
    w[5] = 0.0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert int(q.abs().max()) == 127 and not bool((q == -128).any())
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all()), float((err / scale[:, None]).max())
    assert bool((q[5] == 0).all()) and float(scale[5]) == 1.0  # an all-zero row stays zero, no NaN


@pytest.mark.parametrize("out_features", [1, 32, 45, 64])
def test_tiles_round_trip(out_features):
    w = torch.arange(out_features * 7, dtype=torch.float32).view(out_features, 7)
    tiles = pack_tiles(w, dtype=torch.int8 if out_features * 7 < 128 else torch.float32)
    assert tiles.shape == (-(-out_features // 32), 7, 32)
    assert torch.equal(unpack_tiles(tiles, out_features).float(), w)


@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_is_the_dequantized_matrix(bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 70, bias=bias)
    q = Int8Linear(linear)
    x = torch.randn(3, 5, 40)
    q_rows, scale = quantize_rows(linear.weight)
    dequantized = q_rows.float() * scale[:, None]
    torch.testing.assert_close(q.weight, dequantized, rtol=0, atol=0)
    torch.testing.assert_close(q(x), F.linear(x, dequantized, linear.bias), rtol=1e-6, atol=1e-6)
    # and close to the original layer: int8 rounding is at most half a step of each row's scale
    with torch.no_grad():
        assert float((q(x) - linear(x)).abs().max()) < 0.02


@pytest.mark.parametrize("fixture", ["llama_dir", "gpt2_dir"])
def test_quantized_model_stays_close_and_keeps_a_tied_embedding(fixture, request):
    path = str(request.getfixturevalue(fixture))
    full = load_engine(path, "cpu")
    quant = load_engine(path, "cpu", quantization="int8")
    model = quant.model
    linears = [m for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.up, b.mlp.down)] + [model.lm_head]
    assert all(isinstance(m, Int8Linear) for m in linears)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert torch.equal(model.embed.weight, full.model.embed.weight)  # lookups stay fp32, tied or not
    tokens = torch.tensor([full.tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        want = full.model(tokens).log_softmax(-1)
        got = quant.model(tokens).log_softmax(-1)
    assert float((got - want).abs().max()) < 0.05
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_quantization_needs_an_fp32_cpu_model(llama_dir):
    with pytest.raises(ValueError, match="fp32 models on the CPU, not bfloat16"):
        load_engine(str(llama_dir), "cpu", "bf16", quantization="int8")
    model = load_engine(str(llama_dir), "cpu").model
    with pytest.raises(ValueError, match="unknown quantization 'int4'; allowed: int8"):
        quantize_model(model, "int4")


@pytest.mark.parametrize("build", ["native", "avx2", "scalar"])
@pytest.mark.parametrize("fixture", ["llama_dir", "gpt2_dir"])
def test_native_step_reads_the_int8_matrices(fixture, build, request):
    """The native step on the int8 tiles gives the torch path's tokens and logprobs (the same
    dequantized weights), for batch 1 and rows joining and leaving, in each build's matrix loops
    (AVX-512, AVX2, plain); and it made no float copy."""
    module = request.getfixturevalue(f"{build}_module")
    # fp32 prompts on both sides (an int8 model's "auto" is a bf16 copy on AMX CPUs): the decode paths are compared
    engine = load_engine(str(request.getfixturevalue(fixture)), "cpu", max_batch_size=4, quantization="int8",
                         prefill_dtype="fp32")
    plan = engine._decode_plan
    assert plan.quantized and not plan.folded and plan.native_max_batch == 64
    plan.enable_native(module)
    assert engine.decode_path == "native (int8 matrices)"
    weights = plan._native_args[0]
    assert not any(w.dtype in (torch.float32, torch.bfloat16) and w.dim() == 3 for w in weights)  # no float tiles
    assert weights[2].data_ptr() == engine.model.blocks[0].attn.qkv.tiles.data_ptr()  # the module's own tiles
    assert_same_runs(engine, Engine(engine.model, engine.tokenizer, max_batch_size=4, fast_decode=False,
                                    prefill_dtype="fp32"))


def test_native_step_rejects_int8_matrices_without_scales(llama_dir, native_module):
    engine = load_engine(str(llama_dir), "cpu", max_batch_size=1, quantization="int8")
    plan = engine._decode_plan
    plan.enable_native(native_module)
    weights, dims, eps = plan._native_args
    cache = engine.cache
    table = torch.zeros(1, cache.max_blocks_per_seq, dtype=torch.long)
    args = (torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), table, cache.k, cache.v)
    with pytest.raises(RuntimeError, match="weight tensors"):
        native_module.decode_step(*args, weights[:-1], dims, eps)
    without_scales = weights[: len(weights) - (4 * len(engine.model.blocks) + 1)]
    with pytest.raises(RuntimeError, match="int8 followed by their scales"):
        native_module.decode_step(*args, without_scales, dims, eps)
    wrong = list(weights)
    wrong[-1] = wrong[-1][:-1].contiguous()
    with pytest.raises(RuntimeError, match="int8 row scales"):
        native_module.decode_step(*args, wrong, dims, eps)


def test_default_model_loses_almost_nothing_in_int8():
    """The shipped model's held-out loss in int8 is within 0.01 nats/token of fp32 (measured: +0.0006)."""
    from training.evaluate import evaluate_texts

    texts = [json.loads(line)["text"] for line in HELDOUT.read_text(encoding="utf-8").splitlines()][:3]
    full = evaluate_texts(load_engine(None, "cpu"), texts).as_dict()["loss"]
    quant_engine = load_engine(None, "cpu", quantization="int8")
    quant = evaluate_texts(quant_engine, texts).as_dict()["loss"]
    assert abs(quant - full) < 0.01, (full, quant)
    ids = quant_engine.tokenizer.encode("The function returns")
    text = "".join(o.text for o in quant_engine.generate(ids, SamplingParams(max_tokens=16, temperature=0.0)))
    assert len(text.split()) >= 4, text


def test_generate_and_ppl_take_the_flag(gpt2_dir):
    from test_cli import kiln

    proc = kiln("generate", "--model", str(gpt2_dir), "--prompt", "The quick", "--max-tokens", "8",
                "--temperature", "0", "--quantization", "int8")
    assert proc.returncode == 0, proc.stderr
    engine = load_engine(str(gpt2_dir), "cpu", quantization="int8")
    expected = "".join(o.text for o in engine.generate(engine.tokenizer.encode("The quick"),
                                                       SamplingParams(max_tokens=8, temperature=0.0)))
    assert proc.stdout == expected + "\n"
    proc = kiln("ppl", "--model", str(gpt2_dir), "--quantization", "int8", "-", stdin="To be, or not to be.")
    assert proc.returncode == 0 and proc.stdout.startswith("perplexity "), proc.stderr
    proc = kiln("generate", "--model", str(gpt2_dir), "--prompt", "x", "--quantization", "int8", "--dtype", "bf16")
    assert proc.returncode == 2 and "int8 quantization runs fp32 models on the CPU, not bfloat16" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_server_flag(capsys):
    from server.__main__ import main
    from server.settings import ServerSettings, build_parser

    settings = ServerSettings.from_args(build_parser().parse_args(["--quantization", "int8"]))
    assert settings.quantization == "int8"
    for bad, said in ((["--quantization", "int8", "--dtype", "bf16"], "--device auto --dtype bf16"),
                      (["--quantization", "int8", "--device", "cuda"], "--device cuda --dtype auto"),
                      (["--quantization", "int4"], "invalid choice: 'int4'")):
        with pytest.raises(SystemExit) as e:
            main(bad)
        err = capsys.readouterr().err
        assert e.value.code == 2 and said in err, err
