"""The rendered stack files (compose, .env, LocalAI model config) against the contract.

Pure rendering: nothing here touches the network, a host, or Docker's engine. The
expected values come from docs/upstream-facts.md and /work/shared/reference/stack-contracts.md
(container ports, env names, flags); they are written out literally so that a change in
the templates that breaks the contract fails here.
"""

from __future__ import annotations

import re

import pytest
import yaml

from backchat import addresses, secrets, settings, stack
from tests.cfg import make_cfg
from tests.variants import COMBINATIONS

MODEL_ID = "gpt-3.5-turbo"
MODEL_FILE = "mistral-7b-openorca.Q4_K_M.gguf"
KEY = "k3y-abcdefgh-0123456789"
KEY_REF = re.compile(r"\$\{BACKCHAT_API_KEY(:?[?-][^}]*)?\}")

# Container-side ports, fixed by the images (not settings).
BACKEND_CONTAINER_PORT = {"localai": 8080, "llamacpp": 8080, "textgen": 5000}
EXPECTED_SERVICES = {
    ("localai", "chatbot-ui"): {"localai", "chatbot-ui"},
    ("textgen", "textgen"): {"textgen"},
    ("llamacpp", "chatbot-ui"): {"llamacpp", "chatbot-ui"},
    ("localai", "textgen"): {"localai", "textgen"},
    ("textgen", "chatbot-ui"): {"textgen", "chatbot-ui"},
}


def parse_env(text: str) -> dict[str, str]:
    """KEY=VALUE lines of a .env file (comments and blank lines ignored)."""
    result = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        assert "=" in stripped, f"not a KEY=VALUE line in .env: {line!r}"
        name, value = stripped.split("=", 1)
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), f"bad variable name {name!r}"
        result[name] = value
    return result


class Rendered:
    """Every file of one configuration, parsed."""

    def __init__(self, cfg: settings.Settings, threads: int):
        self.cfg = cfg
        self.threads = threads
        self.files = stack.rendered_files(cfg, threads)
        # .env holds the key: secret_file writes it, from these lines, mode 0600.
        self.files[f"{cfg.stack_dir}/.env"] = (secrets.reveal(stack.env_lines(cfg)), "0600")
        self.compose_path = f"{cfg.stack_dir}/docker-compose.yaml"
        self.env_path = f"{cfg.stack_dir}/.env"
        self.model_yaml_path = f"{cfg.models_dir}/{MODEL_ID}.yaml"
        self.compose_text = self.files[self.compose_path][0]
        self.compose = yaml.safe_load(self.compose_text)
        self.env_text = self.files[self.env_path][0]
        self.env = parse_env(self.env_text)
        if self.model_yaml_path in self.files:
            self.model_text = self.files[self.model_yaml_path][0]
            self.model = yaml.safe_load(self.model_text)
        else:
            self.model_text = self.model = None

    def service(self, name: str) -> dict:
        return self.compose["services"][name]


@pytest.fixture(params=COMBINATIONS, ids=lambda c: f"{c[0]}+{c[1]}")
def combo(request):
    return request.param


@pytest.fixture(params=[None, KEY], ids=["nokey", "key"])
def api_key(request):
    return request.param


@pytest.fixture
def rendered(combo, api_key) -> Rendered:
    backend, frontend = combo
    cfg = make_cfg(backend=backend, frontend=frontend, api_key=api_key)
    return Rendered(cfg, threads=6)


# --- the set of files ----------------------------------------------------------------


def test_files_and_modes(rendered):
    cfg = rendered.cfg
    expected = {rendered.compose_path: "0644", rendered.env_path: "0600"}
    if "localai" in cfg.services:
        expected[rendered.model_yaml_path] = "0644"
    assert {path: mode for path, (_, mode) in rendered.files.items()} == expected
    assert rendered.compose_path == "/opt/backchat/docker-compose.yaml"
    assert rendered.env_path == "/opt/backchat/.env"
    for content, _ in rendered.files.values():
        assert content.endswith("\n")


# --- compose: services, images, ports, restart, health --------------------------------


def test_compose_services_are_exactly_the_settings_services(rendered, combo):
    assert set(rendered.compose["services"]) == set(rendered.cfg.services)
    assert set(rendered.cfg.services) == EXPECTED_SERVICES[combo]
    assert rendered.compose["name"] == "backchat"


