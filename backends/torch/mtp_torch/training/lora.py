"""LoRA adapters (``peft``) for a distillation run: wrap, pick their parameters, merge.

With ``lora_rank > 0`` the student trains low-rank adapters on every linear layer of the
trained blocks instead of the weights themselves; the teacher is the same model with its
adapters disabled (no second copy).  When training ends the adapters are read out as a compact
delta (``mtp_torch.weights.delta``) and merged into plain weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from mtp_torch.decoding.gated import add_mask_gate, gated_layers
from mtp_torch.training.parameters import (
    TrainableParameters,
    embedding_matrices,
    find_blocks,
    mask_row_hooks,
)
from mtp_torch.weights.delta import lora_delta

if TYPE_CHECKING:
    from mtp_torch.training.config import DistillConfig

__all__ = ["gated_parameters", "lora_parameters", "merge_lora", "with_lora"]


def _adapted_layers(blocks: nn.ModuleList, train_layers: int | None) -> list[int] | None:
    """Indices of the blocks that get adapters (``None``: all)."""
    if train_layers is None:
        return None
    if not 0 < train_layers <= len(blocks):
        raise ValueError(
            f"with lora_rank > 0, train_layers must be in [1, {len(blocks)}] (the blocks that "
            f"get adapters) or None for all, got {train_layers}"
        )
    return list(range(len(blocks) - train_layers, len(blocks)))


def with_lora(student: nn.Module, cfg: DistillConfig) -> Any:
    """Wrap ``student`` in LoRA adapters (``peft``) on the linear layers of the trained blocks.

    Args:
      student: the model to adapt (gains the adapters in place).
      cfg: the run's settings (``lora_rank``, ``lora_alpha``, ``train_layers``, ``seed``).

    Returns:
      The ``peft`` model; its adapters are initialised from ``torch.manual_seed(cfg.seed)``.

    Raises:
      ValueError: without ``peft``, for a ``train_layers`` outside the blocks, or for a model
        whose blocks hold no ``nn.Linear`` layer.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ValueError(
            "lora_rank > 0 needs the 'peft' package: pip install peft (or use lora_rank=0 for "
            "full fine-tuning)"
        ) from error
    blocks = find_blocks(student)
    layers = _adapted_layers(blocks, cfg.train_layers)
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


def lora_parameters(
    student: Any, mask_token_id: int, train_embeddings: bool
) -> TrainableParameters:
    """(adapter params, mask-row embedding params, gradient hooks) of a LoRA student.

    Args:
      student: a ``peft`` model made by ``with_lora``.
      mask_token_id: the mask token's row, the only embedding row that trains.
      train_embeddings: train the mask rows of the embedding matrices too.

    Returns:
      As ``trainable_parameters``.
    """
    main = [p for name, p in student.named_parameters() if "lora_" in name]
    for parameter in main:
        parameter.requires_grad_(True)
    if not train_embeddings:
        return main, [], []
    embeddings = embedding_matrices(student.get_base_model())
    for weight in embeddings:
        weight.requires_grad_(True)
    return main, embeddings, mask_row_hooks(embeddings, mask_token_id)


def merge_lora(student: Any, mask_token_id: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The adapters as a compact low-rank delta, then merged into plain weights.

    Args:
      student: a trained ``peft`` model.
      mask_token_id: the mask token's id (its embedding rows go into the delta).

    Returns:
      ``(model, delta)``: the base model with the adapters merged in, and the delta of
      ``mtp_torch.weights.delta.lora_delta``.
    """
    delta = lora_delta(student, mask_token_id)
    return student.merge_and_unload(), delta


def gated_parameters(
    student: nn.Module, mask_token_id: int, cfg: DistillConfig
) -> TrainableParameters:
    """Give ``student`` mask-gated adapters (``lora_gate="mask"``) and freeze everything else.

    Args:
      student: the model (mask token added); gains the gate in place.
      mask_token_id: the mask token's id.
      cfg: the run's settings (``lora_rank``, ``lora_alpha``, ``train_layers``,
        ``train_mask_embedding``, ``seed``).

    Returns:
      As ``trainable_parameters``: the adapters (and the gate's mask vector when
      ``train_mask_embedding``), no embedding matrices, no hooks.
    """
    blocks = find_blocks(student)
    layers = _adapted_layers(blocks, cfg.train_layers)
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    gate = add_mask_gate(
        student, mask_token_id, cfg.lora_rank, cfg.lora_alpha, layers=layers, seed=cfg.seed
    )
    main: list[nn.Parameter] = []
    for _, layer in gated_layers(student):
        main += [layer.lora_A, layer.lora_B]
    if cfg.train_mask_embedding:
        main.append(gate.mask_embedding)
    for parameter in main:
        parameter.requires_grad_(True)
    gate.mask_embedding.requires_grad_(cfg.train_mask_embedding)
    return main, [], []
