"""Files of a saved MTP checkpoint: checking a source directory, and writing one atomically.

A save goes to a temporary directory beside the target and then takes its place by renames; a
manifest (``mtp_lm_manifest.json``) names the files mtp-lm wrote, so a later save knows which
files are its own to replace and never deletes a file it did not write.  The manifest also
keeps what the weights cannot: the base model's name and the training summary.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CARD_FILE",
    "MANIFEST_FILE",
    "check_model_source",
    "foreign_files",
    "read_manifest",
    "umask_permissions",
    "write_checkpoint",
]

logger = logging.getLogger(__name__)

MANIFEST_FILE = "mtp_lm_manifest.json"
CARD_FILE = "README.md"


def check_model_source(source: str) -> None:
    """Raise ``FileNotFoundError`` for a local path that cannot hold a model (before the Hub)."""
    path = Path(source).expanduser()
    looks_local = path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json, so it is not a model directory; pass a directory "
                "written by save_pretrained (or mtp convert)"
            )
    elif path.exists():
        raise FileNotFoundError(f"{path} is a file; pass the model's directory")
    elif looks_local:
        raise FileNotFoundError(
            f"model directory {path} does not exist; check the path, or use 'default' / "
            "'default-base' for the embedded default"
        )


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest an earlier ``save_pretrained`` wrote into ``directory``, else ``{}``."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _manifest_files(directory: Path) -> set[str]:
    """Files an earlier ``save_pretrained`` wrote into ``directory`` (its manifest), else none."""
    listed = read_manifest(directory).get("files")
    if not isinstance(listed, list):
        return set()
    return {str(name) for name in listed} | {MANIFEST_FILE}


def foreign_files(target: Path) -> list[str]:
    """Names in ``target`` that no earlier mtp-lm save wrote (``[]`` for a new directory)."""
    if target.is_file():
        raise FileExistsError(f"{target} is a file; give a directory path to save into")
    if not target.is_dir():
        return []
    ours = _manifest_files(target)
    return sorted(p.name for p in target.iterdir() if p.name not in ours)


def umask_permissions(directory: Path) -> None:
    """Give a ``mkdtemp`` directory (mode 0700) the mode a plain ``mkdir`` would have."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)


def _sync_directory(directory: Path) -> None:
    """fsync every file of ``directory`` and the directory itself (data on disk before renames)."""
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _replace_directory(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target`` by renames; an earlier save there is removed afterwards."""
    backup = None
    if target.exists():
        backup = target.parent / f".{target.name}.old-{os.getpid()}-{time.time_ns()}"
        os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        if backup is not None:
            os.rename(backup, target)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _merge_into(staging: Path, target: Path) -> None:
    """Move ``staging``'s files into ``target`` one by one, keeping files mtp-lm did not write."""
    stale = _manifest_files(target) - {p.name for p in staging.iterdir()}
    for path in sorted(staging.iterdir(), key=lambda p: p.name == MANIFEST_FILE):
        os.replace(path, target / path.name)  # the manifest last: it names a complete save
    for name in stale:
        (target / name).unlink(missing_ok=True)


def write_checkpoint(
    target: Path,
    write_files: Callable[[Path], None],
    *,
    overwrite: bool,
    card: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically, with a model card and a manifest.

    - a new or empty directory, or an earlier mtp-lm save holding only its own files, is
      replaced by a rename (a reader sees the old save or the new one, never a mix);
    - a directory holding other files is refused unless ``overwrite``; then the new files
      replace same-named ones one by one and the files of an earlier save that the new one
      lacks are removed, but files mtp-lm did not write are never deleted.  A ``README.md`` of
      the user's own is kept: the card is then not written (and a warning is logged).

    Args:
      target: the checkpoint directory.
      write_files: writes the weights, config and tokenizer into the directory it is given.
      overwrite: write into a directory that holds files of its own.
      card: the model card's Markdown (``README.md``); ``None`` writes none.
      metadata: JSON-ready entries recorded in the manifest beside the file list.

    Returns:
      ``target``.

    Raises:
      FileExistsError: if ``target`` holds files other than an earlier save's and
        ``overwrite`` is false, or is a file.
    """
    foreign = foreign_files(target)
    if foreign and not overwrite:
        raise FileExistsError(
            f"{target} holds files mtp-lm did not write ({', '.join(foreign[:3])}"
            f"{' ...' if len(foreign) > 3 else ''}); choose an empty or new directory, or "
            "pass overwrite=True (--overwrite) to write beside them"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask_permissions(staging)
    try:
        # 1. The checkpoint's own files, then the card unless the user has a README there.
        write_files(staging)
        if card is not None and CARD_FILE in foreign:
            logger.warning(
                "%s holds a %s that mtp-lm did not write; it is kept and no model card is written",
                target,
                CARD_FILE,
            )
        elif card is not None:
            (staging / CARD_FILE).write_text(card, encoding="utf-8")
        # 2. The manifest names every file written (and only those).
        written = sorted(p.name for p in staging.iterdir())
        manifest = {"format": 1, "files": written, **(metadata or {})}
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")
        # 3. On disk, then into place.
        _sync_directory(staging)
        if foreign:
            _merge_into(staging, target)
        else:
            _replace_directory(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
