"""Image archives on the controller: what a docker save tarball holds, checked up front."""

import json

import pytest

from backchat import images, settings


def test_archive_tags_read_from_a_docker_save_tarball(tmp_path):
    import io
    import tarfile

    manifest = json.dumps([{"Config": "c.json", "RepoTags": ["backchat-test/llama-server:sid"], "Layers": []}]).encode()
    path = tmp_path / "image.tar"
    with tarfile.open(path, "w") as archive:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        archive.addfile(info, io.BytesIO(manifest))
    assert images.archive_tags(str(path)) == ["backchat-test/llama-server:sid"]


def test_image_archives_must_exist_on_the_controller(tmp_path):
    data = settings.load_defaults() | {"image_archives": [str(tmp_path / "missing.tar")]}
    with pytest.raises(settings.SettingsError, match="image_archives.*do not exist"):
        settings.validate(data)

