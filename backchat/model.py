"""Step 2: the GGUF model, resolved once on the controller and delivered to each host.

The controller asks the Hub (or ``HF_ENDPOINT``) which commit the revision is, and the
file's sha256 and size (``resolve``, once per run). ``model_source`` then says where the
bytes come from:

* ``hub``: each host downloads by that commit from the Hub, resuming any partial file.
* ``mirror``: each host downloads from ``model_mirror_url`` (any HTTP server holding the
  file; the Hub token is never sent to it). sha256 and size still come from the Hub, so
  the mirror is checked against upstream. When the Hub cannot be reached (an air-gapped
  lab), a pinned ``model_sha256`` is the reference and the size is read from the mirror
  (HEAD); with no pin there is nothing to check the mirror against, and the run refuses.
* ``controller``: the controller downloads the file once into huggingface_hub's cache
  (resumable and verified, see backchat/hub.py) and pushes it to the hosts over their SSH
  connection, in parallel, sending each host only the bytes its ``.part`` file lacks.
  With the Hub unreachable, a blob the controller verified earlier for the pinned
  ``model_sha256`` is pushed as is.

Why not ``files.put`` for the push: it sha1-hashes the 4 GB on both sides on every run and
starts over when interrupted. Why not ``files.rsync``: it needs rsync on the controller and
on every host (neither is in a minimal Debian, nor in the test roots) and an OpenSSH login
of its own, and its delta algorithm reads the whole file on both sides when the sizes
differ. Appending the missing tail over the connection pyinfra already has (``cat >>``
on an exec channel, which also works under ``_sudo``) resumes exactly, reads only what it
sends, and lets the host's sha256 check catch a bad prefix (then it starts over once).

On every host, templates/fetch-model.sh verifies the sha256 and leaves a small marker
(sha256, size, mtime). A later run compares the marker with ``stat`` and never reads the
4 GB again unless they disagree, or ``model_verify = "full"`` asks for a fresh hash.
"""

from __future__ import annotations

import functools
import inspect
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from pyinfra import host, logger
from pyinfra.api import FunctionCommand, QuoteString, StringCommand, operation
from pyinfra.connectors.util import make_unix_command, make_unix_command_for_host
from pyinfra.operations import files

from backchat import hub as hub_cache
from backchat import preflight, report
from backchat.facts import ModelFile
from backchat.settings import Settings

PROJECT_DIR = Path(__file__).resolve().parent.parent
FETCH_SCRIPT = PROJECT_DIR / "templates" / "fetch-model.sh"
DEFAULT_ENDPOINT = "https://huggingface.co"
NEED_BYTES = 100  # fetch-model.sh with URL "-": the .part needs bytes from the controller
PUSH_CHUNK = 1024 * 1024


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


