"""Every backchat setting, declared once: name, default, check and a one-line doc.

From ``SETTINGS`` come the defaults (``deploy_backchat``'s ``data_defaults``, the lowest
data layer, so group and host data override them), the validation, and the README's
settings table (``python -m backchat.settings`` prints it; a test keeps the two equal).
``group_data/all.py`` is the commented manual a user edits; a test checks it names every
setting with its declared default.

Validation runs once per run, before any operation is queued: a bad value stops the run
with one message that names each setting, its value (unless secret) and the fix, and
nothing on any host has changed. Names that are neither a setting nor pyinfra's own data
are refused with the nearest setting name, so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

import difflib
import functools
import sys
from dataclasses import dataclass, make_dataclass
from typing import Any, Callable, Mapping

from pyinfra.api.exceptions import PyinfraError

from backchat import checks, images
from backchat.checks import Invalid
from backchat.secrets import Secret

BACKENDS = ("localai", "textgen", "llamacpp")
FRONTENDS = ("chatbot-ui", "textgen")
DOCKER_SOURCES = ("docker", "debian")
MODEL_SOURCES = ("hub", "controller", "mirror")
MODEL_VERIFY = ("marker", "full")


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    check: Callable[[Any], Any]
    doc: str  # one line: the README table's "what" column
    shown: str | None = None  # the README's default column, when repr(default) misleads


_S = Setting
SETTINGS: tuple[Setting, ...] = (
    # What runs
    _S("backend", "localai", checks.choice(BACKENDS), "OpenAI-compatible server: `localai`, `textgen`, `llamacpp`"),
    _S("frontend", "chatbot-ui", checks.choice(FRONTENDS), "GUI Backstage iframes: `chatbot-ui` or `textgen`"),
    _S("start", True, checks.boolean, "`False`: install and write everything, start nothing"),
    # Docker
    _S("docker_source", "docker", checks.choice(DOCKER_SOURCES),
       "`docker` (Docker's repo) or `debian` (distribution packages; not Debian 12)"),
    _S("docker_repo_url", "https://download.docker.com/linux", checks.repo_url,
       "Docker's apt repo, or a mirror with its layout (`<url>/debian`, `<url>/ubuntu`)"),
    # Docker's release key, "Docker Release (CE deb) <docker@docker.com>", as published in
    # Docker's install docs: the key at <docker_repo_url>/<debian|ubuntu>/gpg must be this one.
    _S("docker_repo_key_fingerprint", "9DC858229FC7DD38854AE2D88D81803C0EBFCD88", checks.fingerprint,
       "the repo's signing key must have it (a mirror re-signing: its own key's)"),
    _S("docker_users", [], checks.users, "users added to the `docker` group"),
    # The model
    _S("model_repo", "TheBloke/Mistral-7B-OpenOrca-GGUF", checks.hf_repo, "the GGUF's repo on the Hub",
       "Mistral-7B-OpenOrca"),
    _S("model_file", "mistral-7b-openorca.Q4_K_M.gguf", checks.file_name, "the GGUF's file name", "Q4_K_M"),
    _S("model_revision", "fbd9cd059e5fa0bba72a0abe8aea7e127d7994cb", checks.revision,
       "commit (pinned) or branch", "a pinned commit"),
    _S("model_sha256", "83967e58c10c25fbe9d358b6d9e9a8212ca8a292061110dcb68511d39133407b", checks.sha256,
       "the run stops if the source reports another", "the file's sha256"),
    _S("model_id", "gpt-3.5-turbo", checks.model_id,
       "the id in `/v1/models` (legacy Chatbot UI shows only OpenAI ids)"),
    _S("model_source", "hub", checks.choice(MODEL_SOURCES),
       "`hub` (each host from the Hub), `controller` (downloaded once, pushed over SSH), `mirror`"),
    _S("model_mirror_url", None, checks.optional(checks.url),
       'the file\'s URL on a LAN HTTP server (`model_source = "mirror"`)'),
    _S("keep_old_models", False, checks.boolean,
       "keep the previous model file after a change of `model_repo`/`model_file` has verified"),
    _S("model_verify", "marker", checks.choice(MODEL_VERIFY), "`full` re-hashes the file on the host (after disk trouble)"),
    _S("hf_endpoint", None, checks.optional(checks.url), "Hub mirror; `$HF_ENDPOINT` otherwise. Token: `$HF_TOKEN`"),
    _S("min_memory_mb", 7500, checks.integer(0, 10**7, example=8192), "hosts with less RAM are refused"),
    # Tuning
    _S("threads", None, checks.optional(checks.integer(1, 1024, example=4)), "`None`: physical cores; a number overrides"),
    _S("context_size", 8192, checks.integer(256, 1 << 20, example=8192),
       "tokens; Chatbot UI sends up to ~4,300 of history plus 1,000 to answer"),
    # Where things go
    _S("stack_dir", "/opt/backchat", checks.own_directory, "compose file, `.env`, LocalAI's model config"),
    _S("models_dir", "/opt/backchat/models", checks.own_directory, "one copy of the model, shared by every backend"),
    # Ports
    _S("bind_address", "0.0.0.0", checks.ip_address, "`127.0.0.1` keeps everything local to the host"),
    _S("localai_port", 8080, checks.port, "LocalAI's (or llama.cpp's) host port"),
    _S("chatbot_ui_port", 3001, checks.port, "Chatbot UI's host port"),
    _S("textgen_port", 7860, checks.port, "Text Gen WebUI's GUI host port"),
    _S("textgen_api_port", 5001, checks.port, "Text Gen WebUI's API host port"),
    # The HTTPS front door (backchat/tls.py)
    _S("tls", True, checks.boolean,
       "HTTPS front door (nginx) on every port above, unless `bind_address` is loopback"),
    _S("tls_ca_dir", "~/.config/backchat/ca", checks.controller_path,
       "the controller's CA (made once; trust its `ca.crt`)"),
    _S("tls_cert_file", None, checks.optional(checks.controller_path),
       "your own certificate (PEM, chain included) instead of the CA's"),
    _S("tls_key_file", None, checks.optional(checks.controller_path), "its private key (PEM)"),
    _S("proxy_timeout", 1800, checks.integer(10, 86400, example=1800),
       "seconds a streamed answer may take through the front door"),
    # The lab's gateway (backchat/gateway.py), on the inventory's `gateway` group host
    _S("gateway_port", 443, checks.port,
       "the `gateway` host's one port: the GUI at `/`, the API of every AI host at `/v1`"),
    # Images
    _S("localai_image", "localai/localai:v4.9.0", checks.image, "pinned tag, any registry"),
    _S("chatbot_ui_image", "ghcr.io/mckaywrigley/chatbot-ui:main", checks.image, "pinned tag, any registry"),
    # Atinoda tags a release `{variant}-{platform}-{version}`, the version being
    # text-generation-webui's own release tag (its Dockerfile checks out $VERSION_TAG).
    # v4.7.3: the release run here against our flags (v4.1+ lists the model by name; older
    # ones list a file path that Chatbot UI drops). `default-cpu` alone floats.
    _S("textgen_image", "atinoda/text-generation-webui:default-cpu-v4.7.3", checks.image,
       "pinned tag, any registry"),
    _S("llamacpp_image", "ghcr.io/ggml-org/llama.cpp:server-b11206", checks.image, "pinned tag, any registry"),
    _S("frontdoor_image", "nginx:1.30.4", checks.image, "pinned tag, any registry (nginx stable)"),
    # HAProxy's newest LTS branch when pinned (docker-library/haproxy's versions.json,
    # 2026-07: 3.4 is "latest lts", 3.4.2 its newest tag). Its config parses and runs on
    # Debian 12's HAProxy 2.6 too, which is what tests/e2e/test_gateway.py runs.
    _S("gateway_image", "haproxy:3.4.2", checks.image, "pinned tag, any registry (HAProxy LTS)"),
    _S("image_archives", [], checks.image_archives,
       "`docker save` tarballs on the controller, `docker load`ed on hosts that lack them"),
    # LocalAI's llama-cpp backend without a registry (backchat/localai_backend.py)
    _S("localai_backend_archive", None, checks.optional(checks.backend_archive),
       "LocalAI's llama-cpp backend as a tarball on the controller, so LocalAI downloads nothing"),
    _S("localai_backend_sha256", None, checks.sha256, "that tarball's sha256 (required with it; hosts check it too)"),
    # Secrets (the values themselves never enter host data: see backchat/secrets.py)
    _S("auth", True, checks.boolean, "backends require the API key (`False` turns auth off)"),
    _S("api_key_file", None, checks.optional(checks.controller_path),
       "the key's file on the controller; `None`: `$BACKCHAT_API_KEY`, else generated once"),
    # Backstage
    _S("backstage_app_dir", "/opt/backchat/backstage", checks.own_directory, "your Backstage app's root on the host"),
    _S("public_address", None, checks.optional(checks.hostname), "the name browsers use for the host",
       "inventory name"),
    _S("backstage_origin", "http://localhost:3000", checks.origin, "allowed by LocalAI's CORS"),
    _S("ai_server_host", None, checks.optional(checks.inventory_name),
       "on a `backstage` group host: the AI host whose GUI the Backchat page opens", "the first AI host"),
    # Upgrades (backchat/rollout.py)
    _S("rollout_batch_size", "25%", checks.batch_size,
       "AI hosts started and verified at once when a run changes them; a failing one is rolled back and the rollout stops"),
    # Verify
    _S("verify_timeout", 600, checks.integer(0, 86400, example=600), "seconds to wait for `/v1/models` (0 skips)"),
    _S("verify_chat", False, checks.boolean, "also ask one question and show the answer"),
    _S("chat_timeout", 900, checks.integer(1, 86400, example=900), "seconds the one question may take"),
    _S("report_path", None, checks.optional(checks.report_path),
       "write the end-of-run report as JSON on the controller"),
    # Uninstall (read by uninstall.py only; the deploy and status ignore it)
    _S("remove_model", False, checks.boolean, "`uninstall.py` also removes the model file (kept by default)"),
)
BY_NAME = {setting.name: setting for setting in SETTINGS}
DEFAULTS = {setting.name: setting.default for setting in SETTINGS}
# Text for messages: the command line spells None as null (pyinfra parses --data as JSON).
_NONE = "null (None in Python files)"


class SettingsError(PyinfraError):
    """A setting is unusable; raised before anything runs on any host."""


class _Base:
    # What runs follows from the two choices: the backend serves the model, Chatbot UI
    # needs a backend to talk to, and Text Gen WebUI is its own backend and frontend.
    @property
    def services(self) -> tuple[str, ...]:
        wanted = {self.backend, self.frontend}
        order = ("localai", "llamacpp", "textgen", "chatbot-ui")
        return tuple(name for name in order if name in wanted)

    @property
    def model_path(self) -> str:
        return f"{self.models_dir}/{self.model_file}"


# The typed settings of one host: one field per declared setting, plus the API key (a
# Secret or None), which comes from the controller, never from host data.
Settings = make_dataclass(
    "Settings",
    [(setting.name, Any) for setting in SETTINGS] + [("api_key", Secret | None, None)],
    bases=(_Base,),
    frozen=True,
)
Settings.__module__ = __name__


def load_defaults() -> dict[str, Any]:
    """A fresh copy of the declared defaults."""
    return {name: list(value) if isinstance(value, list) else value for name, value in DEFAULTS.items()}


def _shown(value: Any) -> str:
    return _NONE if value is None else repr(value)


def validate(data: Mapping[str, Any], where: str = "", api_key: Secret | None = None) -> Settings:
    """Check every setting in ``data`` (missing ones take their default); one error lists all problems."""
    values: dict[str, Any] = {}
    problems = [unknown_problem(name) for name in data if name not in BY_NAME]
    for setting in SETTINGS:
        value = data.get(setting.name, setting.default)
        try:
            values[setting.name] = setting.check(value)
        except Invalid as invalid:
            problems.append(f"{setting.name} = {_shown(value)} {invalid.problem}. Fix: {invalid.fix}.")
    if not problems:
        problems.extend(_cross_checks(values))
    if problems:
        head = f"Invalid settings{f' for {where}' if where else ''} (nothing was changed):"
        raise SettingsError("\n  ".join([head, *problems]))
    return Settings(**values, api_key=api_key)


def unknown_problem(name: str) -> str:
    near = difflib.get_close_matches(str(name).replace("-", "_"), BY_NAME, n=1, cutoff=0.6)
    fix = f"did you mean {near[0]}?" if near else "see group_data/all.py for every setting"
    return f"{name} is not a backchat setting. Fix: {fix}"


def _cross_checks(values: dict[str, Any]) -> list[str]:
    problems = []
    seen: dict[int, str] = {}
    for name in ("localai_port", "chatbot_ui_port", "textgen_port", "textgen_api_port"):
        if values[name] in seen:
            problems.append(f"{name} = {values[name]} is also {seen[values[name]]}. Fix: give each service its own port.")
        seen[values[name]] = name
    if bool(values["tls_cert_file"]) != bool(values["tls_key_file"]):
        problems.append(
            "tls_cert_file and tls_key_file go together. Fix: set both (your certificate and its "
            "key), or neither (the controller's CA signs one)."
        )
    for name in ("tls_cert_file", "tls_key_file"):
        if values[name] and not checks.is_file(values[name]):
            problems.append(f"{name} = {values[name]!r} is not a file on the controller. Fix: point it at the PEM file.")
    if values["model_source"] == "mirror" and not values["model_mirror_url"]:
        problems.append(
            "model_source = 'mirror' needs model_mirror_url. Fix: set model_mirror_url to the "
            "file's URL on your LAN server, or use model_source = 'hub'."
        )
    problems.extend(_backend_archive_problems(values))
    return problems


def _backend_archive_problems(values: dict[str, Any]) -> list[str]:
    archive, pinned = values["localai_backend_archive"], values["localai_backend_sha256"]
    if not archive:
        return []
    if not pinned:
        return [
            "localai_backend_archive needs localai_backend_sha256. Fix: set it to the sha256 of "
            f"the archive you checked (sha256sum {archive})."
        ]
    actual = images.file_sha256(archive)
    if actual != pinned:
        return [
            f"localai_backend_archive = {archive!r} has sha256 {actual}, not localai_backend_sha256 "
            f"{pinned}. Fix: check where the archive came from; update the pin only if it is trusted."
        ]
    return []


# --- which host data is ours ------------------------------------------------------------


@functools.cache  # the connectors' entry points, scanned once per run (not once per host)
def _pyinfra_data_names() -> frozenset[str]:
    """Host data keys pyinfra's own connectors read (ssh_hostname, docker_identifier, ...)."""
    from pyinfra.api.connectors import get_all_connectors

    names: set[str] = set()
    for connector in get_all_connectors().values():
        names.update(getattr(connector, "data_meta", {}) or {})
    return frozenset(names)


def ours(data: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a host's data that is backchat's to check: everything but pyinfra's own
    (connector data, and ``_``-prefixed global arguments such as ``_sudo``)."""
    pyinfra_names = _pyinfra_data_names()
    return {
        name: value
        for name, value in data.items()
        if not str(name).startswith("_") and name not in pyinfra_names
    }


def markdown_table() -> str:
    """The README's settings table."""
    lines = ["| setting | default | what |", "|---|---|---|"]
    for setting in SETTINGS:
        default = setting.shown or ("`None`" if setting.default is None else f"`{setting.default!r}`")
        lines.append(f"| `{setting.name}` | {default} | {setting.doc} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m backchat.settings: the README's settings table
    sys.stdout.write(markdown_table() + "\n")
