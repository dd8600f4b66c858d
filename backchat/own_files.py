"""The files and directories the steps write: read in one command, changed only where they differ.

pyinfra's ``files.put`` and ``files.directory`` each read their own facts (``File``, the
parent's ``Directory``, ``Sha1File``): three commands per file on every run, run again
while executing when ``-y`` skipped them while planning. A step here reads the state of
all its paths at once (``facts.PathStates``: kind, mode, owner and sha256, no link
followed) and hands each path's entry to the operations below, which decide from it and
read nothing more. A re-run that changes nothing costs the step one command.

Writing never follows a link planted at a file's name: the bytes go through stdin into a
new file beside it (created 0600), which gets its mode and owner and then replaces the
name (``mv``). The same writer serves ``secrets.secret_file``, whose contents are never
shown or logged.
"""

from __future__ import annotations

import hashlib
from typing import Callable

from pyinfra import host, logger, state
from pyinfra.api import FunctionCommand, QuoteString, StringCommand, operation
from pyinfra.facts.files import FileContents
from pyinfra.operations.util.files import generate_color_diff

from backchat import outcomes, transport
from backchat.facts import PathStates

# The bytes arrive on stdin; "$1.new" is removed first, so a link planted there is replaced too.
_WRITE = (
    'umask 077 && rm -f "$1.new" && cat >"$1.new" && chmod "$2" "$1.new" '
    '&& { [ -z "$3" ] || chown "$3" "$1.new"; } && mv -f "$1.new" "$1"'
)


def read(paths, texts=()) -> dict[str, dict]:
    """The state of ``paths`` on the current host, in one command (see ``facts.PathStates``);
    the files in ``texts`` come with their text."""
    fact, arguments = reading(paths, texts)
    return host.get_fact(fact, **arguments)


def reading(paths, texts=()) -> tuple[type, dict]:
    """The fact ``read`` reads (for a step's ``reads``: ``transport.read_ahead``)."""
    return PathStates, {"paths": sorted(set(paths) | set(texts)), "texts": sorted(set(texts))}


def digest(data: str) -> str:
    return hashlib.sha256(data.encode()).hexdigest()


def _mode_differs(seen: dict, mode: str | None) -> bool:
    return mode is not None and (seen.get("mode") is None or int(seen["mode"], 8) != int(mode, 8))


def _owner(user: str | None, group: str | None) -> str:
    return f"{user or ''}{':' + group if group else ''}"


def _owner_differs(seen: dict, user: str | None, group: str | None) -> bool:
    return bool((user and seen.get("user") != user) or (group and seen.get("group") != group))


def is_current(seen: dict | None, data_sha256: str, mode: str | None = None, user=None, group=None) -> bool:
    """The file as read already holds these bytes, with this mode and owner."""
    return bool(
        seen
        and seen["kind"] == "file"
        and seen.get("sha256") == data_sha256
        and not _mode_differs(seen, mode)
        and not _owner_differs(seen, user, group)
    )


def write_command(dest: str, data: Callable[[], bytes], mode: str, user=None, group=None) -> FunctionCommand:
    """The command that writes ``data()`` to ``dest`` (mode, owner), never through a link.
    ``data`` is called only when the command runs, so what it returns is never an
    operation argument that pyinfra could print."""
    return FunctionCommand(_write, (dest, data, mode, _owner(user, group)), {})


def _write(state, host, dest: str, data: Callable[[], bytes], mode: str, owner: str) -> bool:
    command = StringCommand("sh", "-c", QuoteString(_WRITE), "write", QuoteString(dest), mode, QuoteString(owner))
    try:
        transport.run_with_stdin(state, host, command, lambda _line: [data()])
    except transport.TransportError as error:
        return outcomes.fail(host, f"could not write {dest}: {error}")
    return True


@operation()
def file(dest: str, content: str, seen: dict | None, mode: str = "0644", user: str | None = None,
         group: str | None = None):
    """
    Write ``content`` to ``dest`` unless it is there already; fix a mode or owner that differs.

    + dest: the file on the host (its directory exists, or an earlier operation makes it)
    + content: the file's text
    + seen: ``dest``'s entry of ``read()`` (None: there is nothing at ``dest``)
    + mode: the file's mode
    + user: its owner (None: whoever writes it)
    + group: its group (None: the writer's)
    """
    if seen and seen["kind"] == "file" and seen.get("sha256") == digest(content):
        if _mode_differs(seen, mode):
            yield StringCommand("chmod", mode, QuoteString(dest))
        if _owner_differs(seen, user, group):
            yield StringCommand("chown", QuoteString(_owner(user, group)), QuoteString(dest))
        if not (_mode_differs(seen, mode) or _owner_differs(seen, user, group)):
            host.noop(f"{dest} is up to date")
        return
    if state.config.DIFF:
        _show_diff(dest, content, seen)
    yield write_command(dest, content.encode, mode, user, group)


def _show_diff(dest: str, content: str, seen: dict | None) -> None:
    old = host.get_fact(FileContents, path=dest) if seen and seen["kind"] == "file" else None
    host.log(f"Will {'modify' if old is not None else 'create'} {dest}", logger.info)
    for line in generate_color_diff([line + "\n" for line in old or []], content.splitlines(keepends=True)):
        logger.info("  %s", line)


@operation()
def directory(path: str, seen: dict | None, mode: str | None = None):
    """
    Create ``path`` (and its parents) if it is not there. An existing directory keeps its
    mode unless ``mode`` is given; anything else at ``path`` fails this host.

    + path: the directory on the host
    + seen: ``path``'s entry of ``read()`` (None: there is nothing at ``path``)
    + mode: its mode (None: as created, and an existing one is never re-moded)
    """
    if seen is None:
        yield StringCommand("mkdir", "-p", QuoteString(path))
        if mode:
            yield StringCommand("chmod", mode, QuoteString(path))
    elif seen["kind"] != "directory":
        yield outcomes.failing_command(
            f"{path} is a {seen['kind']}, not a directory; backchat never writes through it. "
            "Fix: move it away, or choose another directory in the settings"
        )
    elif _mode_differs(seen, mode):
        yield StringCommand("chmod", mode, QuoteString(path))
    else:
        host.noop(f"{path} exists")
