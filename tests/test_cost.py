"""The hardware cost curve and the cost-aware choice of k_max (``mtp_torch.bench.cost``).

The arithmetic is tested on synthetic curves (no timing asserts); the measurement only for its
shape on a tiny random model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mtp_core import ConfAdapt, StaticK
from mtp_torch.bench.cost import (
    CostCurve,
    acceptance_from_histogram,
    auto_policy,
    choose_k_max,
    expected_accepted,
    expected_speedups,
    measure_cost_curve,
    monotone_envelope,
    speedup_ceiling,
)

FLAT = CostCurve(num_tokens=range(1, 33), seconds=[1.0] * 32)
STEEP = CostCurve(num_tokens=range(1, 33), seconds=[float(n) for n in range(1, 33)])


def geometric_acceptance(rate: float, length: int = 16) -> np.ndarray:
    """acceptance[j] = rate**j: each further offset passes with probability ``rate``."""
    return rate ** np.arange(length, dtype=np.float64)


# --- CostCurve ---------------------------------------------------------------------------------


def test_curve_interpolates_and_extrapolates() -> None:
    curve = CostCurve(num_tokens=(1, 2, 4), seconds=(1.0, 2.0, 3.0))
    assert curve.time(1) == 1.0
    assert curve.time(1.5) == pytest.approx(1.5)
    assert curve.time(3) == pytest.approx(2.5)
    assert curve.time(6) == pytest.approx(4.0)  # last slope 0.5 per token, extended
    assert curve.relative(4) == pytest.approx(3.0)


def test_curve_extrapolation_never_decreases() -> None:
    curve = CostCurve(num_tokens=(1, 2, 3), seconds=(1.0, 2.0, 1.5))
    assert curve.time(10) == pytest.approx(1.5)


def test_curve_round_trips_through_dict() -> None:
    curve = CostCurve(num_tokens=(1, 2), seconds=(0.1, 0.2), context_length=200, device="cpu")
    data = curve.to_dict()
    assert data["relative"] == pytest.approx([1.0, 2.0])
    assert CostCurve.from_dict(data) == curve


@pytest.mark.parametrize(
    ("widths", "seconds", "message"),
    [
        ((), (), "non-empty"),
        ((1, 2), (1.0,), "equal length"),
        ((2, 3), (1.0, 1.0), "width 1"),
        ((1, 3, 2), (1.0, 1.0, 1.0), "strictly increasing"),
        ((1, 2), (1.0, 0.0), "> 0"),
        ((1, 2), (1.0, float("nan")), "> 0"),
    ],
)
def test_curve_rejects_bad_input(widths: tuple, seconds: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CostCurve(num_tokens=widths, seconds=seconds)


def test_curve_time_rejects_width_below_one() -> None:
    with pytest.raises(ValueError, match="at least 1 token"):
        FLAT.time(0.5)


@given(st.lists(st.floats(min_value=1e-6, max_value=10.0), min_size=1, max_size=32))
def test_monotone_envelope(seconds: list[float]) -> None:
    envelope = monotone_envelope(seconds)
    assert len(envelope) == len(seconds)
    assert all(a <= b for a, b in zip(envelope, envelope[1:], strict=False))
    assert all(e <= s for e, s in zip(envelope, seconds, strict=True))
    assert envelope[-1] == seconds[-1]
    if all(a <= b for a, b in zip(seconds, seconds[1:], strict=False)):
        assert envelope == seconds


def test_monotone_envelope_removes_a_spike() -> None:
    assert monotone_envelope([1.0, 5.0, 1.2, 2.0]) == [1.0, 1.2, 1.2, 2.0]


# --- speedup_ceiling ---------------------------------------------------------------------------


def test_ceiling_of_plain_decoding_is_one() -> None:
    assert speedup_ceiling(1.0, STEEP) == 1.0
    assert speedup_ceiling(1.0, FLAT, tokens_per_pass=1.0) == 1.0


def test_ceiling_formula() -> None:
    # tpf * t(1) / t(n)
    assert speedup_ceiling(3.0, FLAT, tokens_per_pass=18.0) == pytest.approx(3.0)
    assert speedup_ceiling(3.0, STEEP, tokens_per_pass=6.0) == pytest.approx(0.5)
    # default width = tokens_per_forward: on a linear curve the ceiling is exactly 1.
    assert speedup_ceiling(4.0, STEEP) == pytest.approx(1.0)


def test_ceiling_rejects_non_positive_rate() -> None:
    with pytest.raises(ValueError, match="tokens_per_forward"):
        speedup_ceiling(0.0, FLAT)


# --- acceptance --------------------------------------------------------------------------------


def test_acceptance_from_histogram() -> None:
    # 4 steps: kept 1, 1, 3, 3 tokens.
    rates = acceptance_from_histogram([0, 2, 0, 2])
    assert rates.tolist() == [1.0, 0.5, 0.5]
    assert expected_accepted(rates, 3) == pytest.approx(2.0)  # mean of 1, 1, 3, 3
    assert expected_accepted(rates, 2) == pytest.approx(1.5)  # mean of 1, 1, 2, 2
    assert expected_accepted(rates, 1) == 1.0


@given(st.lists(st.integers(min_value=0, max_value=50), min_size=2, max_size=17))
def test_acceptance_matches_mean_of_clipped_counts(counts: list[int]) -> None:
    counts[0] = 0
    if sum(counts[1:]) == 0:
        counts[1] = 1
    rates = acceptance_from_histogram(counts)
    assert rates[0] == pytest.approx(1.0)
    assert np.all(np.diff(rates) <= 1e-12)
    steps = np.repeat(np.arange(len(counts)), counts)
    for k in range(1, len(counts)):
        assert expected_accepted(rates, k) == pytest.approx(np.minimum(steps, k).mean())


@pytest.mark.parametrize("histogram", [[0], [[0, 1]], [0, -1, 2], [0, 0, 0]])
def test_acceptance_from_histogram_rejects_bad_input(histogram: list) -> None:
    with pytest.raises(ValueError):
        acceptance_from_histogram(histogram)


@pytest.mark.parametrize("acceptance", [[], [1.0, 1.2], [1.0, 0.2, 0.5], [[1.0]]])
def test_expected_accepted_rejects_bad_acceptance(acceptance: list) -> None:
    with pytest.raises(ValueError):
        expected_accepted(acceptance, 2)


def test_expected_accepted_rejects_bad_k() -> None:
    with pytest.raises(ValueError, match="k_max"):
        expected_accepted([1.0], 0)


# --- choose_k_max ------------------------------------------------------------------------------


def test_steep_curve_falls_back_to_one() -> None:
    # Compute bound: a pass of n tokens costs n; MTP re-feeds tokens and adds masks, so it loses.
    assert choose_k_max(STEEP, geometric_acceptance(0.95)) == 1
    assert all(v <= 1.0 for v in expected_speedups(STEEP, geometric_acceptance(0.95)).values())


def test_flat_curve_and_high_acceptance_picks_large_k() -> None:
    assert choose_k_max(FLAT, np.ones(16)) == 16
    assert choose_k_max(FLAT, geometric_acceptance(0.9)) == 16


def test_low_acceptance_on_mildly_rising_curve_picks_small_k() -> None:
    curve = CostCurve(num_tokens=range(1, 33), seconds=[1.0 + 0.05 * (n - 1) for n in range(1, 33)])
    acceptance = geometric_acceptance(0.5)
    scores = expected_speedups(curve, acceptance)
    chosen = choose_k_max(curve, acceptance)
    assert chosen == max(scores, key=lambda k: scores[k])
    assert 1 < chosen < 16


def test_min_speedup_margin_forces_plain_decoding() -> None:
    acceptance = geometric_acceptance(0.3)
    best = max(expected_speedups(FLAT, acceptance).values())
    assert choose_k_max(FLAT, acceptance) > 1
    assert choose_k_max(FLAT, acceptance, min_speedup=best + 0.01) == 1


@given(
    rate=st.floats(min_value=0.0, max_value=1.0),
    slope=st.floats(min_value=0.0, max_value=2.0),
)
def test_choice_is_the_best_candidate(rate: float, slope: float) -> None:
    curve = CostCurve(
        num_tokens=range(1, 33), seconds=[1.0 + slope * (n - 1) for n in range(1, 33)]
    )
    acceptance = geometric_acceptance(rate)
    scores = expected_speedups(curve, acceptance)
    chosen = choose_k_max(curve, acceptance)
    assert scores[1] == pytest.approx(1.0)
    assert scores[chosen] >= max(scores.values()) - 1e-9
    if chosen > 1:
        assert scores[chosen] > 1.0


@given(rate=st.floats(min_value=0.0, max_value=1.0))
def test_flat_curve_speedup_equals_expected_tokens(rate: float) -> None:
    acceptance = geometric_acceptance(rate)
    for k, value in expected_speedups(FLAT, acceptance).items():
        assert value == pytest.approx(expected_accepted(acceptance, k))


def test_choose_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="min_speedup"):
        choose_k_max(FLAT, [1.0], min_speedup=0.0)
    with pytest.raises(ValueError, match="candidates"):
        expected_speedups(FLAT, [1.0], candidates=())


# --- auto_policy (fake model, synthetic curve) -------------------------------------------------


class _FakeOutput:
    def __init__(self, histogram: np.ndarray) -> None:
        self.accepted_histogram = histogram


class _FakeMTP:
    """Enough of MTPModel for auto_policy: a module for the device, a generate with a histogram."""

    def __init__(self, histogram: list[int]) -> None:
        self.model = torch.nn.Linear(2, 2)
        self.tokenizer = None
        self.histogram = np.asarray(histogram, dtype=np.int64)
        self.policies: list = []

    def generate(
        self, input_ids: torch.Tensor, policy: object = None, **kwargs: object
    ) -> _FakeOutput:
        self.policies.append(policy)
        return _FakeOutput(self.histogram)


def test_auto_policy_falls_back_to_static_one_on_steep_curve() -> None:
    fake = _FakeMTP([0, 1, 1, 1, 1, 1, 1, 1, 5])
    policy = auto_policy(fake, 0.9, candidates=(1, 2, 4, 8), probe_prompts=[[1, 2]], curve=STEEP)
    assert policy == StaticK(1)
    assert fake.policies == [ConfAdapt(threshold=0.9, k_max=8)]


def test_auto_policy_picks_confadapt_on_flat_curve() -> None:
    fake = _FakeMTP([0, 0, 0, 0, 0, 0, 0, 0, 10])
    policy = auto_policy(
        fake, 0.8, candidates=(1, 2, 4, 8), probe_prompts=[[1], [2, 3]], curve=FLAT
    )
    assert policy == ConfAdapt(threshold=0.8, k_max=8)
    assert len(fake.policies) == 2


def test_auto_policy_rejects_bad_candidates_and_prompts() -> None:
    fake = _FakeMTP([0, 1])
    with pytest.raises(ValueError, match="candidates"):
        auto_policy(fake, 0.9, candidates=(), probe_prompts=[[1]], curve=FLAT)
    with pytest.raises(ValueError, match="probe_prompts"):
        auto_policy(fake, 0.9, probe_prompts=[], curve=FLAT)
    with pytest.raises(ValueError, match="tokenizer"):
        auto_policy(fake, 0.9, probe_prompts=["text needs a tokenizer"], curve=FLAT)


# --- measurement -------------------------------------------------------------------------------


def test_measure_cost_curve_on_tiny_model() -> None:
    from tests.synthetic import tiny_llama

    model = tiny_llama(50, hidden_size=16, layers=1, heads=2, kv_heads=1, max_positions=64).eval()
    curve = measure_cost_curve(model, max_tokens=5, context_length=10, repeats=2, warmup=1)
    assert curve.num_tokens == (1, 2, 3, 4, 5)
    assert len(curve.seconds) == 5 and len(curve.measured_seconds) == 5
    # Raw medians: a narrower pass may truly cost more than a wider one (BLAS kernel choice).
    assert list(curve.seconds) == list(curve.measured_seconds)
    assert all(math.isfinite(s) and s > 0 for s in curve.seconds)
    assert curve.context_length == 10
    assert curve.device == "cpu"
    assert not model.training
    with pytest.raises(ValueError, match="max_tokens"):
        measure_cost_curve(model, max_tokens=0)


def test_a_gated_models_curve_times_its_passes_with_mask_rows() -> None:
    from mtp_torch import MTPModel
    from mtp_torch.bench.runner import _measure
    from mtp_torch.decoding.gated import add_mask_gate
    from mtp_torch.decoding.mask import add_mask_token
    from tests.synthetic import tiny_llama

    model = tiny_llama(50, hidden_size=16, layers=1, heads=2, kv_heads=1, max_positions=64).eval()
    mask = int(add_mask_token(model, None))
    assert not _measure(MTPModel(model, mask_token_id=mask), None, 4, 10, 1).mask_rows
    add_mask_gate(model, mask, rank=2)
    seen: list[list[int]] = []
    model.get_input_embeddings().register_forward_pre_hook(
        lambda module, args: seen.append(args[0][0].tolist())
    )
    curve = _measure(MTPModel(model, mask_token_id=mask), None, 4, 10, 1)
    assert curve.mask_rows and curve.num_tokens == (1, 2, 3, 4)
    blocks = [ids for ids in seen if len(ids) <= 4]  # the timed blocks, not the prefill
    assert {len(ids) for ids in blocks} == {1, 2, 3, 4}
    for ids in blocks:  # one real token, then mask rows
        assert ids[0] != mask and ids[1:] == [mask] * (len(ids) - 1)
    assert CostCurve.from_dict(curve.to_dict()) == curve
