"""Value checkers for the settings: each returns the cleaned value or raises ``Invalid``.

Patterns are matched whole (``fullmatch``: ``$`` would let a trailing newline through) and
limited to characters that have no meaning to a shell, YAML, compose or ``.env``, so a
value that passes round-trips unchanged through every file it reaches. Commands still
quote every value.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable
from urllib.parse import urlsplit

from backchat import images


class Invalid(ValueError):
    """What is wrong with a value (``problem``) and what to do about it (``fix``)."""

    def __init__(self, problem: str, fix: str):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


# Names become file names on hosts (LocalAI's "<model_id>.yaml"): at most 250 bytes, so
# that with a suffix they stay within NAME_MAX (255).
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,249}")
_HF_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._/-]*")
# [registry[:port]/]name[:tag][@sha256:digest]; a tag is never empty.
_IMAGE = re.compile(
    r"(?:[a-z0-9][a-z0-9.-]*(?::[0-9]{1,5})?/)?[a-z0-9][a-z0-9._/-]*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
)
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_URL = re.compile(r"https?://[A-Za-z0-9.:\[\]-]+(/[A-Za-z0-9._~/%-]*)?")
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
# An inventory name as pyinfra takes it: an SSH name, an address, or @local, @vagrant/box.
_INVENTORY_NAME = re.compile(r"@?[A-Za-z0-9][A-Za-z0-9._:/@-]{0,252}")
# An OpenPGP v4 fingerprint: 40 hex digits, run together or in gpg's groups of four.
_FINGERPRINT = re.compile(r"[0-9A-Fa-f]{40}|[0-9A-Fa-f]{4}(?: {1,2}[0-9A-Fa-f]{4}){9}")
_INTEGER = re.compile(r"-?[0-9]+")

# Directories the deploy must never own: it would re-mode them, and others can write there
# (a planted symlink in /tmp turns a root write into a write anywhere).
_SYSTEM_TREES = (
    "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run",
    "/sbin", "/sys", "/tmp", "/usr", "/var/tmp", "/var/run", "/var/lock", "/lost+found",
)
_SHARED_DIRECTORIES = ("/", "/home", "/root", "/opt", "/srv", "/var", "/var/lib", "/mnt", "/media")


def _string(value: Any, what: str, example: str) -> str:
    if not isinstance(value, str):
        raise Invalid(f"is not {what}", f"use something like {example}")
    return value


def pattern(regex: re.Pattern, what: str, example: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        text = _string(value, what, example)
        if not regex.fullmatch(text) or ".." in text.split("/"):
            raise Invalid(f"is not {what}", f"use something like {example}")
        return text

    return check


def optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def checked(value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("none", "null"):
            # --data x=None arrives as the text "None": pyinfra parses values as JSON.
            raise Invalid("is the text None, not the value", "write null on the command line (None in Python files)")
        return None if value is None else check(value)

    return checked


def choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise Invalid(f"must be one of {', '.join(options)}", f"use one of: {', '.join(options)}")
        return value

    return check


def integer(low: int, high: int, example: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, str) and _INTEGER.fullmatch(value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise Invalid(f"must be a whole number from {low} to {high}", f"use e.g. {example}")
        return value

    return check


_PERCENT = re.compile(r"([1-9][0-9]?|100)%")


def batch_size(value: Any) -> int | str:
    """A number of hosts (0: all at once) or a share of them, ``"25%"``."""
    if isinstance(value, str) and _PERCENT.fullmatch(value.strip()):
        return value.strip()
    try:
        return integer(0, 100000, example=1)(value)
    except Invalid:
        raise Invalid("must be a number of hosts (0: all at once) or a percentage from 1% to 100%",
                      'use e.g. 1 or "25%"') from None


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise Invalid("must be True or False", "use True or False (on the command line: true/false)")


port = integer(1, 65535, example=8080)
hf_repo = pattern(_HF_REPO, "a Hugging Face repo id", "TheBloke/Mistral-7B-OpenOrca-GGUF")
file_name = pattern(_SAFE_NAME, "a plain file name", "mistral-7b-openorca.Q4_K_M.gguf")
revision = pattern(_REVISION, "a commit, branch or tag", "a 40-hex commit id")
model_id = pattern(_SAFE_NAME, "a model name", "gpt-3.5-turbo")
image = pattern(_IMAGE, "an image reference", "localai/localai:v4.9.0")
hostname = pattern(_HOSTNAME, "a host name or IP address", "ai-01.lab.example")
inventory_name = pattern(_INVENTORY_NAME, "an inventory host name", "ai-01.lab.example")
url = pattern(_URL, "an http(s) URL", "http://mirror.lab:8000/models/x.gguf")
_path_text = pattern(_SAFE_PATH, "an absolute path", "/opt/backchat")


def _path(value: Any) -> str:
    text = _path_text(value)
    if len(text) > 4000 or any(len(part) > 255 for part in text.split("/")):
        raise Invalid("is longer than a path or file name may be (4000 and 255 bytes)", "use a shorter path")
    return text


def sha256(value: Any) -> str | None:
    return None if value is None else pattern(_SHA256, "64 lower-case hex digits", "the file's sha256, or null")(value)


def repo_url(value: Any) -> str:
    """An apt repository's base URL (http or https, no query or credentials); no trailing slash."""
    example = "https://download.docker.com/linux"
    text = pattern(_URL, "an http(s) URL", example)(value)
    try:
        parsed = urlsplit(text)
        port_ok = bool(parsed.hostname) and parsed.port != 0
    except ValueError:  # a port that is not a number, or above 65535
        port_ok = False
    if not port_ok:
        raise Invalid("is not an http(s) URL with a host and a valid port", f"use something like {example}")
    return text.rstrip("/")


