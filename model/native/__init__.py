"""Kiln's native CPU decode step (decode_step.cpp), compiled on this machine on first use.

The torch path stays the reference and the fallback: the native step is used only when it
is built, the model is small (`fast_decode.FOLD_LIMIT_BYTES`) and its weights are fp32 in
memory (read by the step as bf16 when that is exact). Building needs a C++ compiler and takes
~20-40 s once; the result is cached under ``$KILN_CACHE_DIR`` (default ``~/.cache/kiln``) in
a directory named after a hash of the source, the flags, the torch and Python it builds against
(version and install location) and this CPU, so a change of any of them builds afresh. The
source is compiled from a copy inside that directory: the build command names no checkout path,
so checkouts and virtual environments that share the cache never rebuild each other's module.
`make serve` builds it before starting the server; a server started without it builds it in
the background and switches to it when ready.

    python -m model.native          # build (or find) it and print where it is
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import sysconfig
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

try:
    import fcntl
except ImportError:  # (not POSIX)
    fcntl = None

log = logging.getLogger("kiln.native")

SOURCE = Path(__file__).with_name("decode_step.cpp")
# -fopenmp: ATen's parallel_for is OpenMP pragmas in its headers (torch is built with
# AT_PARALLEL_OPENMP), so without it every parallel_for here ran on one thread. The module links
# libgomp.so.1, the soname of the OpenMP runtime torch loads: one runtime, one thread pool.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast"]
LDFLAGS = ["-fopenmp"]
# A compiler without OpenMP (Apple clang) still builds the step with these: single-threaded.
SERIAL_FLAGS = [flag if flag != "-fopenmp" else "-fopenmp-simd" for flag in FLAGS]
DISABLE_ENV = "KILN_NO_NATIVE"  # set to 1 to never use (or build) the native step

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_dir(flags: list[str] | None = None, ldflags: list[str] | None = None) -> Path:
    """Where the module built with these flags (default FLAGS, LDFLAGS) is cached."""
    import torch

    flags, ldflags = (FLAGS, LDFLAGS) if flags is None else (flags, ldflags or [])
    # the install locations go into the compile and link commands (include and library paths): a
    # second environment must not share a directory whose command it would change (ninja rebuilds)
    key = "\n".join([SOURCE.read_text(), " ".join(flags + ldflags), torch.__version__, str(Path(torch.__file__).parent),
                     sys.version, sysconfig.get_paths()["include"], _cpu_id()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(os.environ.get("KILN_CACHE_DIR", Path.home() / ".cache" / "kiln"))
    return root / "native" / digest


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def load(build: bool = True) -> ModuleType | None:
    """The compiled module, or None (disabled, not built and build=False, or the build failed:
    see `error()`). Safe to call from several threads; builds at most once per process."""
    global _module, _error
    if disabled():
        return None
    with _lock:
        if _module is not None or _error is not None:
            return _module
        # with OpenMP if the compiler has it: (flags, ldflags, where that build is cached)
        variants = [(flags, ldflags, build_dir(flags, ldflags)) for flags, ldflags in ((FLAGS, LDFLAGS),
                                                                                        (SERIAL_FLAGS, []))]
        built = [v for v in variants if any(v[2].glob(f"kiln_native_{v[2].name}*.so"))]
        if not built and not build:
            return None
        from torch.utils.cpp_extension import load as load_extension

        failure = ""
        for flags, ldflags, directory in built or variants:
            try:
                with _build_lock(directory):
                    source = _source_copy(directory)
                    # (copies: torch appends its own library flags to the lists it is given, which made
                    # build_dir() name another directory after the first load)
                    _module = load_extension(name="kiln_native_" + directory.name, sources=[str(source)],
                                             extra_cflags=list(flags), extra_ldflags=list(ldflags),
                                             build_directory=str(directory), verbose=False)
                return _module
            except Exception as e:  # noqa: BLE001 -- no compiler, headers or OpenMP: try the next variant
                failure = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        _error = failure
        log.warning("the native CPU decode step is unavailable, using the torch path: %s", _error)
        return _module


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Hold the build directory against other Kiln processes, and clear what a killed one left.

    torch's `load` takes a lock *file* for every build and load (`FileBaton`: `lock` in the directory)
    and waits, without end, while one exists. A process killed while holding it (SIGTERM or SIGKILL
    during the half-minute build, or a server stopped while its background build ran) leaves the file
    behind, and every later `make serve` or server start then hung on it. This lock is an flock, which
    the kernel drops with its process: whoever holds it is the only Kiln process in the directory, so a
    `lock` file it finds is a dead process's, and goes.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(directory / "kiln.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # (waits while another Kiln process builds here)
        baton = directory / "lock"
        if baton.exists():
            log.warning("removing %s, left by a build that was stopped", baton)
            baton.unlink(missing_ok=True)
        yield  # (closing the file releases the flock)


def _source_copy(directory: Path) -> Path:
    """decode_step.cpp inside the build directory (written only when missing or different, so its
    timestamp does not make ninja rebuild an up-to-date module)."""
    directory.mkdir(parents=True, exist_ok=True)
    copy = directory / SOURCE.name
    text = SOURCE.read_text()
    if not copy.exists() or copy.read_text() != text:
        tmp = copy.with_name(f".{copy.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, copy)  # atomic: a concurrent build never compiles a half-written file
    return copy


def error() -> str | None:
    return _error


def load_in_background(on_ready) -> threading.Thread:
    """Build/load on a daemon thread and call on_ready(module) if it succeeds."""
    def run():
        module = load(build=True)
        if module is not None:
            on_ready(module)
            log.info("the native CPU decode step is ready: decode steps use it from now on")

    thread = threading.Thread(target=run, name="kiln-native-build", daemon=True)
    thread.start()
    return thread


def main() -> int:
    module = load(build=False)
    if module is None and not disabled():
        print(f"building Kiln's native CPU decode step in {build_dir()} (once; about half a minute)...", flush=True)
        module = load(build=True)
    if module is None:
        print(f"not available: {error() or 'disabled by ' + DISABLE_ENV}; Kiln uses the torch path", flush=True)
        return 0
    print(f"native CPU decode step: {module.__file__}")
    return 0
