"""The small interface a tensor backend implements for the decode engine.

The engine (``mtp_core.decode``) plans every step in numpy (which tokens go where, at which
positions, which slots are visible, which outputs to read) and a backend only executes it:
one forward pass over a block of tokens against its key/value cache, then a read-out of the
top-1 token and its probability at a few positions.  Heavy arrays (logits over the vocabulary,
the cache) never leave the backend; only ``(batch, n)`` integers and floats come back.

Cache slots versus positions: the cache is a ``(batch, slots)`` grid.  Slot order equals position
order within a row, but a row may own *holes* (slots whose keys/values must never be attended,
e.g. the masks of a row that was ahead of the others).  ``StepInputs.attention_mask`` says which
slots each row may see; position ids are always given explicitly.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import attrs
import numpy as np
import numpy.typing as npt

__all__ = ["MASK_TOKEN_CONFIG_KEY", "Backend", "Sampling", "StepInputs", "StepOutputs"]

#: Key under which a converted checkpoint's ``config.json`` stores the ``<mtp_mask>`` token id;
#: every backend that loads a checkpoint reads the mask id from it.
MASK_TOKEN_CONFIG_KEY = "mtp_mask_token_id"

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]

CacheT = TypeVar("CacheT")


def _check_temperature(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (float(value) >= 0.0):
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {value}")


def _check_top_p(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (0.0 < float(value) <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {value}; 1.0 disables nucleus filtering")


def _check_top_k(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if int(value) < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {value}")


@attrs.frozen
class Sampling:
    """How tokens are drawn from the model's distribution at each read position.

    ``temperature == 0`` is greedy (argmax).  The confidence a policy sees is always the top-1
    probability of the untempered softmax, whatever the sampling settings.

    Args:
      temperature: softmax temperature; 0 for greedy.
      top_p: nucleus mass kept before sampling, in ``(0, 1]``.
      top_k: keep only the k most likely tokens before sampling; 0 disables it.
    """

    temperature: float = attrs.field(default=0.0, validator=_check_temperature)
    top_p: float = attrs.field(default=1.0, validator=_check_top_p)
    top_k: int = attrs.field(default=0, validator=_check_top_k)

    @property
    def greedy(self) -> bool:
        """True when tokens are the argmax (temperature 0)."""
        return float(self.temperature) == 0.0


GREEDY = Sampling()


@attrs.frozen(eq=False)
class StepInputs:
    """One forward pass, planned by the engine.

    Attributes:
      token_ids: ``(batch, width)`` int64 token ids of the new block (mask ids included;
        trailing padding slots hold any valid id and are never read).
      position_ids: ``(batch, width)`` int64 position of each new token.
      attention_mask: ``(batch, past + width)`` bool; ``True`` where a slot holds a token the
        row may attend to (on top of the causal rule over slots).  ``past`` is the cache length.
      read_index: ``(batch, n)`` int64 indices into the block (``0 <= i < width``) whose
        outputs are read, in order.
    """

    token_ids: IntArray
    position_ids: IntArray
    attention_mask: BoolArray
    read_index: IntArray


@attrs.frozen(eq=False)
class StepOutputs:
    """What a backend returns for the read positions of one step: the read-out of the model's
    logits there, by the rules of ``mtp_core.read_out`` (greedy ties, NaN, precision).

    Attributes:
      tokens: ``(batch, n)`` int64 chosen tokens (argmax, or sampled under ``Sampling``).
      confidences: ``(batch, n)`` float64 top-1 probability of the untempered softmax at each
        read position.
    """

    tokens: IntArray
    confidences: FloatArray


class Backend(Protocol[CacheT]):
    """A tensor backend for the decode engine.

    Implementations: ``mtp_numpy.NumpyBackend`` (reference) and ``mtp_torch.TorchBackend``.
    The cache object is opaque to the engine; methods take it and return the (possibly same,
    mutated) cache, so functional and in-place caches both fit.
    """

    def new_cache(self, batch_size: int) -> CacheT:
        """An empty cache for ``batch_size`` rows."""
        ...

    def cache_length(self, cache: CacheT) -> int:
        """Number of slots the cache holds (the same for every row)."""
        ...

    def forward(
        self, cache: CacheT, inputs: StepInputs, sampling: Sampling, seed: int
    ) -> tuple[StepOutputs, CacheT]:
        """Run the model on ``inputs`` (appending their keys/values) and read the outputs.

        Args:
          cache: the cache holding ``past`` slots.
          inputs: the planned block; see ``StepInputs``.
          sampling: greedy or sampling settings for the returned tokens.
          seed: seed for this step's random draws (ignored when greedy).

        Returns:
          The read-outs (``mtp_core.read_out`` of the logits at ``inputs.read_index``) and the
          cache, now holding ``past + width`` slots.
        """
        ...

    def crop(self, cache: CacheT, length: int) -> CacheT:
        """Keep the first ``length`` slots of every row."""
        ...

    def reindex(self, cache: CacheT, rows: IntArray, slots: IntArray | None) -> CacheT:
        """Gather rows and (optionally) slots: ``new[b, j] = old[rows[b], slots[b, j]]``.

        Args:
          cache: the cache.
          rows: ``(new_batch,)`` row indices to keep, in order.
          slots: ``(new_batch, new_length)`` slot indices per kept row, or ``None`` to keep all.
        """
        ...
