"""Model delivery against real hosts: every model_source, and the faults it must survive.

Three Debian 13 sandbox hosts (testbed/sandbox.py) get the model from a local
endpoint that speaks the Hub's protocol (testbed/hub.py), through the real pyinfra
CLI and deploy.py. Files are a few MB so the module runs in a couple of minutes; the
benchmark in bench/ does the same with 1 GB.

The tests run in file order and build on each other's hosts (the first deploy installs
Docker on a host; later runs only touch the model).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from testbed.deploy_runner import run_deploy, write_inventory
from testbed.hub import FakeHub
from testbed.sandbox import GATEWAY

pytestmark = pytest.mark.realhost

REPO = "test/delivery-GGUF"
MODEL = "hub.gguf"  # model_source = hub
CONTROLLER_MODEL = "controller.gguf"  # model_source = controller
MIRROR_MODEL = "mirror.gguf"  # model_source = mirror
SIZE = 4 * 1024 * 1024
MODELS = "/opt/backchat/models"


def _bytes(seed: str) -> bytes:
    # Distinct, incompressible-looking content per file, the same on every run.
    out, block = bytearray(), hashlib.sha256(seed.encode()).digest()
    while len(out) < SIZE:
        block = hashlib.sha256(block).digest()
        out += block * 128
    return bytes(out[:SIZE])


FILES = {name: _bytes(name) for name in (MODEL, CONTROLLER_MODEL, MIRROR_MODEL)}
SHA = {name: hashlib.sha256(data).hexdigest() for name, data in FILES.items()}


@pytest.fixture(scope="module")
def hub(hosts):  # the hosts' bridge carries the gateway address it binds to
    with FakeHub(bind=GATEWAY) as hub:
        for name, data in FILES.items():
            hub.add_file(REPO, name, data)
        yield hub


@pytest.fixture(scope="module")
def mirror(hosts):
    """A LAN server holding the mirror file (another FakeHub: plain GETs with ranges)."""
    with FakeHub(bind=GATEWAY) as mirror:
        mirror.add_file(REPO, MIRROR_MODEL, FILES[MIRROR_MODEL])
        yield mirror


@pytest.fixture(scope="module")
def hosts(sandbox_factory):
    return sandbox_factory(["trixie"] * 3, names=["md-1", "md-2", "md-3"])


@pytest.fixture(scope="module")
def controller_dirs(tmp_path_factory):
    """The controller's huggingface_hub cache and backchat's verification cache, per module."""
    base = tmp_path_factory.mktemp("controller")
    return {"HF_HOME": str(base / "hf"), "XDG_CACHE_HOME": str(base / "xdg")}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind((GATEWAY, 0))
        return sock.getsockname()[1]


def deploy(hosts, hub, tmp_path, model=MODEL, env_extra=None, **overrides):
    data = {
        "start": "false",
        "docker_source": "debian",
        "model_repo": REPO,
        "model_file": model,
        "model_revision": "main",
        "model_sha256": "null",
        "hf_endpoint": hub.endpoint(GATEWAY),
        "min_memory_mb": "0",
        "public_address": "ai.lab.test",
        **overrides,
    }
    inventory = write_inventory(tmp_path / "inventory.py", {h.name: h.pyinfra_data() for h in hosts})
    env = {**os.environ, **(env_extra or {})}
    env.pop("HF_TOKEN", None)
    env.pop("HF_ENDPOINT", None)
    run = run_deploy(inventory, *(f"{key}={value}" for key, value in data.items()), env=env)
    if os.environ.get("BACKCHAT_KEEP_LOGS"):
        with open(os.environ["BACKCHAT_KEEP_LOGS"], "a") as log:
            log.write(f"\n===== {data} exit {run.returncode}\n{run.stderr}\n")
    return run


def sha_on(host, name: str) -> str | None:
    done = host.run(f"sha256sum {MODELS}/{name}", check=False)
    return done.stdout.split()[0] if done.returncode == 0 else None


def marker_on(host, name: str) -> dict:
    return json.loads(host.run(f"cat {MODELS}/.{name}.verified").stdout)


def report_of(run) -> str:
    """The Backchat report's table and its lines (not the time-per-step table after it)."""
    return run.stderr.split("--> Backchat report:")[-1].split("--> Backchat time per step")[0]


def failed_hosts(run) -> list[str]:
    """Hosts the run failed. When every host failed pyinfra stops ("No hosts remaining!")
    with neither JSON results nor the Backchat report, so pyinfra's own error lines count."""
    if "--> Backchat report:" in run.stderr:
        report = report_of(run)
        return sorted(line.split()[0] for line in report.strip().splitlines()[1:] if " FAILED " in f"{line} ")
    return sorted(set(re.findall(r"^\s*\[([\w.-]+)\] Error", run.stderr, re.M)))


