"""Autocast that casts the frozen linear weights once per run instead of at every call.

Under ``torch.autocast`` a linear layer's float32 weight is cast to bfloat16 each time the layer
runs; PyTorch keeps a cast only for leaf tensors that require gradients, so the frozen weights
(the whole base model in LoRA and gated training, and a separate teacher) are cast again on
every forward pass.  On a CPU with fast bfloat16 products (AMX, AVX-512 BF16) those casts cost
more than the products: profiled on a 2-core Xeon with AMX, a gated step of the default model
(batch 2 x 400 slots) spent ~0.4 s of ~1.5 s in ``aten::copy_`` and ~0.33 s in ``aten::mm``.

``FrozenCastAutocast`` is the autocast context with one difference: while it is entered, each
frozen ``nn.Linear`` (weight not requiring gradients) runs on a bfloat16 copy of its weight
made once (and made again only if the weight changes in place).  Autocast would have rounded
the weight the same way (round to nearest even), so every product, and the whole trajectory,
is bitwise the same; outside the context the layers are untouched, so saving and decoding see
the float32 weights.  The copies cost the frozen linears' size in bfloat16 (half their float32
bytes), which is why it is used on the CPU only (``mtp_torch.training.state``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FrozenCastAutocast", "frozen_linears"]


def frozen_linears(models: list[nn.Module], device_type: str) -> list[nn.Linear]:
    """The ``nn.Linear`` layers of ``models`` (each once) whose float32 weight is frozen and on
    ``device_type``: those autocast would cast again at every call."""
    seen: set[int] = set()
    found = []
    for model in models:
        for module in model.modules():
            if type(module) is not nn.Linear or id(module) in seen:
                continue
            seen.add(id(module))
            weight = module.weight
            if (
                not weight.requires_grad
                and weight.dtype == torch.float32
                and weight.device.type == device_type
            ):
                found.append(module)
    return found


class _CastForward:
    """A frozen layer's forward on its cast weight (installed as the instance's ``forward``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight = weight
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class FrozenCastAutocast:
    """``torch.autocast(device_type, dtype)`` whose frozen linear layers use weights cast once.

    Re-enterable (one use at a time, as ``torch.autocast``); the casts are made on the first
    entry and kept, and a layer whose weight was changed in place since is cast again.

    Args:
      device_type: the autocast device type (``"cpu"``).
      dtype: the autocast dtype (``torch.bfloat16``).
      layers: the frozen layers (``frozen_linears``).
    """

    def __init__(self, device_type: str, dtype: torch.dtype, layers: list[nn.Linear]):
        self.device_type = device_type
        self.dtype = dtype
        self.layers = layers
        self._casts: dict[int, tuple[int, torch.Tensor]] = {}  # id -> (weight version, cast)
        self._autocast: torch.autocast | None = None

    def _cast(self, layer: nn.Linear) -> torch.Tensor:
        weight = layer.weight
        version = weight._version
        held = self._casts.get(id(layer))
        if held is None or held[0] != version:
            with torch.no_grad():
                held = (version, weight.detach().to(self.dtype))
            self._casts[id(layer)] = held
        return held[1]

    def __enter__(self) -> FrozenCastAutocast:
        if self._autocast is not None:
            raise RuntimeError("FrozenCastAutocast is already entered")
        self._autocast = torch.autocast(self.device_type, dtype=self.dtype)
        self._autocast.__enter__()  # type: ignore[no-untyped-call]
        for layer in self.layers:
            layer.forward = _CastForward(self._cast(layer), layer.bias)  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        autocast, self._autocast = self._autocast, None
        assert autocast is not None
        autocast.__exit__(*exc)
