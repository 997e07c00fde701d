"""The serving step's modules never build a device tensor from host data with a copy that syncs.

On CUDA, `torch.tensor(data, device=cuda)` (and `torch.as_tensor`) copies from pageable memory,
which waits for everything queued on the stream: one such call in the decode step undoes async
scheduling. `model.transfer.to_device` / `upload` go through pinned memory instead, and device
constants come from `new_full` / `torch.full`. `.item()` reads a value back (a sync by
definition). This static check covers the modules a decode step runs through; the GPU test
`test_decode_steps_never_sync_on_gpu` checks the running step under torch's sync debug mode.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP_MODULES = ("engine.py", "sampling.py", "kv_cache.py", "cuda_graphs.py", "attention.py", "transformer.py")
COPYING_CONSTRUCTORS = {"tensor", "as_tensor"}


def syncing_calls(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        name = node.func.attr
        on_torch = isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
        if on_torch and name in COPYING_CONSTRUCTORS and any(k.arg == "device" for k in node.keywords):
            found.append(f"line {node.lineno}: torch.{name}(..., device=...)")
        elif name == "item" and not node.args:
            found.append(f"line {node.lineno}: .item()")
    return found


def test_step_modules_have_no_syncing_copies():
    violations = [f"model/{name} {call}" for name in STEP_MODULES
                  for call in syncing_calls((ROOT / "model" / name).read_text())]
    assert not violations, "\n".join(violations)


def test_the_checker_sees_syncing_calls():
    source = ("import torch\nx = torch.tensor([1], device=d)\ny = torch.as_tensor(a, dtype=t, device=d)\n"
              "z = x.sum().item()\nok = torch.tensor([1])\nok2 = torch.zeros(3, device=d)\n")
    assert syncing_calls(source) == ["line 2: torch.tensor(..., device=...)",
                                     "line 3: torch.as_tensor(..., device=...)", "line 4: .item()"]
