"""The read-out, defined once in the core (``mtp_core.read_out``), and every backend held to it.

The core's rules: the greedy token is the first index of the largest logit, a NaN counting as
the largest; the confidence is the top-1 probability of the untempered softmax (NaN where a
logit is NaN); the backend chooses the precision it compares in.  The torch backends (stock and
fused) round to float32 first, as transformers' greedy search does; the numpy reference
compares its float64 copy of the model's logits.

The backends are checked through their real forward passes, on a Llama whose logits are one
chosen vector at every position (``_crafted_llama``), so ties, NaN and near-ties reach each
backend's read-out exactly as written.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from mtp_core import (
    Sampling,
    available_backends,
    draw_tokens,
    filtered_probabilities,
    greedy_tokens,
    load_backend,
    plan_step,
    read_out,
    top1_confidence,
)
from mtp_numpy import DecoderConfig, LlamaWeights, NumpyBackend
from mtp_torch.decoding.backend import TorchBackend
from mtp_torch.decoding.fused import FusedBackend, fused_unavailable_reason
from mtp_torch.decoding.kernels import fixed_plan
from tests.synthetic import tiny_llama

VOCAB = 16
HIDDEN = 16
NAN = math.nan

# --- the core's rules, on numpy arrays and torch tensors alike -------------------------------


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf - inf, on purpose
@pytest.mark.parametrize("wrap", [np.asarray, torch.as_tensor], ids=["numpy", "torch"])
def test_greedy_takes_the_first_of_equal_logits_and_nan_as_the_largest(wrap: Any) -> None:
    logits = wrap(
        np.array(
            [
                [0.5, 2.0, 2.0, 1.0],  # a tie: the first
                [1.0, NAN, 3.0, NAN],  # NaN is larger than any number: the first NaN
                [-math.inf] * 4,  # nothing but -inf: index 0, confidence NaN
                [math.inf, 1.0, math.inf, 0.0],  # +inf ties: the first, confidence NaN
            ]
        )
    )
    tokens, confidences = read_out(logits, Sampling())
    assert np.asarray(tokens).tolist() == [1, 1, 0, 0]
    conf = np.asarray(confidences)
    assert conf[0] == pytest.approx(math.exp(2) / (math.exp(0.5) + 2 * math.exp(2) + math.e))
    assert np.isnan(conf[1:]).all()


def test_the_backend_chooses_the_precision_greedy_compares_in() -> None:
    logits = np.array([[3.0, 3.0 + 2.0**-30, 1.0]])  # apart in float64, equal in float32
    assert greedy_tokens(logits).tolist() == [1]
    assert greedy_tokens(logits.astype(np.float32)).tolist() == [0]


def test_the_confidence_is_the_untempered_top_probability_whatever_the_sampling() -> None:
    logits = np.log(np.array([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]]))
    uniforms = np.array([0.95, 0.1])
    tokens, confidences = read_out(logits, Sampling(temperature=2.0, top_k=2), uniforms)
    assert confidences.tolist() == pytest.approx([0.6, 0.5])
    assert confidences.tolist() == top1_confidence(logits).tolist()
    expected = draw_tokens(filtered_probabilities(logits, Sampling(2.0, top_k=2)), uniforms)
    assert tokens.tolist() == expected.tolist()
    with pytest.raises(ValueError, match="uniforms"):
        read_out(logits, Sampling(temperature=1.0))


# --- every backend of this repository, through its forward pass ------------------------------


def _crafted_llama(column: np.ndarray, dtype: torch.dtype) -> Any:
    """A Llama whose logits are ``column`` at every position, exactly.

    Every block's output projections are zero, so the residual stream is the token embedding,
    and every token is embedded as ``4 e_0``; with ``rms_norm_eps=0`` and a final norm of 1/4
    on the first dimension the normed state is ``e_0``, and the logits are the output layer's
    first column (one product by 1, the others by 0).
    """
    model = tiny_llama(VOCAB, hidden_size=HIDDEN, dtype=dtype, rms_norm_eps=0.0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                parameter.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 4.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 0.25
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = torch.as_tensor(column, dtype=dtype)
    return model.eval()


def _numpy_backend(model: Any) -> NumpyBackend:
    dtype = np.float64 if model.dtype == torch.float64 else np.float32
    config = model.config.to_dict()
    tensors = {name: value.detach().numpy() for name, value in model.state_dict().items()}
    return NumpyBackend(LlamaWeights.from_tensors(DecoderConfig.from_dict(config), tensors, dtype))


def _fused_backend(model: Any) -> FusedBackend:
    reason = fused_unavailable_reason(model)
    if reason is not None:
        pytest.skip(f"no fused pass here: {reason}")
    return FusedBackend(model, fixed_plan("native"))


BUILDERS = {"numpy": _numpy_backend, "torch": TorchBackend, "fused": _fused_backend}


def test_every_registered_backend_of_this_repository_is_checked_here() -> None:
    for name in ("numpy", "torch"):
        assert name in available_backends()
        assert load_backend(name) in (NumpyBackend, TorchBackend)
        assert name in BUILDERS
    # The fused pass reads out through the torch backend's own method.
    assert FusedBackend._read_out is TorchBackend._read_out


def _column(case: str) -> np.ndarray:
    column = np.linspace(-2.0, 1.0, VOCAB)
    if case == "tie":
        column[[5, 9, 12]] = 2.5
    elif case == "nan":
        column[[3, 11]] = NAN
    elif case == "near_tie":
        column[2], column[7] = 3.0, 3.0 + 2.0**-30
    elif case == "spread":
        column = np.random.default_rng(0).standard_normal(VOCAB) * 3
    return column


# The token every backend reads: the same everywhere but where float64 logits differ below
# float32's resolution (torch rounds to float32 as transformers does; numpy compares float64).
EXPECTED = {"tie": 5, "nan": 3, "near_tie": 2}
NUMPY_FLOAT64 = {"near_tie": 7}


def _step(backend: Any, sampling: Sampling) -> tuple[np.ndarray, np.ndarray]:
    inputs = plan_step([[1, 2, 3], [4, 5]], [0, 0], [3, 2], [0, 0], np.zeros((2, 0), bool), 0)
    outputs, _ = backend.forward(backend.new_cache(2), inputs, sampling, 7)
    assert outputs.tokens.dtype == np.int64 and outputs.confidences.dtype == np.float64
    return outputs.tokens, outputs.confidences


@pytest.mark.parametrize("case", ["tie", "nan", "near_tie", "spread"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_each_backend_reads_out_by_the_cores_rules(
    kind: str, dtype: torch.dtype, case: str
) -> None:
    column = _column(case)
    model = _crafted_llama(column, dtype)
    tokens, confidences = _step(BUILDERS[kind](model), Sampling())
    # The logits as the model holds them, in the precision this backend compares in.
    held = model.lm_head.weight[:, 0].detach().numpy()
    compared = held.astype(np.float64) if kind == "numpy" else held.astype(np.float32)
    expected_token = int(greedy_tokens(compared))
    assert (tokens == expected_token).all()
    if case in EXPECTED:
        pinned = EXPECTED[case]
        if kind == "numpy" and dtype == torch.float64:
            pinned = NUMPY_FLOAT64.get(case, pinned)
        assert expected_token == pinned
    # The confidence: top1_confidence at the logits' precision (numpy: float64, exactly).
    exact = held.astype(np.float64) if kind == "numpy" else held
    reference = float(top1_confidence(exact))
    if math.isnan(reference):
        assert np.isnan(confidences).all()
    elif kind == "numpy":
        assert (confidences == reference).all()
    else:
        tolerance = 1e-12 if dtype == torch.float64 else 1e-6
        assert confidences == pytest.approx(np.full(confidences.shape, reference), rel=tolerance)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_sampled_tokens_are_drawn_from_the_filtered_distribution(kind: str) -> None:
    column = np.full(VOCAB, -30.0)
    column[[4, 6]] = [1.0, 1.0 + math.log(3.0)]  # a 1:3 pair; everything else ~0
    model = _crafted_llama(column, torch.float64)
    backend = BUILDERS[kind](model)
    tokens, confidences = _step(backend, Sampling(temperature=1.0, top_k=2))
    assert set(tokens.ravel().tolist()) <= {4, 6}
    assert confidences == pytest.approx(np.full(confidences.shape, 0.75))
    # Top-k 1 leaves one token: the draw is the argmax whatever the uniforms.
    tokens, _ = _step(backend, Sampling(temperature=0.5, top_k=1))
    assert (tokens == 6).all()
