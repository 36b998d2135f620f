"""Files of a saved MTP checkpoint: checking a source directory, and writing one atomically.

A save goes to a temporary directory beside the target and then takes its place by renames; a
manifest (``mtp_lm_manifest.json``) names the files mtp-lm wrote, so a later save knows which
files are its own to replace and never deletes a file it did not write.  The manifest also
keeps what the weights cannot: the base model's name and the training summary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CARD_FILE",
    "HUB_PREFIX",
    "check_config_sizes",
    "MANIFEST_FILE",
    "check_model_source",
    "foreign_files",
    "read_manifest",
    "recover_checkpoint",
    "umask_permissions",
    "write_checkpoint",
    "write_config_settings",
]

logger = logging.getLogger(__name__)

MANIFEST_FILE = "mtp_lm_manifest.json"
CARD_FILE = "README.md"
JOURNAL_FILE = "mtp_lm_journal.json"


HUB_PREFIX = "hub:"

# Sizes a config may give, with the largest value any real model uses times a wide margin: a
# value outside is a typo or a corrupted file, caught before transformers builds (for minutes,
# or with a ZeroDivisionError / AssertionError) a model of that size.
_SIZE_LIMITS = {
    "vocab_size": 10_000_000,
    "hidden_size": 1 << 17,
    "n_embd": 1 << 17,
    "d_model": 1 << 17,
    "intermediate_size": 1 << 20,
    "n_inner": 1 << 20,
    "num_hidden_layers": 1024,
    "n_layer": 1024,
    "num_attention_heads": 1024,
    "n_head": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 1 << 14,
    "max_position_embeddings": 1 << 27,
    "n_positions": 1 << 27,
}


def check_config_sizes(config: Mapping[str, Any], source: str = "the config") -> None:
    """Raise ``ValueError`` naming the field when a config's sizes cannot build a model.

    Every size listed must be an integer from 1 to a generous limit, and the hidden size must
    divide among the attention heads, and those among the key-value heads.

    Args:
      config: a ``config.json``'s entries (nested ``text_config`` is checked too).
      source: what to call the config in the message.

    Raises:
      ValueError: on the first field out of range.
    """
    for field, limit in _SIZE_LIMITS.items():
        value = config.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(
                f"{source}: {field} is {value!r}; it must be an integer from 1 to {limit} "
                "(the config is mistyped or corrupt)"
            )
    hidden = config.get("hidden_size")
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and config.get("head_dim") is None:
        if hidden % heads:
            raise ValueError(
                f"{source}: hidden_size {hidden} does not divide among num_attention_heads "
                f"{heads}; fix either field"
            )
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        raise ValueError(
            f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
            f"{kv_heads}; fix either field"
        )
    nested = config.get("text_config")
    if isinstance(nested, Mapping):
        check_config_sizes(nested, f"{source} (text_config)")


def check_model_source(source: str) -> str:
    """Check a model name before anything is loaded; return the name to give transformers.

    The rule that tells a local path from a Hugging Face Hub id, for a name that does not
    exist locally: it is a *path* (and fails at once, naming it) if it is absolute, starts
    with ``.`` or ``~``, holds a backslash, more than one ``/`` or a trailing ``/``, or if its
    first part names an existing local directory (``runs/model-mtpp`` with ``runs/`` here);
    otherwise (``name`` or ``org/name``) it is a Hub id.  ``hub:org/name`` always asks the Hub.
    A local directory must hold a ``config.json`` whose sizes can build a model.

    Raises:
      FileNotFoundError: for a missing path or a directory that is not a model's.
      ValueError: for a config whose sizes are out of range (naming the field).
    """
    if source.startswith(HUB_PREFIX):
        return source[len(HUB_PREFIX) :]
    path = Path(source).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{path} has no config.json, so it is not a model directory; pass a directory "
                "written by save_pretrained (or mtp convert)"
            )
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise ValueError(f"{config_path} is not valid JSON ({error})") from error
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} does not hold a JSON object")
        check_config_sizes(config, str(config_path))
        return source
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; pass the model's directory")
    first = source.replace("\\", "/").split("/")[0]
    looks_local = (
        path.is_absolute()
        or source.startswith((".", "~"))
        or "\\" in source
        or source.count("/") > 1
        or source.endswith("/")
        or ("/" in source and Path(first).is_dir())
    )
    if looks_local:
        raise FileNotFoundError(
            f"model directory {path} does not exist; check the path, or use 'default' / "
            f"'default-base' for the embedded default (for a Hugging Face Hub id, write "
            f"'{HUB_PREFIX}{source.strip('/')}')"
        )
    return source


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest an earlier ``save_pretrained`` wrote into ``directory``, else ``{}``."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _plain_name(name: object) -> bool:
    """Whether ``name`` is a bare file name: no path parts, not absolute, not ``.``/``..``."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not os.path.isabs(name)
    )


