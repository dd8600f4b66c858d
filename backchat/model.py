"""Step 2, on each host: the verified model file, fetched or pushed, never twice.

``backchat.model_source`` decides on the controller what the host must hold and where the
bytes come from; this module queues what puts them there. On every host
``fetch-model.sh`` (shipped in the package) verifies the sha256 and leaves a small marker
(sha256, size, mtime). A later run compares the marker with ``stat`` and never reads the
4 GB again unless they disagree, or ``model_verify = "full"`` asks for a fresh hash.

Why not ``files.put`` for the controller push: it sha1-hashes the 4 GB on both sides on
every run and starts over when interrupted. Why not ``files.rsync``: it needs rsync on the
controller and on every host (neither is in a minimal Debian) and an OpenSSH login of its
own, and its delta algorithm reads the whole file on both sides when the sizes differ.
Appending the missing tail over SSH (backchat.transport: the system's OpenSSH client,
pinned to the host key pyinfra's connection accepted, else that connection itself)
resumes exactly, reads only what it sends, and lets the host's sha256 check catch a bad
prefix (then it starts over once).
"""

from __future__ import annotations

import time

from pyinfra import host, logger
from pyinfra.api import FunctionCommand, QuoteString, StringCommand, operation
from pyinfra.operations import files

from backchat import model_change, outcomes, resources, secrets, transport
from backchat.facts import FreeDiskBytes, ModelFile
from backchat.model_source import (
    ModelSourceError,
    Source,
    choose_source,
    controller_copy,
    endpoint_for,
    is_verified,
    pinned_mismatch,
    resolve,
    start_resolve,
)

NEED_BYTES = 100  # fetch-model.sh with URL "-": the .part needs bytes from the controller


def marker_path(cfg) -> str:
    return f"{cfg.models_dir}/.{cfg.model_file}.verified"


def reads(cfg) -> list[tuple[type, dict]]:
    """The facts ``fetch`` reads whatever it finds (``transport.read_ahead``)."""
    return [file_fact(cfg)]


def file_fact(cfg) -> tuple[type, dict]:
    """The fact that says what the host holds of the model (``fetch``, ``status``)."""
    return ModelFile, {"path": cfg.model_path, "marker": marker_path(cfg)}


def disk_problem(cfg, needed_bytes: int) -> str | None:
    free = host.get_fact(FreeDiskBytes, path=cfg.models_dir)
    if free is not None and free < needed_bytes:
        # A previous model is on this disk until the new one runs (backchat/model_change.py).
        old = model_change.old_models(cfg)
        kept = f", beside the previous model, kept until the new one runs: {model_change.described(old)}" if old else ""
        return (
            f"not enough disk for the model in {cfg.models_dir}: {free:,} bytes free, "
            f"{needed_bytes:,} needed{kept}. Fix: free space, or set models_dir to a larger disk"
        )
    return None


def _lookup(cfg) -> tuple:
    return endpoint_for(cfg.hf_endpoint), cfg.model_repo, cfg.model_file, cfg.model_revision, secrets.hf_token()


def look_up_early(cfg) -> None:
    """Start the Hub lookup step 2 needs now, so it runs while the earlier steps read the host."""
    start_resolve(*_lookup(cfg))


def source_for(cfg) -> Source:
    source = choose_source(cfg, lambda: resolve(*_lookup(cfg)))
    if source.note:
        host.log_styled(source.note, fg="yellow")
    return source


def fetch(cfg) -> bool:
    """Queue what puts the verified model on this host; False if the host was refused."""
    fact, arguments = file_fact(cfg)
    state = host.get_fact(fact, **arguments)
    script = f"{cfg.stack_dir}/bin/fetch-model"
    try:
        source = source_for(cfg)
    except ModelSourceError as error:
        return _without_source(cfg, state, script, error)

    problem = pinned_mismatch(cfg, source.sha256)
    if problem:
        outcomes.refuse_host(problem)
        return False
    if cfg.model_verify == "marker" and is_verified(state, source.sha256, source.size):
        host.noop(f"{cfg.model_file} verified earlier and unchanged (not re-read)")
        return True

    replaced = (state.get("marker") or {}).get("sha256")
    if replaced and replaced != source.sha256 and state.get("size"):
        # One name holds one file: said before the old bytes go, since nothing can bring them back.
        host.log_styled(f"{cfg.model_file} on the host is another model (sha256 {replaced[:12]}...): it is "
                        "replaced in place, so no rollback can return to it. To keep both, give the new "
                        "model its own model_file name", fg="yellow")
    # What the host must still store: the missing tail of the .part, less whatever a file
    # that fails its check frees when fetch-model.sh removes it.
    needed = max(source.size - state["part_size"] - (state["size"] or 0), 0)
    problem = disk_problem(cfg, needed)
    if problem:
        outcomes.refuse_host(problem)
        return False

    _install_fetcher(cfg, script)
    if source.url is None:
        push(
            name=f"Push {cfg.model_file} from the controller and verify it",
            script=script, source=source, dest=cfg.model_path, marker=marker_path(cfg),
        )
        return True

    header_file = None
    token = secrets.hf_token()
    if token and cfg.model_source == "hub":  # a LAN mirror has no business seeing the token
        header_file = f"{cfg.stack_dir}/.hf-token-header"
        secrets.secret_file(
            name="Store the Hugging Face token (0600)", dest=header_file, lines=("Authorization: Bearer ", token, "\n")
        )
    download(
        name=f"Download and verify {cfg.model_file}",
        script=script, url=source.url, sha256=source.sha256, size=source.size,
        dest=cfg.model_path, marker=marker_path(cfg), header_file=header_file,
    )
    return True


