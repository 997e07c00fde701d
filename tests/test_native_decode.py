"""The native C++ decode step (model/native) against the torch paths: same tokens, same logprobs.

The module is compiled once per machine (cached under ~/.cache/kiln); without a C++ compiler
these tests skip, as Kiln then serves with the torch path.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import cpu_packing, fast_decode
from model import native as native_step
from model.cli import load_engine
from model.config import ModelConfig
from model.engine import Engine, SamplingParams
from model.transformer import Transformer

from test_fast_decode import PROMPTS, assert_same_runs
from test_kv_cache_dtype import LENGTHS


@pytest.fixture(scope="module")
def native_module():
    saved = os.environ.pop(native_step.DISABLE_ENV, None)
    try:
        module = native_step.load(build=True)
    finally:
        if saved is not None:
            os.environ[native_step.DISABLE_ENV] = saved
    if module is None:
        pytest.skip(f"the native decode step cannot be built here: {native_step.error()}")
    return module


def test_native_step_equals_the_plain_forward(hf_dir, native_module):
    engine = load_engine(str(hf_dir), "cpu", max_batch_size=4)
    assert not engine.native_decode  # the suite runs with KILN_NO_NATIVE=1: nothing switched it on
    engine._decode_plan.enable_native(native_module)
    assert engine.native_decode
    assert_same_runs(engine, Engine(engine.model, engine.tokenizer, max_batch_size=4, fast_decode=False))


def test_native_step_over_a_bf16_cache_agrees_with_the_plain_forward(native_module):
    """--kv-cache-dtype bf16 with the native step (decode and short prompts through it) against the plain
    forward over a bf16 cache: the same greedy tokens, logprobs as close as the rounding of keys allows
    (tests/test_kv_cache_dtype.py holds the torch paths to the same)."""
    engine = load_engine(None, "cpu", max_batch_size=4, native=False, kv_cache_dtype="bf16")
    engine._decode_plan.enable_native(native_module)
    assert engine.native_decode and engine.cache.k.dtype == torch.bfloat16
    plain = Engine(engine.model, engine.tokenizer, max_batch_size=4, fast_decode=False, kv_cache_dtype="bf16")
    assert_same_runs(engine, plain, LENGTHS, tolerance=5e-3)


def test_native_step_applies_qwen3s_head_norms(tmp_path, tokenizer_dir, native_module):
    """A Qwen3 model (RMSNorm of each query and key head before rotary): the native step, the torch path and the
    plain forward give the same tokens and log-probabilities."""
    from test_model_hf import save_tiny_hf

    path = save_tiny_hf(tmp_path / "q", tokenizer_dir, family="qwen3", head_dim=32)
    for quantization in (None, "int8"):  # int8: the gains come after the matrices' row scales
        engine = load_engine(str(path), "cpu", max_batch_size=4, quantization=quantization, prefill_dtype="fp32")
        assert engine.config.qk_norm
        plain = Engine(engine.model, engine.tokenizer, max_batch_size=4, fast_decode=False, prefill_dtype="fp32")
        assert_same_runs(engine, plain)  # the torch path
        engine._decode_plan.enable_native(native_module)
        assert engine.native_decode and (engine._decode_plan.native_dtype == torch.int8) == bool(quantization)
        assert_same_runs(engine, plain)


@pytest.mark.parametrize("kv_dtype", ["fp32", "bf16"])
def test_native_step_writes_the_cache_like_the_torch_step(llama_dir, native_module, monkeypatch, kv_dtype):
    """One decode step from the same cache state: same logits, same keys/values in the same blocks (a bf16
    cache: rounded to nearest even, as torch rounds; a key whose fp32 values differ in the last bit between
    the two steps may round the other way, one bf16 step apart, and nothing else may differ)."""
    engine = load_engine(str(llama_dir), "cpu", max_batch_size=2, block_size=4, kv_cache_dtype=kv_dtype)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS[:2]]
    requests = [engine.add_request(ids, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
                for ids in prompts]
    for _ in range(3):
        engine.step()
    tokens = torch.tensor([[r.output_ids[-1]] for r in requests])
    batch = engine.cache.batch([r.blocks for r in requests], [r.num_computed for r in requests], [1, 1])
    k0, v0 = engine.cache.k.clone(), engine.cache.v.clone()
    plan = engine._decode_plan
    want = plan(tokens, engine.cache, batch)
    k_want, v_want = engine.cache.k.clone(), engine.cache.v.clone()
    engine.cache.k.copy_(k0)
    engine.cache.v.copy_(v0)
    plan.enable_native(native_module)
    got = plan(tokens, engine.cache, batch)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if kv_dtype == "fp32":
        torch.testing.assert_close(engine.cache.k, k_want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(engine.cache.v, v_want, rtol=1e-5, atol=1e-5)
    else:
        for cache, expected in ((engine.cache.k, k_want), (engine.cache.v, v_want)):
            differ = cache != expected
            assert differ.sum() <= 0.01 * (k0 != k_want).sum()  # of the values this step wrote
            torch.testing.assert_close(cache.float(), expected.float(), rtol=2 ** -8, atol=1e-6)
    # past NATIVE_MAX_BATCH the torch path runs: force it and compare too
    monkeypatch.setattr(fast_decode, "NATIVE_MAX_BATCH", 1)
    engine.cache.k.copy_(k0)
    engine.cache.v.copy_(v0)
    torch.testing.assert_close(plan(tokens, engine.cache, batch), want, rtol=1e-6, atol=1e-6)


def test_native_step_rejects_bad_input(llama_dir, native_module):
    engine = load_engine(str(llama_dir), "cpu", max_batch_size=1, block_size=4)
    plan = engine._decode_plan
    plan.enable_native(native_module)
    weights, dims, eps = plan._native_args
    cache = engine.cache
    table = torch.tensor([[1, 2]])
    ok = (torch.tensor([5]), torch.tensor([3]), table, cache.k, cache.v, weights, dims, eps)
    assert native_module.decode_step(*ok).shape == (1, engine.config.vocab_size)
    with pytest.raises(RuntimeError, match="token id out of range"):
        native_module.decode_step(torch.tensor([10**6]), *ok[1:])
    with pytest.raises(RuntimeError, match="position past the block table"):
        native_module.decode_step(ok[0], torch.tensor([8]), *ok[2:])
    long_table = torch.arange(1, engine.config.max_seq_len // 4 + 3)[None]  # reaches past the context
    with pytest.raises(RuntimeError, match="position past the model's context"):
        native_module.decode_step(ok[0], torch.tensor([engine.config.max_seq_len]), long_table, *ok[3:])
    with pytest.raises(RuntimeError, match="block id out of range"):
        native_module.decode_step(ok[0], ok[1], torch.tensor([[cache.num_blocks, 2]]), *ok[3:])
    with pytest.raises(RuntimeError, match="int64"):
        native_module.decode_step(ok[0].int(), *ok[1:])
    bad_weights = list(weights)
    bad_weights[2] = weights[2][:-1]  # a qkv weight one tile short
    with pytest.raises(RuntimeError, match="qkv weight has shape"):
        native_module.decode_step(*ok[:5], bad_weights, dims, eps)
    bad_weights = list(weights)
    bad_weights[0] = weights[0][:-1]  # a norm gain one short
    with pytest.raises(RuntimeError, match="norm gain, shift or bias has shape"):
        native_module.decode_step(*ok[:5], bad_weights, dims, eps)
    bad_weights = list(weights)
    bad_weights[2] = weights[2].bfloat16()  # one packed matrix bf16, the others fp32
    with pytest.raises(RuntimeError, match="all fp32, all bf16 or all int8"):
        native_module.decode_step(*ok[:5], bad_weights, dims, eps)
    with pytest.raises(RuntimeError, match="both fp32 or both bf16"):
        native_module.decode_step(*ok[:3], cache.k.half(), cache.v.half(), *ok[5:])
    with pytest.raises(RuntimeError, match="both fp32 or both bf16"):
        native_module.decode_step(*ok[:3], cache.k.bfloat16(), cache.v, *ok[5:])
    assert native_module.decode_step(*ok[:3], cache.k.bfloat16(), cache.v.bfloat16(), *ok[5:]).dtype == torch.float32


def test_native_step_runs_on_torchs_threads(native_module):
    """at::parallel_for in the module runs on torch's intra-op threads: it is OpenMP pragmas in
    ATen's headers, so a build without -fopenmp silently ran every product on one thread."""
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert native_module.parallel_threads(64) == 2
        torch.set_num_threads(1)
        assert native_module.parallel_threads(64) == 1
    finally:
        torch.set_num_threads(saved)


