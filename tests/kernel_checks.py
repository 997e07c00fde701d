"""Shared by the kernel tests: skip markers and a closeness check that reports max/mean error."""

from __future__ import annotations

import pytest
import torch

from kernels import _utils


def skip_unless_interpreted(kernel_module) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not kernel_module.available("cpu"),
                              reason="needs triton and TRITON_INTERPRET=1 set before triton is imported")


requires_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _utils.triton_importable() and not _utils.interpreting()),
    reason="needs a CUDA GPU, triton, and TRITON_INTERPRET unset",
)


def assert_close(actual, expected, atol, rtol, what, equal_nan=False):
    actual, expected = actual.double(), expected.double()
    ok = torch.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=equal_nan)
    if not bool(ok.all()):
        diff = (actual - expected).abs().nan_to_num(float("inf"))
        raise AssertionError(
            f"{what}: max err {diff.max().item():.3e}, mean err {diff.mean().item():.3e}, "
            f"{int((~ok).sum())}/{ok.numel()} elements off (atol={atol}, rtol={rtol})"
        )
