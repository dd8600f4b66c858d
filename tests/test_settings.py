"""Every setting is declared once and validated in one place, before anything runs."""

import pytest

from backchat import settings
from backchat.settings import SettingsError, validate

@pytest.fixture
def defaults():
    return settings.load_defaults()


def test_declared_defaults_are_valid(defaults):
    cfg = validate(defaults)
    assert cfg.backend == "localai" and cfg.frontend == "chatbot-ui"
    assert cfg.services == ("localai", "chatbot-ui")
    # The pins: a commit, a sha256, versioned images.
    assert len(cfg.model_revision) == 40 and len(cfg.model_sha256) == 64
    assert cfg.localai_image == "localai/localai:v4.9.0"
    assert validate({}) == cfg, "a missing setting takes its declared default"


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("backend", "nope", ["backend", "'nope'", "localai, textgen, llamacpp"]),
        ("threads", -2, ["threads", "-2", "1 to 1024"]),
        ("threads", "many", ["threads", "'many'"]),
        ("model_file", "model;rm -rf ~.gguf", ["model_file", "plain file name"]),
        ("model_file", "$(reboot).gguf", ["model_file"]),
        ("model_file", "../../etc/passwd", ["model_file"]),
        ("model_repo", "a/b c", ["model_repo"]),
        ("model_revision", "main`id`", ["model_revision"]),
        ("models_dir", "/opt/x; reboot", ["models_dir", "absolute path"]),
        ("models_dir", "relative/dir", ["models_dir"]),
        ("stack_dir", "/opt/../etc", ["stack_dir"]),
        ("localai_image", "img|sh", ["localai_image"]),
        ("public_address", "host name", ["public_address"]),
        ("bind_address", "everywhere", ["bind_address", "IP address"]),
        ("localai_port", 70000, ["localai_port", "1 to 65535"]),
        ("start", "yes", ["start", "True or False"]),
        ("model_sha256", "abc", ["model_sha256", "64"]),
        ("hf_endpoint", "ftp://mirror", ["hf_endpoint", "http"]),
        ("docker_source", "snap", ["docker_source", "docker, debian"]),
        ("docker_repo_url", "ftp://mirror.lab/linux", ["docker_repo_url", "http(s) URL", "download.docker.com"]),
        ("docker_repo_url", "https://download.docker.com/linux\n", ["docker_repo_url", "http(s) URL"]),
        ("docker_repo_url", "http://mirror.lab:99999/linux", ["docker_repo_url", "valid port"]),
        ("docker_repo_url", "http://user:pass@mirror.lab/linux", ["docker_repo_url", "http(s) URL"]),
        ("docker_repo_url", "https://x/linux deb http://evil/", ["docker_repo_url"]),
        ("docker_repo_key_fingerprint", "0EBFCD88", ["docker_repo_key_fingerprint", "40 hex digits", "--with-colons"]),
        ("docker_repo_key_fingerprint", "9DC858229FC7DD38854AE2D88D81803C0EBFCD88\n", ["docker_repo_key_fingerprint"]),
        ("docker_repo_key_fingerprint", "9DC858229FC7DD38854AE2D88D81803C0EBFCD8G", ["docker_repo_key_fingerprint"]),
        ("docker_repo_key_fingerprint", None, ["docker_repo_key_fingerprint", "a key fingerprint"]),
        ("docker_users", ["root; id"], ["docker_users"]),
        # Classes of input found to slip through or crash (issue 12).
        ("model_id", "gpt-3.5-turbo\n", ["model_id", "model name"]),
        ("stack_dir", "/opt/backchat\n", ["stack_dir"]),
        ("model_file", "x.gguf\n", ["model_file"]),
        ("backstage_origin", "http://localhost:3000\n", ["backstage_origin"]),
        ("backstage_origin", "http://localhost:3000/", ["backstage_origin", "no trailing slash"]),
        ("backstage_origin", "http://localhost:3000/app", ["backstage_origin", "no path"]),
        ("threads", "--4", ["threads", "whole number"]),
        ("threads", "\u00b2", ["threads", "whole number"]),
        ("context_size", " 4096", ["context_size"]),
        ("bind_address", 0, ["bind_address", "IP address"]),
        ("public_address", "None", ["public_address", "write null"]),
        ("report_path", "null", ["report_path", "write null"]),
        ("stack_dir", "/", ["stack_dir", "shared directory"]),
        ("stack_dir", "/etc", ["stack_dir", "system directory /etc"]),
        ("models_dir", "/tmp", ["models_dir", "system directory /tmp"]),
        ("models_dir", "/tmp/models", ["models_dir", "system directory /tmp"]),
        ("backstage_app_dir", "/root", ["backstage_app_dir", "shared directory"]),
        ("backstage_app_dir", "/home/alice", ["backstage_app_dir", "shared directory"]),
        ("models_dir", "/usr/local/models", ["models_dir", "/usr"]),
        ("report_path", "/nonexistent-dir/report.json", ["report_path", "does not exist"]),
        ("image_archives", [__file__], ["image_archives", "not a docker save archive"]),
    ],
)
def test_bad_values_are_named_with_a_fix(defaults, name, value, words):
    defaults[name] = value
    with pytest.raises(SettingsError) as raised:
        validate(defaults, where="ai-01")
    message = str(raised.value)
    assert "ai-01" in message and "Fix:" in message and "nothing was changed" in message
    for word in words:
        assert word in message


