"""Online self-distillation: turn a causal LM into a multi-token predictor.

One training step (METHOD.md sections 2-3; Kirchenbauer et al., "Multi-Token Prediction via
Self-Distillation", arXiv 2602.06019, sections on the training layout and objective):

1. Draw the block size ``k ~ U[2, k_max]`` and the region-grid offset ``~ U[0, P - 1]``; build the
   packed layout (``mtp_core``: ``M`` regions of ``[prefix][k - 1 masks]`` in ``S`` slots).
2. Cut a batch of ground-truth windows from the token stream and pack them (mask slots get the
   ``<mtp_mask>`` id).
3. Student forward (with gradients) under the layout's 4-D boolean attention mask and position
   ids; read its logits at the ``(M, k)`` prediction slots.
4. Student forcing: write the student's argmax tokens into the mask slots of the teacher's input
   (mask ``j`` of a region gets the student's token ``j``).
5. Teacher forward (frozen copy of the initial model, no gradient) on that input with the same
   layout; read its logits at the same slots, so it scores the student's block by the chain rule.
6. Loss (hard teacher by default), backward, gradient accumulation, clipping, AdamW with linear
   warm-up then a constant learning rate.

The same loop runs under ``torchrun`` (DistributedDataParallel; gloo on CPU, NCCL on CUDA): every
rank draws the same ``k``, offset and global batch, and trains on its slice of it.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import attrs
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mtp_core._src.layout import (
    TrainingLayout,
    TrainingLayoutSpec,
    default_num_regions,
    training_layout,
)
from mtp_core._src.losses import LOSS_KINDS, LossKind, agreement, distillation_loss
from mtp_torch.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint_state,
    save_checkpoint,
)
from mtp_torch.training.data import Example, TokenStream

if TYPE_CHECKING:
    from mtp_torch.decoding.model import MTPModel

__all__ = [
    "DistillConfig",
    "StepMetrics",
    "cpu_bf16_is_fast",
    "cpu_preset",
    "distill",
    "find_blocks",
]

# Config fields that may change between a run and its resumption (they do not change the
# trajectory of the weights, only when and where it stops, saves and logs).
_RESUMABLE_FIELDS = frozenset(
    {
        "steps",
        "minutes",
        "out_dir",
        "resume",
        "checkpoint_every",
        "log_path",
        "log_every",
        "device",
        "progress",
    }
)


def _positive_int(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{attribute.name} must be an integer >= 1, got {value!r}")


def _optional_positive_int(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _positive_int(instance, attribute, value)


def _optional_non_negative_int(
    instance: object, attribute: attrs.Attribute[Any], value: Any
) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0
    ):
        raise ValueError(f"{attribute.name} must be None or an integer >= 0, got {value!r}")


def _non_negative_int(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{attribute.name} must be an integer >= 0, got {value!r}")


def _non_negative_float(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{attribute.name} must be a finite number >= 0, got {value!r}")


def _positive_float(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0.0):
        raise ValueError(f"{attribute.name} must be a finite number > 0, got {value!r}")


def _to_betas(value: Sequence[float]) -> tuple[float, float]:
    if len(value) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {value!r}")
    return (float(value[0]), float(value[1]))


@attrs.frozen
class DistillConfig:
    """Settings of one self-distillation run (defaults: the paper's, except length and warm-up).

    Attributes:
      k_max: largest block size; each step draws ``k ~ U[2, k_max]`` (paper: 16).
      loss: ``"hard"`` (CE against the teacher's argmax, the paper's default), ``"soft"``
        (forward KL to the teacher) or ``"gt"`` (CE against the ground-truth tokens; no teacher
        pass, so faster, and equivalent to "hard" on a corpus the teacher wrote greedily).
      steps: optimizer steps (the run also stops when ``minutes`` have passed).
      minutes: wall-clock budget in minutes, or ``None`` for none.
      lr: peak learning rate of AdamW (paper: 1e-5 at batch 128).
      mask_lr_multiplier: the mask token's embedding row moves this many times further per step
        than the other weights (its Adam update is scaled), since it starts from scratch.
      warmup_steps: linear warm-up from 0 to ``lr`` over this many steps, then constant.
      weight_decay: AdamW weight decay (paper: 0.1).
      betas: AdamW betas (paper: 0.9, 0.95).
      clip: gradient-norm clipping threshold, or ``None`` for none (paper: 1.0).
      batch_size: packed sequences per micro-step, over all processes together.
      grad_accum: micro-steps per optimizer step.
      seq_len: ``S``, packed slots per sequence (paper: 160).
      num_regions: ``M``, regions per sequence; ``None``: ``max(1, S // (2 k_max))`` (paper).
      prefix_loss_weight: weight of an extra next-token loss at every real (prefix) slot: the
        KL divergence to the teacher's logits there (which see exactly the student's tokens; 0
        until the student drifts), or the cross-entropy against the ground truth for ``"gt"``
        (cf. the paper's "Prefix Loss" ablation; 0 disables it).  It anchors the student's
        ordinary next-token predictions.
      entropy_weight: weight of a student entropy penalty (0 disables it).
      train_layers: train only the top ``N`` transformer blocks, the final norm and the mask
        token's embedding rows; ``0`` trains the mask token's rows alone (the real tokens'
        predictions then stay exactly the teacher's); ``None`` trains every weight (paper).
      train_mask_embedding: train the embedding matrices (with ``train_layers``: only the mask
        token's rows).  ``False`` keeps them at their initialisation, so that with
        ``train_layers`` the backward pass stops at the lowest trained block (much cheaper).
      row_windows: start every training window at a corpus row's first token (see
        ``TokenStream.take_weighted``): targets then see the full context they were written
        with, which a teacher-written corpus needs for its tokens to be the teacher's argmax;
        ``False`` cuts windows from the concatenated stream (the paper's packing).
      confident_targets: focus the mask offsets on what ConfAdapt can accept: offset ``j`` of a
        region keeps its full weight only where the teacher wrote the targets of offsets
        ``0 .. j`` each with top-1 probability ``>= confident_targets`` (a corpus from
        ``write_corpus`` records them); elsewhere it gets ``unconfident_weight``.  Offset 0
        (the ordinary next token) always keeps its weight.  ``None``: every target alike.
      unconfident_weight: weight of the mask targets outside a confident run (see above); above
        0 so the student still learns to be unsure there.
      lora_rank: ``> 0``: train LoRA adapters of this rank (``peft``) on every linear layer of
        the trained blocks (all blocks, or the top ``train_layers``) instead of their weights;
        the teacher is then the same model with its adapters disabled (no second copy), and
        the adapters are merged into plain weights when training ends.  ``0``: full
        fine-tuning (the paper).
      lora_alpha: LoRA scaling numerator (the update is ``alpha / rank * B A``); ``None``:
        ``lora_rank`` (a scale of 1).
      seed: seeds the block sizes, offsets, data order, mask init and dropout.
      out_dir: checkpoint directory, or ``None`` for no checkpoints.
      checkpoint_every: save every this many steps (a final checkpoint is always written when
        ``out_dir`` is set); ``None``: only at the end.
      resume: continue from the latest checkpoint in ``out_dir`` when there is one.
      log_path: JSON-lines metrics file (one object per step), or ``None``.
      log_every: write metrics every this many steps.
      device: torch device; ``None``: CUDA when available (this process's local rank under
        torchrun), else CPU.
      bf16: run forward passes under bfloat16 autocast (weights and optimizer stay float32).
        ``None``: on CUDA only.  ``True`` also on the CPU, where processors with AVX-512 BF16
        or AMX run bfloat16 matrix products 2-3x faster than float32.
      progress: show a tqdm progress bar (rank 0 only).
    """

    k_max: int = attrs.field(default=16)
    loss: LossKind = attrs.field(default="hard")
    steps: int = attrs.field(default=1000, validator=_positive_int)
    minutes: float | None = attrs.field(default=None)
    lr: float = attrs.field(default=1e-5, validator=_positive_float)
    mask_lr_multiplier: float = attrs.field(default=1.0, validator=_positive_float)
    warmup_steps: int = attrs.field(default=0)
    weight_decay: float = attrs.field(default=0.1, validator=_non_negative_float)
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.95), converter=_to_betas)
    clip: float | None = attrs.field(default=1.0)
    batch_size: int = attrs.field(default=8, validator=_positive_int)
    grad_accum: int = attrs.field(default=1, validator=_positive_int)
    seq_len: int = attrs.field(default=160, validator=_positive_int)
    num_regions: int | None = attrs.field(default=None, validator=_optional_positive_int)
    prefix_loss_weight: float = attrs.field(default=0.0, validator=_non_negative_float)
    entropy_weight: float = attrs.field(default=0.0, validator=_non_negative_float)
    train_layers: int | None = attrs.field(default=None, validator=_optional_non_negative_int)
    train_mask_embedding: bool = attrs.field(default=True)
    row_windows: bool = attrs.field(default=False)
    confident_targets: float | None = attrs.field(default=None)
    unconfident_weight: float = attrs.field(default=0.1, validator=_non_negative_float)
    lora_rank: int = attrs.field(default=0, validator=_non_negative_int)
    lora_alpha: float | None = attrs.field(default=None)
    seed: int = attrs.field(default=0, validator=_non_negative_int)
    out_dir: str | None = attrs.field(default=None)
    checkpoint_every: int | None = attrs.field(default=None, validator=_optional_positive_int)
    resume: bool = attrs.field(default=False)
    log_path: str | None = attrs.field(default=None)
    log_every: int = attrs.field(default=1, validator=_positive_int)
    device: str | None = attrs.field(default=None)

    @device.validator
    def _check_device(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None:
            return
        try:
            torch.device(value)
        except (RuntimeError, TypeError) as error:
            raise ValueError(
                f"device must be None or a torch device such as 'cpu', 'cuda' or 'cuda:1', got "
                f"{value!r}"
            ) from error

    bf16: bool | None = attrs.field(default=None)
    progress: bool = attrs.field(default=True)

    @k_max.validator
    def _check_k_max(self, attribute: attrs.Attribute[int], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 2:
            raise ValueError(
                f"k_max must be an integer >= 2 (k = 1 is plain next-token training), got {value!r}"
            )

    @loss.validator
    def _check_loss(self, attribute: attrs.Attribute[str], value: str) -> None:
        if value not in LOSS_KINDS:
            raise ValueError(f"loss must be one of {LOSS_KINDS}, got {value!r}")

    @minutes.validator
    def _check_minutes(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            _positive_float(self, attribute, value)

    @warmup_steps.validator
    def _check_warmup(self, attribute: attrs.Attribute[int], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {value!r}")

    @betas.validator
    def _check_betas(self, attribute: attrs.Attribute[Any], value: tuple[float, float]) -> None:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"betas must both lie in [0, 1), got {value}")

    @clip.validator
    def _check_clip(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            _positive_float(self, attribute, value)

    @confident_targets.validator
    def _check_confident_targets(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
        ):
            raise ValueError(
                f"confident_targets must be None or a probability in (0, 1], got {value!r}"
            )

    @lora_alpha.validator
    def _check_lora_alpha(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            _positive_float(self, attribute, value)

    def __attrs_post_init__(self) -> None:
        if self.train_layers == 0 and not self.train_mask_embedding:
            raise ValueError(
                "train_layers=0 with train_mask_embedding=False leaves nothing to train; train "
                "the mask embedding or at least one block"
            )
        # The largest block must fit a region: this raises the layout's "k_max larger than the
        # region" message early, before any model work.
        TrainingLayoutSpec(seq_len=self.seq_len, k=self.k_max, num_regions=self.regions)

    @property
    def regions(self) -> int:
        """``M``: the configured region count, or the paper's density ``max(1, S // (2 k_max))``."""
        if self.num_regions is not None:
            return int(self.num_regions)
        return default_num_regions(self.seq_len, self.k_max)

    @property
    def max_window_len(self) -> int:
        """Ground-truth tokens of the longest window any step needs (the one of ``k = 2``)."""
        return max(
            TrainingLayoutSpec(self.seq_len, k, self.regions).window_len
            for k in range(2, self.k_max + 1)
        )

    def to_json(self) -> dict[str, Any]:
        """The config as plain JSON values."""
        values = attrs.asdict(self)
        values["betas"] = list(self.betas)
        return values


def cpu_bf16_is_fast() -> bool:
    """Whether this CPU runs bfloat16 matrix products natively (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_preset(**overrides: Any) -> DistillConfig:
    """The conversion ``mtp convert`` runs by default: the most learning per CPU-second we found.

    Chosen by measurement on SmolLM2-135M-Instruct (2 CPU cores; docs/results.md has the
    curves), for a corpus the teacher wrote itself (``write_corpus``):

    - the paper's hard-teacher loss plus a KL anchor (weight 2) to the teacher at every real
      slot: without the anchor the student's own next-token predictions drift (``loss="gt"``
      alone ran 3x faster per step but its output's NLL under the base model rose 28% in 12
      minutes; with the anchor it stayed within 6% at 11 minutes);
    - ``row_windows``: each window starts at a row, so every target sees the context it was
      written with (cut windows agreed with the teacher only ~70% of the time at offset 0);
    - LoRA (rank 64, scale 1, lr 1e-3) on the top 8 blocks, embeddings frozen: backward stops
      at block 22, the teacher is the same weights with the adapters off, and the result ships
      as a 10 MB delta;
    - ``confident_targets``: mask offsets train fully only inside runs of confident teacher
      tokens, the only runs ConfAdapt can accept;
    - bfloat16 autocast where the CPU has native bf16 (2.6x float32 matmuls measured).

    Args:
      **overrides: any ``DistillConfig`` field, replacing the preset's value.

    Returns:
      The config.
    """
    preset: dict[str, Any] = {
        "k_max": 4,
        "loss": "hard",
        "steps": 1_000_000,
        "minutes": 10.0,
        "lr": 1e-3,
        "warmup_steps": 20,
        "weight_decay": 0.0,
        "batch_size": 2,
        "seq_len": 400,
        "num_regions": None,
        "train_layers": 8,
        "train_mask_embedding": False,
        "lora_rank": 64,
        "row_windows": True,
        "confident_targets": 0.6,
        "unconfident_weight": 0.2,
        "prefix_loss_weight": 2.0,
        "bf16": True if cpu_bf16_is_fast() else None,
        "checkpoint_every": 50,
    }
    preset.update(overrides)
    return DistillConfig(**preset)


@attrs.frozen
class StepMetrics:
    """What one optimizer step reports (also written as one JSON line).

    Attributes:
      step: optimizer steps completed, this one included.
      loss: mean training loss over the step's micro-steps (nats).
      ks: block size of each micro-step.
      agreement: per-offset rate at which the student's argmax equals the teacher's (or the
        ground truth's, for ``loss="gt"``), for the last micro-step; length ``k``.
      lr: learning rate used.
      grad_norm: gradient norm before clipping.
      supervised_tokens: prediction positions supervised in this step, all processes together.
      tokens_per_s: ``supervised_tokens`` per second of this step.
      elapsed_s: seconds since the run (or its resumption) started.
      epoch: passes over the token stream completed.
      accepted_at_0_9: tokens ConfAdapt(0.9, k) would keep per step on this step's training
        regions (teacher-forced; the student's own confidences, right or wrong): a cheap
        running estimate of tokens per forward.
    """

    step: int
    loss: float
    ks: list[int]
    agreement: list[float]
    lr: float
    grad_norm: float
    supervised_tokens: int
    tokens_per_s: float
    elapsed_s: float
    epoch: int
    accepted_at_0_9: float = 1.0


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a transformers model (``model.layers``, ``h`` ...).

    Args:
      model: a transformers causal LM.

    Returns:
      The ``nn.ModuleList`` holding ``config.num_hidden_layers`` blocks.

    Raises:
      ValueError: if no such list is found.
    """
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if num_layers is None or len(module) == num_layers:
                return module
    raise ValueError(
        "could not find the model's transformer blocks (an nn.ModuleList of "
        "config.num_hidden_layers modules); use train_layers=None to train every weight"
    )


def _check_causal_lm(model: Any) -> None:
    """Raise unless ``model`` is a decoder-only LM whose outputs never depend on later tokens."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            "distill needs a decoder-only causal LM (AutoModelForCausalLM), got "
            f"{type(model).__name__}"
        )
    vocab = int(model.get_input_embeddings().weight.shape[0])
    probe = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.long) % vocab
    changed = probe.clone()
    changed[0, -1] = (changed[0, -1] + 1) % vocab
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            first = model(input_ids=probe.to(device)).logits
            second = model(input_ids=changed.to(device)).logits
    except (AttributeError, TypeError) as error:
        raise ValueError(
            f"distill needs a causal LM that returns logits (AutoModelForCausalLM), got "
            f"{type(model).__name__}: {error}"
        ) from error
    finally:
        model.train(was_training)
    if not torch.allclose(first[:, :-1], second[:, :-1], rtol=1e-4, atol=1e-4):
        raise ValueError(
            f"{type(model).__name__} is not causal: changing the last token changed the logits of "
            "earlier positions; multi-token prediction needs a decoder-only causal LM "
            "(AutoModelForCausalLM)"
        )


def _distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); initialises the process group under torchrun."""
    if not dist.is_available():
        return 0, 1, 0
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_initialized():
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return dist.get_rank(), dist.get_world_size(), local_rank


def _resolve_device(cfg: DistillConfig, local_rank: int, world_size: int) -> torch.device:
    if cfg.device is not None:
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    return torch.device("cpu")


def _model_mask(model: nn.Module, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``(B, 1, S, S)`` attention mask in the form the model's attention implementation takes."""
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    if "flash" in implementation:
        raise ValueError(
            f"attention implementation {implementation!r} cannot take the training layout's "
            "arbitrary mask; load the model with attn_implementation='sdpa' (or 'eager')"
        )
    if implementation == "eager":
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return additive.masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


@attrs.frozen(eq=False)
class _Packed:
    """One micro-batch, packed and on the device."""

    layout: TrainingLayout
    windows: torch.Tensor  # (B, window_len) ground-truth token ids
    weights: torch.Tensor  # (B, window_len) 1 where a token is a training target, 0 for context
    confidence: torch.Tensor  # (B, window_len) the teacher's top-1 probability per token (or 1)
    input_ids: torch.Tensor  # (B, S)
    position_ids: torch.Tensor  # (B, S)
    allowed: torch.Tensor  # (B, 1, S, S) bool
    keep: torch.Tensor  # (n_keep,) slots whose logits are computed
    predict_at: torch.Tensor  # (M, k) indices into the kept slots
    prefix_at: torch.Tensor | None  # (G,) indices into the kept slots (prefix loss only)


def _index(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A (read-only) numpy index array as an int64 tensor on ``device``."""
    return torch.from_numpy(np.array(array, dtype=np.int64)).to(device)


def _pack(
    windows_np: np.ndarray,
    weights_np: np.ndarray,
    layout: TrainingLayout,
    mask_token_id: int,
    device: torch.device,
    prefix_loss: bool,
    confidence_np: np.ndarray | None = None,
) -> _Packed:
    batch = windows_np.shape[0]
    windows = torch.from_numpy(windows_np).to(device)
    input_ids = windows[:, _index(layout.source_index, device)].clone()
    input_ids[:, torch.from_numpy(np.array(layout.is_mask)).to(device)] = mask_token_id
    seq_len = layout.source_index.shape[0]
    position_ids = _index(layout.position_ids, device).expand(batch, seq_len)
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
    return _Packed(
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
    )


def _forward_logits(
    model: nn.Module, core: nn.Module, packed: _Packed, input_ids: torch.Tensor
) -> torch.Tensor:
    """Logits at the kept slots, shape ``(B, n_keep, vocab)``."""
    dtype = next(core.parameters()).dtype
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": _model_mask(core, packed.allowed, dtype),
        "position_ids": packed.position_ids,
        "use_cache": False,
    }
    if _takes_logits_to_keep(core):
        kwargs["logits_to_keep"] = packed.keep
        logits: torch.Tensor = model(**kwargs).logits
        return logits
    full: torch.Tensor = model(**kwargs).logits
    return full[:, packed.keep]


def _batch_loss(
    forward: nn.Module,
    student: nn.Module,
    teacher: nn.Module | None,
    packed: _Packed,
    cfg: DistillConfig,
    mask_token_id: int,
    autocast: contextlib.AbstractContextManager[Any],
    teacher_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Steps 3-6 of the loop for one packed micro-batch.

    Args:
      forward: the student as called (the DDP wrapper under torchrun, else ``student``).
      student: the student itself.
      teacher: the frozen teacher (``None`` for ``loss="gt"``, which runs none).
      packed: the packed micro-batch.
      cfg: the run's settings (loss kind and weights).
      mask_token_id: id of ``<mtp_mask>``.
      autocast: the autocast context (or a null context).
      teacher_context: entered around the teacher's forward (LoRA: the adapters disabled).

    Returns:
      ``(loss, student_logits, teacher_logits, targets, target_weights)``: the scalar loss
      (with gradient), the student's logits at the prediction slots ``(B, M, k, vocab)``
      (float32), the teacher's at the same slots under student forcing (``None`` for
      ``loss="gt"``), the ground-truth targets ``(B, M, k)`` and their weights (0 where the
      target is a context token).
    """
    layout = packed.layout
    device = packed.input_ids.device
    # 3. Student forward; logits at the (M, k) prediction slots.
    with autocast:
        kept = _forward_logits(forward, student, packed, packed.input_ids)
    kept = _at_least_float32(kept)
    student_logits = kept[:, packed.predict_at]  # (B, M, k, V)
    target_index = _index(layout.target_index, device)
    targets = packed.windows[:, target_index]
    target_weights = packed.weights[:, target_index]
    loss_weights = target_weights
    if cfg.confident_targets is not None:
        # Offset j counts fully only inside a run of confident teacher tokens 0..j.
        sure = (packed.confidence[:, target_index] >= cfg.confident_targets).float()
        run = torch.cumprod(sure, dim=-1)
        factor = run + (1.0 - run) * cfg.unconfident_weight
        factor[..., 0] = 1.0
        loss_weights = target_weights * factor
    teacher_logits = None
    teacher_kept = None
    if cfg.loss != "gt":
        assert teacher is not None
        # 4. Student forcing: mask j of each region <- the student's token j.
        proposal = student_logits.detach().clone()
        proposal[..., mask_token_id] = -math.inf
        draft = proposal.argmax(dim=-1)  # (B, M, k)
        forced = packed.input_ids.clone()
        mask_slots = _index(layout.predict_index[:, 1:].reshape(-1), device)
        forced[:, mask_slots] = draft[:, :, :-1].reshape(draft.shape[0], -1)
        # 5. Teacher forward, no gradient, same layout.
        with torch.no_grad(), autocast, teacher_context():
            teacher_kept = _forward_logits(teacher, teacher, packed, forced)
        teacher_logits = _match_vocab(
            _at_least_float32(teacher_kept)[:, packed.predict_at].to(student_logits.dtype),
            student_logits.shape[-1],
            mask_token_id,
        )
    # 6. The loss.
    loss = distillation_loss(
        student_logits,
        teacher_logits,
        kind=cfg.loss,
        targets=targets,
        weights=loss_weights,
        entropy_weight=cfg.entropy_weight,
    )
    if cfg.prefix_loss_weight > 0 and packed.prefix_at is not None:
        # Next-token loss at every real slot: KL to the teacher there (real slots never see a
        # mask, so these are its plain next-token logits; 0 while the student equals it), or
        # cross-entropy against the ground truth for loss="gt".
        next_index = _index(layout.source_index[layout.real_slots] + 1, device)
        prefix_targets = packed.windows[:, next_index][:, :, None]
        prefix_teacher = None
        if teacher_kept is not None:
            prefix_teacher = _match_vocab(
                _at_least_float32(teacher_kept)[:, packed.prefix_at].to(kept.dtype),
                kept.shape[-1],
                mask_token_id,
            )[:, :, None]
        loss = loss + cfg.prefix_loss_weight * distillation_loss(
            kept[:, packed.prefix_at][:, :, None],
            prefix_teacher,
            kind="gt" if prefix_teacher is None else "soft",
            targets=prefix_targets,
            weights=packed.weights[:, next_index][:, :, None],
        )
    return loss, student_logits, teacher_logits, targets, target_weights


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (autocast) as float32 for the loss; wider ones unchanged."""
    return logits.float() if torch.finfo(logits.dtype).bits < 32 else logits


def _takes_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(type(model).forward).parameters


def _trainable_parameters(
    student: Any, train_layers: int | None, mask_token_id: int, train_embeddings: bool = True
) -> tuple[list[nn.Parameter], list[nn.Parameter], list[torch.utils.hooks.RemovableHandle]]:
    """Set ``requires_grad`` and return (main params, embedding params, gradient hooks).

    With ``train_layers``, the embedding matrices stay trainable but their gradient is zeroed
    except at the mask token's row, and they get no weight decay, so every other row stays put.
    With ``train_embeddings=False`` the embedding matrices are frozen altogether.
    """
    embeddings: list[nn.Parameter] = [student.get_input_embeddings().weight]
    output = student.get_output_embeddings()
    if output is not None and output.weight is not embeddings[0]:
        embeddings.append(output.weight)
    embedding_ids = {id(p) for p in embeddings}
    if not train_embeddings:
        embeddings = []
    if train_layers is None:
        main = [p for p in student.parameters() if id(p) not in embedding_ids]
        for parameter in student.parameters():
            parameter.requires_grad_(id(parameter) not in embedding_ids or train_embeddings)
        return main, embeddings, []
    blocks = find_blocks(student)
    if train_layers > len(blocks):
        raise ValueError(
            f"train_layers={train_layers} but the model has {len(blocks)} blocks; use at most "
            f"{len(blocks)} (or None to train every weight)"
        )
    in_blocks = {id(p) for p in blocks.parameters()}
    in_other_embeddings = {
        id(p) for m in student.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    upper = list(blocks)[len(blocks) - train_layers :] if train_layers > 0 else []
    trained = {id(p) for block in upper for p in block.parameters()}
    for parameter in student.parameters():
        outside = id(parameter) not in in_blocks and id(parameter) not in in_other_embeddings
        if train_layers > 0 and outside and id(parameter) not in embedding_ids:
            trained.add(id(parameter))  # final norm and the like
    main = []
    for parameter in student.parameters():
        wanted = id(parameter) in trained and id(parameter) not in embedding_ids
        parameter.requires_grad_(wanted or (train_embeddings and id(parameter) in embedding_ids))
        if wanted:
            main.append(parameter)
    hooks = []
    for weight in embeddings:
        row_mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        row_mask[mask_token_id] = 1.0
        hooks.append(weight.register_hook(lambda grad, rows=row_mask: grad * rows))  # type: ignore[no-untyped-call]
    return main, embeddings, hooks


def _drop_gradients(model: nn.Module) -> None:
    """Forget every gradient of ``model`` (a resized vocabulary must not meet a stale one)."""
    for parameter in model.parameters():
        parameter.grad = None


def _with_lora(student: nn.Module, cfg: DistillConfig) -> Any:
    """Wrap ``student`` in LoRA adapters (``peft``) on the linear layers of the trained blocks."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ValueError(
            "lora_rank > 0 needs the 'peft' package: pip install peft (or use lora_rank=0 for "
            "full fine-tuning)"
        ) from error
    blocks = find_blocks(student)
    layers = None
    if cfg.train_layers is not None:
        if not 0 < cfg.train_layers <= len(blocks):
            raise ValueError(
                f"with lora_rank > 0, train_layers must be in [1, {len(blocks)}] (the blocks that "
                f"get adapters) or None for all, got {cfg.train_layers}"
            )
        layers = list(range(len(blocks) - cfg.train_layers, len(blocks)))
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in blocks.named_modules()
        if isinstance(module, nn.Linear)
    }
    if not names:
        raise ValueError(
            f"{type(student).__name__} has no nn.Linear layers in its blocks for LoRA "
            "(GPT-2's Conv1D is not supported); use lora_rank=0"
        )
    config = LoraConfig(
        r=int(cfg.lora_rank),
        lora_alpha=cast(Any, cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank),
        lora_dropout=0.0,
        target_modules=sorted(names),
        layers_to_transform=layers,
        bias="none",
    )
    torch.manual_seed(cfg.seed)  # the adapters' initialisation
    return get_peft_model(student, config)


def _lora_parameters(
    student: Any, mask_token_id: int, train_embeddings: bool
) -> tuple[list[nn.Parameter], list[nn.Parameter], list[torch.utils.hooks.RemovableHandle]]:
    """(adapter params, mask-row embedding params, gradient hooks) of a LoRA student."""
    main = [p for name, p in student.named_parameters() if "lora_" in name]
    for parameter in main:
        parameter.requires_grad_(True)
    embeddings: list[nn.Parameter] = []
    hooks = []
    if train_embeddings:
        base = student.get_base_model()
        embeddings = [base.get_input_embeddings().weight]
        output = base.get_output_embeddings()
        if output is not None and output.weight is not embeddings[0]:
            embeddings.append(output.weight)
        for weight in embeddings:
            weight.requires_grad_(True)
            row_mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
            row_mask[mask_token_id] = 1.0
            hooks.append(weight.register_hook(lambda grad, rows=row_mask: grad * rows))  # type: ignore[no-untyped-call]
    return main, embeddings, hooks


def _write_back_mask_rows(
    embeddings: Sequence[nn.Parameter],
    before: Sequence[torch.Tensor],
    mask_token_id: int,
    factor: float,
) -> None:
    """Scale this step's update of the mask token's rows by ``factor``."""
    with torch.no_grad():
        for weight, old in zip(embeddings, before, strict=True):
            new = weight[mask_token_id]
            weight[mask_token_id] = old + factor * (new - old)


def _resume_check(saved: dict[str, Any], cfg: DistillConfig) -> None:
    current = cfg.to_json()
    differing = sorted(
        name
        for name, value in current.items()
        if name not in _RESUMABLE_FIELDS and saved.get(name) != value
    )
    if differing:
        raise ValueError(
            f"cannot resume: the checkpoint was written with other settings for {differing}; "
            "use the same settings (only steps, minutes, logging and device may change) or a "
            "new out_dir"
        )


def distill(
    model: Any,
    sequences: Iterable[Sequence[int] | Example],
    cfg: DistillConfig | None = None,
    tokenizer: Any = None,
    *,
    on_step: Callable[[StepMetrics], None] | None = None,
) -> MTPModel:
    """Fine-tune ``model`` in place into a multi-token predictor by online self-distillation.

    The teacher is a frozen deep copy of ``model`` as passed; the student is ``model`` itself,
    given the ``<mtp_mask>`` token (``mtp_torch.add_mask_token``) and trained with the packed
    layout and student forcing described in the module docstring.  To resume a run, pass the
    same original model, corpus and config with ``resume=True``: the teacher is rebuilt from the
    model, the student's weights, the optimizer, the RNG states and the data position come
    from the checkpoint, and the result equals that of an uninterrupted run.

    Args:
      model: a transformers decoder-only causal LM (with ``attn_implementation`` "sdpa" or
        "eager").  Trained in place.
      sequences: the corpus, lists of token ids (see ``load_corpus`` / ``write_corpus``);
        concatenated into one stream that must hold at least one training window.
      cfg: the run's settings; ``None``: ``DistillConfig()``.
      tokenizer: the model's tokenizer (gets the mask token; kept on the returned model).
      on_step: called with each step's metrics (on every process).

    Returns:
      The trained student wrapped as an ``MTPModel`` (in eval mode), mask token id set.

    Raises:
      ValueError: for a model that is not a causal LM, an empty or too short corpus, a
        ``k_max`` that does not fit a region, or a checkpoint written with other settings.
    """
    from mtp_torch.decoding.mask import add_mask_token
    from mtp_torch.decoding.model import MTPModel

    cfg = DistillConfig() if cfg is None else cfg
    rank, world_size, local_rank = _distributed()
    if cfg.batch_size % world_size != 0:
        raise ValueError(
            f"batch_size={cfg.batch_size} must be divisible by the number of processes "
            f"({world_size}); it is the global batch"
        )
    device = _resolve_device(cfg, local_rank, world_size)
    _check_causal_lm(model)
    stream = TokenStream.from_sequences(sequences, seed=cfg.seed)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    if int(stream.tokens.max()) >= vocab:
        raise ValueError(
            f"the corpus holds token id {int(stream.tokens.max())} but the model's vocabulary has "
            f"{vocab} ids; tokenize the corpus with this model's tokenizer"
        )
    if len(stream) < cfg.max_window_len:
        raise ValueError(
            f"the corpus holds {len(stream)} tokens but one training window needs "
            f"{cfg.max_window_len} (seq_len={cfg.seq_len}, {cfg.regions} regions); pass more or "
            "longer sequences, or a smaller seq_len"
        )

    # 0. Teacher: a frozen copy of the model as passed (none for "gt"; with LoRA the student
    #    with its adapters disabled).  Student: the model, with a mask token.
    teacher: nn.Module | None = None
    if cfg.loss != "gt" and cfg.lora_rank == 0:
        teacher = copy.deepcopy(model).to(device).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
            parameter.grad = None
    _drop_gradients(model)  # stale gradients would not match a resized vocabulary
    mask_token_id = int(add_mask_token(model, tokenizer, seed=cfg.seed))
    student = model.to(device)
    student.train()
    teacher_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    if cfg.lora_rank > 0:
        student = _with_lora(student, cfg)
        if cfg.loss != "gt":
            teacher, teacher_context = student, student.disable_adapter
        main_params, embeddings, hooks = _lora_parameters(
            student, mask_token_id, cfg.train_mask_embedding
        )
    else:
        main_params, embeddings, hooks = _trainable_parameters(
            student, cfg.train_layers, mask_token_id, cfg.train_mask_embedding
        )
    groups: list[dict[str, Any]] = []
    if main_params:
        groups.append({"params": main_params, "weight_decay": cfg.weight_decay})
    if embeddings:
        groups.append(
            {
                "params": embeddings,
                # Only full fine-tuning decays the embeddings; otherwise just the mask rows move.
                "weight_decay": (
                    cfg.weight_decay if cfg.train_layers is None and cfg.lora_rank == 0 else 0.0
                ),
            }
        )
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    trainable = [p for group in groups for p in group["params"]]

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    generator = np.random.default_rng(cfg.seed)
    step = 0
    if cfg.resume and cfg.out_dir is not None:
        found = latest_checkpoint(cfg.out_dir)
        if found is not None:
            _resume_check(read_checkpoint_state(found)["config"], cfg)
            state = load_checkpoint(found, model=student, optimizer=optimizer, generator=generator)
            stream.load_state_dict(state["data"])
            step = int(state["step"])
    if cfg.log_path is not None and rank == 0:
        _drop_logged_steps_after(Path(cfg.log_path), step)

    ddp_model: Any = student
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if (cfg.bf16 is None and device.type == "cuda") or cfg.bf16
        else contextlib.nullcontext()
    )
    local_batch = cfg.batch_size // world_size
    num_regions = cfg.regions
    log_handle = None
    if cfg.log_path is not None and rank == 0:
        Path(cfg.log_path).parent.mkdir(parents=True, exist_ok=True)
        log_handle = open(cfg.log_path, "a", encoding="utf-8")

    from tqdm.auto import tqdm

    # Under a wall-clock budget the step count is only a cap: show steps without a made-up ETA.
    bar_total = None if cfg.minutes is not None else cfg.steps
    bar = tqdm(total=bar_total, initial=step, disable=not cfg.progress or rank != 0, desc="distill")
    started = time.perf_counter()
    try:
        while step < cfg.steps:
            step_started = time.perf_counter()
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses: list[float] = []
            ks: list[int] = []
            supervised = 0
            last_agreement: list[float] = []
            accepts: list[float] = []
            for micro in range(cfg.grad_accum):
                # 1. Block size, grid offset and layout; the same on every process.
                k = int(generator.integers(2, cfg.k_max + 1))
                prefix_len = TrainingLayoutSpec(cfg.seq_len, k, num_regions).prefix_len
                offset = int(generator.integers(0, prefix_len))
                layout = training_layout(TrainingLayoutSpec(cfg.seq_len, k, num_regions, offset))
                # 2. The global batch of windows; this process packs its slice.
                windows, weights, confidence = stream.take_weighted(
                    cfg.batch_size, layout.spec.window_len, row_aligned=cfg.row_windows
                )
                mine = slice(rank * local_batch, (rank + 1) * local_batch)
                packed = _pack(
                    windows[mine],
                    weights[mine],
                    layout,
                    mask_token_id,
                    device,
                    cfg.prefix_loss_weight > 0,
                    confidence[mine],
                )
                sync = (
                    ddp_model.no_sync()
                    if world_size > 1 and micro < cfg.grad_accum - 1
                    else contextlib.nullcontext()
                )
                with sync:
                    loss, student_logits, teacher_logits, targets, target_weights = _batch_loss(
                        ddp_model,
                        student,
                        teacher,
                        packed,
                        cfg,
                        mask_token_id,
                        autocast,
                        teacher_context,
                    )
                    _check_finite("loss", float(loss.detach()), step, cfg)
                    (loss / cfg.grad_accum).backward()  # type: ignore[no-untyped-call]
                losses.append(float(loss.detach()))
                ks.append(k)
                supervised += cfg.batch_size * num_regions * k
                with torch.no_grad():
                    if teacher_logits is not None:
                        rates = agreement(student_logits.detach(), teacher_logits, target_weights)
                    else:
                        hits = (student_logits.detach().argmax(-1) == targets).float()
                        hits = (hits * target_weights).reshape(-1, k).sum(0)
                        rates = hits / target_weights.reshape(-1, k).sum(0).clamp_min(1.0)
                    last_agreement = [float(v) for v in rates]
                    accepts.append(_confident_run(student_logits.detach(), target_weights))
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(trainable, cfg.clip)
                if cfg.clip is not None
                else torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for p in trainable if p.grad is not None])
                )
            )
            _check_finite("gradient norm", float(grad_norm), step, cfg)
            before = [w[mask_token_id].detach().clone() for w in embeddings]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cfg.mask_lr_multiplier != 1.0:
                _write_back_mask_rows(embeddings, before, mask_token_id, cfg.mask_lr_multiplier)
            step += 1

            now = time.perf_counter()
            metrics = StepMetrics(
                step=step,
                loss=float(np.mean(losses)),
                ks=ks,
                agreement=last_agreement,
                lr=lr,
                grad_norm=float(grad_norm),
                supervised_tokens=supervised,
                tokens_per_s=supervised / max(now - step_started, 1e-9),
                elapsed_s=now - started,
                epoch=stream.epoch,
                accepted_at_0_9=float(np.mean(accepts)) if accepts else 1.0,
            )
            if log_handle is not None and step % cfg.log_every == 0:
                log_handle.write(json.dumps(attrs.asdict(metrics)) + "\n")
                log_handle.flush()
            if on_step is not None:
                on_step(metrics)
            bar.update(1)
            bar.set_postfix(
                loss=f"{metrics.loss:.3f}", agree=f"{np.mean(last_agreement):.2f}", k=ks[-1]
            )
            if (
                cfg.out_dir is not None
                and cfg.checkpoint_every is not None
                and step % cfg.checkpoint_every == 0
                and step < cfg.steps
            ):
                _save(cfg, rank, world_size, step, student, optimizer, generator, stream)
            if cfg.minutes is not None and _time_is_up(started, cfg.minutes, world_size, device):
                break
        if cfg.out_dir is not None:
            _save(cfg, rank, world_size, step, student, optimizer, generator, stream)
    finally:
        bar.close()
        for hook in hooks:
            hook.remove()
        if log_handle is not None:
            log_handle.close()
    delta = None
    if cfg.lora_rank > 0:
        # The adapters as a compact low-rank delta, then merged into plain weights.
        from mtp_torch.weights.delta import lora_delta

        delta = lora_delta(student, mask_token_id)
        student = student.merge_and_unload()
    student.eval()
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    del teacher
    mtp = MTPModel(student, mask_token_id=mask_token_id, tokenizer=tokenizer)
    mtp.delta = delta
    return mtp


