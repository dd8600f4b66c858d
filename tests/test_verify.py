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
