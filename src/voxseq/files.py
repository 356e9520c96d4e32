"""Crash-safe files: one atomic write and one checksum, used by every layer (configs, volumes, the cache,
manifests, metrics, checkpoints). Standard library only, so any module may import it."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Callable


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The hex sha256 of a file, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(folder: str | os.PathLike) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], *, sync_dir: bool = False) -> Path:
    """Write ``path`` through ``write(tmp)`` on a temporary name beside it (same suffix, so format-sniffing
    writers work), fsync, rename into place (and fsync the folder with ``sync_dir``). Readers see the old
    file or the new one, never a part; a write that fails leaves nothing behind and re-raises."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "fsync_dir", "sha256_file"]
