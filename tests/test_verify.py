"""Verify's decisions, with stand-in probes (the real servers: tests/e2e/test_verify_llama_server.py)."""

import pytest

from backchat.verify import probe_for
from tests.cfg import make_cfg


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


@pytest.mark.parametrize(
    "name, data, bind, expected",
    [
        ("ai-01", {}, "127.0.0.1", "HostProbe"),  # remote, loopback: only the host reaches it
        ("ai-01", {}, "0.0.0.0", "ControllerProbe"),  # remote, on the LAN: as a browser would
        ("@local", {}, "127.0.0.1", "ControllerProbe"),  # the controller is the host
        ("@vagrant/default", {"ssh_hostname": "127.0.0.1"}, "127.0.0.1", "HostProbe"),
    ],
)
def test_loopback_services_of_a_remote_host_are_probed_through_it(name, data, bind, expected):
    from types import SimpleNamespace

    checked = SimpleNamespace(name=name, data=SimpleNamespace(get=lambda key, default=None: data.get(key, default)))
    probe, _address = probe_for(make_cfg(bind_address=bind), checked)
    assert type(probe).__name__ == expected


class _Stack:
    """A backend that serves the model and a GUI answering ``gui`` (status, body) on the
    path its page asks: a stand-in for both HTTP ends of a host."""

    def __init__(self, gui_status=200, gui_body='[{"id": "gpt-3.5-turbo", "name": "GPT-3.5"}]'):
        self.gui = (gui_status, gui_body)
        self.asked = []

    def request(self, method, url, with_key=True, body=None, timeout=10.0):
        from backchat.probes import Answer

        path = "/" + url.split("/", 3)[3]
        self.asked.append((method, path, with_key))
        if path == "/v1/models":
            return Answer(200, '{"data": [{"id": "gpt-3.5-turbo"}]}')
        if path in ("/api/models", "/"):
            return Answer(*self.gui)
        if path == "/v1/chat/completions":
            return Answer(401, "{}")  # without the key
        return Answer(200, "{}")


@pytest.mark.parametrize("frontend, asked", [("chatbot-ui", ("POST", "/api/models", False)), ("textgen", ("GET", "/", False))])
def test_verify_asks_the_gui_the_way_its_page_does(frontend, asked):
    from backchat.verify import check_all

    probe = _Stack()
    results = check_all(make_cfg(backend="llamacpp", frontend=frontend, api_key="sk-0123456789abcdef"), "h", probe)
    assert all(result.ok for result in results) and len(results) >= 2, results
    assert results[-1].service == ("chatbot-ui" if frontend == "chatbot-ui" else "textgen-gui")
    assert asked in probe.asked, "the GUI's key stays server-side: we never send ours to it"


@pytest.mark.parametrize(
    "status, body, words",
    [
        (500, '{"error": "x"}', ["HTTP 500", "refused its key", "Error fetching models"]),
        (200, "[]", ["offers no model", "gpt-3.5-turbo"]),
        (200, '[{"id": "gpt-4"}]', ["offers ['gpt-4']"]),
        (200, "<html>", ["did not answer a model list"]),
    ],
)
def test_a_gui_that_cannot_show_the_model_fails_the_host(status, body, words):
    """Issue 13, defect 7: the backend serves the model, Chatbot UI cannot show it."""
    from backchat.verify import check_all

    cfg = make_cfg(backend="llamacpp", frontend="chatbot-ui", verify_timeout=1)
    results = check_all(cfg, "h", _Stack(status, body))
    assert results[0].ok and not results[-1].ok
    for word in words:
        assert word in results[-1].detail, results[-1].detail


# --- through the lab's gateway -------------------------------------------------------------


def _standings(*pairs):
    from backchat.gateway import Standing

    return [Standing(host, status, "L7OK/200" if status == "UP" else "L4CON", "") for host, status in pairs]


def test_the_gateway_is_checked_as_users_reach_it_and_reports_its_rotation():
    from backchat.verify import check_gateway

    probe = _Stack()
    cfg = make_cfg(backend="llamacpp", api_key="sk-0123456789abcdef", verify_timeout=5)
    results, standings = check_gateway(cfg, "https://gw.lab", probe,
                                       lambda: _standings(("ai-01", "UP"), ("ai-02", "UP")), ["ai-01", "ai-02"])
    assert [r.service for r in results] == ["gateway", "chatbot-ui", "rotation"] and all(r.ok for r in results)
    assert results[-1].detail == "in rotation: ai-01, ai-02"
    assert ("GET", "/v1/models", True) in probe.asked  # through the pool, with the key
    assert ("POST", "/v1/chat/completions", False) in probe.asked  # refused at the door without it
    assert ("POST", "/api/models", False) in probe.asked  # the gateway's GUI


def test_a_host_verified_a_moment_ago_but_out_of_rotation_fails_the_gateway():
    """The host serves the model to the controller, but the gateway cannot reach or check
    it (a firewall, its name, its certificate): the gateway's verify says so."""
    from backchat.verify import check_gateway

    cfg = make_cfg(backend="llamacpp", verify_timeout=1)
    read = lambda: _standings(("ai-01", "UP"), ("ai-02", "DOWN"))  # noqa: E731
    results, _ = check_gateway(cfg, "https://gw.lab", _Stack(), read, ["ai-01", "ai-02"])
    assert not results[-1].ok and "out: ai-02 (DOWN: L4CON)" in results[-1].detail
    # A host that failed its own deploy is named, not waited for.
    results, _ = check_gateway(cfg, "https://gw.lab", _Stack(), read, ["ai-01"])
    assert results[-1].ok and results[-1].detail == "in rotation: ai-01; out: ai-02 (DOWN: L4CON)"


def test_a_gateway_with_nobody_in_rotation_fails():
    from backchat.verify import wait_for_rotation

    result, _ = wait_for_rotation(lambda: _standings(("ai-01", "DOWN")), [], 1)
    assert not result.ok and "in rotation: none" in result.detail


def test_a_gateway_that_lets_a_request_without_the_key_through_fails():
    from backchat.probes import Answer
    from backchat.verify import check_gateway

    class _Open(_Stack):
        def request(self, method, url, with_key=True, body=None, timeout=10.0):
            if url.endswith("/v1/chat/completions"):
                return Answer(200, "{}")
            return super().request(method, url, with_key, body, timeout)

    cfg = make_cfg(backend="llamacpp", api_key="sk-0123456789abcdef", verify_timeout=1)
    results, _ = check_gateway(cfg, "https://gw.lab", _Open(), lambda: _standings(("ai-01", "UP")), ["ai-01"])
    assert not results[0].ok and "not enforced (at the gateway's door)" in results[0].detail
