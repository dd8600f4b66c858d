"""The two secrets (the API key, the Hub token): where they come from, and how they reach hosts.

Neither ever enters pyinfra's host data, so ``--debug``, ``debug-inventory`` and the
operation arguments pyinfra logs cannot show them: they are read on the controller when a
host's settings are built, and carried as ``Secret`` objects whose ``repr`` and ``str``
are redacted. Files holding them are written by ``secret_file``, which compares hashes and
never shows a content diff (``--diff`` would print ``files.put``'s old and new lines).

The API key: ``$BACKCHAT_API_KEY`` if set, else the ``api_key_file`` setting's file, else
``~/.config/backchat/api-key``, generated once (0600) and reused on every run, so a fleet
shares one key. ``auth = False`` turns it off explicitly.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import secrets as random
from pathlib import Path

from pyinfra import host
from pyinfra.api import operation

from backchat import own_files

DEFAULT_KEY_FILE = "~/.config/backchat/api-key"
# Keys end up in .env and in an argument list the Text Gen WebUI image word-splits: no quoting.
_KEY = re.compile(r"[A-Za-z0-9._~+/=-]{16,256}")
REDACTED = "<secret>"


class Secret:
    """A secret value: printing, logging or formatting it shows ``<secret>``."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return REDACTED

    __str__ = __repr__

    def __eq__(self, other) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class SecretError(ValueError):
    """A secret is unusable; the message never contains it."""


def check_key(value: str, where: str) -> Secret:
    value = value.strip()  # a trailing newline from `echo > file` is not part of the key
    if not _KEY.fullmatch(value):
        raise SecretError(
            f"the API key in {where} must be 16 to 256 letters, digits or ._~+/=- "
            "(its value is not shown). Fix: generate one with: openssl rand -hex 24"
        )
    return Secret(value)


def api_key(auth: bool, key_file: str | None) -> Secret | None:
    """The fleet's API key (see the module doc), or None with ``auth = False``."""
    if not auth:
        return None
    if os.environ.get("BACKCHAT_API_KEY"):
        return check_key(os.environ["BACKCHAT_API_KEY"], "$BACKCHAT_API_KEY")
    path = Path(key_file or DEFAULT_KEY_FILE).expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # O_EXCL + O_NOFOLLOW: never write through a link, never race another run.
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            return _read_key(path)
        with os.fdopen(descriptor, "w") as out:
            out.write(random.token_urlsafe(32) + "\n")
    return _read_key(path)


def _read_key(path: Path) -> Secret:
    if path.is_symlink() or not path.is_file():
        raise SecretError(f"{path} is not a regular file. Fix: point api_key_file at the key file")
    if path.stat().st_mode & 0o077:
        raise SecretError(f"{path} can be read by others. Fix: chmod 600 {path}")
    return check_key(path.read_text(), str(path))


def hf_token() -> Secret | None:
    """The Hugging Face token for gated repos, from ``$HF_TOKEN`` on the controller."""
    value = os.environ.get("HF_TOKEN", "").strip()
    return Secret(value) if value else None


def reveal(lines) -> str:
    """The text of lines mixing plain strings and ``Secret`` items (only to write it)."""
    return "".join(item.reveal() if isinstance(item, Secret) else item for item in lines)


def fingerprint(secret: Secret | None) -> str:
    """A short, non-reversible tag of a secret: lets a report say "the key changed"."""
    if secret is None:
        return "none"
    return hashlib.sha256(secret.reveal().encode()).hexdigest()[:8]


# secret_file's ``seen`` when the caller has not read the file's state.
UNREAD = "unread"


def _bytes_of(lines: tuple) -> bytes:
    return reveal(lines).encode()


@operation()
def secret_file(dest: str, lines: tuple, mode: str = "0600", seen: dict | None | str = UNREAD):
    """
    Write a file holding secrets: created 0600 from the start, compared by hash, no diff shown.

    + dest: the file on the host (its directory must exist)
    + lines: the file's lines; ``Secret`` items are revealed only when writing
    + mode: the file's mode
    + seen: ``dest``'s entry of ``own_files.read()`` when the step read it (None: nothing there)
    """
    if seen == UNREAD:
        seen = own_files.read([dest]).get(dest)
    if own_files.is_current(seen, hashlib.sha256(_bytes_of(lines)).hexdigest(), mode):
        host.noop(f"{dest} is up to date")
        return
    host.log(f"Will write {dest} (it holds a secret: no diff is shown)")
    # The lines travel with their Secret items still wrapped: pyinfra may print the
    # command's arguments (-vv, --debug), which then show <secret>.
    yield own_files.write_command(dest, functools.partial(_bytes_of, tuple(lines)), mode)
