"""Which weights a distillation run trains, and the optimizer's parameter groups.

Full fine-tuning trains every weight (the paper).  ``train_layers = N`` trains the top ``N``
transformer blocks, the final norm and the mask token's embedding rows only: the embedding
matrices stay trainable but a gradient hook zeroes every row except the mask token's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mtp_torch.decoding.gated import find_blocks

__all__ = [
    "TrainableParameters",
    "drop_gradients",
    "embedding_matrices",
    "find_blocks",
    "mask_row_hooks",
    "parameter_groups",
    "trainable_parameters",
]

# (main parameters, embedding matrices whose mask row trains, their gradient hooks)
TrainableParameters = tuple[list[nn.Parameter], list[nn.Parameter], list[RemovableHandle]]


def embedding_matrices(model: Any) -> list[nn.Parameter]:
    """The input embedding matrix and, when it is not tied to it, the output one."""
    embeddings: list[nn.Parameter] = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not embeddings[0]:
        embeddings.append(output.weight)
    return embeddings


def mask_row_hooks(weights: Sequence[nn.Parameter], mask_token_id: int) -> list[RemovableHandle]:
    """Gradient hooks that keep only the mask token's row of each matrix's gradient."""
    hooks = []
    for weight in weights:
        row_mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        row_mask[mask_token_id] = 1.0
        hooks.append(weight.register_hook(lambda grad, rows=row_mask: grad * rows))  # type: ignore[no-untyped-call]
    return hooks


def _top_block_parameters(student: nn.Module, train_layers: int) -> set[int]:
    """Ids of the parameters of the top ``train_layers`` blocks and of what lies outside blocks
    and embeddings (the final norm and the like; none when ``train_layers`` is 0)."""
    blocks = find_blocks(student)
    if train_layers > len(blocks):
        raise ValueError(
            f"train_layers={train_layers} but the model has {len(blocks)} blocks; use at most "
            f"{len(blocks)} (or None to train every weight)"
        )
    in_blocks = {id(p) for p in blocks.parameters()}
    in_embeddings = {
        id(p) for m in student.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    upper = list(blocks)[len(blocks) - train_layers :] if train_layers > 0 else []
    trained = {id(p) for block in upper for p in block.parameters()}
    for parameter in student.parameters():
        outside = id(parameter) not in in_blocks and id(parameter) not in in_embeddings
        if train_layers > 0 and outside:
            trained.add(id(parameter))
    return trained


def trainable_parameters(
    student: Any, train_layers: int | None, mask_token_id: int, train_embeddings: bool = True
) -> TrainableParameters:
    """Set ``requires_grad`` and return (main params, embedding params, gradient hooks).

    Args:
      student: the model being trained.
      train_layers: train only the top ``N`` blocks (plus the final norm and the mask rows);
        ``None``: every weight.
      mask_token_id: the mask token's row, the only embedding row that moves with
        ``train_layers``.
      train_embeddings: train the embedding matrices (with ``train_layers``: their mask rows);
        ``False`` freezes them altogether.

    Returns:
      The non-embedding parameters that train, the embedding matrices that train, and the
      hooks that zero their gradients outside the mask row (none without ``train_layers``).
    """
    embeddings = embedding_matrices(student)
    embedding_ids = {id(p) for p in embeddings}
    if not train_embeddings:
        embeddings = []
    if train_layers is None:
        main = [p for p in student.parameters() if id(p) not in embedding_ids]
        for parameter in student.parameters():
            parameter.requires_grad_(id(parameter) not in embedding_ids or train_embeddings)
        return main, embeddings, []
    trained = _top_block_parameters(student, train_layers) - embedding_ids
    main = []
    for parameter in student.parameters():
        wanted = id(parameter) in trained
        parameter.requires_grad_(wanted or (train_embeddings and id(parameter) in embedding_ids))
        if wanted:
            main.append(parameter)
    return main, embeddings, mask_row_hooks(embeddings, mask_token_id)


def parameter_groups(
    main: list[nn.Parameter],
    embeddings: list[nn.Parameter],
    weight_decay: float,
    decay_embeddings: bool,
) -> list[dict[str, Any]]:
    """AdamW parameter groups: the main weights, then the embeddings (decayed only if asked)."""
    groups: list[dict[str, Any]] = []
    if main:
        groups.append({"params": main, "weight_decay": weight_decay})
    if embeddings:
        groups.append(
            {"params": embeddings, "weight_decay": weight_decay if decay_embeddings else 0.0}
        )
    return groups


def drop_gradients(model: nn.Module) -> None:
    """Forget every gradient of ``model`` (a resized vocabulary must not meet a stale one)."""
    for parameter in model.parameters():
        parameter.grad = None
