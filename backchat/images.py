"""Container images on the controller: what a ``docker save`` archive holds."""

from __future__ import annotations

import json
import tarfile


def archive_tags(path: str) -> list[str]:
    """The image names a ``docker save`` tarball holds (its manifest.json RepoTags)."""
    with tarfile.open(path) as archive:
        member = archive.extractfile("manifest.json")
        if member is None:
            raise ValueError(f"{path} has no manifest.json")
        manifest = json.load(member)
    return sorted(tag for image in manifest for tag in image.get("RepoTags") or [])
