"""Names that stand for a model rather than a path: the embedded default's names, and the
loaders that resolve them.

``MTPModel.from_pretrained("default")`` must load the embedded default, which the ``weights``
layer builds (from the GGUF and the shipped delta) and which itself uses ``decoding``.  So that
``decoding`` never imports ``weights``, the names live here and ``weights/default.py`` registers
its loader (``register_named_loader``) when it is imported; ``import mtp_torch`` imports it, so
the loader is in place before any ``from_pretrained`` runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "BASE_NAMES",
    "CONVERTED_NAMES",
    "DEFAULT_MODEL_NAME",
    "HF_MODEL_ID",
    "NamedLoader",
    "load_named",
    "register_named_loader",
]

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
HF_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Names every command and ``MTPModel.from_pretrained`` accept for the embedded default.
CONVERTED_NAMES = ("default",)
BASE_NAMES = ("default-base", DEFAULT_MODEL_NAME)

# ``loader(name, dtype)``: ``(model, tokenizer)`` for a name it knows, ``None`` for any other.
NamedLoader = Callable[[str, torch.dtype], "tuple[Any, Any] | None"]

_LOADERS: list[NamedLoader] = []


def register_named_loader(loader: NamedLoader) -> None:
    """Add ``loader`` to those ``load_named`` asks (once: registering it again does nothing)."""
    if loader not in _LOADERS:
        _LOADERS.append(loader)


def load_named(name: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any] | None:
    """``(model, tokenizer)`` from the first registered loader that knows ``name``, else ``None``."""
    for loader in _LOADERS:
        named = loader(name, dtype)
        if named is not None:
            return named
    return None