def _drop_logged_steps_after(path: Path, step: int) -> None:
    """Forget metrics of steps after ``step`` (rolled back by a resume), rewriting atomically."""
    if not path.is_file():
        return
    kept: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            logged = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill
        if logged <= step:
            kept.append(line)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(temporary, path)


def _check_finite(what: str, value: float, step: int, cfg: DistillConfig) -> None:
    """Stop the run, weights untouched, at the first non-finite loss or gradient."""
    if math.isfinite(value):
        return
    where = (
        f"; the last good checkpoint stays in {cfg.out_dir} (resume from it with a lower lr)"
        if cfg.out_dir is not None
        else ""
    )
    raise ValueError(
        f"training diverged at step {step + 1}: the {what} is {value}; no update was applied. "
        f"Lower lr (now {cfg.lr:g}), keep clip on (now {cfg.clip}) or train in float32{where}"
    )


def _confident_run(student_logits: torch.Tensor, target_weights: torch.Tensor) -> float:
    """Mean tokens ConfAdapt(0.9) keeps per region, over regions whose first target is trained."""
    confident = torch.softmax(student_logits.float(), dim=-1).amax(dim=-1) >= 0.9
    kept = torch.cumprod(confident.long(), dim=-1).sum(dim=-1).clamp_min(1).float()
    counted = target_weights[..., 0] > 0
    return float(kept[counted].mean()) if bool(counted.any()) else 1.0


