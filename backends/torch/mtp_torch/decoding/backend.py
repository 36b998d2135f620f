"""``TorchBackend``: runs the decode engine's planned steps on a transformers causal LM.

The engine (``mtp_core.decode``) plans every step in numpy; this backend only moves the plan to
the model's device, makes one model call per step against a ``DynamicCache`` and reads the top-1
token and its probability at the planned positions.  Only ``(batch, n)`` results come back to
the host, in one transfer per step.

Method: Kirchenbauer et al., "Multi-Token Prediction via Self-Distillation", arXiv 2602.06019,
section 4 (decoding with mask tokens, cache cropping after each step).
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, get_layer_types_and_kwargs

from mtp_core import (
    Backend,
    Sampling,
    StepInputs,
    StepOutputs,
    available_backends,
    draw_tokens,
    filtered_probabilities,
    greedy_tokens,
    load_backend,
)

__all__ = ["TorchBackend", "check_backend_name", "context_window", "registered_backend"]

IntArray = npt.NDArray[np.int64]

# Layer types whose keys/values are a plain per-slot tensor we can crop and gather.
_ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
# Config attributes that name the context window, in order of preference.
_CONTEXT_ATTRIBUTES = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
)


def context_window(config: Any) -> int | None:
    """The number of positions a model can attend over, or ``None`` when the config has none.

    Sliding-window attention lowers it to the window (see ``TorchBackend``).

    Args:
      config: a transformers model config (its text/decoder part is used).

    Returns:
      The context window in tokens, or ``None`` when unbounded or unknown.
    """
    text_config = config.get_text_config(decoder=True)
    limit: int | None = None
    for name in _CONTEXT_ATTRIBUTES:
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            limit = value
            break
    window = _sliding_window(text_config)
    if window is not None:
        limit = window if limit is None else min(limit, window)
    return limit


def _sliding_window(text_config: Any) -> int | None:
    """Smallest sliding window among the model's attention layers, or ``None`` if none slides."""
    layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
    if isinstance(layer_kwargs, dict):  # older 5.x (5.17 among them): one dict for all layers
        layer_kwargs = [layer_kwargs] * len(layer_types)
    windows = [
        int(kwargs["sliding_window"])
        for layer_type, kwargs in zip(layer_types, layer_kwargs, strict=True)
        if layer_type == "sliding_attention" and kwargs.get("sliding_window")
    ]
    return min(windows) if windows else None


