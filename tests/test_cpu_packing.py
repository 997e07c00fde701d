"""Prepacked oneDNN linears (model/cpu_packing.py): same outputs, repacked after in-place edits,
and never on the gradient path."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import cpu_packing

pytestmark = pytest.mark.skipif(not cpu_packing.available(), reason="this torch build has no oneDNN packing")


def test_packed_linears_match_and_follow_weight_edits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 40, bias=False))
    x = torch.randn(3, 17, 48)
    with torch.no_grad():
        want = model(x)
    assert cpu_packing.pack_linears(model) == 2
    with torch.inference_mode():
        got = model(x)
    assert model[0]._kiln_packed is not None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        model[2].weight.mul_(2.0)  # an in-place edit after packing: the stale pack must not be used
        torch.testing.assert_close(model(x), F.linear(F.gelu(model[0](x)), model[2].weight), rtol=1e-5, atol=1e-5)
    # with gradients the plain path runs, and they reach the weights
    model(x).sum().backward()
    assert model[0].weight.grad is not None and model[2].weight.grad is not None


def test_not_applied_off_fp32_cpu():
    assert cpu_packing.pack_linears(nn.Sequential(nn.Linear(8, 8).double())) == 0
    assert cpu_packing.pack_linears(nn.Sequential(nn.ReLU())) == 0
