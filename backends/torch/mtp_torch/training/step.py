"""One optimizer step of online self-distillation, as an init / update pair.

``init_train_state`` (``mtp_torch.training.state``) builds everything a step reads and changes
(teacher, student, optimizer, random generator) and ``train_step(state, batch)`` returns the
next state and the step's metrics.  One step (docs/method.md sections 2-4; Kirchenbauer et al., "Multi-Token Prediction via
Self-Distillation", arXiv 2602.06019, sections on the training layout and objective):

1. Draw the block size ``k ~ U[k_min, k_max]`` and the region-grid offset ``~ U[0, P - 1]``; build the
   packed layout (``mtp_core``: ``M`` regions of ``[prefix][k - 1 masks]`` in ``S`` slots).
2. Cut a batch of ground-truth windows from the token stream and pack them (mask slots get the
   ``<mtp_mask>`` id).  Steps 1-2 are ``mtp_torch.training.batch.draw_batch``.
3. Student forward (with gradients) under the layout's 4-D boolean attention mask (or the same
   mask as a FlexAttention block mask) and position ids; read its logits at the ``(M, k)``
   prediction slots.  A mask-gated student runs it as two passes, the real slots without
   autograd and then the mask slots alone (``split_forward_logits``); with the ``gt`` loss,
   at the regions with a trained target only (``split_region_logits``).
4. Student forcing: write the student's argmax tokens into the mask slots of the teacher's input
   where ``mtp_core.student_forcing_pairs`` says (mask ``j`` of a region gets the token the
   student read at column ``j - 1`` of it).
5. Teacher forward (frozen copy of the initial model, no gradient) on that input with the same
   layout; read its logits at the same slots, so it scores the student's block by the chain rule.
6. Loss (hard teacher by default), plus the anchor at the real slots when
   ``prefix_loss_weight > 0`` (of kind ``DistillConfig.anchor_kind``), backward, gradient
   accumulation, clipping, AdamW with linear warm-up then a constant learning rate.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import torch
from torch import nn

from mtp_core import ConfAdapt, LossKind, agreement, distillation_loss, student_forcing_pairs
from mtp_torch.training.batch import (
    PackedBatch,
    as_index,
    forward_logits,
    split_forward_logits,
    split_region_logits,
    trained_regions,
)
from mtp_torch.training.config import DistillConfig
from mtp_torch.training.distributed import gradient_sync
from mtp_torch.training.state import ContextFactory
from mtp_torch.training.state import TrainState as TrainState
from mtp_torch.training.state import init_train_state as init_train_state

__all__ = [
    "StepMetrics",
    "StepStats",
    "TrainState",
    "init_train_state",
    "learning_rate",
    "train_step",
]

# TrainState and init_train_state live in mtp_torch.training.state; they stay importable here.

# The ConfAdapt threshold of the running acceptance estimate (``StepStats.accepted_at_0_9``):
# the paper's default threshold (``mtp_core.ConfAdapt``'s default too).  The metric's name says
# 0.9 and is in every training log, so a change here needs a new name.
ESTIMATE_THRESHOLD = 0.9


@attrs.frozen
class StepStats:
    """What ``train_step`` measures about one optimizer step.

    Attributes:
      loss: mean training loss over the step's micro-steps (nats).
      ks: block size of each micro-step.
      agreement: per-offset rate at which the student's argmax equals the teacher's (or the
        ground truth's, for ``loss="gt"``), for the last micro-step; length ``k``.
      lr: learning rate used.
      grad_norm: gradient norm before clipping.
      supervised_tokens: prediction positions of this step's layouts, all processes together
        (batch x regions x k per micro-step: offset 0 and targets of weight 0 included; with
        row-aligned windows over prompts and replies about half of them train a mask slot).
      accepted_at_0_9: tokens ConfAdapt(0.9, k) would keep per step on this step's training
        regions (teacher-forced; the student's own confidences, right or wrong).
    """

    loss: float
    ks: list[int]
    agreement: list[float]
    lr: float
    grad_norm: float
    supervised_tokens: int
    accepted_at_0_9: float


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
      supervised_tokens: prediction positions of this step's layouts, all processes together
        (batch x regions x k per micro-step: offset 0 and targets of weight 0 included; with
        row-aligned windows over prompts and replies about half of them train a mask slot).
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


def learning_rate(cfg: DistillConfig, step: int) -> float:
    """The learning rate of step ``step + 1``: linear warm-up to ``cfg.lr``, constant, then
    (with ``cfg.lr_decay_steps``) a linear decay over the last steps: ``lr / D`` at the last."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    decay = 1.0
    if cfg.lr_decay_steps:
        decay = min(1.0, max(cfg.steps - step, 1) / cfg.lr_decay_steps)
    return cfg.lr * min(warm, decay)


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (autocast) as float32 for the loss; wider ones unchanged."""
    return logits.float() if torch.finfo(logits.dtype).bits < 32 else logits


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


def _teacher_at(
    teacher_kept: torch.Tensor, at: torch.Tensor, like: torch.Tensor, mask_token_id: int
) -> torch.Tensor:
    """The teacher's logits at kept-slot indices ``at``, in ``like``'s dtype and vocabulary."""
    return _match_vocab(
        _at_least_float32(teacher_kept)[:, at].to(like.dtype), like.shape[-1], mask_token_id
    )


def _loss_weights(
    packed: PackedBatch,
    target_index: torch.Tensor,
    target_weights: torch.Tensor,
    cfg: DistillConfig,
) -> torch.Tensor:
    """Target weights, with offset ``j`` down-weighted outside runs of confident targets."""
    if cfg.confident_targets is None:
        return target_weights
    # Offset j counts fully only inside a run of confident teacher tokens 0..j.
    sure = (packed.confidence[:, target_index] >= cfg.confident_targets).float()
    run = torch.cumprod(sure, dim=-1)
    factor = run + (1.0 - run) * cfg.unconfident_weight
    factor[..., 0] = 1.0
    return target_weights * factor


def _forced_teacher_input(
    packed: PackedBatch, student_logits: torch.Tensor, mask_token_id: int
) -> torch.Tensor:
    """Step 4, student forcing: the student's argmax tokens (never the mask token) written into
    the teacher's input where the core's ``student_forcing_pairs`` says (mask ``j`` of each
    region <- the token the student read at column ``j - 1`` of that region)."""
    proposal = student_logits.detach().clone()
    proposal[..., mask_token_id] = -math.inf
    draft = proposal.argmax(dim=-1)  # (B, M, k)
    dst_slots, src_reads = student_forcing_pairs(packed.layout)
    forced = packed.input_ids.clone()
    dst = as_index(dst_slots.reshape(-1), forced.device)
    src = as_index(src_reads.reshape(-1), forced.device)
    forced[:, dst] = draft.reshape(draft.shape[0], -1)[:, src]
    return forced


def _prefix_loss(
    kept: torch.Tensor,
    teacher_kept: torch.Tensor | None,
    packed: PackedBatch,
    mask_token_id: int,
    kind: LossKind,
) -> torch.Tensor:
    """The anchor: a next-token loss of ``kind`` at every real slot (``DistillConfig.anchor_kind``):
    against the teacher's logits there (real slots never see a mask, so these are its plain
    next-token logits; ``"soft"`` is 0 while the student equals it), or the ground truth."""
    assert packed.prefix_at is not None
    layout = packed.layout
    next_index = as_index(layout.source_index[layout.real_slots] + 1, kept.device)
    prefix_teacher = None
    if kind != "gt":
        assert teacher_kept is not None, "a teacher anchor needs the teacher's pass"
        prefix_teacher = _teacher_at(teacher_kept, packed.prefix_at, kept, mask_token_id)
        prefix_teacher = prefix_teacher[:, :, None]
    return distillation_loss(
        kept[:, packed.prefix_at][:, :, None],
        prefix_teacher,
        kind=kind,
        targets=packed.windows[:, next_index][:, :, None],
        weights=packed.weights[:, next_index][:, :, None],
    )


@attrs.frozen
class BatchLoss:
    """What ``_batch_loss`` computes for one packed micro-batch.

    Attributes:
      loss: the scalar loss (with gradient).
      student_logits: the student's logits at the prediction slots ``(B, M, k, vocab)``
        (float32); a split ``gt`` step's cover only the regions with a trained target,
        ``(B, R, k, vocab)``, and ``targets`` and ``target_weights`` those same regions.
      teacher_logits: the teacher's at the same slots under student forcing (``None`` for
        ``loss="gt"``, which runs no teacher).
      targets: the ground-truth targets ``(B, M, k)``.
      target_weights: their weights ``(B, M, k)`` (0 where the target is a context token).
    """

    loss: torch.Tensor
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None
    targets: torch.Tensor
    target_weights: torch.Tensor


def _batch_loss(
    forward: nn.Module,
    student: nn.Module,
    teacher: nn.Module | None,
    packed: PackedBatch,
    cfg: DistillConfig,
    mask_token_id: int,
    autocast: contextlib.AbstractContextManager[Any],
    teacher_context: ContextFactory = contextlib.nullcontext,
    split: bool = False,
) -> BatchLoss:
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
      split: run the student as two passes, real slots then mask slots
        (``split_forward_logits``; gated students only).

    Returns:
      the loss with the logits, targets and weights it was computed from (``BatchLoss``).
    """
    prefix = cfg.prefix_loss_weight > 0 and packed.prefix_at is not None
    if split and not cfg.needs_teacher and not prefix and _REGION_LOGITS:
        regions = trained_regions(packed)
        if regions is not None:
            return _trained_region_loss(forward, student, packed, cfg, autocast, regions)
    # 3. Student forward; logits at the (M, k) prediction slots.
    student_logits_at = split_forward_logits if split else forward_logits
    with autocast:
        kept = student_logits_at(forward, student, packed, packed.input_ids)
    kept = _at_least_float32(kept)
    student_logits = kept[:, packed.predict_at]  # (B, M, k, V)
    target_index = as_index(packed.layout.target_index, kept.device)
    targets = packed.windows[:, target_index]
    target_weights = packed.weights[:, target_index]
    teacher_logits = teacher_kept = None
    if cfg.needs_teacher:
        assert teacher is not None
        # 4-5. Student forcing, then the teacher's forward (no gradient, same layout).
        forced = _forced_teacher_input(packed, student_logits, mask_token_id)
        with torch.no_grad(), autocast, teacher_context():
            teacher_kept = forward_logits(teacher, teacher, packed, forced)
        if cfg.loss_reads_teacher:
            teacher_logits = _teacher_at(
                teacher_kept, packed.predict_at, student_logits, mask_token_id
            )
    # 6. The loss.
    loss = distillation_loss(
        student_logits,
        teacher_logits,
        kind=cfg.loss,
        targets=targets,
        weights=_loss_weights(packed, target_index, target_weights, cfg),
        entropy_weight=cfg.entropy_weight,
    )
    if prefix:
        loss = loss + cfg.prefix_loss_weight * _prefix_loss(
            kept, teacher_kept, packed, mask_token_id, cfg.anchor_kind
        )
    return BatchLoss(loss, student_logits, teacher_logits, targets, target_weights)


