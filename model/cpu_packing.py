"""Prepacked oneDNN weights for the model's linear layers on the CPU (prefill and scoring).

On these CPUs oneDNN's linear with a weight reordered ahead of time
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor does for CPU linears) runs the
prompt-sized matrix products of prefill and scoring 1.7-2.5x faster than `F.linear` (MKL),
with the same results to fp32 rounding. `pack_linears(model)` gives every `nn.Linear` of a
CPU fp32 model a packed copy of its weight and routes its forward there when no gradient is
needed; training, other dtypes and devices keep the plain path. A weight changed in place
after packing is noticed (its version counter moves) and repacked.

The packs are copies: they double the memory the matrices take. A model whose copies would
take more than half of the memory still available (`MemAvailable`) is left unpacked (slower
prefill, and no out-of-memory kill for a model that fits only once). A server needs no
gradients and never changes its weights, so `pack_linears(model, release=True)` drops each
fp32 original as soon as its pack is made (as vLLM's CPU backend does with its oneDNN
handles): the packs then take the originals' place instead of doubling them, and only one
matrix at a time needs room. Such a model runs its linear layers only through the packs;
`dense_weight` rebuilds a matrix from its pack where one is needed (the native step's copy).

On CPUs with Intel AMX (Sapphire Rapids and later) oneDNN multiplies bf16 matrices about 7x as
fast as fp32 ones. `bf16_copy(model)` makes a bf16 twin of an fp32 model for its prompt forwards
and scoring when asked for (`Engine(prefill_dtype="bf16")`: faster, but logprobs move by ~1e-2);
`amx_bf16()` says whether this CPU has AMX (training's bf16 autocast follows it), and
`exactly_bf16` whether a weight survives a bf16 copy unchanged (checkpoints stored in bf16).

The fp32 prompts can use the AMX tiles too, without bf16's error: `amx_linears(model, ops)` gives every
linear layer whose weight is exactly bf16 a bf16 pack for the native module's `amx_linear` (model/native),
which splits each fp32 activation into AMX_PARTS bf16 parts and sums their exact products in fp32: the
precision of an fp32 product (measured: the same max error against fp64 as `F.linear`), 1.3-2.2x its speed
at prompt sizes on this project's Sapphire Rapids machine.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import time
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

PACK_BATCH = 512  # the row count the packing is tuned for: prefill chunks and scoring windows
MAX_MEMORY_SHARE = 0.5  # packs may take at most this share of the memory still available

log = logging.getLogger("kiln.cpu_packing")


def fits_in_memory(nbytes: int) -> tuple[bool, int | None]:
    """(whether a copy of `nbytes` takes at most MAX_MEMORY_SHARE of the memory still available, that
    memory in bytes or None when unknown -- then it is taken to fit)."""
    free = available_memory()
    return free is None or nbytes <= MAX_MEMORY_SHARE * free, free


def available_memory() -> int | None:
    """Bytes of memory still available to new allocations (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def pack_weight(weight: torch.Tensor, bias: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
    """A oneDNN-reordered copy of `weight` tuned for `batch_size` rows, or None when this build
    cannot pack or the packed product does not reproduce `F.linear` to fp32 rounding."""
    if not available():
        return None
    probe = torch.randn(batch_size, weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size)
            got = torch.ops.mkldnn._linear_pointwise(probe, packed, bias, "none", [], "")
        except (RuntimeError, AttributeError):
            return None
        if not torch.allclose(got, F.linear(probe, weight, bias), rtol=1e-5, atol=1e-5):
            return None
    return packed


def _pack(module: nn.Linear) -> None:
    with torch.no_grad():
        module._kiln_packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), PACK_BATCH)
    module._kiln_packed_version = module.weight._version


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if self._kiln_released:
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.requires_grad:
            raise RuntimeError("this linear layer keeps only its oneDNN pack (its fp32 weight was released for "
                               f"serving): it takes fp32 CPU inputs without gradients, got {x.dtype} on "
                               f"{x.device.type}{' requiring grad' if x.requires_grad else ''}")
    elif torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() < 2:
        return F.linear(x, self.weight, self.bias)
    elif self.weight._version != self._kiln_packed_version:
        _pack(self)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(rows, self._kiln_packed, self.bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


def pack_linears(model: nn.Module, release: bool = False) -> int:
    """Pack every linear layer of a CPU fp32 model; returns how many (0 when not applicable).

    The first layer's pack is checked against `F.linear` (`pack_weight`); if it does not
    reproduce it, nothing is packed. Layers packed before (another engine on the same model)
    keep their packs. `release` drops each layer's fp32 weight once its pack is made (weights
    tied to an embedding stay): for serving only, see the module's docstring and `release_weights`."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears or any(m.weight.device.type != "cpu" or m.weight.dtype != torch.float32 for m in linears):
        return 0
    todo = list({id(m.weight): m for m in linears if getattr(m, "_kiln_packed", None) is None}.values())
    kept = _tied_elsewhere(model) if release else set()
    sizes = {id(m.weight): m.weight.numel() * m.weight.element_size() for m in todo}
    # released originals make room for their packs as they go (one matrix at a time); kept ones do not
    freed = [size for key, size in sizes.items() if release and key not in kept]
    needed = sum(sizes.values()) - sum(freed) + max(freed, default=0)
    fits, free = fits_in_memory(needed)
    if todo and not fits:
        log.warning("not prepacking the linear layers for oneDNN: the copies would take %.1f GB of the %.1f GB "
                    "still available (prefill and scoring run on F.linear instead)", needed / 1e9, free / 1e9)
        return 0
    if todo and pack_weight(todo[0].weight, todo[0].bias, PACK_BATCH) is None:
        return 0
    for module in linears:
        if getattr(module, "_kiln_packed", None) is None:
            _pack(module)
            module._kiln_released = False
        if release and not module._kiln_released and id(module.weight) not in kept:
            _release(module)
        module.forward = types.MethodType(_packed_forward, module)
    if release:
        trim_heap()
    return len(linears)


def trim_heap() -> None:
    """Hand the heap's free pages back to the system (glibc's `malloc_trim`): matrices below glibc's mmap
    threshold are freed into the heap, where they would go on counting in the process's memory. A no-op
    where there is no such function."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _tied_elsewhere(model: nn.Module) -> set[int]:
    """ids of the parameters that modules other than linear layers hold too (an embedding tied to the LM head)."""
    return {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}