def endpoint_for(cfg: Settings) -> str:
    return (cfg.hf_endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hf_token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def _child(args: list[str], token: str | None) -> dict:
    """Run ``python -m backchat.hub ARGS`` and return its JSON answer.

    huggingface_hub runs in a child process: pyinfra's gevent patching of ``select``
    breaks its import inside the pyinfra process. The token travels in the environment.
    """
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    child = subprocess.run(
        [sys.executable, "-m", "backchat.hub", *args],
        capture_output=True, text=True, env=env, cwd=str(PROJECT_DIR),
    )
    try:
        return json.loads(child.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"backchat.hub {args[0]} crashed: {child.stderr.strip()[-500:]}"}


@functools.lru_cache(maxsize=None)
def resolve(endpoint: str, repo: str, filename: str, revision: str, token: str | None) -> ResolvedModel:
    """Ask the Hub for the commit, sha256 and size of one file (once per run, not per host)."""
    answer = _child([endpoint, repo, filename, revision], token)
    if "error" in answer:
        raise ModelSourceError(answer["error"], unreachable=bool(answer.get("unreachable")))
    return ResolvedModel(endpoint=endpoint, revision=revision, **answer)


@functools.lru_cache(maxsize=None)
def mirror_size(url: str) -> int:
    """Content-Length of the mirror's file, asked from the controller (HEAD, redirects followed)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=20) as answer:
            length = answer.headers.get("Content-Length")
    except (OSError, urllib.error.URLError) as error:
        raise ModelSourceError(f"could not read the size of {url} from the controller: {error}") from None
    if not (length or "").isdigit() or int(length) <= 0:
        raise ModelSourceError(f"{url} reported no Content-Length")
    return int(length)


def source_for(cfg: Settings) -> Source:
    """Where this host's bytes come from, and what they must hash to (see the module doc)."""
    try:
        model = resolve(endpoint_for(cfg), cfg.model_repo, cfg.model_file, cfg.model_revision, hf_token())
    except ModelSourceError as error:
        if cfg.model_source == "hub" or not error.unreachable:
            raise
        return _source_without_hub(cfg, error)
    if cfg.model_source == "mirror":
        return Source(model.sha256, model.size, cfg.model_mirror_url, cfg.model_mirror_url, model)
    if cfg.model_source == "controller":
        return Source(model.sha256, model.size, None, "the controller", model)
    return Source(model.sha256, model.size, model.url, model.endpoint, model)


def _source_without_hub(cfg: Settings, error: ModelSourceError) -> Source:
    if not cfg.model_sha256:
        raise ModelSourceError(
            f"{error} -- and model_sha256 is not set, so there is nothing to check the "
            f"{cfg.model_source}'s copy against. Fix: make the Hub reachable once, or pin "
            "model_sha256 to the file's sha256",
            unreachable=True,
        )
    if cfg.model_source == "mirror":
        try:
            size = mirror_size(cfg.model_mirror_url)
        except ModelSourceError as mirror_error:
            raise ModelSourceError(f"{error} -- and {mirror_error}", unreachable=True) from None
        host.log_styled("Hub unreachable; checking the mirror's file against model_sha256", fg="yellow")
        return Source(cfg.model_sha256, size, cfg.model_mirror_url, cfg.model_mirror_url)
    blob = hub_cache.known_good_blob(cfg.model_sha256)
    if blob is None:
        raise ModelSourceError(
            f"{error} -- and the controller holds no verified copy with model_sha256 "
            f"{cfg.model_sha256}. Fix: run once with the Hub reachable",
            unreachable=True,
        )
    host.log_styled("Hub unreachable; pushing the controller's verified copy (model_sha256)", fg="yellow")
    return Source(cfg.model_sha256, blob["size"], None, "the controller", controller_path=blob["path"])


def marker_path(cfg: Settings) -> str:
    return f"{cfg.models_dir}/.{cfg.model_file}.verified"


def is_verified(state: dict, sha256: str, size: int) -> bool:
    """The file is the one verified earlier, unchanged since (same size and mtime)."""
    marker = state.get("marker") or {}
    return (
        state.get("size") == size
        and marker.get("sha256") == sha256
        and marker.get("size") == size
        and marker.get("mtime") == state.get("mtime")
    )


def _pinned_mismatch(cfg: Settings, sha256: str) -> str | None:
    if cfg.model_sha256 and cfg.model_sha256 != sha256:
        return (
            f"model_sha256 is pinned to {cfg.model_sha256} but the source reports {sha256} "
            f"for {cfg.model_repo}/{cfg.model_file}. Fix: check the source; update the pin "
            "only if the new file is trusted"
        )
    return None


def fetch(cfg: Settings) -> bool:
    """Queue what puts the verified model on this host; False if the host was refused."""
    state = host.get_fact(ModelFile, path=cfg.model_path, marker=marker_path(cfg))
    script = f"{cfg.stack_dir}/bin/fetch-model"
    try:
        source = source_for(cfg)
    except ModelSourceError as error:
        marker = state.get("marker") or {}
        # Upstream down, but this host already holds the file it was verified to have.
        if marker.get("sha256") and is_verified(state, marker["sha256"], marker.get("size")):
            if not _pinned_mismatch(cfg, marker["sha256"]):
                if cfg.model_verify == "full":
                    _install_fetcher(cfg, script)
                    recheck(
                        name=f"Re-check {cfg.model_file} (model source unreachable)",
                        script=script, sha256=marker["sha256"], size=marker["size"],
                        dest=cfg.model_path, marker=marker_path(cfg), why=str(error),
                    )
                else:
                    host.noop(f"model source unreachable; keeping the verified {cfg.model_file}")
                return True
        preflight.refuse_host(str(error))
        return False

    problem = _pinned_mismatch(cfg, source.sha256)
    if problem:
        preflight.refuse_host(problem)
        return False
    if cfg.model_verify == "marker" and is_verified(state, source.sha256, source.size):
        host.noop(f"{cfg.model_file} verified earlier and unchanged (not re-read)")
        return True

    # What the host must still store: the missing tail of the .part, less whatever a file
    # that fails its check frees when fetch-model.sh removes it.
    needed = max(source.size - state["part_size"] - (state["size"] or 0), 0)
    problem = preflight.disk_problem(cfg, needed)
    if problem:
        preflight.refuse_host(problem)
        return False

    _install_fetcher(cfg, script)
    if source.url is None:
        push(
            name=f"Push {cfg.model_file} from the controller and verify it",
            script=script, source=source,
            dest=cfg.model_path, marker=marker_path(cfg),
        )
        return True

    header_file = None
    token = hf_token()
    if token and cfg.model_source == "hub":  # a LAN mirror has no business seeing the token
        header_file = f"{cfg.stack_dir}/.hf-token-header"
        files.put(
            name="Store the Hugging Face token (0600)",
            src=io.StringIO(f"Authorization: Bearer {token}\n"),
            dest=header_file,
            mode="0600",
        )
    download(
        name=f"Download and verify {cfg.model_file}",
        script=script, url=source.url, sha256=source.sha256, size=source.size,
        dest=cfg.model_path, marker=marker_path(cfg), header_file=header_file,
    )
    return True


def _install_fetcher(cfg: Settings, script: str) -> None:
    files.directory(name="Create the models directory", path=cfg.models_dir, mode="0755")
    files.put(name="Install the model fetcher", src=str(FETCH_SCRIPT), dest=script, mode="0755")


# --- running fetch-model.sh ---------------------------------------------------------


def _script_command(script: str, url: str, sha256: str, size: int, dest: str, marker: str, header_file=None):
    args = [script, url, dest, sha256, str(size), marker]
    if header_file:
        args.append(header_file)
    return StringCommand(*(QuoteString(arg) for arg in args))


def _fail(host, reason: str) -> bool:
    """Fail this host with a reason the end-of-run report shows."""
    host.log_styled(reason, fg="red", log_func=logger.error)
    report.record(host.name, failure=reason)
    return False


def _last_error(output) -> str:
    lines = [line for line in output.stderr_lines if line.strip()]
    return lines[-1].strip() if lines else "no error output"


def _run_fetch_script(state, host, command: StringCommand, what: str) -> bool:
    # Long downloads print progress lines; show them as they come, not only with -vvv.
    status, output = host.run_shell_command(command, print_output=True)
    if not status:
        return _fail(host, f"{what}: {_last_error(output)}")
    return True


@operation(is_idempotent=False)
def download(script: str, url: str, sha256: str, size: int, dest: str, marker: str, header_file: str | None = None):
    """
    Download ``url`` to ``dest`` with resume, verify its sha256 and write ``marker``.

    + script: path of fetch-model.sh on the host
    + url: where the host fetches the file (the Hub by commit, or the mirror)
    + sha256: what the file must hash to
    + size: its size in bytes
    + dest: the model's path on the host
    + marker: where the verification record goes
    + header_file: 0600 file holding the Authorization header, for gated repos
    """
    command = _script_command(script, url, sha256, size, dest, marker, header_file)
    yield FunctionCommand(_run_fetch_script, (command, f"download of {dest} failed"), {})


@operation(is_idempotent=False)
def recheck(script: str, sha256: str, size: int, dest: str, marker: str, why: str):
    """
    Hash ``dest`` again (``model_verify = "full"``) while no source can replace it.

    + script: path of fetch-model.sh on the host
    + sha256: what the file must hash to
    + size: its size in bytes
    + dest: the model's path on the host
    + marker: the verification record, rewritten when the file passes
    + why: why the source is unreachable, for the failure message
    """
    yield FunctionCommand(_recheck, (_script_command(script, "-", sha256, size, dest, marker), dest, why), {})


def _recheck(state, host, command: StringCommand, dest: str, why: str) -> bool:
    status, output = host.run_shell_command(command, print_output=True, _success_exit_codes=[0, NEED_BYTES])
    if not status:
        return _fail(host, f"check of {dest} failed: {_last_error(output)}")
    if _needs_bytes(output):
        return _fail(host, f"{dest} failed its sha256 check and was removed; it cannot be replaced now: {why}")
    return True


# --- model_source = controller ------------------------------------------------------

# pyinfra runs each operation on all hosts at once, one greenlet per host (gevent patches
# threading, so this lock makes the other hosts wait, not block the process). The first
# host to need the file downloads it; the others reuse the answer.
_controller_lock = threading.Lock()
_controller_copies: dict[tuple, dict] = {}


def controller_copy(source: Source) -> dict:
    """The controller's verified copy of the file: {path, size, ...} or {error}."""
    if source.controller_path:
        return {"path": source.controller_path, "size": source.size, "hashed": False, "downloaded": 0}
    model = source.model
    cache_key = (model.endpoint, model.repo, model.filename, model.commit, model.sha256)
    with _controller_lock:
        if cache_key not in _controller_copies:
            started = time.monotonic()
            answer = _child(
                ["download", model.endpoint, model.repo, model.filename, model.commit, model.sha256, str(model.size)],
                token=hf_token(),
            )
            answer["seconds"] = round(time.monotonic() - started, 1)
            if "error" not in answer:
                logger.info(
                    f"--> Controller copy of {model.filename}: {answer['path']} "
                    f"({answer['downloaded']:,} bytes downloaded, "
                    f"{'hashed' if answer['hashed'] else 'verified earlier, not re-read'}, {answer['seconds']}s)"
                )
            _controller_copies[cache_key] = answer
        return _controller_copies[cache_key]


def _needs_bytes(output) -> bool:
    return any(line.startswith("need bytes from ") for line in output.stdout_lines)


@operation(is_idempotent=False)
def push(script: str, source: Source, dest: str, marker: str):
    """
    Put the controller's verified copy of the model on the host, sending only missing bytes.

    + script: path of fetch-model.sh on the host
    + source: the file's sha256 and size, and where the controller gets it
    + dest: the model's path on the host
    + marker: where the verification record goes
    """
    yield FunctionCommand(_push_and_install, (script, source, dest, marker), {})


def _push_and_install(state, host, script: str, source: Source, dest: str, marker: str) -> bool:
    check = _script_command(script, "-", source.sha256, source.size, dest, marker)

    def run_check():
        return host.run_shell_command(check, print_output=True, _success_exit_codes=[0, NEED_BYTES])

    # First the host checks what it has (an existing file, a complete .part): maybe no bytes are needed.
    status, output = run_check()
    if not status:
        return _fail(host, f"check of {dest} failed: {_last_error(output)}")
    if not _needs_bytes(output):
        return True

    copy = controller_copy(source)
    if "error" in copy:
        return _fail(host, copy["error"])

    for _attempt in (1, 2):  # a junk prefix gets one fresh start
        started = time.monotonic()
        try:
            offset, sent = _append_missing_tail(state, host, copy["path"], f"{dest}.part", source.size)
        except Exception as error:  # the .part keeps what arrived; the next run resumes
            return _fail(host, f"push of {dest} failed ({type(error).__name__}: {error}); the next run resumes")
        seconds = max(time.monotonic() - started, 1e-6)
        host.log_styled(
            f"pushed {sent:,} bytes (resumed at {offset:,}) in {seconds:.1f}s, "
            f"{sent / seconds / 1e6:.0f} MB/s"
        )
        status, output = run_check()
        if status and not _needs_bytes(output):
            return True
        if offset == 0:
            break
        # The host removed a .part whose sha256 was wrong: its old prefix was junk. Once more, whole.
        host.log_styled("the resumed file failed its check; pushing it whole", fg="yellow")
    return _fail(host, f"push of {dest} failed: {_last_error(output)}")


# The host reports how much of the .part it has, then appends what follows to it. One
# command, so the offset is the one the bytes are appended at.
_APPEND = (
    'part=$1; size=$2; have=$(stat -c %s "$part" 2>/dev/null || echo 0); '
    'if [ "$have" -gt "$size" ]; then : >"$part"; have=0; fi; '
    'echo "$have"; exec cat >>"$part"'
)


def _append_missing_tail(state, host, local_path: str, part: str, size: int) -> tuple[int, int]:
    """Append local_path[offset:] to the host's ``part``, offset being what it already holds."""
    remote = StringCommand("sh", "-c", QuoteString(_APPEND), "append", QuoteString(part), str(size))
    client = getattr(host.connector, "client", None)
    if client is None:  # @local: the controller is the host
        have = os.path.getsize(part) if os.path.exists(part) else 0
        with open(local_path, "rb") as src, open(part, "ab") as out:
            src.seek(have)
            return have, _copy(src.read, out.write, size - have)

    arguments = dict(host.current_op_global_arguments or {})
    allowed = inspect.signature(make_unix_command).parameters
    command = make_unix_command_for_host(
        state, host, remote, **{k: v for k, v in arguments.items() if k in allowed}
    ).get_raw_value()
    channel = client.get_transport().open_session()
    try:
        channel.exec_command(command)
        first = b""
        while not first.endswith(b"\n"):
            got = channel.recv(64)
            if not got:
                raise OSError(f"the host said nothing: {channel.recv_stderr(4096).decode(errors='replace')}")
            first += got
        offset = int(first.split(b"\n")[0].strip() or 0)
        with open(local_path, "rb") as src:
            src.seek(offset)
            sent = _copy(src.read, channel.sendall, size - offset)
        channel.shutdown_write()
        status = channel.recv_exit_status()
        if status != 0:
            raise OSError(f"cat exited {status}: {channel.recv_stderr(4096).decode(errors='replace')}")
        return offset, sent
    finally:
        channel.close()


def _copy(read, write, count: int) -> int:
    sent = 0
    while sent < count:
        chunk = read(min(PUSH_CHUNK, count - sent))
        if not chunk:
            break
        write(chunk)
        sent += len(chunk)
    return sent