def test_compose_images_come_from_settings(rendered):
    cfg = rendered.cfg
    images = {
        "localai": (cfg.localai_image, "localai/localai:v4.9.0"),
        "llamacpp": (cfg.llamacpp_image, "ghcr.io/ggml-org/llama.cpp:server-b11206"),
        "textgen": (cfg.textgen_image, "atinoda/text-generation-webui:default-cpu-v4.7.3"),
        "chatbot-ui": (cfg.chatbot_ui_image, "ghcr.io/mckaywrigley/chatbot-ui:main"),
    }
    for name in cfg.services:
        setting, default = images[name]
        assert setting == default
        assert rendered.service(name)["image"] == setting


def test_compose_ports_default(rendered):
    expected = {
        "localai": ["0.0.0.0:8080:8080"],
        "llamacpp": ["0.0.0.0:8080:8080"],
        "textgen": ["0.0.0.0:7860:7860", "0.0.0.0:5001:5000"],
        "chatbot-ui": ["0.0.0.0:3001:3000"],
    }
    if rendered.cfg.frontend != "textgen":  # its GUI is published only when it is the GUI
        expected["textgen"] = ["0.0.0.0:5001:5000"]
    for name in rendered.cfg.services:
        assert rendered.service(name)["ports"] == expected[name], name


@pytest.mark.parametrize("combo_", COMBINATIONS, ids=lambda c: f"{c[0]}+{c[1]}")
def test_compose_ports_follow_port_and_bind_settings(combo_):
    backend, frontend = combo_
    cfg = make_cfg(
        backend=backend,
        frontend=frontend,
        bind_address="127.0.0.1",
        localai_port=18080,
        chatbot_ui_port=13001,
        textgen_port=17860,
        textgen_api_port=15001,
    )
    compose = Rendered(cfg, 2).compose
    expected = {
        "localai": ["127.0.0.1:18080:8080"],
        "llamacpp": ["127.0.0.1:18080:8080"],
        "textgen": ["127.0.0.1:17860:7860", "127.0.0.1:15001:5000"][frontend != "textgen":],
        "chatbot-ui": ["127.0.0.1:13001:3000"],
    }
    for name in cfg.services:
        assert compose["services"][name]["ports"] == expected[name], name


def test_compose_restart_policy(rendered):
    for name in rendered.cfg.services:
        assert rendered.service(name)["restart"] == "unless-stopped", name


def test_compose_backend_healthchecks(rendered):
    cfg = rendered.cfg
    for name in cfg.services:
        if name == "chatbot-ui":
            continue
        health = rendered.service(name).get("healthcheck")
        assert health, f"{name} has no healthcheck"
        test = health["test"]
        assert isinstance(test, list) and test[0] == "CMD", test
        if name == "localai":
            assert test[1] == "curl"
            assert test[-1] == "http://localhost:8080/readyz"
        elif name == "llamacpp":
            assert test[1] == "curl"
            assert test[-1] == "http://localhost:8080/health"
        elif name == "textgen":
            # The image has no curl: python3 it is.
            assert test[1] == "python3"
            assert not any("curl" in part for part in test)
            script = test[-1]
            assert "http://127.0.0.1:5000/v1/models" in script
            compile(script, "<healthcheck>", "exec")  # valid Python after YAML unescaping
        for timing in ("interval", "timeout", "retries", "start_period"):
            assert timing in health, (name, timing)


# --- LocalAI ---------------------------------------------------------------------------


def test_localai_service(rendered):
    cfg = rendered.cfg
    if "localai" not in cfg.services:
        assert "localai" not in rendered.compose["services"]
        assert "volumes" not in rendered.compose
        return
    svc = rendered.service("localai")
    env = svc["environment"]
    assert env["LOCALAI_EXTERNAL_BACKENDS"] == "llama-cpp"
    assert env["LOCALAI_BACKENDS_PATH"] == "/backends"
    assert env["LOCALAI_MODELS_PATH"] == "/models"
    assert env["LOCALAI_THREADS"] == "6"
    assert env["LOCALAI_CONTEXT_SIZE"] == "8192"
    assert env["LOCALAI_CORS"] == "true"
    assert env["LOCALAI_CORS_ALLOW_ORIGINS"] == cfg.backstage_origin == "http://localhost:3000"
    assert env["LOCALAI_CORS_ALLOW_ORIGINS"]
    # Quoted in the file: "true" must reach the container as the string, not a YAML bool.
    assert all(isinstance(value, str) for value in env.values()), env

    volumes = svc["volumes"]
    assert f"{cfg.models_dir}:/models" in volumes
    named = [v for v in volumes if v.split(":")[1:2] == ["/backends"] and not v.startswith("/")]
    assert named == ["localai-backends:/backends"]
    assert "localai-backends" in rendered.compose["volumes"]


