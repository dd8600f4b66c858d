"""transport: its fixes of pyinfra's behaviour (checked against pyinfra's own code where
they replace it), and the OpenSSH command line the model push streams through.

The push must reach the host pyinfra's own connection reaches, trust only the host key that
connection accepted, never prompt, and hold no command (a command may carry a sudo
password; any local user can read a process's argv).
"""

import os
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
import pyinfra
import pytest
from pyinfra.api import util as pyinfra_util

from backchat import transport

pyinfra_operation = transport.pyinfra_operation  # the module (pyinfra.api exports a decorator of that name)


@pytest.fixture
def replaced(monkeypatch):
    """The replacement of get_operation_order_from_stack (pyinfra's own is put back after)."""
    monkeypatch.setattr(pyinfra_operation, "get_operation_order_from_stack", pyinfra_util.get_operation_order_from_stack)
    transport.order_operations_without_inspect()
    ours = pyinfra_operation.get_operation_order_from_stack
    assert ours is not pyinfra_util.get_operation_order_from_stack
    transport.order_operations_without_inspect()  # a second call changes nothing
    assert pyinfra_operation.get_operation_order_from_stack is ours
    return ours


def deeper(depth, state, ours):
    if depth:
        return deeper(depth - 1, state, ours)
    return pyinfra_util.get_operation_order_from_stack(state), ours(state)  # one line: one f_lineno


@pytest.mark.parametrize("cli", [False, True])
@pytest.mark.parametrize("deploy_file", [__file__, None, "/nowhere/deploy.py"])
def test_operation_order_is_the_one_pyinfra_computes(replaced, monkeypatch, cli, deploy_file):
    monkeypatch.setattr(pyinfra, "is_cli", cli)
    state = SimpleNamespace(current_deploy_filename=deploy_file, current_op_file_number=2)
    theirs, ours = deeper(3, state, replaced)
    assert ours == theirs
    assert len(ours) > 3 or deploy_file == "/nowhere/deploy.py", "the test's own frames are counted"


def test_global_argument_types_are_pyinfras_own(monkeypatch):
    arguments, facts = transport.pyinfra_arguments, transport.pyinfra_facts
    original = arguments.all_global_arguments
    monkeypatch.setattr(arguments, "all_global_arguments", original)
    monkeypatch.setattr(facts, "all_global_arguments", original)
    transport.remember_global_argument_types()
    assert arguments.all_global_arguments is facts.all_global_arguments is not original
    assert arguments.all_global_arguments() == original() and len(original()) > 10
    # Callers get their own list, as from pyinfra's.
    arguments.all_global_arguments().clear()
    assert arguments.all_global_arguments() == original()


def test_global_arguments_from_host_data_are_pyinfras_own(monkeypatch):
    from pyinfra.api import Config, Inventory, State

    arguments = transport.pyinfra_arguments
    original = arguments.pop_global_arguments
    modules = (arguments, transport.pyinfra_operation, transport.pyinfra_facts, transport.pyinfra_deploy)
    for module in modules:
        monkeypatch.setattr(module, "pop_global_arguments", original)
    transport.read_host_data_once_per_call()
    ours = arguments.pop_global_arguments
    assert ours is not original and all(module.pop_global_arguments is ours for module in modules)
    transport.read_host_data_once_per_call()  # a second call changes nothing
    assert arguments.pop_global_arguments is ours

    inventory = Inventory(
        (["plain", ("own", {"_sudo": True, "_env": {"A": "1"}, "_sudo_user": "carol"})], {"_shell_executable": "bash"}),
        lab=(["plain", "own"], {"_sudo_user": "bob", "_timeout": 30}),
    )
    state = State(inventory, Config())
    for host in inventory:
        host.data._chdir = "/override"  # the override layer comes first
        for kwargs in ({}, {"_chdir": "/x", "name": "n", "other": 1}, {"_sudo": False, "_env": {"B": "2"}}):
            theirs, ours_args = dict(kwargs), dict(kwargs)
            assert ours(state, host, ours_args) == original(state, host, theirs)
            assert ours_args == theirs  # the same keys popped


