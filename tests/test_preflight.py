"""Which hosts are refused, and why (before anything on them changes)."""

import pytest

from backchat import preflight, settings


@pytest.fixture
def cfg():
    return settings.validate(settings.load_defaults())


def os_info(os_id="debian", version="13", arch="amd64", codename="trixie"):
    return {"id": os_id, "version_id": version, "codename": codename, "arch": arch, "pretty_name": f"{os_id} {version}"}


@pytest.mark.parametrize("release", [("debian", "12"), ("debian", "13"), ("ubuntu", "22.04"), ("ubuntu", "24.04")])
def test_supported_releases_pass(cfg, release):
    assert preflight.problems(cfg, os_info(*release), memory_mb=16000) == []


@pytest.mark.parametrize(
    "info, memory, words",
    [
        (os_info("debian", "11"), 16000, ["debian 11 is not supported", "Debian 12"]),
        (os_info("fedora", "40"), 16000, ["not supported"]),
        (os_info(arch="armhf"), 16000, ["architecture armhf"]),
        (os_info(), 4000, ["4000 MB of RAM", "min_memory_mb"]),
    ],
)
def test_unsupported_hosts_get_a_reason(cfg, info, memory, words):
    found = " ".join(preflight.problems(cfg, info, memory))
    for word in words:
        assert word in found


def test_debian_12_with_distribution_packages_is_refused(cfg):
    data = settings.load_defaults() | {"docker_source": "debian"}
    found = preflight.problems(settings.validate(data), os_info("debian", "12"), 16000)
    assert len(found) == 1 and "compose v1" in found[0] and "docker_source = 'docker'" in found[0]


def test_start_needs_systemd(cfg):
    assert "not systemd" in preflight.problems(cfg, os_info(), 16000, init="bash")[0]
    no_start = settings.validate(settings.load_defaults() | {"start": False})
    assert preflight.problems(no_start, os_info(), 16000, init="bash") == []


def test_a_port_held_by_another_process_is_named_with_its_setting(cfg):
    found = preflight.port_problems(cfg, {8080: "nginx", 22: "sshd"}, stack_exists=False)
    assert found == ["port 8080 (localai_port) is already in use by nginx. Fix: stop it, or set localai_port to a free port"]
    # Our own containers hold their ports through docker-proxy: not a conflict on a re-run.
    assert preflight.port_problems(cfg, {8080: "docker-proxy", 3001: "docker-proxy"}, stack_exists=True) == []
    # ... but docker-proxy for someone else's containers is.
    assert "3001 (chatbot_ui_port)" in preflight.port_problems(cfg, {3001: "docker-proxy"}, stack_exists=False)[0]
    # A port our project's containers publish is ours, whatever holds it for a moment (Docker
    # starting them after a boot); another of our ports held by no-one-named is not.
    assert preflight.port_problems(cfg, {8080: "", 3001: "dockerd"}, stack_exists=True, published=frozenset({8080, 3001})) == []
    assert preflight.port_problems(cfg, {8080: "", 3001: ""}, stack_exists=True, published=frozenset({8080})) == [
        "port 3001 (chatbot_ui_port) is already in use by another process. Fix: stop it, or set chatbot_ui_port to a free port"]


def test_textgen_needs_both_of_its_ports():
    textgen = settings.validate(settings.load_defaults() | {"backend": "textgen", "frontend": "textgen"})
    assert preflight.wanted_ports(textgen) == {5001: "textgen_api_port", 7860: "textgen_port"}


def test_docker_users_must_exist():
    assert preflight.user_problems([]) == []
    (problem,) = preflight.user_problems(["bob"])
    assert "bob" in problem and "never creates accounts" in problem



def test_a_gateway_alone_needs_its_port_and_no_memory_for_the_model(cfg):
    assert preflight.wanted_ports(cfg, serves_ai=False, runs_gateway=True) == {443: "gateway_port"}
    assert preflight.wanted_ports(cfg, serves_ai=True, runs_gateway=True) == {
        8080: "localai_port", 3001: "chatbot_ui_port", 443: "gateway_port"}
    assert preflight.problems(cfg, os_info(), 1000, serves_ai=False) == []
    found = preflight.port_problems(cfg, {443: "apache2", 8080: "nginx"}, stack_exists=False, serves_ai=False,
                                    runs_gateway=True)
    assert found == ["port 443 (gateway_port) is already in use by apache2. Fix: stop it, or set gateway_port to a free port"]
