"""Every knob a host can be given, validated once into a typed ``Settings``.

The defaults live in ``group_data/all.py`` (the one file a user reads); this module only
knows what a valid value looks like. Validation runs before any operation is queued, so a
bad value stops the run with one message that names the setting, the value and the fix,
and nothing on any host has changed. Values are checked against strict patterns so that
nothing a user types can turn into shell syntax; commands still quote every value.
"""

from __future__ import annotations

import ipaddress
import re
import runpy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from pyinfra.api.exceptions import PyinfraError

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULTS_FILE = PROJECT_DIR / "group_data" / "all.py"

BACKENDS = ("localai", "textgen", "llamacpp")
FRONTENDS = ("chatbot-ui", "textgen")
DOCKER_SOURCES = ("docker", "debian")
MODEL_SOURCES = ("hub", "controller", "mirror")
MODEL_VERIFY = ("marker", "full")

# Conservative character sets: anything outside them has no business in these values, and
# rejecting it up front is clearer than discovering a quoting bug on a host.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/-]*$")
_IMAGE = re.compile(r"^[a-z0-9][a-z0-9._/:-]*(@sha256:[0-9a-f]{64})?$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")
_URL = re.compile(r"^https?://[A-Za-z0-9.:\[\]-]+(/[A-Za-z0-9._~/-]*)?$")
_USER = re.compile(r"^[a-z_][a-z0-9_-]*$")
# Keys end up in .env and in an argument list the Text Gen WebUI image evals: no quoting.
_SECRET = re.compile(r"^[A-Za-z0-9._~+/=-]{8,256}$")


class SettingsError(PyinfraError):
    """A group_data value is unusable; raised before anything runs on any host."""


class _Invalid(ValueError):
    def __init__(self, problem: str, fix: str):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


@dataclass(frozen=True)
class Settings:
    backend: str
    frontend: str
    docker_source: str
    docker_users: tuple[str, ...]
    model_repo: str
    model_file: str
    model_revision: str
    model_sha256: str | None
    model_id: str
    model_source: str
    model_mirror_url: str | None
    model_verify: str
    hf_endpoint: str | None
    min_memory_mb: int
    threads: int | None
    context_size: int
    stack_dir: str
    models_dir: str
    bind_address: str
    localai_port: int
    chatbot_ui_port: int
    textgen_port: int
    textgen_api_port: int
    localai_image: str
    chatbot_ui_image: str
    textgen_image: str
    llamacpp_image: str
    image_archives: tuple[str, ...]
    api_key: str | None = field(repr=False)  # a secret: kept out of logs and plans
    start: bool
    backstage_app_dir: str
    public_address: str | None
    backstage_origin: str
    verify_timeout: int
    verify_chat: bool
    chat_timeout: int
    report_path: str | None

    # What runs follows from the two choices: the backend serves the model, Chatbot UI
    # needs a backend to talk to, and Text Gen WebUI is its own backend and frontend.
    @property
    def services(self) -> tuple[str, ...]:
        wanted = {self.backend}
        if self.frontend == "chatbot-ui":
            wanted.add("chatbot-ui")
        if self.frontend == "textgen":
            wanted.add("textgen")
        order = ("localai", "llamacpp", "textgen", "chatbot-ui")
        return tuple(name for name in order if name in wanted)

    @property
    def model_path(self) -> str:
        return f"{self.models_dir}/{self.model_file}"


# --- value checkers: each returns the cleaned value or raises _Invalid ---------------


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise _Invalid(f"must be one of {', '.join(options)}", f"use one of: {', '.join(options)}")
        return value

    return check


def _pattern(regex: re.Pattern, what: str, example: str, optional: bool = False) -> Callable:
    def check(value: Any) -> Any:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not regex.match(value) or ".." in value.split("/"):
            raise _Invalid(f"is not {what}", f"use something like {example}")
        return value

    return check


def _integer(low: int, high: int, optional: bool = False, example: int | None = None) -> Callable:
    def check(value: Any) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            hint = f"{example}" if example is not None else f"{low}"
            none = " or None (automatic)" if optional else ""
            raise _Invalid(f"must be a whole number from {low} to {high}{none}", f"use e.g. {hint}")
        return value

    return check


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _Invalid("must be True or False", "use True or False (on the command line: true/false)")


def _port(value: Any) -> int:
    return _integer(1, 65535, example=8080)(value)


def _bind_address(value: Any) -> str:
    try:
        ipaddress.ip_address(value)
    except (ValueError, TypeError):
        raise _Invalid("is not an IP address", "use 0.0.0.0 (all interfaces) or 127.0.0.1") from None
    return str(value)


def _users(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value] if value else []
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(user, str) and _USER.match(user) for user in value
    ):
        raise _Invalid("must be a list of user names", 'use e.g. ["alice", "bob"] or []')
    return tuple(value)


def _local_files(value: Any) -> tuple[str, ...]:
    """Paths on the controller (image tarballs for `docker load`): they must exist now."""
    if isinstance(value, str):
        value = [value] if value else []
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise _Invalid("must be a list of file paths", 'use e.g. ["images/localai.tar"] or []')
    missing = [item for item in value if not Path(item).is_file()]
    if missing:
        raise _Invalid(f"lists files that do not exist here: {missing}", "save them with docker save, or fix the paths")
    return tuple(str(Path(item).resolve()) for item in value)


