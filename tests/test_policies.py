"""Policies against a plain-Python statement of the paper's rules, and their validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given

from mtp_core import AcceptancePolicy, ConfAdapt, StaticK, check_confidences
from tests import strategies as S


def confadapt_by_the_paper(row: list[float], threshold: float) -> int:
    """Scan from the first position; stop at the first one below threshold; emit at least one.

    The authors' SGLang port: the kept length is the index of the first position below the
    threshold, at least 1 (so an unconfident first position keeps 1, whatever follows).
    """
    first_below = len(row)
    for index, confidence in enumerate(row):
        if confidence < threshold:
            first_below = index
            break
    return max(first_below, 1)


@given(confidences=S.confidence_arrays(), threshold=S.thresholds)
def test_confadapt_is_the_longest_confident_prefix(confidences, threshold):
    policy = ConfAdapt(threshold=threshold, k_max=confidences.shape[1])
    accepted = policy.accept(confidences)
    assert accepted.dtype == np.int64 and accepted.shape == (confidences.shape[0],)
    expected = [confadapt_by_the_paper(row, threshold) for row in confidences.tolist()]
    assert accepted.tolist() == expected


@given(confidences=S.confidence_arrays(), threshold=S.thresholds)
def test_confadapt_is_monotone_in_threshold(confidences, threshold):
    loose = ConfAdapt(threshold=threshold / 2, k_max=confidences.shape[1]).accept(confidences)
    strict = ConfAdapt(threshold=threshold, k_max=confidences.shape[1]).accept(confidences)
    assert np.all(loose >= strict) and np.all(strict >= 1)
    assert np.all(loose <= confidences.shape[1])


@given(confidences=S.confidence_arrays())
def test_static_k_keeps_k(confidences):
    k = confidences.shape[1]
    accepted = StaticK(k).accept(confidences)
    assert accepted.dtype == np.int64 and accepted.tolist() == [k] * confidences.shape[0]


def test_threshold_one_keeps_only_certain_tokens():
    policy = ConfAdapt(threshold=1.0, k_max=3)
    assert policy.accept(np.array([[0.2, 1.0, 1.0], [1.0, 0.999, 1.0], [1.0, 1.0, 1.0]])).tolist() == [
        1,
        1,
        3,
    ]


def test_policies_are_hashable_frozen_values():
    assert ConfAdapt() == ConfAdapt(threshold=0.9, k_max=16)
    assert len({ConfAdapt(), ConfAdapt(0.9, 16), StaticK(2), StaticK(2)}) == 2
    with pytest.raises(AttributeError):
        ConfAdapt().threshold = 0.5  # type: ignore[misc]
    assert isinstance(ConfAdapt(), AcceptancePolicy) and isinstance(StaticK(1), AcceptancePolicy)
    assert ConfAdapt(k_max=5).num_positions == 5 and StaticK(3).num_positions == 3


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5, math.nan, math.inf, "0.9", True])
def test_invalid_threshold_names_the_range(threshold):
    with pytest.raises(ValueError, match=r"threshold.*\(0, 1\]"):
        ConfAdapt(threshold=threshold)


@pytest.mark.parametrize("k", [0, -3, 2.5, "4", True])
def test_invalid_k_names_the_range(k):
    with pytest.raises(ValueError, match=r"k must be an integer >= 1"):
        StaticK(k)
    with pytest.raises(ValueError, match=r"k_max must be an integer >= 1"):
        ConfAdapt(k_max=k)


@pytest.mark.parametrize(
    "confidences",
    [np.zeros(3), np.zeros((2, 0)), np.array([[0.5, 1.2]]), np.array([[np.nan, 0.5]]), np.zeros((1, 2, 2))],
)
def test_invalid_confidences_are_rejected(confidences):
    with pytest.raises(ValueError, match="confidences"):
        check_confidences(confidences)
    with pytest.raises(ValueError, match="confidences"):
        ConfAdapt().accept(confidences)


def test_confadapt_unconfident_first_position_keeps_one():
    """A first position below the threshold keeps exactly one token: [0.38, 0.90, 0.98, 0.69] at 0.9 keeps 1, not 3."""
    policy = ConfAdapt(threshold=0.9, k_max=4)
    rows = np.array([[0.38, 0.90, 0.98, 0.69], [0.95, 0.90, 0.98, 0.69], [0.95, 0.2, 0.98, 0.99]])
    assert policy.accept(rows).tolist() == [1, 3, 1]
