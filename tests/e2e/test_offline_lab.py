"""A model change, and LocalAI's backend from the controller, on real Debian 13 hosts over SSH.

Two sandbox hosts (testbed/sandbox.py) with start = False (no Docker daemon runs there),
the models from the local Hub stand-in (testbed/hub.py), through the real pyinfra CLI and
deploy.py:

* model A, then model B: A stays while B downloads and when B fails to arrive, goes once
  B is verified (with start = False nothing runs on either: B verified and its config
  written is the end of the run), and stays with keep_old_models; the disk check refuses B
  when A and B do not fit together, and A is still there.
* localai_backend_archive: the backend's files land, unpacked and checked, in the host
  directory the compose file mounts as LocalAI's backends path, in the layout LocalAI
  v4.9.0's source reads (backchat/localai_backend.py cites where). LocalAI itself is NOT
  run: its image cannot be pulled here, and the archive is a stand-in with the real one's
  layout (testbed/localai_backend.py). A second run sends nothing, a new archive replaces
  the backend, uninstall.py removes it (twice: the second changes nothing).
"""

from __future__ import annotations

import subprocess

import pytest
import yaml

from testbed.deploy_runner import run_deploy
from testbed.localai_backend import write_backend_archive
from tests.e2e.test_model_delivery import (  # noqa: F401 (hub: the fixture, for these hosts)
    MIRROR_MODEL,
    MODEL,
    MODELS,
    SHA,
    SIZE,
    deploy,
    failed_hosts,
    hub,
    served,
    sha_on,
)

pytestmark = pytest.mark.realhost

OLD, NEW = MODEL, MIRROR_MODEL  # two models the Hub stand-in serves (4 MiB each)
STACK = "/opt/backchat"


@pytest.fixture(scope="module")
def hosts(sandbox_factory):
    # Overrides test_model_delivery's hosts for its hub fixture: the hub binds once hosts exist.
    return sandbox_factory(["trixie", "trixie"], names=["off-1", "off-2"])


def listing(host) -> list[str]:
    return sorted(host.run(f"ls -A {MODELS}").stdout.split())


def holding_only_old(host, hub, tmp_path) -> None:
    """The host holds model A, verified, and no other model (each test starts here)."""
    host.run(f"rm -f {MODELS}/*.gguf* {MODELS}/.*.verified")
    run = deploy([host], hub, tmp_path, model=OLD)
    assert run.returncode == 0, run
    assert sha_on(host, OLD) == SHA[OLD]


# --- a model change ------------------------------------------------------------------------


def test_the_old_model_stays_until_the_new_one_is_verified_then_goes(hosts, hub, tmp_path):
    host = hosts[0]
    holding_only_old(host, hub, tmp_path)

    hub.drop_after(NEW, 256 * 1024, times=1000)  # B never arrives whole
    try:
        broken = deploy([host], hub, tmp_path, model=NEW)
    finally:
        hub.drop_after(NEW, 0, times=0)
    assert broken.returncode != 0 and failed_hosts(broken) == [host.name], broken
    assert sha_on(host, OLD) == SHA[OLD], "the old model went before the new one was verified"
    assert f".{OLD}.verified" in listing(host)
    assert sha_on(host, NEW) is None
    assert "Remove the previous model" not in broken.stderr, broken

    changed = deploy([host], hub, tmp_path, model=NEW)
    assert changed.returncode == 0, changed
    assert sha_on(host, NEW) == SHA[NEW]
    assert listing(host) == sorted([f".{NEW}.verified", NEW, f"{NEW}.lock", "gpt-3.5-turbo.yaml"]), "the old model's files are left"
    assert f"Remove the previous model ({OLD}): {NEW} is verified and running" in changed.stderr, changed
    model_config = yaml.safe_load(host.run(f"cat {MODELS}/gpt-3.5-turbo.yaml").stdout)
    assert model_config["parameters"]["model"] == NEW

    again = deploy([host], hub, tmp_path, model=NEW)
    assert again.returncode == 0 and again.changed_ops() == [], again


def test_keep_old_models_keeps_the_previous_file(hosts, hub, tmp_path):
    host = hosts[1]
    holding_only_old(host, hub, tmp_path)
    kept = deploy([host], hub, tmp_path, model=NEW, keep_old_models="true")
    assert kept.returncode == 0, kept
    assert sha_on(host, OLD) == SHA[OLD] and sha_on(host, NEW) == SHA[NEW]
    assert f"keep_old_models: kept {OLD} ({SIZE:,} bytes) in {MODELS}" in kept.stderr, kept

    before = served(hub, OLD)
    back = deploy([host], hub, tmp_path, model=OLD, keep_old_models="true")  # switching back downloads nothing
    assert back.returncode == 0, back
    assert served(hub, OLD) == before
    assert sha_on(host, NEW) == SHA[NEW]


