"""Atomic file writes for checkpoints and results: a crash never leaves a half-written file."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch


def _temporary_beside(path: Path) -> str:
    """A new empty file in path's folder (made if missing) with the permissions open() gives under the umask
    (tempfile.mkstemp's 0600 kept a run's files from the rest of a cluster group)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return tmp


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """Call write(tmp_path), then rename tmp_path over `path` (same folder, so the rename is atomic)."""
    path = Path(path)
    tmp = _temporary_beside(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_all(writes: list[tuple[str | os.PathLike, Any]]) -> list[Path]:
    """Several files as one: call every write(tmp_path) first, then rename them over their paths in order (so the
    last one, written last, can mark the set complete). If any write fails (a full disk: OSError ENOSPC), every
    temporary file is removed and no target changes."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, write in writes:
            path = Path(path)
            tmp = _temporary_beside(path)
            staged.append((tmp, path))
            write(tmp)
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    return [path for _, path in staged]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save(obj) to `path` atomically."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
