"""The state of a training run and how a new one starts: ``TrainState``, ``init_train_state``.

``init_train_state`` builds everything a step reads and changes (teacher, student, optimizer,
random generator) for ``mtp_torch.training.step.train_step``: it applies the run's weight
dtype and attention kernel, copies the frozen teacher (or, with LoRA, lets the student with its
adapters disabled be the teacher), adds the mask token, picks the trained parameters, and under
FSDP shards teacher and student over the processes (``mtp_torch.training.fsdp``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
from collections.abc import Callable
from typing import Any

import attrs
import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mtp_torch.decoding.mask import add_mask_token
from mtp_torch.training.batch import split_forward_supported
from mtp_torch.training.casts import FrozenCastAutocast, frozen_linears
from mtp_torch.training.config import DistillConfig
from mtp_torch.training.lora import gated_parameters, lora_parameters, with_lora
from mtp_torch.training.model_options import (
    enable_gradient_checkpointing,
    prepare_model,
    splits_passes,
)
from mtp_torch.training.parameters import drop_gradients, parameter_groups, trainable_parameters

__all__ = ["ContextFactory", "TrainState", "init_train_state"]

logger = logging.getLogger(__name__)

ContextFactory = Callable[[], contextlib.AbstractContextManager[Any]]


@attrs.frozen(eq=False)
class TrainState:
    """Everything a training step reads and changes.

    The modules and the optimizer are updated in place (they are torch objects); ``train_step``
    returns a new state whose ``step`` counts the update.

    Attributes:
      config: the run's settings.
      student: the model being trained (a ``peft`` model with LoRA).
      forward: the student as called (its DDP wrapper under torchrun, else ``student``).
      teacher: the frozen teacher (``None`` for ``loss="gt"``; the student itself with LoRA).
      teacher_context: entered around each teacher forward (LoRA: the adapters disabled).
      optimizer: AdamW over ``trainable``.
      trainable: every trained parameter, in the optimizer's order.
      mask_rows: embedding matrices whose mask-token row trains (the mask-row rate applies).
      hooks: gradient hooks to remove when training ends.
      mask_token_id: id of ``<mtp_mask>``.
      autocast: the forward passes' autocast context (or a null context).
      generator: draws the block sizes and offsets (``draw_batch``).
      step: optimizer steps completed.
      row_filter: embedding matrices whose gradient is cut to the mask token's row after each
        backward pass (FSDP, where the gradient hooks of ``hooks`` cannot see the shards).
      sharded: whether student and teacher are sharded with FSDP.
      split: whether the student's forward runs as two passes, real slots then mask slots
        (``DistillConfig.split_passes``; ``mtp_torch.training.batch.split_forward_logits``).
    """

    config: DistillConfig
    student: nn.Module
    forward: nn.Module
    teacher: nn.Module | None
    teacher_context: ContextFactory
    optimizer: torch.optim.Optimizer
    trainable: tuple[nn.Parameter, ...]
    mask_rows: tuple[nn.Parameter, ...]
    hooks: tuple[RemovableHandle, ...]
    mask_token_id: int
    autocast: contextlib.AbstractContextManager[Any]
    generator: np.random.Generator
    step: int = 0
    row_filter: tuple[nn.Parameter, ...] = ()
    sharded: bool = False
    split: bool = False


def _frozen_copy(model: nn.Module, device: torch.device | None) -> nn.Module:
    """A deep copy of ``model`` (on ``device``; ``None``: where it is), in eval mode, with no
    gradients."""
    teacher = copy.deepcopy(model).eval()
    if device is not None:
        teacher = teacher.to(device)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
        parameter.grad = None
    return teacher


def _bf16(cfg: DistillConfig, device: torch.device) -> bool:
    """Whether the forward passes run in bfloat16 (``cfg.bf16``; ``None``: on CUDA only)."""
    return bool(cfg.bf16) if cfg.bf16 is not None else device.type == "cuda"


def _autocast(
    cfg: DistillConfig, device: torch.device, models: list[nn.Module], sharded: bool
) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast when ``cfg.bf16`` asks for it (``None``: on CUDA only).

    On the CPU, unsharded, the frozen linear weights of ``models`` are cast once rather than at
    every call (``FrozenCastAutocast``: the same products, bitwise; on CUDA the casts are cheap
    and the copies would cost accelerator memory)."""
    if not _bf16(cfg, device):
        return contextlib.nullcontext()
    if device.type == "cpu" and not sharded:
        layers = frozen_linears(models, device.type)
        if layers:
            return FrozenCastAutocast(device.type, torch.bfloat16, layers)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _shard(state: TrainState, device: torch.device, world_size: int) -> TrainState:
    """The state with student and frozen teacher sharded over every process (FSDP2).

    The optimizer is rebuilt over the sharded parameters (it holds no state yet), and the
    mask-row gradient hooks give way to a filter applied after the backward pass.
    """
    # Lazy: FSDP runs only; the module loads torch.distributed.fsdp.
    from mtp_torch.training import fsdp

    cfg = state.config
    mesh = fsdp.device_mesh(device, world_size)
    mixed_precision = device.type == "cuda" and _bf16(cfg, device)
    teacher_context = state.teacher_context
    if state.teacher is not None and state.teacher is not state.student:
        fsdp.shard_model(state.teacher, mesh, mixed_precision)
        teacher_context = fsdp.reshard_after(state.teacher, teacher_context)
    for hook in state.hooks:
        hook.remove()
    sharded = fsdp.shard_model(state.student, mesh, mixed_precision)
    groups = [
        {"params": sharded(group["params"]), "weight_decay": group["weight_decay"]}
        for group in state.optimizer.param_groups
    ]
    mask_rows = tuple(sharded(state.mask_rows))
    return attrs.evolve(
        state,
        teacher_context=teacher_context,
        optimizer=torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas),
        trainable=tuple(sharded(state.trainable)),
        mask_rows=mask_rows,
        hooks=(),
        row_filter=mask_rows if state.hooks else (),
        sharded=True,
    )