def test_the_disk_check_counts_the_old_model_beside_the_new_one(hosts, hub, tmp_path):
    host = hosts[1]
    models = host.root / MODELS.lstrip("/")
    models.mkdir(parents=True, exist_ok=True)
    host.run(f"rm -f {MODELS}/*.gguf* {MODELS}/.*.verified")
    # 6 MiB: room for A (4 MiB) or B, not both. In the mount namespace of the host's sshd,
    # as in test_model_delivery's disk test.
    in_sshd_ns = ["nsenter", "-t", str(host._sshd.pid), "-m"]
    subprocess.run([*in_sshd_ns, "mount", "-t", "tmpfs", "-o", "size=6m,mode=0755", "tmpfs", str(models)], check=True)
    try:
        first = deploy([host], hub, tmp_path, model=OLD)
        assert first.returncode == 0, first
        before = served(hub, NEW)
        refused = deploy([host], hub, tmp_path, model=NEW)
        left = subprocess.run([*in_sshd_ns, "sha256sum", f"{models}/{OLD}"], capture_output=True, text=True).stdout
    finally:
        subprocess.run([*in_sshd_ns, "umount", str(models)], check=True)
    assert refused.returncode != 0 and failed_hosts(refused) == [host.name], refused
    assert f"{SIZE:,} needed, beside the previous model, kept until the new one runs: {OLD} ({SIZE:,} bytes)" in (
        refused.stderr
    ), refused
    assert served(hub, NEW) == before, "bytes were downloaded"
    assert left.split()[0] == SHA[OLD]


# --- LocalAI's backend from the controller ---------------------------------------------------


def test_the_backend_lands_where_localai_reads_it_and_is_sent_once(hosts, hub, tmp_path):
    host = hosts[0]
    archive = tmp_path / "llama-cpp.tar.gz"
    sha = write_backend_archive(archive)
    offline = {"localai_backend_archive": str(archive), "localai_backend_sha256": sha}
    host.run(f"rm -rf {STACK}/localai-backends")

    run = deploy([host], hub, tmp_path, **offline)
    assert run.returncode == 0, run
    assert f"LocalAI's llama-cpp backend: {archive.stat().st_size:,} bytes sent, sha256 checked" in run.stderr, run

    # Follow the files the way LocalAI would: the compose file's mount for its backends
    # path, then the model config's backend name, to a directory holding an executable
    # run.sh (LocalAI v4.9.0 core/gallery/backends.go:662-695, pkg/model/process.go:237).
    compose = yaml.safe_load(host.run(f"cat {STACK}/docker-compose.yaml").stdout)
    localai = compose["services"]["localai"]
    backends_path = localai["environment"]["LOCALAI_BACKENDS_PATH"]
    assert "LOCALAI_EXTERNAL_BACKENDS" not in localai["environment"]
    assert localai["environment"]["LOCALAI_BACKEND_GALLERIES"] == "[]"
    mounts = {volume.split(":")[1]: volume.split(":") for volume in localai["volumes"]}
    source, _, mode = mounts[backends_path]
    assert mode == "ro"
    backend = yaml.safe_load(host.run(f"cat {MODELS}/gpt-3.5-turbo.yaml").stdout)["backend"]
    run_sh = f"{source}/{backend}/run.sh"
    assert host.run(f"test -f {run_sh} && test ! -L {run_sh} && test -x {run_sh}", check=False).returncode == 0
    assert host.run(f"cat {source}/{backend}/llama-cpp-cpu-all").stdout == "stand-in binary 1\n"
    assert host.run(f"stat -c %U {run_sh}").stdout.strip() == "root"

    again = deploy([host], hub, tmp_path, **offline)
    assert again.returncode == 0 and again.changed_ops() == [], again
    assert "bytes sent" not in again.stderr

    newer = tmp_path / "newer.tar.gz"
    newer_sha = write_backend_archive(newer, version="2")
    updated = deploy([host], hub, tmp_path, localai_backend_archive=str(newer), localai_backend_sha256=newer_sha)
    assert updated.returncode == 0, updated
    assert host.run(f"cat {source}/{backend}/llama-cpp-cpu-all").stdout == "stand-in binary 2\n"
    assert host.run(f"ls -A {source}").stdout.split() == [".llama-cpp.sha256", "llama-cpp"]

    newer_data = (f"localai_backend_archive={newer}", f"localai_backend_sha256={newer_sha}")
    removed = run_deploy(tmp_path / "inventory.py", *newer_data, command="uninstall.py")
    assert removed.returncode == 0, removed
    assert host.run(f"test -e {source}", check=False).returncode != 0, "uninstall left the unpacked backend"
    twice = run_deploy(tmp_path / "inventory.py", *newer_data, command="uninstall.py")
    assert twice.returncode == 0 and twice.changed_ops() == [], twice


def test_an_archive_that_is_not_the_pinned_one_stops_the_run_before_any_host(hosts, hub, tmp_path):
    host = hosts[1]
    archive = tmp_path / "llama-cpp.tar.gz"
    sha = write_backend_archive(archive)
    host.run(f"rm -rf {STACK}/localai-backends")
    pinned = "f" * 64  # not digits only: --data would read that as a number
    run = deploy([host], hub, tmp_path, localai_backend_archive=str(archive), localai_backend_sha256=pinned)
    assert run.returncode != 0, run
    assert f"has sha256 {sha}, not localai_backend_sha256 {pinned}" in run.stderr, run
    assert host.run(f"test -e {STACK}/localai-backends", check=False).returncode != 0
