"""What the benchmark measures: ``BenchConfig`` and the sweep it runs by default.

This is the one home of the benchmark's defaults: ``BenchConfig``, ``bench_methods`` and the
``mtp bench`` options all read them from here (the cost-curve defaults live beside
``measure_cost_curve`` in ``mtp_torch.bench.cost``; the ConfAdapt threshold is ConfAdapt's own).
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from mtp_core import ConfAdapt
from mtp_torch.bench.cost import (
    COST_CONTEXT_LENGTH,
    COST_MAX_TOKENS,
    COST_REPEATS,
    DEFAULT_K_CANDIDATES,
    float_tuple,
    int_tuple,
)

__all__ = [
    "DEFAULT_THRESHOLD",
    "PROMPT_LOOKUP_TOKENS",
    "SWEEP_K_MAX",
    "SWEEP_STATIC",
    "SWEEP_THRESHOLDS",
    "SWEEP_VERIFY",
    "BenchConfig",
]

#: The paper's ConfAdapt threshold; its one home is ConfAdapt's own default.
DEFAULT_THRESHOLD: float = ConfAdapt().threshold
#: ConfAdapt ``k_max`` values of the default sweep (``"auto"`` may be added: cost-aware choice).
SWEEP_K_MAX: tuple[int | str, ...] = (4, 8, 16)
#: ConfAdapt thresholds of the default sweep (the paper sweeps 0.995 ... 0.6).
SWEEP_THRESHOLDS: tuple[float, ...] = (0.99, 0.95, DEFAULT_THRESHOLD, 0.8, 0.7, 0.6)
#: Static-k values of the default sweep.
SWEEP_STATIC: tuple[int, ...] = (2, 3)
#: Thresholds also run in the lossless (verify) mode by default.
SWEEP_VERIFY: tuple[float, ...] = (DEFAULT_THRESHOLD,)
#: ``prompt_lookup_num_tokens`` of the prompt-lookup baseline.
PROMPT_LOOKUP_TOKENS: int = 10


def _k_tuple(values: Iterable[int | str]) -> tuple[int | str, ...]:
    """``k_max`` values as a tuple (ints stay ints, ``"auto"`` stays a string)."""
    return tuple(values)


@attrs.frozen
class BenchConfig:
    """What ``run_benchmark`` measures.

    Attributes:
      max_new_tokens: generation budget per prompt.
      k_max: ConfAdapt ``k_max`` values (ints, or ``"auto"`` for the cost-aware choice).
      thresholds: ConfAdapt thresholds.
      static: static-k values.
      verify_thresholds: thresholds also run in the lossless mode (each ``k_max``).
      verify_static: ``k`` values of lossless rows drafting every mask proposal
        (``StaticK(k)`` with ``verify=True``); none by default.
      repeats: timed rounds over all prompts; every round runs every method once
        (interleaved, so drift spreads evenly), each ratio is the median of the per-round
        ratios with their range as the spread (one untimed warm-up prompt per method first).
      quantize: ``None`` or ``"int8"`` (dynamic int8 Linear layers, CPU only) as an extra
        configuration.
      kernel: ``None`` or a CPU kernel of ``mtp_torch.decoding.kernels`` (``"skinny"``,
        ``"native"``, ``"auto"``): every MTP method also runs with it, beside greedy and
        ``static_1`` with it and stock greedy (rows ``..._{kernel}``, their
        ``speedup`` against ``greedy_skinny``).
      prompt_lookup_tokens: candidates of the prompt-lookup baseline; ``None`` skips it.
      cost_curve: measure the cost curve of one forward pass (used for ceilings and k choice).
      cost_max_tokens: widest pass measured.
      cost_context: cached tokens in front of the measured pass.
      cost_repeats: timed passes per width.
      auto_candidates: ``k_max`` candidates for ``"auto"``.
      probe_prompts: prompts used to probe acceptance for ``"auto"``.
      probe_tokens: tokens generated per probe prompt.

    Raises:
      ValueError: naming the field and its allowed values, for any value out of range.
    """

    max_new_tokens: int = 256
    k_max: tuple[int | str, ...] = attrs.field(default=SWEEP_K_MAX, converter=_k_tuple)
    thresholds: tuple[float, ...] = attrs.field(default=SWEEP_THRESHOLDS, converter=float_tuple)
    static: tuple[int, ...] = attrs.field(default=SWEEP_STATIC, converter=int_tuple)
    verify_thresholds: tuple[float, ...] = attrs.field(default=SWEEP_VERIFY, converter=float_tuple)
    verify_static: tuple[int, ...] = attrs.field(default=(), converter=int_tuple)
    repeats: int = 3
    quantize: str | None = None
    kernel: str | None = None
    prompt_lookup_tokens: int | None = PROMPT_LOOKUP_TOKENS
    cost_curve: bool = True
    cost_max_tokens: int = COST_MAX_TOKENS
    cost_context: int = COST_CONTEXT_LENGTH
    cost_repeats: int = COST_REPEATS
    auto_candidates: tuple[int, ...] = attrs.field(
        default=DEFAULT_K_CANDIDATES, converter=int_tuple
    )
    probe_prompts: int = 4
    probe_tokens: int = 64

    def __attrs_post_init__(self) -> None:
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if int(self.repeats) < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        for k in self.k_max:
            if k != "auto" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
                raise ValueError(f"k_max values must be integers >= 1 or 'auto', got {k!r}")
        for k in self.static:
            if k < 1:
                raise ValueError(f"static k values must be >= 1, got {k}")
        for tau in (*self.thresholds, *self.verify_thresholds):
            if not 0.0 < tau <= 1.0:
                raise ValueError(f"thresholds must lie in (0, 1], got {tau}")
        if self.quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {self.quantize!r}")
        if self.kernel not in (None, "skinny", "native", "auto"):
            raise ValueError(
                f"kernel must be None, 'skinny', 'native' or 'auto', got {self.kernel!r}"
            )
        if self.prompt_lookup_tokens is not None and int(self.prompt_lookup_tokens) < 1:
            raise ValueError(
                f"prompt_lookup_tokens must be >= 1 (or None to skip), got {self.prompt_lookup_tokens}"
            )
        if "auto" in self.k_max and not self.auto_candidates:
            raise ValueError("auto_candidates must hold at least one k_max for k_max='auto'")
