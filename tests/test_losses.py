"""Properties of the student-teacher losses (docs/method.md section 4), on numpy and on torch."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from mtp_core._src.losses import (
    agreement,
    distillation_loss,
    entropy,
    ground_truth_loss,
    hard_teacher_loss,
    log_softmax,
    soft_teacher_loss,
)
from tests.strategies import logit_batches

Batch = dict[str, np.ndarray]

# Every scalar loss as a function of (batch, student logits, teacher logits).
SCALAR_LOSSES: dict[str, Callable[[Batch, Any, Any], Any]] = {
    "hard": lambda b, s, t: hard_teacher_loss(s, t, b["weights"]),
    "soft": lambda b, s, t: soft_teacher_loss(s, t, b["weights"]),
    "gt": lambda b, s, t: ground_truth_loss(s, b["targets"], b["weights"]),
    "entropy": lambda b, s, t: entropy(s, b["weights"]),
    "distill_hard_entropy": lambda b, s, t: distillation_loss(
        s, t, kind="hard", weights=b["weights"], entropy_weight=0.3
    ),
}


def _np_log_softmax(logits: np.ndarray) -> np.ndarray:
    """Reference log-softmax in float64 via logsumexp with an explicit loop-free formula."""
    top = logits.max(axis=-1, keepdims=True)
    result: np.ndarray = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    return result


def _reference_ce(logits: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> float:
    """Weighted mean of -log softmax at the targets, position by position (targets < 0 skipped)."""
    total, norm = 0.0, 0.0
    log_probs = _np_log_softmax(logits)
    for index in np.ndindex(*targets.shape):
        if targets[index] < 0 or weights[index] == 0:
            continue
        total += float(weights[index] * -log_probs[index][targets[index]])
        norm += float(weights[index])
    return total / norm if norm else 0.0


# --- values ------------------------------------------------------------------------------------


def test_log_softmax_is_stable_and_normalized() -> None:
    logits = np.array([[1000.0, 1000.0, -1000.0], [0.0, np.log(3.0), -np.inf]])
    log_probs = log_softmax(logits)
    assert np.all(np.isfinite(log_probs[0]))
    np.testing.assert_allclose(np.exp(log_probs).sum(axis=-1), 1.0)
    np.testing.assert_allclose(np.exp(log_probs[1, :2]), [0.25, 0.75])


@given(logit_batches())
def test_losses_are_non_negative(batch: Batch) -> None:
    for name, loss in SCALAR_LOSSES.items():
        value = float(loss(batch, batch["student"], batch["teacher"]))
        assert np.isfinite(value), name
        assert value >= -1e-12, name


@given(logit_batches())
def test_soft_loss_zero_when_student_equals_teacher(batch: Batch) -> None:
    student = batch["student"]
    assert abs(float(soft_teacher_loss(student, student.copy(), batch["weights"]))) <= 1e-12
    assert float(soft_teacher_loss(student, student.copy())) == pytest.approx(0.0, abs=1e-12)
    weights = batch["weights"]
    expected = np.where(weights.reshape(-1, weights.shape[-1]).sum(axis=0) > 0, 1.0, 0.0)
    np.testing.assert_array_equal(agreement(student, student.copy(), weights), expected)


@given(logit_batches())
def test_hard_loss_is_cross_entropy_at_teacher_argmax(batch: Batch) -> None:
    student, teacher, weights = batch["student"], batch["teacher"], batch["weights"]
    teacher_tokens = teacher.argmax(axis=-1)
    expected = _reference_ce(student, teacher_tokens, weights)
    assert float(hard_teacher_loss(student, teacher, weights)) == pytest.approx(
        expected, rel=1e-9, abs=1e-12
    )
    assert float(ground_truth_loss(student, teacher_tokens, weights)) == pytest.approx(
        expected, rel=1e-9, abs=1e-12
    )


@given(logit_batches())
def test_ground_truth_loss_skips_negative_targets(batch: Batch) -> None:
    student, targets, weights = batch["student"], batch["targets"], batch["weights"]
    expected = _reference_ce(student, targets, weights)
    assert float(ground_truth_loss(student, targets, weights)) == pytest.approx(
        expected, rel=1e-9, abs=1e-12
    )
    assert float(ground_truth_loss(student, np.full_like(targets, -1))) == 0.0


@given(logit_batches())
def test_soft_loss_and_entropy_match_reference(batch: Batch) -> None:
    student, teacher, weights = batch["student"], batch["teacher"], batch["weights"]
    teacher_log_probs, student_log_probs = _np_log_softmax(teacher), _np_log_softmax(student)
    kl = (np.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs)).sum(axis=-1)
    ent = -(np.exp(student_log_probs) * student_log_probs).sum(axis=-1)
    norm = weights.sum()
    expected_kl = (weights * kl).sum() / norm if norm else 0.0
    expected_ent = (weights * ent).sum() / norm if norm else 0.0
    assert float(soft_teacher_loss(student, teacher, weights)) == pytest.approx(
        expected_kl, rel=1e-9, abs=1e-12
    )
    assert float(entropy(student, weights)) == pytest.approx(expected_ent, rel=1e-9, abs=1e-12)
    combined = distillation_loss(student, teacher, kind="soft", weights=weights, entropy_weight=0.5)
    assert float(combined) == pytest.approx(expected_kl + 0.5 * expected_ent, rel=1e-9, abs=1e-12)


@given(logit_batches())
def test_agreement_rates(batch: Batch) -> None:
    student, teacher, weights = batch["student"], batch["teacher"], batch["weights"]
    rates = np.asarray(agreement(student, teacher, weights))
    k = student.shape[-2]
    assert rates.shape == (k,)
    assert np.all((rates >= 0.0) & (rates <= 1.0))
    same = (student.argmax(-1) == teacher.argmax(-1)).reshape(-1, k)
    flat_weights = weights.reshape(-1, k)
    for j in range(k):
        norm = flat_weights[:, j].sum()
        expected = (flat_weights[:, j] * same[:, j]).sum() / norm if norm else 0.0
        assert rates[j] == pytest.approx(expected)
    np.testing.assert_allclose(agreement(student, teacher), same.mean(axis=0))


# --- invariances -------------------------------------------------------------------------------


@given(logit_batches(), st.data())
def test_invariant_to_constant_shift_per_position(batch: Batch, data: st.DataObject) -> None:
    shape = batch["student"].shape[:-1] + (1,)
    shift = st.floats(min_value=-50.0, max_value=50.0, allow_nan=False)
    student_shift = np.asarray(
        data.draw(st.lists(shift, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    ).reshape(shape)
    teacher_shift = np.asarray(
        data.draw(st.lists(shift, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    ).reshape(shape)
    shifted_student = batch["student"] + student_shift
    shifted_teacher = batch["teacher"] + teacher_shift
    # Rounding may merge two nearly equal teacher logits into a tie; the argmax must stay put.
    assume(np.array_equal(shifted_teacher.argmax(-1), batch["teacher"].argmax(-1)))
    for name, loss in SCALAR_LOSSES.items():
        before = float(loss(batch, batch["student"], batch["teacher"]))
        after = float(loss(batch, shifted_student, shifted_teacher))
        assert after == pytest.approx(before, rel=1e-9, abs=1e-9), name


@given(logit_batches(), st.data())
def test_weight_zero_positions_are_ignored(batch: Batch, data: st.DataObject) -> None:
    ignored = batch["weights"] == 0
    rng = np.random.default_rng(data.draw(st.integers(min_value=0, max_value=2**32 - 1)))
    changed_student = batch["student"].copy()
    changed_teacher = batch["teacher"].copy()
    changed_student[ignored] = rng.normal(scale=100.0, size=changed_student[ignored].shape)
    changed_teacher[ignored] = rng.normal(scale=100.0, size=changed_teacher[ignored].shape)
    changed_targets = batch["targets"].copy()
    changed_targets[ignored] = rng.integers(-1, batch["student"].shape[-1], size=int(ignored.sum()))
    changed = dict(batch, targets=changed_targets)
    for name, loss in SCALAR_LOSSES.items():
        before = float(loss(batch, batch["student"], batch["teacher"]))
        after = float(loss(changed, changed_student, changed_teacher))
        assert after == before, name
    np.testing.assert_array_equal(
        agreement(changed_student, changed_teacher, batch["weights"]),
        agreement(batch["student"], batch["teacher"], batch["weights"]),
    )


def test_all_zero_weights_give_zero() -> None:
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
    zeros = np.zeros((2, 3))
    batch = {"weights": zeros, "targets": np.zeros((2, 3), dtype=np.int64)}
    for name, loss in SCALAR_LOSSES.items():
        assert float(loss(batch, student, teacher)) == 0.0, name
    np.testing.assert_array_equal(agreement(student, teacher, zeros), np.zeros(3))


# --- distillation_loss dispatch and validation --------------------------------------------------


def test_distillation_loss_dispatch() -> None:
    rng = np.random.default_rng(1)
    student, teacher = rng.normal(size=(4, 3, 6)), rng.normal(size=(4, 3, 6))
    targets = rng.integers(0, 6, size=(4, 3))
    assert float(distillation_loss(student, teacher)) == float(hard_teacher_loss(student, teacher))
    assert float(distillation_loss(student, teacher, kind="soft")) == float(
        soft_teacher_loss(student, teacher)
    )
    assert float(distillation_loss(student, None, kind="gt", targets=targets)) == float(
        ground_truth_loss(student, targets)
    )
    assert float(distillation_loss(student, teacher, entropy_weight=0.25)) == pytest.approx(
        float(hard_teacher_loss(student, teacher)) + 0.25 * float(entropy(student))
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s, t: distillation_loss(s, t, kind="kl"), "kind must be one of"),  # type: ignore[arg-type]
        (lambda s, t: distillation_loss(s, t, kind="gt"), "needs targets"),
        (lambda s, t: distillation_loss(s, None), "needs teacher_logits"),
        (lambda s, t: distillation_loss(s, t, entropy_weight=-1.0), "entropy_weight must be >= 0"),
        (lambda s, t: distillation_loss(s, t, entropy_weight=float("nan")), "entropy_weight"),
        (lambda s, t: hard_teacher_loss(s, t[:, :2]), "same shape"),
        (lambda s, t: soft_teacher_loss(s, t, np.ones((2, 2))), "weights must have shape"),
        (lambda s, t: hard_teacher_loss(s[0, 0], t[0, 0]), r"shape \(\.\.\., k, vocab\)"),
        (
            lambda s, t: ground_truth_loss(s, np.zeros((2, 2), dtype=np.int64)),
            "targets must have shape",
        ),
        (lambda s, t: ground_truth_loss(s, np.zeros((2, 3))), "integer token ids"),
        (lambda s, t: agreement(s, t, np.ones(3)), "weights must have shape"),
        (lambda s, t: entropy(s[0, 0]), r"shape \(\.\.\., k, vocab\)"),
    ],
)
def test_bad_arguments_raise(call: Callable[[Any, Any], Any], message: str) -> None:
    rng = np.random.default_rng(2)
    student, teacher = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
    with pytest.raises(ValueError, match=message):
        call(student, teacher)


def test_core_losses_do_not_import_torch() -> None:
    code = (
        "import sys, numpy as np\n"
        "from mtp_core._src.losses import distillation_loss\n"
        "x = np.zeros((2, 3, 4))\n"
        "for kind in ('hard', 'soft'):\n"
        "    distillation_loss(x, x, kind=kind, entropy_weight=0.1)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- torch: same values, gradients to the student only -----------------------------------------


@given(logit_batches())
def test_numpy_and_torch_agree(batch: Batch) -> None:
    torch = pytest.importorskip("torch")
    as_torch = {key: torch.from_numpy(value) for key, value in batch.items()}
    for name, loss in SCALAR_LOSSES.items():
        numpy_value = float(loss(batch, batch["student"], batch["teacher"]))
        torch_value = loss(as_torch, as_torch["student"], as_torch["teacher"])
        assert isinstance(torch_value, torch.Tensor) and torch_value.dtype == torch.float64
        assert float(torch_value) == pytest.approx(numpy_value, rel=1e-10, abs=1e-12), name
    np.testing.assert_allclose(
        agreement(as_torch["student"], as_torch["teacher"], as_torch["weights"]).numpy(),
        agreement(batch["student"], batch["teacher"], batch["weights"]),
    )
    np.testing.assert_allclose(
        log_softmax(as_torch["student"]).numpy(),
        log_softmax(batch["student"]),
        rtol=1e-10,
        atol=1e-12,
    )


@pytest.mark.parametrize("name", sorted(SCALAR_LOSSES))
def test_torch_gradients_reach_the_student_only_and_match_finite_differences(name: str) -> None:
    torch = pytest.importorskip("torch")
    loss = SCALAR_LOSSES[name]
    rng = np.random.default_rng(3)
    batch = {
        "student": rng.normal(scale=2.0, size=(2, 3, 5)),
        "teacher": rng.normal(scale=2.0, size=(2, 3, 5)),
        "weights": np.array([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]]),
        "targets": np.array([[0, 4, -1], [2, 3, 1]]),
    }
    as_torch = {key: torch.from_numpy(value) for key, value in batch.items()}
    student = as_torch["student"].clone().requires_grad_(True)
    teacher = as_torch["teacher"]  # detached, as the training loop passes it
    loss(as_torch, student, teacher).backward()
    assert student.grad is not None and teacher.grad is None
    gradient = student.grad.numpy()
    # Positions with weight 0 get exactly zero gradient.
    assert np.all(gradient[batch["weights"] == 0] == 0.0)
    # Central differences on the numpy version of the same loss.
    step = 1e-6
    numeric = np.zeros_like(batch["student"])
    for index in np.ndindex(*batch["student"].shape):
        plus, minus = batch["student"].copy(), batch["student"].copy()
        plus[index] += step
        minus[index] -= step
        numeric[index] = (
            float(loss(batch, plus, batch["teacher"])) - float(loss(batch, minus, batch["teacher"]))
        ) / (2 * step)
    np.testing.assert_allclose(gradient, numeric, rtol=1e-6, atol=1e-8)
    assert np.abs(gradient).max() > 0


def test_torch_teacher_gets_no_gradient_from_argmax_losses() -> None:
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 3, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    (hard_teacher_loss(student, teacher) + agreement(student, teacher).sum()).backward()
    assert student.grad is not None and teacher.grad is None
