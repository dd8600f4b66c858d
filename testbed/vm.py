"""A real Debian 13 VM for end-to-end tests: systemd, a real kernel, room for a Docker engine.

``vm_disk_image()`` builds (once; cached by recipe hash) a raw ext4 image from a trixie
debootstrap root with systemd, sshd and networkd, plus the kernel modules of the kernel in
/boot that boots it (dockerd needs overlay, nf_tables, br_netfilter...). ``TestVM`` boots
that image under QEMU (TCG: KVM guests hang on the CI machines) on a copy-on-write overlay,
so the cached image stays clean and every run starts from the same state.

Networking is QEMU's user mode (slirp): the guest is 10.0.2.15 and sees the controller's
127.0.0.1 as 10.0.2.2. The controller reaches the guest only through forwarded ports on
127.0.0.1 (SSH, and whatever the test asks for), or another loopback address (``bind``).
apt in the guest goes through ``sandbox.AptProxy`` (only the Debian mirror), bound on the
controller's 127.0.0.1.

Several hosts without several installs: ``TestVM.freeze()`` keeps a deployed VM's disk as a
qcow2 base, and ``TestVM(base=..., bind="127.0.0.2")`` boots a clone of it that the
controller reaches at 127.0.0.2 on the same port numbers (``boot_all`` boots them side by
side). Every slirp network is private to its QEMU, so clones sharing the machine-id, SSH
host keys and Docker state of the original do not meet.

``llama_image_tar()`` is the stand-in for the llama.cpp server image: the cached sid root of
``llama_server`` plus curl (the upstream image has curl; backchat's healthcheck uses it).
``docker_archive()`` wraps such a rootfs as a ``docker save`` tarball (for the deploy's
``image_archives`` setting) without needing Docker on the controller;
``failing_image_archive()`` is a kilobyte one whose image cannot start (a broken release).

Needs root (debootstrap, chroot), qemu-system-x86, qemu-utils, e2fsprogs (mkfs.ext4 -d),
openssh-client and a kernel + initrd in /boot with its modules in /lib/modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from testbed import llama_server
from testbed.sandbox import CACHE, MIRROR, AptProxy, flock, remove_tree, sh, ssh_host_data

log = logging.getLogger(__name__)

VM_DIR = CACHE / "vm"
SUITE = "trixie"
INCLUDE = (
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "iproute2",
    "ca-certificates",
    "curl",
    "sudo",
    "udev",
    "kmod",
    "python3",
    "gnupg",
    "procps",
)
DISK_SIZE = "8G"
GUEST_HOSTNAME = "backchat-vm"
# Bump when _configure_root changes: it is part of the cache key.
VM_RECIPE_VERSION = 1

# QEMU user networking: the controller's loopback as the guest sees it, and slirp's DNS.
SLIRP_HOST = "10.0.2.2"
SLIRP_DNS = "10.0.2.3"

QEMU = "qemu-system-x86_64"
REQUIRED_TOOLS = (QEMU, "qemu-img", "mkfs.ext4", "debootstrap", "chroot", "ssh", "scp", "ssh-keygen")
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SSH_TIMEOUT = 300.0


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port free on ``address`` right now (for a hostfwd: QEMU binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def unavailable_reason() -> str | None:
    """Why this machine cannot boot test VMs, or None if it can."""
    if os.geteuid() != 0:
        return "test VMs need root (debootstrap, chroot)"
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"test VMs need {', '.join(missing)} (packages qemu-system-x86, qemu-utils, e2fsprogs, debootstrap)"
    try:
        boot_kernel()
    except FileNotFoundError as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------- kernel


def _version_key(version: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"[.-]", version)]


def boot_kernel() -> tuple[Path, Path, str]:
    """(vmlinuz, initrd, version) of the newest kernel in /boot that has its modules.

    This is the kernel the VM boots, not the controller's running one (which may be a
    hypervisor's kernel with no modules here), so its modules are what the image gets.
    BACKCHAT_VM_KERNEL=/boot/vmlinuz-X picks one.
    """
    wanted = os.environ.get("BACKCHAT_VM_KERNEL")
    candidates = [Path(wanted)] if wanted else sorted(
        Path("/boot").glob("vmlinuz-*"), key=lambda p: _version_key(p.name[len("vmlinuz-"):])
    )
    for vmlinuz in reversed(candidates):
        version = vmlinuz.name[len("vmlinuz-"):]
        initrd = vmlinuz.with_name(f"initrd.img-{version}")
        if vmlinuz.is_file() and initrd.is_file() and Path(f"/lib/modules/{version}").is_dir():
            return vmlinuz, initrd, version
    raise FileNotFoundError(
        "no kernel in /boot with an initrd and /lib/modules/<version> (package linux-image-amd64)"
    )


def _kernel_build(version: str) -> str:
    """The kernel package's version: a rebuilt kernel with the same ABI gets a new image."""
    proc = sh("dpkg-query", "-W", "-f", "${Version}", f"linux-image-{version}", check=False)
    if proc.returncode == 0 and proc.stdout.strip():
        return proc.stdout.strip()
    stat = Path(f"/lib/modules/{version}/modules.dep").stat()
    return f"{stat.st_size}-{int(stat.st_mtime)}"