def _release(module: nn.Linear) -> None:
    """Replace a packed layer's fp32 weight by an empty placeholder (the pack now stands for it)."""
    placeholder = nn.Parameter(torch.empty(0, dtype=module.weight.dtype), requires_grad=False)
    if getattr(module, "_kiln_amx_source", None) is module.weight:  # (AMX packs made before: see amx_linears)
        module._kiln_amx_source, module._kiln_amx_version = placeholder, placeholder._version
    module.weight = placeholder
    module._kiln_released = True


def released(module: nn.Module) -> bool:
    """Whether any linear layer of `module` (or `module` itself) keeps only its oneDNN pack."""
    return any(getattr(m, "_kiln_released", False) for m in module.modules())


def released_bytes(module: nn.Module) -> int:
    """The bytes of fp32 matrices `module`'s linear layers no longer hold (kept only as their oneDNN packs)."""
    return sum(m.in_features * m.out_features * 4 for m in module.modules() if getattr(m, "_kiln_released", False))


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight matrix: its own, or rebuilt from its oneDNN pack when released (a new copy)."""
    if getattr(module, "_kiln_released", False):
        return module._kiln_packed.to_dense()
    return module.weight


AMX_PARTS = 3  # bf16 parts of each fp32 activation: 3 keep fp32's precision (2: ~5x its error, faster)


def amx_linears(model: nn.Module, ops) -> int:
    """Route the fp32 no-grad forwards of the model's CPU linear layers through `ops.amx_linear` on a packed bf16
    copy of their weights; returns how many layers run there. `nn.Linear`s qualify when their weight is exactly
    bf16, int8 layers (model/quantize.py `Int8Linear`) always: their int8 values are bf16 numbers, and their row
    scales multiply the outputs. Both need an even input width. 0 without AMX (or an ISA cap without it),
    without the micro-kernel in this torch, or when the packs (two bytes a weight) would not fit in memory.
    Layers packed before keep their packs (and count)."""
    from .quantize import Int8Linear, unpack_tiles

    if ops is None or not amx_bf16() or not ops.amx_ready():
        return 0
    layers = [m for m in model.modules() if (isinstance(m, nn.Linear) and m.weight.device.type == "cpu"
                                              and m.weight.dtype == torch.float32 or isinstance(m, Int8Linear))
              and m.in_features % 2 == 0]
    todo = [m for m in layers if getattr(m, "_kiln_amx", None) is None
            and (isinstance(m, Int8Linear) or exactly_bf16(dense_weight(m)))]
    needed = sum(m.in_features * m.out_features * 2 for m in todo)
    fits, free = fits_in_memory(needed)
    if todo and not fits:
        log.warning("not packing the linear layers for AMX: the copies would take %.1f GB of the %.1f GB still "
                    "available", needed / 1e9, free / 1e9)
        return 0
    with torch.no_grad():
        for module in todo:
            if isinstance(module, Int8Linear):
                module._kiln_amx = ops.amx_pack(unpack_tiles(module.tiles, module.out_features).float())
                module._kiln_amx_source, module._kiln_amx_scale = module.tiles, module.scale
            else:
                module._kiln_amx = ops.amx_pack(dense_weight(module).detach())
                module._kiln_amx_source, module._kiln_amx_scale = module.weight, _EMPTY
            module._kiln_amx_version = module._kiln_amx_source._version
            module._kiln_amx_ops = ops
    packed = [m for m in layers if getattr(m, "_kiln_amx", None) is not None]
    for module in packed:  # (again after `pack_linears`, which another engine on this model may have run since)
        if getattr(module.forward, "__func__", None) is not _amx_forward:
            module._kiln_amx_fallback = module.forward  # oneDNN's packs, F.linear, or the int8 dequantization
            module.forward = types.MethodType(_amx_forward, module)
    return len(packed)


_EMPTY = torch.empty(0)


def _amx_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if (torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() < 2
            or self._kiln_amx_source._version != self._kiln_amx_version):  # (changed in place: the plain path)
        return self._kiln_amx_fallback(x)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = self._kiln_amx_ops.amx_linear(rows, self._kiln_amx, _EMPTY if self.bias is None else self.bias,
                                        self.out_features, AMX_PARTS, self._kiln_amx_scale)
    return out.view(*x.shape[:-1], self.out_features)


def amx_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices on AMX tiles, where a bf16 forward is worth it.

    On this project's Sapphire Rapids machine a bf16 `F.linear` of prompt-sized matrices ran 7.5x the
    fp32 one, and the default model's 8 x 512-token forward 3.5x; with oneDNN held to AVX512-BF16
    (`ONEDNN_MAX_CPU_ISA`) the bf16 forward was 0.93x fp32, and with plain AVX-512 0.4x (bf16
    emulated). So only AMX counts, and a user's ISA cap without AMX turns it off."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa and isa not in ("ALL", "DEFAULT") and "AMX" not in isa:
        return False
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe()) and torch.backends.mkldnn.is_available()


BF16_SPEEDUP = 1.5  # bf16 products must run this many times as fast as fp32 ones for bf16 training to pay


@functools.cache
def bf16_matmul_speedup() -> float:
    """How many times as fast as fp32 this CPU multiplies bf16 matrices through torch, on torch's current
    threads: a (256, 1024) x (1024, 1024) product timed once per process, best of 3 each (~30 ms in all).

    Flags cannot say it: AVX-512 BF16 ran bf16 products 2.4-3.5x fp32's on a 2-vCPU AMD EPYC (a training
    step of the default model's shape 1.7-1.9x), yet held to that ISA on Sapphire Rapids a bf16 forward was
    0.93x fp32's (`amx_bf16`); without the instructions bf16 is emulated (0.4x)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 1024, generator=g), torch.randn(1024, 1024, generator=g)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        torch.mm(x, y)  # warm-up (oneDNN builds its kernel on the first call)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            torch.mm(x, y)
            times.append(time.perf_counter() - started)
        return min(times)

    return best(a, b) / best(a.bfloat16(), b.bfloat16())


