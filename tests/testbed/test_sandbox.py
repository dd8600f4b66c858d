"""The sandbox harness gives real Debian hosts over SSH, and leaves nothing behind."""

from __future__ import annotations

import contextlib
import functools
import http.server
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed import sandbox
from testbed.sandbox import GATEWAY, SandboxHost, sandbox_hosts

pytestmark = pytest.mark.realhost

SUITES = ["bookworm", "trixie"]


def ssh(host: SandboxHost, *argv: str) -> str:
    return subprocess.run(
        host.ssh_command(*argv), capture_output=True, text=True, check=True, timeout=60
    ).stdout


@contextlib.contextmanager
def serving(directory: Path) -> Iterator[str]:
    """An HTTP server on the gateway for ``directory``'s files; yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
    server = http.server.ThreadingHTTPServer((GATEWAY, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{GATEWAY}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_hosts_over_ssh_http_and_pyinfra_then_nothing_left(tmp_path: Path) -> None:
    with sandbox_hosts(SUITES) as hosts:
        names = [h.name for h in hosts]
        roots = [h.root for h in hosts]
        assert len({h.address for h in hosts}) == 2

        for host in hosts:
            release = ssh(host, "cat", "/etc/os-release")
            assert f"VERSION_CODENAME={host.suite}" in release.splitlines()

        # A host reaches a server the test binds on the gateway.
        (tmp_path / "hello.txt").write_text("hello from the controller\n")
        with serving(tmp_path) as base:
            for host in hosts:
                assert host.run(f"curl -fsS {base}/hello.txt").stdout == "hello from the controller\n"

        # pyinfra's own CLI connects to both with the data the harness hands out.
        inventory = tmp_path / "inventory.py"
        inventory.write_text(f"hosts = {[(h.name, h.pyinfra_data()) for h in hosts]!r}\n")
        result = subprocess.run(
            [sys.executable, "-m", "pyinfra", "--yes", str(inventory), "exec", "--", "uname -a"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )  # fmt: skip
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        for host in hosts:  # e.g. "[trixie-1]   Linux trixie-1 6.1.0 ..."
            assert re.search(rf"^\[{host.name}\] +Linux {host.name} ", output, re.M), output

    assert not {f"bc-{name}" for name in names} & netns_names()
    mounts = Path("/proc/mounts").read_text()
    for root in roots:
        assert f"{root.parent}/" not in mounts
        assert not root.parent.exists()
    if sandbox._network.users == 0:  # no other test's hosts alive: the bridge must be gone
        assert not {n for n in netns_names() if n.startswith("bc-")}
        link = subprocess.run(["ip", "link", "show", sandbox.BRIDGE], capture_output=True)
        assert link.returncode != 0


def test_teardown_runs_when_the_test_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with sandbox_hosts(["bookworm"], names=["doomed"]) as [host]:
            host.run("sleep 600 >/dev/null 2>&1 &")  # a straggler holding the root busy
            raise RuntimeError("boom")
    assert "bc-doomed" not in netns_names()
    assert "/doomed/" not in Path("/proc/mounts").read_text()
    assert not (sandbox.HOSTS_DIR / "doomed").exists()


def test_sshd_stop_start_and_latency_proxy(sandbox_factory) -> None:
    [host] = sandbox_factory(["trixie"])
    host.stop_sshd()
    refused = subprocess.run(host.ssh_command("true"), capture_output=True, timeout=30)
    assert refused.returncode == 255
    host.start_sshd()
    assert ssh(host, "echo", "back") == "back\n"

    port = host.ssh_proxy_with_latency(100)
    argv = host.ssh_command("true")
    argv[argv.index(f"root@{host.address}")] = "root@127.0.0.1"
    started = time.monotonic()
    subprocess.run([*argv[:1], "-p", str(port), *argv[1:]], check=True, timeout=60)
    # An SSH login is several round trips, each now at least 200 ms.
    assert time.monotonic() - started > 0.8


def test_apt_install_through_the_gateway_proxy(sandbox_factory) -> None:
    for host in sandbox_factory(SUITES):
        host.run("apt-get update -q && apt-get install -y -q --no-install-recommends hello")
        assert host.run("hello").stdout == "Hello, world!\n"


def test_a_host_cut_off_from_the_apt_proxy_is_waited_for_and_described(sandbox_factory) -> None:
    """wait_for_apt_proxy returns once the proxy answers again, with a warning that shows
    the network as it was; if it never does, the error shows it. And apt's own failure to
    reach the gateway carries the same description."""
    [host] = sandbox_factory(["trixie"])
    down, up = (f"ip -n {host.netns} link set eth0 {state}".split() for state in ("down", "up"))
    subprocess.run(down, check=True)
    try:
        with pytest.raises(TimeoutError, match=r"(?s)cannot reach the apt proxy.*host link:.*state DOWN"):
            host.wait_for_apt_proxy(timeout=3)
        with pytest.raises(subprocess.CalledProcessError) as failed:
            host.run("apt-get -q -o Acquire::Retries=0 install -y --no-install-recommends hello")
        assert "apt proxy: http://" in "".join(failed.value.__notes__)
        threading.Timer(3, subprocess.run, [up]).start()
        with pytest.warns(UserWarning, match=r"(?s)could not reach the apt proxy for \d+ s.*state DOWN"):
            host.wait_for_apt_proxy(timeout=60)
    finally:
        subprocess.run(up, check=True)
    host.wait_for_apt_proxy(timeout=0)  # reachable: no wait, no warning


def test_remote_commands_and_link_bytes_count_what_a_client_does(sandbox_factory) -> None:
    """What bench/noop_rerun.py and the no-op test count: every command sshd starts, each
    of them on one connection (pyinfra's way) or one per login; bytes both ways."""
    [host] = sandbox_factory(["trixie"])
    commands, link = host.remote_commands(), host.link_bytes()
    for _ in range(3):
        ssh(host, "true")
    assert host.remote_commands() - commands == 3
    assert host.link_bytes() - link > 3 * 1000, "three logins move a few KB"
    # Three commands on one paramiko connection, as pyinfra runs them: three sessions.
    import paramiko

    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(host.address, username="root", key_filename=host.key_path, allow_agent=False, look_for_keys=False)
    try:
        commands = host.remote_commands()
        for _ in range(3):
            _, out, _ = client.exec_command("true")
            out.channel.recv_exit_status()
    finally:
        client.close()
    assert host.remote_commands() - commands == 3


def test_sshd_cpu_counts_what_the_hosts_sessions_used(sandbox_factory) -> None:
    """What bench/noop_rerun.py reports as each host's own CPU: a command's CPU shows once its session has ended."""
    [host] = sandbox_factory(["trixie"])
    before = host.sshd_cpu()
    ssh(host, "i=0; while [ $i -lt 300000 ]; do i=$((i + 1)); done")  # a few tenths of a second of the shell's CPU
    time.sleep(0.5)  # sshd reaps the session after the client has gone
    assert host.sshd_cpu() - before >= 0.05


def test_a_capped_link_carries_no_more_than_its_cap(sandbox_factory, tmp_path: Path) -> None:
    """bench/model_delivery.py --link-mbit: the cap holds (whatever the machine's load, nothing is faster than it),
    and lifting it lets the bytes through at the machine's speed again."""
    [host] = sandbox_factory(["trixie"])
    (tmp_path / "blob").write_bytes(bytes(4 * 1024 * 1024))
    with serving(tmp_path) as base:

        def bytes_per_second() -> float:
            return float(host.run(f"curl -fsS -o /dev/null -w '%{{speed_download}}' {base}/blob").stdout)

        host.limit_link(16)  # 2 MB/s
        try:
            capped = bytes_per_second()
        finally:
            host.limit_link(None)
        free = bytes_per_second()
    assert capped <= 2.2e6, f"{capped:.0f} B/s through a 16 Mbit/s cap"
    assert free > 4 * capped, f"{free:.0f} B/s after the cap was lifted, {capped:.0f} B/s under it"
