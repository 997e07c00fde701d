"""Compile every Triton kernel for an H100 (sm_90) on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, but not
that they compile: it accepts code the GPU compiler rejects, and it never sees a
config that needs more shared memory than an SM has or spills registers. This
script runs Kiln's real launchers (``kernels.softmax.softmax``, ``cross_entropy``,
``linear_cross_entropy``, ``flash_attention`` (+ varlen, + backward),
``decode_attention``, the fused ``add_norm``, ``rope_cache_write``, ``silu_mul`` and the ``gemv``
family) on CPU tensors of realistic shapes, with Triton's driver
swapped for an offline one: every launch compiles -- for each autotune config the
pruner keeps -- through Triton's real pipeline down to a cubin (the bundled
``ptxas``), and nothing is launched. The bundled ``cuobjdump`` then reads each
cubin's registers and local memory.

    python bench/compile_check.py                  # all kernels, all configs (~10 min)
    python bench/compile_check.py --quick          # one config per launch (the CI test)
    python bench/compile_check.py --arch 80        # another target (A100)
    PYTHONPATH=/path/to/triton-3.6 python bench/compile_check.py   # the GPU image's Triton

Exit status 1 when a kernel fails to compile or when every config of a launch
needs more shared memory than the target has; register spills and single
oversized configs (the autotuner skips those) are reported, not fatal.
Run it with ``TRITON_INTERPRET`` unset: Triton fixes its mode at import.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Largest shared memory one block may use, and SM count, per compute capability.
_SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_NUM_SMS = {80: 108, 86: 84, 89: 128, 90: 132}


@dataclasses.dataclass
class Compiled:
    """One compiled kernel variant (kernel x specialization x config)."""

    launch: str  # the scenario that launched it
    kernel: str
    config: str  # block sizes, warps, stages
    shared: int  # bytes of dynamic shared memory
    registers: int | None
    local: int | None  # bytes of local memory per thread (spills, stack)
    seconds: float

    def row(self) -> str:
        regs = "?" if self.registers is None else str(self.registers)
        local = "?" if self.local is None else str(self.local)
        return f"{self.kernel:34s} {self.config:44s} {self.shared:>7d} {regs:>5s} {local:>6s} {self.seconds:6.1f}"


@dataclasses.dataclass
class Report:
    arch: int
    compiled: list[Compiled] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)


class _OfflineDriver:
    """Stands in for Triton's CUDA driver: names the target, never touches a device."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("compile-only run: nothing is launched or benchmarked")


