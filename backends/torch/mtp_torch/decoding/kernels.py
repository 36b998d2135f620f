"""CPU kernels for the few-token passes of decoding, chosen per pass width, scoped per call.

Decoding at batch 1 feeds a handful of tokens per forward pass, so every ``nn.Linear``
multiplies a ``(rows, in)`` activation by an ``(out, in)`` weight with ``rows`` between 1 and
~8, and the pass costs what it takes to stream the weights, whatever ``rows`` is, *if* the
product streams them once.  PyTorch's CPU path does not: one row goes to a matrix-vector kernel
and a few rows to a GEMM that packs the weight, and on the 2-core development machines both
read the weights at a third of the memory bandwidth or less, differently from CPU to CPU
(docs/results.md).  This module offers, per pass width:

- ``"stock"``: ``F.linear``, PyTorch's own numerics (exactly transformers');
- ``"skinny"``: the same product written weight-first, ``(W @ x.T).T`` (pure PyTorch);
- ``"native"``: a compiled kernel that reads each weight row once and multiplies it with every
  activation row while it sits in L1 (``mtp_torch.decoding.native``; built on first use);

and a ``KernelPlan`` saying which one each width uses (``linear_kernel="auto"`` measures them
on this machine and picks per width: ``mtp_torch.decoding.calibrate``).  A plan is applied with
``use_kernels(plan, model)``, a context manager.  It is a property of the *call*: the plan lives
in a ``contextvars.ContextVar``, so another thread decoding the same modules at the same time
keeps its own kernel (stock, if it entered none).  To get there the plain ``nn.Linear`` modules
of the model are switched, once, to a subclass whose ``forward`` reads that variable and, when
no plan covers them, runs exactly ``F.linear``; they are switched back when the last scope using
them ends.  Inside a scope, CPU attention over a few queries uses a matched product as well
(``mtp_torch.decoding.attention``).

Kernels other than ``"stock"`` change only the order of floating-point sums: outputs agree with
``F.linear`` to rounding, so a greedy decode can pick another token where two logits tie to the
last bits.  Comparisons that must match token for token run both sides in the same scope.
Only inference is touched: calls with gradients, other devices or dtypes, more rows than the
plan covers, and ``nn.Linear`` subclasses (adapter and quantised layers) run stock.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from mtp_torch.decoding.attention import install_few_query_attention
from mtp_torch.decoding.native import load_native
from mtp_torch.decoding.plan import (
    _ACTIVE,
    IMPLEMENTATIONS,
    LINEAR_KERNELS,
    MAX_PLAN_ROWS,
    SKINNY_MAX_ROWS,
    STOCK_PLAN,
    KernelPlan,
    _Scope,
    active_plan,
    check_linear_kernel,
)

__all__ = [
    "STOCK_PLAN",
    "IMPLEMENTATIONS",
    "LINEAR_KERNELS",
    "MAX_PLAN_ROWS",
    "SKINNY_MAX_ROWS",
    "KernelPlan",
    "active_plan",
    "check_linear_kernel",
    "fixed_plan",
    "skinny_linear",
    "use_kernels",
]


def fixed_plan(kernel: str) -> KernelPlan:
    """The plan of a kernel that needs no measuring (``"stock"``, ``"skinny"``, ``"native"``).

    ``"native"`` where the compiled kernel cannot be built becomes ``"skinny"`` (the reason is
    logged by ``mtp_torch.decoding.native``).

    Raises:
      ValueError: for ``"auto"`` (see ``mtp_torch.decoding.calibrate.auto_plan``) or an unknown
        name.
    """
    check_linear_kernel(kernel)
    if kernel == "stock":
        return STOCK_PLAN
    if kernel == "skinny":
        return KernelPlan(("skinny",) * SKINNY_MAX_ROWS, name="skinny")
    if kernel == "native":
        if load_native() is None:
            return KernelPlan(("skinny",) * SKINNY_MAX_ROWS, name="native (unavailable: skinny)")
        return KernelPlan(("native",) * MAX_PLAN_ROWS, name="native")
    raise ValueError("'auto' is measured: use mtp_torch.decoding.calibrate.auto_plan(model)")


# ----------------------------------------------------------------------------------------------
# The products


def weight_first(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` computed as ``(weight @ x.T).T`` (one row padded to two columns)."""
    rows = x.shape[0]
    if rows == 1:  # one column would dispatch to the matrix-vector kernel again
        x = torch.cat([x, x.new_zeros(1, x.shape[1])])
    return torch.mm(weight, x.t())[:, :rows].t()