def _match_vocab(teacher_logits: torch.Tensor, vocab: int, mask_token_id: int) -> torch.Tensor:
    """Teacher logits widened to the student's vocabulary; the mask token gets ~zero probability."""
    floor = torch.finfo(teacher_logits.dtype).min / 4
    if teacher_logits.shape[-1] < vocab:
        pad = teacher_logits.new_full(
            (*teacher_logits.shape[:-1], vocab - teacher_logits.shape[-1]), floor
        )
        teacher_logits = torch.cat([teacher_logits, pad], dim=-1)
    elif teacher_logits.shape[-1] > vocab:
        teacher_logits = teacher_logits[..., :vocab]
    teacher_logits[..., mask_token_id] = floor
    return teacher_logits


def _time_is_up(started: float, minutes: float, world_size: int, device: torch.device) -> bool:
    done = time.perf_counter() - started >= minutes * 60.0
    if world_size > 1:
        flag = torch.tensor([1.0 if done else 0.0], device=device)
        dist.broadcast(flag, src=0)
        done = bool(flag.item() > 0)
    return done


def _save(
    cfg: DistillConfig,
    rank: int,
    world_size: int,
    step: int,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: np.random.Generator,
    stream: TokenStream,
) -> None:
    if rank == 0 and cfg.out_dir is not None:
        save_checkpoint(
            cfg.out_dir,
            step=step,
            model=student,
            optimizer=optimizer,
            generator=generator,
            data_state=stream.state_dict(),
            config=cfg.to_json(),
        )
    if world_size > 1:
        dist.barrier()