def _secret(value: Any) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str) or not _SECRET.match(value):
        # Never echo the value: it is a secret.
        raise _Invalid(
            "must be 8 to 256 letters, digits or ._~+/=-",
            "generate one with: openssl rand -hex 24",
        )
    return value


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "backend": _choice(BACKENDS),
    "frontend": _choice(FRONTENDS),
    "docker_source": _choice(DOCKER_SOURCES),
    "docker_users": _users,
    "model_repo": _pattern(_HF_REPO, "a Hugging Face repo id", "TheBloke/Mistral-7B-OpenOrca-GGUF"),
    "model_file": _pattern(_SAFE_NAME, "a plain file name", "mistral-7b-openorca.Q4_K_M.gguf"),
    "model_revision": _pattern(_REVISION, "a commit, branch or tag", "a 40-hex commit id"),
    "model_sha256": _pattern(_SHA256, "64 lower-case hex digits", "the file's sha256, or None", True),
    "model_id": _pattern(_SAFE_NAME, "a model name", "gpt-3.5-turbo"),
    "model_source": _choice(MODEL_SOURCES),
    "model_mirror_url": _pattern(_URL, "an http(s) URL of the file", "http://mirror.lab:8000/models/x.gguf", True),
    "model_verify": _choice(MODEL_VERIFY),
    "hf_endpoint": _pattern(_URL, "an http(s) URL", "https://huggingface.co", True),
    "min_memory_mb": _integer(0, 10**7, example=8192),
    "threads": _integer(1, 1024, optional=True, example=4),
    "context_size": _integer(256, 1 << 20, example=4096),
    "stack_dir": _pattern(_SAFE_PATH, "an absolute path", "/opt/backchat"),
    "models_dir": _pattern(_SAFE_PATH, "an absolute path", "/opt/backchat/models"),
    "bind_address": _bind_address,
    "localai_port": _port,
    "chatbot_ui_port": _port,
    "textgen_port": _port,
    "textgen_api_port": _port,
    "localai_image": _pattern(_IMAGE, "an image reference", "localai/localai:v4.9.0"),
    "chatbot_ui_image": _pattern(_IMAGE, "an image reference", "ghcr.io/mckaywrigley/chatbot-ui:main"),
    "textgen_image": _pattern(_IMAGE, "an image reference", "atinoda/text-generation-webui:default-cpu"),
    "llamacpp_image": _pattern(_IMAGE, "an image reference", "ghcr.io/ggml-org/llama.cpp:server"),
    "image_archives": _local_files,
    "api_key": _secret,
    "start": _boolean,
    "backstage_app_dir": _pattern(_SAFE_PATH, "an absolute path", "/srv/backstage"),
    "public_address": _pattern(_HOSTNAME, "a host name or IP address", "ai-01.lab.example", True),
    "backstage_origin": _pattern(_URL, "an http(s) origin", "http://backstage.example:3000"),
    "verify_timeout": _integer(0, 86400, example=600),
    "verify_chat": _boolean,
    "chat_timeout": _integer(1, 86400, example=900),
    "report_path": _pattern(_SAFE_PATH, "an absolute path", "/tmp/backchat-report.json", True),
}
SECRETS = frozenset({"api_key"})

assert set(_CHECKS) == {f.name for f in fields(Settings)}, "every setting needs a checker"


def load_defaults() -> dict[str, Any]:
    """The documented defaults, read from the same file pyinfra loads as group data."""
    namespace = runpy.run_path(str(DEFAULTS_FILE))
    return {name: namespace[name] for name in _CHECKS if name in namespace}


def validate(data: Mapping[str, Any], where: str = "") -> Settings:
    """Check every setting; raise one SettingsError listing all problems."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    for name, check in _CHECKS.items():
        if name not in data:
            problems.append(
                f"{name} is not set. Fix: run pyinfra from the backchat directory so "
                f"group_data/all.py is loaded, or pass --data {name}=..."
            )
            continue
        try:
            values[name] = check(data[name])
        except _Invalid as invalid:
            shown = "(hidden)" if name in SECRETS else repr(data[name])
            problems.append(f"{name} = {shown} {invalid.problem}. Fix: {invalid.fix}.")

    if not problems:
        problems.extend(_cross_checks(values))
    if problems:
        head = f"Invalid settings{f' for {where}' if where else ''} (nothing was changed):"
        raise SettingsError("\n  ".join([head, *problems]))
    return Settings(**values)


def _cross_checks(values: dict[str, Any]) -> list[str]:
    problems = []
    ports = {
        name: values[name]
        for name in ("localai_port", "chatbot_ui_port", "textgen_port", "textgen_api_port")
    }
    seen: dict[int, str] = {}
    for name, port in ports.items():
        if port in seen:
            problems.append(
                f"{name} = {port} is also {seen[port]}. Fix: give each service its own port."
            )
        seen[port] = name
    if values["model_source"] == "mirror" and not values["model_mirror_url"]:
        problems.append(
            "model_source = 'mirror' needs model_mirror_url. Fix: set model_mirror_url to the "
            "file's URL on your LAN server, or use model_source = 'hub'."
        )
    if not values["models_dir"].startswith("/") or values["models_dir"] == "/":
        problems.append("models_dir = '/' is not a directory of its own. Fix: use /opt/backchat/models.")
    return problems


def settings_for(host) -> Settings:
    """Validated settings of a pyinfra host (its group data merged with --data)."""
    data = host.data.dict()
    return validate({name: data[name] for name in _CHECKS if name in data}, where=host.name)


def validate_inventory(inventory) -> None:
    """Check every host's settings at once, so one bad value stops the run before any host changes."""
    problems = []
    for each in inventory:
        try:
            settings_for(each)
        except SettingsError as error:
            problems.append(str(error))
    if problems:
        raise SettingsError("\n".join(problems))