def _digest(path: Path) -> str | None:
    """sha256 of a regular file (of a directory: over its entries' names and digests).

    ``None`` for a symbolic link, or a tree holding one, or anything else that is not a plain
    file or directory: such an entry is never shown to be mtp-lm's own, so never deleted.
    """
    info = path.lstat()
    if stat.S_ISREG(info.st_mode):
        hasher = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(block)
        return hasher.hexdigest()
    if stat.S_ISDIR(info.st_mode):
        hasher = hashlib.sha256(b"dir\0")
        for child in sorted(path.iterdir()):
            child_digest = _digest(child)
            if child_digest is None:
                return None
            hasher.update(f"{child.name}\0{child_digest}\0".encode())
        return "dir:" + hasher.hexdigest()
    return None


def _manifest_files(directory: Path) -> set[str]:
    """Files in ``directory`` that an earlier save provably wrote, the manifest included.

    A file counts only if the manifest lists it by a plain name and its content still has the
    sha256 recorded there (format 2).  Names with path parts, absolute names, links and files
    changed since (or listed by a format-1 manifest, which kept no hashes) are not mtp-lm's.
    """
    listed = read_manifest(directory).get("files")
    if not isinstance(listed, dict):
        return set()
    ours = set()
    for name, recorded in listed.items():
        if not _plain_name(name) or not isinstance(recorded, str):
            continue
        try:
            if _digest(directory / name) == recorded:
                ours.add(name)
        except OSError:
            continue
    return ours | ({MANIFEST_FILE} if ours else set())


def foreign_files(target: Path) -> list[str]:
    """Names in ``target`` that no earlier mtp-lm save provably wrote (``[]`` for a new directory)."""
    target = _follow_link(target)
    if target.is_file():
        raise FileExistsError(f"{target} is a file; give a directory path to save into")
    if not target.is_dir():
        return []
    ours = _manifest_files(target)
    return sorted(p.name for p in target.iterdir() if p.name not in ours)


def _follow_link(target: Path) -> Path:
    """``target`` with a symbolic link followed (saves go into the directory a link names)."""
    if not target.is_symlink():
        return target
    resolved = target.resolve()
    if not resolved.exists():
        raise FileNotFoundError(
            f"{target} is a symbolic link to {resolved}, which does not exist; create that "
            "directory or remove the link"
        )
    return resolved


