"""Shared plumbing for Kiln's Triton kernels: lazy Triton import, device checks, launch configs.

Owns four things every kernel file needs:

* Triton is optional and imported lazily: importing ``kernels.*`` never imports
  ``triton``, so the torch references work on any machine, and a test can still set
  ``TRITON_INTERPRET=1`` after importing the model (Triton reads that flag when
  *it* is imported: its own ``tl.max``/``tl.sum`` helpers are jitted then);
* ``triton_available(device)``: can a Triton kernel run on this device -- a CUDA
  device with Triton (>= 3.6) installed, or a CPU tensor while the Triton
  interpreter is on (``TRITON_INTERPRET=1`` set before triton was imported, since
  triton fixes its mode at import);
* ``jit_kernel``: jit a kernel function when it is first needed, autotuned over a
  list of configs on a GPU, or pinned to one config under the interpreter (which
  cannot autotune over several); ``jit_helpers`` jits the helpers kernels call. It
  binds ``tl`` (``triton.language``) into the kernel module's globals, where the
  kernel bodies look it up; kernel modules use ``from __future__ import annotations``
  so ``tl.constexpr`` annotations stay strings until then. Kernel modules cache the
  jitted objects with ``functools.cache``, so each kernel compiles once per process;
* ``kernel_op``: a launcher registered as a custom op (``kiln::...``), called directly when
  eager and through the op while torch.compile traces, so compiled training and decode
  steps hold each launch as one opaque node.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)


MIN_TRITON_VERSION = (3, 6)


def triton_importable() -> bool:
    """True when a ``triton`` >= 3.6 is installed (checked without importing it).

    Every kernel launch asks this (through ``triton_available``), so the slow part, reading
    the installed version from package metadata (hundreds of microseconds where many
    packages are installed), is done once per process.
    """
    try:
        if importlib.util.find_spec("triton") is None:
            return False
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] is None
        return False
    return _installed_triton_is_recent()


@functools.cache
def _installed_triton_is_recent() -> bool:
    try:
        release = importlib.metadata.version("triton").split("+")[0].split(".")
        return tuple(int(part) for part in release[:2]) >= MIN_TRITON_VERSION
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return True  # a source build without metadata: let the import decide


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks for the CPU interpreter (same spelling rules as Triton)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


def mode_matches_import() -> bool:
    """Triton fixes interpreted-vs-compiled when it is imported; ``TRITON_INTERPRET`` must still agree."""
    language = sys.modules.get("triton.language")
    if language is None:
        return True  # not imported yet: it will be, in the mode the flag asks for now
    return (type(language.max).__name__ == "InterpretedFunction") == interpreting()


def triton_available(device: torch.device | str) -> bool:
    """Can a Triton kernel run on tensors of ``device``?

    True for CUDA devices when Triton (>= 3.6) is installed, and for CPU tensors while
    the Triton interpreter is on. False otherwise (and when ``TRITON_INTERPRET``
    changed after triton was imported): use the ``*_reference`` function.
    """
    if not triton_importable() or not mode_matches_import():
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


# CUDA caps grid axes 1 and 2 at 65535 programs (axis 0 at 2^31 - 1). A module attribute, so tests can
# lower it to cover the fold on the interpreter.
MAX_GRID_Y = 65535


def grid_yz(n: int) -> tuple[int, int]:
    """n programs over grid axes 1 and 2: (y, z) with y <= MAX_GRID_Y and y * z >= n. A kernel takes
    index ``program_id(1) + program_id(2) * num_programs(1)`` and returns when it is >= n (only the last
    z row has such programs; below MAX_GRID_Y programs, z is 1 and the grid is (y, 1) as before)."""
    y = max(1, min(n, MAX_GRID_Y))
    return y, -(-n // y)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on ``device``; a small stand-in off-GPU (interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# Programmatic dependent launch (Hopper and later) for a decode step's products, off by default: each
# kernels.gemv launch may start while the kernel before it is still running (its programs pull their slice of
# the weights, constants of the step, toward L2, then wait for that kernel's outputs), and the kernels that
# come before a product (kernels.gemv itself, the decode kernels) let the next launch begin as soon as all
# their programs run. Kernels not launched this way wait as usual. Not yet timed on a GPU; `set_pdl` turns it on.
PDL = False


def set_pdl(on: bool, device: torch.device | str | None = None) -> None:
    """Turn programmatic dependent launch on or off for the kernels that use it (see ``PDL``).

    On needs a CUDA device of compute capability 9.0 or later (``griddepcontrol``) and compiled kernels."""
    global PDL
    if on:
        device = torch.device(device if device is not None else "cuda")
        if interpreting() or device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError("programmatic dependent launch needs compiled Triton kernels on a CUDA device")
        major, minor = torch.cuda.get_device_capability(device)
        if major < 9:
            raise ValueError(f"programmatic dependent launch needs compute capability 9.0 or later, "
                             f"this GPU has {major}.{minor}")
    PDL = bool(on)


def pdl() -> bool:
    """Whether launches now use programmatic dependent launch (never under the interpreter)."""
    return PDL and not interpreting()


# Arrival counters of kernels whose programs split a reduction: the last program of a group to arrive adds up
# the others' partial results (kernels.gemv's split-K). Each launch leaves its
# counters at zero, so one zeroed set per device serves every launch (a stream runs them one after another;
# launches on two streams at once, which Kiln's engine does not make, would need a set each).
_ARRIVAL_COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED_COUNTERS: list[torch.Tensor] = []  # outgrown sets: a CUDA graph captured with one still uses it


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least ``n`` zeroed int32 counters on ``device`` that every launch leaves at zero again.

    Outgrown sets are kept, not freed, since graphs captured with them replay their atomics on that memory; a
    set grown during a capture is the graph's own (zeroed as it is replayed) and stays out of the cache."""
    counters = _ARRIVAL_COUNTERS.get(device)
    if counters is None or counters.numel() < n:
        grown = torch.zeros(max(n, 4096), device=device, dtype=torch.int32)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return grown
        if counters is not None:
            _RETIRED_COUNTERS.append(counters)
        _ARRIVAL_COUNTERS[device] = counters = grown
    return counters


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """A jitted (maybe autotuned) kernel plus meta-parameters fixed at launch.

    ``fixed_meta`` is empty when the kernel is autotuned; under the interpreter it
    holds the single config's block sizes, which the autotuner would otherwise supply.
    """

    fn: Any
    fixed_meta: tuple[tuple[str, Any], ...] = ()

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        launch = self.fn[grid]
        meta = dict(self.fixed_meta)

        def run(*args: Any, **kwargs: Any) -> Any:
            return launch(*args, **meta, **kwargs)

        return run