def served(server, name: str) -> int:
    return server.bytes_served.get(name, 0)


# Each test states what the hosts must hold before it starts, so any one test runs alone.


def forget(host, name: str) -> None:
    """The host holds nothing of ``name``: no file, no partial download, no marker."""
    host.run(f"rm -f {MODELS}/{name} {MODELS}/{name}.part {MODELS}/.{name}.verified")


def holding(host, hub, tmp_path, name: str = MODEL) -> None:
    """The host holds ``name``, verified (a deploy; a no-op when it already does)."""
    if sha_on(host, name) != SHA[name]:
        forget(host, name)
        run = deploy([host], hub, tmp_path, model=name)
        assert run.returncode == 0, run
    assert sha_on(host, name) == SHA[name]


@pytest.fixture(scope="module")
def controller_runs(hosts, hub, tmp_path_factory, controller_dirs):
    """The controller pushes CONTROLLER_MODEL to every host, then a second run finds nothing to do."""
    tmp_path = tmp_path_factory.mktemp("controller-runs")
    for host in hosts:
        forget(host, CONTROLLER_MODEL)
    first = deploy(hosts, hub, tmp_path, model=CONTROLLER_MODEL, model_source="controller", env_extra=controller_dirs)
    again = deploy(hosts, hub, tmp_path, model=CONTROLLER_MODEL, model_source="controller", env_extra=controller_dirs)
    return first, again


# --- hub: a transfer killed half-way resumes on the next run --------------------------


def test_killed_transfer_fails_clearly_and_the_next_run_resumes(hosts, hub, tmp_path):
    host = hosts[0]
    forget(host, MODEL)
    # Every GET of the file is cut after 512 KiB: all five attempts of the script fail.
    hub.drop_after(MODEL, 512 * 1024, times=1000)
    try:
        broken = deploy([host], hub, tmp_path)
    finally:
        hub.drop_after(MODEL, 0, times=0)  # the link is fixed
    assert broken.returncode != 0, broken
    assert failed_hosts(broken) == [host.name], broken
    assert f"[{host.name}] download of {MODELS}/{MODEL} failed: download failed: giving up after 5 attempts" in broken.stderr
    assert "the next run resumes from there" in broken.stderr, broken
    part = int(host.run(f"stat -c %s {MODELS}/{MODEL}.part").stdout)
    assert 0 < part < SIZE
    assert sha_on(host, MODEL) is None

    before = served(hub, MODEL)
    fixed = deploy([host], hub, tmp_path)
    assert fixed.returncode == 0, fixed
    second = served(hub, MODEL) - before
    assert second == SIZE - part < SIZE, "the second run started from zero"
    assert sha_on(host, MODEL) == SHA[MODEL]
    assert marker_on(host, MODEL)["sha256"] == SHA[MODEL]
    assert host.run(f"test -e {MODELS}/{MODEL}.part", check=False).returncode != 0


# --- a no-op re-run reads nothing of the model ---------------------------------------


def test_noop_rerun_does_not_open_the_model(hosts, hub, tmp_path):
    host = hosts[0]
    holding(host, hub, tmp_path)
    trace = tmp_path / "openat.trace"
    # Everything the host's sshd and its children open during the run (sessions, facts,
    # commands). The model's path must not be among them.
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "trace=openat,open", "-o", str(trace), "-p", str(host._sshd.pid)],
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1)  # attached
    try:
        before = served(hub, MODEL)
        run = deploy([host], hub, tmp_path)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(10)
    assert run.returncode == 0, run
    assert run.changed_ops() == [], run
    assert served(hub, MODEL) == before
    opened = trace.read_text()
    assert "/opt/backchat/models/.hub.gguf.verified" in opened, "the trace saw nothing: strace did not attach"
    assert f'"{MODELS}/{MODEL}"' not in opened, "the model file was opened on a no-op run"


# --- a corrupted file is found and replaced -------------------------------------------


