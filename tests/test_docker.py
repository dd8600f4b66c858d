"""Step 1's decisions: the repo key against its pin (fetched once per run), what to remove."""

import pytest

from backchat import docker
from tests.cfg import make_cfg
from testbed.apt_repo import key_only_mirror
from tests.test_openpgp import KEY_A, KEY_A_FINGERPRINT, KEY_B_FINGERPRINT, KEYS_A_AND_B

URL = "http://mirror.lab/linux/debian/gpg"


def test_the_pinned_key_passes():
    assert docker.key_problem(KEY_A, URL, KEY_A_FINGERPRINT) is None


def test_another_key_names_the_url_both_fingerprints_and_the_fix():
    problem = docker.key_problem(KEY_A, URL, KEY_B_FINGERPRINT)
    assert f"{URL} has fingerprint {KEY_A_FINGERPRINT}" in problem
    assert f"docker_repo_key_fingerprint expects {KEY_B_FINGERPRINT}" in problem
    assert "Nothing was installed" in problem and "Fix:" in problem


def test_a_second_key_beside_the_pinned_one_is_refused():
    """apt would trust every primary key in the keyring: the pinned one must be alone."""
    problem = docker.key_problem(KEYS_A_AND_B, URL, KEY_A_FINGERPRINT)
    assert f"{KEY_A_FINGERPRINT}, {KEY_B_FINGERPRINT}" in problem


def test_what_is_not_a_key_is_refused_with_why():
    problem = docker.key_problem("<html>Moved</html>", URL, KEY_A_FINGERPRINT)
    assert f"the signing key at {URL} is unusable" in problem and "ASCII-armored" in problem


@pytest.mark.parametrize(
    "installed, removed",
    [
        ({}, []),
        ({"curl": ["8"], "runc": ["1.1"], "docker.io": ["20.10"]}, ["docker.io", "runc"]),
        ({"containerd.io": ["1.6"], "docker-ce": ["5:27"]}, []),  # Docker's own: nothing to remove on a re-run
    ],
)
def test_only_conflicting_packages_really_installed_are_removed(installed, removed):
    assert docker.conflicting(installed) == removed


def test_the_default_pin_is_dockers_release_key():
    cfg = make_cfg()
    assert cfg.docker_repo_url == "https://download.docker.com/linux"
    assert cfg.docker_repo_key_fingerprint == "9DC858229FC7DD38854AE2D88D81803C0EBFCD88"


@pytest.fixture
def mirror():
    """A LAN mirror serving KEY_A as Docker's key; each test starts a fresh run (no fetched keys)."""
    docker._keys.clear()
    with key_only_mirror(KEY_A) as served:
        yield served
    docker._keys.clear()


def test_the_controller_fetches_each_key_once_per_run(mirror):
    url, asked = mirror
    cfg = make_cfg(docker_repo_url=url, docker_repo_key_fingerprint=KEY_A_FINGERPRINT)
    assert docker.trusted_key(cfg, "debian") == KEY_A
    assert docker.trusted_key(cfg, "debian") == KEY_A
    assert asked == ["/linux/debian/gpg"]


def test_a_mirror_with_another_key_is_refused(mirror):
    url, _ = mirror
    with pytest.raises(docker.KeyProblem, match=f"has fingerprint {KEY_A_FINGERPRINT}, but docker_repo_key_fingerprint expects 9DC8"):
        docker.trusted_key(make_cfg(docker_repo_url=url), "debian")


def test_a_key_the_controller_cannot_fetch_is_refused(mirror):
    url, _ = mirror
    cfg = make_cfg(docker_repo_url=f"{url}/elsewhere", docker_repo_key_fingerprint=KEY_A_FINGERPRINT)
    with pytest.raises(docker.KeyProblem, match="could not fetch the apt signing key .*/elsewhere/ubuntu/gpg from the controller.*404"):
        docker.trusted_key(cfg, "ubuntu")


def test_the_service_facts_read_ahead_are_those_systemd_service_reads():
    """With start = True the deploy reads Docker's service state with everything else and
    queues systemd.service only when Docker is not running or not enabled: the facts it
    reads ahead must be the very ones (class and arguments) systemd.service would read."""
    from pyinfra.context import ctx_host
    from pyinfra.operations import systemd

    read = []

    class Host:
        def get_fact(self, fact, *args, **kwargs):
            read.append((fact, kwargs))
            return {docker.SERVICE: True}

        def noop(self, message):
            pass

    with ctx_host.use(Host()):
        assert list(systemd.service._inner(service=docker.SERVICE, running=True, enabled=True)) == []
    assert read == docker.reads(make_cfg(start=True))[-2:]
    assert not any(fact in dict(read) for fact, _ in docker.reads(make_cfg(start=False)))
