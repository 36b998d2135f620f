"""Shared hypothesis strategies for the test suite.

Each family adds its strategies in its own section; tests import them from here so that every
property is exercised over the same input spaces.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from mtp_core import ConfAdapt, StaticK

# --- policies ---------------------------------------------------------------------------------

thresholds = st.floats(min_value=1e-6, max_value=1.0, allow_nan=False)
ks = st.integers(min_value=1, max_value=8)


@st.composite
def confidence_arrays(draw: st.DrawFn, max_batch: int = 6, max_k: int = 16) -> np.ndarray:
    """(batch, k) arrays of probabilities, with exact 0/1 values and repeats mixed in."""
    batch = draw(st.integers(min_value=1, max_value=max_batch))
    k = draw(st.integers(min_value=1, max_value=max_k))
    values = st.one_of(
        st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
        st.sampled_from([0.0, 0.5, 0.9, 0.95, 0.99, 1.0]),
    )
    flat = draw(st.lists(values, min_size=batch * k, max_size=batch * k))
    return np.asarray(flat, dtype=np.float64).reshape(batch, k)


policies = st.one_of(
    st.builds(StaticK, k=ks),
    st.builds(ConfAdapt, threshold=thresholds, k_max=ks),
)

# --- prompts ----------------------------------------------------------------------------------


@st.composite
def prompt_batches(
    draw: st.DrawFn, vocab_size: int, max_batch: int = 3, max_len: int = 12
) -> list[list[int]]:
    """A batch of prompts of different lengths (ids in [0, vocab_size))."""
    batch = draw(st.integers(min_value=1, max_value=max_batch))
    token = st.integers(min_value=0, max_value=vocab_size - 1)
    return [draw(st.lists(token, min_size=1, max_size=max_len)) for _ in range(batch)]


# --- layouts and losses -----------------------------------------------------------------------
# (owned by the layout/losses work; imports kept local to this section)

from hypothesis.extra import numpy as hnp  # noqa: E402

from mtp_core._src.layout import TrainingLayoutSpec  # noqa: E402


@st.composite
def training_layout_specs(
    draw: st.DrawFn, max_k: int = 8, max_regions: int = 5, max_extra_prefix: int = 6
) -> TrainingLayoutSpec:
    """Valid packed-layout specs: any k, region count, prefix length, leftover tail and offset."""
    k = draw(st.integers(min_value=2, max_value=max_k))
    num_regions = draw(st.integers(min_value=1, max_value=max_regions))
    prefix_len = draw(st.integers(min_value=k, max_value=k + max_extra_prefix))
    tail = draw(st.integers(min_value=0, max_value=num_regions - 1))  # real tokens past M * P
    num_real = num_regions * prefix_len + tail
    offset = draw(st.integers(min_value=0, max_value=prefix_len - 1))
    return TrainingLayoutSpec(
        seq_len=num_real + num_regions * (k - 1), k=k, num_regions=num_regions, offset=offset
    )


_logit_values = st.one_of(
    st.floats(min_value=-30.0, max_value=30.0, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 1.0, -1.0, 5.0]),  # repeats, so argmax ties occur
)


@st.composite
def logit_batches(
    draw: st.DrawFn, max_lead: int = 3, max_k: int = 5, max_vocab: int = 7
) -> dict[str, np.ndarray]:
    """float64 student/teacher logits (lead, k, vocab), weights (lead, k), targets (lead, k).

    Weights mix 0 (ignored), fractions and values above 1, and targets include -1 (ignored).
    """
    lead = draw(st.integers(min_value=1, max_value=max_lead))
    k = draw(st.integers(min_value=1, max_value=max_k))
    vocab = draw(st.integers(min_value=2, max_value=max_vocab))
    logits = hnp.arrays(np.float64, (lead, k, vocab), elements=_logit_values)
    weights = hnp.arrays(np.float64, (lead, k), elements=st.sampled_from([0.0, 0.25, 1.0, 3.0]))
    targets = hnp.arrays(
        np.int64, (lead, k), elements=st.integers(min_value=-1, max_value=vocab - 1)
    )
    return {
        "student": draw(logits),
        "teacher": draw(logits),
        "weights": draw(weights),
        "targets": draw(targets),
    }


# --- sampling ---------------------------------------------------------------------------------


@st.composite
def sampling_cases(draw: st.DrawFn, max_rows: int = 4, max_vocab: int = 9) -> dict[str, object]:
    """float64 logits (rows, vocab) with ties mixed in, settings with temperature > 0, uniforms."""
    from mtp_core import Sampling

    rows = draw(st.integers(min_value=1, max_value=max_rows))
    vocab = draw(st.integers(min_value=2, max_value=max_vocab))
    logits = draw(hnp.arrays(np.float64, (rows, vocab), elements=_logit_values))
    sampling = Sampling(
        temperature=draw(st.sampled_from([0.3, 1.0, 2.5])),
        top_p=draw(st.sampled_from([0.05, 0.5, 0.9, 1.0])),
        top_k=draw(st.integers(min_value=0, max_value=vocab + 1)),
    )
    uniforms = draw(
        hnp.arrays(np.float64, (rows,), elements=st.floats(0.0, 1.0, exclude_max=True))
    )
    return {"logits": logits, "sampling": sampling, "uniforms": uniforms}