# --------------------------------------------------------------------------- disk image


def _recipe() -> dict:
    _, _, version = boot_kernel()
    return {
        "suite": SUITE,
        "mirror": MIRROR,
        "variant": "minbase",
        "include": sorted(INCLUDE),
        "kernel": version,
        "kernel_build": _kernel_build(version),
        "disk_size": DISK_SIZE,
        "version": VM_RECIPE_VERSION,
    }


def vm_image_dir() -> Path:
    """CACHE/vm/<suite>-<recipe hash>/ holding disk.img and the SSH key that opens it."""
    digest = hashlib.sha256(json.dumps(_recipe(), sort_keys=True).encode()).hexdigest()
    return VM_DIR / f"{SUITE}-{digest[:12]}"


def vm_disk_image() -> Path:
    """The cached raw ext4 image (8G sparse) of a bootable trixie root; built on first use.

    Its directory also holds ``id_ed25519``, the key in root's authorized_keys. The image is
    built in a temporary directory and renamed into place, so a present one is complete.
    Never boot it directly: TestVM boots a qcow2 overlay on top of it.
    """
    dest = vm_image_dir()
    if (dest / "disk.img").is_file():
        return dest / "disk.img"
    VM_DIR.mkdir(parents=True, exist_ok=True)
    with flock(VM_DIR / f"{dest.name}.lock"):
        if (dest / "disk.img").is_file():
            return dest / "disk.img"
        for stale in VM_DIR.glob(f".build-{dest.name}-*"):  # an interrupted build
            remove_tree(stale)
        build = Path(tempfile.mkdtemp(prefix=f".build-{dest.name}-", dir=VM_DIR))
        try:
            started = time.monotonic()
            root = build / "root"
            sh(
                "debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}",
                SUITE, root, MIRROR,
            )  # fmt: skip
            key = build / "id_ed25519"
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "backchat-vm-tests", "-f", key)
            _configure_root(root, key.with_suffix(".pub").read_text())
            sh("truncate", "-s", DISK_SIZE, build / "disk.img")
            sh("mkfs.ext4", "-q", "-F", "-L", "backchat-root", "-d", root, build / "disk.img")
            remove_tree(root)
            (build / "recipe.json").write_text(json.dumps(_recipe(), indent=2, sort_keys=True) + "\n")
            build.chmod(0o755)
            os.rename(build, dest)
            log.info("built VM image in %.0fs: %s", time.monotonic() - started, dest)
        except BaseException:
            remove_tree(build)
            raise
    return dest / "disk.img"


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _configure_root(root: Path, public_key: str) -> None:
    """Make the debootstrap root a bootable, reachable VM (slirp network, key-only root SSH)."""
    env = {"PATH": HOST_PATH, "LC_ALL": "C"}
    etc = root / "etc"
    _write(etc / "hostname", f"{GUEST_HOSTNAME}\n")
    _write(etc / "hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{GUEST_HOSTNAME}\n")
    _write(etc / "fstab", "/dev/vda / ext4 defaults,errors=remount-ro 0 1\n")
    _write(etc / "systemd/network/20-eth0.network", "[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n")
    sh("chroot", root, "systemctl", "enable", "systemd-networkd.service", env=env)
    (etc / "resolv.conf").unlink(missing_ok=True)
    _write(etc / "resolv.conf", f"nameserver {SLIRP_DNS}\n")
    # Snapshot mirrors may serve an expired Release file; no translations saves downloads.
    _write(
        etc / "apt/apt.conf.d/90backchat-vm",
        'Acquire::Check-Valid-Until "false";\nAcquire::Languages "none";\n',
    )
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    _write(ssh_dir / "authorized_keys", public_key, 0o600)
    if not list((etc / "ssh").glob("ssh_host_*_key")):
        sh("chroot", root, "ssh-keygen", "-A", env=env)
    # The booted kernel's modules (copied into /usr/lib: trixie's /lib is a link to it).
    _, _, version = boot_kernel()
    modules = root / "usr/lib/modules"
    modules.mkdir(parents=True, exist_ok=True)
    sh("cp", "-a", f"/lib/modules/{version}", modules)
    sh("chroot", root, "apt-get", "clean", env=env)


