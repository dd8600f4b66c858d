"""httpx, imported so that it works inside pyinfra's process.

pyinfra runs under gevent, which removes ``select.epoll``; httpcore imports trio whenever it
is installed, and trio's import then raises AttributeError, which httpcore does not catch.
A None entry makes ``import trio`` a plain ImportError, which it does. Import httpx from
here (``from backchat.http import httpx``), never directly.
"""

import sys

sys.modules.setdefault("trio", None)

import httpx  # noqa: E402

__all__ = ["httpx"]
