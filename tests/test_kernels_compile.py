"""Every Triton kernel compiles for an H100 (sm_90), checked on this GPU-less machine.

The interpreter tests check what the kernels compute; these check that the GPU
compiler accepts them. ``bench/compile_check.py`` runs the real launchers with
Triton's driver swapped for an offline one, so each launch compiles down to a cubin
(Triton's bundled ptxas) without a device. Runs in a subprocess: the test session
imported triton with ``TRITON_INTERPRET=1``, and Triton fixes its mode at import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "compile_check.py"

KERNELS = {
    "_softmax_row_kernel", "_softmax_chunk_stats_kernel", "_softmax_chunk_normalize_kernel",
    "_cross_entropy_fwd_kernel", "_cross_entropy_bwd_kernel",
    "attn_fwd_kernel", "attn_bwd_preprocess_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel",
    "_decode_split_kernel", "_decode_merge_kernel",
    "_add_norm_kernel", "_rope_cache_kernel", "_silu_mul_kernel", "_gemv_kernel",
}
H100_SHARED = 232448


def _ptxas_available() -> bool:
    try:
        import importlib.util

        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):
        return False
    if spec is None or spec.origin is None:
        return False
    return (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


pytestmark = pytest.mark.skipif(not _ptxas_available(), reason="triton with a bundled ptxas is not installed")


def _run(args: list[str], tmp_path: Path, interpret: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from an old cache
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "bench")])
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_kernel_compiles_for_sm90(tmp_path):
    out = tmp_path / "report.json"
    proc = _run([str(SCRIPT), "--quick", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    report = json.loads(out.read_text())
    assert report["arch"] == 90 and report["errors"] == []
    compiled = report["compiled"]
    assert {item["kernel"] for item in compiled} == KERNELS, proc.stdout[-4000:]
    for item in compiled:
        where = f"{item['launch']}: {item['kernel']} {item['config']}"
        assert 0 <= item["shared"] <= H100_SHARED, where
        assert item["registers"] is not None and 0 < item["registers"] <= 255, where
    # Every family's launches were reached (a launch whose kernels were all compiled
    # before adds no rows, so look for the launch names in the log).
    for family in ("softmax float32 V=128256", "cross_entropy bfloat16", "linear_cross_entropy",
                   "flash_attention bfloat16 D=128 causal", "flash_attention_varlen", "decode_attention bfloat16 B=1",
                   "gemv bfloat16"):
        assert family in proc.stdout, family


BAD_KERNEL = '''
from __future__ import annotations

import sys

import torch

from kernels._utils import config, jit_kernel


def _early_exit_kernel(X, n, BLOCK: tl.constexpr):
    # `break` runs under the interpreter (plain Python) but Triton's compiler rejects it.
    offs = tl.arange(0, BLOCK)
    for i in range(n):
        if i == 2:
            break
        tl.store(X + offs, tl.load(X + offs) + 1.0)


kernel = jit_kernel(_early_exit_kernel, [config(BLOCK=16)], config(BLOCK=16), key=["n"])
x = torch.zeros(16)


def launch():
    kernel[(1,)](x, 5)


if sys.argv[1] == "interpret":
    launch()
    print("interpreted", x.tolist())
else:
    import compile_check

    report = compile_check.check(90, [("early exit", launch)])
    print("ERRORS", report.errors)
'''


def test_check_catches_what_only_the_compiler_rejects(tmp_path):
    script = tmp_path / "bad_kernel.py"
    script.write_text(textwrap.dedent(BAD_KERNEL))
    interpreted = _run([str(script), "interpret"], tmp_path, interpret=True)
    assert interpreted.returncode == 0, interpreted.stderr[-3000:]
    assert "interpreted [2.0," in interpreted.stdout  # the interpreter ran it happily
    compiled = _run([str(script), "compile"], tmp_path)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    errors = compiled.stdout.split("ERRORS", 1)[1]
    assert "early exit" in errors and "break" in errors.lower(), compiled.stdout[-3000:]


# torch.compile (inductor) launches user Triton kernels through its own launcher, which
# types a Python float argument fp64 where a plain launch types it fp32. A kernel whose
# fp32 math meets an fp64 scale then promotes its accumulators to fp64 and fails to
# compile (seen on the H200: `tl.dot` asserted acc fp64 != fp32 in the attention forward).
FP64_SCALARS = '''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

import compile_check
from kernels import attention, decode, gemv, norm, softmax
from triton.runtime import driver

CONSTEXPRS = {"CAUSAL": True, "VARLEN": False, "HEAD_DIM": 64, "DOT_PRECISION": "tf32", "BLOCK_M": 64,
              "BLOCK_N": 64, "BLOCK_G": 16, "SPLIT": True, "PER_ROW_T": False, "BLOCK": 1024, "CHUNKS_POW2": 4,
              "HAS_RESIDUAL": True, "HAS_BIAS": False, "RMS": True, "REVERSE": True, "L2_HINTS": False,
              "PROLOGUE": 1, "BLOCK_K": 64, "SPLIT_K": 2, "DOT": True,
              "LOOP_STAGES": 2, "PDL": True}
SCRATCH_POINTERS = {"Lse", "Delta", "OutPartial", "LsePartial", "Partials"}  # fp32 in every kernel
FP32_POINTERS = {"M", "S", "T", "Y"}  # fp32 outputs, except in the fused inference kernels (the model's dtype)
INT_POINTERS = {"CuSeqlensQ", "CuSeqlensK", "BlockTable", "Lengths", "Counters"}


def arg_type(kernel, name):
    if "scale" in name or name == "eps":
        return "fp64"  # what inductor's launcher passes for a Python float
    if name in INT_POINTERS:
        return "*i32"
    if name in SCRATCH_POINTERS:
        return "*fp32"
    if name[0].isupper():
        return "*fp32" if name in FP32_POINTERS and kernel not in ("_add_norm_kernel", "_gemv_kernel") else "*bf16"
    return "i32"


driver.set_active(compile_check._OfflineDriver(90))
target = GPUTarget("cuda", 90, 32)
compiled = []
handles = [h for module in (attention, decode, softmax) for h in vars(module._kernels(False)).values()]
for handle in handles + [norm._kernel(False), gemv._kernel(False)]:
    jit = handle.fn.fn if isinstance(handle.fn, Autotuner) else handle.fn
    if not any("scale" in name or name == "eps" for name in jit.arg_names):
        continue
    constexprs = {p.name: CONSTEXPRS[p.name] for p in jit.params if p.is_constexpr}
    signature = {name: "constexpr" if name in constexprs else arg_type(jit.__name__, name)
                 for name in jit.arg_names}
    try:
        triton.compile(ASTSource(jit, signature, constexprs), target=target,
                       options={"num_warps": 4, "num_stages": 2})
        compiled.append(jit.__name__)
    except Exception as exc:
        raise SystemExit(f"{jit.__name__} fails with fp64 float arguments: {exc}")
print("COMPILED", sorted(compiled))
'''


def test_kernels_compile_with_fp64_float_arguments_as_torch_compile_passes_them(tmp_path):
    script = tmp_path / "fp64_scalars.py"
    script.write_text(FP64_SCALARS)
    proc = _run([str(script)], tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    compiled = proc.stdout.split("COMPILED", 1)[1]
    for name in ("attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel", "_decode_split_kernel",
                 "_softmax_row_kernel", "_softmax_chunk_stats_kernel", "_softmax_chunk_normalize_kernel",
                 "_add_norm_kernel", "_gemv_kernel"):
        assert name in compiled, proc.stdout[-2000:]


# Triton compiles a kernel anew for each integer argument's class (1, a multiple of 16, other) unless the
# kernel says not to: lengths that vary with every prompt must not, or a server compiles mid-serving.
LENGTHS = '''
import torch

import compile_check
from kernels.attention import flash_attention
from kernels.decode import decode_attention

launches = []
# queries of 1, 7 and 16 tokens over 17 keys (buckets 16 x 32), then 33, 48 and 64 over as many (64 x 64):
# each integer class (1, other, a multiple of 16) within one autotuning bucket; batch x heads and the decode
# block table's width and split count vary too
for batch, (length, keys) in zip((1, 3, 4, 1, 3, 4), ((1, 17), (7, 17), (16, 17), (33, 33), (48, 48), (64, 64))):
    def prefill(batch=batch, length=length, keys=keys):
        q = torch.randn(batch, 4, length, 64, dtype=torch.bfloat16)
        k, v = torch.randn(2, batch, 2, keys, 64, dtype=torch.bfloat16)
        flash_attention(q, k, v, causal=True)

    def decode(batch=batch, length=length):
        k_cache, v_cache = torch.randn(2, 8, 16, 2, 64, dtype=torch.bfloat16)
        table = torch.arange(batch * (1 + length % 3)).view(batch, -1) % 8
        decode_attention(torch.randn(batch, 4, 64, dtype=torch.bfloat16), k_cache, v_cache, table,
                         torch.full((batch,), 5, dtype=torch.int32), num_splits=3 + length % 2)

    launches += [(f"prefill {batch}x{length}", prefill), (f"decode {batch}x{length}", decode)]
report = compile_check.check(90, launches, max_configs=1)
print("ERRORS", report.errors)
print("COMPILED", sorted(f"{item.kernel} {item.config}" for item in report.compiled))
'''


def test_lengths_and_batch_sizes_compile_nothing_new(tmp_path):
    script = tmp_path / "lengths.py"
    script.write_text(LENGTHS)
    proc = _run([str(script)], tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "ERRORS []" in proc.stdout, proc.stdout[-3000:]
    compiled = eval(proc.stdout.split("COMPILED", 1)[1])  # noqa: S307 -- our own script's list
    # one variant per kernel and config (the two attention buckets choose their own configs), whatever
    # the lengths, batch sizes, table widths and split counts
    assert len(compiled) == len(set(compiled)), proc.stdout[-3000:]
    assert sum(c.startswith("attn_fwd_kernel ") for c in compiled) == 2, compiled
    assert sum(c.startswith("_decode_split_kernel ") for c in compiled) == 1, compiled
    assert sum(c.startswith("_decode_merge_kernel ") for c in compiled) == 1, compiled
