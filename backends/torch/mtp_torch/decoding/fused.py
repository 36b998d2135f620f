"""The fused decoding backend: one compiled call per pass for Llama-family models on the CPU.

At batch 1 a pass of a small model is cheap in arithmetic and dear in everything else: on the
default 135M model, transformers' forward spends about as long in the Python of its 30 blocks,
its mask building and a cache that grows by concatenation as in the weight products themselves,
and that overhead grows with the pass width.  ``FusedBackend`` runs the whole pass as one call
into the compiled extension (``csrc/forward.h``): the products on the few-row kernel (or ATen's
where the kernel plan says stock), attention of the block's queries over preallocated key/value
buffers, and the output layer only at the rows the step reads.  The cache is a pair of buffers
plus a length, so cropping a step's mask slots costs nothing.

It serves the models whose forward it restates exactly (``fused_unavailable_reason`` says why
another does not): ``LlamaForCausalLM`` and ``MistralForCausalLM`` without sliding window, SiLU
MLPs, no biases, float32 or float64 weights on the CPU, plain or mask-gated
(``mtp_torch.decoding.gated``) ``Linear`` layers.  The input embedding and the rotary tables come
from the model's own modules (so the gate's mask vector and every RoPE variant are the model's).
The arithmetic follows transformers' Llama modules step by step: float64 models give the same
tokens as transformers, float32 models agree to rounding (like every non-stock kernel).

``MTPModel`` uses it when its kernel plan runs the native kernel (``linear_kernel="native"``, or
``"auto"`` where the calibration chose it) and the model qualifies; ``MTP_LM_FUSED=0`` turns it
off (the per-module kernels then run inside transformers' forward).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import attrs
import numpy as np
import torch
from torch import nn

from mtp_core import Sampling, StepInputs, StepOutputs
from mtp_torch.decoding.backend import IntArray, TorchBackend
from mtp_torch.decoding.gated import GatedLinear, find_mask_gate
from mtp_torch.decoding.native import load_native
from mtp_torch.decoding.packing import pack_weight
from mtp_torch.decoding.plan import MAX_PLAN_ROWS, KernelPlan

__all__ = [
    "FUSED_ENV",
    "PACKED_ENV",
    "FusedBackend",
    "FusedCache",
    "fused_unavailable_reason",
    "native_widths",
    "observe_passes",
    "packed_by_default",
]

_OBSERVERS: ContextVar[tuple[list[int], ...]] = ContextVar("mtp_fused_observers", default=())


@contextmanager
def observe_passes() -> Iterator[list[int]]:
    """Record the width of every fused pass run inside the block (in this context).

    The fused pass never calls the model's ``forward``, so a forward hook on the model (what
    the benchmark counts passes with for transformers' forward) sees none of its passes.

    Yields:
      The list the widths are appended to, one per pass (a prefill included).
    """
    widths: list[int] = []
    token = _OBSERVERS.set((*_OBSERVERS.get(), widths))
    try:
        yield widths
    finally:
        _OBSERVERS.reset(token)


FUSED_ENV = "MTP_LM_FUSED"
"""Environment variable: ``0`` keeps decoding in transformers' forward even with native kernels."""

PACKED_ENV = "MTP_LM_PACKED"
"""Environment variable: ``1`` lets the fused pass read weights that are exactly a GGUF
Q4_1/Q8_0 dequantization in packed form (``mtp_torch.decoding.packing``); the results are the
same bits either way, only the bytes read differ.  Off by default: it makes a one-token pass of
the default ~2.8x faster but a 4+3 one only ~1.8x, so MTP's own gain shrinks (docs/results.md,
eleventh session)."""


def packed_by_default() -> bool:
    """Whether a backend built without an explicit ``packed_weights`` packs (``PACKED_ENV``)."""
    return os.environ.get(PACKED_ENV, "0").strip() == "1"

_MODEL_CLASSES = ("LlamaForCausalLM", "MistralForCausalLM")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_GROWTH = 256  # cache slots added beyond what a pass needs when the buffers grow


def native_widths(plan: KernelPlan) -> int:
    """Bit ``n - 1`` set when a pass of ``n`` rows runs the few-row kernel under ``plan``."""
    bits = 0
    for rows in range(1, MAX_PLAN_ROWS + 1):
        if plan.implementation(rows) != "stock":
            bits |= 1 << (rows - 1)
    return bits


