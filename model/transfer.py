"""Copies between host and device that do not wait for the GPU.

A plain `tensor.to("cuda")` from pageable host memory synchronizes the stream, and so does
`.tolist()` on a CUDA tensor: a scheduler that builds each step's small index tensors on the
host, or reads the sampled ids back at once, would stall the GPU every token. Here inputs go
through pinned memory with `non_blocking=True`, and results come back into pinned memory behind
a CUDA event that is waited on only when the host needs the values (one step later, see
`model.engine`). On the CPU both are plain copies.
"""

from __future__ import annotations

from typing import Sequence

import torch


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, without a stream sync on CUDA."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_device(data: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.tensor(data, dtype=dtype, device=device), without a stream sync on CUDA."""
    return upload(torch.tensor(data, dtype=dtype), device)


class HostCopy:
    """Device tensors (None allowed) on their way to the host; `lists()` waits and converts."""

    def __init__(self, *tensors: torch.Tensor | None):
        self.event = None
        if any(t is not None and t.is_cuda for t in tensors):
            # non_blocking into pinned memory; the event marks when the copies are done
            self.tensors = [t.to("cpu", non_blocking=True) if t is not None else None for t in tensors]
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.tensors = list(tensors)

    def lists(self) -> list[list | None]:
        if self.event is not None:
            self.event.synchronize()
        return [t.tolist() if t is not None else None for t in self.tensors]
