"""LocalAI's llama-cpp backend without a registry: unpacked on each host from the controller.

LocalAI's image carries no llama.cpp since v3.2. What it does about that, read in its
source at v4.9.0 (the pinned ``localai_image``):

* At start, each name in ``LOCALAI_EXTERNAL_BACKENDS`` is ensured from the backend
  galleries (core/application/startup.go:407-411, core/services/galleryop/backends.go:211-219):
  a gallery name is downloaded as an OCI image (core/gallery/backends.go:342-416, the
  gallery's ``cpu-llama-cpp`` is quay.io/go-skynet/local-ai-backends:latest-cpu-llama-cpp,
  backend/index.yaml:2650-2653: not even pinned) unless a runnable backend of that name is
  installed already (backends.go:197-212). An air-gapped host has neither.
* A backend is any directory of ``LOCALAI_BACKENDS_PATH`` holding ``run.sh``, named after
  the directory; ``metadata.json`` is optional (backends.go:654-695). All are registered at
  start (startup.go:419, backends.go:753-763), and a model config's ``backend: llama-cpp``
  runs that directory's ``run.sh`` (pkg/model/initializers.go:74, 126-136).
* Nothing else reaches a registry when the galleries are empty and autoload is off
  (``LOCALAI_BACKEND_GALLERIES``, ``LOCALAI_GALLERIES``, ``LOCALAI_AUTOLOAD_*``,
  core/cli/run.go:53-56, core/config/application_config.go:626-652): the upgrade checker
  runs only with backend galleries (startup.go:426), the gallery warm-up walks the model
  galleries (startup.go:452).

So with ``localai_backend_archive`` (the backend's files, ``run.sh`` at the top) the
controller checks the archive once per run (backchat/images.py, against
``localai_backend_sha256``), streams it to each host that lacks it, and the host checks the
sha256 of what arrived, unpacks it beside the old one and swaps it in (as LocalAI's own
install does, backends.go:301-468). The directory is mounted read-only as ``/backends``
(templates/docker-compose.yaml.j2) and LocalAI is started with no external backends and no
galleries. A marker holding the archive's sha256 makes a re-run send nothing.
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import FunctionCommand, QuoteString, StringCommand, operation
from pyinfra.operations import files, server

from backchat import outcomes, transport
from backchat.facts import OwnPaths, UnpackedBackend

BACKENDS_DIR = "localai-backends"  # under stack_dir, mounted as /backends
NAME = "llama-cpp"  # the directory LocalAI knows the backend by: the model config's `backend:`
CHUNK = 1024 * 1024


def host_dir(cfg) -> str | None:
    """The host directory mounted as LocalAI's backends path, or None (LocalAI downloads)."""
    return f"{cfg.stack_dir}/{BACKENDS_DIR}" if cfg.localai_backend_archive else None


def deliver(cfg) -> bool:
    """Queue what puts the archive's backend on this host: did it change?"""
    base = host_dir(cfg)
    if "localai" not in cfg.services:
        return False
    if not base:
        if cfg.image_archives:  # images from archives: probably no registry either
            host.log_styled(
                f"image_archives is set but localai_backend_archive is not: LocalAI downloads its {NAME} "
                "backend from quay.io on its first start, and fails to serve the model where that registry "
                "cannot be reached. Fix: README \"Air-gapped labs, end to end\", or backend = 'llamacpp'",
                fg="yellow",
            )
        return False
    # No mode: a directory that already exists (maybe not ours) is never re-moded.
    files.directory(name="Create LocalAI's backends directory", path=base)
    found = host.get_fact(UnpackedBackend, base=base, backend=NAME)
    if found["sha256"] == cfg.localai_backend_sha256 and found["run"]:
        host.noop(f"LocalAI's {NAME} backend {cfg.localai_backend_sha256[:12]} already unpacked")
        return False
    unpack(
        name=f"Unpack LocalAI's {NAME} backend from the controller",
        archive=cfg.localai_backend_archive, base=base, backend=NAME, sha256=cfg.localai_backend_sha256,
    )
    return True


