"""A training batch: draw the layout, cut windows, pack them, run a model on the packing.

Steps 1-2 of a training step (module docstring of ``mtp_torch.training.step``): draw the block
size ``k ~ U[k_min, k_max]`` and the region-grid offset, build the packed layout (``mtp_core``),
cut the global batch of ground-truth windows from the token stream and pack this process's
slice of it (mask slots get the ``<mtp_mask>`` id).
"""

from __future__ import annotations

import inspect
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from mtp_core import TrainingLayout, TrainingLayoutSpec, training_layout
from mtp_torch.training.config import DistillConfig
from mtp_torch.training.data import TokenStream

__all__ = [
    "PackedBatch",
    "as_index",
    "draw_batch",
    "flex_block_mask",
    "forward_logits",
    "split_forward_logits",
    "split_forward_supported",
    "split_region_logits",
    "trained_regions",
    "pack_windows",
]


@attrs.frozen(eq=False)
class PackedBatch:
    """One micro-batch, packed and on the device.

    Attributes:
      layout: the packed layout (``k``, ``M`` regions, offset) of every row.
      windows: ``(B, window_len)`` ground-truth token ids.
      weights: ``(B, window_len)``: 1 where a token is a training target, 0 for context.
      confidence: ``(B, window_len)``: the teacher's top-1 probability per token (or 1).
      input_ids: ``(B, S)`` packed input, mask slots holding the mask token id.
      position_ids: ``(B, S)``.
      allowed: ``(B, 1, S, S)`` boolean attention mask (True: may attend).
      keep: ``(n_keep,)`` slots whose logits are computed.
      predict_at: ``(M, k)`` indices into the kept slots: each region's prediction slots.
      prefix_at: ``(G,)`` indices into the kept slots of the real slots (prefix loss only).
      block_mask: ``allowed`` as a FlexAttention ``BlockMask`` (for models that attend with
        ``attn_implementation="flex_attention"``), or ``None`` when not built.
    """

    layout: TrainingLayout
    windows: torch.Tensor
    weights: torch.Tensor
    confidence: torch.Tensor
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    allowed: torch.Tensor
    keep: torch.Tensor
    predict_at: torch.Tensor
    prefix_at: torch.Tensor | None
    block_mask: Any = None

    @property
    def k(self) -> int:
        """The block size of this micro-batch."""
        return int(self.layout.spec.k)


def as_index(array: npt.ArrayLike, device: torch.device) -> torch.Tensor:
    """A (read-only) numpy index array as an int64 tensor on ``device``."""
    return torch.from_numpy(np.array(array, dtype=np.int64)).to(device)


