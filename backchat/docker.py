"""Step 1: Docker Engine and the compose v2 plugin, from Docker's repo or the distribution's.

Docker's repo (or a mirror with its layout, ``docker_repo_url``) is trusted only through
its pinned signing key: the controller fetches ``<url>/<debian|ubuntu>/gpg`` once per run
and checks that it holds exactly one primary key, ``docker_repo_key_fingerprint``. Any
other key refuses the host while planning, so nothing is installed there (no keyring, no
source, no package). The bytes checked are the bytes pushed to the host's keyring.
"""

from __future__ import annotations

import threading

from pyinfra import host
from pyinfra.facts.systemd import SystemdEnabled, SystemdStatus
from pyinfra.operations import apt, server, systemd

from backchat import openpgp, outcomes, own_files
from backchat.facts import InstalledPackages

KEYRINGS_DIR = "/etc/apt/keyrings"
KEYRING = f"{KEYRINGS_DIR}/docker.asc"
SOURCE_FILE = "docker"
SOURCE_PATH = f"/etc/apt/sources.list.d/{SOURCE_FILE}.sources"
SERVICE = "docker.service"
# The arguments pyinfra's systemd.service gives these facts, so that both read the same.
_SERVICE_FACTS = [(fact, {"user_mode": False, "machine": None, "user_name": None, "services": [SERVICE]})
                  for fact in (SystemdStatus, SystemdEnabled)]
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
# Every name install() asks dpkg about, whatever the source and the distribution: one
# question, read with the other steps' facts before the host's OS is known.
_PACKAGES_ASKED = {"names": sorted({*BASE_PACKAGES, *DOCKER_CE_PACKAGES, *CONFLICTING_PACKAGES,
                                    *(name for names in DISTRIBUTION_PACKAGES.values() for name in names)})}


def packages_for(source: str, os_id: str) -> list[str]:
    return DOCKER_CE_PACKAGES if source == "docker" else DISTRIBUTION_PACKAGES[os_id]


def missing(installed: dict, names: list[str]) -> list[str]:
    """The packages of ``names`` this host does not have installed."""
    return [name for name in names if name not in installed]


def conflicting(installed: dict) -> list[str]:
    """The conflicting packages this host really has installed (none: nothing to remove)."""
    return [name for name in CONFLICTING_PACKAGES if name in installed]


class KeyProblem(Exception):
    """The repo's signing key cannot be trusted or fetched: what, where, and the fix."""


def key_problem(text: str, url: str, expected: str) -> str | None:
    """Why the key served at ``url`` is not the pinned one, or None when it is."""
    fix = (
        "Fix: if docker_repo_url is a mirror that signs with its own key, set "
        "docker_repo_key_fingerprint to that key's fingerprint; otherwise find out what serves this URL"
    )
    try:
        found = openpgp.primary_fingerprints(text)
    except openpgp.NotAKey as why:
        return f"the signing key at {url} is unusable: {why}. Nothing was installed. {fix}"
    if found != [expected]:
        return (
            f"the signing key at {url} has fingerprint {', '.join(found)}, but "
            f"docker_repo_key_fingerprint expects {expected}. Nothing was installed. {fix}"
        )
    return None


# pyinfra plans each host in its own greenlet: the lock makes a fleet fetch each key once.
_key_lock = threading.Lock()
_keys: dict[str, str | KeyProblem] = {}


def fetch_key(url: str) -> str:
    """The key at ``url``, fetched by the controller once per run (httpx, redirects followed)."""
    with _key_lock:
        if url not in _keys:
            from backchat.http import httpx  # imported late: see backchat/http.py

            try:
                answer = httpx.get(url, follow_redirects=True, timeout=30.0)
                answer.raise_for_status()
                # Armor is ASCII: anything else fails the fingerprint check as "not one block".
                _keys[url] = answer.content.decode("ascii", errors="replace")
            except httpx.HTTPError as error:
                _keys[url] = KeyProblem(
                    f"could not fetch the apt signing key {url} from the controller: {error}. Nothing "
                    "was installed. Fix: make docker_repo_url reachable from the controller (it "
                    "checks the key before any host trusts it), or use docker_source = 'debian' (not on Debian 12)"
                )
    found = _keys[url]
    if isinstance(found, KeyProblem):
        raise found
    return found


def trusted_key(cfg, os_id: str) -> str:
    """The repo's armored key, checked against the pin; raises KeyProblem otherwise."""
    url = f"{cfg.docker_repo_url}/{os_id}/gpg"
    text = fetch_key(url)
    problem = key_problem(text, url, cfg.docker_repo_key_fingerprint)
    if problem:
        raise KeyProblem(problem)
    return text


