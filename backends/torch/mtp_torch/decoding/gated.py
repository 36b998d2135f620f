"""Mask-gated low-rank adapters: MTP that leaves the base model's own predictions bitwise unchanged.

Samragh et al. 2025, "Your LLM Knows the Future" (arXiv 2507.11851): a LoRA update that acts only
on rows whose input token is the ``<mtp_mask>`` token, ``y = W x + s B A x`` at mask rows and
``y = W x`` elsewhere (docs/method: "Mask-gated adapters").  Real tokens never attend to a mask
position (causal attention at inference, the packed layout's mask in training), so every real
row, its cache entries and its next-token logits are exactly the base model's: ``StaticK(1)`` and
``verify=True`` reproduce the base model's greedy decoding by construction.

How it is wired (all of it a decoding concern; training only trains the parameters):

- each target linear layer of every transformer block (``nn.Linear``, or transformers'
  ``Conv1D``) is replaced by a ``GatedLinear`` that holds the untouched layer as ``base_layer``
  and calls it over all rows (so a kernel that swaps the compute of plain ``nn.Linear`` modules,
  such as ``skinny_linear``, still applies), then computes the low-rank update on the gathered
  mask rows only and writes it into those rows with ``index_add``: real rows keep the base
  product's bits;
- which rows are mask rows is read per forward from the input ids by a forward hook on the input
  embedding module and handed to the adapters through a ``contextvars.ContextVar`` keyed by the
  gate (per thread and per call; two models never mix);
- the mask token's input embedding is a trainable vector owned by the gate that replaces the
  embedding output at mask rows; the (possibly tied) embedding matrix is never changed, so real
  rows' logits, the mask-id column of a tied output layer included, stay the base model's.

A gated model cannot be merged into plain weights.  ``MTPModel.save_pretrained`` writes the base
weights unchanged (``AutoModelForCausalLM`` loads the exact base model), the adapter as
``GATE_FILE`` and the gate's settings under ``GATE_CONFIG_KEY`` in the config.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

__all__ = [
    "GATE_CONFIG_KEY",
    "GATE_FILE",
    "GatedLinear",
    "MaskGate",
    "add_mask_gate",
    "find_blocks",
    "find_mask_gate",
    "gated_layers",
    "load_saved_gate",
    "gate_settings",
    "gate_state_dict",
    "load_gate_state",
    "plain_layers",
    "plain_state_dict",
    "read_gate_file",
    "restore_mask_gate",
    "write_gate_file",
]

GATE_CONFIG_KEY = "mtp_gate"
"""Config key of a gated save: ``{"kind": "mask", "rank": r, "alpha": a, "layers": [...]}``."""

GATE_FILE = "mtp_gate.safetensors"
"""The adapter file a gated ``save_pretrained`` writes beside the base weights."""

_GATE_MODULE = "mtp_gate"
_MASK_EMBEDDING = "mask_embedding"
_GATE_FORMAT = "mtp-lm-gate/1"


class _GateKey:
    """Identifies one gate in the context variable (a deep copy of a model gets its own)."""

    __slots__ = ()


# Per gate, the flat indices of the current forward's mask rows and the number of rows
# (batch * length); ``None`` while a forward has no ids (``inputs_embeds``): no adapter then.
_MASK_ROWS: contextvars.ContextVar[Mapping[_GateKey, tuple[torch.Tensor, int] | None]] = (
    contextvars.ContextVar("mtp_mask_rows", default=types.MappingProxyType({}))
)


def _set_rows(key: _GateKey, rows: tuple[torch.Tensor, int] | None) -> None:
    _MASK_ROWS.set(types.MappingProxyType({**_MASK_ROWS.get(), key: rows}))


def _features(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a transformers ``Conv1D``."""
    if isinstance(layer, nn.Linear):
        return int(layer.in_features), int(layer.out_features)
    weight = layer.weight  # Conv1D: (in, out)
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[0]), int(weight.shape[1])


