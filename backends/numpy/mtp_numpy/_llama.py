"""A numpy forward pass for Llama-family decoders (Llama, Mistral, Qwen2).

The hyper-parameters (``DecoderConfig``, ``load_config``) live in ``_config.py`` and are
re-exported here.  The architecture (pre-norm decoder): token embedding; per layer RMSNorm -> grouped-query
attention with rotary position embeddings (RoPE) -> residual, RMSNorm -> SwiGLU MLP ->
residual; a final RMSNorm and the (tied or separate) output projection to vocabulary logits.

Everything runs in one compute dtype (float32 or float64).  Key/value caches are plain per-layer
arrays of shape ``(batch, kv_heads, slots, head_dim)`` that can be cropped and re-indexed, and the
attention of a step sees ``[cache slots, new slots]`` under a causal rule over slots combined with
an explicit per-slot visibility mask (see ``mtp_core.StepInputs``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from mtp_numpy._config import SUPPORTED_MODEL_TYPES as SUPPORTED_MODEL_TYPES
from mtp_numpy._config import DecoderConfig as DecoderConfig
from mtp_numpy._config import load_config as load_config
from mtp_numpy._safetensors import load_checkpoint_tensors

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "DecoderConfig",
    "KVCache",
    "LayerWeights",
    "Linear",
    "LlamaWeights",
    "forward_hidden",
    "forward_logits",
    "output_logits",
    "load_config",
]

FloatArray = npt.NDArray[np.floating[Any]]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

_COMPUTE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@dataclasses.dataclass(frozen=True)
class Linear:
    """A dense layer ``y = x @ weight.T + bias``.

    Attributes:
      weight: ``(out_features, in_features)``.
      bias: ``(out_features,)`` or ``None``.
    """

    weight: FloatArray
    bias: FloatArray | None = None

    def __call__(self, inputs: FloatArray) -> FloatArray:
        """Apply the layer to ``(..., in_features)`` activations."""
        outputs: FloatArray = inputs @ self.weight.T
        if self.bias is not None:
            outputs = outputs + self.bias
        return outputs


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """The parameters of one decoder layer (norm weights ``(hidden,)``, projections ``Linear``)."""

    input_norm: FloatArray
    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    o_proj: Linear
    post_attention_norm: FloatArray
    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear


@dataclasses.dataclass(frozen=True)
class LlamaWeights:
    """All parameters of a Llama-family causal LM, in one compute dtype.

    Attributes:
      config: the validated configuration.
      embed_tokens: ``(vocab, hidden)`` input embedding.
      layers: per-layer parameters.
      norm: ``(hidden,)`` final RMSNorm weight.
      lm_head: ``(vocab, hidden)`` output projection (the embedding itself when tied).
      inverse_frequencies: ``(head_dim // 2,)`` float64 RoPE inverse frequencies.
    """

    config: DecoderConfig
    embed_tokens: FloatArray
    layers: tuple[LayerWeights, ...]
    norm: FloatArray
    lm_head: FloatArray
    inverse_frequencies: npt.NDArray[np.float64]

    @property
    def dtype(self) -> np.dtype[Any]:
        """The compute dtype (float32 or float64)."""
        return self.embed_tokens.dtype

    @classmethod
    def from_tensors(
        cls,
        config: DecoderConfig | Mapping[str, Any],
        tensors: Mapping[str, npt.NDArray[Any]],
        dtype: npt.DTypeLike = np.float32,
    ) -> LlamaWeights:
        """Build the weights from transformers parameter names.

        Args:
          config: a ``DecoderConfig`` or the raw ``config.json`` dict.
          tensors: name -> array as in a transformers state dict (``model.layers.0...``).
          dtype: compute dtype, ``np.float32`` or ``np.float64``.

        Returns:
          The weights, cast to ``dtype``.

        Raises:
          ValueError: on a missing tensor, a wrong shape, or an unsupported dtype.
        """
        cfg = config if isinstance(config, DecoderConfig) else DecoderConfig.from_dict(config)
        compute = np.dtype(dtype)
        if compute not in _COMPUTE_DTYPES:
            raise ValueError(f"dtype must be float32 or float64, got {compute}")

        def get(name: str, shape: tuple[int, ...]) -> FloatArray:
            if name not in tensors:
                raise ValueError(
                    f"checkpoint has no tensor {name!r} required by the {cfg.model_type} "
                    "config; the weights do not match config.json"
                )
            array = np.asarray(tensors[name])
            if array.shape != shape:
                raise ValueError(
                    f"tensor {name!r} has shape {array.shape}, expected {shape} from config.json"
                )
            result: FloatArray = np.ascontiguousarray(array, dtype=compute)
            return result

        def linear(prefix: str, out_dim: int, in_dim: int, bias: bool) -> Linear:
            weight = get(f"{prefix}.weight", (out_dim, in_dim))
            return Linear(weight, get(f"{prefix}.bias", (out_dim,)) if bias else None)

        hidden = cfg.hidden_size
        q_dim = cfg.num_attention_heads * cfg.head_dim
        kv_dim = cfg.num_key_value_heads * cfg.head_dim
        inner = cfg.intermediate_size
        layers = []
        for index in range(cfg.num_hidden_layers):
            p = f"model.layers.{index}"
            layers.append(
                LayerWeights(
                    input_norm=get(f"{p}.input_layernorm.weight", (hidden,)),
                    q_proj=linear(f"{p}.self_attn.q_proj", q_dim, hidden, cfg.attention_bias),
                    k_proj=linear(f"{p}.self_attn.k_proj", kv_dim, hidden, cfg.attention_bias),
                    v_proj=linear(f"{p}.self_attn.v_proj", kv_dim, hidden, cfg.attention_bias),
                    o_proj=linear(f"{p}.self_attn.o_proj", hidden, q_dim, cfg.attention_out_bias),
                    post_attention_norm=get(f"{p}.post_attention_layernorm.weight", (hidden,)),
                    gate_proj=linear(f"{p}.mlp.gate_proj", inner, hidden, cfg.mlp_bias),
                    up_proj=linear(f"{p}.mlp.up_proj", inner, hidden, cfg.mlp_bias),
                    down_proj=linear(f"{p}.mlp.down_proj", hidden, inner, cfg.mlp_bias),
                )
            )
        embed = get("model.embed_tokens.weight", (cfg.vocab_size, hidden))
        if cfg.tie_word_embeddings:
            lm_head = embed
        else:
            lm_head = get("lm_head.weight", (cfg.vocab_size, hidden))
        return cls(
            config=cfg,
            embed_tokens=embed,
            layers=tuple(layers),
            norm=get("model.norm.weight", (hidden,)),
            lm_head=lm_head,
            inverse_frequencies=cfg.inverse_frequencies(),
        )

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], dtype: npt.DTypeLike = np.float32
    ) -> LlamaWeights:
        """Load a transformers checkpoint directory (``config.json`` + safetensors weights).

        Args:
          directory: the checkpoint directory.
          dtype: compute dtype, ``np.float32`` or ``np.float64``.

        Returns:
          The weights.

        Raises:
          ValueError: on an unsupported architecture or missing/corrupt weights.
        """
        config = DecoderConfig.from_dict(load_config(directory))
        return cls.from_tensors(config, load_checkpoint_tensors(directory), dtype)


@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer keys and values of the slots seen so far (an immutable value).

    Attributes:
      keys: per layer, ``(batch, kv_heads, slots, head_dim)``, RoPE already applied.
      values: per layer, ``(batch, kv_heads, slots, head_dim)``.
    """

    keys: tuple[FloatArray, ...]
    values: tuple[FloatArray, ...]

    @classmethod
    def empty(cls, weights: LlamaWeights, batch_size: int) -> KVCache:
        """A cache with zero slots for ``batch_size`` rows."""
        cfg = weights.config
        shape = (batch_size, cfg.num_key_value_heads, 0, cfg.head_dim)
        layers = tuple(np.zeros(shape, dtype=weights.dtype) for _ in range(cfg.num_hidden_layers))
        return cls(keys=layers, values=layers)

    @property
    def batch_size(self) -> int:
        """Rows in the cache."""
        return int(self.keys[0].shape[0]) if self.keys else 0

    @property
    def length(self) -> int:
        """Slots per row."""
        return int(self.keys[0].shape[2]) if self.keys else 0

    def crop(self, length: int) -> KVCache:
        """Keep the first ``length`` slots of every row (views, no copy)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} slots to {length}")
        return KVCache(
            keys=tuple(k[:, :, :length] for k in self.keys),
            values=tuple(v[:, :, :length] for v in self.values),
        )

    def reindex(self, rows: npt.ArrayLike, slots: npt.ArrayLike | None = None) -> KVCache:
        """Gather rows and optionally slots: ``new[b, :, j] = old[rows[b], :, slots[b, j]]``.

        Args:
          rows: ``(new_batch,)`` row indices.
          slots: ``(new_batch, new_length)`` slot indices per kept row, or ``None``.

        Returns:
          The gathered cache (new arrays).

        Raises:
          ValueError: on out-of-range or mis-shaped indices.
        """
        row_index = np.asarray(rows, dtype=np.int64)
        if row_index.ndim != 1 or (
            row_index.size and not (0 <= row_index.min() and row_index.max() < self.batch_size)
        ):
            raise ValueError(
                f"rows must be a 1-D array of indices in [0, {self.batch_size}), got {row_index}"
            )
        if slots is None:
            return KVCache(
                keys=tuple(k[row_index] for k in self.keys),
                values=tuple(v[row_index] for v in self.values),
            )
        slot_index = np.asarray(slots, dtype=np.int64)
        if slot_index.ndim != 2 or slot_index.shape[0] != row_index.size:
            raise ValueError(
                f"slots must have shape (len(rows), new_length) = ({row_index.size}, n), "
                f"got {slot_index.shape}"
            )
        if slot_index.size and not (0 <= slot_index.min() and slot_index.max() < self.length):
            raise ValueError(f"slot indices must lie in [0, {self.length})")
        gather = slot_index[:, None, :, None]
        return KVCache(
            keys=tuple(np.take_along_axis(k[row_index], gather, axis=2) for k in self.keys),
            values=tuple(np.take_along_axis(v[row_index], gather, axis=2) for v in self.values),
        )


def _rms_norm(hidden: FloatArray, weight: FloatArray, eps: float) -> FloatArray:
    mean_square = np.mean(hidden * hidden, axis=-1, keepdims=True)
    normed: FloatArray = hidden / np.sqrt(mean_square + eps) * weight
    return normed


def _silu(x: FloatArray) -> FloatArray:
    # x * sigmoid(x), with sigmoid written through tanh so no exp can overflow.
    result: FloatArray = 0.5 * x * (1.0 + np.tanh(0.5 * x))
    return result


def _rope_tables(
    position_ids: IntArray, inverse_frequencies: npt.NDArray[np.float64], dtype: np.dtype[Any]
) -> tuple[FloatArray, FloatArray]:
    """cos/sin of shape ``(batch, 1, width, head_dim)`` (halves repeated, broadcast over heads)."""
    angles = position_ids.astype(np.float64)[..., None] * inverse_frequencies
    angles = np.concatenate([angles, angles], axis=-1)[:, None]
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def _apply_rope(x: FloatArray, cos: FloatArray, sin: FloatArray) -> FloatArray:
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    result: FloatArray = x * cos + rotated * sin
    return result


def _masked_softmax(scores: FloatArray, allowed: BoolArray) -> FloatArray:
    """Softmax over the last axis restricted to ``allowed``; all-masked rows give zeros."""
    masked = np.where(allowed, scores, -np.inf)
    peak = masked.max(axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    weights = np.exp(masked - peak)
    total = weights.sum(axis=-1, keepdims=True)
    probs: FloatArray = weights / np.where(total > 0, total, 1.0)
    return probs


def _allowed_slots(
    cfg: DecoderConfig,
    cache: KVCache,
    tokens: IntArray,
    positions: IntArray,
    attention_mask: npt.ArrayLike | None,
) -> BoolArray:
    """Check a block against the cache and the model; the slots each new token may attend to.

    Returns:
      ``(batch, 1, 1, width, past + width)`` bool: the causal rule over slots and the
      caller's ``attention_mask``, broadcast over heads.
    """
    batch, width = tokens.shape
    past = cache.length
    if cache.keys and cache.batch_size != batch:
        raise ValueError(f"the cache holds {cache.batch_size} rows but the block has {batch}")
    if tokens.size and not (0 <= tokens.min() and tokens.max() < cfg.vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {cfg.vocab_size}), got {tokens.min()}..{tokens.max()}"
        )
    if positions.size and positions.min() < 0:
        raise ValueError("position ids must be >= 0")
    if cfg.sliding_window is not None and positions.size and positions.max() >= cfg.sliding_window:
        raise ValueError(
            f"position {positions.max()} reaches the model's sliding window "
            f"({cfg.sliding_window}); sliding-window attention is not implemented in the numpy "
            "backend, keep sequences shorter or use the torch backend"
        )
    total = past + width
    if attention_mask is None:
        visible = np.ones((batch, total), dtype=np.bool_)
    else:
        visible = np.asarray(attention_mask, dtype=np.bool_)
        if visible.shape != (batch, total):
            raise ValueError(
                f"attention_mask must have shape (batch, past + width) = ({batch}, {total}), "
                f"got {visible.shape}"
            )
    causal = np.arange(total)[None, :] <= past + np.arange(width)[:, None]  # (width, total)
    # (batch, 1 kv-head, 1 group, width, total): broadcast over heads.
    allowed = (causal[None] & visible[:, None, :])[:, None, None]
    return allowed


def forward_hidden(
    weights: LlamaWeights,
    cache: KVCache,
    token_ids: npt.ArrayLike,
    position_ids: npt.ArrayLike,
    attention_mask: npt.ArrayLike | None = None,
) -> tuple[FloatArray, KVCache]:
    """Run the decoder layers over a block of new tokens appended to the cache.

    Args:
      weights: the model.
      cache: keys/values of ``past`` earlier slots.
      token_ids: ``(batch, width)`` int token ids.
      position_ids: ``(batch, width)`` int positions (RoPE).
      attention_mask: ``(batch, past + width)`` bool, slots each row may attend to on top of the
        causal rule over slots (slot ``t`` is visible from new token ``i`` iff
        ``t <= past + i`` and ``attention_mask[b, t]``); ``None`` means all visible.

    Returns:
      ``(hidden, cache)``: the last layer's residual stream, ``(batch, width, hidden)``, before
      the final norm; and the cache extended by the ``width`` new slots.

    Raises:
      ValueError: on mis-shaped inputs, token ids outside the vocabulary, or positions the
        model's sliding window would cut (sliding-window attention is not implemented).
    """
    cfg = weights.config
    tokens = np.asarray(token_ids, dtype=np.int64)
    positions = np.asarray(position_ids, dtype=np.int64)
    if tokens.ndim != 2 or positions.shape != tokens.shape:
        raise ValueError(
            f"token_ids and position_ids must both have shape (batch, width), got "
            f"{tokens.shape} and {positions.shape}"
        )
    batch, width = tokens.shape
    allowed = _allowed_slots(cfg, cache, tokens, positions, attention_mask)

    dtype = weights.dtype
    heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    groups = heads // kv_heads
    scale = head_dim**-0.5
    cos, sin = _rope_tables(positions, weights.inverse_frequencies, dtype)
    hidden: FloatArray = weights.embed_tokens[tokens]
    new_keys: list[FloatArray] = []
    new_values: list[FloatArray] = []
    for layer, past_keys, past_values in zip(weights.layers, cache.keys, cache.values, strict=True):
        # 1. Attention block: norm, project, rotate, attend over [cache, new] slots.
        normed = _rms_norm(hidden, layer.input_norm, cfg.rms_norm_eps)
        query = layer.q_proj(normed).reshape(batch, width, heads, head_dim).transpose(0, 2, 1, 3)
        key = layer.k_proj(normed).reshape(batch, width, kv_heads, head_dim).transpose(0, 2, 1, 3)
        value = layer.v_proj(normed).reshape(batch, width, kv_heads, head_dim).transpose(0, 2, 1, 3)
        query = _apply_rope(query, cos, sin)
        key = _apply_rope(key, cos, sin)
        keys = np.concatenate([past_keys, key], axis=2)
        values = np.concatenate([past_values, value], axis=2)
        new_keys.append(keys)
        new_values.append(values)
        grouped = query.reshape(batch, kv_heads, groups, width, head_dim)
        scores = (grouped @ keys[:, :, None].swapaxes(-1, -2)) * scale
        attended = _masked_softmax(scores, allowed) @ values[:, :, None]
        attended = attended.reshape(batch, heads, width, head_dim).transpose(0, 2, 1, 3)
        hidden = hidden + layer.o_proj(attended.reshape(batch, width, heads * head_dim))
        # 2. MLP block: norm, SwiGLU.
        normed = _rms_norm(hidden, layer.post_attention_norm, cfg.rms_norm_eps)
        gated = _silu(layer.gate_proj(normed)) * layer.up_proj(normed)
        hidden = hidden + layer.down_proj(gated)
    return hidden, KVCache(keys=tuple(new_keys), values=tuple(new_values))


def output_logits(weights: LlamaWeights, hidden: FloatArray) -> FloatArray:
    """Final RMSNorm and output projection.

    Args:
      weights: the model.
      hidden: ``(..., hidden)`` residual stream from ``forward_hidden``.

    Returns:
      Logits over the vocabulary, ``(..., vocab)``, in the compute dtype.
    """
    normed = _rms_norm(hidden, weights.norm, weights.config.rms_norm_eps)
    logits: FloatArray = normed @ weights.lm_head.T
    return logits


def forward_logits(
    weights: LlamaWeights,
    cache: KVCache,
    token_ids: npt.ArrayLike,
    position_ids: npt.ArrayLike | None = None,
    attention_mask: npt.ArrayLike | None = None,
    read_index: npt.ArrayLike | None = None,
) -> tuple[FloatArray, KVCache]:
    """Logits of a block of new tokens appended to the cache.

    Args:
      weights: the model.
      cache: keys/values of ``past`` earlier slots.
      token_ids: ``(batch, width)`` int token ids.
      position_ids: ``(batch, width)`` positions; ``None`` means ``past + arange(width)``.
      attention_mask: ``(batch, past + width)`` bool slot visibility; ``None``: all visible.
      read_index: ``(batch, n)`` indices into the block whose logits are computed; ``None``
        computes all ``width``.

    Returns:
      ``(logits, cache)``: logits ``(batch, n or width, vocab)`` in the compute dtype, and the
      cache extended by ``width`` slots.
    """
    tokens = np.asarray(token_ids, dtype=np.int64)
    if position_ids is None:
        if tokens.ndim != 2:
            raise ValueError(f"token_ids must have shape (batch, width), got {tokens.shape}")
        position_ids = np.broadcast_to(cache.length + np.arange(tokens.shape[1]), tokens.shape)
    hidden, cache = forward_hidden(weights, cache, tokens, position_ids, attention_mask)
    if read_index is not None:
        index = np.asarray(read_index, dtype=np.int64)
        if index.ndim != 2 or index.shape[0] != hidden.shape[0]:
            raise ValueError(f"read_index must have shape (batch, n), got {index.shape}")
        if index.size and not (0 <= index.min() and index.max() < hidden.shape[1]):
            raise ValueError(f"read_index values must lie in [0, {hidden.shape[1]})")
        hidden = np.take_along_axis(hidden, index[..., None], axis=1)
    return output_logits(weights, hidden), cache
