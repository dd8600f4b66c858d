"""LocalAI's llama-cpp backend from the controller (backchat/localai_backend.py), without a host.

The archive check (what may be unpacked as root), the settings that go with it, the
compose file LocalAI starts from, and the host-side unpack script and fact commands, run
here in a temporary directory. LocalAI itself is not run (its image cannot be pulled here):
what these tests hold the files to is the layout and environment LocalAI v4.9.0's source
reads, cited in backchat/localai_backend.py; the backend archive is a stand-in with that
layout (testbed/localai_backend.py).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile

import pytest
import yaml

from backchat import images, localai_backend, settings, stack
from backchat.facts import UnpackedBackend
from tests.cfg import make_cfg
from testbed.localai_backend import _add, write_backend_archive


@pytest.fixture
def archive(tmp_path):
    path = tmp_path / "llama-cpp.tar.gz"
    return str(path), write_backend_archive(path)


def offline_cfg(archive, **overrides):
    path, sha = archive
    return make_cfg(localai_backend_archive=path, localai_backend_sha256=sha, **overrides)


# --- the archive, checked on the controller ------------------------------------------------


def test_a_backend_archive_with_run_sh_at_its_top_is_accepted(archive):
    assert images.backend_archive_problem(archive[0]) is None
    assert images.file_sha256(archive[0]) == archive[1]


@pytest.mark.parametrize(
    "hostile, problem",
    [
        (lambda a: _add(a, "/etc/cron.d/x", b"x"), "would land outside"),
        (lambda a: _add(a, "lib/../../x", b"x"), "would land outside"),
        (lambda a: _add(a, "lib/out", kind=tarfile.SYMTYPE, linkname="../../etc"), "outside the backend's directory"),
        (lambda a: _add(a, "abs", kind=tarfile.SYMTYPE, linkname="/etc/shadow"), "outside the backend's directory"),
        (lambda a: _add(a, "hard", kind=tarfile.LNKTYPE, linkname="../x"), "hard link"),
        (lambda a: _add(a, "dev", kind=tarfile.CHRTYPE), "device file"),
        (lambda a: _add(a, "suid", b"x", mode=0o4755), "set-user or set-group id"),
    ],
)
def test_an_archive_that_could_write_outside_or_plant_privileges_is_refused(tmp_path, hostile, problem):
    path = tmp_path / "bad.tar.gz"
    write_backend_archive(path, extra=hostile)
    assert problem in images.backend_archive_problem(str(path))


def test_an_archive_without_an_executable_run_sh_at_its_top_is_refused(tmp_path):
    nested = tmp_path / "nested.tar"
    with tarfile.open(nested, "w") as archive:
        _add(archive, "cpu-llama-cpp/run.sh", b"#!/bin/sh\n", mode=0o755)
    assert "no run.sh at its top" in images.backend_archive_problem(str(nested))
    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as archive:
        _add(archive, "run.sh", b"#!/bin/sh\n", mode=0o644)
    assert "without its executable bit" in images.backend_archive_problem(str(plain))
    not_tar = tmp_path / "x.tar"
    not_tar.write_text("hello")
    assert "is not a tar archive" in images.backend_archive_problem(str(not_tar))


# --- the settings ----------------------------------------------------------------------------


def test_the_archive_needs_its_sha256_and_must_match_it(archive):
    path, sha = archive
    with pytest.raises(settings.SettingsError, match="localai_backend_archive needs localai_backend_sha256. Fix:"):
        make_cfg(localai_backend_archive=path)
    with pytest.raises(settings.SettingsError) as refused:
        make_cfg(localai_backend_archive=path, localai_backend_sha256="0" * 64)
    assert f"has sha256 {sha}, not localai_backend_sha256 {'0' * 64}" in str(refused.value)
    assert "Fix:" in str(refused.value)
    assert offline_cfg(archive).localai_backend_sha256 == sha


def test_a_missing_or_unsafe_archive_is_refused_before_any_host(tmp_path):
    with pytest.raises(settings.SettingsError, match="localai_backend_archive = .* is not a file on the controller"):
        make_cfg(localai_backend_archive=str(tmp_path / "missing.tar"), localai_backend_sha256="0" * 64)
    bad = tmp_path / "bad.tar.gz"
    sha = write_backend_archive(bad, extra=lambda a: _add(a, "../x", b"x"))
    with pytest.raises(settings.SettingsError, match="would land outside the backend's directory. Fix:"):
        make_cfg(localai_backend_archive=str(bad), localai_backend_sha256=sha)


# --- the compose file LocalAI starts from ------------------------------------------------------


def localai_service(cfg) -> tuple[dict, dict]:
    compose = yaml.safe_load(stack.render("docker-compose.yaml.j2", cfg, 4))
    return compose["services"]["localai"], compose


def test_without_an_archive_localai_downloads_its_backend_onto_a_volume():
    service, compose = localai_service(make_cfg())
    assert service["environment"]["LOCALAI_EXTERNAL_BACKENDS"] == "llama-cpp"
    assert "localai-backends:/backends" in service["volumes"]
    assert "localai-backends" in compose["volumes"]


def test_with_an_archive_localai_reads_the_unpacked_backend_and_asks_no_registry(archive):
    cfg = offline_cfg(archive)
    service, compose = localai_service(cfg)
    env = service["environment"]
    # Nothing to ensure from a gallery at start (startup.go:407), no galleries to fetch or
    # watch (startup.go:426, 452), no autoload when a model's backend is missing.
    assert "LOCALAI_EXTERNAL_BACKENDS" not in env
    assert env["LOCALAI_BACKEND_GALLERIES"] == "[]" and env["LOCALAI_GALLERIES"] == "[]"
    assert env["LOCALAI_AUTOLOAD_BACKEND_GALLERIES"] == "false" and env["LOCALAI_AUTOLOAD_GALLERIES"] == "false"
    # The backends path is the unpacked directory, read-only, and no volume shadows it.
    assert env["LOCALAI_BACKENDS_PATH"] == "/backends"
    assert f"{cfg.stack_dir}/{localai_backend.BACKENDS_DIR}:/backends:ro" in service["volumes"]
    assert "volumes" not in compose
    # The model config names the backend by the directory it is unpacked into.
    model = yaml.safe_load(stack.render("localai-model.yaml.j2", cfg, 4))
    assert model["backend"] == localai_backend.NAME == "llama-cpp"


def test_an_archive_changes_nothing_for_the_other_backends(archive):
    for backend in ("llamacpp", "textgen"):
        assert stack.render("docker-compose.yaml.j2", offline_cfg(archive, backend=backend), 4) == stack.render(
            "docker-compose.yaml.j2", make_cfg(backend=backend), 4
        )


# --- on the host: the unpack script and the fact, run here -------------------------------------


def unpack(base, archive_path: str, sha: str) -> subprocess.CompletedProcess:
    with open(archive_path, "rb") as source:
        return subprocess.run(
            ["sh", "-c", localai_backend._UNPACK, "unpack-backend", str(base), localai_backend.NAME, sha],
            stdin=source, capture_output=True, text=True,
        )


def fact(base) -> dict:
    command = UnpackedBackend().command(str(base), localai_backend.NAME)
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout
    return UnpackedBackend().process(out.splitlines())


def test_the_host_unpacks_a_checked_archive_into_the_layout_localai_reads(tmp_path, archive):
    base = tmp_path / "localai-backends"
    base.mkdir()
    assert fact(base) == {"sha256": None, "run": False}
    done = unpack(base, *archive)
    assert done.returncode == 0, done.stderr
    backend = base / "llama-cpp"
    # A directory of the backends path holding an executable run.sh: a backend named after
    # the directory (LocalAI core/gallery/backends.go:662-695, pkg/model/process.go:237).
    run = backend / "run.sh"
    assert run.is_file() and not run.is_symlink() and os.stat(run).st_mode & 0o111
    assert (backend / "lib" / "libggml-cpu.so").is_file() and os.readlink(backend / "lib" / "ld.so") == "libggml-cpu.so"
    assert sorted(path.name for path in base.iterdir()) == [".llama-cpp.sha256", "llama-cpp"]
    assert fact(base) == {"sha256": archive[1], "run": True}


def test_bytes_that_do_not_match_the_sha256_leave_the_old_backend_alone(tmp_path, archive):
    base = tmp_path / "localai-backends"
    base.mkdir()
    assert unpack(base, *archive).returncode == 0
    newer = tmp_path / "newer.tar.gz"
    write_backend_archive(newer, version="2")
    done = unpack(base, str(newer), archive[1])  # bytes changed on the way
    assert done.returncode == 1
    assert f"the backend archive arrived with sha256 {hashlib.sha256(newer.read_bytes()).hexdigest()}, not {archive[1]}" in done.stderr
    assert (base / "llama-cpp" / "llama-cpp-cpu-all").read_text() == "stand-in binary 1\n"
    assert fact(base) == {"sha256": archive[1], "run": True}
    assert sorted(path.name for path in base.iterdir()) == [".llama-cpp.sha256", "llama-cpp"]

    newer_sha = hashlib.sha256(newer.read_bytes()).hexdigest()
    assert unpack(base, str(newer), newer_sha).returncode == 0  # a new version replaces the old whole
    assert (base / "llama-cpp" / "llama-cpp-cpu-all").read_text() == "stand-in binary 2\n"
    assert fact(base) == {"sha256": newer_sha, "run": True}


def test_links_planted_at_its_names_are_replaced_not_followed(tmp_path, archive):
    base = tmp_path / "localai-backends"
    base.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    for name in (".llama-cpp.tar", ".llama-cpp.sha256.tmp", ".llama-cpp.new"):
        (base / name).symlink_to(victim)
    assert unpack(base, *archive).returncode == 0
    assert victim.read_text() == "keep me\n"
    linked = tmp_path / "linked"
    linked.symlink_to(base)
    refused = unpack(linked, *archive)
    assert refused.returncode == 77 and "it is not a directory (a symbolic link?)" in refused.stderr
