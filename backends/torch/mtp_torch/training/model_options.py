"""How the model computes during a run: weight dtype, attention kernel, activation checkpointing.

Three ``DistillConfig`` options that change the memory and speed of a training step, applied to
the model before the teacher is copied from it (so student and teacher agree):

- ``dtype``: the weights of student and teacher cast to bfloat16 or float32 (LoRA adapters,
  added later, stay float32);
- ``attention``: the packed layout's mask as a FlexAttention block mask (CUDA) instead of a
  dense 4-D mask through SDPA;
- ``gradient_checkpointing``: transformers' activation checkpointing of every block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mtp_torch.training.config import DistillConfig

__all__ = [
    "FLEX_ATTENTION",
    "attention_implementation",
    "cast_parameters",
    "enable_gradient_checkpointing",
    "prepare_model",
    "restore_model",
    "splits_passes",
    "weight_dtype",
]

# transformers' name of the FlexAttention implementation.
FLEX_ATTENTION = "flex_attention"
# What a model trained with FlexAttention is switched back to (decoding takes dense masks).
_DECODE_ATTENTION = "sdpa"


def weight_dtype(cfg: DistillConfig) -> torch.dtype | None:
    """The dtype ``cfg.dtype`` names, or ``None`` to keep the model's."""
    return None if cfg.dtype is None else getattr(torch, cfg.dtype)


def _flex_attention_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except ImportError:
        return False
    return True


def _why_not_flex(model: Any) -> str | None:
    """Why ``model`` cannot train with FlexAttention, or ``None`` when it can."""
    if not _flex_attention_available():
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    if not getattr(model, "_supports_flex_attn", False):
        return f"{type(model).__name__} does not support attn_implementation='flex_attention'"
    if float(getattr(model.config, "attention_dropout", 0.0) or 0.0) > 0.0:
        return "transformers' FlexAttention does not train with attention dropout"
    head_dim = _head_dim(model.config)
    if head_dim is not None and head_dim < _FLEX_MIN_HEAD_DIM:
        return (
            f"FlexAttention's kernels need a head dimension of at least {_FLEX_MIN_HEAD_DIM} "
            f"(this model's is {head_dim})"
        )
    return None


# torch's FlexAttention lowering refuses smaller query/key/value embeddings (NotImplementedError
# at the first compiled call, torch 2.11 on an H200).
_FLEX_MIN_HEAD_DIM = 16


def _head_dim(config: Any) -> int | None:
    """Per-head width of ``config``'s attention (``head_dim``, else hidden / heads), if known."""
    head_dim = getattr(config, "head_dim", None)
    if isinstance(head_dim, int):
        return head_dim
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return None


def splits_passes(cfg: DistillConfig) -> bool:
    """Whether ``cfg`` asks for the split student passes (``DistillConfig.split_passes``) in a
    setting where they can run (a model that cannot is checked when training starts)."""
    return (
        cfg.split_passes and cfg.lora_gate is not None and not cfg.fsdp and cfg.attention != "flex"
    )


def attention_implementation(model: Any, cfg: DistillConfig, device: torch.device) -> str:
    """The attention implementation the training passes of ``model`` use under ``cfg``.

    Args:
      model: the transformers causal LM (before any LoRA wrapper).
      cfg: the run's settings (``attention``).
      device: the training device (``"auto"`` takes FlexAttention on CUDA only).

    Returns:
      ``"flex_attention"``, or the model's own implementation (``"sdpa"`` or ``"eager"``):
      ``"auto"`` keeps the model's own for a gated student whose passes split
      (``splits_passes``), else takes FlexAttention on CUDA where it can run.

    Raises:
      ValueError: for ``attention="flex"`` on the CPU, or with a model or torch that cannot
        run it.
    """
    current = str(getattr(model.config, "_attn_implementation", None) or "eager")
    if cfg.attention == "sdpa":
        return _DECODE_ATTENTION if current == FLEX_ATTENTION else current
    reason = _why_not_flex(model)
    if cfg.attention == "auto" and splits_passes(cfg):
        reason = "the gated student's split passes take a dense mask"
    if cfg.attention == "flex" and device.type == "cpu":
        reason = "FlexAttention has no backward pass on the CPU"
    if cfg.attention == "flex":
        if reason is not None:
            raise ValueError(f"attention='flex' cannot be used: {reason}; use attention='sdpa'")
        return FLEX_ATTENTION
    return FLEX_ATTENTION if device.type == "cuda" and reason is None else current


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute every block's activations in the backward pass (transformers, non-reentrant).

    transformers also hooks the input embeddings so that their output requires a gradient
    (``enable_input_require_grads``), which reentrant checkpointing needs when the embeddings
    are frozen (LoRA, ``train_mask_embedding`` off): without it a checkpointed block whose
    input needs no gradient gives its parameters none.  Non-reentrant checkpointing, used
    here, gives them their gradients either way, so the hook is removed again: it would make
    the backward pass run through frozen lower blocks that ``train_layers`` leaves out.  The
    training passes run with ``use_cache=False`` (``forward_logits``), as checkpointing needs;
    the model's config is left alone, so the saved model generates with its cache.

    Args:
      model: a transformers causal LM (the base model under a LoRA wrapper).

    Raises:
      ValueError: for a model without activation checkpointing support.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"{type(model).__name__} does not support gradient checkpointing; use "
            "gradient_checkpointing=False"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model``'s floating-point parameters to ``dtype`` in place.

    Buffers keep their dtype, as ``from_pretrained(dtype=...)`` leaves them: ``model.to`` would
    also round the float32 rotary frequencies (``inv_freq``) to bfloat16, which moves the
    positions of long contexts.
    """
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.is_floating_point() and parameter.dtype != dtype:
                parameter.data = parameter.data.to(dtype)


def prepare_model(model: Any, cfg: DistillConfig, device: torch.device) -> None:
    """Cast ``model``'s weights to ``cfg.dtype`` and pick its training attention, in place.

    Called before the teacher is copied from the model, so a frozen teacher shares both.

    Args:
      model: the transformers causal LM about to be trained.
      cfg: the run's settings (``dtype``, ``attention``).
      device: the training device.
    """
    dtype = weight_dtype(cfg)
    if dtype is not None:
        cast_parameters(model, dtype)
    implementation = attention_implementation(model, cfg, device)
    if implementation != getattr(model.config, "_attn_implementation", None):
        model.set_attn_implementation(implementation)


def restore_model(model: Any) -> None:
    """Undo what a run set that decoding does not want: FlexAttention back to SDPA (decoding
    passes dense masks), activation checkpointing off.

    Args:
      model: the trained transformers causal LM (LoRA merged).
    """
    if getattr(model.config, "_attn_implementation", None) == FLEX_ATTENTION:
        model.set_attn_implementation(_DECODE_ATTENTION)
    if hasattr(model, "activation_checkpointing_disable"):  # the newer transformers 5 name
        if model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
    elif getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
