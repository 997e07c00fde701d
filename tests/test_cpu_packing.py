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


def test_a_model_whose_copies_would_not_fit_is_left_unpacked(monkeypatch, caplog):
    """The packs double the matrices' memory: a model that fits only once must load, unpacked."""
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))  # 2 x 16 KiB of fp32 weights
    monkeypatch.setattr(cpu_packing, "available_memory", lambda: 60 * 1024)  # half of it < 32 KiB
    assert cpu_packing.pack_linears(model) == 0
    assert getattr(model[0], "_kiln_packed", None) is None and "not prepacking" in caplog.text
    monkeypatch.setattr(cpu_packing, "available_memory", lambda: 70 * 1024)
    assert cpu_packing.pack_linears(model) == 2
    monkeypatch.undo()
    assert cpu_packing.available_memory() is None or cpu_packing.available_memory() > 0
