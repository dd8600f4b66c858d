"""Our files under our own directories: removing them without following a link.

``facts.OwnPaths`` says what each path is (file, empty directory, link, under a link);
``remove_own`` removes the files and the directories left empty, and names and leaves
alone whatever is a link or under one. Used by uninstall.py and after a model change.
"""

from __future__ import annotations

from typing import Callable

from pyinfra import host
from pyinfra.context import state as current_state
from pyinfra.api import QuoteString, StringCommand, operation

from backchat.facts import OWN_PATHS_SCRIPT, OwnPaths


def removals(found: dict[str, str], paths: list[str]) -> bool:
    """Whether removing ``paths`` (as ``OwnPaths`` found them) would change anything."""
    return any(found.get(path) in ("file", "socket", "emptydir") for path in paths)


@operation(is_idempotent=False)
def remove_own(root: str, paths: list[str], unless: Callable[[], str | None] | None = None):
    """
    Remove the files among ``paths`` under our directory ``root``, then the directories
    among them that are left empty; never through a symlink.

    + root: one of backchat's directories (stack_dir, models_dir, backstage_app_dir)
    + paths: relative to root, files first, directories deepest first ("." is root)
    + unless: asked while executing; a reason it returns keeps everything (said as a no-op)
    """
    why = unless() if unless and current_state.is_executing else None
    if why:
        host.noop(f"kept: {why}")
        return
    found = host.get_fact(OwnPaths, root=root, paths=paths)
    left = [f"{root}/{path} ({kind})" for path, kind in found.items() if kind in ("link", "unsafe", "other")]
    if left:
        host.log_styled(f"left alone, not followed: {', '.join(left)}", fg="yellow")
    if not removals(found, paths):
        host.noop(f"nothing of ours left to remove in {root}")
        return
    yield StringCommand(
        "sh", "-c", QuoteString(OWN_PATHS_SCRIPT), "own-paths", "remove", QuoteString(root),
        *(QuoteString(path) for path in paths),
    )