class FakeTransport:
    def __init__(self, key):
        self.key, self.host_key_type = key, key.get_name()

    def is_active(self):
        return True

    def get_remote_server_key(self):
        return self.key

    def get_username(self):
        return "deployer"


def fake_host(key=None, **data):
    key = key or paramiko.Ed25519Key.from_private_key_file(_ed25519_key_file())
    client = SimpleNamespace(get_transport=lambda: FakeTransport(key))
    defaults = {"ssh_hostname": "10.0.0.5", "ssh_port": 2222, "ssh_key": "~/.ssh/lab", "ssh_allow_agent": True}
    connector = SimpleNamespace(client=client, data={**defaults, **data})
    host = SimpleNamespace(name="ai-01", connector=connector, state=SimpleNamespace(config=SimpleNamespace(CONNECT_TIMEOUT=7)))
    return host, client, key


_KEY_DIR: list[Path] = []


def _ed25519_key_file() -> str:
    """A throw-away ed25519 key (paramiko cannot generate ed25519 itself; cryptography can,
    and a fresh machine running the unit tests has no ssh-keygen)."""
    if not _KEY_DIR:
        _KEY_DIR.append(Path(tempfile.mkdtemp(prefix="backchat-test-key-")))
        pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        (_KEY_DIR[0] / "key").write_bytes(pem)
    return str(_KEY_DIR[0] / "key")


@pytest.fixture(autouse=True)
def ssh_on_path(monkeypatch):
    monkeypatch.delenv(transport.SSH_CLIENT_ENV, raising=False)
    monkeypatch.setattr(transport.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "ssh" else None)


def options(argv: list[str]) -> dict[str, str]:
    return dict(argv[i + 1].split("=", 1) for i, arg in enumerate(argv) if arg == "-o")


def test_the_argv_reaches_the_same_host_pins_its_key_and_holds_no_command(tmp_path):
    host, client, key = fake_host()
    known = tmp_path / "known_hosts"
    argv = transport.openssh_argv(host, client, str(known))
    assert argv[0] == "/usr/bin/ssh"
    assert argv[-3:] == ["--", "10.0.0.5", transport._REMOTE]
    assert argv[argv.index("-l") + 1] == "deployer" and argv[argv.index("-p") + 1] == "2222"
    assert argv[argv.index("-i") + 1] == str(Path("~/.ssh/lab").expanduser())
    opts = options(argv)
    assert opts["BatchMode"] == "yes" and opts["StrictHostKeyChecking"] == "yes"
    assert opts["UserKnownHostsFile"] == str(known) and opts["GlobalKnownHostsFile"] == "/dev/null"
    assert opts["HostKeyAlgorithms"] == "ssh-ed25519" and opts["IdentitiesOnly"] == "yes"
    assert opts["ControlPath"] == "none" and opts["RemoteCommand"] == "none" and opts["ConnectTimeout"] == "7"
    assert opts["Ciphers"].startswith("aes128-gcm@openssh.com,") and "sntrup" not in opts["KexAlgorithms"]
    # Only the key paramiko accepted, under an alias that no real known_hosts entry has.
    assert known.read_text() == f"{opts['HostKeyAlias']} ssh-ed25519 {key.get_base64()}\n"
    # The command (its sudo password, its paths) is never in the argv: it goes on stdin.
    assert transport._REMOTE == (
        "exec sh -c 'echo backchat-stream-ready; IFS= read -r command && eval \"$command\"'"
    )


def test_without_a_key_the_agent_setting_is_kept(tmp_path):
    host, client, _ = fake_host(ssh_key=None, ssh_allow_agent=False, ssh_port=None, ssh_config_file="~/lab.conf")
    argv = transport.openssh_argv(host, client, str(tmp_path / "k"))
    assert "-i" not in argv and "-p" not in argv and options(argv)["IdentityAgent"] == "none"
    assert argv[argv.index("-F") + 1] == str(Path("~/lab.conf").expanduser())


