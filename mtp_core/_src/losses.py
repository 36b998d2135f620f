"""Student-teacher losses and metrics, written once against the array API.

Every function takes the array namespace of its inputs (``array_api_compat.array_namespace``),
so the same code runs on numpy arrays in property tests and on torch tensors, with autograd, in
training.  No framework is imported here: ``array_api_compat`` imports torch only when handed a
torch tensor.

Shapes: logits are ``(..., k, vocab)`` (any leading batch / region axes, ``k`` prediction
positions); weights and integer targets are ``(..., k)``.  A weight of 0 ignores its position
(changing its logits changes neither the value nor the gradient); a loss is the weighted mean over
positions, ``sum(w * loss) / sum(w)``, and 0 when every weight is 0.

The teacher's logits are used as constants: pass them detached (computed under
``torch.no_grad()``).  The hard-teacher and ground-truth losses read only an argmax or integer
targets, so no gradient can reach the teacher through them; the soft-teacher loss differentiates
whatever it is given.

Reference: Kirchenbauer et al., "Multi-Token Prediction via Self-Distillation", arXiv 2602.06019,
section on the training objective (docs/method.md sections 3-4).
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, TypeVar, get_args


def array_namespace(*arrays: Any) -> Any:
    """The array-API namespace of ``arrays`` (imported lazily: ``import mtp_core`` needs only numpy)."""
    import array_api_compat

    return array_api_compat.array_namespace(*arrays)


def array_device(array: Any) -> Any:
    """The device ``array`` lives on, through array-api-compat (imported lazily)."""
    import array_api_compat

    return array_api_compat.device(array)


__all__ = [
    "Array",
    "ArrayT",
    "LOSS_KINDS",
    "LossKind",
    "agreement",
    "distillation_loss",
    "entropy",
    "ground_truth_loss",
    "hard_teacher_loss",
    "log_softmax",
    "soft_teacher_loss",
]

LossKind = Literal["hard", "soft", "gt"]
#: The loss kinds ``distillation_loss`` takes (their one home: ``LossKind``).
LOSS_KINDS: tuple[str, ...] = get_args(LossKind)
_LOSS_KINDS = LOSS_KINDS


class Array(Protocol):
    """An array of the array API standard (numpy ``ndarray``, torch ``Tensor``, ...).

    Only what these functions use directly is spelled out (shape, dtype, a few operators); the
    rest goes through the array's namespace.
    """

    @property
    def shape(self) -> tuple[int, ...]:
        """The array's shape."""
        ...

    @property
    def ndim(self) -> int:
        """The number of axes."""
        ...

    @property
    def dtype(self) -> Any:
        """The element type (a library-specific dtype object)."""
        ...

    def __add__(self, other: Any, /) -> Any:
        """Elementwise sum."""
        ...

    def __sub__(self, other: Any, /) -> Any:
        """Elementwise difference."""
        ...

    def __mul__(self, other: Any, /) -> Any:
        """Elementwise product."""
        ...

    def __ge__(self, other: Any, /) -> Any:
        """Elementwise ``>=``."""
        ...


ArrayT = TypeVar("ArrayT", bound=Array)
"""The caller's array type (``numpy.ndarray``, ``torch.Tensor``, ...), returned unchanged."""


def _check_logits(name: str, logits: Array) -> None:
    if logits.ndim < 2:
        raise ValueError(
            f"{name} must have shape (..., k, vocab), got shape {tuple(logits.shape)}; "
            "add the position axis (k) even for a single position"
        )


def _check_pair(student_logits: Array, teacher_logits: Array) -> None:
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if tuple(student_logits.shape) != tuple(teacher_logits.shape):
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape (..., k, vocab), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}; read both at "
            "the same prediction slots"
        )


def _position_weights(xp: Any, logits: Array, weights: Array | None) -> Any:
    """Weights as the logits' float dtype, shape ``logits.shape[:-1]`` (ones when ``None``)."""
    positions = tuple(logits.shape[:-1])
    if weights is None:
        return xp.ones(positions, dtype=logits.dtype, device=array_device(logits))
    if tuple(weights.shape) != positions:
        raise ValueError(
            f"weights must have shape {positions} (the logits' shape without the vocab axis), "
            f"got {tuple(weights.shape)}; use 1.0 for supervised and 0.0 for ignored positions"
        )
    return xp.astype(weights, logits.dtype)


def _weighted_mean(xp: Any, values: Any, weights: Any) -> Any:
    """``sum(w * values) / sum(w)`` as a 0-d array; 0 when every weight is 0."""
    kept = xp.where(weights != 0, values, xp.zeros_like(values))
    total = xp.sum(weights)
    denominator = total + xp.astype(total == 0, total.dtype)
    return xp.sum(weights * kept) / denominator


def _cross_entropy_at(xp: Any, logits: Array, targets: Any) -> Any:
    """Per-position ``-log softmax(logits)[target]``, shape ``logits.shape[:-1]``."""
    log_probs = log_softmax(logits)
    picked = xp.take_along_axis(log_probs, xp.expand_dims(targets, axis=-1), axis=-1)
    return -xp.squeeze(picked, axis=-1)


