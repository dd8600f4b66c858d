"""A Vagrant box for vagrant-libvirt, built here from the VM test's Debian image, and the
libvirt daemons to run it.

No box can be downloaded here (Vagrant Cloud is not reachable), so ``vagrant_box()`` makes
one the way published Debian boxes are made: a ``vagrant`` user with Vagrant's insecure
public key (Vagrant replaces it with a fresh key on the first ``vagrant up``) and sudo
without a password, on the cached trixie image of ``testbed.vm`` (systemd, sshd, DHCP on
eth0). That image is a bare ext4 filesystem with no bootloader, so the box boots it the way
the VM test does, with the kernel and initrd of /boot: they travel in the box and its own
Vagrantfile points vagrant-libvirt at them. Under QEMU without KVM (``driver = "qemu"``),
as the VM test runs.

A vagrant-libvirt box (format v1) is a tarball of ``box.img`` (qcow2), ``metadata.json``
and a ``Vagrantfile`` merged under the project's.

``Libvirt`` starts ``virtlogd`` and ``libvirtd`` by hand when none runs (containers have no
systemd), and stops only what it started.

Needs root, qemu-utils, mount (a loop device) and chroot, plus vagrant, vagrant-libvirt,
libvirt-daemon-system and dnsmasq-base for booting.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

from testbed import vm as vmh
from testbed.sandbox import CACHE, sh

log = logging.getLogger(__name__)

BOX_DIR = CACHE / "vagrant"
BOX_NAME = "backchat-test/trixie"
# Bump when _add_vagrant_user or the box's Vagrantfile changes: it is part of the box's name.
BOX_RECIPE_VERSION = 1
LIBVIRT_URI = "qemu:///system"
REQUIRED_TOOLS = ("vagrant", "libvirtd", "virtlogd", "virsh", "dnsmasq", "qemu-img", "mount", "chroot")
INSECURE_KEY_GLOBS = (
    "/usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub",  # Debian's package
    "/opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub",  # HashiCorp's
)

# Merged under the project's Vagrantfile when the box is used: how to boot this image.
BOX_VAGRANTFILE = """\
# Boots the bare ext4 image with the kernel that travels in the box (no bootloader), under
# QEMU's emulation: KVM is not dependable on the machines that run the tests.
box_dir = File.dirname(__FILE__)
Vagrant.configure("2") do |config|
  config.vm.provider "libvirt" do |lv|
    lv.driver = "qemu"
    lv.cpu_mode = "custom"
    lv.cpu_model = "qemu64"
    lv.kernel = File.join(box_dir, "vmlinuz")
    lv.initrd = File.join(box_dir, "initrd.img")
    lv.cmd_line = "root=/dev/vda rw console=ttyS0 net.ifnames=0"
  end
