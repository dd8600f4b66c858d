"""Step 1: Docker Engine and the compose v2 plugin, from Docker's repo or the distribution's."""

from __future__ import annotations

from pyinfra import host
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import apt, files, server, systemd

KEYRING = "/etc/apt/keyrings/docker.asc"
BASE_PACKAGES = ["ca-certificates", "curl"]
DOCKER_CE_PACKAGES = [
    "docker-ce",
    "docker-ce-cli",
    "containerd.io",
    "docker-buildx-plugin",
    "docker-compose-plugin",
]
# The distribution's names for the same engine + compose v2. Debian 13 packages compose
# v2 as docker-compose (it installs the CLI plugin) and the CLI as docker-cli, a mere
# Recommends of docker.io; Ubuntu 22.04/24.04 ship the CLI in docker.io and call compose
# v2 docker-compose-v2.
DISTRIBUTION_PACKAGES = {
    "debian": ["docker.io", "docker-cli", "docker-compose"],
    "ubuntu": ["docker.io", "docker-compose-v2"],
}
# Installed by other recipes and in the way of docker-ce (same files, other versions).
CONFLICTING_PACKAGES = ["docker.io", "docker-doc", "docker-compose", "podman-docker", "containerd", "runc"]


def packages_for(source: str, os_id: str) -> list[str]:
    return DOCKER_CE_PACKAGES if source == "docker" else DISTRIBUTION_PACKAGES[os_id]


def install(cfg, os_info: dict) -> None:
    """Docker Engine + compose v2, enabled at boot when the host runs services."""
    wanted = packages_for(cfg.docker_source, os_info["id"])
    installed = host.get_fact(DebPackages)
    sources_changed = False

    # curl fetches Docker's key and, in step 2, the model (with resume). apt-get update only
    # when something is missing: a fresh image has empty lists, a re-run must change nothing.
    if any(name not in installed for name in [*BASE_PACKAGES, *wanted]):
        apt.update(name="Update apt lists")
    apt.packages(name="Install curl and CA certificates", packages=BASE_PACKAGES)
    if cfg.docker_source == "docker":
        apt.packages(
            name="Remove packages that conflict with Docker's",
            packages=[name for name in CONFLICTING_PACKAGES if name in installed],
            present=False,
        )
        files.directory(name="Create the apt keyrings directory", path="/etc/apt/keyrings", mode="0755")
        key = files.download(
            name="Fetch Docker's apt signing key",
            src=f"https://download.docker.com/linux/{os_info['id']}/gpg",
            dest=KEYRING,
            mode="0644",
        )
        source = apt.sources_file(
            name="Add Docker's apt repository",
            filename="docker",
            uris=f"https://download.docker.com/linux/{os_info['id']}",
            suites=os_info["codename"],
            components="stable",
            architectures=os_info["arch"],
            signed_by=KEYRING,
        )
        sources_changed = key.will_change or source.will_change

    if sources_changed:
        apt.update(name="Update apt lists with Docker's repository")
    apt.packages(name="Install Docker Engine and compose v2", packages=wanted, no_recommends=True)

    for user in cfg.docker_users:
        server.user(name=f"Let {user} use docker", user=user, groups=["docker"], append=True)

    if cfg.start:
        systemd.service(name="Run Docker now and at boot", service="docker", running=True, enabled=True)
