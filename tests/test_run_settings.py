"""Roles from inventory groups, and the checks of a lab with one Backstage (run_settings)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from backchat import run_settings
from backchat.settings import SettingsError


@dataclass
class _Data:
    values: dict

    def dict(self) -> dict:
        return self.values


@dataclass
class FakeHost:
    """What run_settings reads of a pyinfra host: its name, groups and data."""

    name: str
    groups: list[str]
    values: dict = field(default_factory=dict)

    @property
    def data(self) -> _Data:
        return _Data(self.values)


class FakeInventory(list):
    """Hosts, and groups as pyinfra's CLI makes them: the file's groups in order, then
    one named after the file holding every host, then one per connector."""

    def __init__(self, hosts, file_group: str = "inventory"):
        super().__init__(hosts)
        self.groups: dict[str, list] = {}
        for each in hosts:
            for group in each.groups:
                self.groups.setdefault(group, []).append(each)
        self.groups[file_group] = list(hosts)
        for each in hosts:
            each.groups.append(file_group)
            if each.name.startswith("@"):
                self.groups.setdefault("@local", []).append(each)
                each.groups.append("@local")


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("BACKCHAT_API_KEY", "sk-run-settings-test-0123456789")


@pytest.mark.parametrize(
    "groups, lab_has_backstage, expected",
    [
        (["workstations"], False, (True, True)),  # one box: the stack and its own Backstage config
        ([], False, (True, True)),  # a host named on the command line
        (["lab"], False, (True, True)),  # a lab without a Backstage host: each describes itself
        (["lab"], True, (True, False)),  # an AI host of a lab with a Backstage host
        (["backstage"], True, (False, True)),  # the lab's Backstage host only
        (["lab", "backstage"], True, (True, True)),  # both
    ],
)
def test_role_from_groups(groups, lab_has_backstage, expected):
    this = FakeHost("this", list(groups))
    inventory = FakeInventory([this] + ([FakeHost("portal", ["backstage"])] if lab_has_backstage else []))
    role = run_settings.role(inventory, this)
    assert (role.serves_ai, role.writes_backstage) == expected


def test_a_backstage_host_describes_every_ai_host():
    inventory = FakeInventory([FakeHost("ai-01", ["lab"]), FakeHost("portal", ["backstage"]), FakeHost("ai-02", ["lab"])])
    assert [each.name for each in run_settings.ai_hosts(inventory)] == ["ai-01", "ai-02"]
    assert set(run_settings.validate_inventory(inventory)) == {"ai-01", "portal", "ai-02"}


def test_ai_server_host_must_be_an_ai_host_of_the_run():
    inventory = FakeInventory([FakeHost("ai-01", ["lab"]), FakeHost("portal", ["backstage"], {"ai_server_host": "ai-09"})])
    with pytest.raises(SettingsError) as refused:
        run_settings.validate_inventory(inventory)
    assert "ai_server_host = 'ai-09'" in str(refused.value) and "Fix: use one of ai-01" in str(refused.value)


def test_a_backstage_group_without_ai_hosts_is_refused():
    with pytest.raises(SettingsError, match="there are none"):
        run_settings.validate_inventory(FakeInventory([FakeHost("portal", ["backstage"])]))


def test_ai_hosts_with_different_keys_are_refused_for_one_proxy(tmp_path, monkeypatch):
    monkeypatch.delenv("BACKCHAT_API_KEY")
    files = []
    for name in ("a", "b"):
        path = tmp_path / name
        path.write_text(f"sk-key-of-{name}-0123456789\n")
        path.chmod(0o600)
        files.append(str(path))
    hosts = [FakeHost("ai-01", ["lab"], {"api_key_file": files[0]}),
             FakeHost("ai-02", ["lab"], {"api_key_file": files[1]}),
             FakeHost("portal", ["backstage"], {"api_key_file": files[0]})]
    inventory = FakeInventory(hosts)
    with pytest.raises(SettingsError, match="different API keys") as refused:
        run_settings.validate_inventory(inventory)
    assert "sk-key-of" not in str(refused.value)
    # Without a Backstage host, each host may have its own key.
    run_settings.validate_inventory(FakeInventory([FakeHost(each.name, ["lab"], each.values) for each in hosts[:2]]))


def test_pyinfras_own_groups_do_not_make_a_backstage_host_an_ai_host():
    """The file group (every host) and the connector group are pyinfra's, not the user's."""
    inventory = FakeInventory([FakeHost("ai-01", ["lab"]), FakeHost("@local", ["backstage"])])
    assert run_settings.role(inventory, inventory[1]) == run_settings.Role(serves_ai=False, writes_backstage=True)
    both = FakeInventory([FakeHost("ai-01", ["lab", "backstage"]), FakeHost("ai-02", ["lab"])])
    assert run_settings.role(both, both[0]) == run_settings.Role(serves_ai=True, writes_backstage=True)
    assert run_settings.role(both, both[1]) == run_settings.Role(serves_ai=True, writes_backstage=False)


# --- the lab's gateway ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "groups, expected",
    [
        (["gateway"], (False, False, True)),  # the gateway only: no stack, no Backstage config
        (["lab", "gateway"], (True, True, True)),  # an AI host that is the gateway too
        (["backstage", "gateway"], (False, True, True)),  # the portal holds the gateway
    ],
)
def test_the_gateway_role_from_groups(groups, expected):
    this = FakeHost("this", list(groups))
    inventory = FakeInventory([this, FakeHost("ai-01", ["lab"])])
    role = run_settings.role(inventory, this)
    assert (role.serves_ai, role.writes_backstage, role.runs_gateway) == expected
    # The AI host: the stack, and its own Backstage config unless the lab has a Backstage host.
    assert run_settings.role(inventory, inventory[1]) == run_settings.Role(True, "backstage" not in groups, False)


def test_the_gateway_balances_every_ai_host_and_is_found():
    hosts = [FakeHost("ai-01", ["lab"]), FakeHost("gw", ["gateway"]), FakeHost("ai-02", ["lab"])]
    inventory = FakeInventory(hosts)
    run_settings.validate_inventory(inventory)

    class State:
        pass

    state = State()
    state.inventory = inventory
    found = run_settings.lab_gateway(state)
    assert found[0].name == "gw" and found[1].gateway_port == 443
    assert [each.name for each, _ in run_settings.pool_hosts(state)] == ["ai-01", "ai-02"]


def refusal(hosts) -> str:
    with pytest.raises(SettingsError) as refused:
        run_settings.validate_inventory(FakeInventory(hosts))
    message = str(refused.value)
    assert "(nothing was changed)" in message and "Fix:" in message
    return message


def test_two_gateways_are_refused_before_any_host_is_touched():
    message = refusal([FakeHost("ai-01", ["lab"]), FakeHost("gw-1", ["gateway"]), FakeHost("gw-2", ["gateway"])])
    assert "the gateway group holds 2 hosts (gw-1, gw-2); a lab has one gateway" in message


def test_a_gateway_without_ai_hosts_is_refused():
    assert "and there are none" in refusal([FakeHost("gw", ["gateway"])])


def test_a_gateway_needs_chatbot_ui_as_its_gui():
    message = refusal([FakeHost("ai-01", ["lab"]), FakeHost("gw", ["gateway"], {"frontend": "textgen", "backend": "textgen"})])
    assert "frontend = 'textgen'" in message and "Fix: frontend = 'chatbot-ui'" in message


def test_a_gateway_cannot_reach_hosts_that_listen_on_loopback():
    message = refusal([FakeHost("ai-01", ["lab"], {"bind_address": "127.0.0.1"}), FakeHost("ai-02", ["lab"]),
                       FakeHost("gw", ["gateway"])])
    assert "cannot reach ai-01: their services listen on loopback only" in message


def test_a_gateway_checks_one_model_on_every_host():
    message = refusal([FakeHost("ai-01", ["lab"]), FakeHost("ai-02", ["lab"], {"model_id": "gpt-4"}),
                       FakeHost("gw", ["gateway"])])
    assert "ai-01: gpt-3.5-turbo, ai-02: gpt-4" in message


def test_a_gateway_sends_one_key_to_every_host(tmp_path, monkeypatch):
    monkeypatch.delenv("BACKCHAT_API_KEY")
    other = tmp_path / "other"
    other.write_text("sk-another-lab-key-0123456789\n")
    other.chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))  # the default key file: generated here, once
    message = refusal([FakeHost("ai-01", ["lab"]), FakeHost("ai-02", ["lab"], {"api_key_file": str(other)}),
                       FakeHost("gw", ["gateway"])])
    assert "ai-02 expect another key" in message and "sk-another" not in message
    # A host without a key accepts the gateway's; a gateway without a key cannot pass one on.
    run_settings.validate_inventory(FakeInventory([FakeHost("ai-01", ["lab"], {"auth": False}), FakeHost("gw", ["gateway"])]))
    assert "ai-01 expect another key" in refusal([FakeHost("ai-01", ["lab"]), FakeHost("gw", ["gateway"], {"auth": False})])


def test_a_gateway_that_is_an_ai_host_needs_its_own_port():
    message = refusal([FakeHost("ai-01", ["lab", "gateway"], {"gateway_port": 3001}), FakeHost("ai-02", ["lab"])])
    assert "gateway_port = 3001 is also chatbot-ui's port on this host" in message
    # A gateway that is not an AI host may use any port.
    run_settings.validate_inventory(FakeInventory([FakeHost("ai-01", ["lab"]), FakeHost("gw", ["gateway"], {"gateway_port": 3001})]))


def test_a_gateway_checks_every_host_against_one_ca(tmp_path):
    message = refusal([FakeHost("ai-01", ["lab"]), FakeHost("ai-02", ["lab"], {"tls_ca_dir": str(tmp_path / "other")}),
                       FakeHost("gw", ["gateway"])])
    assert "their tls_ca_dir differ" in message and "Fix: one tls_ca_dir for the whole lab" in message
