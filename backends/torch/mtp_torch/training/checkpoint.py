"""Atomic, pickle-free training checkpoints for ``distill``.

A checkpoint is a directory ``checkpoint-<step>`` inside the run's ``out_dir``:

- ``model.safetensors``: the student's weights (shared/tied tensors stored once);
- ``optimizer.safetensors``: every tensor of the optimizer state (``state.<param>.<name>``);
- ``rng.safetensors``: torch's CPU (and CUDA) random generator states;
- ``state.json``: everything else (step, data position, python and numpy RNG states, the
  optimizer's hyper-parameters and scalar state, the training config).

Nothing is ever unpickled: tensors go through safetensors, the rest through JSON.  A checkpoint
is written into a temporary directory which is then renamed into place, and the pointer file
``latest.json`` is replaced atomically (``os.replace``) only after that; a run killed at any point
leaves either the previous or the new checkpoint readable, never a half-written one.

A run sharded with FSDP (``DistillConfig.fsdp``) writes a *sharded* checkpoint instead
(``save_sharded_checkpoint``): the same directory, pointer and atomic rename, but the student and
the optimizer go through ``torch.distributed.checkpoint`` (every process writes its own shards,
``__<rank>_0.distcp``, and the index ``.metadata``), each process's random states go to
``rng-<rank>.safetensors`` and ``rank-<rank>.json``, and ``state.json`` records the number of
processes (a sharded checkpoint resumes on as many).  ``torch.distributed.checkpoint`` writes its
``.metadata`` index with pickle: before anything is loaded, that index is read with an unpickler
that admits only the checkpoint's own metadata classes (``check_shard_index``), and the shards'
non-tensor values are read with ``torch.load(weights_only=True)``, so a tampered sharded
checkpoint is refused instead of running code.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, load_model, save_file, save_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "latest_checkpoint",
    "load_checkpoint",
    "load_sharded_checkpoint",
    "read_checkpoint_state",
    "save_checkpoint",
    "save_sharded_checkpoint",
]

CHECKPOINT_FORMAT = 1
_LATEST = "latest.json"
_PREFIX = "checkpoint-"


def _write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(directory: Path) -> None:
    """fsync every file in ``directory`` and the directory: on disk before it is renamed."""
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_directory(directory)


def _read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file, or a ``ValueError`` that names it and says what to do."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is corrupt ({error}); delete that checkpoint directory (and latest.json if "
            "it names it) to resume from an earlier one, or start a new out_dir"
        ) from error
    if not isinstance(value, dict) or ("checkpoint" not in value and "step" not in value):
        raise ValueError(f"{path} is not an mtp-lm checkpoint file; start a new out_dir")
    return value


def read_checkpoint_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON state of a checkpoint directory (``step``, ``config`` ...), validated.

    Raises:
      ValueError: if ``state.json`` is corrupt or not a checkpoint's.
    """
    return _read_json(Path(directory) / "state.json")


