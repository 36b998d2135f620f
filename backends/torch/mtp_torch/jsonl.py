"""JSON-lines files and the converters that type the values read from them.

Both the training corpora (``training/data.py``, ``training/corpus.py``) and the benchmark's
prompts and reports (``bench/``) read these, so they live below both layers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

from mtp_torch.text import decode_utf8

__all__ = ["float_tuple", "int_tuple", "read_jsonl"]


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, row)`` for each non-blank line of a JSON-lines file.

    Args:
      path: the file.

    Yields:
      1-based line numbers and the decoded JSON objects.

    Raises:
      ValueError: if a line is not valid JSON or not a JSON object, or the file is not UTF-8
        (naming the byte).
    """
    offset = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line, offset = decode_utf8(raw, path, offset), offset + len(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{number} is not valid JSON ({error}); fix or drop that line"
                ) from error
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number} must be a JSON object, got {type(row).__name__}")
            yield number, row


def int_tuple(values: Iterable[Any]) -> tuple[int, ...]:
    """``values`` as a tuple of ints (an attrs converter)."""
    return tuple(int(value) for value in values)


def float_tuple(values: Iterable[Any]) -> tuple[float, ...]:
    """``values`` as a tuple of floats (an attrs converter)."""
    return tuple(float(value) for value in values)
