"""npm projects of the test bed, installed once per lockfile and shared by every run.

An install lives in ``<base>/<key>``, the key being a hash of the files that decide
node_modules. It is built in a temporary directory beside the final one and renamed into
place under a lock, so a directory that exists under its key is complete; installs of
other keys that nobody is using are removed (a few hundred MB each).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from testbed.sandbox import flock

MARKER = ".backchat-installed.json"


def install_key(project: Path, files: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0" + (project / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def version(tool: str) -> str:
    return subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.strip()


def cached_install(project: Path, files: Sequence[str], base: Path, build: Callable[[Path], dict]) -> tuple[Path, bool]:
    """(the install's directory, whether it was built now).

    ``build(directory)`` runs in a fresh copy of ``files`` (``npm ci`` and whatever else)
    and returns what to record about it; an exception leaves nothing behind.
    """
    key = install_key(project, files)
    final = base / key
    if (final / MARKER).is_file():
        return final, False
    base.mkdir(parents=True, exist_ok=True)
    with flock(base / f"{key}.lock"):
        if (final / MARKER).is_file():
            return final, False
        if final.exists():
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=base))
        try:
            for name in files:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(project / name, tmp / name)
            info = {"key": key, "node": version("node"), "npm": version("npm"), **build(tmp)}
            (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _prune_others(base, key)
    return final, True


def _prune_others(base: Path, keep: str) -> None:
    for other in base.iterdir():
        if other.is_dir() and not other.name.startswith(".") and other.name != keep:
            try:
                with flock(base / f"{other.name}.lock", timeout=0):
                    shutil.rmtree(other, ignore_errors=True)
                (base / f"{other.name}.lock").unlink(missing_ok=True)
            except TimeoutError:
                pass