def _tool(name: str) -> str | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else None


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, local bytes) of the one function in ``cubin``, from cuobjdump."""
    tool = _tool("cuobjdump")
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    spilled = (int(local.group(1)) if local else 0) + (int(stack.group(1)) if stack else 0)
    return (int(regs.group(1)) if regs else None), spilled


def _config_label(values: dict[str, Any]) -> str:
    blocks = " ".join(f"{k}={v}" for k, v in values.items() if k.startswith("BLOCK"))
    return f"{blocks} w{values.get('num_warps', 4)} s{values.get('num_stages', 3)}".strip()


@contextlib.contextmanager
def compile_only(
    report: Report, max_configs: int | None, ptx_dir: Path | None = None
) -> Iterator[Callable[[str], None]]:
    """Make every Kiln kernel launch compile (each kept config) instead of running.

    Yields ``set_launch(name)``, which labels the compiled variants that follow.
    With ``ptx_dir``, each variant's PTX is written there (to compare two versions of
    a kernel: same PTX, same machine code).
    """
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on"):
        raise SystemExit("compile_check: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    import triton
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner

    import kernels._utils as utils
    import kernels.decode as decode

    launch = ["?"]
    seen: set[str] = set()

    def record(label: str, kernel: Any, seconds: float) -> None:
        key = kernel.metadata.hash
        if key in seen:
            return
        seen.add(key)
        regs, local = _resources(kernel.asm["cubin"])
        item = Compiled(launch[0], kernel.metadata.name, label, int(kernel.metadata.shared), regs, local, seconds)
        report.compiled.append(item)
        if ptx_dir is not None:
            name = re.sub(r"[^A-Za-z0-9=.]+", "_", f"{item.launch} {item.kernel} {item.config}")
            # Drop debug line info and the source location table: only the code is compared.
            ptx = "\n".join(line for line in kernel.asm["ptx"].splitlines() if not line.lstrip().startswith(".loc"))
            (ptx_dir / f"{name}.ptx").write_text(ptx.split("\t.section\t.debug", 1)[0])
        print("  " + item.row(), flush=True)

    def warm(jit: Any, grid: Any, args: tuple, kwargs: dict, label: dict) -> Any:
        start = time.perf_counter()
        kernel = jit.warmup(*args, grid=grid, **kwargs)
        record(_config_label(label), kernel, time.perf_counter() - start)
        return kernel

    def getitem(self: utils.TritonKernel, grid: Any) -> Callable[..., None]:
        def run(*args: Any, **kwargs: Any) -> None:
            kwargs = {**dict(self.fixed_meta), **kwargs}
            limit = _SHARED_LIMIT.get(report.arch, 232448)
            if not isinstance(self.fn, Autotuner):  # one config: it must fit
                kernel = warm(self.fn, grid, args, kwargs, kwargs)
                if int(kernel.metadata.shared) > limit:
                    report.errors.append(f"{launch[0]}: {kernel.metadata.name} needs {kernel.metadata.shared} B "
                                         f"of shared memory (sm_{report.arch} has {limit})")
                return
            tuner = self.fn
            tuner.nargs = dict(zip(tuner.arg_names, args))
            try:
                configs = tuner.prune_configs(kwargs)
            finally:
                tuner.nargs = None
            fitting = 0
            for cfg in configs[:max_configs]:
                meta = cfg.all_kwargs()
                kernel = warm(tuner.fn, grid, args, {**kwargs, **meta}, meta)
                fitting += int(kernel.metadata.shared) <= limit
                if int(kernel.metadata.shared) > limit:
                    report.warnings.append(
                        f"{launch[0]}: {kernel.metadata.name} {_config_label(meta)} needs "
                        f"{kernel.metadata.shared} B of shared memory (sm_{report.arch} has {limit}); "
                        "the autotuner skips it"
                    )
            if fitting == 0:
                report.errors.append(
                    f"{launch[0]}: no config of {tuner.fn.__name__} fits sm_{report.arch} shared memory"
                )

        return run

    old = (driver.active if driver._active is not None else None, utils.TritonKernel.__getitem__,
           utils.triton_available, decode.num_sms)
    driver.set_active(_OfflineDriver(report.arch))
    utils.TritonKernel.__getitem__ = getitem
    utils.triton_available = lambda device: True  # CPU tensors stand in for CUDA ones
    decode.num_sms = lambda device: _NUM_SMS.get(report.arch, 132)
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{report.arch}", flush=True)
    print(f"  {'kernel':34s} {'config':44s} {'smem B':>7s} {'regs':>5s} {'spill':>6s} {'sec':>6s}", flush=True)

    def set_launch(name: str) -> None:
        launch[0] = name
        print(f"{name}", flush=True)

    try:
        yield set_launch
    finally:
        active, utils.TritonKernel.__getitem__, utils.triton_available, decode.num_sms = old
        if active is None:
            driver._active = None
        else:
            driver.set_active(active)


# ----------------------------------------------------------------------------- launches


def _softmax_launches(quick: bool) -> Iterator[tuple[str, Callable[[], Any]]]:
    from kernels.softmax import _softmax, softmax

    dtypes = (torch.float32, torch.bfloat16) if quick else (torch.float32, torch.bfloat16, torch.float16)
    for dtype in dtypes:
        for vocab in (8192, 128256):  # one block per row / chunked rows
            x = torch.zeros(4, vocab, dtype=dtype)
            yield f"softmax {str(dtype)[6:]} V={vocab}", lambda x=x: softmax(x, 0.8)
            yield f"softmax {str(dtype)[6:]} V={vocab} per-row T", lambda x=x: softmax(x, torch.full((4,), 0.7))
    # the long-row plan's L2 variants (kernels.softmax.LONG_ROW_PLAN picks one)
    x = torch.zeros(4, 128256)
    yield "softmax float32 V=128256 reversed, L2 hints", lambda: _softmax(x, 1.0, reverse=True, l2_hints=True,
                                                                           chunk=8192)


def _cross_entropy_launches(quick: bool) -> Iterator[tuple[str, Callable[[], Any]]]:
    from kernels.cross_entropy import cross_entropy, linear_cross_entropy, token_logprobs

    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)
    vocabs = (32000,) if quick else (32000, 128256)
    for dtype in dtypes:
        for vocab in vocabs:
            def fwd_bwd(dtype=dtype, vocab=vocab):
                logits = torch.zeros(8, vocab, dtype=dtype, requires_grad=True)
                cross_entropy(logits, torch.arange(8) % vocab).backward()

            yield f"cross_entropy {str(dtype)[6:]} V={vocab} fwd+bwd", fwd_bwd
            yield f"token_logprobs {str(dtype)[6:]} V={vocab}", lambda d=dtype, v=vocab: token_logprobs(
                torch.zeros(8, v, dtype=d), torch.arange(8)
            )

    def linear(dtype=dtypes[0]):
        hidden = torch.zeros(64, 128, dtype=dtype, requires_grad=True)
        weight = torch.zeros(32000, 128, dtype=dtype, requires_grad=True)
        linear_cross_entropy(hidden, weight, torch.arange(64)).backward()

    yield f"linear_cross_entropy {str(dtypes[0])[6:]} fwd+bwd", linear


def _attention_launches(quick: bool) -> Iterator[tuple[str, Callable[[], Any]]]:
    from kernels.attention import flash_attention, flash_attention_varlen

    head_dims = (64, 128) if quick else (16, 32, 64, 128, 256)
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)
    lengths = ((1024, 1024),) if quick else ((1024, 1024), (17, 1024), (1, 2048))
    for dtype in dtypes:
        for head_dim in head_dims:
            for causal in (True, False):
                for seqlen_q, seqlen_k in lengths:
                    def dense(dtype=dtype, head_dim=head_dim, causal=causal, t=seqlen_q, s=seqlen_k):
                        q = torch.zeros(1, 8, t, head_dim, dtype=dtype, requires_grad=True)
                        k = torch.zeros(1, 2, s, head_dim, dtype=dtype, requires_grad=True)
                        v = torch.zeros(1, 2, s, head_dim, dtype=dtype, requires_grad=True)
                        flash_attention(q, k, v, causal=causal).sum().backward()

                    name = f"flash_attention {str(dtype)[6:]} D={head_dim} {'causal' if causal else 'full'}"
                    yield f"{name} T={seqlen_q} S={seqlen_k} GQA 4:1 fwd+bwd", dense

        def varlen(dtype=dtype):
            cu = torch.tensor([0, 300, 1000], dtype=torch.int32)
            q = torch.zeros(1000, 8, 128, dtype=dtype, requires_grad=True)
            k = torch.zeros(1000, 2, 128, dtype=dtype, requires_grad=True)
            v = torch.zeros(1000, 2, 128, dtype=dtype, requires_grad=True)
            flash_attention_varlen(q, k, v, cu, cu, 700, 700).sum().backward()

        yield f"flash_attention_varlen {str(dtype)[6:]} D=128 causal fwd+bwd", varlen


def _decode_launches(quick: bool) -> Iterator[tuple[str, Callable[[], Any]]]:
    from kernels.decode import decode_attention

    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)
    shapes = ((32, 8, 128), (12, 12, 64)) if quick else ((32, 8, 128), (12, 12, 64), (32, 4, 64), (16, 16, 256))
    for dtype in dtypes:
        for n_heads, n_kv_heads, head_dim in shapes:
            for batch, cached in ((1, 8192), (32, 2048)):  # split KV / few splits
                def run(dtype=dtype, h=n_heads, hkv=n_kv_heads, d=head_dim, b=batch, n=cached):
                    block_size = 16
                    blocks_per_row = n // block_size
                    k_cache = torch.zeros(b * blocks_per_row, block_size, hkv, d, dtype=dtype)
                    table = torch.arange(b * blocks_per_row, dtype=torch.int32).reshape(b, blocks_per_row)
                    lengths = torch.full((b,), n, dtype=torch.int32)
                    decode_attention(torch.zeros(b, h, d, dtype=dtype), k_cache, k_cache, table, lengths)

                shape = f"B={batch} L={cached} H={n_heads}/{n_kv_heads} D={head_dim}"
                yield f"decode_attention {str(dtype)[6:]} {shape}", run
                if dtype == torch.bfloat16 and (n_heads, head_dim) == (32, 128):  # letting the next launch start
                    yield f"decode_attention {str(dtype)[6:]} {shape} PDL", _with_pdl(run)


def _fused_launches(quick: bool) -> Iterator[tuple[str, Callable[[], Any]]]:
    from kernels.activation import silu_mul
    from kernels.norm import add_norm
    from kernels.rope import rope_cache_write

    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)
    for dtype in dtypes:
        name = str(dtype)[6:]
        for d in (768, 2048) if quick else (768, 2048, 4096, 8192):
            x = torch.zeros(4, d, dtype=dtype)
            w = torch.ones(d, dtype=dtype)
            yield f"add_norm {name} d={d} rms", lambda x=x, w=w: add_norm(x, x, w, None, 1e-5, True)
            yield f"add_norm {name} d={d} layernorm", lambda x=x, w=w: add_norm(x, None, w, w, 1e-5, False)
        for n_heads, n_kv_heads, head_dim in ((32, 4, 64), (12, 12, 64), (32, 8, 128)):
            def rope(dtype=dtype, h=n_heads, hkv=n_kv_heads, d=head_dim):
                qkv = torch.zeros(2, 3, (h + 2 * hkv) * d, dtype=dtype)
                pool = torch.zeros(2, 8, 16, hkv, d, dtype=dtype)
                idx = torch.zeros(2, 3, dtype=torch.long)
                table = torch.zeros(64, d, dtype=dtype)
                rope_cache_write(qkv, h, hkv, idx, pool, pool, idx, idx, table, table, layer=1)
                rope_cache_write(qkv, h, hkv, idx, pool, pool, idx, idx, layer=1)  # learned positions

            yield f"rope_cache_write {name} H={n_heads}/{n_kv_heads} D={head_dim}", rope
        yield f"silu_mul {name} F=5632", lambda dtype=dtype: silu_mul(torch.zeros(4, 2 * 5632, dtype=dtype))


def _gemv_launches(quick: bool) -> Iterator[tuple[str, Callable[[], Any]]]:
    from kernels.gemv import gemv, rmsnorm_gemv, silu_mul_gemv

    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)
    shapes = ((2560, 2048), (2048, 5632)) if quick else ((2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632))
    # one row (batch-1 decode: the FMA configs' smallest tile) and four (each row bucket compiles anew)
    for dtype, rows in itertools.product(dtypes, (4,) if quick else (1, 4)):
        name = str(dtype)[6:]
        for n, k in shapes:
            def run(dtype=dtype, n=n, k=k, rows=rows):
                x, w, g = torch.zeros(rows, k, dtype=dtype), torch.zeros(n, k, dtype=dtype), torch.ones(k, dtype=dtype)
                gemv(x, w)
                rmsnorm_gemv(x, x, g, w)
                rmsnorm_gemv(x, None, g, w)
                silu_mul_gemv(torch.zeros(rows, 2 * k, dtype=dtype), w)

            yield f"gemv {name} {n}x{k}" + ("" if quick else f" rows {rows}"), run
            if dtype == torch.bfloat16:  # programmatic dependent launch: the L2 prefetch and griddepcontrol
                yield f"gemv {name} {n}x{k}" + ("" if quick else f" rows {rows}") + " PDL", _with_pdl(run)


def _with_pdl(run: Callable[[], Any]) -> Callable[[], Any]:
    """``run`` with kernels._utils.PDL on (programmatic dependent launch, as `set_pdl` turns it on on a GPU)."""
    def with_pdl() -> Any:
        from kernels import _utils

        saved, _utils.PDL = _utils.PDL, True
        try:
            return run()
        finally:
            _utils.PDL = saved

    return with_pdl


LAUNCHES = {
    "softmax": _softmax_launches,
    "cross_entropy": _cross_entropy_launches,
    "attention": _attention_launches,
    "decode": _decode_launches,
    "fused": _fused_launches,
    "gemv": _gemv_launches,
}


def launches(quick: bool, only: list[str] | None = None) -> Iterator[tuple[str, Callable[[], Any]]]:
    """(name, thunk) for every launch to compile, family by family."""
    for family, make in LAUNCHES.items():
        if not only or family in only:
            yield from make(quick)


def check(
    arch: int, todo: Iterable[tuple[str, Callable[[], Any]]], max_configs: int | None = None,
    ptx_dir: Path | None = None,
) -> Report:
    """Run each thunk of ``todo`` compiling for ``sm_{arch}``; errors and warnings in the report."""
    report = Report(arch)
    with compile_only(report, max_configs, ptx_dir) as set_launch:
        for name, fn in todo:
            set_launch(name)
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 -- report every failure, keep going
                detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
                report.errors.append(f"{name}: {detail[:2000]}")
                print(f"  FAILED: {detail[:2000]}", flush=True)
    for item in report.compiled:
        if item.local:
            report.warnings.append(f"{item.launch}: {item.kernel} {item.config} spills ({item.local} B local memory)")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as one number (default 90)")
    parser.add_argument("--quick", action="store_true", help="one config per launch, fewer shapes")
    parser.add_argument("--only", nargs="+", choices=sorted(LAUNCHES), help="kernel families to check")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--ptx-dir", type=Path, help="write each compiled variant's PTX (no debug info) here")
    args = parser.parse_args(argv)
    if _tool("ptxas") is None:
        parser.error("this triton has no bundled ptxas (triton/backends/nvidia/bin); cannot compile for CUDA")
    start = time.perf_counter()
    if args.ptx_dir is not None:
        args.ptx_dir.mkdir(parents=True, exist_ok=True)
    report = check(args.arch, launches(args.quick, args.only), 1 if args.quick else None, args.ptx_dir)
    elapsed = time.perf_counter() - start
    print(f"\n{len(report.compiled)} kernel variants compiled for sm_{args.arch} in {elapsed:.0f} s")
    for line in report.warnings:
        print(f"warning: {line}")
    for line in report.errors:
        print(f"error: {line}")
    if args.json:
        args.json.write_text(json.dumps(dataclasses.asdict(report), indent=1))
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
