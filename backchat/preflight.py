"""Before step 1: refuse, one host at a time, the hosts this deploy cannot serve.

A refusal is an operation that fails on its host only, so a fleet run carries on with the
other hosts and the final report names each refused host and why.
"""

from __future__ import annotations

from pyinfra import host

from backchat import outcomes
from backchat.facts import InitSystem, MemTotalMb, OsRelease

SUPPORTED = {("debian", "12"), ("debian", "13"), ("ubuntu", "22.04"), ("ubuntu", "24.04")}
ARCHITECTURES = {"amd64", "arm64"}


def problems(cfg, os_info: dict, memory_mb: int | None, init: str = "systemd") -> list[str]:
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


def check(cfg) -> dict | None:
    """Read the host's OS and RAM; queue a refusal and return None when it cannot be served."""
    os_info = host.get_fact(OsRelease)
    found = problems(cfg, os_info, host.get_fact(MemTotalMb), host.get_fact(InitSystem))
    if found:
        outcomes.refuse_host("; ".join(found))
        return None
    return os_info