def init_train_state(
    model: Any, tokenizer: Any, cfg: DistillConfig, device: torch.device, world_size: int = 1
) -> TrainState:
    """Teacher, student, optimizer and seeds of a new run (step 0).

    Args:
      model: the transformers causal LM to train in place (it becomes the student).
      tokenizer: its tokenizer (gets the mask token), or ``None``.
      cfg: the run's settings.
      device: where the models go.
      world_size: processes in the run; with ``cfg.fsdp`` and more than one, the models are
        sharded over them (``mtp_torch.training.fsdp``), else each holds them whole.

    Returns:
      The state before the first step; python's and torch's global RNGs are seeded.
    """
    sharded = cfg.fsdp and world_size > 1
    # 1. The weights' dtype and the attention kernel, before the teacher is copied.
    prepare_model(model, cfg, device)
    # 2. Teacher: a frozen copy of the model as passed (none for "gt"; with LoRA the student
    #    with its adapters disabled, below).  Sharded models move to the device with FSDP.
    teacher = None
    if cfg.needs_teacher and cfg.lora_rank == 0:
        teacher = _frozen_copy(model, None if sharded else device)
    # 3. Student: the model itself, with a mask token (and LoRA adapters).
    drop_gradients(model)  # stale gradients would not match a resized vocabulary
    mask_token_id = int(add_mask_token(model, tokenizer, seed=cfg.seed))
    student = model if sharded else model.to(device)
    student.train()
    teacher_context: ContextFactory = contextlib.nullcontext
    if cfg.lora_gate is not None:
        # Mask-gated adapters: the teacher is the student itself (its forced input holds no
        # mask token, so no adapter acts and it computes exactly the base model).
        main, embeddings, hooks = gated_parameters(student, mask_token_id, cfg)
        if cfg.needs_teacher:
            teacher = student
    elif cfg.lora_rank > 0:
        student = with_lora(student, cfg)
        if cfg.needs_teacher:
            teacher, teacher_context = student, student.disable_adapter
        main, embeddings, hooks = lora_parameters(student, mask_token_id, cfg.train_mask_embedding)
    else:
        main, embeddings, hooks = trainable_parameters(
            student, cfg.train_layers, mask_token_id, cfg.train_mask_embedding
        )
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    split = splits_passes(cfg) and not sharded
    if split and (reason := split_forward_supported(student)) is not None:
        logger.info("the student's passes do not split (%s): one packed pass", reason)
        split = False
    # 4. AdamW; only full fine-tuning decays the embeddings (otherwise just the mask rows move).
    full = cfg.train_layers is None and cfg.lora_rank == 0
    groups = parameter_groups(main, embeddings, cfg.weight_decay, decay_embeddings=full)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    state = TrainState(
        config=cfg,
        student=student,
        forward=student,
        teacher=teacher,
        teacher_context=teacher_context,
        optimizer=optimizer,
        trainable=tuple(p for group in groups for p in group["params"]),
        mask_rows=tuple(embeddings),
        hooks=tuple(hooks),
        mask_token_id=mask_token_id,
        autocast=_autocast(
            cfg,
            device,
            [student] if teacher is None or teacher is student else [student, teacher],
            sharded,
        ),
        generator=np.random.default_rng(cfg.seed),
        split=split,
    )
    # 5. FSDP: teacher and student sharded over the processes (the optimizer then holds shards).
    if sharded:
        state = _shard(state, device, world_size)
    # 6. Seeds: python and torch (dropout), numpy (block sizes, offsets).
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return state