# Runs as root in our own directory. Every name it writes is removed first (rm does not
# follow a link) or created new (mkdir, a fresh file), and the base must not be a link:
# nothing is written through a planted symlink. The bytes land 0600, are checked against
# the pinned sha256, unpacked beside the old backend, then swapped in.
_UNPACK = r"""
set -eu
base=$1 name=$2 sha256=$3
if [ -L "$base" ] || [ ! -d "$base" ]; then
  echo "refusing $base: it is not a directory (a symbolic link?). Fix: remove it and run again" >&2; exit 77
fi
cd -- "$base"
tar_file=".$name.tar" new=".$name.new" old=".$name.old" marker=".$name.sha256"
rm -rf -- "$tar_file" "$new" "$old" "$marker.tmp"
(umask 077 && cat >"$tar_file")
got=$(sha256sum <"$tar_file" | cut -d' ' -f1)
if [ "$got" != "$sha256" ]; then
  rm -f -- "$tar_file"; echo "the backend archive arrived with sha256 $got, not $sha256" >&2; exit 1
fi
mkdir -m 0755 -- "$new"
tar -x --no-same-owner -f "$tar_file" -C "$new"
rm -f -- "$tar_file"
if [ -L "$new/run.sh" ] || [ ! -f "$new/run.sh" ]; then
  rm -rf -- "$new"; echo "the backend archive has no run.sh at its top" >&2; exit 1
fi
rm -f -- "$marker"
if [ -e "$name" ] || [ -L "$name" ]; then mv -- "$name" "$old"; fi
mv -- "$new" "$name"
rm -rf -- "$old"
printf '%s\n' "$sha256" >"$marker.tmp"
mv -f -- "$marker.tmp" "$marker"
"""


@operation(is_idempotent=False)
def unpack(archive: str, base: str, backend: str, sha256: str):
    """
    Stream a backend archive to the host, check its sha256 there, unpack it as ``base/backend``.

    + archive: the tarball on the controller (checked when the settings were)
    + base: the host directory LocalAI sees as its backends path
    + backend: the directory name LocalAI knows the backend by
    + sha256: what the bytes must hash to on the host
    """
    yield FunctionCommand(_stream, (archive, base, backend, sha256), {})


def _stream(state, host, archive: str, base: str, backend: str, sha256: str) -> bool:
    command = StringCommand(
        "sh", "-c", QuoteString(_UNPACK), "unpack-backend", QuoteString(base), QuoteString(backend), sha256
    )

    def chunks(_line: str):
        with open(archive, "rb") as source:
            while chunk := source.read(CHUNK):
                yield chunk

    try:
        _line, sent = transport.run_with_stdin(state, host, command, chunks)
    except (transport.TransportError, OSError) as error:
        return outcomes.fail(host, f"LocalAI's {backend} backend was not installed: {error}")
    host.log_styled(f"LocalAI's {backend} backend: {sent:,} bytes sent, sha256 checked, unpacked in {base}/{backend}")
    return True


def remove(cfg) -> None:
    """uninstall.py: the unpacked backend, its marker and directory; nothing under a link."""
    paths = [f"{BACKENDS_DIR}/{NAME}", f"{BACKENDS_DIR}/.{NAME}.sha256", BACKENDS_DIR]
    found = host.get_fact(OwnPaths, root=cfg.stack_dir, paths=paths)
    if any(kind in ("link", "unsafe", "other") for kind in found.values()):
        host.log_styled(f"{cfg.stack_dir}/{BACKENDS_DIR} is or holds a link: left alone, not followed", fg="yellow")
        return
    if found:
        # rm -r never follows a link inside the tree; the paths above were checked for links.
        server.shell(
            name=f"Remove LocalAI's unpacked {NAME} backend",
            commands=[StringCommand("rm", "-rf", "--", *(QuoteString(f"{cfg.stack_dir}/{path}") for path in paths))],
        )