def test_corruption_with_the_mtime_restored_is_found_by_full_verify(hosts, hub, tmp_path):
    host = hosts[0]
    holding(host, hub, tmp_path)
    path = f"{MODELS}/{MODEL}"
    # Flip bytes in the middle; same size, and the mtime put back, so the marker still matches.
    host.run(
        f"touch -r {path} /tmp/mtime && printf 'CORRUPT' | dd of={path} bs=1 seek=100000 conv=notrunc 2>/dev/null "
        f"&& touch -r /tmp/mtime {path}"
    )
    assert sha_on(host, MODEL) != SHA[MODEL]

    trusting = deploy([host], hub, tmp_path)  # marker mode: stat agrees, the file is not read
    assert trusting.returncode == 0 and trusting.changed_ops() == [], trusting

    before = served(hub, MODEL)
    full = deploy([host], hub, tmp_path, model_verify="full")
    assert full.returncode == 0, full
    assert "does not match sha256" in full.stderr, full
    assert sha_on(host, MODEL) == SHA[MODEL]
    assert served(hub, MODEL) - before == SIZE


def test_a_changed_mtime_makes_marker_mode_check_again(hosts, hub, tmp_path):
    host = hosts[0]
    holding(host, hub, tmp_path)
    path = f"{MODELS}/{MODEL}"
    host.run(f"touch -d '2001-01-01' {path}")  # content intact, stat disagrees with the marker
    before = served(hub, MODEL)
    intact = deploy([host], hub, tmp_path)
    assert intact.returncode == 0, intact
    assert "existing file verified" in intact.stderr, intact
    assert served(hub, MODEL) == before, "an intact file was downloaded again"

    host.run(f"printf 'CORRUPT' | dd of={path} bs=1 seek=5 conv=notrunc 2>/dev/null")  # mtime changes
    corrupt = deploy([host], hub, tmp_path)
    assert corrupt.returncode == 0, corrupt
    assert sha_on(host, MODEL) == SHA[MODEL]
    assert served(hub, MODEL) - before == SIZE


# --- not enough disk --------------------------------------------------------------------