def _is_target(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or type(layer).__name__ == "Conv1D"


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters train in float32 next to half-precision weights, else in the weights' dtype."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


class GatedLinear(nn.Module):
    """A linear layer plus a low-rank update applied at the mask rows only.

    Args:
      base_layer: the layer adapted (``nn.Linear`` or ``Conv1D``), kept untouched and called.
      rank: rank ``r`` of the update.
      scale: ``alpha / r``; the update is ``scale * B A x``.
      key: the owning gate's key (where the mask rows are read).

    Attributes:
      base_layer: the original layer.
      lora_A: ``(r, in)`` down projection (Kaiming-uniform, as ``peft``).
      lora_B: ``(out, r)`` up projection (zeros: a new gate changes nothing).
      scale: the update's scale.
    """

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, key: _GateKey):
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        assert isinstance(weight, torch.Tensor)
        in_features, out_features = _features(base_layer)
        dtype = _adapter_dtype(weight)
        self.lora_A = nn.Parameter(
            torch.empty(rank, in_features, dtype=dtype, device=weight.device)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(out_features, rank, dtype=dtype, device=weight.device)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = float(scale)
        self._key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base_layer(x)``, plus ``scale * B A x`` written into the mask rows only."""
        base: torch.Tensor = self.base_layer(x)
        rows = _MASK_ROWS.get().get(self._key)
        if rows is None or rows[0].numel() == 0:
            return base
        index, total = rows
        flat_x = x.reshape(-1, x.shape[-1])
        if flat_x.shape[0] != total:
            raise RuntimeError(
                f"a gated layer saw {flat_x.shape[0]} rows but the input had {total} tokens; "
                "mask-gated adapters need every adapted layer to see one row per input token "
                "(mixture-of-experts layers are not supported)"
            )
        picked = flat_x.index_select(0, index)
        flat = base.reshape(-1, base.shape[-1])
        if not torch.is_grad_enabled() and picked.dtype == self.lora_A.dtype == flat.dtype:
            # Decoding: four ops, the update added in place into the fresh base output (each
            # op is a dispatch on every adapted layer of every pass, so they are counted).
            update = torch.mm(torch.mm(picked, self.lora_A.t()), self.lora_B.t())
            return flat.index_add_(0, index, update, alpha=self.scale).reshape(base.shape)
        update = (picked.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t() * self.scale
        return flat.index_add(0, index, update.to(flat.dtype)).reshape(base.shape)


class MaskGate(nn.Module):
    """The gate of a model: the mask token's input embedding and the adapters' settings.

    Registered on the model as ``mtp_gate``; its hooks set, per forward, which rows are mask
    rows (see the module docstring).

    Attributes:
      mask_token_id: the ``<mtp_mask>`` id whose rows the adapters act on.
      rank: the adapters' rank.
      alpha: the scale numerator (``scale = alpha / rank``).
      layers: paths of the adapted layers in the model.
      mask_embedding: ``(hidden,)`` the input embedding of the mask token (trainable).
    """

    def __init__(
        self,
        mask_token_id: int,
        rank: int,
        alpha: float,
        layers: Sequence[str],
        mask_embedding: torch.Tensor,
    ):
        super().__init__()
        self.mask_token_id = int(mask_token_id)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.layers = tuple(layers)
        self.mask_embedding = nn.Parameter(mask_embedding.detach().clone())
        self.key = _GateKey()
        self.handles: list[Any] = []

    def reset_rows(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook of the decoder: no mask rows until the embedding sees the ids."""
        _set_rows(self.key, None)

    def embed(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        """Forward hook of the input embedding: record the mask rows, put the gate's vector
        there (the embedding matrix itself is never read at mask rows)."""
        ids = args[0] if args else None
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
            _set_rows(self.key, None)
            return output
        flat_ids = ids.reshape(-1)
        index = (flat_ids == self.mask_token_id).nonzero().reshape(-1)
        _set_rows(self.key, (index, int(flat_ids.shape[0])))
        if index.numel() == 0:
            return output
        flat = output.reshape(-1, output.shape[-1])
        vectors = self.mask_embedding.to(flat.dtype).expand(index.shape[0], -1)
        return flat.index_copy(0, index, vectors).reshape(output.shape)


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


def find_mask_gate(model: Any) -> MaskGate | None:
    """The ``MaskGate`` of a model (``None`` for a plain or merged one)."""
    gate = getattr(model, _GATE_MODULE, None)
    return gate if isinstance(gate, MaskGate) else None


def _target_paths(model: Any, layers: Sequence[int] | None) -> list[str]:
    """Paths of the linear layers of the chosen blocks (``None``: all blocks)."""
    blocks = find_blocks(model)
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    chosen = range(len(blocks)) if layers is None else layers
    paths = []
    for index in chosen:
        for name, module in blocks[index].named_modules():
            if name and _is_target(module):
                paths.append(f"{prefix}.{index}.{name}")
    return paths


def _install(model: Any, gate: MaskGate) -> None:
    """Wrap the gate's layers and register the gate and its hooks on ``model``."""
    scale = gate.alpha / gate.rank
    for path in gate.layers:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        layer = getattr(parent, name)
        if isinstance(layer, GatedLinear):
            raise ValueError(f"{path} is already gated; a model takes one gate")
        setattr(parent, name, GatedLinear(layer, gate.rank, scale, gate.key))
    model.add_module(_GATE_MODULE, gate)
    gate.handles = [
        model.base_model.register_forward_pre_hook(gate.reset_rows),
        model.get_input_embeddings().register_forward_hook(gate.embed),
    ]


def add_mask_gate(
    model: Any,
    mask_token_id: int,
    rank: int,
    alpha: float | None = None,
    *,
    layers: Sequence[int] | None = None,
    seed: int = 0,
) -> MaskGate:
    """Give ``model`` mask-gated adapters on every linear layer of the chosen blocks, in place.

    A new gate changes nothing (``lora_B`` is zero and the mask vector is the mask token's
    current embedding output); training moves its parameters.

    Args:
      model: a transformers causal LM whose vocabulary holds the mask token.
      mask_token_id: the ``<mtp_mask>`` id.
      rank: the adapters' rank (``> 0``).
      alpha: scale numerator; ``None``: ``rank`` (a scale of 1).
      layers: indices of the blocks that get adapters; ``None``: all.
      seed: seeds the adapters' initialisation.

    Returns:
      The gate (also ``model.mtp_gate``).

    Raises:
      ValueError: for a rank below 1, a model already gated, or blocks without linear layers.
    """
    if isinstance(rank, bool) or int(rank) < 1:
        raise ValueError(f"a mask gate needs lora_rank >= 1, got {rank!r}")
    if find_mask_gate(model) is not None:
        raise ValueError("the model already has a mask gate")
    paths = _target_paths(model, layers)
    if not paths:
        raise ValueError(f"{type(model).__name__} has no linear layers in its blocks to gate")
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        ids = torch.tensor([[int(mask_token_id)]], device=embedding.weight.device)
        vector = embedding(ids)[0, 0].float()
    gate = MaskGate(
        mask_token_id, int(rank), float(rank if alpha is None else alpha), paths, vector
    )
    gate.to(embedding.weight.device)
    torch.manual_seed(seed)
    _install(model, gate)
    return gate


def gate_settings(gate: MaskGate) -> dict[str, Any]:
    """The gate's settings as stored under ``GATE_CONFIG_KEY`` (JSON values)."""
    return {"kind": "mask", "rank": gate.rank, "alpha": gate.alpha, "layers": list(gate.layers)}


def gated_layers(model: Any) -> Iterator[tuple[str, GatedLinear]]:
    """``(path, layer)`` of every ``GatedLinear`` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, GatedLinear):
            yield name, module


def gate_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The gate's tensors (CPU, detached): ``<layer>.lora_A``, ``<layer>.lora_B`` and
    ``mask_embedding``, named by the adapted layers' paths in the model."""
    gate = find_mask_gate(model)
    if gate is None:
        raise ValueError("the model has no mask gate")
    tensors = {_MASK_EMBEDDING: gate.mask_embedding.detach().cpu().clone()}
    for name, layer in gated_layers(model):
        tensors[f"{name}.lora_A"] = layer.lora_A.detach().cpu().clone()
        tensors[f"{name}.lora_B"] = layer.lora_B.detach().cpu().clone()
    return tensors


def load_gate_state(model: Any, tensors: Mapping[str, torch.Tensor], source: str = "") -> None:
    """Copy a gate's tensors (``gate_state_dict``) into ``model``'s gate, checking every name
    and shape.

    Raises:
      ValueError: naming what is missing, unexpected or of the wrong shape.
    """
    gate = find_mask_gate(model)
    if gate is None:
        raise ValueError("the model has no mask gate to load into")
    targets: dict[str, torch.Tensor] = {_MASK_EMBEDDING: gate.mask_embedding}
    for name, layer in gated_layers(model):
        targets[f"{name}.lora_A"] = layer.lora_A
        targets[f"{name}.lora_B"] = layer.lora_B
    where = f" in {source}" if source else ""
    missing = sorted(set(targets) - set(tensors))
    extra = sorted(set(tensors) - set(targets))
    if missing or extra:
        raise ValueError(
            f"the gate adapter{where} does not fit this model (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); it was written for another model or is incomplete"
        )
    with torch.no_grad():
        for name, target in targets.items():
            value = tensors[name]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"the gate adapter{where} has {name} of shape {tuple(value.shape)}, the "
                    f"model's is {tuple(target.shape)}; it was written for another model"
                )
            target.copy_(value.to(dtype=target.dtype, device=target.device))


def restore_mask_gate(
    model: Any,
    mask_token_id: int,
    settings: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    source: str = "",
) -> MaskGate:
    """Rebuild a saved gate on ``model`` from its settings and tensors.

    Raises:
      ValueError: for settings of another kind of gate or tensors that do not fit.
    """
    if settings.get("kind") != "mask" or "rank" not in settings or "layers" not in settings:
        raise ValueError(f"unknown gate settings {dict(settings)!r}; expected kind 'mask'")
    embedding = model.get_input_embeddings()
    gate = MaskGate(
        mask_token_id,
        int(settings["rank"]),
        float(settings.get("alpha", settings["rank"])),
        [str(path) for path in settings["layers"]],
        torch.zeros(int(embedding.weight.shape[1]), device=embedding.weight.device),
    )
    try:
        _install(model, gate)
    except AttributeError as error:
        raise ValueError(f"the gate names a layer this model lacks ({error})") from error
    load_gate_state(model, tensors, source)
    return gate


def plain_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """``model``'s tensors as without its gate: the base layers' under their original names, no
    adapter or gate tensor.  The model is only read (other threads may be decoding with it)."""
    gated = {name: f"{name}.base_layer." for name, _ in gated_layers(model)}
    plain: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith(f"{_GATE_MODULE}."):
            continue
        owner = key.rpartition(".")[0]
        if owner in gated:  # an adapter's own tensor (lora_A, lora_B)
            continue
        for name, prefix in gated.items():
            if key.startswith(prefix):
                key = f"{name}.{key[len(prefix) :]}"
                break
        plain[key] = value
    return plain


@contextlib.contextmanager
def plain_layers(model: Any) -> Iterator[None]:
    """Within the block, ``model`` holds its original layers and no gate (for saving the base
    weights); the gate is put back on exit, also on error."""
    gate = find_mask_gate(model)
    if gate is None:
        yield
        return
    wrapped = list(gated_layers(model))
    for name, layer in wrapped:
        parent_path, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_path), leaf, layer.base_layer)
    del model._modules[_GATE_MODULE]
    try:
        yield
    finally:
        for name, layer in wrapped:
            parent_path, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_path), leaf, layer)
        model.add_module(_GATE_MODULE, gate)