# Whether a split ``gt`` step computes logits at its trained regions only
# (``_trained_region_loss``); tests turn it off to compare with the kept-slot path.
_REGION_LOGITS = True


def _trained_region_loss(
    forward: nn.Module,
    student: nn.Module,
    packed: PackedBatch,
    cfg: DistillConfig,
    autocast: contextlib.AbstractContextManager[Any],
    regions: torch.Tensor,
) -> BatchLoss:
    """Steps 3 and 6 of a split ``gt`` step, at the regions with a trained target only.

    A region none of whose targets weighs anything in any row adds nothing to the loss, the
    agreement or the acceptance estimate, so its logits are not computed at all
    (``split_region_logits``), and the loss is ATen's fused log-softmax cross-entropy: the
    core's ``distillation_loss(kind="gt")`` to rounding (tested), without the ``vocab``-wide
    temporaries of its portable form.
    """
    with autocast:
        logits = split_region_logits(forward, student, packed, packed.input_ids, regions)
    student_logits = _at_least_float32(logits)  # (B, R, k, V)
    target_index = as_index(packed.layout.target_index, logits.device)[regions]  # (R, k)
    targets = packed.windows[:, target_index]
    target_weights = packed.weights[:, target_index]
    weights = _loss_weights(packed, target_index, target_weights, cfg)
    if cfg.entropy_weight > 0:
        loss = distillation_loss(
            student_logits, None, kind="gt", targets=targets, weights=weights,
            entropy_weight=cfg.entropy_weight,
        )  # fmt: skip
    else:
        loss = _fused_ground_truth_loss(student_logits, targets, weights)
    return BatchLoss(loss, student_logits, None, targets, target_weights)


