"""Proves testbed/hub.py speaks the Hub protocol, using the REAL huggingface_hub (2.4) client and curl.

How to point huggingface_hub 2.4 at the fake endpoint
----------------------------------------------------
``huggingface_hub.constants`` reads ``HF_ENDPOINT`` ONCE, at import (``ENDPOINT`` and
``HUGGINGFACE_CO_URL_TEMPLATE``).  Setting the variable afterwards (``monkeypatch.setenv``) changes nothing
in an already-imported client (see ``test_hf_endpoint_env_is_read_at_import_only``).  So:

* in-process (these tests): pass ``endpoint=`` explicitly -- ``hf_hub_url(..., endpoint=ep)``,
  ``hf_hub_download(..., endpoint=ep)``, ``HfApi(endpoint=ep)``; ``get_hf_file_metadata`` takes the URL
  built by ``hf_hub_url``.  ``HF_ENDPOINT`` is still set via monkeypatch so any child process sees it.
* in a fresh process (how backchat's deploy runs python/``hf`` on a host): export ``HF_ENDPOINT`` before
  the interpreter starts; no ``endpoint=`` needed (``test_hf_endpoint_env_in_fresh_process``).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import textwrap
from urllib.parse import urlsplit

import httpx
import pytest

import huggingface_hub
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from testbed.hub import FakeHub

REPO = "backchat-test/tiny-GGUF"
FILE = "tiny.Q8_0.gguf"
SIZE = 3 * 1024 * 1024 + 12345  # a few MB, odd size on purpose
TOKEN = "hf_testtoken_0123456789"

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


def sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> pathlib.Path:
    p = tmp_path_factory.mktemp("src") / FILE
    p.write_bytes(os.urandom(SIZE))
    return p


@pytest.fixture
def hub(monkeypatch):
    with FakeHub() as h:
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint())  # for child processes; in-process needs endpoint=
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield h


@pytest.fixture
def repo(hub, source) -> str:
    """Commit sha of REPO@main holding FILE (served from disk, as a Path)."""
    return hub.add_file(REPO, FILE, source)


def curl(out: pathlib.Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", *extra, "-o", str(out), url], capture_output=True, text=True, timeout=30)


# --- 1. metadata from the 302 ------------------------------------------------------------------------------
def test_get_hf_file_metadata(hub, repo, source):
    url = hf_hub_url(REPO, FILE, revision="main", endpoint=hub.endpoint())
    assert url == hub.url(REPO, FILE)
    meta = get_hf_file_metadata(url, token=False)
    assert meta.commit_hash == repo
    assert meta.etag == sha256_file(source)
    assert meta.size == SIZE
    # the location is on the other origin (the CDN), which the client does not follow for HEAD
    loc = urlsplit(meta.location)
    assert (loc.hostname, loc.port) == ("127.0.0.1", hub.cdn_port) and loc.port != hub.hub_port
    assert [r.method for r in hub.requests] == ["HEAD"]

    # by commit sha too
    meta2 = get_hf_file_metadata(hf_hub_url(REPO, FILE, revision=repo, endpoint=hub.endpoint()), token=False)
    assert (meta2.commit_hash, meta2.etag, meta2.size) == (repo, meta.etag, SIZE)


def test_raw_resolve_headers(hub, repo, source):
    r = httpx.head(hub.url(REPO, FILE), follow_redirects=False)
    assert r.status_code == 302
    assert r.headers["X-Repo-Commit"] == repo
    assert r.headers["X-Linked-Etag"] == f'"{sha256_file(source)}"'
    assert int(r.headers["X-Linked-Size"]) == SIZE
    assert r.headers["ETag"].startswith('"')
    g = httpx.get(hub.url(REPO, FILE), follow_redirects=False)
    assert g.status_code == 302 and g.headers["Location"] == r.headers["Location"]
    cdn = httpx.head(r.headers["Location"])
    assert cdn.status_code == 200 and int(cdn.headers["Content-Length"]) == SIZE
    assert cdn.headers["Accept-Ranges"] == "bytes"
    # an unsigned CDN URL is refused: the CDN cannot be used to get around gating
    assert httpx.get(r.headers["Location"].split("?")[0]).status_code == 403


# --- 2. API: paths-info, model_info, tree ------------------------------------------------------------------
def test_paths_info_and_model_info(hub, repo, source):
    api = HfApi(endpoint=hub.endpoint(), token=False)
    [info] = api.get_paths_info(REPO, [FILE, "does-not-exist.bin"], revision="main", expand=True)
    assert info.path == FILE and info.size == SIZE
    assert info.lfs.sha256 == sha256_file(source) and info.lfs.size == SIZE
    assert info.last_commit is not None and info.last_commit.oid == repo
    [info2] = api.get_paths_info(REPO, FILE, revision=repo)  # by sha, expand=False
    assert info2.lfs.sha256 == info.lfs.sha256 and info2.last_commit is None

    mi = api.model_info(REPO)
    assert mi.id == REPO and mi.sha == repo
    assert [s.rfilename for s in mi.siblings] == [FILE]
    mi2 = api.model_info(REPO, revision=repo, files_metadata=True)
    assert mi2.sha == repo and mi2.siblings[0].lfs.sha256 == info.lfs.sha256

    assert api.list_repo_files(REPO) == [FILE]
    assert api.file_exists(REPO, FILE) and not api.file_exists(REPO, "nope.gguf")


def test_new_commit_moves_main_old_sha_still_resolves(hub, repo):
    sha2 = hub.add_file(REPO, "README.md", b"# tiny\n")
    assert sha2 != repo
    api = HfApi(endpoint=hub.endpoint(), token=False)
    assert api.model_info(REPO).sha == sha2
    assert sorted(s.rfilename for s in api.model_info(REPO).siblings) == ["README.md", FILE]
    assert [s.rfilename for s in api.model_info(REPO, revision=repo).siblings] == [FILE]
    # FILE did not change in the second commit: its last commit is still the first one
    [info] = api.get_paths_info(REPO, [FILE], revision="main", expand=True)
    assert info.last_commit.oid == repo


# --- 3. downloads with the client --------------------------------------------------------------------------
def test_hf_hub_download(hub, repo, source, tmp_path):
    path = hf_hub_download(REPO, FILE, endpoint=hub.endpoint(), cache_dir=tmp_path, token=False)
    assert pathlib.Path(path).read_bytes() == source.read_bytes()
    assert f"snapshots/{repo}/" in path
    assert hub.bytes_served[FILE] == SIZE
    # cached: a second call only HEADs
    hf_hub_download(REPO, FILE, endpoint=hub.endpoint(), cache_dir=tmp_path, token=False)
    assert hub.bytes_served[FILE] == SIZE
    # by commit sha, and snapshot_download (model_info + tree listing)
    p2 = hf_hub_download(REPO, FILE, revision=repo, endpoint=hub.endpoint(), cache_dir=tmp_path, token=False)
    assert pathlib.Path(p2).read_bytes() == source.read_bytes()
    snap = snapshot_download(REPO, endpoint=hub.endpoint(), cache_dir=tmp_path / "snap", token=False)
    assert sha256_file(pathlib.Path(snap) / FILE) == sha256_file(source)


def test_hf_hub_download_survives_dropped_connection(hub, repo, source, tmp_path):
    # http_get retries a RemoteProtocolError (after a 1 s sleep), resuming from what it has WRITTEN.  It reads
    # the body with iter_bytes(chunk_size=10 MiB), so a drop before the first 10 MiB loses everything received:
    # the retry has no Range header and the whole file is sent again.
    hub.drop_after(FILE, SIZE // 2)
    path = hf_hub_download(REPO, FILE, endpoint=hub.endpoint(), cache_dir=tmp_path, token=False)
    assert sha256_file(pathlib.Path(path)) == sha256_file(source)
    cdn = [r for r in hub.requests if r.path.startswith("/cdn-lfs/")]
    assert [(r.method, r.range) for r in cdn] == [("GET", None), ("GET", None)]
    assert hub.bytes_served[FILE] == SIZE // 2 + SIZE


# --- 4./5. curl --------------------------------------------------------------------------------------------
@needs_curl
def test_curl_resumes_from_half(hub, repo, source, tmp_path):
    part = tmp_path / "part"
    half = SIZE // 2
    with open(source, "rb") as f:
        part.write_bytes(f.read(half))
    r = curl(part, hub.url(REPO, FILE), "-fL", "-C", "-")
    assert r.returncode == 0, r.stderr
    assert part.stat().st_size == SIZE and sha256_file(part) == sha256_file(source)
    assert hub.bytes_served[FILE] == SIZE - half
    assert [(r.method, r.range) for r in hub.requests] == [("GET", f"bytes={half}-")] * 2  # hub 302, then CDN


@needs_curl
def test_curl_drop_then_resume(hub, repo, source, tmp_path):
    part = tmp_path / "part"
    hub.drop_after(FILE, SIZE // 3)
    r1 = curl(part, hub.url(REPO, FILE), "-fL", "-C", "-")
    assert r1.returncode != 0  # 18: transfer closed with outstanding read data remaining
    assert 0 < part.stat().st_size < SIZE
    r2 = curl(part, hub.url(REPO, FILE), "-fL", "-C", "-")
    assert r2.returncode == 0, r2.stderr
    assert sha256_file(part) == sha256_file(source)
    assert hub.bytes_served[FILE] < 2 * SIZE
    assert hub.bytes_served[FILE] == SIZE


@needs_curl
def test_curl_on_complete_file_gets_416(hub, repo, source, tmp_path):
    part = tmp_path / "part"
    shutil.copyfile(source, part)
    # No -f: curl treats the 416 to a resume as "already complete" (and never appends its body).
    r = curl(part, hub.url(REPO, FILE), "-L", "-C", "-")
    assert r.returncode == 0, r.stderr
    assert sha256_file(part) == sha256_file(source) and hub.bytes_served.get(FILE, 0) == 0
    # With -f the answer depends on curl's version when the 416 carries Content-Range (as RFC 9110 asks):
    # curl < 8.5 (Debian bookworm's 7.88.1) exits 22, curl >= 8.5 exits 0 (curl issue #10521).
    r = curl(part, hub.url(REPO, FILE), "-fL", "-C", "-")
    assert r.returncode in (0, 22)
    # Without Content-Range on the 416, curl >= 7.76 exits 0 even with -f.
    hub.content_range_on_416 = False
    r = curl(part, hub.url(REPO, FILE), "-fL", "-C", "-")
    assert r.returncode == 0, r.stderr
    assert sha256_file(part) == sha256_file(source) and hub.bytes_served.get(FILE, 0) == 0


def test_cdn_ranges(hub, repo, source):
    loc = httpx.head(hub.url(REPO, FILE)).headers["Location"]
    data = source.read_bytes()
    with httpx.Client() as c:
        r = c.get(loc, headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == data[10:20]
        assert r.headers["Content-Range"] == f"bytes 10-19/{SIZE}"
        r = c.get(loc, headers={"Range": "bytes=-5"})
        assert r.status_code == 206 and r.content == data[-5:]
        r = c.get(loc, headers={"Range": f"bytes={SIZE}-"})
        assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{SIZE}" and r.content == b""
        r = c.get(loc)  # same keep-alive connection
        assert r.status_code == 200 and r.content == data


# --- 6. errors ---------------------------------------------------------------------------------------------
def test_missing_file_revision_repo(hub, repo, tmp_path):
    ep = hub.endpoint()
    with pytest.raises(EntryNotFoundError) as ei:  # RemoteEntryNotFoundError in 2.4
        get_hf_file_metadata(hf_hub_url(REPO, "missing.gguf", endpoint=ep), token=False)
    assert ei.value.response.headers["X-Repo-Commit"] == repo
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.gguf", endpoint=ep, cache_dir=tmp_path, token=False)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, FILE, revision="nope", endpoint=ep, cache_dir=tmp_path, token=False)
    with pytest.raises(RevisionNotFoundError):
        HfApi(endpoint=ep, token=False).model_info(REPO, revision="0" * 40)
    with pytest.raises(RepositoryNotFoundError) as ei:
        hf_hub_download("nobody/nothing", FILE, endpoint=ep, cache_dir=tmp_path, token=False)
    assert type(ei.value) is RepositoryNotFoundError
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=ep, token=False).get_paths_info("nobody/nothing", [FILE])


def test_gated_repo(hub, source, tmp_path):
    sha = hub.add_file("gated/model", FILE, source, gated=True, token=TOKEN)
    ep = hub.endpoint()
    url = hf_hub_url("gated/model", FILE, endpoint=ep)
    with pytest.raises(GatedRepoError) as ei:
        get_hf_file_metadata(url, token=False)
    assert ei.value.response.status_code == 401
    with pytest.raises(GatedRepoError):
        hf_hub_download("gated/model", FILE, endpoint=ep, cache_dir=tmp_path, token=False)
    with pytest.raises(GatedRepoError) as ei:
        hf_hub_download("gated/model", FILE, endpoint=ep, cache_dir=tmp_path, token="hf_wrong")
    assert ei.value.response.status_code == 403
    assert hub.bytes_served.get(FILE, 0) == 0

    assert get_hf_file_metadata(url, token=TOKEN).commit_hash == sha
    path = hf_hub_download("gated/model", FILE, endpoint=ep, cache_dir=tmp_path, token=TOKEN)
    assert sha256_file(pathlib.Path(path)) == sha256_file(source)
    # like the real Hub, a gated repo's metadata is public; only the content is gated
    assert HfApi(endpoint=ep, token=False).model_info("gated/model").gated == "manual"


# --- addresses and endpoint configuration ------------------------------------------------------------------
def _non_loopback_ipv4() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.123", 9))  # no packet is sent: just picks the outgoing interface
            ip = s.getsockname()[0]
        return None if ip.startswith("127.") else ip
    except OSError:
        return None


def test_bind_all_location_follows_host_header(source):
    with FakeHub(bind="0.0.0.0") as h:
        sha = h.add_file(REPO, FILE, source)
        hosts = ["127.0.0.1", "localhost"] + [ip for ip in [_non_loopback_ipv4()] if ip]
        for host in hosts:
            r = httpx.head(h.url(REPO, FILE, host=host))
            assert r.status_code == 302 and r.headers["X-Repo-Commit"] == sha
            loc = urlsplit(r.headers["Location"])
            assert (loc.hostname, loc.port) == (host, h.cdn_port)
            assert httpx.head(r.headers["Location"]).status_code == 200
        meta = get_hf_file_metadata(hf_hub_url(REPO, FILE, endpoint=h.endpoint(hosts[-1])), token=False)
        assert meta.size == SIZE


def test_hf_endpoint_env_is_read_at_import_only(hub, monkeypatch):
    # The fixture set HF_ENDPOINT after huggingface_hub was imported: the client does not see it.
    assert os.environ["HF_ENDPOINT"] == hub.endpoint()
    assert constants.ENDPOINT != hub.endpoint()
    assert not hf_hub_url(REPO, FILE).startswith(hub.endpoint())
    assert HfApi().endpoint != hub.endpoint()
    assert hf_hub_url(REPO, FILE, endpoint=hub.endpoint()).startswith(hub.endpoint())


def test_hf_endpoint_env_in_fresh_process(hub, repo, source, tmp_path):
    script = textwrap.dedent(f"""
        import hashlib, pathlib
        from huggingface_hub import hf_hub_download, HfApi, constants
        assert constants.ENDPOINT == {hub.endpoint()!r}, constants.ENDPOINT
        p = hf_hub_download({REPO!r}, {FILE!r}, cache_dir={str(tmp_path)!r}, token=False)
        print(hashlib.sha256(pathlib.Path(p).read_bytes()).hexdigest(), HfApi().model_info({REPO!r}).sha)
    """)
    env = dict(os.environ, HF_ENDPOINT=hub.endpoint(), HF_HUB_DISABLE_TELEMETRY="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [sha256_file(source), repo]


def test_client_version_is_one_pyproject_allows():
    """The stand-in Hub is checked against the client pyproject.toml admits, whichever that is."""
    import re
    from pathlib import Path

    from packaging.requirements import Requirement

    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    (spec,) = re.findall(r'"(huggingface_hub[^"]*)"', pyproject)
    assert huggingface_hub.__version__ in Requirement(spec).specifier
