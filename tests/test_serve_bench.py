"""Smoke test of bench/serve_bench.py (issue 8's serving benchmark) at its tiny CPU shapes.

The subprocess run builds a tiny random GPT-2 and a tiny random Llama (whose vocab is larger
than the tokenizer's, as the real Llama 1.1B shape's is), measures HF `generate` against Kiln's
engine at batch 1 and 4, runs a live `kiln serve` with a small Poisson load, and must exit 0:
it does only when Kiln's fp32 greedy tokens equal HF's, no online request failed and the server
stopped cleanly. Speeds are not checked (a shared 2-core machine), only that they are sane.
The pure helpers (percentiles, arrivals, /metrics parsing, the tables) are tested directly.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "serve_bench.py"


def load_bench():
    return load_script("serve_bench")


def test_tiny_run_end_to_end(tmp_path):
    out_json = tmp_path / "results.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--threads", "1", "--batches", "1,4",
           "--new-tokens", "16", "--reps", "1", "--online-requests", "10", "--online-rates", "8",
           "--online-prompt-len", "8:48", "--online-output-len", "4:24", "--online-clients", "2", "--markdown",
           "--json", str(out_json)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    out = proc.stdout
    assert out.startswith("## Serving benchmark (issue 8): Kiln vs HF transformers, "), out
    assert "`python bench/serve_bench.py --tiny --device cpu --threads 1 --batches 1,4 " in out, out
    for row in ("| shape | params | weights | Kiln b1 tok/s |", "| tiny-gpt2 | 1 |", "| tiny-gpt2 | 4 |",
                "| tiny-llama | 1 |", "| tiny-llama | 4 |", "| tiny-gpt2 | 8 | 10 | 0 | 0 | 0 |",
                "| tiny-llama | 8 | 10 | 0 | 0 | 0 |",
                "tiny-gpt2: greedy tokens, Kiln == HF at batch 1: 16/16 agree.",
                "tiny-llama: greedy tokens, Kiln == HF at batch 1: 16/16 agree, HF limited to the tokenizer's",
                "tiny-gpt2: batch 1 with async scheduling ", "the default here is per-step)",
                "at most 60 s per rate, 2 load-generator processes)"):
        assert row in out, f"missing {row!r} in:\n{out}"

    report = json.loads(out_json.read_text())
    assert report["problems"] == []
    env = report["environment"]
    assert env["device_type"] == "cpu" and env["torch"] and env["transformers"]
    assert report["bandwidth"]["gb_s"] > 0
    names = [r["name"] for r in report["results"]]
    assert names == ["tiny-gpt2", "tiny-llama"]
    for r in report["results"]:
        assert r["errors"] == []
        assert r["model"]["vocab"] == r["model"]["tokenizer_vocab"] + r["shape"]["vocab_pad"]
        for side in ("hf", "kiln"):
            assert r[side]["status"] == {"1": "ok", "4": "ok"}
            for batch, tok_s in r[side]["tok_s"].items():
                assert math.isfinite(tok_s) and tok_s > 0, f"{r['name']} {side} batch {batch}: {tok_s}"
        assert r["kiln"]["weight_bytes"] > 0 and r["roofline_tok_s"] > 0 and 0 < r["roofline_fraction"]
        assert r["greedy"]["agree"] == r["greedy"]["compared"] == 16
        assert r["kiln"]["scheduling"]["async"] is False and r["kiln"]["scheduling"]["other_tok_s"] > 0
        online = r["online"]
        assert online["exit_code"] == 0 and 0 < online["health_s"] < 120
        [rate] = online["rates"]
        assert rate["rate"] == 8 and rate["requests"] == 10
        assert (rate["completed"], rate["cancelled"], rate["not_sent"], rate["errors"]) == (10, 0, 0, 0)
        assert rate["output_tok_s"] > 0 and rate["output_tokens"] >= 10 * 4
        for metric in ("ttft", "itl", "tpot"):
            p50, p99 = rate[f"{metric}_p50_ms"], rate[f"{metric}_p99_ms"]
            assert 0 <= p50 <= p99, f"{metric}: p50 {p50} p99 {p99}"
        assert rate["ttft_p50_ms"] > 0
        # the server's side of the rate, from /metrics scraped around it (bucket bounds)
        assert rate["step_p99_ms"] > 0 and rate["loop_delay_p99_ms"] > 0
        assert rate["chunks"] <= rate["output_tokens"]
        assert online["metrics"]["kiln_prefix_cache_queries_total"] >= rate["prompt_tokens"]
        assert online["metrics"]["kiln_num_preemptions_total"] == 0
    print(f"serve_bench smoke run: {elapsed:.1f} s")


def test_cpu_needs_tiny_shapes():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--skip-online"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "pass --tiny" in proc.stderr, proc.stderr


def test_pdl_needs_gemv_and_a_gpu():
    """--pdl (programmatic dependent launch for the fused-gemv step) is refused by name without --gemv, and off
    a CUDA device of compute capability 9.0+, before any model is built."""
    base = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--skip-online", "--skip-hf"]
    for flags, message in ((["--pdl"], "--pdl applies to the kernels.gemv step: add --gemv"),
                           (["--gemv", "--pdl"], "--pdl: programmatic dependent launch needs compiled Triton kernels")):
        proc = subprocess.run([*base, *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_help():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for flag in ("--shapes", "--tiny", "--batches", "--online-rates", "--skip-hf", "--skip-online", "--markdown",
                 "--json"):
        assert flag in proc.stdout


def test_percentile_arrivals_metrics():
    bench = load_bench()
    assert bench.percentile([], 50) is None
    assert bench.percentile([3.0], 99) == 3.0
    assert bench.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert bench.percentile(list(range(101)), 99) == pytest.approx(99.0)

    a = bench.poisson_arrivals(2000, 8.0, random.Random(1))
    assert a == sorted(a) and a[0] > 0
    assert a == bench.poisson_arrivals(2000, 8.0, random.Random(1))
    assert 2000 / a[-1] == pytest.approx(8.0, rel=0.1)

    text = "\n".join([
        "# HELP kiln_prefix_cache_hits_total Prompt tokens found in the prefix cache.",
        "# TYPE kiln_prefix_cache_hits_total counter",
        "kiln_prefix_cache_hits_total 48.0",
        "kiln_prefix_cache_hits_created 1.7e+09",
        "kiln_prefix_cache_queries_total 1024.0",
        'kiln_request_finish_total{finish_reason="length"} 10.0',
        "kiln_num_preemptions_total 0.0",
    ])
    m = bench.parse_metrics(text)
    assert m["kiln_prefix_cache_hits_total"] == 48.0 and m["kiln_prefix_cache_queries_total"] == 1024.0
    assert m['kiln_request_finish_total{finish_reason="length"}'] == 10.0
    assert m["kiln_num_preemptions_total"] == 0.0

    def scrape(counts):  # a histogram's cumulative buckets
        return {f'kiln_engine_step_seconds_bucket{{le="{le}"}}': float(c)
                for le, c in zip(["0.001", "0.01", "0.1", "+Inf"], counts)}

    before, after = scrape([5, 8, 10, 10]), scrape([5, 58, 108, 110])  # 100 new: 50 <= 10 ms, 48 <= 0.1 s, 2 over
    assert bench.histogram_quantile(before, after, "kiln_engine_step_seconds", 0.5) == 0.01
    assert bench.histogram_quantile(before, after, "kiln_engine_step_seconds", 0.99) == float("inf")
    assert bench.histogram_quantile(before, after, "kiln_engine_step_seconds", 0.9) == 0.1
    assert bench.histogram_quantile(after, after, "kiln_engine_step_seconds", 0.5) is None
    assert bench.histogram_quantile(before, after, "kiln_event_loop_delay_seconds", 0.5) is None


def test_summarize_and_tables():
    bench = load_bench()
    done = [{"prompt_len": 10, "output_len": 5, "ttft": 0.01 * (i + 1), "itl": [0.002, 0.003, 0.004, 0.001],
             "tokens": 5, "latency": 0.01 * (i + 1) + 0.01, "error": None, "done": True} for i in range(4)]
    failed = {"prompt_len": 10, "output_len": 5, "ttft": None, "itl": [], "tokens": 0, "latency": None,
              "error": "HTTP 500: boom", "done": False}
    s = bench.summarize(done + [failed], wall=2.0, cancelled=1, not_sent=1, rate=4.0, requests=7)
    assert (s["completed"], s["errors"], s["cancelled"], s["not_sent"], s["requests"]) == (4, 1, 1, 1, 7)
    assert s["output_tokens"] == 20 and s["output_tok_s"] == 10.0
    assert s["ttft_p50_ms"] == pytest.approx(25.0) and s["ttft_p50_ms"] <= s["ttft_p99_ms"]
    assert s["tpot_p50_ms"] == pytest.approx(2.5)
    assert s["error_messages"] == ["HTTP 500: boom"]

    result = {"name": "llama-1.1b", "errors": [], "roofline_tok_s": 1364.0, "roofline_fraction": 1000.0 / 1364.0,
              "hf_roofline_fraction": 66.0 / 1364.0,
              "kiln": {"params": 1_100_048_384, "weight_bytes": 2_200_096_768, "tok_s": {1: 1000.0, 32: 4000.0},
                       "status": {1: "ok", 32: "ok"}},
              "hf": {"tok_s": {1: 66.0, 32: None}, "status": {1: "ok", 32: "oom"}},
              "ratios": {1: 1000.0 / 66.0, 32: None}}
    [row] = bench.decode_rows([result])
    assert row == ["llama-1.1b", "1,100.0M", "2.200 GB", "1,000", "1,364", "73.3% (>= 70%: yes)", "66", "4.8%",
                   "15.15x (>= 10x: yes)"]
    rows = bench.offline_rows([result], [1, 32])
    assert rows == [["llama-1.1b", "1", "66", "1,000", "15.15x", ">= 10x", "yes"],
                    ["llama-1.1b", "32", "oom", "4,000", "-", ">= 3x", "-"]]
    md = bench.table(bench.OFFLINE_HEADER, rows, markdown=True)
    assert md[0] == "| shape | batch | HF tok/s | Kiln tok/s | Kiln/HF | target | met |"
    assert md[2] == "| llama-1.1b | 1 | 66 | 1,000 | 15.15x | >= 10x | yes |"


def test_gpu_session_script_refers_to_what_exists():
    """bench/gpu_session.sh only runs on a lent GPU: check here that it parses, refuses an unknown
    stage, and names files and flags that exist, so it does not rot between GPU sessions."""
    import re

    script = ROOT / "bench" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    proc = subprocess.run(["bash", str(script), "nonsense"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr
    text = script.read_text()
    paths = set(re.findall(r"\b((?:bench|tests|training/configs)/[\w./-]+\.(?:py|toml))", text))
    assert len(paths) > 10
    for path in paths:
        assert (ROOT / path).is_file(), path
    for call in re.findall(r"python3 (bench/\w+\.py)([^\n]*)", text):
        source = (ROOT / call[0]).read_text()
        for flag in re.findall(r"(--[a-z][\w-]*)", call[1]):
            assert f'"{flag}"' in source, f"{call[0]} has no {flag} option"