def _fused_ground_truth_loss(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``mtp_core.ground_truth_loss`` with ATen's fused log-softmax (one pass forward and back).

    The weighted mean of ``-log softmax(logits)[target]`` over positions of weight != 0 and
    target >= 0; 0 when there is none.
    """
    log_probs = torch.log_softmax(logits, dim=-1)
    picked = log_probs.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
    position_weights = weights.to(log_probs.dtype) * (targets >= 0).to(log_probs.dtype)
    per_position = torch.where(position_weights != 0, -picked, torch.zeros_like(picked))
    total = position_weights.sum()
    return (position_weights * per_position).sum() / (total + (total == 0).to(total.dtype))


def _agreement_rates(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor,
    target_weights: torch.Tensor,
) -> list[float]:
    """Per offset, how often the student's argmax equals the teacher's (or the target)."""
    if teacher_logits is not None:
        rates = agreement(student_logits, teacher_logits, target_weights)
    else:
        k = student_logits.shape[-2]
        hits = (student_logits.argmax(-1) == targets).float()
        hits = (hits * target_weights).reshape(-1, k).sum(0)
        rates = hits / target_weights.reshape(-1, k).sum(0).clamp_min(1.0)
    return [float(v) for v in rates]


def _confident_run(student_logits: torch.Tensor, target_weights: torch.Tensor) -> float:
    """Mean tokens ConfAdapt(0.9) keeps per region, over regions whose first target is trained.

    The rule is the core's ``ConfAdapt.accept``, applied to each region's ``k`` top-1
    probabilities.
    """
    counted = target_weights[..., 0] > 0
    if not bool(counted.any()):
        return 1.0
    logits = student_logits.float()
    # The top-1 probability, exp(max - logsumexp), without a vocab-wide softmax tensor.
    confidences = (logits.amax(dim=-1) - torch.logsumexp(logits, dim=-1)).exp()[counted]
    k = confidences.shape[-1]
    policy = ConfAdapt(threshold=ESTIMATE_THRESHOLD, k_max=k)
    kept = policy.accept(confidences.reshape(-1, k).nan_to_num(0.0).cpu().numpy())
    return float(kept.astype(np.float32).mean())


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


def _micro_step(
    state: TrainState, packed: PackedBatch, sync: bool
) -> tuple[float, list[float], float]:
    """Forward, loss and backward of one micro-batch (gradients accumulate).

    Returns:
      ``(loss, agreement per offset, tokens ConfAdapt(0.9) would keep per region)``.
    """
    cfg = state.config
    with gradient_sync(state.forward, sync):
        out = _batch_loss(
            state.forward,
            state.student,
            state.teacher,
            packed,
            cfg,
            state.mask_token_id,
            state.autocast,
            state.teacher_context,
            split=state.split,
        )
        _check_finite("loss", float(out.loss.detach()), state.step, cfg)
        (out.loss / cfg.grad_accum).backward()  # type: ignore[no-untyped-call]
    with torch.no_grad():
        student_logits = out.student_logits.detach()
        rates = _agreement_rates(
            student_logits, out.teacher_logits, out.targets, out.target_weights
        )
        accepted = _confident_run(student_logits, out.target_weights)
    return float(out.loss.detach()), rates, accepted


def _gradient_norm(trainable: Sequence[nn.Parameter], clip: float | None, sharded: bool) -> float:
    """The gradients' global norm before clipping; clips them to ``clip`` when it is set.

    With FSDP the gradients are shards and the norm is over all of them (every process gets
    the same value)."""
    grads = [p.grad for p in trainable if p.grad is not None]
    if clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(trainable, clip)
    elif sharded:
        norm = torch.nn.utils.get_total_norm(grads)
    else:
        norm = torch.linalg.vector_norm(torch.stack([grad.norm() for grad in grads]))
    if sharded:
        # Lazy: FSDP runs only; the module loads torch.distributed.fsdp.
        from mtp_torch.training.fsdp import to_float

        return to_float(norm)
    return float(norm)


def _mask_row_views(state: TrainState) -> list[torch.Tensor | None]:
    """The mask token's row of each of ``state.mask_rows`` (``None`` where another process
    holds that row of a sharded matrix)."""
    row = state.mask_token_id
    if state.sharded:
        # Lazy: FSDP runs only; the module loads torch.distributed.fsdp.
        from mtp_torch.training.fsdp import local_row

        return [local_row(weight, row) for weight in state.mask_rows]
    return [weight[row] for weight in state.mask_rows]


def _apply_update(state: TrainState) -> None:
    """AdamW step; the mask token's rows move ``mask_lr_multiplier`` times as far."""
    factor = state.config.mask_lr_multiplier
    with torch.no_grad():
        rows = _mask_row_views(state) if factor != 1.0 else []
        before = [None if row is None else row.clone() for row in rows]
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for row, old in zip(rows, before, strict=True):
            if row is not None and old is not None:
                row.copy_(old + factor * (row - old))


