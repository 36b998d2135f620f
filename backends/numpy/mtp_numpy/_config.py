"""The hyper-parameters of a Llama-family decoder (Llama, Mistral, Qwen2): ``config.json`` read
and validated, and the rotary-embedding frequencies they define (default, linear, Llama 3.1)."""

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

__all__ = ["SUPPORTED_MODEL_TYPES", "DecoderConfig", "load_config"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_ROPE_TYPES = ("default", "linear", "llama3")


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
