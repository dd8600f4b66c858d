"""The verify step against a real OpenAI-compatible server: llama-server from Debian's
llama.cpp-tools, in a sid root, serving a tiny GGUF model the test writes."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from backchat.probes import ControllerProbe, HostProbe
from backchat.secrets import Secret
from backchat.verify import ask, check_all, key_is_enforced, wait_for_model
from tests.cfg import make_cfg
from testbed.deploy_runner import PROJECT
from testbed.llama_server import LlamaServer, free_port
from testbed.tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.realhost

KEY = "sk-test-key-1234"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture(scope="module")
def server(model):
    with LlamaServer(model, alias="gpt-3.5-turbo") as running:
        yield running


@pytest.fixture(scope="module")
def keyed_server(model):
    with LlamaServer(model, alias="gpt-3.5-turbo", api_key=KEY) as running:
        yield running


def test_model_listed_passes(server):
    result = wait_for_model("llamacpp", server.url, "gpt-3.5-turbo", ControllerProbe(None), timeout=10)
    assert result.ok and "gpt-3.5-turbo" in result.model_ids, result


def test_server_started_late_passes_after_retries(model):
    with LlamaServer(model, start_delay=4) as late:
        result = wait_for_model("llamacpp", late.url, "gpt-3.5-turbo", ControllerProbe(None), timeout=90)
    assert result.ok, result
    assert result.seconds >= 3, "it can only have passed after the server came up"


def test_wrong_alias_names_the_cause(model):
    with LlamaServer(model, alias="mistral-7b-openorca.Q4_K_M.gguf") as wrong:
        result = wait_for_model("llamacpp", wrong.url, "gpt-3.5-turbo", ControllerProbe(None), timeout=3)
    assert not result.ok
    assert "mistral-7b-openorca.Q4_K_M.gguf" in result.detail and "Chatbot UI will show no model" in result.detail


def test_server_down_fails_clearly_within_the_timeout():
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = wait_for_model("localai", url, "gpt-3.5-turbo", ControllerProbe(None), timeout=4)
    assert not result.ok and "connection refused" in result.detail and "gave up after" in result.detail
    assert time.monotonic() - started < 4 + 10, "the timeout bounds the wait"


def test_wrong_path_is_a_404(server):
    result = wait_for_model("localai", f"{server.url}/not-here", "gpt-3.5-turbo", ControllerProbe(None), timeout=2)
    assert not result.ok and "404" in result.detail and "wrong port or path" in result.detail


def test_api_key_given_and_not_given(keyed_server):
    assert wait_for_model("llamacpp", keyed_server.url, "gpt-3.5-turbo", ControllerProbe(Secret(KEY)), timeout=10).ok
    refused = wait_for_model("llamacpp", keyed_server.url, "gpt-3.5-turbo", ControllerProbe(None), timeout=2)
    assert not refused.ok and "401" in refused.detail and "API key" in refused.detail
    assert key_is_enforced(keyed_server.url, ControllerProbe(Secret(KEY))) is None


def test_key_not_enforced_is_reported(server):
    assert "not enforced" in key_is_enforced(server.url, ControllerProbe(None))


def test_chat_completion_is_well_formed(keyed_server):
    first_line, seconds = ask(keyed_server.url, "gpt-3.5-turbo", ControllerProbe(Secret(KEY)), timeout=120)
    assert isinstance(first_line, str) and first_line and seconds >= 0


def test_check_all_uses_the_settings(keyed_server):
    cfg = make_cfg(
        backend="llamacpp", localai_port=keyed_server.port, api_key=KEY,
        verify_timeout=10, verify_chat=True, chat_timeout=120,
    )
    result, gui = check_all(cfg, "127.0.0.1", ControllerProbe(cfg.api_key))
    assert result.ok, result
    assert result.url == keyed_server.url and result.detail.startswith("answered in")
    # Then the GUI the user opens (Chatbot UI, port 3001): none runs here, and verify says so.
    assert gui.service == "chatbot-ui" and not gui.ok and "the GUI did not answer" in gui.detail, gui


def test_waiting_is_reported_while_it_lasts(model):
    notes = []
    with LlamaServer(model, start_delay=4) as late:
        result = wait_for_model("llamacpp", late.url, "gpt-3.5-turbo", ControllerProbe(None), timeout=90, on_wait=notes.append, every=1)
    assert result.ok
    assert notes and all(note.startswith("still waiting for llamacpp") for note in notes), notes


def test_verify_works_under_pyinfra_gevent_patching(server):
    """pyinfra monkey-patches the process with gevent; httpx must still work there."""
    code = (
        "from gevent import monkey; monkey.patch_all()\n"
        "import sys\n"
        "from backchat.probes import ControllerProbe\n"
        "from backchat.verify import wait_for_model\n"
        f"result = wait_for_model('llamacpp', {server.url!r}, 'gpt-3.5-turbo', ControllerProbe(None), timeout=10)\n"
        "sys.exit(0 if result.ok else f'not ok: {result}')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]


# --- services bound to loopback on a remote host are checked through the host ----------------


@pytest.fixture(scope="module")
def local_host():
    """pyinfra's own @local connector: the host probe's curl runs as it would over SSH."""
    from pyinfra.api import Config, Inventory, State
    from pyinfra.api.connect import connect_all

    inventory = Inventory((["@local"], {}))
    state = State(inventory, Config())
    connect_all(state)
    return inventory.get_host("@local")


def test_the_host_probe_sends_the_key_from_the_env_file_not_the_command_line(keyed_server, local_host, tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(f"# written by backchat\nBACKCHAT_API_KEY={KEY}\n")
    env_file.chmod(0o600)
    probe = HostProbe(local_host, str(env_file))
    assert wait_for_model("llamacpp", keyed_server.url, "gpt-3.5-turbo", probe, timeout=10).ok
    assert key_is_enforced(keyed_server.url, probe) is None
    answer, _ = ask(keyed_server.url, "gpt-3.5-turbo", probe, timeout=120)
    assert isinstance(answer, str) and answer
    # Without the file's key, the same server refuses: the key really came from the file.
    refused = wait_for_model("llamacpp", keyed_server.url, "gpt-3.5-turbo", HostProbe(local_host, ""), timeout=2)
    assert not refused.ok and "401" in refused.detail


def test_the_host_probe_names_a_closed_port(local_host):
    result = wait_for_model("llamacpp", f"http://127.0.0.1:{free_port()}", "gpt-3.5-turbo", HostProbe(local_host, ""), timeout=2)
    assert not result.ok and "connection refused" in result.detail