def train_step(
    state: TrainState, batch: Sequence[PackedBatch], *, lr_scale: float = 1.0
) -> tuple[TrainState, StepStats]:
    """One optimizer step over the micro-batches of ``batch`` (steps 3-6 of the module doc).

    Args:
      state: the state after ``state.step`` steps.
      batch: the step's ``grad_accum`` packed micro-batches (``draw_batch``).
      lr_scale: a factor on the step's ``learning_rate`` (``distill`` passes the time-based
        decay of ``lr_decay_minutes`` here).

    Returns:
      ``(state, stats)``: the state after this step (weights and optimizer updated in place,
      ``step`` one higher) and what the step measured.

    Raises:
      ValueError: on a non-finite loss or gradient norm (no update is applied).
    """
    cfg = state.config
    # 1. This step's learning rate: linear warm-up, constant, then the optional decay.
    lr = learning_rate(cfg, state.step) * lr_scale
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    # 2. Forward, loss and backward of each micro-batch; DDP all-reduces on the last one.
    outcomes = [
        _micro_step(state, packed, sync=index == len(batch) - 1)
        for index, packed in enumerate(batch)
    ]
    # 3. The gradient norm, then clipping; a non-finite norm stops before any update.  (With
    #    FSDP the embeddings' gradients are cut to the mask row here, not by hooks.)
    if state.row_filter:
        # Lazy: FSDP runs only; the module loads torch.distributed.fsdp.
        from mtp_torch.training.fsdp import keep_row_gradients

        keep_row_gradients(state.row_filter, state.mask_token_id)
    grad_norm = _gradient_norm(state.trainable, cfg.clip, state.sharded)
    _check_finite("gradient norm", grad_norm, state.step, cfg)
    # 4. The AdamW update.
    _apply_update(state)
    ks = [packed.k for packed in batch]
    stats = StepStats(
        loss=float(np.mean([loss for loss, _, _ in outcomes])),
        ks=ks,
        agreement=outcomes[-1][1],
        lr=lr,
        grad_norm=grad_norm,
        supervised_tokens=sum(cfg.batch_size * cfg.regions * k for k in ks),
        accepted_at_0_9=float(np.mean([accepted for _, _, accepted in outcomes])),
    )
    return attrs.evolve(state, step=state.step + 1), stats