def _check_model(model: Any) -> tuple[str, bool]:
    """Raise ``ValueError`` unless ``model`` is a decoder-only causal LM with a croppable cache.

    Returns:
      The name of the forward argument that takes the cache, and whether the forward accepts
      ``logits_to_keep``.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise ValueError(
            f"{type(model).__name__} has no transformers config; pass a model loaded with "
            "transformers.AutoModelForCausalLM.from_pretrained"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model; multi-token decoding needs a "
            "decoder-only causal LM (load it with AutoModelForCausalLM)"
        )
    text_config = config.get_text_config(decoder=True)
    if not getattr(text_config, "is_causal", True) or not getattr(config, "is_causal", True):
        raise ValueError(
            f"{type(model).__name__} is configured with bidirectional attention (is_causal=False); "
            "multi-token decoding needs a causal LM"
        )
    parameters = inspect.signature(model.forward).parameters
    if "cache" in parameters:
        cache_argument = "cache"
    elif "past_key_values" in parameters:
        cache_argument = "past_key_values"
    else:
        raise ValueError(
            f"{type(model).__name__}.forward takes no key/value cache argument; use a transformers "
            "decoder-only causal LM that supports DynamicCache"
        )
    for name in ("input_ids", "attention_mask", "position_ids"):
        if name not in parameters:
            raise ValueError(
                f"{type(model).__name__}.forward has no '{name}' argument; multi-token decoding "
                "needs explicit position ids and a 2-D attention mask"
            )
    layer_types, _ = get_layer_types_and_kwargs(text_config)
    unsupported = sorted(set(layer_types) - _ATTENTION_LAYER_TYPES)
    if unsupported:
        raise ValueError(
            f"{type(model).__name__} has cache layers of type {unsupported}, whose state cannot be "
            "cropped back after the mask positions of a step; only models whose layers are all "
            "full or sliding-window attention are supported"
        )
    return cache_argument, "logits_to_keep" in parameters


class TorchBackend:
    """Executes ``mtp_core.decode`` steps on a transformers decoder-only causal LM.

    The cache is a ``transformers.DynamicCache`` made of plain (full) layers, so it can always be
    cropped and gathered.  On sliding-window models the engine's cache slots can outnumber the
    positions (rows may own holes), so decoding is limited to the window: ``max_length`` is the
    window and a step that would hold more slots than the window raises ``ValueError``.

    Args:
      model: a loaded ``AutoModelForCausalLM`` (Llama, Mistral, Qwen2/3, Phi-3, Gemma, GPT-2 ...),
        on any device, in any dtype.  It is not moved, and its training mode is left alone.

    Raises:
      ValueError: for encoder-decoder or non-causal models, models whose forward takes no cache,
        and models with cache layers that cannot be cropped (linear attention, hybrid, shared).
    """

    def __init__(self, model: Any) -> None:
        self._cache_argument, self._supports_logits_to_keep = _check_model(model)
        self.model: Any = model
        text_config = model.config.get_text_config(decoder=True)
        self.sliding_window = _sliding_window(text_config)
        self.max_length = context_window(model.config)

    @property
    def device(self) -> torch.device:
        """The device of the model's input embeddings (where inputs are sent)."""
        weight: torch.Tensor = self.model.get_input_embeddings().weight
        return weight.device

    def new_cache(self, batch_size: int) -> DynamicCache:
        """An empty cache (layers are created on the first forward).

        Args:
          batch_size: number of rows (the cache takes its batch size from the first step).

        Returns:
          A ``DynamicCache`` of full-attention layers.
        """
        return DynamicCache()

    def cache_length(self, cache: DynamicCache) -> int:
        """Number of slots the cache holds (the same for every row)."""
        return int(cache.get_seq_length())

    def forward(
        self, cache: DynamicCache, inputs: StepInputs, sampling: Sampling, seed: int
    ) -> tuple[StepOutputs, DynamicCache]:
        """Run the model on one planned block and read tokens and confidences.

        Args:
          cache: holds ``past`` slots per row; the block's keys/values are appended in place.
          inputs: token ids and position ids ``(batch, width)``, attention mask
            ``(batch, past + width)`` over slots, read indices ``(batch, n)`` into the block.
          sampling: greedy (argmax of the float32 logits, like transformers' ``generate``) or
            temperature / top-k / top-p sampling.
          seed: seeds this step's ``torch.Generator`` (unused when greedy).

        Returns:
          ``StepOutputs`` with ``(batch, n)`` token ids and the untempered top-1 softmax
          probabilities at the read positions, and the cache holding ``past + width`` slots.

        Raises:
          ValueError: if a sliding-window model would hold more slots than its window.
        """
        device = self.device
        past = self.cache_length(cache)
        width = int(inputs.token_ids.shape[1])
        if self.sliding_window is not None and past + width > self.sliding_window:
            raise ValueError(
                f"this step needs {past + width} cache slots, beyond the model's sliding window of "
                f"{self.sliding_window}; decoding on sliding-window models is exact only within "
                "the window: lower max_new_tokens, shorten the prompt or use a smaller k"
            )
        read_index = np.asarray(inputs.read_index, dtype=np.int64)
        kwargs: dict[str, Any] = {
            "input_ids": torch.from_numpy(np.ascontiguousarray(inputs.token_ids)).to(device),
            "position_ids": torch.from_numpy(np.ascontiguousarray(inputs.position_ids)).to(device),
            "attention_mask": torch.from_numpy(np.ascontiguousarray(inputs.attention_mask)).to(
                device=device, dtype=torch.long
            ),
            self._cache_argument: cache,
            "use_cache": True,
        }
        # Compute the vocabulary projection only at the union of the read columns.
        columns = np.unique(read_index)
        if self._supports_logits_to_keep:
            first = int(columns[0])
            if columns.size == width - first:
                kwargs["logits_to_keep"] = width - first
                local_index = read_index - first
            else:
                kwargs["logits_to_keep"] = torch.from_numpy(columns).to(device)
                local_index = np.searchsorted(columns, read_index).astype(np.int64)
        else:
            local_index = read_index
        with torch.inference_mode():
            logits = self.model(**kwargs).logits
            if local_index.shape[1] == logits.shape[1] and bool(
                np.all(local_index == np.arange(logits.shape[1]))
            ):
                read_logits = logits  # every row reads every kept column, in order: no copy
            else:
                rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
                read_logits = logits[rows, torch.from_numpy(local_index).to(logits.device)]
            tokens, confidences = self._read_out(read_logits, sampling, seed)
            packed = torch.stack([tokens.to(torch.float64), confidences.to(torch.float64)])
            host = packed.cpu().numpy()
        outputs = StepOutputs(
            tokens=host[0].astype(np.int64),
            confidences=np.clip(host[1], 0.0, 1.0),
        )
        return outputs, cache

    def _read_out(
        self, read_logits: torch.Tensor, sampling: Sampling, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-1 probability and chosen token per read position: ``mtp_core.read_out``'s rules
        (``FusedBackend`` reads out through this method too).

        Args:
          read_logits: logits ``(batch, n, vocab)`` at the read positions.
          sampling: greedy or sampling settings.
          seed: seed for the sampling draw.

        Returns:
          Token ids ``(batch, n)`` (int64) and top-1 softmax probabilities ``(batch, n)``.
        """
        # transformers' greedy search takes the argmax of float32 logits; do the same so that
        # StaticK(1) reproduces generate() token for token in every dtype.
        scores = read_logits.to(torch.float32)
        top_tokens: torch.Tensor = greedy_tokens(scores)
        # Confidence: mtp_core.top1_confidence, in float64 for float64 models, as the
        # probability at the argmax: one fused softmax plus one argmax keeps the
        # vocabulary-sized passes (and thread launches) few.
        exact = read_logits if read_logits.dtype == torch.float64 else scores
        exact_top = top_tokens if exact is scores else greedy_tokens(exact)
        probabilities = torch.softmax(exact, dim=-1)
        confidences = probabilities.gather(-1, exact_top[..., None])[..., 0]
        if sampling.greedy:
            return top_tokens, confidences
        return self._sample(scores, sampling, seed), confidences

    def _sample(self, scores: torch.Tensor, sampling: Sampling, seed: int) -> torch.Tensor:
        """Draw one token per position from the filtered, tempered distribution.

        Args:
          scores: float32 logits ``(batch, n, vocab)``.
          sampling: temperature, top-k and top-p settings (temperature > 0).
          seed: seed of this draw.

        Returns:
          Sampled token ids ``(batch, n)``.
        """
        probabilities = filtered_probabilities(scores, sampling)
        # A generator per draw: a shared one let concurrent generate() calls (threads) reseed
        # each other's draws, so one seed could give two outputs.
        generator = torch.Generator(device=scores.device)
        generator.manual_seed(int(seed))
        uniforms = torch.rand(
            scores.shape[:-1], generator=generator, device=scores.device, dtype=scores.dtype
        )
        drawn: torch.Tensor = draw_tokens(probabilities, uniforms)
        return drawn

    def crop(self, cache: DynamicCache, length: int) -> DynamicCache:
        """Keep the first ``length`` slots of every row (drops the mask slots of a step)."""
        excess = self.cache_length(cache) - int(length)
        if excess > 0:
            with torch.inference_mode():
                cache.crop(-excess)
        return cache

    def reindex(self, cache: DynamicCache, rows: IntArray, slots: IntArray | None) -> DynamicCache:
        """Gather rows and, optionally, per-row slots on every layer's keys and values.

        Args:
          cache: the cache, ``(batch, heads, length, head_dim)`` tensors per layer.
          rows: ``(new_batch,)`` indices of the rows to keep, in order.
          slots: ``(new_batch, new_length)`` slot indices per kept row, or ``None`` to keep all.

        Returns:
          The same cache object, now ``new[b, :, j] = old[rows[b], :, slots[b, j]]``.
        """
        with torch.inference_mode():
            for layer in cache.layers:
                if not isinstance(layer, DynamicLayer) or not layer.is_initialized:
                    continue
                keys = layer.keys
                values = layer.values
                if keys is None or values is None or keys.numel() == 0:
                    continue
                row_index = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(
                    keys.device
                )
                layer.keys = _gather_slots(keys.index_select(0, row_index), slots)
                layer.values = _gather_slots(values.index_select(0, row_index), slots)
        return cache


def _gather_slots(states: torch.Tensor, slots: IntArray | None) -> torch.Tensor:
    """``out[b, h, j] = states[b, h, slots[b, j]]`` for ``(batch, heads, length, dim)`` states."""
    if slots is None:
        return states
    index = torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64)).to(states.device)
    index = index[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])
    return torch.gather(states, 2, index)


def check_backend_name(name: str | None) -> str | None:
    """``name`` when a backend is registered under it (``None`` stays ``None``).

    Raises:
      ValueError: naming the registered backends, for a name none is registered under.
    """
    if name is None:
        return None
    registered = available_backends()
    if not isinstance(name, str) or name not in registered:
        raise ValueError(
            f"no decoding backend is registered as {name!r}; registered: {registered}. Register "
            "yours with mtp_core.register_backend(name, 'module:factory') or under the "
            "'mtp_core.backends' entry points of its package"
        )
    return name


def registered_backend(name: str, model: Any) -> Backend[Any]:
    """The backend registered as ``name``, built for ``model``: the registered object (a class
    or a factory, ``mtp_core.load_backend``) called with the transformers model.

    Raises:
      ValueError: when no backend is registered as ``name``.
      TypeError: when the registered object cannot be called with a model (the numpy
        reference, for one, is built from a checkpoint: ``NumpyBackend.from_pretrained``).
    """
    factory: Any = load_backend(check_backend_name(name) or name)
    try:
        backend: Backend[Any] = factory(model)
    except TypeError as error:
        raise TypeError(
            f"the backend registered as {name!r} cannot be built from a transformers model "
            f"({error}); MTPModel calls the registered object with the model, so register a "
            "class or factory that takes one"
        ) from error
    return backend