def native_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` by the compiled kernel (``x``: 1-8 rows, float32/float64, CPU)."""
    module = load_native()
    if module is None:
        return weight_first(x, weight)
    product: torch.Tensor = module.skinny_linear(x.contiguous(), weight)
    return product


_PRODUCTS = {"skinny": weight_first, "native": native_product}


def run_implementation(
    kind: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed by implementation ``kind`` (any leading shape)."""
    features = x.shape[-1]
    rows = x.numel() // features if features else 0
    if kind == "stock" or not 1 <= rows <= MAX_PLAN_ROWS or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    return _apply(kind, x, weight, bias, rows)


def _apply(
    kind: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int
) -> torch.Tensor:
    """The product of ``kind`` on ``x`` flattened to its ``rows`` rows (already checked)."""
    product = _PRODUCTS[kind](x.reshape(rows, x.shape[-1]), weight)
    if bias is not None:
        product = product + bias
    return product.reshape(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------------------------
# Scopes: the plan of the current call, and the modules it covers


_LOCK = threading.Lock()
_USERS: weakref.WeakKeyDictionary[torch.nn.Module, int] = weakref.WeakKeyDictionary()


class KernelLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose forward follows the plan of the calling scope, if any.

    Modules are switched to this class only while some ``use_kernels`` scope uses them; outside
    every scope (or in a thread that entered none) the forward is exactly ``F.linear``.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Linear's name)
        scope = _ACTIVE.get()
        plan = None if scope is None else scope.plans.get(id(self))
        if plan is None:
            return F.linear(input, self.weight, self.bias)
        weight = self.weight
        features = input.shape[-1]
        rows = input.numel() // features if features else 0
        kind = plan.implementation(rows)
        if (
            kind == "stock"
            or input.device.type != "cpu"
            or input.dtype != weight.dtype
            or not weight.is_contiguous()
            or (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad))
        ):
            return F.linear(input, weight, self.bias)
        return _apply(kind, input, weight, self.bias, rows)  # rows and kind known: no re-check


def _switch(modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Switch plain ``nn.Linear`` modules to ``KernelLinear`` (counted); return the counted ones."""
    counted: list[torch.nn.Module] = []
    with _LOCK:
        for module in modules:
            kind = type(module)
            if kind is torch.nn.Linear:
                module.__class__ = KernelLinear
            elif kind is not KernelLinear:
                continue
            _USERS[module] = _USERS.get(module, 0) + 1
            counted.append(module)
    return counted


def _release(counted: list[torch.nn.Module]) -> None:
    with _LOCK:
        for module in counted:
            users = _USERS.get(module, 1) - 1
            if users <= 0:
                _USERS.pop(module, None)
                if type(module) is KernelLinear:
                    module.__class__ = torch.nn.Linear  # type: ignore[assignment]
            else:
                _USERS[module] = users


@contextlib.contextmanager
def use_kernels(plan: KernelPlan, *models: torch.nn.Module) -> Iterator[int]:
    """Run the ``Linear`` layers (and few-query attention) of ``models`` by ``plan`` in this call.

    The plan holds for this thread (this context) only and only for the modules of ``models``;
    nested scopes add to the outer one (the inner plan wins for modules both cover).  Modules
    are restored on exit, also on error, once no other scope uses them.

    Example::

        with use_kernels(fixed_plan("native"), model):
            model.generate(input_ids, max_new_tokens=64)   # transformers' generate, same kernel

    Args:
      plan: what each pass width runs (``fixed_plan``, ``calibrate.auto_plan``).
      *models: the modules whose layers follow the plan (e.g. a transformers model).

    Yields:
      How many ``Linear`` layers the plan covers.
    """
    if plan.is_stock:
        yield 0
        return
    modules = [module for model in models for module in model.modules()]
    counted = _switch(modules)
    if plan.attention:
        for model in models:
            install_few_query_attention(model)
    outer = _ACTIVE.get()
    plans = dict(outer.plans) if outer is not None else {}
    plans.update({id(module): plan for module in modules})
    token = _ACTIVE.set(_Scope(plans))
    try:
        yield len(counted)
    finally:
        _ACTIVE.reset(token)
        _release(counted)


@contextlib.contextmanager
def skinny_linear(*models: torch.nn.Module, max_rows: int = SKINNY_MAX_ROWS) -> Iterator[int]:
    """Run every plain ``torch.nn.Linear`` of ``models`` with the weight-first CPU product.

    ``use_kernels`` with ``"skinny"`` for passes of up to ``max_rows`` rows (attention left
    stock): inference calls of up to ``max_rows`` rows on the CPU compute ``(W @ x.T).T``
    instead of ``x @ W.T``, in this thread only.  Subclasses of ``nn.Linear`` (quantised or
    adapter layers) are left alone; a LoRA layer's inner ``base_layer`` is a plain ``Linear``.

    Example::

        with skinny_linear(model):
            model.generate(input_ids, max_new_tokens=64)

    Args:
      *models: the modules whose ``Linear`` layers to switch (e.g. a transformers model).
      max_rows: the widest input (tokens in the pass) that uses the weight-first product
        (at most ``MAX_PLAN_ROWS``).

    Yields:
      How many layers the kernel covers.

    Raises:
      ValueError: for ``max_rows`` outside ``[1, MAX_PLAN_ROWS]``.
    """
    if (
        isinstance(max_rows, bool)
        or not isinstance(max_rows, int)
        or not 1 <= max_rows <= MAX_PLAN_ROWS
    ):
        raise ValueError(
            f"max_rows must be an integer >= 1 and <= {MAX_PLAN_ROWS}, got {max_rows!r}"
        )
    plan = KernelPlan(("skinny",) * max_rows, name="skinny", attention=False)
    with use_kernels(plan, *models) as covered:
        yield covered
