"""``NumpyBackend``: the reference ``mtp_core.Backend``, and a one-call ``generate``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from mtp_core import (
    MASK_TOKEN_CONFIG_KEY,
    AcceptancePolicy,
    Backend,
    DecodeResult,
    Sampling,
    StepInputs,
    StepOutputs,
    decode,
    read_out,
)
from mtp_numpy._llama import (
    DecoderConfig,
    KVCache,
    LlamaWeights,
    forward_hidden,
    load_config,
    output_logits,
)
from mtp_numpy._safetensors import load_checkpoint_tensors

__all__ = ["MASK_TOKEN_CONFIG_KEY", "NumpyBackend", "generate", "sample_tokens"]


FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
ChunkCallback = Callable[[int, IntArray], None]

_GREEDY = Sampling()


def _read_out(
    logits: FloatArray, sampling: Sampling, rng: np.random.Generator
) -> tuple[IntArray, FloatArray]:
    """``mtp_core.read_out`` of float64 logits, the uniforms drawn from ``rng`` when sampling."""
    uniforms = None if sampling.greedy else rng.random(logits.shape[:-1])
    tokens, confidences = read_out(logits, sampling, uniforms)
    return np.asarray(tokens, dtype=np.int64), confidences


def sample_tokens(logits: npt.ArrayLike, sampling: Sampling, rng: np.random.Generator) -> IntArray:
    """Choose one token per position: argmax, or a draw under temperature/top-k/top-p.

    The tokens of ``mtp_core.read_out`` on the logits in float64: the first of equal largest
    logits; filters in the order temperature, top-k, top-p (as in transformers), top-k keeping
    every token tied with the k-th largest logit and top-p the smallest most-likely set whose
    mass reaches ``top_p`` (the most likely token always survives).

    Args:
      logits: ``(..., vocab)`` logits.
      sampling: the settings; greedy when ``temperature == 0``.
      rng: source of the uniform draws (unused when greedy).

    Returns:
      ``(...)`` int64 token ids.
    """
    return _read_out(np.asarray(logits, dtype=np.float64), sampling, rng)[0]


class NumpyBackend:
    """The reference ``mtp_core.Backend``: a Llama-family decoder in numpy.

    Runs Llama, Mistral and Qwen2 checkpoints (transformers layout, safetensors weights) in
    float32 or float64.  Slow but simple; it is the oracle other backends are tested against.

    Args:
      weights: the model's parameters.
      config: the raw ``config.json`` dict (kept for ``mtp_mask_token_id`` and friends); built
        from ``weights.config`` when omitted.

    Raises:
      TypeError: when ``weights`` are not ``LlamaWeights`` (a model of another library).

    Example:
      >>> backend = NumpyBackend.from_pretrained("path/to/checkpoint")  # doctest: +SKIP
      >>> mtp_core.decode(backend, [[1, 2, 3]], ConfAdapt(0.9, 4),
      ...                 mask_token_id=backend.mask_token_id, max_new_tokens=16)  # doctest: +SKIP
    """

    def __init__(self, weights: LlamaWeights, config: Mapping[str, Any] | None = None) -> None:
        if not isinstance(weights, LlamaWeights):
            raise TypeError(
                f"NumpyBackend takes LlamaWeights, got {type(weights).__name__}; build one from "
                "a checkpoint directory with NumpyBackend.from_pretrained(path)"
            )
        self.weights = weights
        self.config: dict[str, Any] = (
            dict(config) if config is not None else _config_dict(weights.config)
        )

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], dtype: npt.DTypeLike = np.float32
    ) -> NumpyBackend:
        """Load a transformers checkpoint directory (``config.json`` + safetensors).

        Args:
          path: the checkpoint directory.
          dtype: compute dtype, ``np.float32`` (default) or ``np.float64``.

        Returns:
          The backend.

        Raises:
          ValueError: for an unsupported ``model_type``, missing or corrupt weights.
        """
        config = load_config(path)
        weights = LlamaWeights.from_tensors(
            DecoderConfig.from_dict(config), load_checkpoint_tensors(path), dtype
        )
        return cls(weights, config)

    @property
    def vocab_size(self) -> int:
        """Rows of the logits."""
        return self.weights.config.vocab_size

    @property
    def max_position_embeddings(self) -> int:
        """The model's context window in positions."""
        return self.weights.config.max_position_embeddings

    @property
    def mask_token_id(self) -> int | None:
        """The ``<mtp_mask>`` id stored in ``config.json``, or ``None`` for a plain model."""
        value = self.config.get(MASK_TOKEN_CONFIG_KEY)
        return None if value is None else int(value)

    def new_cache(self, batch_size: int) -> KVCache:
        """An empty cache for ``batch_size`` rows."""
        if int(batch_size) < 0:
            raise ValueError(f"batch_size must be >= 0, got {batch_size}")
        return KVCache.empty(self.weights, int(batch_size))

    def cache_length(self, cache: KVCache) -> int:
        """Number of slots the cache holds."""
        return cache.length

    def forward(
        self, cache: KVCache, inputs: StepInputs, sampling: Sampling, seed: int
    ) -> tuple[StepOutputs, KVCache]:
        """Run one planned block and read tokens and confidences at ``inputs.read_index``.

        Args:
          cache: keys/values of ``past`` slots.
          inputs: the block; see ``mtp_core.StepInputs``.
          sampling: greedy or sampling settings.
          seed: seeds ``np.random.default_rng`` for this step's draws.

        Returns:
          ``StepOutputs`` with ``(batch, n)`` tokens and top-1 softmax probabilities
          (untempered, float64), the ``mtp_core.read_out`` of the float64 logits, and the cache
          holding ``past + width`` slots.
        """
        read_index = np.asarray(inputs.read_index, dtype=np.int64)
        hidden, cache = forward_hidden(
            self.weights, cache, inputs.token_ids, inputs.position_ids, inputs.attention_mask
        )
        if read_index.ndim != 2 or read_index.shape[0] != hidden.shape[0]:
            raise ValueError(f"read_index must have shape (batch, n), got {read_index.shape}")
        if read_index.size and not (0 <= read_index.min() and read_index.max() < hidden.shape[1]):
            raise ValueError(f"read_index values must lie in [0, {hidden.shape[1]})")
        rows = np.take_along_axis(hidden, read_index[..., None], axis=1)
        # The read-out compares the model's logits in float64 (for a float32 model the same
        # values); see mtp_core.read_out.
        logits = output_logits(self.weights, rows).astype(np.float64)
        tokens, confidences = _read_out(logits, sampling, np.random.default_rng(seed))
        return StepOutputs(tokens=tokens, confidences=confidences), cache

    def crop(self, cache: KVCache, length: int) -> KVCache:
        """Keep the first ``length`` slots of every row."""
        return cache.crop(int(length))

    def reindex(self, cache: KVCache, rows: IntArray, slots: IntArray | None) -> KVCache:
        """Gather rows and (optionally) slots: ``new[b, j] = old[rows[b], slots[b, j]]``."""
        return cache.reindex(rows, slots)