def config(num_warps: int = 4, num_stages: int = 2, **block_sizes: int) -> Any:
    """A ``triton.Config`` from block sizes, warps and pipeline stages."""
    import triton

    return triton.Config(dict(block_sizes), num_warps=num_warps, num_stages=num_stages)


def jit_kernel(
    fn: Callable[..., None],
    gpu_configs: Sequence[Any] = (),
    interpreter_config: Any = None,
    key: Sequence[str] = (),
    prune: Callable[..., list[Any]] | None = None,
    restore: Sequence[str] = (),
    do_not_specialize: Sequence[str] = (),
) -> TritonKernel:
    """``triton.jit`` ``fn`` now; autotune over ``gpu_configs`` unless interpreting.

    ``restore`` names the arguments a launch may overwrite that it also reads (a kernel run in
    place): the autotuner runs each config many times on a key's first launch, and restores
    them after each run, so the launch computes from its real inputs.

    ``do_not_specialize`` names integer arguments Triton must not specialize on. By default it
    compiles a kernel anew for each integer argument's class (equal to 1, a multiple of 16, other):
    a kernel taking sequence lengths would compile again, mid-serving, for the first prompt of a
    length unlike those it has seen.

    ``prune(configs, named_args, **kwargs)`` drops configs that cannot fit (shared
    memory, head dim) before the autotuner benchmarks them. No ``gpu_configs`` and no
    ``interpreter_config``: a plain jitted kernel, whose launcher passes ``num_warps``
    itself (no autotuner on the launch path, and no config chosen by whichever shape
    happened to come first).
    """
    import triton
    import triton.language

    # Kernel bodies resolve `tl` in their module's globals at compile/interpret time.
    fn.__globals__.setdefault("tl", triton.language)
    kernel = triton.jit(fn, do_not_specialize=list(do_not_specialize) or None)
    if interpreting():
        _interpreter_compat()
    if not gpu_configs and interpreter_config is None:
        return TritonKernel(kernel)
    if interpreting():
        cfg = interpreter_config
        meta = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        return TritonKernel(kernel, tuple(meta.items()))
    prune_by = {"early_config_prune": prune} if prune is not None else None
    tuned = triton.autotune(configs=list(gpu_configs), key=list(key), prune_configs_by=prune_by,
                            restore_value=list(restore) or None, **_autotune_options(triton))(kernel)
    return TritonKernel(tuned)


@functools.cache
def _interpreter_compat() -> None:
    """Make triton 3.6's interpreter work with numpy >= 2.4.

    The interpreter holds a scalar as a one-element array and, in triton 3.6, turns it into a Python
    int (a loop bound computed from a loaded value, ``range(lo, hi, BLOCK)``) with ``int(array)``, which
    numpy 2.4 refuses for arrays of one or more dimensions ("only 0-dimensional arrays can be converted
    to Python scalars"). Later triton releases squeeze the array first; this gives 3.6 the same. It
    changes nothing where the installed interpreter's conversion already works.
    """
    import numpy as np
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:
        return

    class Scope:  # records what the interpreter would patch onto its tensor class
        def __init__(self) -> None:
            self.attrs: dict[str, Any] = {}

        def set_attr(self, obj: Any, name: str, value: Any) -> None:
            self.attrs[name] = value

    scope = Scope()
    try:
        patch_tensor(type("Probe", (), {}), scope)
        scope.attrs["__index__"](types.SimpleNamespace(handle=types.SimpleNamespace(data=np.array([3]))))
        return  # converts a one-element block already (or patches nothing of the kind)
    except TypeError:
        pass
    except Exception:  # an interpreter unlike 3.6's: leave it as it is
        return

    def patch_lang_tensor(tensor: Any, scope: Any) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