def _optimizer_to_flat(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON values."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    groups = []
    for group in state_dict["param_groups"]:
        entry = {}
        for key, value in group.items():
            if isinstance(value, torch.Tensor):
                raise ValueError(
                    f"optimizer hyper-parameter {key!r} is a tensor; checkpoints store plain "
                    "numbers only, so pass it as a float"
                )
            entry[key] = list(value) if isinstance(value, tuple) else value
        groups.append(entry)
    return tensors, {"param_groups": groups, "scalar_state": scalars}


def _optimizer_from_flat(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, entries in meta["scalar_state"].items():
        state.setdefault(int(param_id), {}).update(entries)
    groups = []
    for group in meta["param_groups"]:
        restored = dict(group)
        if isinstance(restored.get("betas"), list):
            restored["betas"] = tuple(restored["betas"])
        groups.append(restored)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _rng_tensors(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """torch's CPU random state and the CUDA ones (every GPU's, or only ``device``'s)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        tensors[f"torch_cuda_{index}"] = torch.cuda.get_rng_state(index)
    elif device is None and torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = cuda_state
    return tensors


def _restore_rng_tensors(tensors: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if not torch.cuda.is_available():
        return
    for index in range(torch.cuda.device_count()):
        if f"torch_cuda_{index}" in tensors:
            torch.cuda.set_rng_state(tensors[f"torch_cuda_{index}"], index)


def _python_rng_state() -> list[Any]:
    version, internal, gauss_next = random.getstate()
    return [version, list(internal), gauss_next]


def _restore_python_rng(state: list[Any]) -> None:
    version, internal, gauss_next = state
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(
    out_dir: str | os.PathLike[str],
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: np.random.Generator,
    data_state: Mapping[str, Any],
    config: Mapping[str, Any],
    keep_last: int = 1,
) -> Path:
    """Write a checkpoint of a training run atomically and point ``latest.json`` at it.

    Args:
      out_dir: the run's checkpoint directory (created if missing).
      step: optimizer steps completed so far.
      model: the student (weights saved with ``safetensors.torch.save_model``).
      optimizer: the optimizer whose state (moments, step counts, hyper-parameters) is saved.
      generator: the numpy generator that draws block sizes, offsets and data.
      data_state: the data loader's position (JSON-serialisable).
      config: the training config as plain JSON values (checked when resuming).
      keep_last: how many checkpoint directories to keep (older ones are deleted).

    Returns:
      The directory of the new checkpoint.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_stages(root)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{_PREFIX}{step:08d}.", suffix=".tmp"))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        optimizer_tensors, optimizer_meta = _optimizer_to_flat(optimizer)
        save_file(optimizer_tensors, str(tmp / "optimizer.safetensors"))
        save_file(_rng_tensors(), str(tmp / "rng.safetensors"))
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": int(step),
            "data": dict(data_state),
            "python_rng": _python_rng_state(),
            "numpy_rng": generator.bit_generator.state,
            "optimizer": optimizer_meta,
            "config": dict(config),
        }
        with open(tmp / "state.json", "w", encoding="utf-8") as handle:
            json.dump(state, handle)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(root, tmp, step, keep_last)


def _remove_stale_stages(root: Path) -> None:
    """Delete the staging directories a run killed while saving left behind."""
    for stale in root.glob(f".{_PREFIX}*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def _publish(root: Path, staged: Path, step: int, keep_last: int) -> Path:
    """Move a fully written checkpoint directory into place, point ``latest.json`` at it and
    delete older checkpoints beyond ``keep_last``.

    Returns:
      The checkpoint's final directory.
    """
    final = root / f"{_PREFIX}{step:08d}"
    if final.exists():
        # Never replace the checkpoint latest.json may name: a new name, then the pointer.
        final = root / f"{_PREFIX}{step:08d}.{time.time_ns()}"
    try:
        _fsync_tree(staged)
        os.replace(staged, final)
        _fsync_directory(root)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    _write_json_atomic(root / _LATEST, {"checkpoint": final.name, "step": int(step)})
    _fsync_directory(root)
    older = sorted(p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and p.name != final.name)
    for stale in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | os.PathLike[str]) -> Path | None:
    """The directory ``latest.json`` points at, or ``None`` when the run has no checkpoint yet.

    Args:
      out_dir: the run's checkpoint directory.

    Returns:
      The newest complete checkpoint directory, or ``None``.

    Raises:
      ValueError: if ``latest.json`` names a checkpoint that is missing.
    """
    pointer = Path(out_dir) / _LATEST
    if not pointer.is_file():
        return None
    name = str(_read_json(pointer)["checkpoint"])
    directory = Path(out_dir) / name
    if not (directory / "state.json").is_file():
        raise ValueError(
            f"{pointer} names {name}, which is missing or incomplete; delete {pointer} to "
            "start over, or restore the checkpoint directory"
        )
    return directory


def _checked_state(root: Path, world_size: int | None) -> dict[str, Any]:
    """``state.json`` of a checkpoint that a run on ``world_size`` sharded processes (``None``:
    an unsharded run) can resume from.

    Raises:
      ValueError: for another format, or a sharded checkpoint for an unsharded run (or one of
        another size), or the other way round.
    """
    state = _read_json(root / "state.json")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{root} has checkpoint format {state.get('format')!r}, this version reads "
            f"{CHECKPOINT_FORMAT}; resume with the mtp-lm version that wrote it"
        )
    written_by = state.get("sharded_over")
    if written_by != world_size:
        wrote = f"an FSDP run on {written_by} processes" if written_by else "an unsharded run"
        wants = (
            f"fsdp=True under torchrun with {written_by} processes"
            if written_by
            else ("fsdp=False (or one process)")
        )
        raise ValueError(f"{root} was written by {wrote}; resume it with {wants}")
    return state


def load_checkpoint(
    directory: str | os.PathLike[str],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: np.random.Generator,
) -> dict[str, Any]:
    """Restore the student, optimizer and RNG states from a checkpoint directory.

    Args:
      directory: a ``checkpoint-<step>`` directory written by ``save_checkpoint``.
      model: the student, already built with the same architecture (mask token included).
      optimizer: a fresh optimizer over the same parameter groups.
      generator: the numpy generator to restore in place.

    Returns:
      The JSON state (``step``, ``data``, ``config`` ...).

    Raises:
      ValueError: if the checkpoint format is unknown.
    """
    root = Path(directory)
    state = _checked_state(root, world_size=None)
    device = next(model.parameters()).device
    load_model(model, str(root / "model.safetensors"), strict=True, device=str(device))
    optimizer_tensors = load_file(str(root / "optimizer.safetensors"), device=str(device))
    # Adam keeps its scalar step counts on the CPU unless it runs fused/capturable.
    for key in list(optimizer_tensors):
        if key.endswith(".step"):
            optimizer_tensors[key] = optimizer_tensors[key].cpu()
    _optimizer_from_flat(optimizer, optimizer_tensors, state["optimizer"])
    _restore_rng_tensors(load_file(str(root / "rng.safetensors")))
    _restore_python_rng(state["python_rng"])
    generator.bit_generator.state = state["numpy_rng"]
    return state


def save_sharded_checkpoint(
    out_dir: str | os.PathLike[str],
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: np.random.Generator,
    data_state: Mapping[str, Any],
    config: Mapping[str, Any],
    rank: int,
    world_size: int,
    device: torch.device,
    keep_last: int = 1,
) -> Path | None:
    """Write a checkpoint of an FSDP run atomically: a collective, every process calls it.

    Args:
      out_dir: the run's checkpoint directory (shared by every process).
      step: optimizer steps completed so far.
      model: the sharded student.
      optimizer: the optimizer over its shards.
      generator: the numpy generator that draws block sizes, offsets and data.
      data_state: the data loader's position (the same on every process).
      config: the training config as plain JSON values (checked when resuming).
      rank: this process's rank.
      world_size: the number of processes.
      device: this process's device (whose CUDA random state is saved).
      keep_last: how many checkpoint directories to keep (older ones are deleted).

    Returns:
      The directory of the new checkpoint on rank 0, ``None`` on the other ranks.
    """
    # Lazy: sharded (FSDP) checkpoints only; torch.distributed.checkpoint is slow to import.
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.checkpoint.state_dict_saver import save as save_shards

    root = Path(out_dir)
    staged = root / f".{_PREFIX}{step:08d}.sharded.tmp"
    # 1. Rank 0 clears what a killed save left behind and makes the staging directory.
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_stages(root)
        staged.mkdir()
    dist.barrier()
    # 2. Every process writes its shards (one collective save) and its random states.
    model_state, optimizer_state = get_state_dict(model, optimizer)
    save_shards({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(staged))
    save_file(_rng_tensors(device), str(staged / f"rng-{rank}.safetensors"))
    with open(staged / f"rank-{rank}.json", "w", encoding="utf-8") as handle:
        json.dump({"step": int(step), "python_rng": _python_rng_state()}, handle)
    dist.barrier()
    # 3. Rank 0 adds state.json and moves the whole directory into place.
    final = None
    if rank == 0:
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": int(step),
            "sharded_over": int(world_size),
            "data": dict(data_state),
            "numpy_rng": generator.bit_generator.state,
            "config": dict(config),
        }
        with open(staged / "state.json", "w", encoding="utf-8") as handle:
            json.dump(state, handle)
        final = _publish(root, staged, step, keep_last)
    dist.barrier()
    return final


def load_sharded_checkpoint(
    directory: str | os.PathLike[str],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: np.random.Generator,
    rank: int,
    world_size: int,
) -> dict[str, Any]:
    """Restore a sharded student, its optimizer and this process's random states.

    A collective: every process calls it, with the same number of processes as wrote it.

    Args:
      directory: a checkpoint directory written by ``save_sharded_checkpoint``.
      model: the sharded student, built like the one saved (mask token included).
      optimizer: a fresh optimizer over its shards.
      generator: the numpy generator to restore in place.
      rank: this process's rank.
      world_size: the number of processes.

    Returns:
      The JSON state (``step``, ``data``, ``config`` ...).

    Raises:
      ValueError: for an unknown format, an unsharded checkpoint, or one written by another
        number of processes.
    """
    # Lazy: sharded (FSDP) checkpoints only; torch.distributed.checkpoint is slow to import.
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load as load_shards

    root = Path(directory)
    state = _checked_state(root, world_size=world_size)
    check_shard_index(root)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    loaded: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state}
    load_shards(loaded, checkpoint_id=str(root), planner=_weights_only_planner())
    set_state_dict(
        model,
        optimizer,
        model_state_dict=loaded["model"],
        optim_state_dict=loaded["optimizer"],
    )
    _restore_rng_tensors(load_file(str(root / f"rng-{rank}.safetensors")))
    _restore_python_rng(_read_json(root / f"rank-{rank}.json")["python_rng"])
    generator.bit_generator.state = state["numpy_rng"]
    return state