def write_gate_file(model: Any, directory: Path) -> None:
    """Write ``GATE_FILE`` (float32 tensors, settings in the metadata) into ``directory``."""
    gate = find_mask_gate(model)
    assert gate is not None
    metadata = {"format": _GATE_FORMAT, "settings": json.dumps(gate_settings(gate))}
    tensors = {key: value.float().contiguous() for key, value in gate_state_dict(model).items()}
    save_file(tensors, str(directory / GATE_FILE), metadata=metadata)


def read_gate_file(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of a directory's ``GATE_FILE``.

    Raises:
      FileNotFoundError: if the file is missing (the config says the model is gated).
      ValueError: if it is not a readable gate file.
    """
    path = directory / GATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is a mask-gated MTP model but its adapter {GATE_FILE} is missing; "
            "copy the whole directory, or save it again (AutoModelForCausalLM still loads the "
            "base model from it)"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"the gate adapter {path} cannot be read ({' '.join(str(error).split())}); it is "
            "truncated or corrupt: save or download it again"
        ) from error
    if metadata.get("format") != _GATE_FORMAT:
        raise ValueError(
            f"{path} is not an mtp-lm gate adapter (format {metadata.get('format')!r})"
        )
    return tensors


def load_saved_gate(model: Any, mask_token_id: int, directory: Path) -> MaskGate | None:
    """Restore the gate of a gated save (config key ``GATE_CONFIG_KEY``) from its
    ``GATE_FILE``; ``None`` (and nothing done) for a save without a gate.

    Raises:
      FileNotFoundError: if the config says gated but the adapter file is missing.
      ValueError: if the file is corrupt or does not fit the model.
    """
    settings = getattr(model.config, GATE_CONFIG_KEY, None)
    if not isinstance(settings, dict):
        return None
    tensors = read_gate_file(directory)
    return restore_mask_gate(model, mask_token_id, settings, tensors, source=str(directory))
