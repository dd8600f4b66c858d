"""Archives on the controller: what a ``docker save`` tarball or a LocalAI backend tarball holds."""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from pathlib import Path

from backchat import hub

# LocalAI (v4.9.0) takes a directory of its backends path as a backend when it holds this
# file (core/gallery/backends.go:662-695) and runs it to start the backend
# (pkg/model/initializers.go:126-136); an install without it is refused (backends.go:418-424).
BACKEND_RUN_FILE = "run.sh"


def archive_tags(path: str) -> list[str]:
    """The image names a ``docker save`` tarball holds (its manifest.json RepoTags)."""
    with tarfile.open(path) as archive:
        member = archive.extractfile("manifest.json")
        if member is None:
            raise ValueError(f"{path} has no manifest.json")
        manifest = json.load(member)
    return sorted(tag for image in manifest for tag in image.get("RepoTags") or [])


def _inside(name: str) -> str | None:
    """``name`` relative to the archive's top, or None when it would leave it."""
    normal = posixpath.normpath(name)
    if name.startswith("/") or normal == ".." or normal.startswith("../"):
        return None
    return normal


def backend_archive_problem(path: str) -> str | None:
    """Why a tarball cannot be unpacked as one LocalAI backend directory, or None.

    The host unpacks it as root into a directory LocalAI runs programs from, so anything
    that could land outside that directory (absolute names, ``..``, links pointing out),
    device files, and set-id bits are refused here, before any host changes.
    """
    try:
        with tarfile.open(path) as archive:
            members = archive.getmembers()
    except tarfile.TarError:  # its message lists every compression tried: noise to a user
        return "is not a tar archive (plain, gzip, bzip2 or xz)"
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    for member in members:
        name = _inside(member.name)
        if name is None:
            return f"holds {member.name!r}, which would land outside the backend's directory"
        if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
            return f"holds {member.name!r}, a device file or pipe"
        if member.mode & 0o6000:
            return f"holds {member.name!r} with a set-user or set-group id bit"
        if member.issym() and (
            member.linkname.startswith("/") or _inside(posixpath.join(posixpath.dirname(name), member.linkname)) is None
        ):
            return f"holds {member.name!r}, a link to {member.linkname!r} outside the backend's directory"
        if member.islnk() and _inside(member.linkname) is None:
            return f"holds {member.name!r}, a hard link to {member.linkname!r} outside the backend's directory"
    run = [member for member in members if _inside(member.name) == BACKEND_RUN_FILE]
    if not run or not run[0].isfile():
        return f"has no {BACKEND_RUN_FILE} at its top, so LocalAI would not see a backend"
    # The directory is mounted read-only: LocalAI's chmod of a non-executable run file
    # (pkg/model/process.go:237-242) would fail there.
    if not run[0].mode & 0o100:
        return f"holds {BACKEND_RUN_FILE} without its executable bit"
    return None


_hashes: dict[tuple, str] = {}


def file_sha256(path: str) -> str:
    """The file's sha256, read once per run for as long as its size and mtime stay the same."""
    status = os.stat(path)
    key = (path, status.st_size, status.st_mtime_ns)
    if key not in _hashes:
        _hashes[key] = hub._sha256_of(Path(path))  # the controller hashes models the same way
    return _hashes[key]