# What torch.distributed.checkpoint's ``.metadata`` index may name: its own metadata classes,
# tensor sizes, dtypes and layouts, and paths. Anything else is refused before it is called.
_INDEX_MODULES = ("torch.distributed.checkpoint.metadata",)
_INDEX_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            module in _INDEX_MODULES
            or (module, name) in _INDEX_GLOBALS
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")
        return super().find_class(module, name)


def check_shard_index(directory: str | os.PathLike[str]) -> None:
    """Refuse a sharded checkpoint whose ``.metadata`` index names anything but metadata.

    ``torch.distributed.checkpoint`` reads that index with ``pickle.load``; this reads it first
    with an unpickler that can only build the index's own data classes, so a tampered file
    fails here instead of running code.

    Raises:
      ValueError: if the index is missing, corrupt, or names another class or function.
    """
    path = Path(directory) / ".metadata"
    try:
        with open(path, "rb") as handle:
            _IndexUnpickler(handle).load()
    except FileNotFoundError as error:
        raise ValueError(f"{path} is missing: {directory} is not a sharded checkpoint") from error
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError) as error:
        raise ValueError(
            f"{path} is not a checkpoint index written by torch.distributed.checkpoint "
            f"({error}); delete {directory} to start over"
        ) from error


def _weights_only_planner() -> Any:
    """The default load planner, reading non-tensor values with ``torch.load(weights_only=True)``
    (the default one unpickles them without restriction)."""
    # Lazy: sharded (FSDP) checkpoints only; torch.distributed.checkpoint is slow to import.
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(
                    self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded
                )
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return WeightsOnlyLoadPlanner()
