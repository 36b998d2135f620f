"""Where mtp-lm reads and writes files: the package's bundled data and the user cache."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

__all__ = ["CACHE_ENV", "cache_root", "package_data"]

CACHE_ENV = "MTP_LM_CACHE"

_DATA_DIR = Path(__file__).resolve().parent / "data"


def package_data(name: str) -> Path:
    """The path of the bundled file ``name`` in ``mtp_torch/data/`` (whether or not it exists)."""
    return _DATA_DIR / name


def cache_root() -> Path:
    """Directory where mtp-lm caches converted models, built kernels and calibrations.

    ``$MTP_LM_CACHE`` when set, else the user cache directory (``platformdirs``).
    """
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_cache_dir("mtp-lm"))
