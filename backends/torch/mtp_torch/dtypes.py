"""Parameter dtypes by name, as the commands and ``MTPModel.from_pretrained`` take them."""

from __future__ import annotations

import torch

__all__ = ["parse_dtype"]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """Turn a dtype name (``"float32"``, ``"bf16"``, ``"auto"`` ...) into a ``torch.dtype``.

    Args:
      dtype: a ``torch.dtype``, one of the names above, ``"auto"`` (the checkpoint's dtype) or
        ``None`` (float32).

    Returns:
      The ``torch.dtype``, or ``"auto"``.

    Raises:
      ValueError: for an unknown name.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        return "auto"
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[name]
