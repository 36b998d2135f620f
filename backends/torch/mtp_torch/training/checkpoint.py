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
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "latest_checkpoint",
    "load_checkpoint",
    "read_checkpoint_state",
    "save_checkpoint",
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


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = cuda_state
    return tensors


def _restore_rng_tensors(tensors: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [
        tensors[f"torch_cuda_{index}"]
        for index in range(len(tensors))
        if f"torch_cuda_{index}" in tensors
    ]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])


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
    for stale in root.glob(f".{_PREFIX}*.tmp"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{_PREFIX}{step:08d}"
    if final.exists():
        # Never replace the checkpoint latest.json may name: a new name, then the pointer.
        final = root / f"{_PREFIX}{step:08d}.{time.time_ns()}"
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
        _fsync_tree(tmp)
        os.replace(tmp, final)
        _fsync_directory(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
    state = _read_json(root / "state.json")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{root} has checkpoint format {state.get('format')!r}, this version reads "
            f"{CHECKPOINT_FORMAT}; resume with the mtp-lm version that wrote it"
        )
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
