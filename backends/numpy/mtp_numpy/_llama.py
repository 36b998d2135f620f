"""A numpy forward pass for Llama-family decoders (Llama, Mistral, Qwen2).

The architecture (pre-norm decoder): token embedding; per layer RMSNorm -> grouped-query
attention with rotary position embeddings (RoPE) -> residual, RMSNorm -> SwiGLU MLP ->
residual; a final RMSNorm and the (tied or separate) output projection to vocabulary logits.

Everything runs in one compute dtype (float32 or float64).  Key/value caches are plain per-layer
arrays of shape ``(batch, kv_heads, slots, head_dim)`` that can be cropped and re-indexed, and the
attention of a step sees ``[cache slots, new slots]`` under a causal rule over slots combined with
an explicit per-slot visibility mask (see ``mtp_core.StepInputs``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

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

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_ROPE_TYPES = ("default", "linear", "llama3")
_COMPUTE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _require(config: Mapping[str, Any], key: str) -> Any:
    if key not in config or config[key] is None:
        raise ValueError(f"config.json has no {key!r}; it is required for a Llama-family model")
    return config[key]


def _rope_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """Merge the transformers v5 ``rope_parameters`` and the older ``rope_theta/rope_scaling``."""
    params: dict[str, Any] = {}
    scaling = config.get("rope_scaling")
    if isinstance(scaling, Mapping):
        params.update(scaling)
    new_style = config.get("rope_parameters")
    if isinstance(new_style, Mapping):
        params.update(new_style)
    if "rope_theta" not in params:
        params["rope_theta"] = config.get("rope_theta", 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    params["rope_type"] = "default" if rope_type is None else str(rope_type)
    return params


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The hyper-parameters of a Llama-family decoder, validated.

    Attributes:
      model_type: ``"llama"``, ``"mistral"`` or ``"qwen2"``.
      vocab_size: rows of the embedding and of the logits.
      hidden_size: model width.
      intermediate_size: SwiGLU inner width.
      num_hidden_layers: decoder layers.
      num_attention_heads: query heads.
      num_key_value_heads: key/value heads (grouped-query attention), divides the query heads.
      head_dim: width of one head.
      rms_norm_eps: epsilon added to the mean square in RMSNorm.
      max_position_embeddings: the context window.
      tie_word_embeddings: whether the output projection is the embedding matrix.
      attention_bias: biases on the q/k/v projections.
      attention_out_bias: bias on the attention output projection.
      mlp_bias: biases on the MLP projections.
      rope_theta: RoPE base.
      rope_type: ``"default"``, ``"linear"`` or ``"llama3"``.
      rope_parameters: the raw RoPE settings (factor etc.).
      sliding_window: attention window if the model uses one, else ``None``.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    attention_out_bias: bool
    mlp_bias: bool
    rope_theta: float
    rope_type: str
    rope_parameters: Mapping[str, Any]
    sliding_window: int | None

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> DecoderConfig:
        """Validate a transformers ``config.json`` dict.

        Args:
          config: the parsed ``config.json``.

        Returns:
          The validated configuration.

        Raises:
          ValueError: for a model type other than llama/mistral/qwen2, an activation other than
            SiLU, a RoPE scaling type that is not implemented, or inconsistent head counts.
        """
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported by the numpy backend; supported: "
                f"{list(SUPPORTED_MODEL_TYPES)}. Use the torch backend (mtp_torch) for other "
                "architectures"
            )
        activation = config.get("hidden_act", "silu")
        if activation not in ("silu", "swish"):
            raise ValueError(
                f"hidden_act {activation!r} is not supported; the numpy backend implements the "
                "SwiGLU MLP with SiLU only"
            )
        hidden_size = int(_require(config, "hidden_size"))
        num_heads = int(_require(config, "num_attention_heads"))
        num_kv_heads = int(config.get("num_key_value_heads") or num_heads)
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_attention_heads={num_heads} must be a positive multiple of "
                f"num_key_value_heads={num_kv_heads}"
            )
        head_dim = config.get("head_dim") or hidden_size // num_heads
        rope = _rope_parameters(config)
        if rope["rope_type"] not in _ROPE_TYPES:
            raise ValueError(
                f"RoPE scaling type {rope['rope_type']!r} is not implemented in the numpy "
                f"backend (implemented: {list(_ROPE_TYPES)}); use the torch backend"
            )
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not implemented in the numpy backend")
        if model_type == "qwen2":
            attention_bias, attention_out_bias, mlp_bias = True, False, False
            uses_window = bool(config.get("use_sliding_window", False)) or any(
                kind == "sliding_attention" for kind in config.get("layer_types") or ()
            )
            sliding_window = config.get("sliding_window") if uses_window else None
        else:
            attention_bias = bool(config.get("attention_bias", False))
            attention_out_bias = attention_bias
            mlp_bias = bool(config.get("mlp_bias", False))
            sliding_window = config.get("sliding_window") if model_type == "mistral" else None
        return cls(
            model_type=str(model_type),
            vocab_size=int(_require(config, "vocab_size")),
            hidden_size=hidden_size,
            intermediate_size=int(_require(config, "intermediate_size")),
            num_hidden_layers=int(_require(config, "num_hidden_layers")),
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            attention_out_bias=attention_out_bias,
            mlp_bias=mlp_bias,
            rope_theta=float(rope["rope_theta"]),
            rope_type=str(rope["rope_type"]),
            rope_parameters=dict(rope),
            sliding_window=None if sliding_window is None else int(sliding_window),
        )

    def inverse_frequencies(self) -> npt.NDArray[np.float64]:
        """RoPE inverse frequencies, shape ``(head_dim // 2,)``, float64, scaling applied."""
        exponents = np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim
        inv_freq: npt.NDArray[np.float64] = 1.0 / (self.rope_theta**exponents)
        params = self.rope_parameters
        if self.rope_type == "linear":
            inv_freq = inv_freq / float(params["factor"])
        elif self.rope_type == "llama3":
            inv_freq = _llama3_inverse_frequencies(inv_freq, params)
        return inv_freq


def _llama3_inverse_frequencies(
    inv_freq: npt.NDArray[np.float64], params: Mapping[str, Any]
) -> npt.NDArray[np.float64]:
    """Llama 3.1 frequency-dependent RoPE scaling: long wavelengths slowed by ``factor``."""
    factor = float(params["factor"])
    low_freq_factor = float(params["low_freq_factor"])
    high_freq_factor = float(params["high_freq_factor"])
    original_context = float(params["original_max_position_embeddings"])
    wavelength = 2.0 * math.pi / inv_freq
    low_freq_wavelength = original_context / low_freq_factor
    high_freq_wavelength = original_context / high_freq_factor
    scaled = np.where(wavelength > low_freq_wavelength, inv_freq / factor, inv_freq)
    smooth = (original_context / wavelength - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    blended = (1.0 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    result: npt.NDArray[np.float64] = np.where(medium, blended, scaled)
    return result


def load_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``config.json`` of a checkpoint directory.

    Raises:
      ValueError: if the file is missing or not a JSON object.
    """
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ValueError(
            f"no config.json in {directory}; pass a transformers checkpoint directory "
            "(written by save_pretrained)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config


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
