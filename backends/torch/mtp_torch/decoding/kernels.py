"""A CPU kernel for the few-row matrix products of decoding: ``skinny_linear``.

Decoding feeds a handful of tokens per forward pass, so every ``nn.Linear`` multiplies a
``(rows, in)`` activation by an ``(out, in)`` weight with ``rows`` between 1 and ~8.  PyTorch
computes ``x @ W.T``: one row goes to a matrix-vector kernel, a few rows to a general matrix
product that packs the whole weight for a tiny left operand.  On the 2-core development machine
(AMD EPYC, torch 2.13 CPU, fp32) both stream the weights well below memory bandwidth, while the
same product written weight-first, ``(W @ x.T).T``, lets the kernel stream ``W`` once with the
few activation columns packed.  Measured there on SmolLM2-135M's 49152 x 576 output projection:
1 row 11.4 ms stock, 2 rows 25.4 ms stock against 4.6 ms weight-first; a whole forward pass on
a 200-token cache: 1 token 72 -> 47 ms, 2 tokens 118 -> 73 ms (docs/results.md).

The kernel changes only the order of the floating-point sums, not what is computed: outputs
agree with ``F.linear`` to rounding, so a greedy decode can still pick another token where two
logits tie to the last bits.  It is therefore opt-in (``MTPModel(..., linear_kernel="skinny")``,
``--kernel skinny``), and a comparison that must match token for token runs both sides inside
the same ``skinny_linear`` context.  Whether it pays depends on the CPU's BLAS: ``mtp bench
--kernel skinny`` measures it beside the stock rows.

Only inference is touched: with gradients enabled, on other devices, or above ``max_rows`` rows
the stock ``F.linear`` runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["LINEAR_KERNELS", "SKINNY_MAX_ROWS", "check_linear_kernel", "skinny_linear"]

LINEAR_KERNELS = ("stock", "skinny")
"""The ``linear_kernel`` values ``MTPModel`` and the commands accept."""

SKINNY_MAX_ROWS = 6
"""Up to this many rows use the weight-first product (measured: wider passes gained nothing)."""

_MARKER = "_mtp_skinny_original_forward"


def check_linear_kernel(kernel: str) -> str:
    """``kernel`` if it is one of ``LINEAR_KERNELS``, else a ``ValueError`` saying what to use."""
    if kernel not in LINEAR_KERNELS:
        raise ValueError(
            f"linear_kernel must be one of {', '.join(map(repr, LINEAR_KERNELS))}, got "
            f"{kernel!r}: 'stock' is PyTorch's own (exactly transformers' numerics), 'skinny' "
            "the weight-first CPU product for few-token passes"
        )
    return kernel


def _skinny_forward(module: torch.nn.Linear, max_rows: int) -> Any:
    """A ``forward`` for ``module`` that multiplies weight-first when few rows need no grad."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight, bias = module.weight, module.bias
        features = x.shape[-1]
        rows = x.numel() // features if features else 0
        if (
            not 1 <= rows <= max_rows
            or x.device.type != "cpu"
            or x.dtype != weight.dtype
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        ):
            return F.linear(x, weight, bias)
        flat = x.reshape(rows, features)
        if rows == 1:  # one column would dispatch to the matrix-vector kernel again
            flat = torch.cat([flat, flat.new_zeros(1, features)])
        product = torch.mm(weight, flat.t())[:, :rows].t()
        if bias is not None:
            product = product + bias
        return product.reshape(*x.shape[:-1], weight.shape[0])

    return forward


@contextlib.contextmanager
def skinny_linear(*models: torch.nn.Module, max_rows: int = SKINNY_MAX_ROWS) -> Iterator[int]:
    """Run every ``torch.nn.Linear`` of ``models`` with the weight-first CPU product.

    Within the ``with`` block, inference calls of up to ``max_rows`` rows on the CPU compute
    ``(W @ x.T).T`` instead of ``x @ W.T``; everything else runs as before.  The modules'
    forwards are restored on exit, also on error.  Nested or repeated entries over the same
    module are harmless (the outer one restores).  Subclasses of ``nn.Linear`` (quantised or
    adapter layers) are left alone; a LoRA layer's inner ``base_layer`` is a plain ``Linear``.

    Example::

        with skinny_linear(model):
            model.generate(input_ids, max_new_tokens=64)

    Args:
      *models: the modules whose ``Linear`` layers to switch (e.g. a transformers model).
      max_rows: the widest input (tokens in the pass) that uses the weight-first product.

    Yields:
      How many layers were switched by this entry.

    Raises:
      ValueError: for ``max_rows < 1``.
    """
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be an integer >= 1, got {max_rows!r}")
    switched: list[torch.nn.Linear] = []
    try:
        for model in models:
            for module in model.modules():
                if type(module) is torch.nn.Linear and _MARKER not in module.__dict__:
                    module.__dict__[_MARKER] = module.__dict__.get("forward")
                    module.forward = _skinny_forward(module, max_rows)  # type: ignore[method-assign]
                    switched.append(module)
        yield len(switched)
    finally:
        for module in switched:
            original = module.__dict__.pop(_MARKER)
            if original is None:
                del module.forward
            else:
                module.forward = original  # type: ignore[method-assign]
