"""Step 2, on the controller: which bytes each host must hold, and where they come from.

The controller asks the Hub (or ``HF_ENDPOINT``) which commit the revision is, and the
file's sha256 and size (``resolve``: once per run, however many hosts, and only once ever
for a revision that is a commit, as the default is). ``model_source``
then says where the bytes come from (``choose_source``, a pure decision table):

* ``hub``: each host downloads by that commit from the Hub, resuming any partial file.
* ``mirror``: each host downloads from ``model_mirror_url`` (any HTTP server holding the
  file; the Hub token is never sent to it). sha256 and size still come from the Hub, so
  the mirror is checked against upstream. When the Hub cannot be reached (an air-gapped
  lab), a pinned ``model_sha256`` is the reference and the size is read from the mirror
  (HEAD); with no pin there is nothing to check the mirror against, and the run refuses.
* ``controller``: the controller downloads the file once into huggingface_hub's cache
  (resumable and verified, see backchat/hub.py) and pushes it to the hosts. With the Hub
  unreachable, a blob the controller verified earlier for the pinned ``model_sha256`` is
  pushed as is.

huggingface_hub runs in a child process (``python -m backchat.hub``): pyinfra's gevent
patching of ``select`` breaks its import inside the pyinfra process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import quote

from backchat import hub
from backchat.secrets import Secret

DEFAULT_ENDPOINT = "https://huggingface.co"


class ModelSourceError(Exception):
    """The model could not be resolved: says what was asked, of whom, and why it failed."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


@dataclass(frozen=True)
class ResolvedModel:
    repo: str
    filename: str
    revision: str
    commit: str
    sha256: str
    size: int
    endpoint: str

    @property
    def url(self) -> str:
        # By commit, not by branch: every host gets the same bytes even if main moves.
        return f"{self.endpoint}/{self.repo}/resolve/{self.commit}/{quote(self.filename)}"


@dataclass(frozen=True)
class Source:
    """What a host must end up holding, and where the bytes come from."""

    sha256: str
    size: int
    url: str | None  # hosts fetch it with curl; None: the controller pushes it
    where: str  # for messages
    model: ResolvedModel | None = None  # None when the Hub was unreachable (pinned sha256)
    controller_path: str | None = None  # a verified controller blob known without the Hub
    note: str = ""  # said to the user: why this source, when it is a fallback