def test_localai_threads_and_context_follow_settings():
    cfg = make_cfg(backend="localai", frontend="chatbot-ui", context_size=2048, threads=3)
    threads = stack.thread_count(cfg, {"physical": 16})
    r = Rendered(cfg, threads)
    env = r.service("localai")["environment"]
    assert env["LOCALAI_THREADS"] == "3"
    assert env["LOCALAI_CONTEXT_SIZE"] == "2048"
    assert r.model["threads"] == 3
    assert r.model["context_size"] == 2048


def test_localai_api_key_only_by_reference(rendered):
    if "localai" not in rendered.cfg.services:
        return
    env = rendered.service("localai")["environment"]
    if rendered.cfg.api_key:
        assert KEY_REF.fullmatch(env["LOCALAI_API_KEY"]), env["LOCALAI_API_KEY"]
    else:
        assert "LOCALAI_API_KEY" not in env


# --- Chatbot UI ------------------------------------------------------------------------


def test_chatbot_ui_service(rendered):
    cfg = rendered.cfg
    if cfg.frontend != "chatbot-ui":
        assert "chatbot-ui" not in rendered.compose["services"]
        return
    svc = rendered.service("chatbot-ui")
    env = svc["environment"]
    host = env["OPENAI_API_HOST"]
    assert host == f"http://{cfg.backend}:{BACKEND_CONTAINER_PORT[cfg.backend]}"
    assert not host.rstrip("/").endswith("/v1")
    assert env["DEFAULT_MODEL"] == cfg.model_id == MODEL_ID
    key = env["OPENAI_API_KEY"]
    assert isinstance(key, str) and key.strip()
    if cfg.api_key:
        assert KEY_REF.fullmatch(key), key
    else:
        assert "BACKCHAT_API_KEY" not in key
        assert key == "sk-local-no-key-needed"
    depends = svc["depends_on"]
    assert cfg.backend in (depends if isinstance(depends, (list, dict)) else [depends])
    # The backend Chatbot UI talks to is one that runs.
    assert cfg.backend in rendered.compose["services"]


# --- Text Gen WebUI ----------------------------------------------------------------------


def test_textgen_service(rendered):
    cfg = rendered.cfg
    if "textgen" not in cfg.services:
        assert "textgen" not in rendered.compose["services"]
        return
    svc = rendered.service("textgen")
    args = svc["environment"]["EXTRA_LAUNCH_ARGS"].split()
    expected_pairs = {
        "--api-port": "5000",
        "--model": MODEL_ID,
        "--loader": "llama.cpp",
        "--threads": "6",
        "--threads-batch": "6",
        "--ctx-size": "8192",
        "--gpu-layers": "0",
        "--chat-template-file": "user_data/instruction-templates/ChatML.yaml",
    }
    for flag in ("--listen", "--api"):
        assert flag in args
    for flag, value in expected_pairs.items():
        assert flag in args, flag
        assert args[args.index(flag) + 1] == value, flag
    # Only the model file: Text Gen WebUI loads the first .gguf of the folder it is given.
    assert svc["volumes"] == [f"{cfg.models_dir}/{MODEL_FILE}:/app/user_data/models/{MODEL_ID}/{MODEL_FILE}:ro"]
    # Its GUI (which can load and unload models, with no password) runs only as the GUI.
    assert ("--nowebui" in args) == (cfg.frontend != "textgen")
    if cfg.api_key and not addresses.behind_front_door(cfg):
        raw = svc["environment"]["EXTRA_LAUNCH_ARGS"]
        assert "--api-key" in args
        assert args[args.index("--api-key") + 1].startswith("${BACKCHAT_API_KEY")
        assert KEY_REF.search(raw.split("--api-key ", 1)[1]).start() == 0
    else:
        assert "--api-key" not in args


def test_textgen_args_is_one_string_of_flags():
    cfg = make_cfg(backend="textgen", frontend="textgen", context_size=8192)
    assert stack.textgen_args(cfg, 4) == (
        "--listen --api --api-port 5000 --model gpt-3.5-turbo --loader llama.cpp "
        "--threads 4 --threads-batch 4 --ctx-size 8192 --gpu-layers 0 "
        "--chat-template-file user_data/instruction-templates/ChatML.yaml"
    )