def write_config_settings(directory: Path, settings: Mapping[str, Any]) -> None:
    """Add ``settings`` to the ``config.json`` a ``save_pretrained`` wrote into ``directory``."""
    path = directory / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(settings)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def umask_permissions(directory: Path) -> None:
    """Give a ``mkdtemp`` directory (mode 0700) the mode a plain ``mkdir`` would have."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)


def _sync_directory(directory: Path) -> None:
    """fsync every file of ``directory`` and the directory itself (data on disk before renames)."""
    for path in directory.iterdir():
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _sync_path(directory)


def _sync_path(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def directory_lock(parent: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``parent`` (saves and recoveries beside each other; one
    conversion of the embedded default at a time).

    Yields whether the lock was taken (always, when ``blocking``).  The OS drops it when the
    process dies, so a killed save never leaves it held.  Without ``fcntl`` (Windows) it is a
    no-op.
    """
    if fcntl is None:
        yield True
        return
    descriptor = os.open(parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(descriptor)  # releases the lock


def _siblings(target: Path, kind: str) -> list[Path]:
    """The ``.<name>.tmp-*`` / ``.<name>.old-*`` entries a save of ``target`` leaves beside it."""
    prefix = f".{target.name}.{kind}-"
    try:
        return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []


def _roll_back_merge(backup: Path, target: Path) -> None:
    """Undo an interrupted merge: the old files back in place, the new ones that were ours out."""
    journal = json.loads((backup / JOURNAL_FILE).read_text(encoding="utf-8"))
    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(backup.iterdir()):
        if entry.name != JOURNAL_FILE and _plain_name(entry.name):
            os.replace(entry, target / entry.name)
    for name, recorded in dict(journal.get("new", {})).items():
        if not _plain_name(name) or name in set(journal.get("moved", [])):
            continue
        path = target / name
        try:
            if _digest(path) == recorded:
                _remove(path)
        except OSError:
            continue
    _sync_path(target)
    (backup / JOURNAL_FILE).unlink()
    backup.rmdir()


def recover_checkpoint(target: str | os.PathLike[str]) -> list[str]:
    """Clean up after saves of ``target`` that were killed, recovering what they moved aside.

    - an interrupted merge (``overwrite=True`` into a directory with other files) is rolled
      back from its journal: the earlier save's files return, the new ones are removed;
    - a target that is missing while an earlier save waits in ``.<name>.old-*`` (a kill between
      the two renames) gets that save back;
    - stale ``.<name>.tmp-*`` staging copies and ``.<name>.old-*`` copies are removed.

    Runs under the same lock as a save, so a save in progress elsewhere is never touched; a
    load that finds the lock taken skips the cleanup.  Errors (a read-only parent) are ignored.

    Args:
      target: the checkpoint directory.

    Returns:
      One line per thing recovered (also logged as a warning); stale copies removed quietly.
    """
    path = Path(target).expanduser()
    if not path.parent.is_dir() or not (_siblings(path, "tmp") or _siblings(path, "old")):
        return []
    try:
        with directory_lock(path.parent, blocking=False) as locked:
            return _recover_locked(path) if locked else []
    except OSError as error:
        logger.warning("could not clean up interrupted saves beside %s: %s", path, error)
        return []


def _recover_locked(target: Path) -> list[str]:
    messages = []
    for backup in _siblings(target, "old"):
        if (backup / JOURNAL_FILE).is_file():
            _roll_back_merge(backup, target)
            messages.append(
                f"an interrupted save into {target} was rolled back: its earlier files are "
                f"restored from {backup.name}"
            )
        elif not os.path.lexists(target) and (backup / MANIFEST_FILE).is_file():
            os.rename(backup, target)
            messages.append(
                f"{target} was missing after an interrupted save; the earlier save kept in "
                f"{backup.name} was moved back to {target}"
            )
        elif os.path.lexists(target):
            _remove(backup)  # a finished save's leftover copy
    for staging in _siblings(target, "tmp"):
        _remove(staging)
    for message in messages:
        logger.warning("%s", message)
    return messages


def _replace_directory(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target`` by renames; an earlier save there is removed afterwards.

    A kill between the two renames leaves the earlier save in ``.<name>.old-*`` and no target:
    ``recover_checkpoint`` (run by the next save or load) moves it back.
    """
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


def _merge_into(staging: Path, target: Path, new: Mapping[str, str]) -> None:
    """Move ``staging``'s files into ``target``, keeping files mtp-lm did not write, atomically.

    The files this replaces (same-named ones, and an earlier save's provably own files the new
    save lacks) are first moved into a ``.<name>.old-*`` directory that holds a journal; once
    every new file is in place the journal is deleted (the commit) and the old files with it.
    A kill before the commit is rolled back by ``recover_checkpoint``: the old files return
    and the new ones that had no predecessor are removed, so a reader sees the earlier save
    (after recovery) or the new one, never new config with old weights.
    """
    stale = _manifest_files(target) - set(new)
    for name in new:
        existing = target / name
        if existing.is_dir() and not existing.is_symlink():
            raise FileExistsError(
                f"{existing} is a directory mtp-lm did not write; it cannot be replaced by a "
                "file of the save: move it away or save into another directory"
            )
    moved = sorted(name for name in new if os.path.lexists(target / name)) + sorted(stale)
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    journal = {"target": target.name, "new": dict(new), "moved": moved}
    (backup / JOURNAL_FILE).write_text(json.dumps(journal), encoding="utf-8")
    _sync_directory(backup)
    for name in sorted(new, key=lambda n: n == MANIFEST_FILE):  # the manifest last
        if os.path.lexists(target / name):
            os.rename(target / name, backup / name)
        os.rename(staging / name, target / name)
    for name in stale:
        os.rename(target / name, backup / name)
    _sync_path(target)
    (backup / JOURNAL_FILE).unlink()  # the commit
    _sync_path(backup)
    shutil.rmtree(backup, ignore_errors=True)


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
      replace same-named ones and the files of an earlier save that the new one lacks are
      removed, all behind a journal (a killed merge is rolled back by the next save or load),
      but files mtp-lm did not write are never deleted.  A ``README.md`` of the user's own is
      kept: the card is then not written (and a warning is logged).

    "Files mtp-lm wrote" are those the manifest lists by a plain name (no path parts) whose
    content still has the sha256 recorded there; anything else, whatever the manifest says,
    is the user's.  A ``target`` that is a symbolic link is followed: the save goes into the
    directory it points to and the link stays.  Saves beside each other are serialised by an
    OS lock on the parent directory, and each first cleans up after killed saves
    (``recover_checkpoint``).

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
      FileNotFoundError: if ``target`` is a symbolic link to nothing.
    """
    resolved = _follow_link(Path(target))
    resolved.parent.mkdir(parents=True, exist_ok=True)
    with directory_lock(resolved.parent):
        _recover_locked(resolved)
        _write_locked(resolved, write_files, overwrite, card, metadata)
    return target


def _write_locked(
    target: Path,
    write_files: Callable[[Path], None],
    overwrite: bool,
    card: str | None,
    metadata: Mapping[str, Any] | None,
) -> None:
    foreign = foreign_files(target)
    if foreign and not overwrite:
        raise FileExistsError(
            f"{target} holds files mtp-lm did not write, or changed since it wrote them "
            f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); choose an empty "
            "or new directory, or pass overwrite=True (--overwrite) to write beside them"
        )
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
        # 2. The manifest names every file written (and only those) with its sha256.
        written = {p.name: _digest(p) for p in sorted(staging.iterdir())}
        manifest = {"format": 2, "files": written, **(metadata or {})}
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")
        written[MANIFEST_FILE] = _digest(staging / MANIFEST_FILE)
        # 3. On disk, then into place.
        _sync_directory(staging)
        if foreign:
            _merge_into(staging, target, {k: v for k, v in written.items() if v is not None})
        else:
            _replace_directory(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
