"""templates/fetch-model.sh run for real on this machine, as root, the way a host runs it.

The bytes come from the local stand-in for the Hub (testbed/hub.py, on 127.0.0.1,
with Range support), or, with URL "-", from a ``.part`` the test writes as the controller
would. Issue 12: a symbolic link planted in a models directory others can write made root
truncate a file in /etc. The script must refuse every directory someone else could plant a
link in, and every link (or other odd file) already planted under the names it writes.

These tests need root (root-owned directories, chown to ``nobody``). Elsewhere they skip,
except when BACKCHAT_REQUIRE_REALHOSTS=1 (CI): then they fail. BACKCHAT_FETCH_MODEL_SCRIPT
points them at another copy of the script (to show they fail on an unhardened one).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.hub import FakeHub

PROJECT = Path(__file__).resolve().parents[2]
SCRIPT = Path(os.environ.get("BACKCHAT_FETCH_MODEL_SCRIPT") or PROJECT / "templates" / "fetch-model.sh")
REPO = "test/fetch-script-GGUF"
GATED_REPO = "test/fetch-script-gated-GGUF"
TOKEN = "hf_fetch_script_token"
NAME = "m.gguf"
SIZE = 256 * 1024 + 17
REFUSED = 77
VICTIM_TEXT = b"root:precious:content\n"
MARKER_LINE = re.compile(r'\{"sha256": "[0-9a-f]{64}", "size": \d+, "mtime": \d+, "url": "[^"]*"\}\n')


def _bytes() -> bytes:
    out, block = bytearray(), hashlib.sha256(b"fetch-model.sh").digest()
    while len(out) < SIZE:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:SIZE])


DATA = _bytes()
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture(autouse=True)
def _needs_root():
    reason = None
    if os.geteuid() != 0:
        reason = "fetch-model.sh runs as root on hosts; these tests need root to run it the same way"
    elif missing := [tool for tool in ("sh", "curl", "flock", "sha256sum") if shutil.which(tool) is None]:
        reason = f"fetch-model.sh needs {', '.join(missing)} on PATH"
    if reason is None:
        return
    if os.environ.get("BACKCHAT_REQUIRE_REALHOSTS") == "1":
        pytest.fail(f"BACKCHAT_REQUIRE_REALHOSTS=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as hub:
        hub.add_file(REPO, NAME, DATA)
        hub.add_file(GATED_REPO, NAME, DATA, gated=True, token=TOKEN)
        yield hub


def nobody() -> tuple[int, int]:
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


@dataclass
class Layout:
    base: Path  # root's, 0755: holds the models directory and, outside it, the victim
    models: Path  # root's, 0755, as the deploy creates it
    victim: Path  # a file of root's the attacker wants overwritten

    @property
    def dest(self) -> Path:
        return self.models / NAME

    @property
    def marker(self) -> Path:
        return self.models / f".{NAME}.verified"

    def listing(self) -> dict[str, tuple[int, int, str | None]]:
        """What the models directory holds: name -> (uid, mode, link target)."""
        out = {}
        for entry in sorted(os.listdir(self.models)):
            path = self.models / entry
            info = path.lstat()
            out[entry] = (info.st_uid, stat.S_IMODE(info.st_mode), os.readlink(path) if path.is_symlink() else None)
        return out


@pytest.fixture
def layout(tmp_path) -> Layout:
    base = tmp_path / "host"
    models = base / "models"
    models.mkdir(parents=True)
    for directory in (tmp_path, base, models):  # pytest made tmp_path 0700; a host's /opt is 0755
        directory.chmod(0o755)
    victim = base / "etc-shadow"
    victim.write_bytes(VICTIM_TEXT)
    victim.chmod(0o640)
    return Layout(base, models, victim)


def run(url: str, dest: Path, marker: Path, sha256: str = SHA, size: int = SIZE, header_file: Path | None = None):
    args = ["sh", str(SCRIPT), url, str(dest), sha256, str(size), str(marker)]
    if header_file is not None:
        args.append(str(header_file))
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def fetch(layout: Layout, hub: FakeHub, **kwargs):
    return run(hub.url(REPO, NAME), layout.dest, layout.marker, **kwargs)


def served(hub: FakeHub) -> int:
    return hub.bytes_served.get(NAME, 0)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def assert_victim_intact(layout: Layout):
    assert layout.victim.read_bytes() == VICTIM_TEXT, "root wrote through the planted link"
    assert mode(layout.victim) == 0o640
    assert layout.victim.stat().st_uid == 0


def assert_refused(done, path: Path | str):
    assert done.returncode == REFUSED, (done.returncode, done.stdout, done.stderr)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"refusing {path}: "), done.stderr
    assert "Fix: " in last, done.stderr


def assert_verified(layout: Layout, url: str):
    assert layout.dest.read_bytes() == DATA
    assert mode(layout.dest) == 0o644
    text = layout.marker.read_text()
    assert MARKER_LINE.fullmatch(text), text
    info = layout.dest.stat()
    assert json.loads(text) == {"sha256": SHA, "size": SIZE, "mtime": int(info.st_mtime), "url": url}
    assert mode(layout.marker) == 0o644
    assert not Path(f"{layout.marker}.tmp").exists()
    assert not Path(f"{layout.dest}.part").exists()
    for path in layout.models.iterdir():
        assert not path.is_symlink()
        assert path.lstat().st_uid == 0
        assert mode(path) & 0o022 == 0, f"{path} is writable by others"


# --- what the script is for -----------------------------------------------------------


def test_downloads_verifies_and_marks_then_a_rerun_checks_the_file_again(layout, hub):
    before = served(hub)
    first = fetch(layout, hub)
    assert first.returncode == 0, first
    assert f"downloading {NAME}: resuming at 0 of {SIZE} bytes (attempt 1)" in first.stdout
    assert f"model verified: {layout.dest}" in first.stdout
    assert_verified(layout, hub.url(REPO, NAME))
    assert served(hub) - before == SIZE
    assert mode(Path(f"{layout.dest}.lock")) & 0o077 == 0

    # The caller skips the script when the marker matches; run anyway, it hashes the file again.
    second = fetch(layout, hub)
    assert second.returncode == 0, second
    assert "existing file verified" in second.stdout, second
    assert served(hub) - before == SIZE, "an intact file was downloaded again"
    assert_verified(layout, hub.url(REPO, NAME))


def test_a_partial_file_is_resumed(layout, hub):
    half = SIZE // 2
    Path(f"{layout.dest}.part").write_bytes(DATA[:half])
    before = served(hub)
    done = fetch(layout, hub)
    assert done.returncode == 0, done
    assert f"resuming at {half} of {SIZE} bytes" in done.stdout
    assert served(hub) - before == SIZE - half
    assert_verified(layout, hub.url(REPO, NAME))


def test_a_wrong_sha256_removes_the_download(layout, hub):
    done = fetch(layout, hub, sha256="0" * 64)
    assert done.returncode == 1, done
    assert f"sha256 mismatch: expected {'0' * 64}, got {SHA} (file removed)" in done.stderr
    assert not layout.dest.exists() and not layout.marker.exists()
    assert not Path(f"{layout.dest}.part").exists()


def test_a_second_run_meanwhile_is_turned_away(layout, hub):
    with open(f"{layout.dest}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = fetch(layout, hub)
    assert done.returncode == 75, done
    assert f"another download of {layout.dest} is running" in done.stderr
    assert not layout.dest.exists()


def test_bytes_pushed_by_the_controller(layout):
    part = Path(f"{layout.dest}.part")
    done = run("-", layout.dest, layout.marker)
    assert done.returncode == 100 and f"need bytes from 0 of {SIZE}" in done.stdout, done
    part.write_bytes(DATA[:1000])  # as the controller's `cat >>` would
    done = run("-", layout.dest, layout.marker)
    assert done.returncode == 100 and f"need bytes from 1000 of {SIZE}" in done.stdout, done
    with open(part, "ab") as out:
        out.write(DATA[1000:])
    done = run("-", layout.dest, layout.marker)
    assert done.returncode == 0, done
    assert_verified(layout, "pushed by the controller")


def test_a_gated_download_sends_the_header_file(layout, hub):
    header = layout.base / ".hf-token-header"
    header.write_text(f"Authorization: Bearer {TOKEN}\n")
    header.chmod(0o600)
    url = hub.url(GATED_REPO, NAME)
    done = run(url, layout.dest, layout.marker, header_file=header)
    assert done.returncode == 0, done
    assert_verified(layout, url)


def test_a_directory_above_with_the_sticky_bit_is_fine(tmp_path, hub):
    # Like a models directory of root's in /tmp: others cannot rename or remove it.
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o1777)
    tmp_path.chmod(0o755)
    models = shared / "models"
    models.mkdir(mode=0o755)
    layout = Layout(shared, models, shared / "unused")
    done = fetch(layout, hub)
    assert done.returncode == 0, done
    assert_verified(layout, hub.url(REPO, NAME))


# --- issue 12: links planted for root to write through --------------------------------

PLANTED = {  # what the link is planted as -> its path in the layout
    "lock": lambda layout: Path(f"{layout.dest}.lock"),
    "part": lambda layout: Path(f"{layout.dest}.part"),
    "marker": lambda layout: layout.marker,
    "marker.tmp": lambda layout: Path(f"{layout.marker}.tmp"),
    "model": lambda layout: layout.dest,
}


def plant_link(layout: Layout, where: str) -> Path:
    link = PLANTED[where](layout)
    link.symlink_to(layout.victim)
    os.lchown(link, *nobody())
    return link


@pytest.mark.parametrize("source", ["hub", "controller"])
@pytest.mark.parametrize("where", list(PLANTED))
def test_a_planted_symlink_is_refused(layout, hub, where, source):
    link = plant_link(layout, where)
    before, requests = layout.listing(), len(hub.requests)
    if source == "hub":
        done = fetch(layout, hub)
    else:
        done = run("-", layout.dest, layout.marker)
    assert_refused(done, link)
    assert f"it is a symbolic link (to {layout.victim})" in done.stderr
    assert_victim_intact(layout)
    assert layout.listing() == before, "the script wrote next to the planted link"
    assert len(hub.requests) == requests, "the script fetched anyway"


def test_a_hard_link_to_another_file_is_refused(layout, hub):
    part = Path(f"{layout.dest}.part")
    os.link(layout.victim, part)
    done = fetch(layout, hub)
    assert_refused(done, part)
    assert "2 names (hard links)" in done.stderr
    assert_victim_intact(layout)


def test_a_file_of_another_user_is_refused(layout, hub):
    # Its owner could rewrite it after the sha256 check.
    part = Path(f"{layout.dest}.part")
    part.write_bytes(DATA[:100])
    os.chown(part, *nobody())
    done = fetch(layout, hub)
    assert_refused(done, part)
    assert f"owned by uid {nobody()[0]}, not root" in done.stderr
    assert part.read_bytes() == DATA[:100]


def test_a_directory_in_place_of_the_model_is_refused(layout, hub):
    layout.dest.mkdir()
    done = fetch(layout, hub)
    assert_refused(done, layout.dest)
    assert "not a regular file" in done.stderr


# --- issue 12: directories others could plant links in ---------------------------------


@pytest.mark.parametrize("bits", [0o1777, 0o0777, 0o0775, 0o0757], ids=oct)
def test_a_models_directory_others_can_write_is_refused(layout, hub, bits):
    layout.models.chmod(bits)
    link = plant_link(layout, "lock")  # what a user could do there
    before, requests = layout.listing(), len(hub.requests)
    done = fetch(layout, hub)
    assert_refused(done, layout.models)
    assert f"writable by group or others (mode {bits:o})" in done.stderr
    assert layout.listing() == before, "the script wrote in the directory"
    assert len(hub.requests) == requests
    assert_victim_intact(layout)
    assert link.is_symlink()
    if bits & 0o1000:  # a shared directory like /tmp: chmod is not the fix
        assert "chmod" not in done.stderr
    else:
        assert f"chmod go-w {layout.models}" in done.stderr


def test_a_models_directory_owned_by_another_user_is_refused(layout, hub):
    os.chown(layout.models, *nobody())
    done = fetch(layout, hub)
    assert_refused(done, layout.models)
    assert f"it is owned by uid {nobody()[0]}, not root" in done.stderr
    assert layout.listing() == {}


@pytest.mark.parametrize("change", ["owner", "mode"])
def test_a_directory_above_that_others_can_change_is_refused(layout, hub, change):
    # Its owner (or anyone, if all can write it) could swap the models directory for their own.
    if change == "owner":
        os.chown(layout.base, *nobody())
    else:
        layout.base.chmod(0o777)
    done = fetch(layout, hub)
    assert_refused(done, layout.models)
    assert f"the directory above it, {layout.base}," in done.stderr
    assert layout.listing() == {}


def test_a_models_directory_that_is_a_symlink_is_refused(layout, hub):
    real = layout.base / "real-models"
    real.mkdir(mode=0o755)
    link = layout.base / "models-link"
    link.symlink_to(real)
    done = run(hub.url(REPO, NAME), link / NAME, link / f".{NAME}.verified")
    assert_refused(done, link)
    assert list(real.iterdir()) == []


def test_a_marker_directory_others_can_write_is_refused(layout, hub):
    elsewhere = layout.base / "markers"
    elsewhere.mkdir()
    elsewhere.chmod(0o777)
    done = run(hub.url(REPO, NAME), layout.dest, elsewhere / f".{NAME}.verified")
    assert_refused(done, elsewhere)
    assert list(elsewhere.iterdir()) == [] and layout.listing() == {}


# --- the token header curl reads -----------------------------------------------------


def test_a_header_file_that_is_a_symlink_is_refused(layout, hub):
    layout.victim.write_bytes(b"X-Leaked: " + VICTIM_TEXT)  # what curl would send as a header
    header = layout.base / ".hf-token-header"
    header.symlink_to(layout.victim)
    os.lchown(header, *nobody())
    requests = len(hub.requests)
    done = run(hub.url(GATED_REPO, NAME), layout.dest, layout.marker, header_file=header)
    assert_refused(done, header)
    assert len(hub.requests) == requests, "curl was started with the linked file"
    assert layout.listing() == {}