@pytest.mark.parametrize(
    "data, env",
    [
        ({"ssh_password": "hunter2"}, None),  # BatchMode cannot type a password: paramiko
        ({"ssh_key_password": "hunter2"}, None),  # nor a key's passphrase
        ({}, "none"),  # BACKCHAT_SSH=none: paramiko only
    ],
)
def test_paramiko_when_ssh_cannot_or_must_not(tmp_path, monkeypatch, data, env):
    if env:
        monkeypatch.setenv(transport.SSH_CLIENT_ENV, env)
    host, client, _ = fake_host(**data)
    assert transport.openssh_argv(host, client, str(tmp_path / "k")) is None
    assert not (tmp_path / "k").exists()


def test_no_client_installed_means_paramiko(tmp_path, monkeypatch):
    monkeypatch.setattr(transport.shutil, "which", lambda name: None)
    host, client, _ = fake_host()
    assert transport.openssh_argv(host, client, str(tmp_path / "k")) is None


def test_a_host_certificate_means_paramiko(tmp_path):
    cert = SimpleNamespace(get_name=lambda: "ssh-ed25519-cert-v01@openssh.com", get_base64=lambda: "AAAA")
    host, client, _ = fake_host(key=cert)
    assert transport.openssh_argv(host, client, str(tmp_path / "k")) is None


def test_the_file_goes_through_the_pipe_from_the_offset(tmp_path):
    source = tmp_path / "model"
    source.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    read_end, write_end = os.pipe()
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(iter_read(read_end)))
    reader.start()
    sent = transport._send_range(str(source), 1000, source.stat().st_size - 1000, write_end)
    os.close(write_end)
    reader.join()
    assert sent == len(received) == source.stat().st_size - 1000
    assert bytes(received) == source.read_bytes()[1000:]


def iter_read(fd):
    while chunk := os.read(fd, 65536):
        yield from chunk
    os.close(fd)


def test_batches_follow_the_inventorys_order():
    """pyinfra cuts an operation's batches from state.active_hosts: after prepare_run they
    come in the inventory's order, and stay so as pyinfra adds and fails hosts in place."""
    names = [f"ai-{n:02d}" for n in range(12)]
    state = SimpleNamespace(inventory=names, active_hosts=set(reversed(names[:-1])))
    transport.run_hosts_in_inventory_order(state)
    assert list(state.active_hosts) == names[:-1]
    state.active_hosts.add(names[-1])
    state.active_hosts -= {"ai-03"}
    assert list(state.active_hosts) == [name for name in names if name != "ai-03"]
    transport.run_hosts_in_inventory_order(state)  # once per host of a run: the same set stays
    assert list(state.active_hosts)[:2] == ["ai-00", "ai-01"]


def test_facts_read_ahead_answer_once_and_only_while_planning(monkeypatch):
    """``read_ahead``: one command; then each fact is answered from it once, with the same
    arguments, while planning; anything else (other arguments, a second read, executing)
    goes to pyinfra as before."""
    from backchat.facts import ModelFile, PhysicalCores, Together

    class Host:  # pyinfra's Host, as far as get_fact goes
        def __init__(self):
            self.state = SimpleNamespace(is_executing=False)
            self.asked = []

        def get_fact(self, cls, *args, **kwargs):
            self.asked.append((cls, kwargs))
            if cls is Together:
                return ["cores", "@@backchat-fact 0 0", "@@backchat-fact 1 0"]
            return "read alone"

    monkeypatch.setattr(transport, "pyinfra_host", SimpleNamespace(Host=Host))
    monkeypatch.setattr(PhysicalCores, "process", lambda self, output: output)
    host = Host()
    model = {"path": "/m.gguf", "marker": "/.m.gguf.verified"}
    transport.read_ahead(host, [(PhysicalCores, {}), (ModelFile, model)])
    assert [cls for cls, _ in host.asked] == [Together], "one command"
    assert host.get_fact(PhysicalCores) == ["cores"]
    assert host.get_fact(ModelFile, **model) == ModelFile().default(), "no output: the fact's default, as pyinfra"
    assert host.get_fact(PhysicalCores) == "read alone", "answered once"
    transport.read_ahead(host, [(PhysicalCores, {}), (ModelFile, model)])
    assert host.get_fact(ModelFile, path="/other.gguf", marker="/.other") == "read alone"
    host.state.is_executing = True
    assert host.get_fact(PhysicalCores) == "read alone", "executing: read afresh"