def test_textgen_gets_no_key_to_print_behind_the_front_door():
    """Issue 13, defect 5: Text Gen WebUI prints its --api-key at start, so `docker logs`
    would show it. Behind the front door, which checks the key, it is given none; without
    the door (loopback only) it still needs its own."""
    with_door = make_cfg(backend="textgen", frontend="chatbot-ui", tls=True, api_key="k" * 24)
    assert "--api-key" not in stack.textgen_args(with_door, 4).split()
    assert "BACKCHAT_API_KEY" not in Rendered(with_door, 4).service("textgen")["environment"]["EXTRA_LAUNCH_ARGS"]
    loopback = make_cfg(backend="textgen", frontend="chatbot-ui", tls=True, bind_address="127.0.0.1",
                        api_key="k" * 24)
    assert "--api-key" in stack.textgen_args(loopback, 4).split()


# --- llama.cpp ---------------------------------------------------------------------------


def test_llamacpp_service(rendered):
    cfg = rendered.cfg
    if "llamacpp" not in cfg.services:
        assert "llamacpp" not in rendered.compose["services"]
        return
    svc = rendered.service("llamacpp")
    command = svc["command"]
    assert all(isinstance(part, str) for part in command), command

    def value(flag):
        assert flag in command, flag
        return command[command.index(flag) + 1]

    assert value("--model") == f"/models/{MODEL_FILE}"
    assert value("--alias") == MODEL_ID
    assert value("--port") == "8080"
    assert value("--host") == "0.0.0.0"
    assert value("--threads") == "6"
    assert value("--ctx-size") == "8192"
    assert value("--chat-template") == "chatml"  # the model speaks ChatML; its GGUF has no template
    assert f"{cfg.models_dir}:/models:ro" in svc["volumes"]
    if cfg.api_key:
        assert KEY_REF.fullmatch(svc["environment"]["LLAMA_API_KEY"])
    else:
        assert "LLAMA_API_KEY" not in (svc.get("environment") or {})


# --- secrets -----------------------------------------------------------------------------


def test_secret_only_in_env_file(rendered):
    cfg = rendered.cfg
    env_content, env_mode = rendered.files[rendered.env_path]
    assert env_mode == "0600"
    if cfg.api_key:
        assert rendered.env == {"BACKCHAT_API_KEY": KEY}
        assert KEY not in rendered.compose_text
        if rendered.model_text is not None:
            assert KEY not in rendered.model_text
        for path, (content, _) in rendered.files.items():
            if path != rendered.env_path:
                assert KEY not in content, path
        # Every backend that serves the API requires the key, by reference only.
        assert "${BACKCHAT_API_KEY" in rendered.compose_text
        assert len(KEY_REF.findall(rendered.compose_text)) >= 1
    else:
        assert rendered.env == {}
        assert "BACKCHAT_API_KEY" not in rendered.compose_text


def test_every_compose_reference_is_to_the_env_file_key(rendered):
    """The only ${...} the compose file uses (outside comments) is BACKCHAT_API_KEY."""
    body = "\n".join(
        line for line in rendered.compose_text.splitlines() if not line.lstrip().startswith("#")
    )
    names = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", body))
    assert names <= {"BACKCHAT_API_KEY"}
    # Any bare $NAME would also be interpolated by compose.
    assert not re.search(r"(?<!\$)\$[A-Za-z_]", body)
    if rendered.cfg.api_key:
        assert names == {"BACKCHAT_API_KEY"}
        assert set(rendered.env) == names


def _compose_reads_dotenv_value(raw: str) -> str | None:
    """The value Compose takes from a .env line's right-hand side, or None when Compose
    would interpolate (change) it. Rules from https://docs.docker.com/compose/env-file/:
    single-quoted values are used literally; unquoted and double-quoted values have
    ``$NAME`` / ``${NAME}`` interpolated."""
    if len(raw) >= 2 and raw[0] == raw[-1] == "'":
        return raw[1:-1].replace("\\'", "'")
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        raw = raw[1:-1]
    elif raw[:1] in ("'", '"'):
        return None  # an opening quote Compose would try to pair
    if re.search(r"\$(\{|[A-Za-z_])", raw):
        return None
    return raw