def build_variant(suffix: str, extra_flags: list[str]):
    """The same source built with more compiler flags, beside the native build (once per source change)."""
    from torch.utils.cpp_extension import load as load_extension

    directory = native_step.build_dir().with_name(native_step.build_dir().name + "-" + suffix)
    directory.mkdir(parents=True, exist_ok=True)
    return load_extension(name=f"kiln_native_{suffix}_" + native_step.build_dir().name,
                          sources=[str(native_step.SOURCE)], extra_cflags=[*native_step.FLAGS, *extra_flags],
                          extra_ldflags=list(native_step.LDFLAGS), build_directory=str(directory), verbose=False)


def _x86_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if platform.machine() not in ("x86_64", "AMD64"):
        return set()
    return set(next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "").split())


@pytest.fixture(scope="module")
def avx2_module(native_module):
    """The same source built without AVX-512, as on most laptops and desktops: its matrix and attention
    loops take the AVX2 code path."""
    if not {"avx2", "fma"} <= _x86_flags():
        pytest.skip("no x86 CPU with AVX2 and FMA")
    return build_variant("avx2", ["-mno-avx512f"])


@pytest.fixture(scope="module")
def scalar_module(native_module):
    """Built without any AVX: the plain loops every other CPU (ARM, older x86) compiles."""
    if not _x86_flags():
        pytest.skip("not an x86 CPU")
    return build_variant("scalar", ["-mno-avx"])


