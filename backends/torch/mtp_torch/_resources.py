"""Files shipped inside the package (``mtp_torch/data/``): bundled prompts and the default delta."""

from __future__ import annotations

from pathlib import Path

__all__ = ["package_data"]

_DATA_DIR = Path(__file__).resolve().parent / "data"


def package_data(name: str) -> Path:
    """The path of the bundled file ``name`` in ``mtp_torch/data/`` (whether or not it exists)."""
    return _DATA_DIR / name