def fingerprint(value: Any) -> str:
    """An OpenPGP v4 key fingerprint, as 40 upper-case hex digits."""
    example = "9DC858229FC7DD38854AE2D88D81803C0EBFCD88"
    text = _string(value, "a key fingerprint", example)
    if not _FINGERPRINT.fullmatch(text):
        raise Invalid("is not an OpenPGP key fingerprint (40 hex digits)",
                      f"use the fpr gpg --show-keys --with-colons prints, e.g. {example}")
    return text.replace(" ", "").upper()


def origin(value: Any) -> str:
    """A browser origin: scheme, host and optional port, nothing else (CORS compares exactly)."""
    text = _string(value, "an http(s) origin", "http://backstage.example:3000")
    if not _ORIGIN.fullmatch(text):
        raise Invalid("is not an origin (scheme://host[:port], no path, no trailing slash)",
                      "use something like https://backstage.example.com")
    parsed = urlsplit(text)
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise Invalid("has a port outside 1 to 65535", "use something like https://backstage.example.com:7007")
    return text


def ip_address(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid("is not an IP address", "use 0.0.0.0 (all interfaces) or 127.0.0.1 (quote it on the command line)")
    if "%" in value:  # an IPv6 zone: ipaddress accepts any text after it; compose would not
        raise Invalid("has an IPv6 zone (%...), which a published port cannot use", "use 0.0.0.0, :: or an address without a zone")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise Invalid("is not an IP address", "use 0.0.0.0 (all interfaces) or 127.0.0.1") from None


def own_directory(value: Any) -> str:
    """An absolute path that is backchat's own, never a system or shared directory."""
    text = _path(value)
    # PurePosixPath keeps a leading "//", which the kernel reads as "/".
    normal = "/" + str(PurePosixPath(text)).lstrip("/")
    if normal in _SHARED_DIRECTORIES or PurePosixPath(normal).parent == PurePosixPath("/home"):
        raise Invalid(f"is a shared directory ({normal}), not one of backchat's own",
                      f"use a directory of its own, e.g. {normal.rstrip('/')}/backchat")
    for tree in _SYSTEM_TREES:
        if normal == tree or normal.startswith(tree + "/"):
            raise Invalid(f"is inside the system directory {tree}", "use a directory of its own, e.g. /opt/backchat")
    return normal


def users(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value] if value else []
    if not isinstance(value, (list, tuple)) or not all(isinstance(user, str) and _USER.fullmatch(user) for user in value):
        raise Invalid("must be a list of user names", 'use e.g. ["alice", "bob"] or []')
    return tuple(value)


def controller_path(value: Any) -> str:
    """A path on the controller (``~`` allowed), resolved."""
    text = _string(value, "a file path", "~/.config/backchat/api-key")
    if not text or any(ord(char) < 32 for char in text):
        raise Invalid("is not a file path", "use something like ~/.config/backchat/api-key")
    try:
        return str(Path(text).expanduser().resolve())
    except (RuntimeError, OSError, ValueError):  # ~nosuchuser, too long, a loop of links, a lone surrogate
        raise Invalid("cannot be used as a path here (an unknown ~user, a name too long, or a loop of links)",
                      "use something like ~/.config/backchat/api-key") from None


def _is(test: Callable[[], bool]) -> bool:
    """A filesystem test that treats an unusable path (too long, no access) as "no"."""
    try:
        return test()
    except OSError:
        return False


def is_file(path: str) -> bool:
    """A regular file on the controller (an unusable path is not one)."""
    return _is(Path(path).is_file)


def report_path(value: Any) -> str:
    """Where the JSON report goes on the controller: its directory must exist and be writable now."""
    path = Path(controller_path(value))
    if _is(path.is_dir):
        raise Invalid("is a directory", f"name a file in it, e.g. {path}/backchat-report.json")
    if not _is(path.parent.is_dir):
        raise Invalid(f"is in a directory that does not exist ({path.parent})", "create it, or choose another path")
    if not os.access(path.parent, os.W_OK):
        raise Invalid(f"is in a directory you cannot write ({path.parent})", "choose another path")
    return str(path)


def image_archives(value: Any) -> tuple[str, ...]:
    """``docker save`` tarballs on the controller: they must exist now and hold tagged images."""
    if isinstance(value, str):
        value = [value] if value else []
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise Invalid("must be a list of file paths", 'use e.g. ["images/localai.tar"] or []')
    missing = [item for item in value if not _is(Path(item).is_file)]
    if missing:
        raise Invalid(f"lists files that do not exist here: {missing}", "save them with docker save, or fix the paths")
    for item in value:
        try:
            if not images.archive_tags(item):
                raise Invalid(f"holds no tagged image: {item}", "docker save the images by name:tag")
        except (tarfile.TarError, KeyError, ValueError, OSError):
            raise Invalid(f"is not a docker save archive: {item}", "make it with docker save -o FILE IMAGE:TAG") from None
    return tuple(str(Path(item).resolve()) for item in value)


def backend_archive(value: Any) -> str:
    """A LocalAI backend tarball on the controller: it must exist now and unpack safely."""
    path = controller_path(value)
    if not is_file(path):
        raise Invalid("is not a file on the controller", "point it at the backend's tarball (README: air-gapped labs)")
    problem = images.backend_archive_problem(path)
    if problem:
        raise Invalid(problem, "make it from LocalAI's llama-cpp backend as the README's air-gapped section shows")
    return path
