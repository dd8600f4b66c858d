"""Step 2: the GGUF model, resolved once on the controller and fetched by each host.

The controller asks the Hub (or ``HF_ENDPOINT``) which commit the revision is, and the
file's sha256 and size. Each host then downloads by that commit, resuming any partial
file, verifies the sha256, and leaves a small marker (sha256, size, mtime). A later run
compares the marker with ``stat`` and never reads the 4 GB again unless they disagree.
"""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from pyinfra import host
from pyinfra.api import FunctionCommand, StringCommand, QuoteString, operation
from pyinfra.operations import files

from backchat import preflight
from backchat.facts import ModelFile
from backchat.settings import Settings

FETCH_SCRIPT = Path(__file__).resolve().parent.parent / "templates" / "fetch-model.sh"
DEFAULT_ENDPOINT = "https://huggingface.co"


class ModelSourceError(Exception):
    """The model could not be resolved: says what was asked, of whom, and why it failed."""


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


def endpoint_for(cfg: Settings) -> str:
    return (cfg.hf_endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hf_token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


@functools.lru_cache(maxsize=None)
def resolve(endpoint: str, repo: str, filename: str, revision: str, token: str | None) -> ResolvedModel:
    """Ask the Hub for the commit, sha256 and size of one file (once per run, not per host).

    huggingface_hub runs in a child process: pyinfra's gevent patching of ``select``
    breaks its import inside the pyinfra process. The token travels in the environment.
    """
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    child = subprocess.run(
        [sys.executable, "-m", "backchat.hub", endpoint, repo, filename, revision],
        capture_output=True, text=True, env=env, cwd=str(Path(__file__).resolve().parent.parent),
    )
    try:
        answer = json.loads(child.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        answer = {"error": f"resolver crashed: {child.stderr.strip()[-500:]}"}
    if "error" in answer:
        raise ModelSourceError(answer["error"])
    return ResolvedModel(endpoint=endpoint, revision=revision, **answer)


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
    try:
        model = resolve(
            endpoint_for(cfg), cfg.model_repo, cfg.model_file, cfg.model_revision, hf_token()
        )
    except ModelSourceError as error:
        marker = state.get("marker") or {}
        # Upstream down, but this host already holds the file it was verified to have.
        if marker.get("sha256") and is_verified(state, marker["sha256"], marker.get("size")):
            if not _pinned_mismatch(cfg, marker["sha256"]):
                host.noop(f"model source unreachable; keeping the verified {cfg.model_file}")
                return True
        preflight.refuse_host(str(error))
        return False

    problem = _pinned_mismatch(cfg, model.sha256)
    if problem:
        preflight.refuse_host(problem)
        return False
    if is_verified(state, model.sha256, model.size):
        host.noop(f"{cfg.model_file} verified earlier and unchanged (not re-read)")
        return True

    problem = preflight.disk_problem(cfg, model.size - state["part_size"])
    if problem:
        preflight.refuse_host(problem)
        return False

    files.directory(name="Create the models directory", path=cfg.models_dir, mode="0755")
    script = f"{cfg.stack_dir}/bin/fetch-model"
    files.put(name="Install the model fetcher", src=str(FETCH_SCRIPT), dest=script, mode="0755")
    header_file = None
    token = hf_token()
    if token:
        header_file = f"{cfg.stack_dir}/.hf-token-header"
        files.put(
            name="Store the Hugging Face token (0600)",
            src=io.StringIO(f"Authorization: Bearer {token}\n"),
            dest=header_file,
            mode="0600",
        )
    download(
        name=f"Download and verify {cfg.model_file}",
        script=script,
        model=model,
        dest=cfg.model_path,
        marker=marker_path(cfg),
        header_file=header_file,
    )
    return True


def _run_with_live_output(state, host, command: StringCommand) -> bool:
    # Long downloads print progress lines; show them as they come, not only with -vvv.
    status, _ = host.run_shell_command(command, print_output=True)
    return status


@operation(is_idempotent=False)
def download(script: str, model: ResolvedModel, dest: str, marker: str, header_file: str | None = None):
    """
    Download ``model`` to ``dest`` with resume, verify its sha256 and write ``marker``.

    + script: path of fetch-model.sh on the host
    + model: what the controller resolved (URL by commit, sha256, size)
    + dest: the model's path on the host
    + marker: where the verification record goes
    + header_file: 0600 file holding the Authorization header, for gated repos
    """
    args = [script, model.url, dest, model.sha256, str(model.size), marker]
    if header_file:
        args.append(header_file)
    command = StringCommand(*(QuoteString(arg) for arg in args))
    yield FunctionCommand(_run_with_live_output, (command,), {})