# --------------------------------------------------------------------------- llama image


# curl: the compose healthcheck; python3: the Chatbot UI stand-in (testbed/chatbot_ui_standin.py);
# nginx: the front door (Debian's, standing in for the official image).
LLAMA_IMAGE_PACKAGES = ("curl", "python3", "nginx")
# Translations and docs: a quarter of the root, and `docker import` in a TCG guest is slow.
LLAMA_IMAGE_EXCLUDES = ("./usr/share/locale/*", "./usr/share/doc/*", "./usr/share/man/*", "./usr/share/info/*")
LLAMA_IMAGE_RECIPE_VERSION = 4


def llama_image_tar_path() -> Path:
    """Where llama_image_tar() caches its tarball (named by the base root and recipe)."""
    recipe = {
        "base": llama_server.root_name(),
        "packages": list(LLAMA_IMAGE_PACKAGES),
        "excludes": list(LLAMA_IMAGE_EXCLUDES),
        "version": LLAMA_IMAGE_RECIPE_VERSION,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return CACHE / "roots" / f"{llama_server.root_name()}-image-{digest}.tar"


def llama_image_tar() -> Path:
    """A cached rootfs tarball for ``docker import``: llama_server's sid root + curl.

    The upstream llama.cpp server image has curl and backchat's compose healthcheck runs
    ``curl -fsS http://localhost:8080/health`` in the container; ``llama_rootfs_tar()``
    (minbase + llama.cpp-tools) has none, so this adds it in a copy of that root, and
    leaves out translations and docs.
    """
    out = llama_image_tar_path()
    if out.is_file():
        return out
    base = llama_server.llama_root()
    with cached_build(out) as build:
        if build is not None:
            root = build / "root"
            sh("cp", "-a", "--reflink=auto", base, root)
            env = {"PATH": HOST_PATH, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}
            # A private mount namespace: its /proc goes away with it, even if we crash.
            script = (
                'mount -t proc proc "$1/proc" && chroot "$1" sh -c '
                '"apt-get update && apt-get install -y $2 && apt-get clean"'
            )
            sh(
                "unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                root, " ".join(LLAMA_IMAGE_PACKAGES), env=env,
            )  # fmt: skip
            shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
            (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
            tmp = build / "image.tar"
            cmd = ["tar", "-C", str(root), "--numeric-owner", "--xattrs", "--one-file-system"]
            cmd += [f"--exclude={pat}" for pat in (*llama_server._TAR_EXCLUDES, *LLAMA_IMAGE_EXCLUDES)]
            sh(*cmd, "-cf", tmp, ".")
            os.rename(tmp, out)
    return out


@contextlib.contextmanager
def cached_build(out: Path) -> Iterator[Path | None]:
    """Build the cached file ``out`` once across processes: under its lock, None if another
    process built it meanwhile, else a fresh directory beside it (where an interrupted
    build's are removed first), removed afterwards. Rename the result into ``out``."""
    with flock(out.parent / f"{out.name}.lock"):
        if out.is_file():
            yield None
            return
        for stale in out.parent.glob(f".build-{out.name}-*"):
            remove_tree(stale)
        build = Path(tempfile.mkdtemp(prefix=f".build-{out.name}-", dir=out.parent))
        try:
            yield build
        finally:
            remove_tree(build)


def docker_archive(layer: Path, images: Mapping[str, Mapping], with_layer: bool = True) -> Path:
    """A cached ``docker save``-format tarball: for ``docker load`` with no Docker here.

    ``layer`` is a rootfs tarball (e.g. ``llama_image_tar()``), the one layer of every
    image; ``images`` maps each ``repo:tag`` to its image config (``Entrypoint``,
    ``StopSignal``...). The images share the layer, so Docker stores it once.

    ``with_layer=False`` leaves the layer's bytes out: a kilobyte archive of new images on
    an old layer. ``docker load`` reads a layer only if it lacks it, so this loads on a
    host that has the layer already (from an archive with it), and fails on any other.
    """
    stat = layer.stat()
    key = {"layer": [layer.name, stat.st_size, int(stat.st_mtime)], "images": images, "version": 1}
    if not with_layer:  # only then: archives made before this option keep their names
        key["with_layer"] = False
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    out = CACHE / "roots" / f"images-{digest}.tar"
    if out.is_file():
        return out
    with flock(out.with_name(f"{out.name}.lock")):
        if out.is_file():
            return out
        sha = hashlib.sha256()
        with open(layer, "rb") as fh:
            while chunk := fh.read(1 << 20):
                sha.update(chunk)
        diff_id = f"sha256:{sha.hexdigest()}"
        layer_path = f"{sha.hexdigest()}/layer.tar"
        members: dict[str, bytes] = {}
        manifest = []
        for tag, config in images.items():
            blob = json.dumps(
                {
                    "architecture": "amd64",
                    "os": "linux",
                    "created": "2000-01-01T00:00:00Z",
                    "config": {"Env": [f"PATH={HOST_PATH}"], **config},
                    "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                    "history": [{"created": "2000-01-01T00:00:00Z", "created_by": "backchat tests"}],
                },
                sort_keys=True,
            ).encode()
            name = f"{hashlib.sha256(blob).hexdigest()}.json"
            members[name] = blob
            manifest.append({"Config": name, "RepoTags": [tag], "Layers": [layer_path]})
        members = {"manifest.json": json.dumps(manifest).encode(), **members}
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            with tarfile.open(tmp, "w") as archive:
                for name, data in members.items():  # manifest first: readers find it fast
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 946684800, 0o644
                    archive.addfile(info, io.BytesIO(data))
                if with_layer:
                    archive.add(layer, arcname=layer_path, recursive=False)
            os.rename(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return out


# An image's entrypoint that no layer has: its containers are created, and fail to start.
MISSING_ENTRYPOINT = "/backchat-test/no-such-entrypoint"


def empty_layer() -> Path:
    """A cached rootfs tarball with nothing in it (a valid layer of 10 KB)."""
    out = CACHE / "roots" / "empty-layer.tar"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with cached_build(out) as build:
        if build is not None:
            with tarfile.open(build / "layer.tar", "w"):
                pass
            os.rename(build / "layer.tar", out)
    return out


def failing_image_archive(tag: str) -> Path:
    """A cached ``docker save`` tarball (kilobytes) of ``tag`` as an image that fails to
    start: an empty layer and an entrypoint that is not there (a broken release)."""
    return docker_archive(empty_layer(), {tag: {"Entrypoint": [MISSING_ENTRYPOINT]}})


# --------------------------------------------------------------------------- the VM


class TestVM:
    """A booted trixie VM on a throwaway overlay of ``vm_disk_image()`` (or of ``base``, a
    qcow2 disk from ``freeze()``).

    ``ports`` maps guest TCP ports to controller ports on ``bind`` (None: a free one); by
    default guest 8080 gets a free port. SSH (guest 22) is always forwarded, on ``bind``
    too. Use as a context manager: it boots and waits for SSH (``SSH_TIMEOUT``), and on
    exit powers the guest off (then kills QEMU), stops the apt proxy and deletes the
    overlay. The serial console log and QEMU's own output stay in ``workdir``.
    """

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(
        self,
        workdir: Path | None = None,
        ports: Mapping[int, int | None] | None = None,
        memory_mb: int = 6144,
        cpus: int = 2,
        base: Path | None = None,
        bind: str = "127.0.0.1",
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else None
        self._wanted_ports = dict({8080: None} if ports is None else ports)
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.base = Path(base).resolve() if base else None
        self.bind = bind
        self.ssh_port = 0
        self.key_path = ""
        self.apt_proxy_url = ""
        self.boot_seconds = 0.0
        self._ports: dict[int, int] = {}
        self._qemu: subprocess.Popen | None = None
        self._launched = 0.0
        self._stack = contextlib.ExitStack()

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> TestVM:
        try:
            self.launch()
            self.wait_until_up()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def launch(self) -> None:
        """Start QEMU and return at once (``wait_until_up`` waits for SSH); ``__exit__``
        undoes it. For booting several VMs side by side (``boot_all``)."""
        if not self.key_path:
            self._prepare()
        overlay = self._overlay_path
        overlay.unlink(missing_ok=True)
        if self.base is None:
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", vm_disk_image(), "-F", "raw", overlay)
        else:
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", self.base, "-F", "qcow2", overlay)
        fwds = [f"hostfwd=tcp:{self.bind}:{self.ssh_port}-:22"]
        fwds += [f"hostfwd=tcp:{self.bind}:{h}-:{g}" for g, h in self._ports.items()]
        vmlinuz, initrd, _ = boot_kernel()
        cmd = [
            QEMU, "-accel", "tcg", "-cpu", "max", "-smp", str(self.cpus), "-m", str(self.memory_mb),
            "-nographic", "-monitor", "none", "-serial", f"file:{self.serial_log_path}",
            "-kernel", str(vmlinuz), "-initrd", str(initrd),
            "-append", "root=/dev/vda rw console=ttyS0 net.ifnames=0",
            "-drive", f"file={overlay},format=qcow2,if=virtio,cache=unsafe",
            "-netdev", "user,id=n0," + ",".join(fwds), "-device", "virtio-net-pci,netdev=n0",
            "-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=rng0",
        ]  # fmt: skip
        self._launched = time.monotonic()
        with open(self.workdir / "qemu.log", "ab") as qemu_log:
            self._qemu = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=qemu_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in pytest must not kill it before teardown
                preexec_fn=llama_server._die_with_parent,  # nor may it outlive a killed pytest
            )

    def wait_until_up(self, timeout: float = SSH_TIMEOUT) -> None:
        """Wait for SSH on the boot ``launch`` started (``boot_seconds``: how long it took
        from the launch), then point apt at this VM's proxy."""
        self._wait_for_ssh(timeout)
        self.boot_seconds = time.monotonic() - self._launched
        self.write_file(
            "/etc/apt/apt.conf.d/01proxy", f'Acquire::http::Proxy "{self.apt_proxy_url}";\n'
        )

    def freeze(self, wait: bool = True) -> Path:
        """Power the guest off, keep its disk as a qcow2 base (``workdir/deployed.qcow2``)
        and boot it again on a new overlay of that base, with the same forwarded ports.

        Returns the base: ``TestVM(base=...)`` boots clones of this VM as it is now, with
        what the deploy installed, in a boot rather than a deploy. The base must not change
        while anything boots from it, so this VM writes to its new overlay only; it is
        deleted with this VM (close the clones first). ``wait=False`` returns once QEMU
        starts (call ``wait_until_up``), so clones can boot alongside.
        """
        assert self.workdir is not None and self._qemu is not None, "freeze a running VM"
        self._stop_qemu()
        # QEMU truncates the console log on boot: keep the first boot's beside it.
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.serial_log_path, self.serial_log_path.with_name("serial-before-freeze.log"))
        frozen = self.workdir / "deployed.qcow2"
        os.replace(self._overlay_path, frozen)
        self._stack.callback(frozen.unlink, missing_ok=True)
        self.base = frozen
        self.launch()
        if wait:
            self.wait_until_up()
        return frozen

    @property
    def _overlay_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "overlay.qcow2"

    def _prepare(self) -> None:
        """What every boot of this VM shares: workdir, key, apt proxy, ports, teardown."""
        stack = self._stack
        key = vm_disk_image().parent / "id_ed25519"
        if self.workdir is None:
            VM_DIR.mkdir(parents=True, exist_ok=True)
            self.workdir = Path(tempfile.mkdtemp(prefix="run-", dir=VM_DIR))
            stack.callback(shutil.rmtree, self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        stack.callback(self._overlay_path.unlink, missing_ok=True)
        # ssh refuses a private key that others can read; keep a 0600 copy per run.
        self.key_path = str(self.workdir / "id_ed25519")
        shutil.copyfile(key, self.key_path)
        os.chmod(self.key_path, 0o600)

        proxy = AptProxy("127.0.0.1")
        stack.callback(proxy.close)
        proxy_port = proxy.server.server_address[1]
        self.apt_proxy_url = f"http://{SLIRP_HOST}:{proxy_port}"

        self.ssh_port = free_port(self.bind)
        self._ports = {g: (h if h else free_port(self.bind)) for g, h in self._wanted_ports.items()}
        stack.callback(self._stop_qemu)

    def _stop_qemu(self) -> None:
        proc, self._qemu = self._qemu, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                sh(*self.ssh_command("systemctl poweroff"), check=False, timeout=30)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                log.warning("VM did not power off in 90s; killing QEMU")
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # -- SSH -------------------------------------------------------------------------

    @property
    def serial_log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "serial.log"

    def serial_log(self, tail: int = 6000) -> str:
        with contextlib.suppress(OSError):
            return self.serial_log_path.read_text(errors="replace")[-tail:]
        return ""

    def _ssh_options(self) -> list[str]:
        return [
            "-i", self.key_path, "-o", "UserKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=no", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=15",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=8",
        ]  # fmt: skip

    def ssh_command(self, *argv: str) -> list[str]:
        """argv for the OpenSSH client to run a command in the guest as root."""
        return ["ssh", *self._ssh_options(), "-p", str(self.ssh_port), f"root@{self.bind}", *argv]

    def run(
        self, cmd: str, check: bool = True, timeout: float | None = 900, input: str | None = None
    ) -> subprocess.CompletedProcess:
        """Run a shell command in the guest as root over SSH; output captured (text)."""
        return sh(*self.ssh_command(cmd), check=check, timeout=timeout, input=input)

    def write_file(self, path: str, content: str, mode: str = "0644") -> None:
        quoted = shlex.quote(path)
        self.run(f"mkdir -p \"$(dirname {quoted})\" && cat > {quoted} && chmod {mode} {quoted}", input=content)

    def copy_to(self, local: Path | str, remote: str, timeout: float = 900) -> None:
        sh(
            "scp", *self._ssh_options(), "-q", "-P", str(self.ssh_port), local,
            f"root@{self.bind}:{remote}", timeout=timeout,
        )  # fmt: skip

    def _boot_id(self) -> str | None:
        try:
            proc = sh(*self.ssh_command("cat /proc/sys/kernel/random/boot_id"), check=False, timeout=60)
        except subprocess.TimeoutExpired:
            return None
        return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None

    def _wait_for_ssh(self, timeout: float, not_boot_id: str | None = None) -> str:
        """Wait until SSH works (on a boot other than not_boot_id); return the boot id."""
        deadline = time.monotonic() + timeout
        while True:
            if self._qemu is None or self._qemu.poll() is not None:
                qemu_log = (self.workdir / "qemu.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"QEMU exited:\n{qemu_log}\nserial console:\n{self.serial_log()}")
            boot_id = self._boot_id()
            if boot_id and boot_id != not_boot_id:
                return boot_id
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no SSH to the VM on {self.bind}:{self.ssh_port} after {timeout:.0f}s; "
                    f"serial console:\n{self.serial_log()}"
                )
            time.sleep(2)

    def reboot(self, timeout: float = SSH_TIMEOUT) -> float:
        """Reboot the guest and wait for SSH on the new boot; return the seconds it took."""
        before = self._boot_id()
        started = time.monotonic()
        # Detached, so this SSH session ends cleanly before the guest goes down.
        self.run("systemd-run --on-active=1 --timer-property=AccuracySec=100ms systemctl reboot")
        self._wait_for_ssh(timeout, not_boot_id=before)
        return time.monotonic() - started

    # -- what tests need -------------------------------------------------------------

    def forwarded_port(self, guest_port: int) -> int:
        """The port on the controller's ``bind`` address that reaches guest_port."""
        return self._ports[guest_port]

    def expose_host_port(self, port: int) -> None:
        """Make 127.0.0.1:port in the guest reach 127.0.0.1:port on the controller.

        A socket-activated systemd-socket-proxyd to 10.0.2.2:port, enabled so it survives
        reboots. For servers the test runs (a fake Hub) whose URL both the controller and
        the guest must use unchanged.
        """
        unit = f"bc-host-{port}"
        self.write_file(
            f"/etc/systemd/system/{unit}.socket",
            f"[Unit]\nDescription=Forward 127.0.0.1:{port} to the test controller\n\n"
            f"[Socket]\nListenStream=127.0.0.1:{port}\n\n[Install]\nWantedBy=sockets.target\n",
        )
        self.write_file(
            f"/etc/systemd/system/{unit}.service",
            f"[Unit]\nRequires={unit}.socket\nAfter={unit}.socket\n\n"
            f"[Service]\nExecStart=/usr/lib/systemd/systemd-socket-proxyd {SLIRP_HOST}:{port}\n",
        )
        self.run(f"systemctl daemon-reload && systemctl enable --now {unit}.socket")

    def pyinfra_data(self) -> dict:
        """Host data for pyinfra's @ssh connector (through the forwarded SSH port)."""
        return ssh_host_data(self.bind, self.ssh_port, self.key_path)

    def __repr__(self) -> str:
        return f"TestVM(ssh={self.bind}:{self.ssh_port}, ports={self._ports})"


def boot_all(stack: contextlib.ExitStack, vms: Sequence[TestVM], timeout: float = SSH_TIMEOUT) -> list[TestVM]:
    """Boot ``vms`` side by side: every QEMU starts before the first wait for SSH, so the
    boots overlap (``timeout``: for the last one to answer). Each VM is closed (powered
    off) with ``stack``."""
    for vm in vms:
        stack.push(vm.__exit__)
        vm.launch()
    deadline = time.monotonic() + timeout
    for vm in vms:
        vm.wait_until_up(max(deadline - time.monotonic(), 0.0))
    return list(vms)
