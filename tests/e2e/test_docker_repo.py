"""``docker_source = "docker"`` applied by the pyinfra CLI to real Debian 12 and 13 roots,
from an apt repository with Docker's layout, without Docker's servers.

Stand-ins for Docker's (testbed/apt_repo.py): the repository is built at test time and
served over HTTP on the sandbox gateway; its packages are Debian's own docker.io,
docker-cli, containerd + runc, docker-buildx and docker-compose v2, rebuilt under Docker's
names (docker-ce, docker-ce-cli, containerd.io, docker-buildx-plugin,
docker-compose-plugin) at Debian's versions; it is signed by a throwaway key made for this
run, whose fingerprint the test pins as ``docker_repo_key_fingerprint`` (Docker's key
``9DC8...CD88`` never signs anything here). Real: apt's repository format and Docker's
layout under ``docker_repo_url`` (``<url>/debian/dists/<codename>/stable``, the key at
``<url>/debian/gpg``), apt verifying ``InRelease`` with the keyring the deploy wrote, dpkg
installing the packages, and the deploy itself, over SSH, with ``start = False`` (no
systemd in these roots). The hosts reach the repository directly, as a LAN mirror; the
controller fetches and checks the key.
"""

from __future__ import annotations

import dataclasses
import re
import shutil

import pytest

from backchat import docker, settings
from testbed.apt_repo import cached_debian_deb, docker_repo
from testbed.deploy_runner import run_deploy, write_inventory
from testbed.sandbox import GATEWAY, cannot_reach_gateway

# The Hub stand-in and the model fixtures of the other real-host deploys (step 2 needs them).
from tests.e2e.test_realhosts import NOOP_COMMANDS_MAX, deploy_data, hub, model_bytes  # noqa: F401  (fixtures)

pytestmark = pytest.mark.realhost

DOCKERS_FINGERPRINT = settings.DEFAULTS["docker_repo_key_fingerprint"]


@pytest.fixture(scope="module")
def fleet(sandbox_factory):
    # The third host stays pristine for the refusal; "fleet" is the name the hub fixture asks for.
    return sandbox_factory(["bookworm", "trixie", "trixie"], names=["dr-bookworm", "dr-trixie", "dr-refused"])


@pytest.fixture(scope="module")
def repo(fleet, tmp_path_factory):
    with docker_repo(fleet, tmp_path_factory.mktemp("docker-repo")) as served:
        yield served


def docker_data(hub, repo, **overrides) -> list[str]:
    ours = {"docker_source": "docker", "docker_repo_url": repo.url, "docker_repo_key_fingerprint": repo.fingerprint}
    return deploy_data(hub, **{**ours, **overrides})


@pytest.fixture(scope="module")
def first_run(fleet, hub, repo, tmp_path_factory):
    bookworm, trixie = fleet[:2]
    # A package in the way of Docker's, really installed (Debian's runc, from the .deb the
    # stand-in repository was built from): the deploy removes it.
    runc = cached_debian_deb("bookworm", "runc")
    shutil.copy(runc, bookworm.root / "tmp" / runc.name)
    bookworm.run(f"dpkg -i /tmp/{runc.name} >/dev/null && rm /tmp/{runc.name}")
    for host in (bookworm, trixie):  # the deploy installs Docker's dependencies from Debian's mirror
        host.wait_for_apt_proxy()
    inventory = write_inventory(
        tmp_path_factory.mktemp("inv") / "inventory.py", {host.name: host.pyinfra_data() for host in (bookworm, trixie)}
    )
    run = run_deploy(inventory, *docker_data(hub, repo))
    if run.returncode and cannot_reach_gateway(run.stderr):  # what stop 23's CI saw, should it come back here
        run = dataclasses.replace(run, stderr=run.stderr[-1500:] + "".join(h.network_report() for h in (bookworm, trixie)))
    return inventory, run


def installed(host, packages) -> set[str]:
    """Those of ``packages`` dpkg has installed (not merely known, removed or half-done)."""
    listing = host.run(f"dpkg-query -W -f '${{Package}} ${{db:Status-Abbrev}}\\n' {' '.join(packages)} 2>/dev/null", check=False)
    return {line.split()[0] for line in listing.stdout.splitlines() if line.split()[1:] == ["ii"]}