end
"""


def unavailable_reason() -> str | None:
    """Why this machine cannot boot the Vagrant box, or None if it can."""
    reason = vmh.unavailable_reason()
    if reason:
        return reason
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool, path=vmh.HOST_PATH) is None]
    if missing:
        return (
            f"the Vagrant box needs {', '.join(missing)} (packages vagrant, vagrant-libvirt, "
            "libvirt-daemon-system, dnsmasq-base)"
        )
    if not insecure_public_key():
        return "Vagrant's insecure public key (keys/vagrant.pub in the vagrant gem) is not installed"
    return None


def insecure_public_key() -> Path | None:
    for pattern in INSECURE_KEY_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return Path(found[-1])
    return None


def box_path() -> Path:
    """Where vagrant_box() caches the box: named after the VM image it is made from."""
    return BOX_DIR / f"{vmh.vm_image_dir().name}-v{BOX_RECIPE_VERSION}.box"


def vagrant_box() -> Path:
    """The cached .box file (built on first use from ``testbed.vm.vm_disk_image()``)."""
    out = box_path()
    if out.is_file():
        return out
    base = vmh.vm_disk_image()
    BOX_DIR.mkdir(parents=True, exist_ok=True)
    with vmh.cached_build(out) as build:
        if build is not None:
            started = time.monotonic()
            raw = build / "disk.img"
            sh("cp", "--sparse=always", base, raw)
            _add_vagrant_user(raw, build / "mnt")
            sh("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, build / "box.img")
            raw.unlink()
            vmlinuz, initrd, _ = vmh.boot_kernel()
            shutil.copyfile(vmlinuz, build / "vmlinuz")
            shutil.copyfile(initrd, build / "initrd.img")
            size_gb = int(vmh.DISK_SIZE.rstrip("G"))
            metadata = {"provider": "libvirt", "format": "qcow2", "virtual_size": size_gb}
            (build / "metadata.json").write_text(json.dumps(metadata) + "\n")
            (build / "Vagrantfile").write_text(BOX_VAGRANTFILE)
            tmp = build / "out.box"
            with tarfile.open(tmp, "w") as box:
                for name in ("metadata.json", "Vagrantfile", "vmlinuz", "initrd.img", "box.img"):
                    box.add(build / name, arcname=name)
            os.rename(tmp, out)
            log.info("built Vagrant box in %.0fs: %s", time.monotonic() - started, out)
    return out


def _add_vagrant_user(raw: Path, mnt: Path) -> None:
    """Vagrant's conventions for a base box: user vagrant, its insecure key, sudo, no password."""
    key = insecure_public_key()
    assert key is not None
    mnt.mkdir()
    sh("mount", "-o", "loop", raw, mnt)
    try:
        env = {"PATH": vmh.HOST_PATH, "LC_ALL": "C"}
        sh("chroot", mnt, "useradd", "--create-home", "--shell", "/bin/bash", "--user-group", "vagrant", env=env)
        ssh_dir = mnt / "home/vagrant/.ssh"
        ssh_dir.mkdir(mode=0o700)
        (ssh_dir / "authorized_keys").write_text(key.read_text())
        (ssh_dir / "authorized_keys").chmod(0o600)
        sh("chroot", mnt, "chown", "-R", "vagrant:vagrant", "/home/vagrant/.ssh", env=env)
        sudoers = mnt / "etc/sudoers.d/vagrant"
        sudoers.write_text("vagrant ALL=(ALL) NOPASSWD: ALL\n")
        sudoers.chmod(0o440)
    finally:
        sh("umount", mnt)


# --------------------------------------------------------------------------- libvirt


class Libvirt:
    """libvirtd and virtlogd for the test: the running ones, or started here (no systemd).

    On exit, stops the daemons it started (never ones it found running).
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._started: list[subprocess.Popen] = []

    def __enter__(self) -> Libvirt:
        if not self.responds():
            env = {"PATH": vmh.HOST_PATH, "LC_ALL": "C"}
            self.workdir.mkdir(parents=True, exist_ok=True)
            for daemon in ("virtlogd", "libvirtd"):
                with open(self.workdir / f"{daemon}.log", "ab") as out:
                    self._started.append(
                        subprocess.Popen([daemon], env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
                    )
            deadline = time.monotonic() + 60
            while not self.responds():
                if time.monotonic() > deadline or any(p.poll() is not None for p in self._started):
                    self.__exit__()
                    log_text = (self.workdir / "libvirtd.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"libvirtd did not come up:\n{log_text}")
                time.sleep(0.5)
        return self

    def responds(self) -> bool:
        return sh("virsh", "-c", LIBVIRT_URI, "version", check=False, timeout=30).returncode == 0

    def __exit__(self, *exc) -> None:
        for proc in reversed(self._started):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._started.clear()


def remove_domains(prefix: str) -> None:
    """Destroy and undefine libvirt domains named ``prefix*`` with their volumes (a crashed run's)."""
    names = sh("virsh", "-c", LIBVIRT_URI, "list", "--all", "--name", check=False).stdout.split()
    for name in names:
        if name.startswith(prefix):
            sh("virsh", "-c", LIBVIRT_URI, "destroy", name, check=False)
            with contextlib.suppress(subprocess.SubprocessError):
                sh("virsh", "-c", LIBVIRT_URI, "undefine", name, "--remove-all-storage", check=False)