def test_not_enough_disk_stops_before_downloading(hosts, hub, tmp_path):
    host = hosts[1]
    models = host.root / MODELS.lstrip("/")
    models.mkdir(parents=True, exist_ok=True)
    # The host's sshd lives in the mount namespace `ip netns exec` gave it: mount the 1 MB
    # tmpfs there, so the deploy's sessions see it (the controller's namespace would not do).
    in_sshd_ns = ["nsenter", "-t", str(host._sshd.pid), "-m"]
    subprocess.run([*in_sshd_ns, "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(models)], check=True)
    try:
        before = served(hub, MODEL)
        run = deploy([host], hub, tmp_path)
        df = subprocess.run([*in_sshd_ns, "df", "-P", "-k", str(models)], capture_output=True, text=True, check=True)
        free = int(df.stdout.splitlines()[-1].split()[3]) * 1024
        leftovers = subprocess.run([*in_sshd_ns, "ls", "-A", str(models)], capture_output=True, text=True).stdout.split()
    finally:
        subprocess.run([*in_sshd_ns, "umount", str(models)], check=True)
    assert run.returncode != 0, run
    assert failed_hosts(run) == [host.name], run
    assert f"not enough disk for the model in {MODELS}: {free:,} bytes free, {SIZE:,} needed" in run.stderr, run
    assert served(hub, MODEL) == before, "bytes were downloaded"
    assert leftovers == []
    assert "Starting operation: Download and verify" not in run.stderr, run


# --- upstream unreachable ---------------------------------------------------------------


def test_unreachable_upstream_fails_only_hosts_without_the_model(hosts, hub, tmp_path):
    holder, empty = hosts[0], hosts[1]
    holding(holder, hub, tmp_path)
    forget(empty, MODEL)
    run = deploy([holder, empty], hub, tmp_path, hf_endpoint=f"http://{GATEWAY}:{closed_port()}")
    assert run.returncode != 0, run
    assert failed_hosts(run) == [empty.name], run
    report = report_of(run)
    assert f"{empty.name}: could not reach http://{GATEWAY}:" in report, report
    assert "Fix: check the network" in report
    lines = {line.split()[0]: line for line in report.strip().splitlines()[1:3]}
    assert "FAILED" in lines[empty.name] and "FAILED" not in lines[holder.name], report
    assert sha_on(holder, MODEL) == SHA[MODEL]


# --- model_source = controller ------------------------------------------------------------


def test_controller_downloads_once_and_pushes_to_every_host(hosts, hub, controller_runs, controller_dirs):
    run, again = controller_runs
    assert run.returncode == 0, run
    assert served(hub, CONTROLLER_MODEL) == SIZE, "upstream served more than one copy"
    for host in hosts:
        assert sha_on(host, CONTROLLER_MODEL) == SHA[CONTROLLER_MODEL], host
        marker = marker_on(host, CONTROLLER_MODEL)
        assert marker["url"] == "pushed by the controller" and marker["sha256"] == SHA[CONTROLLER_MODEL]
    # The file sits in huggingface_hub's normal cache, linked from its snapshot.
    cache = controller_dirs["HF_HOME"] + "/hub/models--test--delivery-GGUF"
    linked = subprocess.run(["sh", "-c", f"ls {cache}/snapshots/*/{CONTROLLER_MODEL}"], capture_output=True, text=True)
    assert linked.returncode == 0, linked.stderr

    assert again.returncode == 0 and again.changed_ops() == [], again
    assert served(hub, CONTROLLER_MODEL) == SIZE
    # Through the system's OpenSSH client (this machine has one), once per host.
    assert len(re.findall(rf"pushed {SIZE:,} bytes \(resumed at 0\) in [\d.]+s, \d+ MB/s over OpenSSH", run.stderr)) == 3, run


def test_controller_push_resumes_and_does_not_rehash_its_copy(hosts, hub, tmp_path, controller_dirs, controller_runs):
    host = hosts[2]
    path = f"{MODELS}/{CONTROLLER_MODEL}"
    half = SIZE // 2
    # As if a push was cut half-way: a .part holding the first half, no file, no marker.
    host.run(f"mv {path} {path}.part && truncate -s {half} {path}.part && rm {MODELS}/.{CONTROLLER_MODEL}.verified")
    run = deploy([host], hub, tmp_path, model=CONTROLLER_MODEL, model_source="controller", env_extra=controller_dirs)
    assert run.returncode == 0, run
    assert f"pushed {SIZE - half:,} bytes (resumed at {half:,})" in run.stderr, run
    assert "verified earlier, not re-read" in run.stderr, "the controller hashed its copy again"
    assert served(hub, CONTROLLER_MODEL) == SIZE
    assert sha_on(host, CONTROLLER_MODEL) == SHA[CONTROLLER_MODEL]

    # A .part whose prefix is junk: the host's check fails, the push starts over, whole.
    host.run(f"mv {path} {path}.part && truncate -s {half} {path}.part && printf 'JUNK' | dd of={path}.part bs=1 seek=10 conv=notrunc 2>/dev/null")
    host.run(f"rm {MODELS}/.{CONTROLLER_MODEL}.verified")
    junk = deploy([host], hub, tmp_path, model=CONTROLLER_MODEL, model_source="controller", env_extra=controller_dirs)
    assert junk.returncode == 0, junk
    assert "pushing it whole" in junk.stderr, junk
    assert sha_on(host, CONTROLLER_MODEL) == SHA[CONTROLLER_MODEL]


def test_controller_with_the_hub_down_pushes_its_verified_copy_for_a_pinned_sha(
    hosts, hub, tmp_path, controller_dirs, controller_runs
):
    host = hosts[1]
    host.run(f"rm -f {MODELS}/{CONTROLLER_MODEL} {MODELS}/.{CONTROLLER_MODEL}.verified")
    down = {"hf_endpoint": f"http://{GATEWAY}:{closed_port()}", "model_source": "controller"}
    unpinned = deploy([host], hub, tmp_path, model=CONTROLLER_MODEL, env_extra=controller_dirs, **down)
    assert unpinned.returncode != 0, unpinned
    assert "model_sha256 is not set" in unpinned.stderr, unpinned

    pinned = deploy(
        [host], hub, tmp_path, model=CONTROLLER_MODEL, env_extra=controller_dirs,
        model_sha256=SHA[CONTROLLER_MODEL], **down,
    )
    assert pinned.returncode == 0, pinned
    assert sha_on(host, CONTROLLER_MODEL) == SHA[CONTROLLER_MODEL]


# --- model_source = mirror -------------------------------------------------------------------


def test_mirror_serves_the_hosts_and_upstream_serves_nothing(hosts, hub, mirror, tmp_path):
    for host in hosts:
        forget(host, MIRROR_MODEL)
    before = served(mirror, MIRROR_MODEL)
    url = mirror.url(REPO, MIRROR_MODEL, host=GATEWAY)
    run = deploy(hosts, hub, tmp_path, model=MIRROR_MODEL, model_source="mirror", model_mirror_url=url)
    assert run.returncode == 0, run
    assert served(hub, MIRROR_MODEL) == 0
    assert served(mirror, MIRROR_MODEL) - before == 3 * SIZE
    for host in hosts:
        assert sha_on(host, MIRROR_MODEL) == SHA[MIRROR_MODEL]
        assert marker_on(host, MIRROR_MODEL)["url"] == url


def test_mirror_with_the_hub_down_needs_a_pinned_sha(hosts, hub, mirror, tmp_path):
    host = hosts[0]
    host.run(f"rm -f {MODELS}/{MIRROR_MODEL} {MODELS}/.{MIRROR_MODEL}.verified")
    url = mirror.url(REPO, MIRROR_MODEL, host=GATEWAY)
    down = {"hf_endpoint": f"http://{GATEWAY}:{closed_port()}", "model_source": "mirror", "model_mirror_url": url}
    unpinned = deploy([host], hub, tmp_path, model=MIRROR_MODEL, **down)
    assert unpinned.returncode != 0, unpinned
    assert "model_sha256 is not set, so there is nothing to check the mirror's copy against" in unpinned.stderr

    pinned = deploy([host], hub, tmp_path, model=MIRROR_MODEL, model_sha256=SHA[MIRROR_MODEL], **down)
    assert pinned.returncode == 0, pinned
    assert sha_on(host, MIRROR_MODEL) == SHA[MIRROR_MODEL]


# --- the controller push: through OpenSSH, and over paramiko when it cannot ---------------


def fake_ssh(tmp_path, body: str):
    """A client named by BACKCHAT_SSH: logs its argv (one word a line), then ``body``."""
    log = tmp_path / "ssh-argv.log"
    script = tmp_path / "ssh"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >>{log}\necho ---- >>{log}\n{body}\n')
    script.chmod(0o755)
    return script, log


def test_controller_push_streams_through_openssh_with_no_command_in_its_argv(
    hosts, hub, tmp_path, controller_dirs, controller_runs
):
    host = hosts[0]
    path = f"{MODELS}/{CONTROLLER_MODEL}"
    half = SIZE // 2
    # Its own starting point: a later deploy of another model removes this one (model change).
    if sha_on(host, CONTROLLER_MODEL) != SHA[CONTROLLER_MODEL]:
        placed = deploy([host], hub, tmp_path, model=CONTROLLER_MODEL, model_source="controller",
                        env_extra=controller_dirs)
        assert placed.returncode == 0, placed
    host.run(f"mv {path} {path}.part && truncate -s {half} {path}.part && rm {MODELS}/.{CONTROLLER_MODEL}.verified")
    client, log = fake_ssh(tmp_path, 'exec ssh "$@"')
    env = {**controller_dirs, "BACKCHAT_SSH": str(client)}
    run = deploy([host], hub, tmp_path, model=CONTROLLER_MODEL, model_source="controller", env_extra=env)
    assert run.returncode == 0, run
    assert f"pushed {SIZE - half:,} bytes (resumed at {half:,})" in run.stderr and "over OpenSSH" in run.stderr, run
    assert sha_on(host, CONTROLLER_MODEL) == SHA[CONTROLLER_MODEL]
    (argv,) = [call.splitlines() for call in log.read_text().split("----\n") if call.strip()]
    assert argv[-2:] == [host.address, "exec sh -c 'echo backchat-stream-ready; IFS= read -r command && eval \"$command\"'"]
    assert not [word for word in argv if "cat >>" in word or MODELS in word], argv  # the command went on stdin
    assert "StrictHostKeyChecking=yes" in argv and "BatchMode=yes" in argv, argv


def test_controller_push_goes_over_paramiko_when_openssh_cannot_connect(
    hosts, hub, tmp_path, controller_dirs, controller_runs
):
    host = hosts[0]
    forget(host, CONTROLLER_MODEL)
    # As ssh says when the host's key is not the one pinned, or the key is refused.
    client, log = fake_ssh(tmp_path, 'echo "Host key verification failed." >&2; exit 255')
    env = {**controller_dirs, "BACKCHAT_SSH": str(client)}
    run = deploy([host], hub, tmp_path, model=CONTROLLER_MODEL, model_source="controller", env_extra=env)
    assert run.returncode == 0, run
    assert "the system ssh client could not connect (exit 255: Host key verification failed.); pushing over paramiko" in run.stderr, run
    assert f"pushed {SIZE:,} bytes (resumed at 0)" in run.stderr and "over paramiko" in run.stderr, run
    assert sha_on(host, CONTROLLER_MODEL) == SHA[CONTROLLER_MODEL]
    assert log.read_text().count("----") == 1

    # BACKCHAT_SSH=none: paramiko without trying.
    forget(host, CONTROLLER_MODEL)
    env = {**controller_dirs, "BACKCHAT_SSH": "none"}
    run = deploy([host], hub, tmp_path, model=CONTROLLER_MODEL, model_source="controller", env_extra=env)
    assert run.returncode == 0 and "over paramiko" in run.stderr and "system ssh client" not in run.stderr, run
    assert sha_on(host, CONTROLLER_MODEL) == SHA[CONTROLLER_MODEL]
