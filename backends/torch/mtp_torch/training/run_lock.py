"""An OS-level lock on a run's output, so two ``mtp convert`` never share one ``--out``.

The lock is an ``fcntl.flock`` on a small file beside the output (``.<out>.lock``) that names
its holder: pid, host and start time.  The operating system releases it when the process
exits, however it exits (``kill -9`` included), so a stale lock file never blocks a later
run; only a live holder does.  A run that ends normally removes the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunLockedError", "lock_path", "run_lock"]


class RunLockedError(FileExistsError):
    """Another live process holds the lock of this run's output directory."""


def lock_path(out: str | os.PathLike[str]) -> Path:
    """The lock file of output directory ``out``: ``.<name>.lock`` beside it."""
    path = Path(out)
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def run_lock(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the lock of output directory ``out`` (and its ``<out>.ckpt``) for the block.

    Args:
      out: the run's output directory (need not exist yet).

    Yields:
      The lock file's path.

    Raises:
      RunLockedError: if another process holds it; the message names that process.
    """
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = _acquire(path, out)
    try:
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(holder).encode(), 0)
        yield path
    finally:
        path.unlink(missing_ok=True)  # still held: no one else can be using this file
        os.close(descriptor)  # releases the lock (a killed run leaves the file: harmless)


def _acquire(path: Path, out: str | os.PathLike[str]) -> int:
    """Open and lock ``path``; retry if it was replaced meanwhile (a holder unlinked it)."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return descriptor
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise RunLockedError(
                f"{out} is in use by another run ({_holder(path)}); wait for it to finish "
                "or stop it, or choose another --out"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return descriptor
        os.close(descriptor)


def _holder(path: Path) -> str:
    """Who holds the lock, as its file says."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its name"