def _without_source(cfg, state: dict, script: str, error: ModelSourceError) -> bool:
    """Upstream down: keep the file this host was verified to hold, if it has one."""
    marker = state.get("marker") or {}
    if not (marker.get("sha256") and is_verified(state, marker["sha256"], marker.get("size"))) or pinned_mismatch(
        cfg, marker["sha256"]
    ):
        outcomes.refuse_host(str(error))
        return False
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


def _install_fetcher(cfg, script: str) -> None:
    # No mode: a directory that already exists (maybe not ours) is never re-moded.
    files.directory(name="Create the models directory", path=cfg.models_dir)
    files.directory(name="Create the stack's bin directory", path=f"{cfg.stack_dir}/bin")
    files.put(name="Install the model fetcher", src=resources.path("fetch-model.sh"), dest=script, mode="0755")


# --- running fetch-model.sh ---------------------------------------------------------


def _script_command(script: str, url: str, sha256: str, size: int, dest: str, marker: str, header_file=None):
    args = [script, url, dest, sha256, str(size), marker]
    if header_file:
        args.append(header_file)
    return StringCommand(*(QuoteString(arg) for arg in args))


def _last_error(output) -> str:
    lines = [line for line in output.stderr_lines if line.strip()]
    return lines[-1].strip() if lines else "no error output"


def _needs_bytes(output) -> bool:
    return any(line.startswith("need bytes from ") for line in output.stdout_lines)


def _run_fetch_script(state, host, command: StringCommand, what: str) -> bool:
    # Long downloads print progress lines; show them as they come, not only with -vvv.
    status, output = transport.run_as_operation(host, command, print_output=True)
    if not status:
        return outcomes.fail(host, f"{what}: {_last_error(output)}")
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
    status, output = transport.run_as_operation(host, command, print_output=True, _success_exit_codes=[0, NEED_BYTES])
    if not status:
        return outcomes.fail(host, f"check of {dest} failed: {_last_error(output)}")
    if _needs_bytes(output):
        return outcomes.fail(host, f"{dest} failed its sha256 check and was removed; it cannot be replaced now: {why}")
    return True


# --- model_source = controller ------------------------------------------------------


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
        return transport.run_as_operation(host, check, print_output=True, _success_exit_codes=[0, NEED_BYTES])

    # The OpenSSH connection for the bytes (backchat.transport) is made while the host checks.
    connection = transport.open_stream(host)
    try:
        return _check_and_push(state, host, run_check, source, dest, connection)
    finally:
        if connection is not None:
            connection.close()


def _check_and_push(state, host, run_check, source: Source, dest: str, connection) -> bool:
    # First the host checks what it has (an existing file, a complete .part): maybe no bytes are needed.
    status, output = run_check()
    if not status:
        return outcomes.fail(host, f"check of {dest} failed: {_last_error(output)}")
    if not _needs_bytes(output):
        return True

    copy = controller_copy(source, secrets.hf_token(), lambda line: logger.info(f"--> {line}"))
    if "error" in copy:
        return outcomes.fail(host, copy["error"])

    for _attempt in (1, 2):  # a junk prefix gets one fresh start
        started = time.monotonic()
        try:
            offset, sent, way = _append_missing_tail(state, host, copy["path"], f"{dest}.part", source.size, connection)
            connection = None  # used up: a second attempt connects again
        except (OSError, ValueError) as error:  # the .part keeps what arrived; the next run resumes
            return outcomes.fail(host, f"push of {dest} failed ({type(error).__name__}: {error}); the next run resumes")
        seconds = max(time.monotonic() - started, 1e-6)
        host.log_styled(
            f"pushed {sent:,} bytes (resumed at {offset:,}) in {seconds:.2f}s, {sent / seconds / 1e6:.0f} MB/s over {way}"
        )
        status, output = run_check()
        if status and not _needs_bytes(output):
            return True
        if offset == 0:
            break
        # The host removed a .part whose sha256 was wrong: its old prefix was junk. Once more, whole.
        host.log_styled("the resumed file failed its check; pushing it whole", fg="yellow")
    return outcomes.fail(host, f"push of {dest} failed: {_last_error(output)}")


# The host reports how much of the .part it has, then appends what follows to it. One
# command, so the offset is the one the bytes are appended at. The .part is created
# without following a link (fetch-model.sh has already refused a linked one).
_APPEND = (
    'part=$1; size=$2; have=$(stat -c %s "$part" 2>/dev/null || echo 0); '
    'if [ "$have" -gt "$size" ]; then : >"$part"; have=0; fi; '
    'echo "$have"; umask 077; exec cat >>"$part"'
)


def _append_missing_tail(state, host, local_path: str, part: str, size: int, connection=None) -> tuple[int, int, str]:
    """Append local_path[offset:] to the host's ``part``, offset being what it already holds.
    Returns (offset, bytes sent, the way they went: OpenSSH or paramiko)."""
    remote = StringCommand("sh", "-c", QuoteString(_APPEND), "append", QuoteString(part), str(size))
    line, sent, way = transport.stream_file(
        state, host, remote, local_path, lambda first: int(first or 0), size, connection
    )
    return int(line or 0), sent, way
