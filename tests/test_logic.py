"""The small decisions the deploy makes on facts: refuse, trust the model, restart the stack."""

import json
from types import SimpleNamespace

import pytest

from backchat import images, outcomes, preflight, report, settings, stack


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


def test_stack_out_of_date():
    running = {"services": {"localai": {"want": "h1", "have": "h1", "state": "running"}}}
    assert stack.out_of_date(running, ["localai"]) == []
    assert stack.out_of_date(running, ["localai", "chatbot-ui"]) == ["chatbot-ui"]
    assert stack.out_of_date(None, ["localai"]) == ["localai"]
    changed = {"services": {"localai": {"want": "h2", "have": "h1", "state": "running"}}}
    assert stack.out_of_date(changed, ["localai"]) == ["localai"]
    stopped = {"services": {"localai": {"want": "h1", "have": "h1", "state": "exited"}}}
    assert stack.out_of_date(stopped, ["localai"]) == ["localai"]


def test_thread_count(cfg):
    assert stack.thread_count(cfg, {"physical": 6}) == 6
    assert stack.thread_count(settings.validate(settings.load_defaults() | {"threads": 2}), {"physical": 6}) == 2


def test_report_names_every_host_and_why(tmp_path, monkeypatch):
    monkeypatch.setattr(outcomes, "_records", {})
    hosts = [SimpleNamespace(name=name) for name in ("ai-01", "ai-02", "ai-03")]
    state = SimpleNamespace(inventory=hosts, failed_hosts=[hosts[1], hosts[2]])
    outcomes.record("ai-01", verify="pass", backends="localai", model_id="gpt-3.5-turbo", seconds=3.2)
    outcomes.record("ai-02", failure="Refused: Debian 11 is not supported")
    outcomes.record("ai-02", failure="a later, less useful error")
    rows = report.rows(state)
    assert [row["result"] for row in rows] == ["ok", "FAILED", "FAILED"]
    assert rows[1]["failure"] == "Refused: Debian 11 is not supported"
    assert "could not connect" in rows[2]["failure"]
    table = report.format_table(rows)
    assert table.splitlines()[0].split()[:2] == ["host", "result"]
    assert "ai-02: Refused: Debian 11 is not supported" in table
    json.dumps(rows)  # the JSON report holds plain data


def test_archive_tags_read_from_a_docker_save_tarball(tmp_path):
    import io
    import tarfile

    manifest = json.dumps([{"Config": "c.json", "RepoTags": ["backchat-test/llama-server:sid"], "Layers": []}]).encode()
    path = tmp_path / "image.tar"
    with tarfile.open(path, "w") as archive:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        archive.addfile(info, io.BytesIO(manifest))
    assert images.archive_tags(str(path)) == ["backchat-test/llama-server:sid"]


def test_image_archives_must_exist_on_the_controller(tmp_path):
    data = settings.load_defaults() | {"image_archives": [str(tmp_path / "missing.tar")]}
    with pytest.raises(settings.SettingsError, match="image_archives.*do not exist"):
        settings.validate(data)


def test_a_port_held_by_another_process_is_named_with_its_setting(cfg):
    found = preflight.port_problems(cfg, {8080: "nginx", 22: "sshd"}, stack_exists=False)
    assert found == ["port 8080 (localai_port) is already in use by nginx. Fix: stop it, or set localai_port to a free port"]
    # Our own containers hold their ports through docker-proxy: not a conflict on a re-run.
    assert preflight.port_problems(cfg, {8080: "docker-proxy", 3001: "docker-proxy"}, stack_exists=True) == []
    # ... but docker-proxy for someone else's containers is.
    assert "3001 (chatbot_ui_port)" in preflight.port_problems(cfg, {3001: "docker-proxy"}, stack_exists=False)[0]


def test_textgen_needs_both_of_its_ports():
    textgen = settings.validate(settings.load_defaults() | {"backend": "textgen", "frontend": "textgen"})
    assert preflight.wanted_ports(textgen) == {5001: "textgen_api_port", 7860: "textgen_port"}


def test_docker_users_must_exist():
    assert preflight.user_problems([]) == []
    (problem,) = preflight.user_problems(["bob"])
    assert "bob" in problem and "never creates accounts" in problem


class _Probe:
    """Answers by path, as a backend would (a stand-in for the HTTP probes)."""

    def __init__(self, statuses):
        self.statuses = statuses

    def request(self, method, url, with_key=True, body=None, timeout=10.0):
        from backchat.probes import Answer

        path = "/" + url.split("/", 3)[3]
        return Answer(self.statuses[path], "{}")


@pytest.mark.parametrize("service, path", [("llamacpp", "/health"), ("localai", "/readyz"), ("textgen", "/v1/internal/token-count")])
def test_a_listed_but_unloaded_model_fails_verify(service, path):
    from backchat.verify import model_is_loaded

    assert model_is_loaded(service, "http://h:1", _Probe({path: 200})) is None
    problem = model_is_loaded(service, "http://h:1", _Probe({path: 500}))
    assert "not loaded" in problem and path in problem and "500" in problem