def test_all_problems_in_one_message(defaults):
    defaults.update(backend="nope", threads=0, model_file="a b")
    message = str(pytest.raises(SettingsError, validate, defaults).value)
    assert "backend" in message and "threads" in message and "model_file" in message


def test_repo_url_and_fingerprint_are_normalised(defaults):
    defaults.update(docker_repo_url="http://10.0.0.5:8080/docker/linux/",
                    docker_repo_key_fingerprint="9dc8 5822 9fc7 dd38 854a  e2d8 8d81 803c 0ebf cd88")
    cfg = validate(defaults)
    assert cfg.docker_repo_url == "http://10.0.0.5:8080/docker/linux", "no // before /debian"
    assert cfg.docker_repo_key_fingerprint == "9DC858229FC7DD38854AE2D88D81803C0EBFCD88"


def test_command_line_strings_are_coerced(defaults):
    # pyinfra's --data passes numbers as int already, but "8" from other sources works too.
    defaults.update(threads="8", context_size=2048, start=False)
    cfg = validate(defaults)
    assert cfg.threads == 8 and cfg.start is False


def test_duplicate_ports_are_refused(defaults):
    defaults["chatbot_ui_port"] = defaults["localai_port"]
    message = str(pytest.raises(SettingsError, validate, defaults).value)
    assert "chatbot_ui_port" in message and "localai_port" in message


@pytest.mark.parametrize(
    "typo, nearest",
    [("backnd", "backend"), ("model-id", "model_id"), ("contextsize", "context_size"), ("api_key", "api_key_file")],
)
def test_unknown_names_are_refused_with_the_nearest_setting(defaults, typo, nearest):
    defaults[typo] = "textgen"
    message = str(pytest.raises(SettingsError, validate, defaults).value)
    assert f"{typo} is not a backchat setting" in message and f"did you mean {nearest}?" in message


def test_pyinfra_data_is_not_ours():
    data = {"ssh_hostname": "10.0.0.1", "ssh_port": 22, "_sudo": True, "docker_identifier": "x", "backend": "llamacpp"}
    assert settings.ours(data) == {"backend": "llamacpp"}


@pytest.mark.parametrize(
    "backend, frontend, services",
    [
        ("localai", "chatbot-ui", ("localai", "chatbot-ui")),
        ("textgen", "textgen", ("textgen",)),
        ("textgen", "chatbot-ui", ("textgen", "chatbot-ui")),
        ("localai", "textgen", ("localai", "textgen")),
        ("llamacpp", "chatbot-ui", ("llamacpp", "chatbot-ui")),
    ],
)
def test_services_follow_backend_and_frontend(defaults, backend, frontend, services):
    defaults.update(backend=backend, frontend=frontend)
    assert validate(defaults).services == services