def log_softmax(logits: ArrayT) -> ArrayT:
    """Log-probabilities over the last axis, computed stably (the maximum is subtracted first).

    Args:
      logits: unnormalized scores, shape ``(..., vocab)``.

    Returns:
      Log-probabilities, same shape and dtype.

    Example:
      >>> import numpy as np
      >>> np.round(np.exp(log_softmax(np.array([0.0, np.log(3.0)]))), 6).tolist()
      [0.25, 0.75]
    """
    xp = array_namespace(logits)
    shifted = logits - xp.max(logits, axis=-1, keepdims=True)
    result: ArrayT = shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))
    return result


def hard_teacher_loss(
    student_logits: ArrayT, teacher_logits: ArrayT, weights: Array | None = None
) -> ArrayT:
    """Cross-entropy of the student against the teacher's argmax token (the paper's default).

    Args:
      student_logits: student logits, shape ``(..., k, vocab)``.
      teacher_logits: teacher logits at the same slots, same shape (a constant: only its
        argmax is read, so no gradient reaches it).
      weights: non-negative per-position weights, shape ``(..., k)``; 0 ignores a position.
        ``None``: all ones.

    Returns:
      The weighted mean cross-entropy (nats), a 0-d array; 0 when every weight is 0.
    """
    _check_pair(student_logits, teacher_logits)
    xp = array_namespace(student_logits, teacher_logits)
    position_weights = _position_weights(xp, student_logits, weights)
    teacher_tokens = xp.argmax(teacher_logits, axis=-1)
    per_position = _cross_entropy_at(xp, student_logits, teacher_tokens)
    result: ArrayT = _weighted_mean(xp, per_position, position_weights)
    return result


def soft_teacher_loss(
    student_logits: ArrayT, teacher_logits: ArrayT, weights: Array | None = None
) -> ArrayT:
    """Forward KL divergence ``KL(P_teacher || P_student)`` per position, weighted mean.

    Equal to the cross-entropy against the teacher's softmax minus the teacher's entropy, so it
    is 0 exactly when the two distributions agree.

    Args:
      student_logits: student logits, shape ``(..., k, vocab)``.
      teacher_logits: teacher logits at the same slots, same shape; pass them detached (this
        loss differentiates whatever it is given).
      weights: non-negative per-position weights, shape ``(..., k)``; 0 ignores a position.
        ``None``: all ones.

    Returns:
      The weighted mean KL divergence (nats), a 0-d array; 0 when every weight is 0.
    """
    _check_pair(student_logits, teacher_logits)
    xp = array_namespace(student_logits, teacher_logits)
    position_weights = _position_weights(xp, student_logits, weights)
    teacher_log_probs = log_softmax(teacher_logits)
    student_log_probs = log_softmax(student_logits)
    teacher_probs = xp.exp(teacher_log_probs)
    terms = xp.where(
        teacher_probs > 0,
        teacher_probs * (teacher_log_probs - student_log_probs),
        xp.zeros_like(teacher_probs),
    )
    per_position = xp.sum(terms, axis=-1)
    result: ArrayT = _weighted_mean(xp, per_position, position_weights)
    return result


