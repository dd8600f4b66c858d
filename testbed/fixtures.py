"""pytest plugin: real Debian sandbox hosts (see testbed/sandbox.py).

Enable with ``pytest_plugins = ["testbed.fixtures"]`` in tests/conftest.py.

Tests that need real hosts are marked ``realhost`` or use ``sandbox_factory``. Where the
machine cannot provide hosts they skip, except when BACKCHAT_REQUIRE_REALHOSTS=1 (CI):
then they fail, because a test that quietly skips in CI proves nothing.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from testbed.sandbox import SandboxHost, sandbox_hosts

REQUIRED_TOOLS = ("debootstrap", "ip", "mount", "chroot", "unshare", "ssh-keygen")


def realhost_unavailable_reason() -> str | None:
    """Why this machine cannot run sandbox hosts, or None if it can."""
    if os.geteuid() != 0:
        return "sandbox hosts need root (mounts, network namespaces, chroot)"
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"sandbox hosts need {', '.join(missing)} on PATH (packages debootstrap, iproute2)"
    return None


def unavailable(reason: str) -> None:
    """Skip, or fail when BACKCHAT_REQUIRE_REALHOSTS=1 (CI): a quiet skip there proves nothing."""
    if os.environ.get("BACKCHAT_REQUIRE_REALHOSTS") == "1":
        pytest.fail(f"BACKCHAT_REQUIRE_REALHOSTS=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def require_realhosts() -> None:
    """Skip (or, when BACKCHAT_REQUIRE_REALHOSTS=1, fail) if hosts cannot be made here."""
    reason = realhost_unavailable_reason()
    if reason is not None:
        unavailable(reason)


def log_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """Where a long end-to-end test keeps its logs: a new ``name-<time>`` directory under
    BACKCHAT_VM_LOG_DIR when set (other pytest sessions rotate pytest's tmp dirs), else a
    pytest tmp dir."""
    root = os.environ.get("BACKCHAT_VM_LOG_DIR")
    if not root:
        return tmp_path_factory.mktemp(name)
    path = Path(root) / time.strftime(f"{name}-%Y%m%d-%H%M%S")
    path.mkdir(parents=True)
    return path


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "realhost: needs real Debian sandbox hosts (root, debootstrap, iproute2); skipped "
        "where unavailable unless BACKCHAT_REQUIRE_REALHOSTS=1",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The test bed checks itself first, on a fresh network, before anything relies on it.
    items.sort(key=lambda item: 0 if item.nodeid.startswith("tests/testbed/") else 1)
    # npm and Chromium are not Python: `-m "not realhost"` leaves those tests out too.
    for item in items:
        if item.get_closest_marker("npm") or item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.realhost)
    # A skip, not a deselection by -m: `pytest -m realhost` must not bring them back.
    if os.environ.get("BACKCHAT_RUN_SLOW") != "1":
        slow = pytest.mark.skip(reason="slow (figures in its module's docstring): BACKCHAT_RUN_SLOW=1 runs it")
        for item in items:
            if item.get_closest_marker("slow"):
                item.add_marker(slow)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("realhost") is not None:
        require_realhosts()


SandboxFactory = Callable[..., list[SandboxHost]]


@pytest.fixture(scope="session")
def sandbox_factory() -> Iterator[SandboxFactory]:
    """``sandbox_factory(["bookworm", "trixie"], names=None) -> [SandboxHost, ...]``.

    Hosts live until the end of the session (creating one takes well under a second once
    the roots are cached, but a session fixture lets tests share slow-to-provision hosts).
    Tests that need a pristine host should call the factory themselves or use
    ``sandbox.sandbox_hosts`` directly.
    """
    require_realhosts()
    with ExitStack() as stack:

        def factory(suites: list[str], names: list[str] | None = None) -> list[SandboxHost]:
            return stack.enter_context(sandbox_hosts(suites, names))

        yield factory