if TYPE_CHECKING:

    def _conforms(backend: NumpyBackend) -> Backend[KVCache]:
        return backend  # mypy proves NumpyBackend implements the Backend protocol


def _config_dict(config: DecoderConfig) -> dict[str, Any]:
    return {
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
    }


def _stop_ids_from_config(config: Mapping[str, Any]) -> tuple[int, ...]:
    eos = config.get("eos_token_id")
    if eos is None:
        return ()
    if isinstance(eos, (list, tuple)):
        return tuple(int(token) for token in eos)
    return (int(eos),)


def generate(
    model: str | os.PathLike[str] | NumpyBackend,
    prompts: Sequence[Sequence[int]],
    policy: AcceptancePolicy,
    *,
    mask_token_id: int | None = None,
    max_new_tokens: int = 64,
    stop_token_ids: Iterable[int] | None = None,
    verify: bool = False,
    sampling: Sampling = _GREEDY,
    seed: int = 0,
    pad_token_id: int | None = None,
    dtype: npt.DTypeLike = np.float32,
    on_chunk: ChunkCallback | None = None,
) -> DecodeResult:
    """Decode prompts with an MTP checkpoint on the numpy backend.

    Args:
      model: a checkpoint directory or a ``NumpyBackend``.
      prompts: per row, the prompt token ids (lengths may differ).
      policy: ``StaticK`` / ``ConfAdapt`` / any ``mtp_core.AcceptancePolicy``.
      mask_token_id: the ``<mtp_mask>`` id; ``None`` reads ``mtp_mask_token_id`` from
        ``config.json``.
      max_new_tokens: generation budget per row.
      stop_token_ids: stop tokens; ``None`` uses the config's ``eos_token_id`` (if any), pass
        ``()`` to disable stopping.
      verify: lossless mode (output equals greedy decoding).
      sampling: greedy (default) or temperature/top-p/top-k settings.
      seed: seed of the sampling draws.
      pad_token_id: id for padding slots; ``None`` uses the config's ``pad_token_id`` or 0.
      dtype: compute dtype when ``model`` is a path.
      on_chunk: called as ``on_chunk(row, tokens)`` with each row's newly emitted token ids.

    Returns:
      ``mtp_core.DecodeResult`` (generated token ids per row and step statistics).

    Raises:
      ValueError: if no mask id is given and the config has none (the model was not converted),
        or on any invalid decode argument.
    """
    backend = (
        model if isinstance(model, NumpyBackend) else NumpyBackend.from_pretrained(model, dtype)
    )
    if mask_token_id is None:
        mask_token_id = backend.mask_token_id
        if mask_token_id is None:
            raise ValueError(
                f"config.json has no {MASK_TOKEN_CONFIG_KEY!r}: this is not a converted MTP "
                "checkpoint. Convert it first (mtp convert / MTPModel.save_pretrained) or pass "
                "mask_token_id explicitly"
            )
    if stop_token_ids is None:
        stop_token_ids = _stop_ids_from_config(backend.config)
    if pad_token_id is None:
        configured_pad = backend.config.get("pad_token_id")
        pad_token_id = 0 if configured_pad is None else int(configured_pad)
    return decode(
        backend,
        prompts,
        policy,
        mask_token_id=int(mask_token_id),
        max_new_tokens=max_new_tokens,
        stop_token_ids=stop_token_ids,
        verify=verify,
        sampling=sampling,
        seed=seed,
        pad_token_id=pad_token_id,
        max_length=backend.max_position_embeddings,
        vocab_size=backend.vocab_size,
        on_chunk=on_chunk,
    )
