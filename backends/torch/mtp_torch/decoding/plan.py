"""What a kernel scope holds: the per-width ``KernelPlan`` and the calling context's plans.

``mtp_torch.decoding.kernels`` applies plans to ``Linear`` layers and
``mtp_torch.decoding.attention`` to attention; both read the plan of the calling context here.
"""

from __future__ import annotations

import contextvars
from typing import Any

import attrs
import torch

__all__ = [
    "IMPLEMENTATIONS",
    "LINEAR_KERNELS",
    "MAX_PLAN_ROWS",
    "SKINNY_MAX_ROWS",
    "STOCK_PLAN",
    "KernelPlan",
    "active_plan",
    "check_linear_kernel",
]

LINEAR_KERNELS = ("stock", "skinny", "native", "auto")
"""The ``linear_kernel`` values ``MTPModel`` and the commands accept."""

IMPLEMENTATIONS = ("stock", "skinny", "native")
"""What one pass width can run (``"auto"`` chooses among them per width)."""

SKINNY_MAX_ROWS = 6
"""``"skinny"`` covers passes of up to this many rows (wider ones gained nothing, measured)."""

MAX_PLAN_ROWS = 8
"""The widest pass a plan can cover (the native kernel's limit)."""


def check_linear_kernel(kernel: str) -> str:
    """``kernel`` if it is one of ``LINEAR_KERNELS``, else a ``ValueError`` saying what to use."""
    if kernel not in LINEAR_KERNELS:
        raise ValueError(
            f"linear_kernel must be one of {', '.join(map(repr, LINEAR_KERNELS))}, got "
            f"{kernel!r}: 'stock' is PyTorch's own (exactly transformers' numerics), 'skinny' "
            "the weight-first product, 'native' the compiled few-row kernel, 'auto' the fastest "
            "of them per pass width as measured on this machine"
        )
    return kernel


def _as_widths(value: Any) -> tuple[str, ...]:
    return tuple(str(kind) for kind in value)


def _check_widths(instance: Any, attribute: Any, value: tuple[str, ...]) -> None:
    if len(value) > MAX_PLAN_ROWS:
        raise ValueError(f"a plan covers at most {MAX_PLAN_ROWS} widths, got {len(value)}")
    unknown = sorted(set(value) - set(IMPLEMENTATIONS))
    if unknown:
        raise ValueError(f"unknown implementations {unknown}; use {IMPLEMENTATIONS}")


@attrs.frozen
class KernelPlan:
    """Which ``Linear`` implementation each pass width uses.

    Attributes:
      widths: ``widths[n - 1]`` is the implementation of a pass of ``n`` rows (``"stock"``,
        ``"skinny"`` or ``"native"``); wider passes run ``"stock"``.
      name: what the plan was asked as (``"stock"``, ``"skinny"``, ``"native"``, ``"auto"``).
      attention: use the few-query attention product inside the scope (see module doc).
    """

    widths: tuple[str, ...] = attrs.field(converter=_as_widths, validator=_check_widths)
    name: str = "custom"
    attention: bool = True

    def implementation(self, rows: int) -> str:
        """The implementation a pass of ``rows`` rows runs."""
        return self.widths[rows - 1] if 1 <= rows <= len(self.widths) else "stock"

    @property
    def is_stock(self) -> bool:
        """True when every width runs PyTorch's own product and attention is untouched."""
        return all(kind == "stock" for kind in self.widths) and not self.attention

    def describe(self) -> str:
        """One line, e.g. ``auto: 1-4 native, 5-8 skinny``."""
        if not self.widths:
            return f"{self.name}: stock"
        parts: list[str] = []
        start = 1
        for n in range(2, len(self.widths) + 2):
            if n > len(self.widths) or self.widths[n - 1] != self.widths[start - 1]:
                span = f"{start}" if start == n - 1 else f"{start}-{n - 1}"
                parts.append(f"{span} {self.widths[start - 1]}")
                start = n
        return f"{self.name}: {', '.join(parts)}"


STOCK_PLAN = KernelPlan((), name="stock", attention=False)


@attrs.frozen(eq=False)
class _Scope:
    plans: dict[int, KernelPlan]  # id(module) -> plan


_ACTIVE: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar(
    "mtp_lm_kernel_scope", default=None
)


def active_plan(module: torch.nn.Module) -> KernelPlan | None:
    """The plan covering ``module`` in the calling context, ``None`` outside every scope."""
    scope = _ACTIVE.get()
    return None if scope is None else scope.plans.get(id(module))
