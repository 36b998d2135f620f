"""The read-out: what a backend returns at a read position, defined once.

At each read position a backend holds the model's logits over the vocabulary; the engine needs
two numbers from them, the token and its confidence (``StepOutputs``).  This module is their
definition, written against the array API like the losses and the sampling, so that every
backend computes the same thing: the numpy reference calls ``read_out`` as it is, and the torch
backend takes its tokens from ``greedy_tokens`` and the sampling functions and computes the
confidence with its own fused softmax, tested against ``top1_confidence``
(``tests/test_readout.py`` holds every backend of this repository to the rules below).

- **Greedy tokens** (``greedy_tokens``): the index of the largest logit; among equal logits the
  first; a NaN counts as larger than any number (numpy's and torch's argmax rule alike).  The
  logits compared are the ones the backend hands in, and a backend chooses their precision
  once: transformers' greedy search compares float32 logits, so the torch backend rounds to
  float32 first (``StaticK(1)`` then equals ``generate()`` in every dtype); the numpy reference
  compares its float64 copy of the model's logits (for a float32 model, the same values).
- **Sampled tokens**: ``draw_tokens(filtered_probabilities(logits, sampling), uniforms)``, one
  uniform draw in ``[0, 1)`` per position from the backend's generator seeded with the step's
  seed.
- **Confidences** (``top1_confidence``): the largest probability of the *untempered* softmax,
  whatever the sampling settings (it is what the acceptance policies compare with their
  threshold), computed at the precision of the logits (at least float32).  It lies in
  ``[0, 1]``; it is NaN where a logit is NaN or every logit is infinite, and the policies
  refuse such a step (``check_confidences``).
"""

from __future__ import annotations

from typing import Any

from mtp_core._src.backend import Sampling
from mtp_core._src.losses import ArrayT, array_namespace
from mtp_core._src.sampling import _softmax, draw_tokens, filtered_probabilities

__all__ = ["greedy_tokens", "read_out", "top1_confidence"]


def greedy_tokens(logits: ArrayT) -> Any:
    """The greedy token per position: the first index of the largest logit (NaN the largest).

    Args:
      logits: ``(..., vocab)`` logits, in the precision the backend compares them in.

    Returns:
      ``(...)`` integer token ids (the namespace's default index dtype).

    Example:
      >>> import numpy as np
      >>> greedy_tokens(np.array([[0.5, 2.0, 2.0], [1.0, np.nan, 3.0]])).tolist()
      [1, 1]
    """
    xp = array_namespace(logits)
    return xp.argmax(logits, axis=-1)


def top1_confidence(logits: ArrayT) -> ArrayT:
    """The largest probability of the untempered softmax of ``logits``, per position.

    Args:
      logits: ``(..., vocab)`` logits (float); the result has their dtype.

    Returns:
      ``(...)`` probabilities in ``[0, 1]``; NaN where a logit is NaN or every logit is
      infinite.

    Example:
      >>> import numpy as np
      >>> top1_confidence(np.log(np.array([[0.25, 0.75]]))).round(6).tolist()
      [0.75]
    """
    xp = array_namespace(logits)
    result: ArrayT = xp.max(_softmax(xp, logits), axis=-1)
    return result


def read_out(logits: ArrayT, sampling: Sampling, uniforms: Any = None) -> tuple[Any, ArrayT]:
    """Tokens and confidences at the read positions: the rules of the module docstring.

    Args:
      logits: ``(..., vocab)`` logits at the read positions.
      sampling: greedy (``temperature == 0``) or the sampling settings.
      uniforms: ``(...)`` draws in ``[0, 1)`` from the backend's generator, same namespace;
        only read when sampling.

    Returns:
      ``(tokens, confidences)``, both ``(...)``: integer token ids and top-1 probabilities.

    Raises:
      ValueError: when sampling without ``uniforms``.

    Example:
      >>> import numpy as np
      >>> tokens, confidences = read_out(np.log(np.array([[0.25, 0.75]])), Sampling())
      >>> tokens.tolist(), confidences.round(6).tolist()
      ([1], [0.75])
    """
    confidences = top1_confidence(logits)
    if sampling.greedy:
        return greedy_tokens(logits), confidences
    if uniforms is None:
        raise ValueError("sampling needs uniforms: one draw in [0, 1) per read position")
    return draw_tokens(filtered_probabilities(logits, sampling), uniforms), confidences