def _linear_weight(layer: nn.Module) -> tuple[torch.Tensor, GatedLinear | None] | str:
    """The plain weight of a product (and its gate wrapper), or why it is not plain."""
    gated = layer if isinstance(layer, GatedLinear) else None
    base = layer.base_layer if gated is not None else layer
    if not isinstance(base, nn.Linear):
        return f"{type(base).__name__} is not an nn.Linear"
    if base.bias is not None:
        return "a product has a bias"
    return base.weight, gated


def _config_reason(model: Any) -> str | None:
    if type(model).__name__ not in _MODEL_CLASSES:
        return f"{type(model).__name__} is not one of {', '.join(_MODEL_CLASSES)}"
    config = model.config
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act={config.hidden_act!r} (the fused pass runs SiLU)"
    if getattr(config, "sliding_window", None) is not None:
        return "the model uses a sliding window"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    return None


def fused_unavailable_reason(model: Any) -> str | None:
    """Why ``FusedBackend`` cannot serve ``model`` (``None`` when it can).

    Args:
      model: a transformers causal LM.

    Returns:
      ``None``, or one sentence: a model class or configuration it does not restate, weights
      off the CPU or in another dtype, a module it does not know, hooks that would be skipped,
      the environment switch, or the compiled extension missing.
    """
    if os.environ.get(FUSED_ENV, "1").strip() == "0":
        return f"disabled by {FUSED_ENV}=0"
    reason = _config_reason(model)
    if reason is not None:
        return reason
    # The gate's mask vector is float32 by design and cast at the embedding: not a product.
    weights = [p for name, p in model.named_parameters() if not name.endswith("mask_embedding")]
    if any(
        w.device.type != "cpu" or w.dtype not in (torch.float32, torch.float64) for w in weights
    ):
        return "the fused pass needs float32 or float64 weights on the CPU"
    if len({w.dtype for w in weights}) != 1:
        return "the model mixes dtypes"
    if any(hasattr(module, "_hf_hook") for module in model.modules()):
        return "the model has accelerate hooks (offloading or device maps)"
    try:
        _gather(model, materialize=False)  # the structure only: no copies for a yes/no answer
    except ValueError as error:
        return str(error)
    if load_native() is None:
        return "the compiled extension is unavailable"
    return None


def built_from(model: Any) -> tuple[Any, ...]:
    """What a ``FusedBackend`` built for ``model`` depends on: each parameter's name, storage,
    version (bumped by every in-place change), dtype, device and shape, whether any module has
    accelerate hooks, and the environment switch.  Equal values mean a backend built before
    still computes ``model``'s pass, at a fraction of a new backend's cost (~1 ms against
    ~12 ms a ``generate`` call on the 135M default)."""
    parameters = tuple(
        (name, p.data_ptr(), p._version, p.dtype, p.device.type, tuple(p.shape))
        for name, p in model.named_parameters()
    )
    hooked = any(hasattr(module, "_hf_hook") for module in model.modules())
    switches = (os.environ.get(FUSED_ENV, "1").strip(), packed_by_default())
    return switches, hooked, parameters


@attrs.define(eq=False)
class _Weights:
    blocks: list[torch.Tensor]
    adapters: list[torch.Tensor]
    scales: list[float]
    final_norm: torch.Tensor
    head: torch.Tensor
    packed: list[torch.Tensor]
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    eps: float
    scaling: float
    mask_token_id: int | None