# Autotuning runs on a key's first launch, in the middle of serving: a prompt of a new length bucket
# waits for every config to be timed (Triton's default, 25 ms warm-up + 100 ms per config, can stall
# a running batch ~1 s per key). Kiln's kernels run 5 us to a few ms, so 5 + 25 ms still times each
# config over many launches; and the choices are cached on disk, so a restarted server reuses them.
AUTOTUNE_WARMUP_MS, AUTOTUNE_REP_MS = 5, 25


def _autotune_options(triton: Any) -> dict[str, Any]:
    """The keyword arguments this Triton's ``autotune`` takes for quicker timing and a disk cache."""
    import inspect

    params = inspect.signature(triton.autotune).parameters
    options: dict[str, Any] = {}
    if "do_bench" in params:
        def quick_bench(kernel_call: Callable[[], Any], quantiles: Any) -> Any:
            import triton.testing

            return triton.testing.do_bench(kernel_call, warmup=AUTOTUNE_WARMUP_MS, rep=AUTOTUNE_REP_MS,
                                           quantiles=quantiles)

        options["do_bench"] = quick_bench
    if "cache_results" in params:
        options["cache_results"] = True
    return options


def jit_helpers(module: Any, names: Sequence[str]) -> None:
    """Replace the plain functions ``names`` of a kernel module by their ``triton.jit`` versions.

    Kernels call helpers by global name, and Triton compiles (and inlines) a call only to
    a jitted function; under the interpreter the jitted helper runs as Python. Safe to
    call again: the original function is re-jitted, not the jitted one.
    """
    import triton
    import triton.language

    vars(module).setdefault("tl", triton.language)
    for name in names:
        fn = getattr(module, name)
        setattr(module, name, triton.jit(getattr(fn, "fn", fn)))


def check_tensor(name: str, x: Any, ndim: int, dtypes: Sequence[torch.dtype] | None = None) -> None:
    """Raise ValueError unless ``x`` is a tensor with ``ndim`` dims and an allowed dtype."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} has dtype {x.dtype}; allowed: {allowed}")


def check_residual(residual: Any, x: torch.Tensor) -> None:
    """Raise ValueError unless ``residual`` is None or a tensor of x's shape and dtype."""
    if residual is not None and (not isinstance(residual, torch.Tensor) or residual.shape != x.shape
                                 or residual.dtype != x.dtype):
        raise ValueError(f"residual must be None or a tensor of x's shape {tuple(x.shape)} and dtype {x.dtype}, "
                         f"got {getattr(residual, 'shape', type(residual).__name__)}")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """Raise ValueError unless all tensors live on one device; return it."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        where = ", ".join(f"{n}={d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {where}")
    return first


def check_triton_device(func: str, device: torch.device) -> None:
    """Raise ValueError when the Triton path cannot run on ``device``.

    Skipped while torch.compile traces (the check reads package metadata, which Dynamo cannot
    trace): the ops made by ``kernel_op`` check when they run.
    """
    if torch.compiler.is_compiling():
        return
    if not triton_available(device):
        if not triton_importable():
            reason = "triton >= 3.6 is not installed"
        elif not mode_matches_import():
            reason = "TRITON_INTERPRET changed after triton had been imported"
        else:
            reason = f"device {device} is not CUDA"
        raise ValueError(
            f"{func} needs a CUDA tensor with triton installed (or TRITON_INTERPRET=1), "
            f"but {reason}; call {func}_reference for the plain-torch path"
        )


def kernel_op(name: str, schema: str, impl: Callable[..., Any], fake: Callable[..., Any],
              public: str, mutates_args: Sequence[str] = ()) -> Callable[..., Any]:
    """Register ``impl`` (a launcher: allocate outputs, launch kernels) as the custom op ``kiln::name``.

    Returns a function that calls ``impl`` directly when run eagerly (no dispatcher overhead on
    every launch) and the op while torch.compile traces: Dynamo then sees one opaque call whose
    output shapes come from ``fake``, rather than tracing Triton's launcher, which it cannot
    follow without graph breaks (and under ``TRITON_INTERPRET=1`` not at all). ``schema`` is the
    op's argument list and returns, e.g. ``"(Tensor x, float scale) -> Tensor"``; its first
    argument is a tensor on the launch device. The eager caller, the public function ``public``,
    has checked that device already; the op checks it when it runs, since a traced
    ``check_triton_device`` is skipped. ``mutates_args`` names the arguments written in place
    (marked ``Tensor(a!)`` in ``schema`` too).
    """

    def run_op(*args: Any) -> Any:
        check_triton_device(public, args[0].device)
        return impl(*args)

    op = torch.library.custom_op(f"kiln::{name}", run_op, mutates_args=tuple(mutates_args), schema=schema)
    op.register_fake(fake)

    def call(*args: Any) -> Any:
        if torch.compiler.is_compiling():
            return op(*args)
        return impl(*args)

    call.op = op  # type: ignore[attr-defined]
    return call