def reads(cfg) -> list[tuple[type, dict]]:
    """The facts ``install`` reads whatever it finds (``transport.read_ahead``)."""
    return ([(InstalledPackages, _PACKAGES_ASKED)] + ([own_files.reading(_repo_paths())] if cfg.docker_source == "docker" else [])
            + (_SERVICE_FACTS if cfg.start else []))


def _repo_paths() -> list[str]:
    return [KEYRINGS_DIR, KEYRING, SOURCE_PATH]


def source_fields(cfg, os_info: dict) -> dict[str, str]:
    """Docker's repository, as ``apt.sources_file`` takes it."""
    return {"uris": f"{cfg.docker_repo_url}/{os_info['id']}", "suites": os_info["codename"],
            "components": "stable", "architectures": os_info["arch"], "signed_by": KEYRING}


def source_text(fields: dict[str, str]) -> str:
    """``fields`` as deb822, byte for byte what pyinfra's ``apt.sources_file`` writes."""
    return (f"Types: deb\nURIs: {fields['uris']}\nSuites: {fields['suites']}\nComponents: {fields['components']}\n"
            f"Architectures: {fields['architectures']}\nSigned-By: {fields['signed_by']}\n")


def install(cfg, os_info: dict) -> bool:
    """Docker Engine + compose v2, enabled at boot when the host runs services.

    False: the host was refused (its repo key is not the pinned one); nothing is queued.
    """
    key = None
    if cfg.docker_source == "docker":
        try:
            key = trusted_key(cfg, os_info["id"])
        except KeyProblem as problem:
            outcomes.refuse_host(str(problem))
            return False
    wanted = packages_for(cfg.docker_source, os_info["id"])
    # Read once, for the names above only: the apt operations below are queued only for
    # what is missing or in the way (they read dpkg's whole list then, not on a re-run).
    installed = host.get_fact(InstalledPackages, **_PACKAGES_ASKED)
    sources_changed = False

    # curl fetches the model in step 2 (with resume). apt-get update only
    # when something is missing: a fresh image has empty lists, a re-run must change nothing.
    if missing(installed, [*BASE_PACKAGES, *wanted]):
        apt.update(name="Update apt lists")
    if missing(installed, BASE_PACKAGES):
        apt.packages(name="Install curl and CA certificates", packages=BASE_PACKAGES)
    if key is not None:
        if conflicting(installed):
            apt.packages(
                name="Remove packages that conflict with Docker's",
                packages=conflicting(installed),
                present=False,
            )
        # Read with the other steps' files in one command; pyinfra's files.put and
        # apt.sources_file would read five facts, twice under -y, on every re-run.
        seen = own_files.read(_repo_paths())
        own_files.directory(name="Create the apt keyrings directory", path=KEYRINGS_DIR, seen=seen.get(KEYRINGS_DIR),
                            mode="0755")
        keyring = own_files.file(
            name="Install Docker's apt signing key (fingerprint checked)",
            dest=KEYRING, content=key, seen=seen.get(KEYRING), mode="0644", user="root", group="root",
        )
        fields = source_fields(cfg, os_info)
        if own_files.is_current(seen.get(SOURCE_PATH), own_files.digest(source_text(fields)), "0644"):
            source = None
            host.noop(f"{SOURCE_PATH} is up to date")
        else:  # apt.sources_file also finds the same repository configured in another file
            source = apt.sources_file(name="Add Docker's apt repository", filename=SOURCE_FILE, **fields)
        sources_changed = keyring.will_change or (source is not None and source.will_change)

    if sources_changed:
        apt.update(name="Update apt lists with Docker's repository")
    if missing(installed, wanted):
        apt.packages(name="Install Docker Engine and compose v2", packages=wanted, no_recommends=True)
    else:
        host.noop(f"{', '.join(wanted)} installed")

    for user in cfg.docker_users:
        server.user(name=f"Let {user} use docker", user=user, groups=["docker"], append=True)

    if cfg.start:
        # Read with the other steps' files: systemd.service would read both again while executing.
        running, enabled = (host.get_fact(fact, **kwargs).get(SERVICE) for fact, kwargs in _SERVICE_FACTS)
        if running and enabled:
            host.noop("Docker runs and starts at boot")
        else:
            systemd.service(name="Run Docker now and at boot", service=SERVICE, running=True, enabled=True)
    return True
