"""Smoke test of bench/cpu_serving.py: the whole benchmark end to end at a tiny shape, plus its table.

The subprocess run builds a tiny random Llama, runs HF and a live `kiln serve` on it (--quick:
16 new tokens, 8 x 64 scoring, one repetition, one thread) and must exit 0, which it does only
when Kiln's greedy tokens equal HF's, the perplexity NLLs agree and the server stops cleanly on
SIGTERM. The numbers are not checked for speed (a shared 2-core machine), only for sanity.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "cpu_serving.py"


def load_bench():
    return load_script("cpu_serving")


def test_quick_run_end_to_end(tokenizer_dir, tmp_path):
    out_json = tmp_path / "results.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--tiny", "--threads", "1", "--tokenizer", str(tokenizer_dir),
           "--markdown", "--json", str(out_json)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    out = proc.stdout
    assert out.startswith("## CPU serving: Kiln vs Hugging Face transformers, "), out
    assert "`python bench/cpu_serving.py --quick --tiny --threads 1 --tokenizer " in out, out
    for row in ("| generate batch 1 (16 + 16 new) |", "| 8 concurrent (16 + 16 new each) |", "| scoring 8 x 64 |",
                "| first token of a 64-token prompt (prompt tok/s) |",
                "| lm-eval loglikelihood: 4 echo requests of 16-48 ids, 2 at a time (prompt tok/s) |",
                "| /health 200 after process start | - |"):
        assert row in out, f"missing row {row!r} in:\n{out}"
    assert "greedy tokens, Kiln == HF at batch 1: yes (16/16 tokens agree)" in out, out

    report = json.loads(out_json.read_text())
    assert report["machine"]["threads"] == 1
    [result] = report["results"]
    assert result["model"].startswith("random-llama: h64 L2 heads 4/2 ff128 vocab "), result["model"]
    assert result["workload"] == {"prompt_len": 16, "new_tokens": 16, "batch": 8, "score_batch": 8, "score_len": 64,
                                  "long_prompt_len": 64, "echo_requests": 4, "echo_min": 16, "echo_max": 48,
                                  "echo_concurrency": 2, "warmups": 1, "reps": 1}
    assert result["greedy_match"] and result["greedy_same_prefix"] == result["greedy_len"] == 16
    # random fp32 weights: Kiln keeps fp32 prompts ("auto" takes bf16 only for weights stored in bf16), so the
    # strict checks apply
    assert result["kiln_prefill_dtype"] == "float32" and result["greedy_required"]
    assert result["nll_tolerance"] == 1e-3
    assert result["nll_max_abs_diff"] < 1e-4, f"max |NLL diff| {result['nll_max_abs_diff']}"
    assert result["echo_max_abs_diff"] < 1e-4, f"max |echo logprob diff| {result['echo_max_abs_diff']}"
    assert "echo, per-token logprob max |Kiln - HF|: " in out, out
    assert result["kiln_exit_code"] == 0
    assert 0 < result["health_s"] < 120
    for side in ("hf", "kiln"):
        for key, value in result[side].items():
            assert math.isfinite(value) and value > 0, f"{side} {key} = {value}"


def test_table_ratios_and_targets():
    bench = load_bench()
    work = bench.Workload()
    result = {"model": "m", "workload": {**bench.asdict(work)}, "health_s": 6.5, "kiln_exit_code": 0,
              "hf": {"batch1_tok_s": 500.0, "concurrent_tok_s": 2000.0, "scoring_tok_s": 16000.0,
                     "prefill_tok_s": 4000.0},
              "kiln": {"batch1_tok_s": 1800.0, "concurrent_tok_s": 3000.0, "scoring_tok_s": 24000.0,
                       "prefill_tok_s": 10000.0},
              "greedy_match": False, "greedy_same_prefix": 7, "greedy_len": 128, "nll_max_abs_diff": 2.5e-6,
              "greedy_required": True, "kiln_prefill_dtype": "float32", "nll_tolerance": 1e-3,
              "echo_max_abs_diff": 3.5e-6}
    rows = bench.table_rows(result)
    assert rows == [
        ["generate batch 1 (16 + 128 new)", "500", "1,800", "3.60x", ">= 3.5x", "yes"],
        ["8 concurrent (16 + 128 new each)", "2,000", "3,000", "1.50x", ">= 1.5x", "yes"],
        ["scoring 8 x 512", "16,000", "24,000", "1.50x", ">= 1.3x", "yes"],
        ["first token of a 512-token prompt (prompt tok/s)", "4,000", "10,000", "2.50x", "-", "-"],
        ["/health 200 after process start", "-", "6.50 s", "-", "<= 5 s", "no"],
    ]
    result["kiln"]["batch1_tok_s"] = 1700.0
    assert bench.table_rows(result)[0][3:] == ["3.40x", ">= 3.5x", "no"]
    line = bench.checks_line(result)
    assert "NO (first difference at token 7)" in line and "7/128 tokens agree)" in line and "2.50e-06" in line
    assert line.startswith("Kiln computes prompts in float32; ") and "(<= 1e-03)" in line
    assert "echo, per-token logprob max |Kiln - HF|: 3.50e-06 (<= 1e-03); " in line
    result.update(greedy_required=False, kiln_prefill_dtype="bfloat16", nll_tolerance=2e-2)
    line = bench.checks_line(result)
    assert "7/128 tokens agree, not required: bf16 or int8 on a side)" in line and "(<= 2e-02)" in line
    assert bench.kiln_flag("--compile --prefill-dtype bf16", "--prefill-dtype") == "bf16"
    assert bench.kiln_flag("--prefill-dtype=fp32", "--prefill-dtype") == "fp32"
    assert bench.kiln_flag("--compile", "--prefill-dtype") == "auto"
    info = {"cpu": "CPU X", "flags": ["avx2"], "threads": 2, "torch": "t", "transformers": "tf", "date": "2026-01-02"}
    md = bench.render([result], info, "python bench/cpu_serving.py --markdown", markdown=True, hf_attn="sdpa")
    assert md.splitlines()[0] == "## CPU serving: Kiln vs Hugging Face transformers, 2026-01-02"
    assert "`python bench/cpu_serving.py --markdown`" in md
    assert "| generate batch 1 (16 + 128 new) | 500 | 1,700 | 3.40x | >= 3.5x | no |" in md
    plain = bench.render([result], info, "cmd", markdown=False, hf_attn="sdpa")
    assert plain.startswith("machine: CPU X (avx2), 2 threads; torch t, transformers tf")


def test_decode_step_bench_quick(llama_dir, tmp_path):
    """bench/cpu_decode_step.py end to end on a tiny model whose weights it rounds to bf16: every
    path timed, the native paths' logits checked against the torch path's (exit 0 only if they agree), the
    bf16 KV cache's reported."""
    out_json = tmp_path / "step.json"
    cmd = [sys.executable, str(ROOT / "bench" / "cpu_decode_step.py"), "--quick", "--model", str(llama_dir),
           "--round-bf16", "--bf16-kv", "--threads", "1", "--markdown", "--json", str(out_json)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    report = json.loads(out_json.read_text())
    assert report["ok"] and report["paths"][0] == "torch"
    if report["native"]:  # a C++ compiler is here: rounded weights take the bf16 layout too
        assert report["paths"] == ["torch", "native fp32", "native bf16", "native bf16 KV"]
    assert [(r["batch"], r["context"]) for r in report["rows"]] == [(1, 8), (1, 40), (3, 8), (3, 40)]
    for row in report["rows"]:
        assert set(row["ms"]) == set(report["paths"]) and all(0 < v < 1e4 for v in row["ms"].values())
        assert all(d <= 1e-3 for name, d in row["max_abs_diff"].items() if name != "native bf16 KV")
        assert row["max_abs_diff"].get("native bf16 KV", 0) < 0.5  # rounded keys and values: close, not equal
    assert proc.stdout.startswith("## CPU decode step, ") and "| 3 | 40 |" in proc.stdout


def test_profile_step_runs_on_the_cpu(tokenizer_dir):
    """bench/profile_step.py (the GPU step profiler) end to end at a tiny shape on the CPU."""
    cmd = [sys.executable, str(ROOT / "bench" / "profile_step.py"), "--shape", "tiny-llama", "--device", "cpu",
           "--steps", "4", "--top", "5", "--tokenizer", str(tokenizer_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    out = proc.stdout
    assert out.startswith("tiny-llama on cpu, fp32, batch 1;"), out
    assert "ms per decode step" in out and "host: cProfile over 4 steps" in out, out
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+(/\d+)?\s+\d+\.\d{3}\s", line)]
    assert len(rows) == 5, out  # --top 5 rows of the host profile
    bad = subprocess.run([*cmd[:2], "--steps", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--steps must be >= 1, got 0" in bad.stderr
    for flags, message in ((["--pdl"], "--pdl applies to the kernels.gemv step: add --gemv"),
                           (["--gemv", "--pdl"], "--pdl: programmatic dependent launch needs compiled Triton kernels")):
        bad = subprocess.run([*cmd, *flags], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and message in bad.stderr, bad.stderr[-2000:]


def test_cpu_sampling_bench_quick():
    """bench/cpu_sampling.py (decode tok/s by sampling mode) end to end, shortened, on the default model."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_sampling.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    rows = re.findall(r"^\s*(greedy|T=1|T=0\.8 top_p=0\.95): batch 1\s+([\d,]+)\s+8 at once\s+([\d,]+)$",
                      proc.stdout, flags=re.M)
    assert [r[0] for r in rows] == ["greedy", "T=1", "T=0.8 top_p=0.95"], proc.stdout
    assert all(int(r[1].replace(",", "")) > 0 and int(r[2].replace(",", "")) > 0 for r in rows)


def test_cpu_attention_bench_quick():
    """bench/cpu_attention.py (native prompt attention against SDPA) end to end, shortened: a row per shape with
    a ratio, and the two sides agree (the script exits 1 when they do not)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_attention.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    rows = re.findall(r"^\| (tiny GQA|tiny MHA) \|.*\| ([\d.]+)x \| ([\d.e+-]+) \|$", proc.stdout, flags=re.M)
    assert [r[0] for r in rows] == ["tiny GQA", "tiny MHA"], proc.stdout
    assert all(float(r[1]) > 0 and float(r[2]) <= 1e-4 for r in rows), proc.stdout
    assert "torch " + torch.__version__ in proc.stdout and "fp32, causal" in proc.stdout


def test_host_overhead_bench_quick():
    """bench/host_overhead.py (the engine's own time per token, model arithmetic taken out) end to end, shortened:
    every mode and path has a row, and the engine's share of a token's time is positive and below the whole."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "host_overhead.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    cell = r"([\d.]+) / ([\d.]+)"
    rows = re.findall(rf"^\s+(greedy|sampled|greedy\+logprobs)\s+(cpu|async)\s+{cell}\s+{cell}$", proc.stdout,
                      flags=re.M)
    assert [(r[0], r[1]) for r in rows] == [(m, p) for m in ("greedy", "sampled", "greedy+logprobs")
                                            for p in ("cpu", "async")], proc.stdout
    for r in rows:
        for engine, whole in ((float(r[2]), float(r[3])), (float(r[4]), float(r[5]))):
            assert 0 < engine < whole, r


@pytest.mark.parametrize("flags", [[], ["--engine-process"]], ids=["one-process", "engine-process"])
def test_http_overhead_bench_quick(flags):
    """bench/http_overhead.py (the server's HTTP side behind a fixed-wait engine) end to end, shortened, in one
    process and with the engine in its own: every stream gets all its tokens (the script checks) and the row
    has its numbers."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "http_overhead.py"), "--quick", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    [row] = [line.split() for line in proc.stdout.splitlines() if re.match(r"\s+4\s+1\s", line)]
    assert len(row) == 11 and row[4].endswith("x") and float(row[6]) >= 1.0, proc.stdout
    if not flags:
        bad = subprocess.run([sys.executable, str(ROOT / "bench" / "http_overhead.py"), "--streams", "x"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "--streams takes integers" in bad.stderr


@pytest.mark.parametrize("script,rows,checked", [
    # each fused kernel against the torch ops it replaces
    ("bench_fused.py", "1,3,40", "checked: add + rmsnorm, rope + cache write, silu * up equal the torch ops"),
    # each product against the unfused ops
    ("bench_gemv.py", "1,3", "checked: gemv, rmsnorm_gemv, silu_mul_gemv equal the unfused ops"),
])
def test_fused_kernel_bench_checks_run_on_the_interpreter(script, rows, checked):
    """A fused-kernel benchmark's correctness checks (which the GPU run also makes before timing) at tiny
    shapes on the CPU's Triton interpreter."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / script), "--check-only", "--tiny", "--dtype", "fp32", "--rows", rows]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert checked in proc.stdout


@pytest.mark.parametrize("flags,configs", [((), (62, 62, 31)), (("--rows", "3", "--kinds", "fma,best"), (27, 29, 14))])
def test_gemv_config_sweep_checks_every_config_on_the_interpreter(flags, configs):
    """bench/gemv_configs.py (a GPU lease's launch-config sweep of kernels.gemv) checks each config of its grid
    against the unfused ops before timing it: on the interpreter, at tiny shapes, every one must agree, the
    split-K ones launched twice (their arrival counters back at zero in between)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / "gemv_configs.py"), "--check-only", "--tiny", *flags]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    counts = tuple(int(c) for c in re.findall(r"^\S+ \d+x\d+: (\d+) configs equal the unfused ops, 0 failed$",
                                              proc.stdout, flags=re.M))
    assert counts == configs and "checked: every config equals the unfused ops" in proc.stdout, proc.stdout


def test_blas_variants_checks_each_product_on_the_cpu(capsys, monkeypatch):
    """bench/blas_variants.py (a GPU lease's cuBLAS variants of the decode products) checks every variant's product
    against fp64 before timing it: on the CPU the ones that apply there agree, and a wrong one fails the run."""
    bench = load_script("blas_variants")
    assert bench.main(["--check-only", "--tiny", "--rows", "1,3"]) == 0
    out = capsys.readouterr().out
    counts = re.findall(r"^(\S+) \d+x\d+ rows (\d): (\d) variants equal the fp64 product$", out, flags=re.M)
    assert counts == [("qkv", "1", "3"), ("down", "1", "3"), ("qkv", "3", "2"), ("down", "3", "2")], out
    real = bench.variants
    monkeypatch.setattr(bench, "variants", lambda x, *rest: real(x, *rest) + [
        ("transposed by mistake", lambda w: (x @ w.T).flip(-1), bench.contextlib.nullcontext)])
    assert bench.main(["--check-only", "--tiny", "--rows", "2"]) == 1
    assert "transposed by mistake: WRONG" in capsys.readouterr().out


def test_hf_step_check_runs_on_the_cpu():
    """bench/hf_step_check.py (HF generate timed several ways, a GPU diagnostic) at a tiny shape on the CPU."""
    pytest.importorskip("transformers")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "hf_step_check.py"), "--shape", "tiny-llama",
                           "--device", "cpu", "--new-tokens", "4", "--reps", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    rows = re.findall(r"^(generate as serve_bench calls it|generate, max_new_tokens only|bare loop: .*?)\s+"
                      r"([\d.]+) ms/step\s+([\d.]+) tok/s$", proc.stdout, flags=re.M)
    assert len(rows) == 3 and all(float(ms) > 0 for _, ms, _ in rows), proc.stdout
    assert "one decode forward:" in proc.stdout and proc.stdout.startswith("tiny-llama on cpu")


def test_scoring_itl_bench_quick(llama_dir, capsys):
    """bench/scoring_itl.py end to end at a tiny size: a live server, a stream and a perplexity job."""
    bench = load_script("scoring_itl")
    assert bench.main(["--model", str(llama_dir), "--runs", "1", "--texts", "3", "--text-tokens", "100",
                       "--stream-tokens", "20"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"run 0: scoring [\d.]+ s; stream ITL p50 [\d.]+ ms, p99 [\d.]+ ms, max \d+ ms \(\d+ chunks\)",
                     out), out



def test_gpu_train_bench_runs_and_profiles_a_tiny_shape_on_the_cpu():
    """bench/train_bench.py (the GPU's MFU benchmark: Kiln's step beside a nanoGPT loop) smoke-tested on the CPU at
    a tiny shape, with `--profile`: each side's step time by category, the categories adding up to the whole."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_bench.py"), "--device", "cpu", "--n-layer", "2",
                           "--d-model", "64", "--n-head", "4", "--vocab", "512", "--batch", "2", "--seq", "64",
                           "--steps", "2", "--warmup", "1", "--no-compile", "--profile", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    for side in ("kiln", "nanoGPT"):
        block = proc.stdout.split(f"{side} profile: ", 1)[1].split("  top:", 1)[0]
        total = float(block.split(" ms", 1)[0])
        shares = [float(m) for m in re.findall(r"^  \S.*? ([\d.]+) ms +[\d.]+%$", block, flags=re.M)]
        assert total > 0 and "matmul" in block and abs(sum(shares) - total) < 0.05 * total + 0.02, block
    assert re.search(r"^kiln +[\d.]+ ms/step +[\d,]+ tokens/s$", proc.stdout, flags=re.M), proc.stdout
    assert "kiln / nanoGPT throughput:" in proc.stdout


def test_cpu_train_bench_quick():
    """bench/cpu_train.py (a CPU training step: Kiln, Kiln without its native kernels, HF) end to end, shortened:
    a row per precision, and the three sides' first losses agree (the script exits 1 when they do not)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_train.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    rows = re.findall(r"^\| tiny \| [\d.]+M \| 2 x 16 \| (fp32|bf16) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \|",
                      proc.stdout, flags=re.M)
    assert [r[0] for r in rows] == ["fp32", "bf16"], proc.stdout
    assert all(int(n.replace(",", "")) > 0 for r in rows for n in r[1:]), proc.stdout
    assert "torch " + torch.__version__ in proc.stdout and "transformers " in proc.stdout
