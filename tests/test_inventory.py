"""inventory.py's groups, and the Vagrantfile as Vagrant itself reads it."""

import os
import runpy
import shutil
import subprocess

import pytest

from testbed.deploy_runner import PROJECT


def groups(monkeypatch, **env):
    for name in ("BACKCHAT_HOSTS", "BACKCHAT_VAGRANT", "BACKCHAT_BACKSTAGE", "BACKCHAT_GATEWAY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    namespace = runpy.run_path(str(PROJECT / "inventory.py"))
    return {name: namespace[name] for name in ("workstations", "lab", "vagrant", "backstage", "gateway")}


def test_no_hosts_means_this_machine(monkeypatch):
    assert groups(monkeypatch) == {"workstations": ["@local"], "lab": [], "vagrant": [], "backstage": [], "gateway": []}


def test_fleet_from_the_environment(monkeypatch):
    found = groups(monkeypatch, BACKCHAT_HOSTS="ai-01,ai-02,ai-03", BACKCHAT_BACKSTAGE="portal.lab",
                   BACKCHAT_GATEWAY="gw.lab")
    assert found == {"workstations": [], "lab": ["ai-01", "ai-02", "ai-03"], "vagrant": [], "backstage": ["portal.lab"],
                     "gateway": ["gw.lab"]}


def test_a_backstage_host_alone_does_not_make_this_machine_an_ai_host(monkeypatch):
    assert groups(monkeypatch, BACKCHAT_BACKSTAGE="portal.lab")["workstations"] == []
    assert groups(monkeypatch, BACKCHAT_GATEWAY="gw.lab")["workstations"] == []


def test_vagrant_box(monkeypatch):
    assert groups(monkeypatch, BACKCHAT_VAGRANT="1")["vagrant"] == ["@vagrant/default"]


def vagrant_missing():
    if shutil.which("vagrant"):
        return None
    if os.environ.get("BACKCHAT_REQUIRE_REALHOSTS") == "1":
        pytest.fail("vagrant is not installed (Debian package vagrant)")
    pytest.skip("vagrant is not installed (Debian package vagrant)")


def validate(directory):
    # -p: no provider (VirtualBox, libvirt) is installed where the tests run.
    return subprocess.run(["vagrant", "validate", "-p"], cwd=directory, capture_output=True, text=True, timeout=120)


def test_vagrantfile_validates(tmp_path):
    vagrant_missing()
    done = validate(PROJECT)
    assert done.returncode == 0 and "validated successfully" in done.stdout, done.stdout + done.stderr


def test_vagrant_validate_catches_a_broken_file(tmp_path):
    vagrant_missing()
    text = (PROJECT / "Vagrantfile").read_text().replace("config.vm.box =", "config.vm.bogus_setting = 1\n  config.vm.box =")
    (tmp_path / "Vagrantfile").write_text(text)
    done = validate(tmp_path)
    assert done.returncode != 0 and "bogus_setting" in done.stdout + done.stderr
