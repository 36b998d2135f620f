"""A small safetensors reader and writer in pure numpy.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian unsigned header
length ``N``, then ``N`` bytes of UTF-8 JSON mapping each tensor name to ``{"dtype", "shape",
"data_offsets": [begin, end]}`` (offsets relative to the byte buffer after the header), an
optional ``"__metadata__"`` entry of string pairs, then the raw little-endian tensor bytes.

Only the parsing needed to load Llama-family checkpoints is here: the numeric dtypes below, one
file or a sharded directory (``model.safetensors.index.json``).  Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "load_checkpoint_tensors",
    "read_safetensors",
    "read_safetensors_header",
    "write_safetensors",
]

# safetensors dtype name -> little-endian numpy storage dtype.  BF16 is stored as raw uint16 and
# widened to float32 on load (numpy has no bfloat16).
_STORAGE_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

_WRITE_DTYPES: dict[np.dtype[Any], str] = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}

# A header larger than this is certainly corrupt (the reference library uses the same bound).
_MAX_HEADER_BYTES = 100_000_000

_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"


def _corrupt(path: Path, detail: str) -> ValueError:
    return ValueError(
        f"{path} is not a valid safetensors file: {detail}. The file may be truncated or "
        "corrupt; re-download or re-save the checkpoint"
    )


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], int]:
    """Read and validate the JSON header of a safetensors file.

    Args:
      path: the ``.safetensors`` file.

    Returns:
      ``(entries, data_start)``: the tensor entries by name (``"__metadata__"`` removed), each a
      dict with ``dtype`` (str), ``shape`` (list of int) and ``data_offsets`` ([begin, end]
      relative to ``data_start``); and the byte offset where tensor data begins.

    Raises:
      ValueError: if the file is truncated, the header is not valid JSON, an entry names an
        unsupported dtype, or offsets do not fit the shape or the file.
    """
    file_path = Path(path)
    size = file_path.stat().st_size
    with open(file_path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _corrupt(file_path, f"only {size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise _corrupt(
                file_path, f"header length {header_len} does not fit a file of {size} bytes"
            )
        raw_header = handle.read(header_len)
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _corrupt(file_path, f"header is not valid UTF-8 JSON ({error})") from None
    if not isinstance(header, dict):
        raise _corrupt(file_path, "header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + int(header_len)
    data_size = size - data_start
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        _check_entry(file_path, name, entry, data_size)
        begin, end = entry["data_offsets"]
        spans.append((begin, end, name))
    spans.sort()
    for (_, prev_end, prev_name), (begin, _, name) in zip(spans, spans[1:], strict=False):
        if begin < prev_end:
            raise _corrupt(file_path, f"tensors {prev_name!r} and {name!r} overlap")
    return header, data_start


def _check_entry(path: Path, name: str, entry: object, data_size: int) -> None:
    if not isinstance(entry, dict):
        raise _corrupt(path, f"entry {name!r} is not an object")
    dtype = entry.get("dtype")
    if dtype not in _STORAGE_DTYPES:
        raise _corrupt(
            path,
            f"tensor {name!r} has dtype {dtype!r}; supported: {sorted(_STORAGE_DTYPES)}",
        )
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape
    ):
        raise _corrupt(path, f"tensor {name!r} has an invalid shape {shape!r}")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise _corrupt(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    expected = int(np.prod(shape, dtype=np.int64)) * _STORAGE_DTYPES[dtype].itemsize
    if not (0 <= begin <= end) or end - begin != expected:
        raise _corrupt(
            path,
            f"tensor {name!r} of shape {shape} and dtype {dtype} needs {expected} bytes, "
            f"its data_offsets {offsets} span {end - begin}",
        )
    if end > data_size:
        raise _corrupt(
            path,
            f"tensor {name!r} ends at byte {end} of the data section, which holds only "
            f"{data_size} bytes",
        )


def _decode(raw: bytes, dtype: str, shape: list[int]) -> npt.NDArray[Any]:
    array = np.frombuffer(raw, dtype=_STORAGE_DTYPES[dtype]).reshape(shape)
    if dtype == "BF16":
        # bfloat16 is the top half of a float32: shift the 16 stored bits into place.
        return (array.astype(np.uint32) << 16).view(np.float32)
    # Native byte order, writable, owning its memory.
    return array.astype(array.dtype.newbyteorder("="), copy=True)


def read_safetensors(
    path: str | os.PathLike[str], names: Iterable[str] | None = None
) -> dict[str, npt.NDArray[Any]]:
    """Load tensors from one safetensors file into numpy arrays.

    Args:
      path: the ``.safetensors`` file.
      names: tensor names to load; ``None`` loads all of them.

    Returns:
      Name -> array in native byte order.  ``BF16`` tensors come back as ``float32`` (exact);
      every other dtype keeps its own numpy dtype.

    Raises:
      ValueError: if the file is corrupt or truncated, or a requested name is missing.
    """
    file_path = Path(path)
    header, data_start = read_safetensors_header(file_path)
    wanted = list(header) if names is None else list(names)
    missing = [name for name in wanted if name not in header]
    if missing:
        raise ValueError(
            f"{file_path} has no tensor(s) {missing[:5]}; it holds {len(header)} tensors, "
            "check the checkpoint matches the expected architecture"
        )
    tensors: dict[str, npt.NDArray[Any]] = {}
    with open(file_path, "rb") as handle:
        for name in wanted:
            entry = header[name]
            begin, end = entry["data_offsets"]
            handle.seek(data_start + begin)
            raw = handle.read(end - begin)
            if len(raw) != end - begin:
                raise _corrupt(file_path, f"tensor {name!r} is cut short")
            tensors[name] = _decode(raw, entry["dtype"], entry["shape"])
    return tensors


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, npt.ArrayLike],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write numpy arrays as a safetensors file (no bfloat16).

    Args:
      path: destination file.
      tensors: name -> array; float16/32/64, int8/16/32/64, uint8 or bool.
      metadata: optional string pairs stored under ``"__metadata__"``.

    Raises:
      ValueError: on an unsupported dtype.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(key): str(value) for key, value in metadata.items()}
    blobs: list[bytes] = []
    offset = 0
    for name, value in tensors.items():
        array = np.asarray(value)
        code = _WRITE_DTYPES.get(array.dtype.newbyteorder("="))
        if code is None:
            raise ValueError(
                f"tensor {name!r} has dtype {array.dtype}, which write_safetensors does not "
                f"support; cast it to one of {sorted(str(d) for d in _WRITE_DTYPES)}"
            )
        blob = np.ascontiguousarray(array, dtype=_STORAGE_DTYPES[code]).tobytes()
        header[name] = {
            "dtype": code,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # align the data section to 8 bytes
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for blob in blobs:
            handle.write(blob)


def load_checkpoint_tensors(directory: str | os.PathLike[str]) -> dict[str, npt.NDArray[Any]]:
    """Load every tensor of a transformers checkpoint directory.

    Reads ``model.safetensors`` or, for sharded checkpoints, every shard listed in
    ``model.safetensors.index.json``.

    Args:
      directory: the checkpoint directory.

    Returns:
      Name -> array (see ``read_safetensors`` for dtypes).

    Raises:
      ValueError: if the directory holds no safetensors weights (``.bin`` pickles are refused on
        purpose), the index is malformed, or a shard is corrupt.
    """
    root = Path(directory)
    index_path = root / _INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"{index_path} is not a valid safetensors index ({error!r}); it must be JSON "
                "with a 'weight_map' of tensor name -> shard file"
            ) from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path}: 'weight_map' must map tensor names to shard files")
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(str(shard), []).append(str(name))
        tensors: dict[str, npt.NDArray[Any]] = {}
        for shard, names in sorted(by_shard.items()):
            shard_path = (root / shard).resolve()
            if shard_path.parent != root.resolve() or not shard_path.is_file():
                raise ValueError(
                    f"{index_path} lists shard {shard!r}, which is not a file in {root}; "
                    "the checkpoint is incomplete"
                )
            tensors.update(read_safetensors(shard_path, names))
        return tensors
    single = root / _SINGLE_FILE
    if single.is_file():
        return read_safetensors(single)
    raise ValueError(
        f"no {_SINGLE_FILE} or {_INDEX_FILE} in {root}; save the model with "
        "save_pretrained(..., safe_serialization=True) (pickled .bin weights are not loaded)"
    )
