"""Files written whole or not at all: a reader (or a process restarted after a kill) sees the old
file or the new one, never a part; and the SHA-256 that tells a file is the one recorded."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable


def write_atomically(path: Path, write: Callable[[BinaryIO], object], mode: int | None = None) -> Path:
    """`write(file)` fills a temporary file beside `path`, which then replaces `path` in one rename;
    `mode`: its permissions, set before anything is written (0o600 for a file that may hold secrets).

    The temporary file has a name of its own per call, so writers that race for the same path (torchrun
    ranks filling a cold cache, two retraining processes) never write into each other's; the last
    rename wins whole. A failed write removes its temporary file and leaves `path` as it was.

    The content reaches the disk before the rename, and the rename before the return (fsync of the
    file, then of its folder): after a host crash the registry's CURRENT.json or a run's checkpoint
    is the old file or the new one, never an empty one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as fh:
            if mode is not None:
                os.chmod(tmp, mode)
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return path


def write_text_atomically(path: Path, text: str, mode: int | None = None) -> Path:
    return write_atomically(path, lambda fh: fh.write(text.encode("utf-8")), mode)


def sha256_of(path: Path) -> str:
    """The file's SHA-256 (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