def flex_block_mask(allowed: torch.Tensor) -> Any:
    """The packed layout's attention mask as a FlexAttention ``BlockMask``.

    Every row of a micro-batch shares one layout, so the block mask is built once from the
    first row's dense mask and broadcast over the batch and the heads.

    Args:
      allowed: ``(B, 1, S, S)`` boolean attention mask (True: may attend).

    Returns:
      A ``torch.nn.attention.flex_attention.BlockMask`` of shape ``(1, 1, S, S)``.
    """
    # Lazy: FlexAttention is optional (torch >= 2.5); loaded only when chosen.
    from torch.nn.attention.flex_attention import create_block_mask

    dense = allowed[0, 0].contiguous()
    seq_len = int(dense.shape[-1])

    def may_attend(
        batch: torch.Tensor, head: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> torch.Tensor:
        return dense[query, key]

    return create_block_mask(may_attend, None, None, seq_len, seq_len, device=dense.device)


def pack_windows(
    windows_np: np.ndarray,
    weights_np: np.ndarray,
    layout: TrainingLayout,
    mask_token_id: int,
    device: torch.device,
    prefix_loss: bool,
    confidence_np: np.ndarray | None = None,
    flex_attention: bool = False,
) -> PackedBatch:
    """Pack ground-truth windows into the layout's slots, on ``device``.

    Args:
      windows_np: ``(B, window_len)`` token ids.
      weights_np: ``(B, window_len)`` target weights (0 for context tokens).
      layout: the packed layout.
      mask_token_id: id written into the mask slots.
      device: where the tensors go.
      prefix_loss: also keep the logits of every real slot (for the prefix loss).
      confidence_np: ``(B, window_len)`` teacher confidences, or ``None`` for all 1.
      flex_attention: also build the mask as a FlexAttention block mask (once, for the
        student's and the teacher's forward alike).

    Returns:
      The packed micro-batch.
    """
    batch = windows_np.shape[0]
    windows = torch.from_numpy(windows_np).to(device)
    input_ids = windows[:, as_index(layout.source_index, device)].clone()
    input_ids[:, torch.from_numpy(np.array(layout.is_mask)).to(device)] = mask_token_id
    seq_len = layout.source_index.shape[0]
    position_ids = as_index(layout.position_ids, device).expand(batch, seq_len)
    allowed = (
        torch.from_numpy(np.array(layout.attention_mask))
        .to(device)[None, None]
        .expand(batch, 1, seq_len, seq_len)
    )
    slots = layout.predict_index.reshape(-1)
    if prefix_loss:
        slots = np.concatenate([slots, layout.real_slots])
    keep = np.unique(slots)
    predict_at = np.searchsorted(keep, layout.predict_index)
    prefix_at = np.searchsorted(keep, layout.real_slots) if prefix_loss else None
    return PackedBatch(
        layout=layout,
        windows=windows,
        weights=torch.from_numpy(np.ascontiguousarray(weights_np)).to(device),
        confidence=(
            torch.ones(windows.shape, dtype=torch.float32, device=device)
            if confidence_np is None
            else torch.from_numpy(np.ascontiguousarray(confidence_np)).to(device)
        ),
        input_ids=input_ids,
        position_ids=position_ids,
        allowed=allowed,
        keep=torch.from_numpy(keep).to(device),
        predict_at=torch.from_numpy(predict_at).to(device),
        prefix_at=None if prefix_at is None else torch.from_numpy(prefix_at).to(device),
        block_mask=flex_block_mask(allowed) if flex_attention else None,
    )


def _draw_layout(generator: np.random.Generator, cfg: DistillConfig) -> TrainingLayout:
    """Block size ``k ~ U[k_min, k_max]``, grid offset ``~ U[0, P - 1]`` and their layout."""
    k = int(generator.integers(cfg.k_min, cfg.k_max + 1))
    prefix_len = TrainingLayoutSpec(cfg.seq_len, k, cfg.regions).prefix_len
    offset = int(generator.integers(0, prefix_len))
    return training_layout(TrainingLayoutSpec(cfg.seq_len, k, cfg.regions, offset))


def draw_batch(
    generator: np.random.Generator,
    stream: TokenStream,
    cfg: DistillConfig,
    *,
    mask_token_id: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    flex_attention: bool = False,
) -> list[PackedBatch]:
    """The ``grad_accum`` micro-batches of one optimizer step, this process's slices packed.

    Every process draws the same layouts and global windows (same ``generator`` and stream
    position), so the processes together train on the global batch.

    Args:
      generator: draws the block sizes and offsets (advanced).
      stream: the token stream the windows come from (advanced).
      cfg: the run's settings (``k_max``, ``seq_len``, ``batch_size``, ``grad_accum`` ...).
      mask_token_id: id of ``<mtp_mask>``.
      device: where the packed tensors go.
      rank: this process's rank.
      world_size: number of processes; divides ``cfg.batch_size``.
      flex_attention: build each micro-batch's FlexAttention block mask too.

    Returns:
      One packed micro-batch of ``batch_size // world_size`` rows per micro-step.
    """
    local_batch = cfg.batch_size // world_size
    mine = slice(rank * local_batch, (rank + 1) * local_batch)
    micro_batches = []
    for _ in range(cfg.grad_accum):
        # 1. Block size, grid offset and layout; the same on every process.
        layout = _draw_layout(generator, cfg)
        # 2. The global batch of windows; this process packs its slice.
        windows, weights, confidence = stream.take_weighted(
            cfg.batch_size, layout.spec.window_len, row_aligned=cfg.row_windows
        )
        micro_batches.append(
            pack_windows(
                windows[mine],
                weights[mine],
                layout,
                mask_token_id,
                device,
                cfg.prefix_loss_weight > 0,
                confidence[mine],
                flex_attention,
            )
        )
    return micro_batches


def _attention_mask(model: nn.Module, packed: PackedBatch, dtype: torch.dtype) -> Any:
    """The ``(B, 1, S, S)`` attention mask in the form the model's attention implementation
    takes: boolean (SDPA), additive (eager) or a FlexAttention block mask."""
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    if implementation == "flex_attention":
        allowed = packed.allowed
        return packed.block_mask if packed.block_mask is not None else flex_block_mask(allowed)
    return _dense_mask(model, packed.allowed, dtype)


def _dense_mask(model: nn.Module, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A ``(B, 1, Q, K)`` boolean mask as SDPA (boolean) or eager attention (additive) takes it."""
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    if "flash" in implementation or implementation == "flex_attention":
        raise ValueError(
            f"attention implementation {implementation!r} cannot take the training layout's "
            "arbitrary mask here; load the model with attn_implementation='sdpa' (or 'eager')"
        )
    if implementation == "eager":
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return additive.masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def _takes_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(type(model).forward).parameters


def forward_logits(
    model: nn.Module, core: nn.Module, packed: PackedBatch, input_ids: torch.Tensor
) -> torch.Tensor:
    """Logits at the kept slots of a packed micro-batch.

    Args:
      model: the model as called (a DDP wrapper, or ``core`` itself).
      core: the model itself (its config and signature are read).
      packed: the micro-batch (layout, positions, attention mask, kept slots).
      input_ids: ``(B, S)`` the input to run (the packing's, or the teacher's forced one).

    Returns:
      Logits, shape ``(B, n_keep, vocab)``, in the model's (or autocast's) dtype.
    """
    dtype = next(core.parameters()).dtype
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": _attention_mask(core, packed, dtype),
        "position_ids": packed.position_ids,
        "use_cache": False,
    }
    if _takes_logits_to_keep(core):
        kwargs["logits_to_keep"] = packed.keep
        logits: torch.Tensor = model(**kwargs).logits
        return logits
    full: torch.Tensor = model(**kwargs).logits
    return full[:, packed.keep]


@attrs.frozen(eq=False)
class _Split:
    """How a packed layout splits into its real slots and its mask slots (``split_forward_logits``)."""

    real: torch.Tensor  # (R,) real slots, in slot order
    masks: torch.Tensor  # (Q,) mask slots, in slot order
    kv_order: torch.Tensor  # (R + Q,) the slots of the second pass's keys: real, then masks
    real_keep: torch.Tensor  # positions in ``real`` of the kept real slots
    mask_keep: torch.Tensor  # positions in ``masks`` of the kept mask slots
    order: torch.Tensor  # (n_keep,) kept slot j is column order[j] of [real logits, mask logits]


def _slot_ranks(layout: TrainingLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(real slots, mask slots, each slot's position among its kind), slots in order."""
    is_mask = np.asarray(layout.is_mask, dtype=bool)
    real, masks = np.flatnonzero(~is_mask), np.flatnonzero(is_mask)
    rank = np.empty(is_mask.shape[0], dtype=np.int64)
    rank[real], rank[masks] = np.arange(real.size), np.arange(masks.size)
    return real, masks, rank


def _split(packed: PackedBatch) -> _Split:
    keep = packed.keep.cpu().numpy()
    real, masks, rank = _slot_ranks(packed.layout)
    is_mask = np.asarray(packed.layout.is_mask, dtype=bool)
    kept_mask = is_mask[keep]
    order = np.empty(keep.size, dtype=np.int64)
    order[~kept_mask] = np.arange(int((~kept_mask).sum()))
    order[kept_mask] = int((~kept_mask).sum()) + np.arange(int(kept_mask.sum()))
    device = packed.keep.device
    return _Split(
        real=as_index(real, device),
        masks=as_index(masks, device),
        kv_order=as_index(np.concatenate([real, masks]), device),
        real_keep=as_index(rank[keep[~kept_mask]], device),
        mask_keep=as_index(rank[keep[kept_mask]], device),
        order=as_index(order, device),
    )


def _logits_at(
    model: nn.Module, core: nn.Module, keep: torch.Tensor, **kwargs: Any
) -> torch.Tensor:
    """The logits at positions ``keep`` of a forward of ``model``."""
    if _takes_logits_to_keep(core):
        logits: torch.Tensor = model(**kwargs, logits_to_keep=keep).logits
        return logits
    full: torch.Tensor = model(**kwargs).logits
    return full[:, keep]


def _new_cache(core: nn.Module) -> dict[str, DynamicCache]:
    """An empty key/value cache as the keyword ``core.forward`` takes it (``cache`` or
    ``past_key_values``): the real slots' pass fills it, the mask slots' pass reads it."""
    parameters = inspect.signature(type(core).forward).parameters
    return {"cache" if "cache" in parameters else "past_key_values": DynamicCache()}


def split_forward_supported(core: nn.Module) -> str | None:
    """Why ``split_forward_logits`` cannot run ``core``, or ``None`` when it can.

    It needs a dense attention mask (SDPA or eager attention), a key/value cache argument and
    attention layers only (a state-space or linear-attention layer's cache is not a list of keys
    and values).  Sliding-window layers are fine: the cache is built without the model's config,
    so it keeps every key, and the layout's mask decides what each slot sees, as in the packed
    pass.
    """
    config = getattr(core, "config", None)
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in ("sdpa", "eager"):
        return f"attention implementation {implementation!r} (needs sdpa or eager)"
    parameters = inspect.signature(type(core).forward).parameters
    if "cache" not in parameters and "past_key_values" not in parameters:
        return f"{type(core).__name__}.forward takes no key/value cache"
    text_config = config.get_text_config(decoder=True) if config is not None else None
    layer_types = set(getattr(text_config, "layer_types", None) or ())
    if layer_types - {"full_attention", "sliding_attention"}:
        return f"layer types {sorted(layer_types)} (needs attention layers only)"
    return None


def split_forward_logits(
    model: nn.Module, core: nn.Module, packed: PackedBatch, input_ids: torch.Tensor
) -> torch.Tensor:
    """``forward_logits`` in two passes, for a student whose trained parameters act only at
    mask slots (mask-gated adapters and the gate's mask vector).

    Real slots never attend to mask slots and no trained parameter touches them, so their
    hidden states, keys and values are the frozen base model's and carry no gradient.  The
    first pass runs the real slots alone without autograd (keeping their keys and values as
    a cache and their logits at the kept real slots); the second runs only the mask slots,
    with gradients, attending to the cache and to each other under the layout's mask.  The
    logits are those of the single packed pass (to rounding: the products have other shapes),
    and the backward pass runs over the ``M (k - 1)`` mask slots instead of all ``S``: only
    those of regions with a trained target in the batch (``_trained_masks``); the others'
    logits are returned as zeros, which the loss, the agreement and the acceptance estimate
    weigh 0.

    Args:
      model: the model as called for the pass with gradients (a DDP wrapper, or ``core``).
      core: the model itself (the first pass, its config and signature).
      packed: the micro-batch.
      input_ids: ``(B, S)`` its packed input.

    Returns:
      Logits, shape ``(B, n_keep, vocab)``, in the kept slots' order.
    """
    split = _split(packed)
    dtype = next(core.parameters()).dtype
    allowed, positions = packed.allowed, packed.position_ids
    run = _trained_masks(packed)
    cache_kwargs = _new_cache(core)
    with torch.no_grad():
        real_logits = _logits_at(
            core,
            core,
            split.real_keep,
            input_ids=input_ids[:, split.real],
            attention_mask=_dense_mask(core, allowed[:, :, split.real][:, :, :, split.real], dtype),
            position_ids=positions[:, split.real],
            use_cache=True,
            **cache_kwargs,
        )
    if run is None:  # every region trains somewhere in the batch: all mask slots
        masks, kv_order, keep = split.masks, split.kv_order, split.mask_keep
    else:
        masks = split.masks[run]
        kv_order = torch.cat([split.real, masks])
        keep = torch.arange(masks.numel(), device=masks.device)
    mask_logits = _logits_at(
        model,
        core,
        keep,
        input_ids=input_ids[:, masks],
        attention_mask=_dense_mask(core, allowed[:, :, masks][:, :, :, kv_order], dtype),
        position_ids=positions[:, masks],
        use_cache=True,
        **cache_kwargs,
    )
    if run is not None:
        # The left-out slots read zeros: their regions' targets all weigh 0 in the loss.
        every = mask_logits.new_zeros(
            (mask_logits.shape[0], split.masks.numel(), mask_logits.shape[-1])
        )
        mask_logits = every.index_copy(1, run, mask_logits)[:, split.mask_keep]
    return torch.cat([real_logits.to(mask_logits.dtype), mask_logits], dim=1)[:, split.order]


def _trained(packed: PackedBatch) -> torch.Tensor:
    """``(M,)``: whether a region has a target of weight > 0 in some row of the micro-batch."""
    weights = packed.weights[:, as_index(packed.layout.target_index, packed.weights.device)]
    return (weights > 0).any(dim=-1).any(dim=0)


def _trained_masks(packed: PackedBatch) -> torch.Tensor | None:
    """Positions among the mask slots (slot order) of those worth a pass, or ``None`` for all.

    A region none of whose ``k`` targets trains in any row of the micro-batch (all context:
    a prompt, or the next row's prompt after a short row) adds nothing to the loss, the
    agreement or the acceptance estimate, which all weigh targets; its masks attend only to
    real slots and to each other, and nothing attends to them.  So its mask slots can be left
    out of the pass with gradients: about a third of them with row-aligned windows over
    GSM8K-length rows (400 slots, prompts ~90 tokens).
    """
    layout = packed.layout
    trained = _trained(packed).cpu().numpy()  # (M,)
    if trained.all() or not trained.any():  # nothing to leave out, or nothing to train
        return None
    is_mask = np.asarray(layout.is_mask, dtype=bool)
    mask_rank = np.cumsum(is_mask) - 1  # a mask slot's position among the mask slots
    region_masks = mask_rank[np.asarray(layout.predict_index)[:, 1:]]  # (M, k - 1)
    return as_index(np.sort(region_masks[trained].ravel()), packed.weights.device)


def trained_regions(packed: PackedBatch) -> torch.Tensor | None:
    """The regions (ascending) with a target of weight > 0 in some row of the micro-batch, or
    ``None`` when there is none.  The others add nothing to the ``gt`` loss, the agreement or
    the acceptance estimate (``_trained_masks``)."""
    trained = _trained(packed)
    if not bool(trained.any()):
        return None
    return torch.nonzero(trained).flatten()


def split_region_logits(
    model: nn.Module,
    core: nn.Module,
    packed: PackedBatch,
    input_ids: torch.Tensor,
    regions: torch.Tensor,
) -> torch.Tensor:
    """``split_forward_logits`` at the prediction slots of ``regions`` alone, already in their
    ``(region, column)`` order: what the ``gt`` loss reads.

    The same two passes (real slots without autograd, then the mask slots of ``regions`` with
    gradients), but the output layer runs only at the regions' prediction slots and nothing
    else is built: no zeros for other regions, no gathers into kept-slot order and back (each a
    copy of a ``vocab``-wide tensor, and another in the backward pass).

    Args:
      model: the model as called for the pass with gradients (a DDP wrapper, or ``core``).
      core: the model itself (the first pass, its config and signature).
      packed: the micro-batch.
      input_ids: ``(B, S)`` its packed input.
      regions: ``(R,)`` ascending region indices (``trained_regions``).

    Returns:
      Logits, shape ``(B, R, k, vocab)``: column 0 at the region's last real slot, column ``j``
      at its ``j``-th mask.
    """
    layout = packed.layout
    device = packed.keep.device
    real, _, rank = _slot_ranks(layout)
    predict = np.asarray(layout.predict_index)[regions.cpu().numpy()]  # (R, k) slots
    run = np.sort(predict[:, 1:].ravel())  # the regions' mask slots, in slot order
    dtype = next(core.parameters()).dtype
    allowed, positions = packed.allowed, packed.position_ids
    real_index, run_index = as_index(real, device), as_index(run, device)
    cache_kwargs = _new_cache(core)
    with torch.no_grad():
        real_logits = _logits_at(
            core,
            core,
            as_index(rank[predict[:, 0]], device),
            input_ids=input_ids[:, real_index],
            attention_mask=_dense_mask(core, allowed[:, :, real_index][:, :, :, real_index], dtype),
            position_ids=positions[:, real_index],
            use_cache=True,
            **cache_kwargs,
        )
    kv_order = torch.cat([real_index, run_index])
    mask_logits = _logits_at(
        model,
        core,
        as_index(np.searchsorted(run, predict[:, 1:].ravel()), device),
        input_ids=input_ids[:, run_index],
        attention_mask=_dense_mask(core, allowed[:, :, run_index][:, :, :, kv_order], dtype),
        position_ids=positions[:, run_index],
        use_cache=True,
        **cache_kwargs,
    )
    batch, count = real_logits.shape[0], predict.shape[0]
    mask_logits = mask_logits.reshape(batch, count, predict.shape[1] - 1, -1)
    return torch.cat([real_logits.to(mask_logits.dtype)[:, :, None], mask_logits], dim=2)
