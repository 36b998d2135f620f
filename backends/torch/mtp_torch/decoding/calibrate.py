"""``linear_kernel="auto"``: measure the Linear implementations on this machine, per pass width.

Which product streams a model's weights fastest for a pass of ``n`` tokens depends on the CPU,
its BLAS and ``n`` (docs/results.md: PyTorch's stock product and the weight-first one trade
places from one width to the next and from one CPU to another).  ``auto_plan`` times every
implementation of ``mtp_torch.decoding.kernels.IMPLEMENTATIONS`` on the model's own weight
shapes for each width ``1..MAX_PLAN_ROWS`` (all the model's ``Linear`` products of one pass,
implementations interleaved, median of ``repeats``), then picks per width the fastest, keeping
``"stock"`` unless another is at least ``MARGIN`` faster (stock is exact, so it wins near-ties).

The result is cached as JSON under ``<cache_root()>/calibration/`` keyed by the CPU (model and
flags), torch's version and thread count, the dtype and the weight shapes, so the ~5-20 s of
measuring happen the first time a model is used on a machine.  Anything that goes wrong while
measuring (or reading the cache) falls back to the stock plan, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from mtp_torch._resources import cache_root
from mtp_torch.decoding.kernels import (
    MAX_PLAN_ROWS,
    STOCK_PLAN,
    KernelPlan,
    run_implementation,
)
from mtp_torch.decoding.native import cpu_description, load_native

__all__ = ["MARGIN", "Calibration", "auto_plan", "calibrate", "calibration_path"]

logger = logging.getLogger(__name__)

MARGIN = 0.05
"""Another implementation replaces stock at a width only when at least this much faster."""

_VERSION = 2  # 2: native kept at near-tie widths once it wins one (bitwise-consistent passes)
_ISA_ENV = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "MTP_LM_NATIVE_CFLAGS",
    "MTP_LM_NATIVE",
)


@attrs.frozen
class Calibration:
    """What ``calibrate`` measured: seconds of one pass's Linear products per width and kind.

    Attributes:
      seconds: ``seconds[kind][n - 1]``: median time of all the model's ``Linear`` products for
        a pass of ``n`` rows with implementation ``kind``.
      plan: the per-width choice (see the module docstring).
      key: what the measurement depends on (CPU, torch, threads, dtype, shapes), hashed.
      cpu: the CPU's model name and flags.
    """

    seconds: dict[str, list[float]]
    plan: KernelPlan
    key: str
    cpu: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``from_dict`` reads it back)."""
        return {
            "version": _VERSION,
            "key": self.key,
            "cpu": self.cpu,
            "seconds": self.seconds,
            "widths": list(self.plan.widths),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """Inverse of ``to_dict``; ``ValueError`` for another version or a malformed entry."""
        if data.get("version") != _VERSION:
            raise ValueError(f"calibration version {data.get('version')!r}, expected {_VERSION}")
        seconds = {str(k): [float(s) for s in v] for k, v in dict(data["seconds"]).items()}
        plan = KernelPlan(tuple(str(w) for w in data["widths"]), name="auto")
        return cls(seconds=seconds, plan=plan, key=str(data["key"]), cpu=str(data["cpu"]))


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [
        module.weight
        for module in model.modules()
        if isinstance(module, torch.nn.Linear) and module.weight.device.type == "cpu"
    ]


def _key(weights: Sequence[torch.Tensor]) -> str:
    shapes = sorted(tuple(w.shape) for w in weights)
    dtypes = sorted({str(w.dtype) for w in weights})
    # What else decides which product is fastest: the ISA PyTorch, oneDNN, MKL and the native
    # build are told to use (how docs/results.md measures an AVX2-only CPU on an AVX-512 one).
    isa = [os.environ.get(name, "") for name in _ISA_ENV]
    text = json.dumps(
        [cpu_description(), torch.__version__, torch.get_num_threads(), dtypes, shapes, isa]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def calibration_path(model: torch.nn.Module) -> Path:
    """Where the calibration of ``model``'s weight shapes on this machine is cached."""
    return cache_root() / "calibration" / f"{_key(_weights(model))}.json"


def _time_pass(kind: str, inputs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for x, weight in zip(inputs, weights, strict=True):
            run_implementation(kind, x, weight, None)
    return time.perf_counter() - start


def _choose(seconds: dict[str, list[float]], widths: int) -> tuple[str, ...]:
    """Per width, the fastest implementation when it beats stock by ``MARGIN``, else stock;
    then, if the native kernel won some width, native also wherever it is within ``MARGIN`` of
    the fastest: the fused pass then computes a one-token pass and a verify pass with the same
    kernel, whose rows have the same bits at every width, so ``verify=True`` equals
    ``StaticK(1)`` by construction rather than up to near-ties (a one-token pass through
    ATen's product and a wider one through the native kernel agree only to rounding)."""
    chosen: list[str] = []
    for n in range(widths):
        best = min(seconds, key=lambda kind: seconds[kind][n])
        stock = seconds["stock"][n]
        chosen.append(best if seconds[best][n] < stock * (1.0 - MARGIN) else "stock")
    if "native" in chosen:
        for n in range(widths):
            fastest = min(per[n] for per in seconds.values())
            if seconds["native"][n] <= fastest * (1.0 + MARGIN):
                chosen[n] = "native"
    return tuple(chosen)


def calibrate(
    model: torch.nn.Module,
    *,
    widths: int = MAX_PLAN_ROWS,
    repeats: int = 5,
    kinds: Sequence[str] | None = None,
    clock: Callable[[str, Sequence[torch.Tensor], Sequence[torch.Tensor]], float] = _time_pass,
) -> Calibration:
    """Time each implementation on ``model``'s weights for passes of ``1..widths`` rows.

    Args:
      model: the model whose ``Linear`` weights (on the CPU) are timed.
      widths: the widest pass to time (at most ``MAX_PLAN_ROWS``).
      repeats: timed rounds; every round runs every (width, implementation) once, interleaved,
        and the median is kept.
      kinds: implementations to time (default: stock, skinny, and native where it builds).
      clock: ``clock(kind, inputs, weights)`` -> seconds (tests pass a fake one).

    Returns:
      The ``Calibration`` (not cached; ``auto_plan`` caches).

    Raises:
      ValueError: for ``widths`` outside ``[1, MAX_PLAN_ROWS]``, ``repeats < 1`` or a model
        without CPU ``Linear`` layers.
    """
    if not 1 <= widths <= MAX_PLAN_ROWS:
        raise ValueError(f"widths must be in [1, {MAX_PLAN_ROWS}], got {widths}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    weights = [w.detach() for w in _weights(model)]
    if not weights:
        raise ValueError(f"{type(model).__name__} has no Linear layers on the CPU to time")
    if kinds is None:
        kinds = ("stock", "skinny", "native") if load_native() is not None else ("stock", "skinny")
    generator = torch.Generator().manual_seed(0)
    inputs = {
        n: [torch.randn(n, w.shape[1], generator=generator, dtype=w.dtype) for w in weights]
        for n in range(1, widths + 1)
    }
    samples: dict[str, list[list[float]]] = {kind: [[] for _ in range(widths)] for kind in kinds}
    for kind in kinds:  # warm-up: first calls build caches and thread pools
        clock(kind, inputs[1], weights)
    for _ in range(repeats):
        for n in range(1, widths + 1):
            for kind in kinds:
                samples[kind][n - 1].append(clock(kind, inputs[n], weights))
    seconds = {kind: [statistics.median(s) for s in per] for kind, per in samples.items()}
    plan = KernelPlan(_choose(seconds, widths), name="auto")
    return Calibration(seconds=seconds, plan=plan, key=_key(weights), cpu=cpu_description())


def _read_cached(path: Path, key: str) -> Calibration | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("version") != _VERSION:
            logger.info("measuring again: %s is an older mtp-lm's calibration", path)
            return None
        found = Calibration.from_dict(data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("ignoring the unreadable kernel calibration %s (%s)", path, error)
        return None
    return found if found.key == key else None


def _write_cached(path: Path, calibration: Calibration) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps(calibration.to_dict(), indent=1), encoding="utf-8")
        os.replace(staging, path)
    except OSError as error:
        logger.warning("could not cache the kernel calibration in %s (%s)", path, error)


def auto_calibration(model: torch.nn.Module, *, refresh: bool = False) -> Calibration | None:
    """The cached calibration of ``model`` on this machine, measuring it the first time.

    Returns ``None`` (after a warning) when measuring fails.
    """
    weights = _weights(model)
    if not weights:
        return None
    path = calibration_path(model)
    key = _key(weights)
    cached = None if refresh else _read_cached(path, key)
    if cached is not None:
        return cached
    try:
        logger.info("calibrating the Linear kernels for this machine (cached in %s)", path)
        calibration = calibrate(model)
    except Exception as error:  # measuring must never stop decoding: fall back to stock
        logger.warning("kernel calibration failed (%s); using PyTorch's stock products", error)
        return None
    _write_cached(path, calibration)
    return calibration


def auto_plan(model: torch.nn.Module, *, refresh: bool = False) -> KernelPlan:
    """The per-width plan ``linear_kernel="auto"`` runs for ``model`` on this machine.

    Args:
      model: the model to decode (its ``Linear`` weight shapes and dtype are what is timed).
      refresh: measure again even if a cached calibration exists.

    Returns:
      The measured plan, or the stock plan when the model has no CPU ``Linear`` layers or
      measuring failed.
    """
    calibration = auto_calibration(model, refresh=refresh)
    return STOCK_PLAN if calibration is None else calibration.plan
