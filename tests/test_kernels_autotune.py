"""How Kiln's autotuned kernels are timed: briefly, and cached on disk (checked without a GPU).

A kernel's first launch with a new autotune key (a new sequence-length bucket, say) times every
config before it runs; in a server that stalls the running batch, so the timing is short and the
choice is kept across restarts."""

from __future__ import annotations

import functools
import inspect

import pytest

from kernels import _utils

triton = pytest.importorskip("triton")


def _copy_kernel(X, Y, n, BLOCK: tl.constexpr):  # noqa: F821  (tl is bound by jit_kernel)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # noqa: F821
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)  # noqa: F821


def test_autotuned_kernels_time_briefly_and_cache_their_choice(monkeypatch):
    from triton.runtime.autotuner import Autotuner

    seen = {}
    real_autotune = triton.autotune

    @functools.wraps(real_autotune)  # (the same signature: jit_kernel reads it)
    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_autotune(*args, **kwargs)

    monkeypatch.setattr(triton, "autotune", spy)
    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # build the GPU path's autotuner
    kernel = _utils.jit_kernel(_copy_kernel, [_utils.config(BLOCK=64), _utils.config(BLOCK=128)],
                               _utils.config(BLOCK=16), key=["n"])
    assert isinstance(kernel.fn, Autotuner) and not kernel.fixed_meta and seen["key"] == ["n"]
    params = inspect.signature(real_autotune).parameters
    assert seen.get("cache_results") is ("cache_results" in params or None)
    if "do_bench" in params:
        calls = []
        monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: calls.append(kw) or [1.0, 1.0, 1.0])
        assert kernel.fn.do_bench(lambda: None, quantiles=(0.5, 0.2, 0.8)) == [1.0, 1.0, 1.0]
        assert calls == [{"warmup": _utils.AUTOTUNE_WARMUP_MS, "rep": _utils.AUTOTUNE_REP_MS,
                          "quantiles": (0.5, 0.2, 0.8)}]
    else:
        assert "do_bench" not in seen
    assert _utils.AUTOTUNE_WARMUP_MS + _utils.AUTOTUNE_REP_MS <= 50
