"""backchat: a private AI workstation for Backstage's Backchat plugin, as a pyinfra deploy.

    from backchat import deploy_backchat
    from backchat import rollback_backchat, status_backchat, uninstall_backchat  # day two

Imported lazily, so ``python -m backchat.hub`` (a child process of the deploy) does not
load pyinfra.
"""

import importlib
import sys

__all__ = ["deploy_backchat", "rollback_backchat", "status_backchat", "uninstall_backchat"]

_ENTRY_POINTS = {
    "deploy_backchat": "backchat.deploy",
    "rollback_backchat": "backchat.rollback",
    "status_backchat": "backchat.status",
    "uninstall_backchat": "backchat.uninstall",
}


def __getattr__(name: str):
    if name in _ENTRY_POINTS:
        return getattr(_import_with_bytecode(_ENTRY_POINTS[name]), name)
    raise AttributeError(f"module 'backchat' has no attribute {name!r}")


def _import_with_bytecode(module: str):
    """Import ``module`` (and the backchat modules it imports) keeping their compiled
    bytecode in ``__pycache__``, as Python does for any import.

    pyinfra's CLI (3.x, ``pyinfra_cli/main.py``, ``main``) sets ``sys.dont_write_bytecode``
    for the whole process, to keep ``deploy.pyc`` and the like out of a project. A checkout
    of backchat run that way compiled every one of its modules from source on every run:
    about 0.1 s of the controller's CPU. Bytecode writing is back on for this import only,
    unless the user asked for none (``python -B``, ``PYTHONDONTWRITEBYTECODE``).
    """
    if sys.flags.dont_write_bytecode or not sys.dont_write_bytecode:
        return importlib.import_module(module)
    sys.dont_write_bytecode = False
    try:
        return importlib.import_module(module)
    finally:
        sys.dont_write_bytecode = True
