"""Acceptance policies: how many of one step's proposed tokens to keep.

A multi-token step reads ``k`` prediction positions (the last real position and ``k - 1`` mask
positions).  A policy looks at the top-1 probability of each position and decides, per row, how
many of the ``k`` proposed tokens are kept.  Policies are immutable values: they hold no state and
are validated when built.

Reference: Kirchenbauer et al., "Multi-Token Prediction via Self-Distillation", arXiv 2602.06019,
section on decoding (static k and ConfAdapt).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import attrs
import numpy as np
import numpy.typing as npt

__all__ = ["AcceptancePolicy", "ConfAdapt", "StaticK", "check_confidences"]

FloatArray = npt.NDArray[np.floating]
IntArray = npt.NDArray[np.int64]


@runtime_checkable
class AcceptancePolicy(Protocol):
    """What the decode engine needs from a policy."""

    @property
    def num_positions(self) -> int:
        """Number of prediction positions read per step (``k``): one real + ``k - 1`` masks."""
        ...

    def accept(self, confidences: npt.ArrayLike) -> IntArray:
        """Number of tokens kept per row, shape ``(batch,)``, each in ``[1, k]``."""
        ...


def check_confidences(confidences: npt.ArrayLike) -> FloatArray:
    """Validate a confidence array and return it as ``float64`` of shape ``(batch, k)``.

    Args:
      confidences: top-1 softmax probabilities, shape ``(batch, k)``, values in ``[0, 1]``.

    Returns:
      The same values as a ``float64`` numpy array.

    Raises:
      ValueError: if the array is not 2-D, has no positions, or holds values outside ``[0, 1]``
        (NaN included).
    """
    array = np.asarray(confidences, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(
            f"confidences must have shape (batch, k), got shape {array.shape}; "
            "pass one row of k top-1 probabilities per sequence"
        )
    if array.shape[1] < 1:
        raise ValueError("confidences must hold at least one position per row (k >= 1)")
    if array.size and not bool(np.all((array >= 0.0) & (array <= 1.0))):
        raise ValueError(
            "confidences must be probabilities in [0, 1] (top-1 softmax values), "
            "got values outside that range or NaN"
        )
    return array


def _validate_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value}")


@attrs.frozen
class StaticK:
    """Keep all ``k`` proposed tokens of every step (the paper's "static k" decoding).

    ``StaticK(1)`` is plain greedy (or sampled) next-token decoding.

    Args:
      k: tokens proposed and kept per step, ``k >= 1``.

    Example:
      >>> import numpy as np
      >>> StaticK(3).accept(np.array([[0.2, 0.1, 0.9]])).tolist()
      [3]
    """

    k: int = attrs.field()

    @k.validator
    def _check_k(self, attribute: attrs.Attribute[int], value: int) -> None:
        _validate_positive_int("k", value)

    @property
    def num_positions(self) -> int:
        """Prediction positions read per step: ``k``."""
        return int(self.k)

    def accept(self, confidences: npt.ArrayLike) -> IntArray:
        """Return ``k`` for every row (or the row width, if fewer positions were read).

        Args:
          confidences: top-1 probabilities, shape ``(batch, k)``; only the shape is used.

        Returns:
          ``int64`` array of shape ``(batch,)``.
        """
        array = check_confidences(confidences)
        return np.full(array.shape[0], min(int(self.k), array.shape[1]), dtype=np.int64)


@attrs.frozen
class ConfAdapt:
    """Keep the longest run of proposed tokens whose confidence clears a threshold.

    Position ``j`` of a step is kept when it and every position before it have top-1
    probability ``>= threshold``.  The first token is always emitted, so each step keeps at
    least one; a first position below the threshold keeps exactly one, whatever the later
    positions say.  Positions are tested one by one (no product of probabilities).

    Args:
      threshold: confidence threshold in ``(0, 1]``; the paper sweeps 0.995 ... 0.6, default 0.9.
      k_max: prediction positions per step (``k_max - 1`` masks are appended), ``k_max >= 1``.

    Example:
      >>> import numpy as np
      >>> rows = np.array([[0.95, 0.92, 0.3, 0.99], [0.5, 0.95, 0.96, 0.99]])
      >>> ConfAdapt(threshold=0.9, k_max=4).accept(rows).tolist()
      [2, 1]
    """

    threshold: float = attrs.field(default=0.9)
    k_max: int = attrs.field(default=16)

    @threshold.validator
    def _check_threshold(self, attribute: attrs.Attribute[float], value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise ValueError(f"threshold must be a number in (0, 1], got {value!r}")
        if not (0.0 < float(value) <= 1.0):
            raise ValueError(
                f"threshold must be in (0, 1], got {value}; 0.9 is the paper's default, "
                "lower values accept more tokens per step at some cost in quality"
            )

    @k_max.validator
    def _check_k_max(self, attribute: attrs.Attribute[int], value: int) -> None:
        _validate_positive_int("k_max", value)

    @property
    def num_positions(self) -> int:
        """Prediction positions read per step: ``k_max``."""
        return int(self.k_max)

    def accept(self, confidences: npt.ArrayLike) -> IntArray:
        """Length of the longest confident prefix per row, at least 1.

        Args:
          confidences: top-1 probabilities, shape ``(batch, k)``.

        Returns:
          ``int64`` array of shape ``(batch,)`` with values in ``[1, k]``.
        """
        array = check_confidences(confidences)
        confident = array >= float(self.threshold)
        # The scan starts at the first position and ends at the first one below the threshold;
        # the first token is emitted even then (so an unconfident first position keeps 1,
        # whatever follows it: the authors' rule, docs/method.md section 5).
        run: IntArray = np.cumprod(confident, axis=1).sum(axis=1).astype(np.int64)
        kept: IntArray = np.maximum(run, 1)
        return kept
