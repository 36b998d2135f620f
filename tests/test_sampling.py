"""Sampling is written once in mtp_core against the array API: numpy and torch agree, and the
filters keep what they promise (temperature, top-k with ties, top-p keeping the top token)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given

from mtp_core import Sampling, draw_tokens, filtered_probabilities
from tests.strategies import sampling_cases


@given(sampling_cases())
def test_numpy_and_torch_filter_and_draw_alike(case: dict) -> None:
    logits, sampling, uniforms = case["logits"], case["sampling"], case["uniforms"]
    on_numpy = filtered_probabilities(logits, sampling)
    on_torch = filtered_probabilities(torch.from_numpy(logits), sampling)
    np.testing.assert_allclose(on_torch.numpy(), on_numpy, rtol=1e-12, atol=1e-15)
    drawn_numpy = draw_tokens(on_numpy, uniforms)
    drawn_torch = draw_tokens(on_torch, torch.from_numpy(uniforms))
    assert drawn_torch.tolist() == drawn_numpy.tolist()


@given(sampling_cases())
def test_filtered_distribution_keeps_its_promises(case: dict) -> None:
    logits, sampling, uniforms = case["logits"], case["sampling"], case["uniforms"]
    probs = filtered_probabilities(logits, sampling)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-9)
    top = np.argmax(logits, axis=-1)
    rows = np.arange(len(logits))
    assert (probs[rows, top] > 0).all()  # the most likely token always survives
    kept = probs > 0
    if 0 < sampling.top_k < logits.shape[-1]:
        # At most the k largest logits, ties with the k-th kept.
        kth = np.sort(logits, axis=-1)[:, -sampling.top_k][:, None]
        assert not (kept & (logits < kth)).any()
    # Kept tokens are a top set: no dropped token is more likely than a kept one.
    for row in rows:
        if (~kept[row]).any():
            assert logits[row][~kept[row]].max() <= logits[row][kept[row]].min()
    drawn = draw_tokens(probs, uniforms)
    assert (probs[rows, drawn] > 0).all()  # never a filtered-out token


def test_top_p_keeps_the_smallest_set_that_reaches_the_mass() -> None:
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = filtered_probabilities(logits, Sampling(1.0, top_p=0.75)) > 0
    assert kept.tolist() == [[True, True, False, False]]
    kept = filtered_probabilities(logits, Sampling(1.0, top_p=0.85)) > 0
    assert kept.tolist() == [[True, True, True, False]]


def test_draws_follow_the_distribution() -> None:
    probs = np.array([[0.2, 0.0, 0.5, 0.3]])
    uniforms = np.random.default_rng(0).random(20000)
    drawn = draw_tokens(np.repeat(probs, 20000, 0), uniforms)
    freq = np.bincount(drawn, minlength=4) / 20000
    np.testing.assert_allclose(freq, probs[0], atol=0.015)


def test_greedy_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="temperature > 0"):
        filtered_probabilities(np.zeros((1, 3)), Sampling())
