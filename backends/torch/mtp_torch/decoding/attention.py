"""Attention for a few queries against a cache, on the CPU, inside a kernel scope.

A multi-token decoding pass has 2-16 queries per row and a cache of hundreds of keys.  With a
cache and more than one query transformers hands SDPA a 4-D boolean mask, and PyTorch's CPU SDPA
then leaves its fused kernel for the unfused ``math`` path (measured: ~8.7 ms a pass of
SmolLM2-135M against ~2.5 ms for one query; docs/results.md).  For so few queries the plain
product is cheap: ``softmax(q k^T * scale + mask) v`` with the grouped query heads folded into
the query rows, so each key/value head is read once.

The model's attention implementation is switched, once, from ``"sdpa"`` to ``"mtp_few_query"``
(registered with transformers' ``AttentionInterface`` and, for the mask, with SDPA's mask
builder).  That function runs the product above only for calls of a model covered by a
``use_kernels`` scope in the calling context (``mtp_torch.decoding.kernels``), on the CPU, in
inference, with at most ``MAX_QUERIES`` queries and a mask; every other call goes to
transformers' own ``sdpa_attention_forward`` unchanged, so outside a scope the numerics are
exactly SDPA's.  Models whose implementation is not ``"sdpa"`` are left alone.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mtp_torch.decoding.plan import active_plan

__all__ = ["FEW_QUERY_ATTENTION", "MAX_QUERIES", "install_few_query_attention"]

FEW_QUERY_ATTENTION = "mtp_few_query"
"""The name the attention function is registered under with transformers."""

MAX_QUERIES = 16
"""Calls with more queries than this (prompt passes) run transformers' SDPA."""

_LOCK = threading.Lock()
_REGISTERED: list[bool] = []


def _few_query_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature; see the module docstring."""
    plan = active_plan(module)
    batch, heads, queries, head_dim = query.shape
    if (
        plan is None
        or not plan.attention
        or queries > MAX_QUERIES
        or attention_mask is None
        or attention_mask.dim() != 4
        or query.device.type != "cpu"
        or dropout
        or module.training
        or torch.is_grad_enabled()
        or kwargs.get("s_aux") is not None
        or kwargs.get("softcap") is not None
        or attention_mask.shape[-1] != key.shape[2]
        or getattr(module, "sliding_window", None)
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, **kwargs,
        )  # fmt: skip
    kv_heads, length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else head_dim**-0.5
    # (batch, kv_heads, groups * queries, head_dim): the query heads sharing a key head, stacked.
    folded = query.reshape(batch, kv_heads, groups * queries, head_dim)
    scores = torch.matmul(folded, key.transpose(-1, -2)).mul_(scale)
    scores = scores.view(batch, kv_heads, groups, queries, length)
    mask = attention_mask[:, :, None]  # (batch, 1, 1, queries, length)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores.add_(mask)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(weights.view(batch, kv_heads, groups * queries, length), value)
    out = out.view(batch, heads, queries, head_dim).transpose(1, 2).contiguous()
    return out, None


def _register() -> None:
    with _LOCK:
        if _REGISTERED:
            return
        # Lazy: transformers' attention registries load on first registration (start-up).
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(FEW_QUERY_ATTENTION, _few_query_attention)
        AttentionMaskInterface.register(FEW_QUERY_ATTENTION, sdpa_mask)
        _REGISTERED.append(True)


def install_few_query_attention(model: torch.nn.Module) -> bool:
    """Switch ``model`` from ``"sdpa"`` to the few-query attention (idempotent).

    Outside a kernel scope the switched model computes exactly what SDPA computes.

    Args:
      model: a transformers model (other modules are ignored).

    Returns:
      True when the model now runs ``"mtp_few_query"``.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == FEW_QUERY_ATTENTION:
        return True
    if current != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    _register()
    with _LOCK:
        if config._attn_implementation == "sdpa":  # type: ignore[union-attr]
            model.set_attn_implementation(FEW_QUERY_ATTENTION)  # type: ignore[operator]
    return bool(config._attn_implementation == FEW_QUERY_ATTENTION)  # type: ignore[union-attr]
