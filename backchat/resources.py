"""Files shipped inside the package: the templates and the model fetcher.

They live in the repository's top-level ``templates/`` (pyproject maps that directory
into the wheel as ``backchat/templates``) and are read with ``importlib.resources``, so
the deploy works from a wheel installed anywhere, not only from this checkout.
"""

from __future__ import annotations

import atexit
from contextlib import ExitStack
from importlib import resources

import jinja2

_files = resources.files("backchat.templates")
_extracted = ExitStack()
atexit.register(_extracted.close)


def text(name: str) -> str:
    """A shipped file's text."""
    return (_files / name).read_text(encoding="utf-8")


def path(name: str) -> str:
    """A real filesystem path to a shipped file (for pyinfra's uploads)."""
    return str(_extracted.enter_context(resources.as_file(_files / name)))


_jinja = jinja2.Environment(
    loader=jinja2.FunctionLoader(text),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


def render(name: str, **values) -> str:
    """A shipped Jinja template, rendered on the controller (missing values are errors)."""
    return _jinja.get_template(name).render(**values)
