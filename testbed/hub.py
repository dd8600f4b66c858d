"""A local stand-in for the Hugging Face Hub, speaking the protocol huggingface_hub 2.4 uses.

Two threaded HTTP servers on this machine:

* the *hub* origin (``endpoint()``, what ``HF_ENDPOINT`` / ``endpoint=`` point at):

  - ``HEAD|GET /{repo}/resolve/{revision}/{filename}`` -> ``302`` carrying the file metadata the client
    reads from the redirect itself (``X-Repo-Commit``, ``X-Linked-Etag: "<sha256>"``, ``X-Linked-Size``,
    ``ETag``) and a ``Location`` on the *cdn* origin (same host as the request's ``Host`` header, other
    port).  huggingface_hub follows redirects only while they stay on the Hub's origin, so the metadata
    must be on the 302; curl ``-L`` follows it to the bytes.
  - ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` -> model info JSON
    (``id``, ``sha``, ``siblings``; with ``?blobs=true`` also size/blobId/lfs per sibling).
  - ``POST /api/models/{repo}/paths-info/{rev}`` (form or JSON ``paths``/``expand``) -> list of
    ``{type, path, size, oid, lfs: {oid, size, pointerSize}, lastCommit?, securityFileStatus?}``.
  - ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=&expand=`` (what snapshot_download lists).
  - errors: ``404`` + ``X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound``;
    gated repos answer resolve requests without the right ``Authorization: Bearer`` with
    ``401`` (no token) / ``403`` (wrong token) + ``X-Error-Code: GatedRepo``.  Like the real Hub, the
    metadata API (model info, paths-info, tree) of a gated repo stays public: only file content is gated.

* the *cdn* origin: ``GET|HEAD /cdn-lfs/{sha256}/{filename}?X-Amz-Signature=...`` serving the bytes with
  ``Accept-Ranges: bytes``, ``Range: bytes=N-`` / ``N-M`` / ``-K`` (``206`` + ``Content-Range``) and
  ``416`` (``Content-Range: bytes */size``, empty body) when ``N >= size`` -- what ``curl -C -`` gets for
  an already complete file, which it treats as success even with ``-f``.  Files given as a
  :class:`pathlib.Path` are streamed from disk in 1 MiB chunks and never held in memory.  The URL is
  signed with a per-server secret, so the CDN cannot be used to bypass gating.

Every file is modelled as a Git LFS file (as GGUF files are on the Hub).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import pathlib
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["FakeHub", "HubFile", "RequestLog"]

CHUNK = 1024 * 1024
CDN_PREFIX = "/cdn-lfs/"
_API_KEYWORDS = ("revision", "paths-info", "tree")


class RequestLog(NamedTuple):
    """One request seen by either origin: ``(method, path, range header or None)``."""

    method: str
    path: str
    range: str | None


@dataclass(frozen=True)
class HubFile:
    filename: str
    source: bytes | pathlib.Path
    size: int
    sha256: str
    pointer_size: int
    blob_id: str  # git oid of the LFS pointer file, as the Hub reports it

    def open(self):
        if isinstance(self.source, bytes):
            return io.BytesIO(self.source)
        return open(self.source, "rb")


@dataclass
class _Commit:
    sha: str
    parent: str | None
    title: str
    date: str
    files: dict[str, HubFile]


@dataclass
class _Repo:
    repo_id: str
    gated: bool = False
    token: str | None = None
    refs: dict[str, str] = field(default_factory=dict)  # branch name -> commit sha
    commits: dict[str, _Commit] = field(default_factory=dict)


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _hash_source(data: bytes | pathlib.Path) -> tuple[int, str]:
    if isinstance(data, bytes):
        return len(data), hashlib.sha256(data).hexdigest()
    h = hashlib.sha256()
    size = 0
    with open(data, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """Return (start, end_inclusive), "unsatisfiable", or None (ignore the header, send 200)."""
    if not header:
        return None
    header = header.strip()
    if not header.startswith("bytes=") or "," in header:
        return None  # unsupported unit / multi-range: serving the whole entity is allowed
    spec = header[len("bytes="):].strip()
    first, sep, last = spec.partition("-")
    if not sep:
        return None
    try:
        if first == "":  # suffix range: last K bytes
            k = int(last)
            if k <= 0:
                return "unsatisfiable"
            return (max(size - k, 0), size - 1) if size else "unsatisfiable"
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start < 0 or (last and end < start):
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


def _host_only(host_header: str | None) -> str | None:
    """Host part of a Host header ("1.2.3.4:80" -> "1.2.3.4", "[::1]:80" -> "[::1]")."""
    if not host_header:
        return None
    host_header = host_header.strip()
    if host_header.startswith("["):
        end = host_header.find("]")
        return host_header[: end + 1] if end != -1 else None
    return host_header.rsplit(":", 1)[0] if ":" in host_header else host_header


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, handler, hub: "FakeHub", role: str):
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        self.hub = hub
        self.role = role
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        super().__init__(addr, handler)

    def handle_error(self, request, client_address):  # quiet: clients dropping connections is normal
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"
    sys_version = ""
    timeout = 60  # idle keep-alive connections go away eventually
    server: _Server

    # ---- plumbing ---------------------------------------------------------------------------
    def setup(self):
        super().setup()
        with self.server.conn_lock:
            self.server.connections.add(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            with self.server.conn_lock:
                self.server.connections.discard(self.connection)

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    @property
    def hub(self) -> "FakeHub":
        return self.server.hub

    def _dispatch(self, method: str):
        self.hub._log(method, self.path, self.headers.get("Range"))
        body = b""
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            body = self.rfile.read(length)
        try:
            if self.server.role == "cdn":
                self._cdn(method)
            else:
                self._hub(method, body)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
            self.close_connection = True

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, method: str = "GET"):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None, method: str = "GET"):
        h = {"Content-Type": "application/json; charset=utf-8"}
        h.update(headers or {})
        self._send(status, json.dumps(obj).encode(), h, method)

    def _error(self, status: int, code: str | None, message: str, method: str, extra: dict | None = None):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        headers.update(extra or {})
        self._json(status, {"error": message}, headers, method)

    def _bearer(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        if auth.lower().startswith("bearer "):
            return auth[7:].strip() or None
        return None

    # ---- hub origin -------------------------------------------------------------------------
    def _hub(self, method: str, body: bytes):
        split = urlsplit(self.path)
        raw_path = split.path
        query = parse_qs(split.query)
        if raw_path.startswith("/api/models/"):
            return self._api(method, raw_path[len("/api/models/"):], query, body)
        if "/resolve/" in raw_path and method in ("GET", "HEAD"):
            return self._resolve(method, raw_path)
        self._error(404, None, "Not Found", method)

    def _resolve(self, method: str, raw_path: str):
        repo_part, _, rest = raw_path.lstrip("/").partition("/resolve/")
        repo_id = unquote(repo_part)
        raw_rev, _, raw_file = rest.partition("/")
        revision, filename = unquote(raw_rev), unquote(raw_file)
        repo = self.hub._repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found", method)
        if repo.gated:
            token = self._bearer()
            if token is None:
                return self._error(
                    401, "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must have access to it and be authenticated"
                    " to access it. Please log in.", method)
            if repo.token is not None and not hmac.compare_digest(token, repo.token):
                return self._error(
                    403, "GatedRepo",
                    f"Access to model {repo_id} is restricted and you are not in the authorized list.", method)
        commit = self.hub._resolve_revision(repo, revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id: " + revision, method)
        f = commit.files.get(filename)
        if f is None:
            return self._error(404, "EntryNotFound", "Entry not found", method, {"X-Repo-Commit": commit.sha})
        host = _host_only(self.headers.get("Host")) or self._local_host()
        cdn_path = f"{CDN_PREFIX}{f.sha256}/{quote(f.filename)}"
        location = f"http://{host}:{self.hub.cdn_port}{cdn_path}?X-Amz-Signature={self.hub._sign(cdn_path)}"
        msg = f"Found. Redirecting to {location}".encode()
        self._send(302, msg, {
            "Location": location,
            "X-Repo-Commit": commit.sha,
            "X-Linked-Etag": f'"{f.sha256}"',
            "X-Linked-Size": f.size,
            "ETag": f'"{f.blob_id}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "text/plain; charset=utf-8",
            "Vary": "Origin, Accept",
            "Access-Control-Expose-Headers": "X-Repo-Commit,X-Request-Id,X-Error-Code,X-Error-Message,"
                                             "X-Total-Count,ETag,Link,Accept-Ranges,Content-Range,"
                                             "X-Linked-Size,X-Linked-ETag",
        }, method)

    def _local_host(self) -> str:
        host = self.connection.getsockname()[0]
        return f"[{host}]" if ":" in host else host

    def _api(self, method: str, raw_rest: str, query: dict, body: bytes):
        segs = raw_rest.strip("/").split("/")
        if len(segs) >= 2 and (len(segs) == 2 or segs[2] in _API_KEYWORDS) and segs[1] not in _API_KEYWORDS:
            repo_id, tail = "/".join(segs[:2]), segs[2:]
        else:
            repo_id, tail = segs[0], segs[1:]
        repo_id = unquote(repo_id)
        repo = self.hub._repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found", method)
        kind = tail[0] if tail else None
        if kind is None and method in ("GET", "HEAD"):
            return self._model_info(method, repo, "main", query)
        if kind == "revision" and len(tail) >= 2 and method in ("GET", "HEAD"):
            return self._model_info(method, repo, unquote("/".join(tail[1:])), query)
        if kind == "paths-info" and len(tail) >= 2 and method == "POST":
            return self._paths_info(repo, unquote("/".join(tail[1:])), body)
        if kind == "tree" and len(tail) >= 2 and method in ("GET", "HEAD"):
            rev = unquote(tail[1])
            sub = unquote("/".join(tail[2:])).strip("/")
            return self._tree(method, repo, rev, sub, query)
        self._error(404, None, "Not Found", method)

    def _commit_or_404(self, repo: _Repo, revision: str, method: str) -> _Commit | None:
        commit = self.hub._resolve_revision(repo, revision)
        if commit is None:
            self._error(404, "RevisionNotFound", "Invalid rev id: " + revision, method)
        return commit

    def _model_info(self, method: str, repo: _Repo, revision: str, query: dict):
        commit = self._commit_or_404(repo, revision, method)
        if commit is None:
            return
        blobs = (query.get("blobs") or ["false"])[0].lower() in ("1", "true")
        siblings = []
        for f in sorted(commit.files.values(), key=lambda f: f.filename):
            s: dict = {"rfilename": f.filename}
            if blobs:
                s.update(size=f.size, blobId=f.blob_id,
                         lfs={"sha256": f.sha256, "size": f.size, "pointerSize": f.pointer_size})
            siblings.append(s)
        self._json(200, {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": self.hub._created,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": ["gguf"],
            "library_name": "gguf",
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(f.size for f in commit.files.values()),
        }, method=method)

    def _entry(self, commit: _Commit, f: HubFile, expand: bool) -> dict:
        d = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.filename,
             "lfs": {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}}
        if expand:
            last = self.hub._last_commit_touching(commit, f.filename)
            d["lastCommit"] = {"id": last.sha, "title": last.title, "date": last.date}
            d["securityFileStatus"] = {"status": "safe", "avScan": {"virusFound": False, "virusNames": None},
                                       "pickleImportScan": None}
        return d

    def _dir_entry(self, commit: _Commit, path: str, expand: bool) -> dict:
        d = {"type": "directory", "oid": hashlib.sha1(f"{commit.sha}:{path}".encode()).hexdigest(),
             "size": 0, "path": path}
        if expand:
            d["lastCommit"] = {"id": commit.sha, "title": commit.title, "date": commit.date}
        return d

    def _paths_info(self, repo: _Repo, revision: str, body: bytes):
        commit = self._commit_or_404(repo, revision, "POST")
        if commit is None:
            return
        ctype = (self.headers.get("Content-Type") or "").lower()
        paths: list[str] = []
        expand = False
        if "json" in ctype:
            try:
                data = json.loads(body or b"{}")
            except ValueError:
                return self._error(400, "BadRequest", "Invalid JSON body", "POST")
            p = data.get("paths") or []
            paths = [p] if isinstance(p, str) else list(p)
            expand = data.get("expand") in (True, "true", "True", "1", 1)
        else:
            form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
            paths = form.get("paths", []) + form.get("paths[]", [])
            expand = (form.get("expand") or ["false"])[0].lower() in ("1", "true")
        out = []
        for p in paths:
            p = p.strip("/")
            if p in commit.files:
                out.append(self._entry(commit, commit.files[p], expand))
            elif p and any(name.startswith(p + "/") for name in commit.files):
                out.append(self._dir_entry(commit, p, expand))
        self._json(200, out, method="POST")

    def _tree(self, method: str, repo: _Repo, revision: str, sub: str, query: dict):
        commit = self._commit_or_404(repo, revision, method)
        if commit is None:
            return
        recursive = (query.get("recursive") or ["false"])[0].lower() in ("1", "true")
        expand = (query.get("expand") or ["false"])[0].lower() in ("1", "true")
        prefix = sub + "/" if sub else ""
        if sub and not any(n.startswith(prefix) for n in commit.files):
            return self._error(404, "EntryNotFound", f"{sub} does not exist on \"{revision}\"", method,
                               {"X-Repo-Commit": commit.sha})
        out, dirs = [], set()
        for name in sorted(commit.files):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix):].split("/")
            for i in range(1, len(parts)):
                d = prefix + "/".join(parts[:i])
                if (recursive or i == 1) and d not in dirs:
                    dirs.add(d)
                    out.append(self._dir_entry(commit, d, expand))
            if recursive or len(parts) == 1:
                out.append(self._entry(commit, commit.files[name], expand))
        self._json(200, out, method=method)

    # ---- cdn origin -------------------------------------------------------------------------
    def _cdn(self, method: str):
        if method not in ("GET", "HEAD"):
            return self._send(405, b"Method Not Allowed", {"Allow": "GET, HEAD"}, method)
        split = urlsplit(self.path)
        if not split.path.startswith(CDN_PREFIX):
            return self._send(404, b"Not Found", method=method)
        sig = (parse_qs(split.query).get("X-Amz-Signature") or [""])[0]
        if not hmac.compare_digest(sig, self.hub._sign(split.path)):
            return self._send(403, b"<Error><Code>AccessDenied</Code></Error>",
                              {"Content-Type": "application/xml"}, method)
        sha, _, raw_name = split.path[len(CDN_PREFIX):].partition("/")
        f = self.hub._blobs.get((sha, unquote(raw_name)))
        if f is None:
            return self._send(404, b"Not Found", method=method)
        size = f.size
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{f.sha256}"',
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(os.path.basename(f.filename))};"
                                   f' filename="{quote(os.path.basename(f.filename))}";',
            "Cache-Control": "public, max-age=604800, immutable",
        }
        rng = _parse_range(self.headers.get("Range"), size)
        if rng == "unsatisfiable":
            if self.hub.content_range_on_416:
                headers["Content-Range"] = f"bytes */{size}"
            return self._send(416, b"", headers, method)
        if rng is None:
            status, start, end = 200, 0, size - 1
        else:
            status, (start, end) = 206, rng
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if method == "HEAD" or length == 0:
            return
        limit = self.hub._take_drop(f.filename)  # None = no fault injected
        to_send = length if limit is None else min(length, limit)
        with f.open() as src:
            src.seek(start)
            remaining = to_send
            while remaining > 0:
                chunk = src.read(min(CHUNK, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)  # unbuffered socket writer: returns once sendall() is done
                self.hub._count(f.filename, len(chunk))
                remaining -= len(chunk)
        if limit is not None and to_send < length:
            # Fault injection: the body is cut short, then the connection is closed.
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class FakeHub:
    """Threaded HTTP server pair: 'hub' origin + 'cdn' origin (a second port = another origin).

    Usage::

        with FakeHub() as hub:
            sha = hub.add_file("org/model-GGUF", "model.gguf", pathlib.Path("tiny.gguf"))
            url = hf_hub_url("org/model-GGUF", "model.gguf", endpoint=hub.endpoint())

    ``bytes_served[filename]`` counts file-content bytes the CDN wrote to sockets; ``requests`` logs
    ``RequestLog(method, path, range)`` for both origins (CDN paths start with ``/cdn-lfs/``).
    """

    def __init__(self, bind: str = "127.0.0.1"):
        self.bind = bind
        # RFC 9110 says a 416 carries "Content-Range: bytes */size" (nginx, S3-style CDNs do).  curl < 8.5
        # (Debian bookworm: 7.88.1) then FAILS `curl -f -C -` on an already complete file (exit 22, curl
        # issue #10521); without the header it exits 0.  Set False to emulate a server that omits it.
        self.content_range_on_416 = True
        self.bytes_served: dict[str, int] = {}
        self.requests: list[RequestLog] = []
        self._repos: dict[str, _Repo] = {}
        self._blobs: dict[tuple[str, str], HubFile] = {}
        self._drops: dict[str, list[int]] = {}  # filename -> [nbytes, times_left]
        self._lock = threading.RLock()
        self._secret = secrets.token_bytes(16)
        self._created = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        self._counter = 0
        self._hub: _Server | None = None
        self._cdn: _Server | None = None
        self._threads: list[threading.Thread] = []

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> "FakeHub":
        if self._hub is not None:
            return self
        self._hub = _Server((self.bind, 0), _Handler, self, "hub")
        self._cdn = _Server((self.bind, 0), _Handler, self, "cdn")
        for srv in (self._hub, self._cdn):
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1},
                                 name=f"fakehub-{srv.role}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self):
        for srv in (self._hub, self._cdn):
            if srv is None:
                continue
            srv.shutdown()
            with srv.conn_lock:
                conns = list(srv.connections)
            for c in conns:  # end idle keep-alive connections so handler threads exit
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        self._hub = self._cdn = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def hub_port(self) -> int:
        assert self._hub is not None, "FakeHub not started"
        return self._hub.server_address[1]

    @property
    def cdn_port(self) -> int:
        assert self._cdn is not None, "FakeHub not started"
        return self._cdn.server_address[1]

    def endpoint(self, host: str = "127.0.0.1") -> str:
        """Base URL for HF_ENDPOINT / ``endpoint=``: ``http://{host}:{hub_port}``."""
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.hub_port}"

    def url(self, repo: str, filename: str, revision: str = "main", host: str = "127.0.0.1") -> str:
        """The resolve URL, quoted exactly as huggingface_hub's hf_hub_url quotes it."""
        return f"{self.endpoint(host)}/{repo}/resolve/{quote(revision, safe='')}/{quote(filename)}"

    # ---- content ----------------------------------------------------------------------------
    def add_file(self, repo: str, filename: str, data: bytes | pathlib.Path, *, revision: str = "main",
                 gated: bool = False, token: str | None = None) -> str:
        """Commit ``filename`` to branch ``revision`` of model repo ``repo``; return the new commit sha.

        Each call makes a new commit on the branch (the previous commits stay resolvable by sha).
        A new branch forks from ``main`` if it exists.  ``data`` as a Path is hashed once here and
        streamed from disk when served (it must not change afterwards).  ``gated=True`` gates the
        repo (it is never un-gated by a later call); with ``token=None`` any bearer token is accepted.
        """
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        if isinstance(data, (str, os.PathLike)) and not isinstance(data, bytes):
            data = pathlib.Path(data)
        filename = filename.strip("/")
        if not filename or not revision:
            raise ValueError("filename and revision must be non-empty")
        if len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
            raise ValueError("revision must be a branch name, not a commit sha")
        size, sha256 = _hash_source(data)
        pointer = _lfs_pointer(sha256, size)
        hf = HubFile(filename=filename, source=data, size=size, sha256=sha256,
                     pointer_size=len(pointer), blob_id=_git_blob_oid(pointer))
        with self._lock:
            r = self._repos.get(repo)
            if r is None:
                r = self._repos[repo] = _Repo(repo_id=repo)
            if gated:
                r.gated, r.token = True, token
            parent = r.refs.get(revision) or r.refs.get("main")
            files = dict(r.commits[parent].files) if parent else {}
            files[filename] = hf
            self._counter += 1
            sha = hashlib.sha1(
                f"{repo}\0{revision}\0{parent}\0{filename}\0{sha256}\0{self._counter}".encode()).hexdigest()
            r.commits[sha] = _Commit(sha=sha, parent=parent, title=f"Upload {filename}",
                                     date=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()), files=files)
            r.refs[revision] = sha
            self._blobs[(sha256, filename)] = hf
        return sha

    def drop_after(self, filename: str, nbytes: int, times: int = 1):
        """Fault: the next ``times`` CDN GETs of ``filename`` (that send a body) write at most ``nbytes``
        of content, then close the connection (Content-Length announced the full length)."""
        with self._lock:
            self._drops[filename.strip("/")] = [nbytes, times]

    # ---- internals --------------------------------------------------------------------------
    def _log(self, method: str, path: str, rng: str | None):
        with self._lock:
            self.requests.append(RequestLog(method, path, rng))

    def _count(self, filename: str, n: int):
        with self._lock:
            self.bytes_served[filename] = self.bytes_served.get(filename, 0) + n

    def _take_drop(self, filename: str) -> int | None:
        with self._lock:
            d = self._drops.get(filename)
            if not d or d[1] <= 0:
                return None
            d[1] -= 1
            if d[1] <= 0:
                del self._drops[filename]
            return d[0]

    def _sign(self, path: str) -> str:
        return hmac.new(self._secret, path.encode(), hashlib.sha256).hexdigest()

    def _resolve_revision(self, repo: _Repo, revision: str) -> _Commit | None:
        with self._lock:
            sha = repo.refs.get(revision)
            if sha is None and revision in repo.commits:
                sha = revision
            return repo.commits.get(sha) if sha else None

    def _last_commit_touching(self, commit: _Commit, filename: str) -> _Commit:
        with self._lock:
            repo_commits = next((r.commits for r in self._repos.values() if commit.sha in r.commits), {})
            cur, blob = commit, commit.files.get(filename)
            while cur.parent is not None:
                parent = repo_commits.get(cur.parent)
                if parent is None or parent.files.get(filename) is not blob:
                    break
                cur = parent
            return cur
