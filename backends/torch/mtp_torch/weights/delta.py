"""Compact low-rank deltas: what a LoRA conversion changed, in one small safetensors file.

A conversion with ``DistillConfig(lora_rank=r)`` changes each adapted linear layer by a rank-``r``
product and adds one mask-token embedding row.  ``lora_delta`` collects exactly that, and
``apply_delta`` adds it to the unconverted model, which then equals the merged student: this is
how the embedded default's converted weights ship inside the package (a few MB instead of the
model).

File layout (``safetensors``; nothing is unpickled):

- ``<module>.up`` ``(out, r)`` and ``<module>.down`` ``(r, in)`` for each adapted
  ``nn.Linear`` named ``<module>`` in the unconverted model: ``W += up @ down`` (the LoRA scale
  is folded into ``down``);
- ``mtp.mask_embedding`` ``(hidden,)``: the mask token's input-embedding row, and
  ``mtp.mask_unembedding`` for a model whose output embeddings are not tied;
- or, for a mask-gated conversion (``DistillConfig(lora_gate="mask")``), the gate's tensors
  ``gate.<module>.lora_A`` / ``gate.<module>.lora_B`` / ``gate.mask_embedding`` (float32 for
  the last) and its settings as JSON in the metadata entry ``gate``: ``apply_delta`` then adds
  the gate (``mtp_torch.decoding.gated``) instead of changing any weight;
- metadata (strings): ``format`` (``DELTA_FORMAT``), ``mask_token_id`` and whatever the writer
  adds (base model, ``k_max``, threshold, the command that made it).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mtp_torch.decoding.gated import (
    GatedLinear,
    find_mask_gate,
    gate_settings,
    gate_state_dict,
    load_gate_state,
    restore_mask_gate,
)

__all__ = [
    "DELTA_FORMAT",
    "apply_delta",
    "file_sha256",
    "gated_delta",
    "load_delta",
    "load_gated_delta_into",
    "lora_delta",
    "save_delta",
]

DELTA_FORMAT = "mtp-lm-delta/1"
_MASK_ROW = "mtp.mask_embedding"
_MASK_OUT_ROW = "mtp.mask_unembedding"
_GATE_VECTOR = "gate.mask_embedding"


def lora_delta(peft_model: Any, mask_token_id: int) -> dict[str, torch.Tensor]:
    """The low-rank delta of a ``peft`` LoRA model, keyed by the base model's module names.

    Args:
      peft_model: a ``peft`` model with one (the default) LoRA adapter.
      mask_token_id: the mask token's id (its embedding rows are included).

    Returns:
      float32 CPU tensors: ``<module>.up``, ``<module>.down`` and the mask rows.
    """
    # Lazy: peft loads only for LoRA deltas (a slow import).
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    tensors: dict[str, torch.Tensor] = {}
    for name, found in base.named_modules():
        if not isinstance(found, LoraLayer):
            continue
        module: Any = found
        if "default" not in module.lora_A:
            continue
        scale = float(module.scaling["default"])
        down = module.lora_A["default"].weight.detach().float().cpu() * scale
        up = module.lora_B["default"].weight.detach().float().cpu()
        tensors[f"{name}.up"] = up.contiguous()
        tensors[f"{name}.down"] = down.contiguous()
    tensors.update(_mask_rows(base, mask_token_id))
    return tensors


def gated_delta(model: Any, mask_token_id: int) -> dict[str, torch.Tensor]:
    """The delta of a mask-gated model: its gate's tensors (``gate.`` names) and the mask rows.

    Args:
      model: a transformers model carrying a ``MaskGate``.
      mask_token_id: the mask token's id.

    Returns:
      CPU tensors for ``save_delta`` (the gate's settings go in its metadata as ``gate``).
    """
    tensors = {f"gate.{key}": value.float() for key, value in gate_state_dict(model).items()}
    tensors.update(_mask_rows(model, mask_token_id))  # reads the model, never unwraps it
    return tensors


def _mask_rows(model: Any, mask_token_id: int) -> dict[str, torch.Tensor]:
    inputs = model.get_input_embeddings().weight
    rows = {_MASK_ROW: inputs[mask_token_id].detach().float().cpu().clone()}
    output = model.get_output_embeddings()
    if isinstance(output, GatedLinear):
        output = output.base_layer
    if output is not None and output.weight is not inputs:
        rows[_MASK_OUT_ROW] = output.weight[mask_token_id].detach().float().cpu().clone()
    return rows


def save_delta(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    *,
    mask_token_id: int,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write a delta atomically (a temporary file renamed into place).

    Args:
      path: the ``.safetensors`` file to write.
      tensors: as returned by ``lora_delta``.
      mask_token_id: stored in the metadata (``apply_delta`` checks it).
      metadata: more string-valued facts (base model, ``k_max``, threshold, command).
      dtype: storage dtype of the factors (float16 halves the file; the mask rows stay float32).

    Returns:
      The written path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    stored = {
        key: (
            value if key.startswith("mtp.") or key == _GATE_VECTOR else value.to(dtype)
        ).contiguous()
        for key, value in tensors.items()
    }
    info = {str(k): str(v) for k, v in (metadata or {}).items()}
    info.update(format=DELTA_FORMAT, mask_token_id=str(int(mask_token_id)))
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(stored, tmp, metadata=info)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make a shipped file unreadable to others
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_delta(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a delta file: ``(tensors as float32, metadata)``.

    Raises:
      FileNotFoundError: if the file is missing.
      ValueError: if it is not a safetensors file, or not an mtp-lm delta.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"delta file {source} does not exist")
    try:
        with safe_open(str(source), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key).float() for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"{source} is not a readable safetensors file ({error}); it may be truncated or "
            "corrupt: write it again"
        ) from error
    if metadata.get("format") != DELTA_FORMAT:
        raise ValueError(
            f"{source} is not an mtp-lm delta (format {metadata.get('format')!r}, expected "
            f"{DELTA_FORMAT!r})"
        )
    return tensors, metadata


def apply_delta(
    model: Any,
    tensors: Mapping[str, torch.Tensor],
    mask_token_id: int,
    gate: Mapping[str, Any] | None = None,
) -> None:
    """Add a delta to ``model`` in place: ``W += up @ down`` per module, then set the mask rows.

    A gated delta (``gate.`` tensors) adds the mask gate instead and changes no weight but the
    mask rows.

    Args:
      model: the unconverted model, mask token already added (``add_mask_token``).
      tensors: as returned by ``lora_delta``, ``gated_delta`` or ``load_delta``.
      mask_token_id: the mask token's id in ``model``.
      gate: the gate's settings (``gate_settings``; a delta file's ``gate`` metadata entry,
        parsed), needed for a gated delta.

    Raises:
      ValueError: if a named module is missing or shapes do not match (a delta made for
        another model).
    """
    gate_tensors = _gate_tensors(tensors)
    if gate_tensors:
        if gate is None:
            raise ValueError("a gated delta needs its gate settings (the file's 'gate' metadata)")
        restore_mask_gate(model, mask_token_id, gate, gate_tensors, source="the delta")
    pairs = sorted(
        {key.rsplit(".", 1)[0] for key in tensors if not key.startswith(("mtp.", "gate."))}
    )
    with torch.no_grad():
        for name in pairs:
            try:
                module: Any = model.get_submodule(name)
            except AttributeError as error:
                raise ValueError(
                    f"the delta changes {name!r}, which this model does not have; it was made "
                    "for another model"
                ) from error
            weight: torch.Tensor = module.weight
            update = tensors[f"{name}.up"].float() @ tensors[f"{name}.down"].float()
            if tuple(update.shape) != tuple(weight.shape):
                raise ValueError(
                    f"the delta's {name} has shape {tuple(update.shape)}, the model's "
                    f"{tuple(weight.shape)}; it was made for another model"
                )
            weight.add_(update.to(device=weight.device, dtype=weight.dtype))
    _set_mask_rows(model, tensors, mask_token_id)


def _gate_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A delta's gate tensors, named as ``gate_state_dict`` names them."""
    return {k[len("gate.") :]: v for k, v in tensors.items() if k.startswith("gate.")}


