"""The compiled CPU kernel behind ``linear_kernel="native"``: built on first use, then cached.

``csrc/skinny.cpp`` multiplies 1-8 activation rows by a ``Linear`` weight reading each weight
row once (see its header).  It is compiled with the machine's C++ compiler through
``torch.utils.cpp_extension`` (``-O3 -march=native``) the first time a process asks for it, into
``<cache_root()>/kernels/<name>`` where ``<name>`` hashes the source, the compiler flags, the
torch version and the CPU's model and flags, so another CPU or torch gets its own build.  A
machine without a compiler (or ``ninja``) simply has no native kernel: ``load_native()`` returns
``None`` and says why once in the log; every caller then falls back to PyTorch's products.

Set ``MTP_LM_NATIVE=0`` to never build or load it, and ``MTP_LM_NATIVE_CFLAGS`` to add compiler
flags (e.g. ``-mno-avx512f`` to build the AVX2 path on an AVX-512 machine, as docs/results.md
does to measure an AVX2-only CPU); they are part of the build's name.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

import torch

from mtp_torch._resources import cache_root

__all__ = [
    "CFLAGS_ENV",
    "NATIVE_ENV",
    "ISA_FLAGS",
    "cpu_description",
    "cpu_isa",
    "cpu_model",
    "load_native",
    "native_unavailable_reason",
]

logger = logging.getLogger(__name__)

NATIVE_ENV = "MTP_LM_NATIVE"
"""Environment variable: ``0`` disables the compiled kernel (no build, no load)."""

CFLAGS_ENV = "MTP_LM_NATIVE_CFLAGS"
"""Environment variable: extra compiler flags of the build (space-separated)."""

_SOURCE = Path(__file__).with_name("csrc") / "skinny.cpp"
_HEADERS = tuple(
    Path(__file__).with_name("csrc") / name for name in ("products.h", "attention.h", "forward.h")
)
_CFLAGS = ("-O3", "-march=native", "-fopenmp")
_LOCK = threading.Lock()
_STATE: dict[str, Any] = {}


def cpu_description() -> str:
    """The CPU's model name and ISA flags (what a build and a calibration depend on)."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model.startswith("model"):
                    model = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = value.strip()
                if flags and model:
                    break
    except OSError:
        pass
    return f"{model} | {flags}"


ISA_FLAGS = (
    "avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "neon", "asimd",
)  # fmt: skip
"""The CPU flags a figure depends on (the SIMD the products and ATen can use), in this order."""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    return cpu_description().partition(" | ")[0].strip()


def cpu_isa() -> tuple[str, ...]:
    """Which of ``ISA_FLAGS`` this CPU has: what to state beside every timing."""
    flags = set(cpu_description().rpartition("|")[2].split())
    return tuple(flag for flag in ISA_FLAGS if flag in flags)


def _cflags() -> list[str]:
    return [*_CFLAGS, *os.environ.get(CFLAGS_ENV, "").split()]


def _build_name() -> str:
    digest = hashlib.sha256()
    for source in (_SOURCE, *_HEADERS):
        digest.update(source.read_bytes())
    digest.update(" ".join(_cflags()).encode())
    digest.update(torch.__version__.encode())
    digest.update(cpu_description().encode())
    return f"mtp_lm_skinny_{digest.hexdigest()[:16]}"


def _build() -> Any:
    # Lazy: cpp_extension is slow to import and only the native kernel's build needs it.
    from torch.utils.cpp_extension import load

    name = _build_name()
    directory = cache_root() / "kernels" / name
    directory.mkdir(parents=True, exist_ok=True)
    with _build_lock(directory):
        logger.info("building the native CPU kernel in %s (once per machine, ~1 minute)", directory)
        return load(
            name=name,
            sources=[str(_SOURCE)],
            extra_cflags=_cflags(),
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=False,
        )


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Hold an OS lock on ``directory``'s build, and clear torch's own lock file under it.

    torch's ``load`` serialises builders with a ``lock`` file that it deletes when done, and
    waits, forever, while one exists: a process killed mid-build (Ctrl-C on a first run) left
    every later run hanging.  An ``flock`` is released by the OS when its holder dies, so whoever
    holds it knows no other mtp-lm build is running and a ``lock`` file still there is stale.
    Where ``fcntl`` is missing (Windows) torch's file alone serialises, as before.
    """
    if fcntl is None:
        yield
        return
    with open(directory / "mtp_lm_build.flock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = directory / "lock"
            if stale.exists():
                logger.warning("removing a stale build lock left by a killed build: %s", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_native() -> Any:
    """The compiled extension module, building it on first use; ``None`` where it cannot be had.

    Thread-safe: one build per process, and an OS file lock serialises processes that build the
    same extension at once (one killed mid-build holds nothing: ``_build_lock``).

    Returns:
      A module with ``skinny_linear(x, weight)`` (``x`` ``(n, in)``, ``1 <= n <= 8``; float32 or
      float64 CPU tensors, contiguous) and ``has_simd()``, or ``None`` (see
      ``native_unavailable_reason``).
    """
    with _LOCK:
        if "module" in _STATE:
            return _STATE["module"]
        module: Any = None
        if os.environ.get(NATIVE_ENV, "1").strip() == "0":
            _STATE["reason"] = f"disabled by {NATIVE_ENV}=0"
        else:
            try:
                module = _build()
            except Exception as error:  # no compiler, no ninja, a failed build: all the same
                _STATE["reason"] = f"the native kernel could not be built: {error}"
                logger.warning("%s; falling back to PyTorch's products", _STATE["reason"])
                module = None
        _STATE["module"] = module
        return module


def native_unavailable_reason() -> str | None:
    """Why ``load_native()`` gave ``None`` (``None`` when it loaded or was never asked)."""
    return _STATE.get("reason")
