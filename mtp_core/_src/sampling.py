"""Token sampling (temperature, top-k, top-p), written once against the array API.

A backend hands in its logits and a uniform draw per position from its own generator; the
filtering and the inverse-CDF draw are the same code for numpy arrays and torch tensors, so the
numpy reference and the torch backend cannot drift apart.

Filters apply in the order temperature, top-k, top-p (as in transformers' logits warpers).
Top-k keeps every token tied with the k-th largest logit; top-p keeps the smallest set of most
likely tokens whose mass reaches ``top_p`` (plus any token tied with the least likely of them),
and the most likely token always survives.
"""

from __future__ import annotations

import math
from typing import Any

from mtp_core._src.backend import Sampling
from mtp_core._src.losses import ArrayT, array_namespace

__all__ = ["draw_tokens", "filtered_probabilities"]


def filtered_probabilities(logits: ArrayT, sampling: Sampling) -> ArrayT:
    """The distribution a sampled token is drawn from, after temperature, top-k and top-p.

    Args:
      logits: unnormalized scores, shape ``(..., vocab)`` (float).
      sampling: the settings; ``temperature`` must be > 0 (greedy decoding takes the argmax and
        never calls this).

    Returns:
      Probabilities, same shape and dtype; exactly 0 at filtered-out tokens.

    Raises:
      ValueError: for greedy settings (``temperature == 0``).

    Example:
      >>> import numpy as np
      >>> probs = filtered_probabilities(np.log(np.array([0.5, 0.3, 0.2])), Sampling(1.0, top_k=2))
      >>> np.round(probs, 4).tolist()
      [0.625, 0.375, 0.0]
    """
    if sampling.greedy:
        raise ValueError("filtered_probabilities needs temperature > 0; greedy takes the argmax")
    xp = array_namespace(logits)
    scores: Any = logits
    scores = scores / float(sampling.temperature)
    vocab = int(scores.shape[-1])
    top_k = int(sampling.top_k)
    if 0 < top_k < vocab:
        kth_largest = xp.sort(scores, axis=-1, descending=True)[..., top_k - 1 : top_k]
        scores = xp.where(scores < kth_largest, -math.inf, scores)
    probabilities = _softmax(xp, scores)
    top_p = float(sampling.top_p)
    if top_p < 1.0:
        descending = xp.sort(probabilities, axis=-1, descending=True)
        mass_before = xp.cumulative_sum(descending, axis=-1) - descending
        # The least likely kept token: mass_before[..., 0] == 0 < top_p keeps the most likely.
        kept = xp.where(mass_before < top_p, descending, math.inf)
        least_kept = xp.min(kept, axis=-1, keepdims=True)
        probabilities = xp.where(probabilities < least_kept, 0.0, probabilities)
        probabilities = probabilities / xp.sum(probabilities, axis=-1, keepdims=True)
    result: ArrayT = probabilities
    return result


def draw_tokens(probabilities: ArrayT, uniforms: Any) -> Any:
    """One token per position by the inverse CDF: the first token whose cumulative mass exceeds
    ``uniform * total``.

    Args:
      probabilities: ``(..., vocab)`` non-negative weights (need not sum to exactly 1).
      uniforms: ``(...)`` draws in ``[0, 1)`` from the backend's generator, same namespace.

    Returns:
      ``(...)`` int64 token ids; a zero-probability token is never drawn.

    Example:
      >>> import numpy as np
      >>> draw_tokens(np.array([[0.5, 0.0, 0.5]]), np.array([0.75])).tolist()
      [2]
    """
    xp = array_namespace(probabilities)
    cdf = xp.cumulative_sum(probabilities, axis=-1)
    targets = uniforms[..., None] * cdf[..., -1:]
    index = xp.sum(xp.astype(cdf <= targets, xp.int64), axis=-1)
    return xp.clip(index, max=int(probabilities.shape[-1]) - 1)


def _softmax(xp: Any, scores: Any) -> Any:
    shifted = xp.exp(scores - xp.max(scores, axis=-1, keepdims=True))
    return shifted / xp.sum(shifted, axis=-1, keepdims=True)