@pytest.mark.parametrize(
    "key", ["k3y-$abcdefgh", "k3y-${HOME}xy", "'k3y-abcdefgh'", '"k3y-abcdefgh"', "k3y#abcdefgh"]
)
def test_a_key_the_validator_accepts_reaches_compose_unchanged(key):
    """env.j2 writes the key unquoted, so any accepted key must survive Compose's .env
    parsing as is: either the validator refuses such characters, or the file quotes them."""
    try:
        checked = secrets.check_key(key, "$BACKCHAT_API_KEY")
    except secrets.SecretError as error:
        assert key not in str(error)  # refused, and the secret is not echoed
        return
    cfg = make_cfg(api_key=checked.reveal())
    env = parse_env(secrets.reveal(stack.env_lines(cfg)))
    assert _compose_reads_dotenv_value(env["BACKCHAT_API_KEY"]) == key


def test_env_file_plain_key_reads_back_unchanged():
    cfg = make_cfg(api_key=KEY)
    env = parse_env(secrets.reveal(stack.env_lines(cfg)))
    assert _compose_reads_dotenv_value(env["BACKCHAT_API_KEY"]) == KEY


# --- LocalAI model config ----------------------------------------------------------------


def test_localai_model_yaml(rendered):
    cfg = rendered.cfg
    if "localai" not in cfg.services:
        assert rendered.model is None
        assert not any(path.endswith(".yaml") and path.startswith(cfg.models_dir) for path in rendered.files)
        return
    assert rendered.model_yaml_path == f"/opt/backchat/models/{MODEL_ID}.yaml"
    model = rendered.model
    assert model["name"] == MODEL_ID
    assert model["backend"] == "llama-cpp"
    assert model["parameters"]["model"] == cfg.model_file == MODEL_FILE
    assert model["context_size"] == 8192
    assert model["threads"] == 6
    assert "<|im_end|>" in model["stopwords"]
    template = model["template"]
    assert "<|im_start|>" in template["chat_message"]
    assert "{{ .RoleName }}" in template["chat_message"]
    assert "{{.Content }}" in template["chat_message"]
    assert "<|im_end|>" in template["chat_message"]
    assert "<|im_start|>assistant" in template["chat"]
    assert "{{.Input" in template["chat"]
    assert "{{.Input}}" in template["completion"]


# --- threads -----------------------------------------------------------------------------


def test_thread_count_defaults_to_physical_cores():
    cfg = make_cfg(threads=None)
    assert stack.thread_count(cfg, {"physical": 8}) == 8
    assert stack.thread_count(cfg, {"physical": 1}) == 1


def test_thread_count_setting_overrides():
    cfg = make_cfg(threads=3)
    assert stack.thread_count(cfg, {"physical": 8}) == 3


@pytest.mark.parametrize("threads", [1, 12])
def test_threads_reach_every_backend(threads):
    for backend, frontend in COMBINATIONS:
        cfg = make_cfg(backend=backend, frontend=frontend)
        r = Rendered(cfg, threads)
        if "localai" in cfg.services:
            assert r.service("localai")["environment"]["LOCALAI_THREADS"] == str(threads)
            assert r.model["threads"] == threads
        if "llamacpp" in cfg.services:
            command = r.service("llamacpp")["command"]
            assert command[command.index("--threads") + 1] == str(threads)
            assert command[command.index("--threads-batch") + 1] == str(threads)
        if "textgen" in cfg.services:
            args = r.service("textgen")["environment"]["EXTRA_LAUNCH_ARGS"].split()
            assert args[args.index("--threads") + 1] == str(threads)
            assert args[args.index("--threads-batch") + 1] == str(threads)


def test_render_single_template_matches_rendered_files():
    cfg = make_cfg()
    files = stack.rendered_files(cfg, 4)
    assert stack.render("docker-compose.yaml.j2", cfg, 4) == files["/opt/backchat/docker-compose.yaml"][0]

# Docker's own parser checks every variant in tests/test_realhosts.py, on a trixie host
# where the deploy installed compose v2 (this machine has no compose v2 to run).


# --- when compose up runs, and with how many threads --------------------------------------


def test_stack_out_of_date():
    running = {"services": {"localai": {"want": "h1", "have": "h1", "state": "running"}}}
    assert stack.out_of_date(running, ["localai"]) == []
    assert stack.out_of_date(running, ["localai", "chatbot-ui"]) == ["chatbot-ui"]
    assert stack.out_of_date(None, ["localai"]) == ["localai"]
    changed = {"services": {"localai": {"want": "h2", "have": "h1", "state": "running"}}}
    assert stack.out_of_date(changed, ["localai"]) == ["localai"]
    stopped = {"services": {"localai": {"want": "h1", "have": "h1", "state": "exited"}}}
    assert stack.out_of_date(stopped, ["localai"]) == ["localai"]