@pytest.mark.parametrize("kv_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("build", ["native", "avx2", "scalar"])
@pytest.mark.parametrize("head_dim", [32, 64, 128, 16])
def test_native_attention_at_each_head_dim(llama_dir, request, head_dim, build, kv_dtype):
    """The attention has code paths for head dims 32, 64 and 128 (the loops unrolled; AVX-512 or
    AVX2 reductions) and one for any other, each reading an fp32 or a bf16 cache; each against the torch
    step over the same cache, rows of different lengths over many cache blocks."""
    native_module = request.getfixturevalue(f"{build}_module")
    tokenizer = load_engine(str(llama_dir), "cpu").tokenizer
    torch.manual_seed(head_dim)
    config = ModelConfig(vocab_size=tokenizer.n_vocab, n_layer=2, n_head=6, n_kv_head=2, d_model=48, d_ff=64,
                         max_seq_len=128, head_dim=head_dim)
    model = Transformer(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(5.0 if parameter.dim() > 1 else 1.0)  # sharper attention than the 0.02 init
    engine = Engine(model, tokenizer, max_batch_size=3, block_size=4, kv_cache_dtype=kv_dtype)
    lengths = [70, 5, 33]  # up to 18 blocks; one row in a single block
    requests = [engine.add_request([(7 * i + j) % 300 + 1 for j in range(n)],
                                   SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
                for i, n in enumerate(lengths)]
    while any(r.num_computed < n for r, n in zip(requests, lengths)):
        engine.step()
    tokens = torch.tensor([[r.output_ids[-1]] for r in requests])
    batch = engine.cache.batch([r.blocks for r in requests], [r.num_computed for r in requests], [1, 1, 1])
    plan = engine._decode_plan
    k0, v0 = engine.cache.k.clone(), engine.cache.v.clone()
    want = plan(tokens, engine.cache, batch)
    engine.cache.k.copy_(k0)
    engine.cache.v.copy_(v0)
    plan.enable_native(native_module)
    got = plan(tokens, engine.cache, batch)
    err = (got - want).abs().max().item()
    assert err < 1e-4 * max(1.0, want.abs().max().item()), f"head dim {head_dim}: max |native - torch| {err:.2e}"


@pytest.mark.parametrize("fixture", ["llama_dir", "gpt2_dir"])
def test_native_step_reads_bf16_matrices_when_exact(fixture, native_module, request):
    """Weights that are all bf16 numbers (a bf16 checkpoint loaded as fp32) are packed as bf16, and
    the step still matches the plain forward; other weights stay fp32."""
    engine = load_engine(str(request.getfixturevalue(fixture)), "cpu", max_batch_size=4)
    plan = engine._decode_plan
    plan.enable_native(native_module)
    assert plan.native_dtype == torch.float32  # random fp32 init: bf16 would round
    with torch.no_grad():
        for parameter in engine.model.parameters():
            parameter.copy_(parameter.bfloat16().float())
    plan = fast_decode.DecodePlan(engine.model)  # the plan folds norms into copies: rebuild it
    engine._decode_plan = plan
    plan.enable_native(native_module)
    assert plan.native_dtype == torch.bfloat16 and engine.decode_path == "native (bfloat16 matrices)"
    packed = plan._native_args[0]
    assert {w.dtype for w in packed if w.dim() == 3} == {torch.bfloat16}
    assert {w.dtype for w in packed if w.dim() < 3} <= {torch.float32}
    # (fp32 prompts on both sides: with the weights now bf16 numbers, "auto" would prefill in bf16 on AMX CPUs)
    assert_same_runs(engine, Engine(engine.model, engine.tokenizer, max_batch_size=4, fast_decode=False,
                                    prefill_dtype="fp32"))
    plan.enable_native(native_module, torch.float32)  # forced fp32, for comparisons
    assert plan.native_dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be None"):
        plan.enable_native(native_module, torch.float16)
    plan.disable_native()
    assert not plan.native and engine.decode_path == "eager"


def test_native_is_off_for_models_it_does_not_cover(llama_dir, native_module, monkeypatch):
    monkeypatch.setattr(fast_decode, "FOLD_LIMIT_BYTES", 0)  # a "large" model: norms not folded
    engine = load_engine(str(llama_dir), "cpu", native=True)  # random fp32 weights: not bf16 numbers
    assert not engine.native_decode and not engine._decode_plan.supports_native()
    with pytest.raises(ValueError, match="exactly bf16 numbers"):
        engine._decode_plan.enable_native(native_module)


@pytest.mark.parametrize("fixture", ["llama_dir", "gpt2_dir"])
def test_a_large_bf16_model_runs_native(fixture, native_module, monkeypatch, tmp_path, request):
    """A model past the fold limit whose checkpoint is bf16 (most on the hub): the native step reads its
    matrices as bf16 up to NATIVE_MAX_BATCH rows and the torch path (oneDNN packs) takes more; with the
    limit at 2, rows joining and leaving cross between the two. Tokens and logprobs equal the plain
    forward's."""
    monkeypatch.setattr(fast_decode, "FOLD_LIMIT_BYTES", 0)
    monkeypatch.delenv(native_step.DISABLE_ENV, raising=False)
    bf16_checkpoint(request.getfixturevalue(fixture), tmp_path)
    # loaded as fp32; fp32 prompts (not the bf16 copy "auto" takes for bf16 weights on AMX CPUs), so the plain
    # forward below is an exact reference
    engine = load_engine(str(tmp_path), "cpu", max_batch_size=4, native=True, prefill_dtype="fp32")
    plan = engine._decode_plan
    assert not plan.folded and engine.native_decode and plan.native_max_batch == fast_decode.NATIVE_MAX_BATCH
    assert engine.decode_path == "native (bfloat16 matrices)"
    reference = Engine(engine.model, engine.tokenizer, max_batch_size=4, fast_decode=False, prefill_dtype="fp32")
    assert_same_runs(engine, reference)
    monkeypatch.setattr(fast_decode, "NATIVE_MAX_BATCH", 2)
    assert engine.decode_path == "native (bfloat16 matrices, up to 2 rows)"
    assert_same_runs(engine, reference)
    # the bf16 copy must fit: half of what is still available at most
    monkeypatch.setattr(cpu_packing, "available_memory", lambda: 1024)
    assert not fast_decode.DecodePlan(engine.model).supports_native()


def bf16_checkpoint(source_dir, out_dir) -> None:
    """A copy of a model directory saved in bf16 (as most checkpoints on the hub are), tokenizer files included."""
    import shutil

    from model.checkpoint import load_model, save_model

    save_model(load_model(str(source_dir)), out_dir, dtype=torch.bfloat16)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        if (source_dir / name).is_file():
            shutil.copy(source_dir / name, out_dir / name)


def test_native_step_over_more_rows_than_one_pass(llama_dir, native_module):
    """11 sequences: the matrix loops take 8 batch rows per pass, so this runs a full and a partial pass."""
    engine = load_engine(str(llama_dir), "cpu", max_batch_size=11)
    engine._decode_plan.enable_native(native_module)
    plain = Engine(engine.model, engine.tokenizer, max_batch_size=11, fast_decode=False)
    words = "the quick brown fox jumps over the lazy dog again and again".split()
    prompts = [engine.tokenizer.encode(" ".join(words[: 1 + i])) for i in range(11)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
    results = []
    for e in (engine, plain):
        requests = [e.add_request(p, params) for p in prompts]
        logprobs = {}
        while e.has_work:
            for out in e.step():
                logprobs.setdefault(out.request.request_id, []).extend(lp.logprob for lp in out.logprobs)
        results.append(([r.output_ids for r in requests], [logprobs[r.request_id] for r in requests]))
    (got_ids, got_lps), (want_ids, want_lps) = results
    assert got_ids == want_ids
    assert max(abs(a - b) for g, w in zip(got_lps, want_lps) for a, b in zip(g, w)) < 1e-4


def test_compile_is_skipped_when_the_native_step_covers_every_batch(llama_dir, native_module, monkeypatch):
    monkeypatch.delenv(native_step.DISABLE_ENV, raising=False)
    engine = load_engine(str(llama_dir), "cpu", max_batch_size=4, compile=True)
    assert engine.native_decode
    assert engine.compile_seconds is None and engine.compile_error.startswith("not needed")


def test_a_compiler_without_openmp_still_builds_the_serial_step(monkeypatch, tmp_path):
    """Apple clang has no -fopenmp: the build falls back to the single-threaded flags."""
    import torch.utils.cpp_extension as cpp_extension

    calls = []

    def fake_load(name, sources, extra_cflags, extra_ldflags, build_directory, verbose):
        calls.append(list(extra_cflags))
        if "-fopenmp" in extra_cflags:
            raise RuntimeError("clang: error: unsupported option '-fopenmp'")
        return f"module built with {' '.join(extra_cflags)}"

    monkeypatch.delenv(native_step.DISABLE_ENV, raising=False)
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(native_step, "_module", None)
    monkeypatch.setattr(native_step, "_error", None)
    assert native_step.load(build=False) is None  # nothing built yet, and not asked to build
    module = native_step.load(build=True)
    assert calls == [native_step.FLAGS, native_step.SERIAL_FLAGS]
    assert "-fopenmp-simd" in module and native_step.error() is None


def test_the_build_names_no_checkout_path_and_each_environment_has_its_own(monkeypatch, tmp_path):
    """Two checkouts (or virtual environments) sharing ~/.cache/kiln rebuilt the module in turn (~25 s
    at each server start): the compile command named the checkout's source path and the venv's torch."""
    import torch
    import torch.utils.cpp_extension as cpp_extension

    seen = []

    def fake_load(name, sources, extra_cflags, extra_ldflags, build_directory, verbose):
        seen.append((sources, build_directory))
        return "module"

    monkeypatch.delenv(native_step.DISABLE_ENV, raising=False)
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(native_step, "_module", None)
    monkeypatch.setattr(native_step, "_error", None)
    assert native_step.load(build=True) == "module"
    [(sources, directory)] = seen
    copy = Path(sources[0])
    assert copy.parent == Path(directory) and copy.read_text() == native_step.SOURCE.read_text()
    stamp = copy.stat().st_mtime_ns
    monkeypatch.setattr(native_step, "_module", None)
    native_step.load(build=True)
    assert copy.stat().st_mtime_ns == stamp  # an unchanged source is not rewritten (ninja would rebuild)
    here = native_step.build_dir()
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
    assert native_step.build_dir() != here


def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_next_start(native_module):
    """torch's `load` waits without end while its lock file exists; a server or `make serve` killed while it
    built left one, and every later start hung. The module is built here, so the start only loads it."""
    assert Path(native_module.__file__).parent == native_step.build_dir()  # (loading changed no flag list)
    baton = native_step.build_dir() / "lock"
    baton.touch()  # what a build stopped by SIGTERM or SIGKILL leaves
    env = {k: v for k, v in os.environ.items() if k != native_step.DISABLE_ENV}
    try:
        run = subprocess.run([sys.executable, "-m", "model.native"], env=env, capture_output=True, text=True,
                             timeout=120, cwd=Path(__file__).resolve().parents[1])
        assert run.returncode == 0 and "native CPU decode step:" in run.stdout, run.stdout + run.stderr
        assert not baton.exists()
    finally:
        baton.unlink(missing_ok=True)


# ---- the native sampler (sample_rows) --------------------------------------------------------
def test_native_sampler_draws_the_torch_paths_ids(native_module):
    """Same uniforms in, same ids out as model/sampling.py's torch path: temperatures (greedy rows
    included), top-k, top-p, both, rows with banned (-inf) ids, flat and peaked rows, several sizes."""
    from model.sampling import GREEDY_BELOW, SamplingBatch, _draw

    gen = torch.Generator().manual_seed(0)
    rows = 0
    for trial in range(150):
        B = int(torch.randint(1, 6, (), generator=gen))
        V = int(torch.randint(2, 3000, (), generator=gen))
        x = torch.randn(B, V, generator=gen) * float(torch.rand((), generator=gen) * 8)
        if trial % 4 == 0:
            x[:, torch.randint(0, V, (V // 3,), generator=gen)] = float("-inf")
        temps = [0.0 if t < 0.2 else float(t) for t in torch.rand(B, generator=gen) * 1.5]
        ks = [int(k) if k % 3 else 0 for k in torch.randint(0, 80, (B,), generator=gen)]
        ps = [float(p) if p > 0.3 else 1.0 for p in torch.rand(B, generator=gen)]
        u = torch.rand(B, 1, generator=gen)
        params = SamplingBatch(temperature=temps, top_k=ks, top_p=ps, generators=[None] * B)
        want = _draw(x.clone(), params, [t < GREEDY_BELOW for t in temps], u)
        got = native_module.sample_rows(x, temps, ks, ps, u, V, GREEDY_BELOW)
        assert got.tolist() == want.tolist(), (trial, temps, ks, ps)
        rows += B
    assert rows > 400
    # banned ids are never drawn, whatever the uniform (0 and just under 1 included)
    x = torch.full((1, 500), float("-inf"))
    x[0, 7], x[0, 300] = 1.0, 0.5
    for u in (0.0, 0.3, 0.6, 0.999999):
        for k, p in ((0, 1.0), (5, 1.0), (0, 0.99), (400, 0.5)):
            got = native_module.sample_rows(x, [1.0], [k], [p], torch.tensor([[u]]), 500, GREEDY_BELOW)
            assert int(got) in (7, 300), (u, k, p)
    # ids past vocab_limit (embedding padding) are not drawn either
    x = torch.zeros(1, 64)
    x[0, 40:] = 50.0
    got = native_module.sample_rows(x, [1.0], [0], [1.0], torch.tensor([[0.99]]), 40, GREEDY_BELOW)
    assert int(got) < 40


def test_engine_samples_the_same_ids_with_the_native_sampler(llama_dir, native_module):
    """Seeded requests with temperature, top-k and top-p: the native decode step (and its sampler)
    gives the torch engine's tokens."""
    engines = [load_engine(str(llama_dir), "cpu", max_batch_size=4) for _ in range(2)]
    engines[1]._decode_plan.enable_native(native_module)
    outputs = []
    for engine in engines:
        requests = [engine.add_request(engine.tokenizer.encode(p), SamplingParams(
            max_tokens=24, temperature=t, top_k=k, top_p=tp, seed=s, ignore_eos=True))
            for p, t, k, tp, s in zip(PROMPTS, (0.8, 1.0, 0.0, 1.3), (0, 40, 0, 5), (0.9, 1.0, 1.0, 0.8), (1, 2, 3, 4))]
        while engine.has_work:
            engine.step()
        outputs.append([r.output_ids for r in requests])
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_short_prefills_run_through_the_native_step(llama_dir, native_module, monkeypatch, quantization):
    """Prompt chunks of up to native_prefill_max_tokens tokens in all run as one native step with a row per
    token (causal: every row's keys are written before any row attends); longer ones, and prompts that want
    their logprobs (echo), run the forward. Same tokens and logprobs as the plain engine either way, for one
    prompt and for several prefilled together."""
    # whole prompts prefilled (no prefix cache), so the split below is known; fp32 prompts on both sides (an
    # int8 model's "auto" is a bf16 copy on AMX CPUs)
    engine = load_engine(str(llama_dir), "cpu", max_batch_size=4, quantization=quantization, block_size=4,
                         enable_prefix_caching=False, prefill_dtype="fp32")
    engine._decode_plan.enable_native(native_module)
    plain = Engine(engine.model, engine.tokenizer, max_batch_size=4, block_size=4, fast_decode=False,
                   prefill_dtype="fp32")
    calls = []  # tokens of each native prefill
    real = Engine._prefill_native
    monkeypatch.setattr(Engine, "_prefill_native",
                        lambda self, chunks: calls.append(sum(n for _, n in chunks)) or real(self, chunks))
    monkeypatch.setattr(fast_decode, "NATIVE_PREFILL_MAX_TOKENS", 20)  # both paths with these short prompts
    monkeypatch.setattr(fast_decode, "NATIVE_PREFILL_MAX_TOKENS_PACKED", 20)
    words = "the quick brown fox jumps over the lazy dog again and again until the end".split()
    prompts = [engine.tokenizer.encode(" ".join(words[: 2 + 4 * i])) for i in range(4)]
    assert sum(map(len, prompts[:2])) <= 20 < sum(map(len, prompts))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)

    def run(e, group):
        requests = [e.add_request(p, params) for p in group]
        logprobs = {}
        while e.has_work:
            for out in e.step():
                logprobs.setdefault(out.request.request_id, []).extend(
                    (lp.token_id, round(lp.logprob, 4)) for lp in out.logprobs)
        return [r.output_ids for r in requests], [logprobs[r.request_id] for r in requests]

    for group in ([prompts[0]], prompts[:2], prompts):
        calls.clear()
        got, want = run(engine, group), run(plain, group)
        assert got[0] == want[0]
        assert all(abs(a[1] - b[1]) < 1e-3 for g, w in zip(got[1], want[1]) for a, b in zip(g, w))
        assert calls == ([sum(map(len, group))] if sum(map(len, group)) <= 20 else []), calls
    calls.clear()
    echo = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=True, logprobs=0)
    list(engine.generate(prompts[0], echo))
    assert not calls  # prompt logprobs need the forward's hidden states
