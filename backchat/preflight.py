"""Before step 1: refuse, one host at a time, the hosts this deploy cannot serve.

A refusal is an operation that fails on its host only, so a fleet run carries on with the
other hosts and the final report names each refused host and why.
"""

from __future__ import annotations

from pyinfra import host, logger
from pyinfra.api import FunctionCommand, operation

from backchat import report
from backchat.facts import FreeDiskBytes, InitSystem, MemTotalMb, OsRelease
from backchat.settings import Settings

SUPPORTED = {("debian", "12"), ("debian", "13"), ("ubuntu", "22.04"), ("ubuntu", "24.04")}
ARCHITECTURES = {"amd64", "arm64"}


def problems(cfg: Settings, os_info: dict, memory_mb: int | None, init: str = "systemd") -> list[str]:
    """Why this host cannot take the deploy, in words a user can act on (empty: it can)."""
    found = []
    release = (os_info["id"], os_info["version_id"])
    if release not in SUPPORTED:
        names = ", ".join(f"{name.title()} {version}" for name, version in sorted(SUPPORTED))
        found.append(
            f"{os_info['pretty_name'] or 'this OS'} is not supported (supported: {names})"
        )
    if os_info["arch"] not in ARCHITECTURES:
        found.append(f"CPU architecture {os_info['arch']} is not supported (amd64, arm64)")
    if cfg.docker_source == "debian" and release == ("debian", "12"):
        found.append(
            "docker_source = 'debian' on Debian 12: bookworm packages only compose v1 "
            "(docker-compose 1.29), and backchat needs compose v2. Fix: use "
            "docker_source = 'docker' (Docker's apt repo) or Debian 13"
        )
    if memory_mb is not None and memory_mb < cfg.min_memory_mb:
        found.append(
            f"{memory_mb} MB of RAM is less than the {cfg.min_memory_mb} MB the model needs "
            "(min_memory_mb). Fix: a bigger host, or a smaller model_file and min_memory_mb"
        )
    if cfg.start and init != "systemd":
        found.append(
            f"start = True, but this host's init is {init or 'unknown'!r}, not systemd, so "
            "Docker cannot run as a service. Fix: boot it with systemd, or set start = False "
            "to install and write everything without starting it"
        )
    return found


def check(cfg: Settings) -> dict | None:
    """Read the host's OS and RAM; queue a refusal and return None when it cannot be served."""
    os_info = host.get_fact(OsRelease)
    found = problems(cfg, os_info, host.get_fact(MemTotalMb), host.get_fact(InitSystem))
    if found:
        refuse_host("; ".join(found))
        return None
    return os_info


def refuse_host(reason: str) -> None:
    """Say why now (the plan shows it) and fail the host when the run executes."""
    host.log_styled(f"Will refuse: {reason}", fg="red", log_func=logger.warning)
    refuse(name="Refuse this host", reason=reason)


def disk_problem(cfg: Settings, needed_bytes: int) -> str | None:
    free = host.get_fact(FreeDiskBytes, path=cfg.models_dir)
    if free is not None and free < needed_bytes:
        return (
            f"not enough disk for the model in {cfg.models_dir}: {free:,} bytes free, "
            f"{needed_bytes:,} needed. Fix: free space, or set models_dir to a larger disk"
        )
    return None


def _fail(state, host, reason: str) -> bool:
    host.log_styled(f"Refused: {reason}", fg="red", log_func=logger.error)
    report.record(host.name, failure=reason)
    return False


@operation(is_idempotent=False)
def refuse(reason: str):
    """
    Fail this host (and only this host) with ``reason``.

    + reason: what is wrong and how to fix it
    """
    yield FunctionCommand(_fail, (reason,), {})