def _set_mask_rows(model: Any, tensors: Mapping[str, torch.Tensor], mask_token_id: int) -> None:
    """The delta's mask-token embedding rows (input, and output when untied) into ``model``."""
    with torch.no_grad():
        inputs = model.get_input_embeddings().weight
        if _MASK_ROW in tensors:
            inputs[mask_token_id] = tensors[_MASK_ROW].to(inputs.device, inputs.dtype)
        output = model.get_output_embeddings()
        if isinstance(output, GatedLinear):
            output = output.base_layer
        if _MASK_OUT_ROW in tensors and output is not None and output.weight is not inputs:
            output.weight[mask_token_id] = tensors[_MASK_OUT_ROW].to(
                output.weight.device, output.weight.dtype
            )


def load_gated_delta_into(model: Any, path: str | os.PathLike[str], mask_token_id: int) -> None:
    """Copy a gated delta's adapters, mask vector and mask rows into ``model``'s own gate.

    Unlike ``apply_delta``, which installs a gate, this fills the gate ``model`` already has
    (a conversion's student, ``DistillConfig.init_delta``), so training continues from it.

    Args:
      model: a transformers model carrying a ``MaskGate`` (``add_mask_gate``).
      path: a delta written by ``save_delta`` from ``gated_delta``.
      mask_token_id: the mask token's id in ``model``.

    Raises:
      FileNotFoundError: if the file is missing.
      ValueError: for a file that is not a gated delta, or one made for another mask token,
        rank, scale or set of adapted layers (the message says which).
    """
    tensors, metadata = load_delta(path)
    gate = find_mask_gate(model)
    if gate is None:
        raise ValueError("the model has no mask gate to start from a delta")
    if "gate" not in metadata:
        raise ValueError(
            f"{path} is a merged (ungated) delta; only a delta of a lora_gate='mask' conversion "
            "can start gated adapters"
        )
    if int(metadata.get("mask_token_id", -1)) != int(mask_token_id):
        raise ValueError(
            f"{path} was made for mask token id {metadata.get('mask_token_id')}, this model's is "
            f"{mask_token_id}; it was made for another tokenizer"
        )
    saved, wanted = json.loads(metadata["gate"]), gate_settings(gate)
    differing = sorted(key for key in ("rank", "alpha", "layers") if saved.get(key) != wanted[key])
    if differing:
        shown = {key: saved.get(key) for key in differing if key != "layers"}
        raise ValueError(
            f"{path} has other gate settings for {differing} ({shown or 'other layers'}); "
            "convert with the delta's --lora-rank and --lora-alpha on every block"
        )
    load_gate_state(model, _gate_tensors(tensors), source=str(path))
    _set_mask_rows(model, tensors, mask_token_id)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file (the shipped delta's recorded checksum is checked with it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
