"""Fully sharded training (``DistillConfig.fsdp``): PyTorch's ``fully_shard`` (FSDP2).

Each transformer block, then the whole model, is sharded over a 1-D device mesh of all the
processes: every process keeps ``1 / world_size`` of each parameter, gradient and AdamW state,
and all-gathers a block's weights just before it runs.  The parameters become ``DTensor`` s
sharded on their first dimension (``torch.chunk`` pieces), so the few places that touch one
row of a matrix (the mask token's embedding row) work on the local piece, and the final model
is gathered whole again.

Imported only when ``fsdp`` is on (it needs ``torch.distributed.fsdp.fully_shard``,
torch >= 2.6), so ``import mtp_torch`` does not pay for it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from mtp_torch.training.parameters import find_blocks

__all__ = [
    "device_mesh",
    "gather_full_model",
    "keep_row_gradients",
    "local_row",
    "reshard_after",
    "shard_model",
    "to_float",
]

ContextFactory = Callable[[], contextlib.AbstractContextManager[Any]]
ParameterMap = Callable[[Iterable[nn.Parameter]], list[nn.Parameter]]


def device_mesh(device: torch.device, world_size: int) -> DeviceMesh:
    """A 1-D mesh over every process, on ``device``'s type (``"cuda"`` or ``"cpu"``/gloo).

    On CUDA, ``device`` becomes this process's current GPU first: FSDP puts the shards, and
    NCCL its collectives, on the current device.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return init_device_mesh(device.type, (world_size,))


def shard_model(model: nn.Module, mesh: DeviceMesh, mixed_precision: bool) -> ParameterMap:
    """``fully_shard`` each block of ``model``, then ``model`` itself, in place.

    The parameters move to the mesh's device piece by piece (a block's whole weights are on
    the device only while it is being sharded).  Sharding replaces every parameter by a new
    ``DTensor`` parameter of the same name (``requires_grad`` kept).

    Args:
      model: a transformers causal LM, or its LoRA wrapper.
      mesh: the 1-D mesh of all processes.
      mixed_precision: all-gather the parameters in bfloat16 and reduce the gradients in
        float32 (FSDP's ``MixedPrecisionPolicy``); the sharded weights keep their dtype.

    Returns:
      A function that maps parameters of ``model`` from before the sharding to their sharded
      replacements (for the optimizer's groups and the mask rows).
    """
    name_of = {id(parameter): name for name, parameter in model.named_parameters()}
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    for block in find_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    sharded = dict(model.named_parameters())

    def sharded_parameters(parameters: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        return [sharded[name_of[id(parameter)]] for parameter in parameters]

    return sharded_parameters


def reshard_after(module: nn.Module, inner: ContextFactory) -> ContextFactory:
    """``inner``, then ``module``'s root weights freed again (a frozen teacher runs no backward,
    which is where FSDP would otherwise free the root's gathered weights)."""

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        with inner():
            yield
        if isinstance(module, FSDPModule):
            module.reshard()

    return context


def to_float(value: torch.Tensor) -> float:
    """A scalar tensor (a ``DTensor`` is gathered first) as a Python float."""
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return float(value)


def _local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The rows of ``tensor`` this process holds, and the global index of the first one."""
    if not isinstance(tensor, DTensor):
        return tensor, 0
    if tuple(tensor.placements) != (Shard(0),):
        raise ValueError(f"expected a tensor sharded on rows, got placements {tensor.placements}")
    mesh = tensor.device_mesh
    rows_per_rank = -(-int(tensor.shape[0]) // mesh.size())  # torch.chunk's piece size
    return tensor.to_local(), mesh.get_local_rank() * rows_per_rank


def local_row(tensor: torch.Tensor, row: int) -> torch.Tensor | None:
    """A view of row ``row`` of ``tensor`` when this process holds it, else ``None``."""
    local, first = _local_rows(tensor)
    index = row - first
    return local[index] if 0 <= index < local.shape[0] else None


def keep_row_gradients(weights: Sequence[nn.Parameter], row: int) -> None:
    """Zero every row of the weights' gradients but ``row`` (what the mask-row hooks do
    without FSDP, where tensor hooks never see the sharded gradient)."""
    for weight in weights:
        if weight.grad is None:
            continue
        local, first = _local_rows(weight.grad)
        kept = local[row - first].clone() if 0 <= row - first < local.shape[0] else None
        local.zero_()
        if kept is not None:
            local[row - first] = kept


def _unsharded_class(module: nn.Module) -> type[nn.Module]:
    """The class ``fully_shard`` swapped out of ``module``'s (itself when it was not sharded)."""
    original = next(kind for kind in type(module).__mro__ if not issubclass(kind, FSDPModule))
    return cast(type[nn.Module], original)


def _base_model(model: Any, lora: bool) -> Any:
    """The transformers model itself (inside the LoRA wrapper when ``lora``)."""
    return model.get_base_model() if lora else model


def _empty_copy(student: Any, lora: bool) -> nn.Module:
    """A model of the student's architecture (LoRA wrapper included) on the meta device."""
    base = _base_model(student, lora)
    with torch.device("meta"):
        empty = _unsharded_class(base)(copy.deepcopy(base.config))
        if lora:
            # Lazy: peft loads only for LoRA runs (a slow import).
            from peft import get_peft_model

            (name, adapter_config), *_ = student.peft_config.items()
            empty = get_peft_model(empty, copy.deepcopy(adapter_config), adapter_name=name)
    return empty


def gather_full_model(student: nn.Module, lora: bool) -> nn.Module:
    """The sharded student as a plain (unsharded) model on the CPU, on every process.

    A collective: every process must call it.  Each process ends up holding the whole model
    in host memory, as it did when it loaded it.

    Args:
      student: the sharded student (a transformers model or its LoRA wrapper).
      lora: whether ``student`` is a LoRA (``peft``) wrapper.

    Returns:
      A model of the same class and weights, with no FSDP hooks (its adapters unmerged).
    """
    # 1. Every tensor whole, on the CPU (DTensors are all-gathered one at a time, in the
    #    same order on every process; a tied weight once).
    gathered: dict[int, torch.Tensor] = {}
    full: dict[str, torch.Tensor] = {}
    for name, value in student.state_dict().items():
        if id(value) not in gathered:
            whole = value.full_tensor() if isinstance(value, DTensor) else value
            gathered[id(value)] = whole.detach().to("cpu", copy=True)
        full[name] = gathered[id(value)]
    # 2. An empty model of the same structure takes the tensors; then the buffers that are
    #    not in a state dict (rotary frequencies) and the tied weights.
    plain = _empty_copy(student, lora)
    plain.load_state_dict(full, strict=True, assign=True)
    for name, buffer in student.named_buffers():
        owner, _, leaf = name.rpartition(".")
        setattr(plain.get_submodule(owner), leaf, buffer.detach().to("cpu", copy=True))
    base = _base_model(plain, lora)
    if getattr(base.config, "tie_word_embeddings", False):
        base.tie_weights()
    return plain