def ground_truth_loss(
    student_logits: ArrayT, targets: Array, weights: Array | None = None
) -> ArrayT:
    """Cross-entropy of the student against ground-truth token ids (the "GT Suprv." ablation).

    Args:
      student_logits: student logits, shape ``(..., k, vocab)``.
      targets: integer token ids, shape ``(..., k)``, each in ``[0, vocab)``; a negative id
        ignores its position (like weight 0).
      weights: non-negative per-position weights, shape ``(..., k)``; 0 ignores a position.
        ``None``: all ones.

    Returns:
      The weighted mean cross-entropy (nats), a 0-d array; 0 when no position is supervised.
    """
    _check_logits("student_logits", student_logits)
    xp = array_namespace(student_logits, targets)
    if tuple(targets.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(
            f"targets must have shape {tuple(student_logits.shape[:-1])} (the logits' shape "
            f"without the vocab axis), got {tuple(targets.shape)}"
        )
    if not xp.isdtype(targets.dtype, "integral"):
        raise ValueError(
            f"targets must be integer token ids, got dtype {targets.dtype}; "
            "use -1 for ignored positions"
        )
    supervised = targets >= 0
    position_weights = _position_weights(xp, student_logits, weights) * xp.astype(
        supervised, student_logits.dtype
    )
    safe_targets = xp.where(supervised, targets, xp.zeros_like(targets))
    per_position = _cross_entropy_at(xp, student_logits, safe_targets)
    result: ArrayT = _weighted_mean(xp, per_position, position_weights)
    return result


def entropy(logits: ArrayT, weights: Array | None = None) -> ArrayT:
    """Mean entropy of the softmax of ``logits`` (the optional student entropy penalty).

    Args:
      logits: logits, shape ``(..., k, vocab)``.
      weights: non-negative per-position weights, shape ``(..., k)``; 0 ignores a position.
        ``None``: all ones.

    Returns:
      The weighted mean entropy (nats), a 0-d array; 0 when every weight is 0.
    """
    _check_logits("logits", logits)
    xp = array_namespace(logits)
    position_weights = _position_weights(xp, logits, weights)
    log_probs = log_softmax(logits)
    probs = xp.exp(log_probs)
    terms = xp.where(probs > 0, probs * log_probs, xp.zeros_like(probs))
    result: ArrayT = _weighted_mean(xp, -xp.sum(terms, axis=-1), position_weights)
    return result


def agreement(
    student_logits: ArrayT, teacher_logits: ArrayT, weights: Array | None = None
) -> ArrayT:
    """Per-position rate at which the student's and the teacher's argmax tokens agree.

    Under student forcing this is the rate at which a verifying decoder would accept the
    student's token at each position.  A metric: no gradient.

    Args:
      student_logits: student logits, shape ``(..., k, vocab)``.
      teacher_logits: teacher logits at the same slots, same shape.
      weights: non-negative per-position weights, shape ``(..., k)``; 0 ignores a position.
        ``None``: all ones.

    Returns:
      Agreement rates in ``[0, 1]``, shape ``(k,)``, averaged (weighted) over every leading
      axis; 0 at a position whose weights are all 0.
    """
    _check_pair(student_logits, teacher_logits)
    xp = array_namespace(student_logits, teacher_logits)
    num_positions = int(student_logits.shape[-2])
    position_weights = xp.reshape(
        _position_weights(xp, student_logits, weights), (-1, num_positions)
    )
    same = xp.argmax(student_logits, axis=-1) == xp.argmax(teacher_logits, axis=-1)
    same = xp.reshape(xp.astype(same, student_logits.dtype), (-1, num_positions))
    kept = xp.where(position_weights != 0, same, xp.zeros_like(same))
    total = xp.sum(position_weights, axis=0)
    denominator = total + xp.astype(total == 0, total.dtype)
    result: ArrayT = xp.sum(position_weights * kept, axis=0) / denominator
    return result


def distillation_loss(
    student_logits: ArrayT,
    teacher_logits: ArrayT | None,
    *,
    kind: LossKind = "hard",
    targets: Array | None = None,
    weights: Array | None = None,
    entropy_weight: float = 0.0,
) -> ArrayT:
    """The training objective: a teacher (or ground-truth) loss plus an optional entropy penalty.

    ``kind="hard"`` (the paper's default and best): cross-entropy against the teacher's argmax;
    ``"soft"``: forward KL to the teacher's softmax; ``"gt"``: cross-entropy against ``targets``.
    With student forcing the teacher's logits at prediction column ``j`` score the student's
    token ``j`` given its tokens before it (docs/method.md section 3).

    Args:
      student_logits: student logits at the prediction slots, shape ``(..., k, vocab)``.
      teacher_logits: teacher logits at the same slots (detached), same shape; unused (may be
        ``None``) for ``kind="gt"``.
      kind: ``"hard"``, ``"soft"`` or ``"gt"``.
      targets: integer token ids, shape ``(..., k)``, required for ``kind="gt"``.
      weights: non-negative per-position weights, shape ``(..., k)``; 0 ignores a position.
        ``None``: all ones.
      entropy_weight: coefficient of the student's mean entropy added to the loss (>= 0;
        0, the paper's default, disables it).

    Returns:
      The scalar loss (nats), a 0-d array.

    Raises:
      ValueError: on an unknown ``kind``, a missing ``teacher_logits`` or ``targets``, a
        negative ``entropy_weight`` or mismatched shapes.
    """
    if kind not in _LOSS_KINDS:
        raise ValueError(f"kind must be one of {_LOSS_KINDS}, got {kind!r}")
    if not float(entropy_weight) >= 0.0:
        raise ValueError(
            f"entropy_weight must be >= 0 (0 disables the entropy penalty), got {entropy_weight}"
        )
    loss: ArrayT
    if kind == "gt":
        if targets is None:
            raise ValueError('kind="gt" needs targets: the ground-truth token ids, shape (..., k)')
        loss = ground_truth_loss(student_logits, targets, weights)
    else:
        if teacher_logits is None:
            raise ValueError(
                f'kind="{kind}" needs teacher_logits (the frozen teacher\'s logits at the same '
                'slots); pass kind="gt" with targets to train on ground truth instead'
            )
        if kind == "hard":
            loss = hard_teacher_loss(student_logits, teacher_logits, weights)
        else:
            loss = soft_teacher_loss(student_logits, teacher_logits, weights)
    if float(entropy_weight) > 0.0:
        penalty: ArrayT = loss + entropy(student_logits, weights) * float(entropy_weight)
        return penalty
    return loss
