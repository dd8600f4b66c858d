"""Files backchat keeps on the controller (the CA, the Hub's answers, verified blobs):
written whole or not at all, never through a link.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` once: never through a link, never over another run's file."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        return
    with os.fdopen(descriptor, "wb") as out:
        out.write(data)


def replace(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` whole (a temporary file renamed over it), never through a link."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    write_new(temporary, data, mode)
    os.replace(temporary, path)


def private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.is_symlink() or path.stat().st_mode & 0o077:
        raise ValueError(f"{path} must be a directory only you can read. Fix: chmod 700 {path}")
    return path


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/backchat`` (``~/.cache/backchat``): nothing secret is kept there."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "backchat"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
