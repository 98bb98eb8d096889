"""File helpers for secrets: private dirs (0700) and atomic private files (0600)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def private_dir(path: Path, *, tighten: bool = False) -> Path:
    """Create ``path`` (and parents) if needed; a directory created here (or any, with
    ``tighten``) is made 0700. An existing directory is left alone otherwise: writing a creds
    file into ``.`` must not lock others out of the working directory."""
    existed = path.is_dir()
    path.mkdir(parents=True, exist_ok=True)
    if tighten or not existed:
        os.chmod(path, 0o700)
    return path


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically with mode 0600 (never readable by others, even
    for a moment); the parent directory is made 0700."""
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