def endpoint_for(hf_endpoint: str | None) -> str:
    return (hf_endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def start_hub(args: list[str], token: Secret | None) -> Callable[[], dict]:
    """Start ``python -m backchat.hub ARGS`` now (the token via the environment); the
    function returned waits for its JSON answer."""
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token.reveal()
    child = subprocess.Popen(
        [sys.executable, "-m", "backchat.hub", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )

    def answer() -> dict:
        stdout, stderr = child.communicate()
        try:
            return json.loads(stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"error": f"backchat.hub {args[0]} crashed: {stderr.strip()[-500:]}"}

    return answer


def run_hub(args: list[str], token: Secret | None) -> dict:
    """Run ``python -m backchat.hub ARGS`` and return its JSON answer."""
    return start_hub(args, token)()


# pyinfra runs each host in its own greenlet (gevent patches threading): the lock makes
# the other hosts wait for the first lookup instead of starting one child process each.
_lookup_lock = threading.Lock()
_lookups: dict[tuple, ResolvedModel | ModelSourceError] = {}
_started: dict[tuple, Callable[[], dict]] = {}


def _remembered(key: tuple) -> bool:
    """Fill ``_lookups`` from the Hub's earlier answer for this commit, if there is one."""
    endpoint, repo, filename, revision, _token = key
    answer = hub.remembered_answer(endpoint, repo, filename, revision)
    if answer:
        _lookups[key] = ResolvedModel(endpoint=endpoint, revision=revision, **answer)
    return bool(answer)


def start_resolve(endpoint: str, repo: str, filename: str, revision: str, token: Secret | None) -> None:
    """Start the lookup ``resolve`` will need, so that it runs while the hosts are read
    (a child process of its own: about a second of a re-run that otherwise waits for it)."""
    key = (endpoint, repo, filename, revision, token)
    with _lookup_lock:
        if key not in _lookups and key not in _started and not _remembered(key):
            _started[key] = start_hub([endpoint, repo, filename, revision], token)


def resolve(endpoint: str, repo: str, filename: str, revision: str, token: Secret | None) -> ResolvedModel:
    """Ask the Hub for the commit, sha256 and size of one file: once per run, not per host,
    and never again for a commit it has answered for (``hub.remembered_answer``)."""
    key = (endpoint, repo, filename, revision, token)
    with _lookup_lock:
        if key not in _lookups and not _remembered(key):
            started = _started.pop(key, None)
            answer = started() if started else run_hub([endpoint, repo, filename, revision], token)
            if "error" in answer:
                _lookups[key] = ModelSourceError(answer["error"], unreachable=bool(answer.get("unreachable")))
            else:
                _lookups[key] = ResolvedModel(endpoint=endpoint, revision=revision, **answer)
                hub.remember_answer(endpoint, revision, answer)
    found = _lookups[key]
    if isinstance(found, ModelSourceError):
        raise found
    return found


_sizes: dict[str, int] = {}


def mirror_size(url: str) -> int:
    """Content-Length of the mirror's file, asked from the controller (HEAD, redirects followed)."""
    if url not in _sizes:
        from backchat.http import httpx  # imported late: see backchat/http.py

        try:
            answer = httpx.head(url, follow_redirects=True, timeout=20.0)
            answer.raise_for_status()
        except httpx.HTTPError as error:
            raise ModelSourceError(f"could not read the size of {url} from the controller: {error}") from None
        length = answer.headers.get("Content-Length") or ""
        if not length.isdigit() or int(length) <= 0:
            raise ModelSourceError(f"{url} reported no Content-Length")
        _sizes[url] = int(length)
    return _sizes[url]


def choose_source(
    cfg,
    lookup: Callable[[], ResolvedModel],
    size_of_mirror: Callable[[str], int] = mirror_size,
    known_blob: Callable[[str], dict | None] = hub.known_good_blob,
) -> Source:
    """Where this host's bytes come from and what they must hash to (see the module doc).

    Pure but for the three look-ups it is given, so the whole table is unit-tested.
    """
    try:
        model = lookup()
    except ModelSourceError as error:
        if cfg.model_source == "hub" or not error.unreachable:
            raise
        return _source_without_hub(cfg, error, size_of_mirror, known_blob)
    if cfg.model_source == "mirror":
        return Source(model.sha256, model.size, cfg.model_mirror_url, cfg.model_mirror_url, model)
    if cfg.model_source == "controller":
        return Source(model.sha256, model.size, None, "the controller", model)
    return Source(model.sha256, model.size, model.url, model.endpoint, model)


def _source_without_hub(cfg, error: ModelSourceError, size_of_mirror, known_blob) -> Source:
    if not cfg.model_sha256:
        raise ModelSourceError(
            f"{error} -- and model_sha256 is not set, so there is nothing to check the "
            f"{cfg.model_source}'s copy against. Fix: make the Hub reachable once, or pin "
            "model_sha256 to the file's sha256",
            unreachable=True,
        )
    if cfg.model_source == "mirror":
        try:
            size = size_of_mirror(cfg.model_mirror_url)
        except ModelSourceError as mirror_error:
            raise ModelSourceError(f"{error} -- and {mirror_error}", unreachable=True) from None
        return Source(cfg.model_sha256, size, cfg.model_mirror_url, cfg.model_mirror_url,
                      note="Hub unreachable; checking the mirror's file against model_sha256")
    blob = known_blob(cfg.model_sha256)
    if blob is None:
        raise ModelSourceError(
            f"{error} -- and the controller holds no verified copy with model_sha256 "
            f"{cfg.model_sha256}. Fix: run once with the Hub reachable",
            unreachable=True,
        )
    return Source(cfg.model_sha256, blob["size"], None, "the controller", controller_path=blob["path"],
                  note="Hub unreachable; pushing the controller's verified copy (model_sha256)")


def pinned_mismatch(cfg, sha256: str) -> str | None:
    """Why the source's file is not the pinned one, or None."""
    if cfg.model_sha256 and cfg.model_sha256 != sha256:
        return (
            f"model_sha256 is pinned to {cfg.model_sha256} but the source reports {sha256} "
            f"for {cfg.model_repo}/{cfg.model_file}. Fix: check the source; update the pin "
            "only if the new file is trusted"
        )
    return None


def is_verified(state: dict, sha256: str, size: int) -> bool:
    """The host's file is the one verified earlier, unchanged since (same size and mtime)."""
    marker = state.get("marker") or {}
    return (
        state.get("size") == size
        and marker.get("sha256") == sha256
        and marker.get("size") == size
        and marker.get("mtime") == state.get("mtime")
    )


_copy_lock = threading.Lock()
_copies: dict[tuple, dict] = {}


def controller_copy(source: Source, token: Secret | None, log: Callable[[str], None]) -> dict:
    """The controller's verified copy of the file: {path, size, ...} or {error}; fetched once per run."""
    if source.controller_path:
        return {"path": source.controller_path, "size": source.size, "hashed": False, "downloaded": 0}
    model = source.model
    key = (model.endpoint, model.repo, model.filename, model.commit, model.sha256)
    with _copy_lock:
        if key not in _copies:
            started = time.monotonic()
            answer = run_hub(
                ["download", model.endpoint, model.repo, model.filename, model.commit, model.sha256, str(model.size)],
                token,
            )
            answer["seconds"] = round(time.monotonic() - started, 1)
            if "error" not in answer:
                log(
                    f"Controller copy of {model.filename}: {answer['path']} "
                    f"({answer['downloaded']:,} bytes downloaded, "
                    f"{'hashed' if answer['hashed'] else 'verified earlier, not re-read'}, {answer['seconds']}s)"
                )
            _copies[key] = answer
        return _copies[key]
