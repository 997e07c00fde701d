"""Kiln's kernels on the Triton interpreter across the triton releases Kiln supports (3.6 and later).

triton 3.6's interpreter turns a one-element block into a Python int with ``int(array)``, which numpy
2.4 refuses; every kernel whose loop bound comes from a loaded value (flash attention, decode, cross-
entropy) failed on it. ``kernels._utils._interpreter_compat`` squeezes first, as later triton does."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from kernels import _utils

triton = pytest.importorskip("triton")
on_cpu_interpreter = pytest.mark.skipif(not _utils.triton_available("cpu"),
                                        reason="needs triton and TRITON_INTERPRET=1 set before triton is imported")


def _sum_to_loaded_bound(X, N, Out, BLOCK: tl.constexpr):  # noqa: F821  (tl is bound by jit_kernel)
    n = tl.load(N)  # noqa: F821  (a scalar from memory: a one-element block on the interpreter)
    acc = tl.zeros([BLOCK], dtype=tl.float32)  # noqa: F821
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)  # noqa: F821
        acc += tl.load(X + offs, mask=offs < n, other=0.0)  # noqa: F821
    tl.store(Out, tl.sum(acc, axis=0))  # noqa: F821


@on_cpu_interpreter
def test_a_loop_bound_loaded_from_memory_runs():
    kernel = _utils.jit_kernel(_sum_to_loaded_bound)
    x = torch.arange(37, dtype=torch.float32)
    out = torch.zeros(1)
    kernel[(1,)](x, torch.tensor([37], dtype=torch.int32), out, BLOCK=16)
    assert out.item() == x.sum().item()


class _Scope:
    def __init__(self) -> None:
        self.attrs = {}

    def set_attr(self, obj, name, value):
        self.attrs[name] = value


def _one_element_block(value):
    return types.SimpleNamespace(handle=types.SimpleNamespace(data=np.array([value])))


def test_an_interpreter_that_cannot_convert_one_element_blocks_is_patched(monkeypatch):
    from triton.runtime import interpreter

    def triton_3_6(tensor, scope):  # what 3.6 installs
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    if np.lib.NumpyVersion(np.__version__) < "2.4.0":
        pytest.skip("numpy < 2.4 still converts a one-element array to int: 3.6's interpreter works as it is")
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", triton_3_6)
    with pytest.raises(TypeError):
        int(np.array([5]))
    _utils._interpreter_compat.__wrapped__()
    assert interpreter._patch_lang_tensor is not triton_3_6
    scope = _Scope()
    interpreter._patch_lang_tensor(type("T", (), {}), scope)
    assert scope.attrs["__index__"](_one_element_block(5)) == 5


def test_an_interpreter_that_converts_them_is_left_alone(monkeypatch):
    from triton.runtime import interpreter

    def newer(tensor, scope):
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", newer)
    _utils._interpreter_compat.__wrapped__()
    assert interpreter._patch_lang_tensor is newer
