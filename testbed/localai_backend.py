"""A stand-in for LocalAI's llama-cpp backend archive: the layout, not the program.

LocalAI's real backend (an OCI image of llama.cpp binaries, hundreds of MB) cannot be
pulled here, so the tests build a small tarball with the same layout LocalAI v4.9.0 reads
(backchat/localai_backend.py cites where): ``run.sh`` at the top, executable, beside a
binary it starts, a ``lib/`` directory and the ``metadata.json`` LocalAI's own install
writes. Nothing in it is LocalAI's code, and nothing runs it.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

RUN_SH = '#!/bin/sh\n# stand-in: LocalAI runs this to start the backend\nexec "$(dirname "$0")/llama-cpp-cpu-all" "$@"\n'


def _add(archive: tarfile.TarFile, name: str, data: bytes = b"", mode: int = 0o644, kind=tarfile.REGTYPE,
         linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def write_backend_archive(path: Path, version: str = "1", extra=None) -> str:
    """Write the stand-in backend as a gzipped tarball at ``path``; return its sha256.

    ``extra(archive)`` may add members (the hostile ones of the unit tests)."""
    with tarfile.open(path, "w:gz") as archive:
        _add(archive, "./", kind=tarfile.DIRTYPE, mode=0o755)
        _add(archive, "./run.sh", RUN_SH.encode(), mode=0o755)
        _add(archive, "./llama-cpp-cpu-all", f"stand-in binary {version}\n".encode(), mode=0o755)
        _add(archive, "./lib", kind=tarfile.DIRTYPE, mode=0o755)
        _add(archive, "./lib/libggml-cpu.so", b"stand-in library\n")
        _add(archive, "./lib/ld.so", kind=tarfile.SYMTYPE, linkname="libggml-cpu.so")
        _add(archive, "./metadata.json", json.dumps({"name": "cpu-llama-cpp", "alias": "llama-cpp"}).encode())
        if extra:
            extra(archive)
    return hashlib.sha256(path.read_bytes()).hexdigest()