def _float16_exact(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of these float32 tensors is a float16 number (a delta shipped in
    float16 loads as such)."""
    return all(
        t.dtype == torch.float32 and torch.equal(t.detach().half().float(), t.detach())
        for t in tensors
        if t.numel()
    )


def _packed_tensors(products: list[torch.Tensor], head: torch.Tensor) -> list[torch.Tensor]:
    """``fused_forward``'s ``packed`` argument: ``(q, scales)`` per product (7 a block: those
    that pack whole; then the output layer: its leading rows that pack, the rest read in
    float32, as the row of a token added to the vocabulary after the quantization), empty
    where none does, or ``[]`` when nothing packs."""
    empty = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.float32)]
    tensors: list[torch.Tensor] = []
    found = False
    for index, weight in enumerate([*products, head]):
        packed = pack_weight(weight)
        if packed is None or (index < len(products) and packed.rows < weight.shape[0]):
            tensors += empty
            continue
        tensors += [packed.q, packed.scales]
        found = True
    return tensors if found else []


def _gather(
    model: Any,
    materialize: bool = True,
    half_adapters: bool | None = None,
    packed_weights: bool = True,
) -> _Weights:
    """The tensors of every block, in the order ``fused_forward`` reads them.

    ``materialize=False`` checks the structure and skips the contiguous copies, for callers
    that only ask whether the pass applies.  ``half_adapters``: store the gate's adapters in
    float16 (``None``: when that keeps every value, the float32 results bitwise; the mask rows'
    update then streams half the bytes).  ``packed_weights``: also keep the products' weights
    that a GGUF Q4_1/Q8_0 quantization produced in packed form (``mtp_torch.decoding.packing``;
    the same float32 values, read in a fifth to a quarter of the bytes).
    """
    ready = (lambda t: t.detach().contiguous()) if materialize else (lambda t: t)
    blocks: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []  # the 7 products of every block, in fused_forward's order
    adapters: list[torch.Tensor] = []
    scales: list[float] = []
    gate = find_mask_gate(model)
    empty = torch.empty(0, dtype=model.lm_head.weight.dtype)
    decoder = model.model
    for layer in decoder.layers:
        attention, mlp = layer.self_attn, layer.mlp
        products = [getattr(attention, name) for name in _ATTENTION]
        products += [getattr(mlp, name) for name in _MLP]
        found = [_linear_weight(product) for product in products]
        for item in found:
            if isinstance(item, str):
                raise ValueError(item)
        pairs = [item for item in found if not isinstance(item, str)]
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if any(not isinstance(norm.weight, torch.Tensor) for norm in norms):
            raise ValueError("a block's norm has no weight")
        q, k, v, o, g, u, d = (weight for weight, _ in pairs)
        blocks += [norms[0].weight, q, k, v, o, norms[1].weight, g, u, d]
        weights += [q, k, v, o, g, u, d]
        for _, wrapper in pairs:
            if wrapper is None:
                adapters += [empty, empty]
                scales.append(0.0)
            else:
                adapters += [wrapper.lora_A, wrapper.lora_B]
                scales.append(float(wrapper.scale))
        if any(a.dtype != empty.dtype for a in adapters):
            raise ValueError("the adapters' dtype differs from the model's")
    attention = decoder.layers[0].self_attn
    config = model.config
    head = model.lm_head
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError("the output layer is not a plain nn.Linear")
    if gate and materialize and half_adapters is not False:
        if not _float16_exact(adapters):
            if half_adapters:
                raise ValueError("half_adapters: the adapters hold values float16 cannot represent")
        else:
            adapters = [tensor.detach().half() for tensor in adapters]
    blocks = [ready(tensor) for tensor in blocks]
    head_weight = ready(head.weight)
    packed: list[torch.Tensor] = []
    if materialize and packed_weights and head_weight.dtype == torch.float32:
        packed = _packed_tensors(weights, head_weight)
    return _Weights(
        blocks=blocks,
        adapters=[ready(tensor) for tensor in adapters] if gate else [],
        scales=scales if gate else [],
        final_norm=decoder.norm.weight.detach(),
        head=head_weight,
        packed=packed,
        heads=int(config.num_attention_heads),
        kv_heads=int(config.num_key_value_heads),
        head_dim=int(attention.head_dim),
        layers=len(decoder.layers),
        eps=float(decoder.norm.variance_epsilon),
        scaling=float(attention.scaling),
        mask_token_id=None if gate is None else gate.mask_token_id,
    )


@attrs.define(eq=False)
class FusedCache:
    """Preallocated keys and values ``(layers, batch, kv_heads, capacity, head_dim)`` and the
    number of slots in use (the same for every row)."""

    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0

    def reserve(self, slots: int) -> None:
        """Grow the buffers (copying the used slots) so that they hold ``slots`` slots."""
        capacity = int(self.keys.shape[3])
        if slots <= capacity:
            return
        shape = list(self.keys.shape)
        shape[3] = max(slots + _GROWTH, 2 * capacity)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_empty(shape)
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)


class FusedBackend(TorchBackend):
    """``TorchBackend`` whose passes are one compiled call (see the module docstring).

    Args:
      model: a model ``fused_unavailable_reason`` accepts.
      plan: the kernel plan (which pass widths run the few-row kernel).
      half_adapters: keep a gate's adapters in float16; ``None`` (default): when every value
        is a float16 number, as in a delta shipped in float16, so that the results are bitwise
        those of float32 storage and the mask rows' update reads half the bytes.
      packed_weights: read the float32 weights that are exactly a GGUF Q4_1/Q8_0
        dequantization (the embedded default's) in packed form: bitwise the same results, a
        fifth of the bytes a pass streams (``mtp_torch.decoding.packing``).  ``None``
        (default): only with ``MTP_LM_PACKED=1``.  Packing the 135M default takes ~2 s when
        the backend is built; weights that are not such values are left as they are.

    Raises:
      ValueError: for a model the fused pass does not serve (the reason says which), or
        ``half_adapters=True`` with adapters float16 cannot hold.
    """

    def __init__(
        self,
        model: Any,
        plan: KernelPlan,
        *,
        half_adapters: bool | None = None,
        packed_weights: bool | None = None,
    ) -> None:
        super().__init__(model)
        reason = fused_unavailable_reason(model)
        if reason is not None:
            raise ValueError(f"the fused backend cannot run this model: {reason}")
        self._native = load_native()
        if packed_weights is None:
            packed_weights = packed_by_default()
        packed_weights = packed_weights and bool(self._native.has_simd())
        self._weights = _gather(model, half_adapters=half_adapters, packed_weights=packed_weights)
        self._few = native_widths(plan)

    def new_cache(self, batch_size: int) -> FusedCache:  # type: ignore[override]
        """Empty buffers for ``batch_size`` rows (they grow on the first pass)."""
        w = self._weights
        shape = (w.layers, int(batch_size), w.kv_heads, 0, w.head_dim)
        dtype = w.head.dtype
        return FusedCache(torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype))

    def cache_length(self, cache: FusedCache) -> int:  # type: ignore[override]
        """Number of slots the cache holds."""
        return int(cache.length)

    def forward(  # type: ignore[override]
        self, cache: FusedCache, inputs: StepInputs, sampling: Sampling, seed: int
    ) -> tuple[StepOutputs, FusedCache]:
        """One pass over the planned block (see ``TorchBackend.forward``)."""
        w = self._weights
        ids = torch.from_numpy(np.ascontiguousarray(inputs.token_ids, dtype=np.int64))
        positions = torch.from_numpy(np.ascontiguousarray(inputs.position_ids, dtype=np.int64))
        batch, width = ids.shape
        for observer in _OBSERVERS.get():
            observer.append(int(width))
        if batch != cache.keys.shape[1]:
            raise ValueError(f"the cache holds {cache.keys.shape[1]} rows, the step {batch}")
        past = cache.length
        cache.reserve(past + width)
        read_index = np.asarray(inputs.read_index, dtype=np.int64)
        read = (np.arange(batch)[:, None] * width + read_index).reshape(-1)
        allowed = torch.from_numpy(np.ascontiguousarray(inputs.attention_mask, dtype=np.uint8))
        with torch.inference_mode():
            hidden = self.model.get_input_embeddings()(ids)  # the gate's mask vector included
            cos, sin = self.model.model.rotary_emb(hidden, positions)
            gated: list[int] = []
            if w.mask_token_id is not None:
                gated = np.flatnonzero(inputs.token_ids.reshape(-1) == w.mask_token_id).tolist()
            logits = self._native.fused_forward(
                hidden.contiguous(), cos.contiguous(), sin.contiguous(), allowed, gated,
                w.blocks, w.adapters, w.scales, w.packed, cache.keys, cache.values, w.final_norm, w.head,
                read.tolist(), w.heads, past, w.eps, w.scaling, self._few,
            )  # fmt: skip
            cache.length = past + width
            read_logits = logits.view(batch, read_index.shape[1], -1)
            tokens, confidences = self._read_out(read_logits, sampling, seed)
            packed = torch.stack([tokens.to(torch.float64), confidences.to(torch.float64)])
            host = packed.numpy()
        outputs = StepOutputs(
            tokens=host[0].astype(np.int64), confidences=np.clip(host[1], 0.0, 1.0)
        )
        return outputs, cache

    def crop(self, cache: FusedCache, length: int) -> FusedCache:  # type: ignore[override]
        """Keep the first ``length`` slots (no copy: the length shrinks)."""
        cache.length = min(cache.length, int(length))
        return cache

    def reindex(  # type: ignore[override]
        self, cache: FusedCache, rows: IntArray, slots: IntArray | None
    ) -> FusedCache:
        """Gather rows and, optionally, per-row slots (``new[b, j] = old[rows[b], slots[b, j]]``)."""
        row_index = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
        with torch.inference_mode():
            keys = cache.keys[:, row_index, :, : cache.length]
            values = cache.values[:, row_index, :, : cache.length]
            if slots is not None:
                index = torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64))
                index = index[None, :, None, :, None].expand(
                    keys.shape[0], -1, keys.shape[2], -1, keys.shape[4]
                )
                keys, values = torch.gather(keys, 3, index), torch.gather(values, 3, index)
        return FusedCache(keys.contiguous(), values.contiguous(), int(keys.shape[3]))