def test_source_and_keyring_land_as_apt_expects(first_run, fleet, repo):
    _, run = first_run
    assert run.returncode == 0, str(run)
    for host in fleet[:2]:
        source = host.run(f"cat /etc/apt/sources.list.d/{docker.SOURCE_FILE}.sources").stdout
        fields = dict(line.split(": ", 1) for line in source.splitlines() if ": " in line)
        assert fields == {
            "Types": "deb", "URIs": f"{repo.url}/debian", "Suites": host.suite, "Components": "stable",
            "Architectures": "amd64", "Signed-By": docker.KEYRING,
        }, source
        assert host.run(f"cat {docker.KEYRING}").stdout == repo.key, "the keyring is the key the controller checked"
        assert host.run(f"stat -c '%a %U' {docker.KEYRING}").stdout.split() == ["644", "root"]
        # apt trusts the repository through that keyring: the lists are there, signature checked.
        update = host.run("apt-get update 2>&1")
        assert f"{repo.url}/debian {host.suite} InRelease" in update.stdout, update.stdout
        assert not re.search(r"NO_PUBKEY|not signed|W: GPG error|E: ", update.stdout), update.stdout
        policy = host.run("apt-cache policy docker-ce").stdout
        assert f"{repo.url}/debian {host.suite}/stable amd64 Packages" in policy, policy


def test_docker_is_installed_from_the_repo(first_run, fleet, repo):
    _, run = first_run
    assert run.returncode == 0, str(run)
    for host in fleet[:2]:
        assert installed(host, docker.DOCKER_CE_PACKAGES) == set(docker.DOCKER_CE_PACKAGES)
        assert re.search(r"Docker version \d+\.", host.run("docker --version").stdout)
        assert re.search(r"version v?2\.", host.run("docker compose version").stdout)
        assert host.run("docker buildx version").returncode == 0
        assert host.run("command -v dockerd runc containerd").returncode == 0
        for name in ("InRelease", "pool/stable/amd64/docker-ce_"):
            path = f"/linux/debian/dists/{host.suite}/{name}"
            assert any(line.startswith(f"{host.address} GET {path}") for line in repo.requests), (path, repo.requests)
    # The conflicting package that was really installed is gone; the others were never asked about.
    bookworm = fleet[0]
    assert installed(bookworm, ["runc"]) == set(), "Debian's runc is still installed"
    removal = "Backchat | Remove packages that conflict with Docker's"
    assert removal in run.changed_ops("dr-bookworm") and removal not in run.changed_ops("dr-trixie")
    # The key was fetched by the controller (the gateway), not by the hosts.
    assert any(line.startswith(f"{GATEWAY} GET /linux/debian/gpg 200") for line in repo.requests), repo.requests
    assert not any(line.startswith(f"{host.address} GET /linux/debian/gpg") for host in fleet for line in repo.requests)


def test_second_run_changes_nothing(first_run, fleet, hub, repo):
    inventory, first = first_run
    assert first.returncode == 0, str(first)
    commands_before = [host.remote_commands() for host in fleet[:2]]
    again = run_deploy(inventory, *docker_data(hub, repo))
    assert again.returncode == 0, str(again)
    assert again.changed_ops() == [], again
    # The default source reads its keyring and source file with everything else (one
    # command; 10 before): a source file that is not byte for byte what the first run
    # wrote would cost more here.
    commands = [host.remote_commands() - before for host, before in zip(fleet[:2], commands_before)]
    assert max(commands) <= NOOP_COMMANDS_MAX, f"a no-op run ran {commands} commands per host (sshd's count)"


def test_a_key_with_another_fingerprint_is_refused_and_nothing_installed(fleet, hub, repo, tmp_path):
    """A lab that points docker_repo_url at its mirror but keeps Docker's pin: the mirror's
    key is not Docker's, so the host is refused before anything on it changes."""
    host = fleet[2]
    inventory = write_inventory(tmp_path / "inventory.py", {host.name: host.pyinfra_data()})
    asked_before = len(repo.requests)
    run = run_deploy(inventory, *docker_data(hub, repo, docker_repo_key_fingerprint=DOCKERS_FINGERPRINT))
    assert run.returncode != 0, str(run)
    assert f"[{host.name}] Will refuse:" in run.stderr, str(run)
    assert DOCKERS_FINGERPRINT in run.stderr and repo.fingerprint in run.stderr, run
    assert "docker_repo_key_fingerprint" in run.stderr and "Traceback" not in run.stderr, run
    started = [line.split("Starting operation:", 1)[1].strip() for line in run.stderr.splitlines() if "Starting operation:" in line]
    assert started == ["Backchat | Refuse this host"], "the refusal is the only operation"
    for path in (docker.KEYRING, f"/etc/apt/sources.list.d/{docker.SOURCE_FILE}.sources", "/opt/backchat"):
        assert host.run(f"test -e {path}", check=False).returncode != 0, f"{path} exists"
    assert installed(host, [*docker.DOCKER_CE_PACKAGES, "docker.io"]) == set()
    assert not any(line.startswith(f"{host.address} ") for line in repo.requests[asked_before:]), "the host used the repo"