def exactly_bf16(weight: torch.Tensor) -> bool:
    """Whether every element of a float tensor is a bf16 number (so a bf16 copy loses nothing)."""
    w = weight.detach()
    return bool(torch.equal(w.to(torch.bfloat16).to(w.dtype), w))


PREFILL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_prefill_dtype(model: nn.Module, requested: str) -> torch.dtype:
    """What a model's prompt forwards and scoring compute in, for `requested` "auto", "fp32" or "bf16".

    Only fp32 models on the CPU (int8-quantized ones included) have a choice: "bf16" runs them through a
    bf16 copy (`bf16_copy`; 2-3.5x faster on CPUs with AMX, `amx_bf16`). "auto" is the model's own dtype:
    bf16 activations move prompt logprobs by ~1e-2 nats per token (lm-eval's scores would no longer match
    an fp32 reference within 1e-3), and keys and values computed in bf16 beside those the fp32 paths
    compute (short prompts through the native step, the prefix cache) would make a greedy continuation
    depend on which path its prompt took. Other models compute in their own dtype; asking them for
    another raises ValueError."""
    if requested != "auto" and requested not in PREFILL_DTYPES:
        raise ValueError(f"prefill_dtype must be one of auto, fp32, bf16; got {requested!r}")
    weight = model.embed.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        if requested != "auto" and PREFILL_DTYPES[requested] != weight.dtype:
            raise ValueError(f"prefill dtype {requested} applies to fp32 models on the CPU; this model is "
                             f"{str(weight.dtype).removeprefix('torch.')} on {weight.device.type} and computes its "
                             "prompts in its own dtype")
        return weight.dtype
    return torch.float32 if requested == "auto" else PREFILL_DTYPES[requested]


def bf16_copy(model: nn.Module) -> nn.Module:
    """A bf16 copy of a CPU model (weights, norms and rotary tables in bf16, as `load_model(dtype="bf16")`
    builds it), sharing no storage with it; its forward is the same code in bf16 arithmetic. An int8
    model's layers become plain bf16 linears of their dequantized weights (its LM head keeps its own
    weights, as it does in the int8 model, even where the config ties it to the embedding)."""
    from .checkpoint import build_model
    from .quantize import Int8Linear

    int8 = {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    state = {name: t.detach().to(torch.bfloat16, copy=True) for name, t in model.state_dict().items()
             if name.rpartition(".")[0] not in int8}
    for name, m in int8.items():
        state[f"{name}.weight"] = m.weight.to(torch.bfloat16)
        if m.bias is not None:
            state[f"{name}.bias"] = m.bias.to(torch.bfloat16)
    return build_model(model.config, state, model.embed.weight.device, torch.bfloat16, model.attn_backend,
                       tie_head="lm_head" not in int8)
