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
