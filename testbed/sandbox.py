"""Real Debian hosts for tests: debootstrap roots, each run in its own network namespace.

A sandbox host is a chroot (an overlayfs copy of a cached debootstrap root) whose sshd runs
inside a network namespace ``bc-<name>``. The namespace is wired to the bridge ``bcbr0``
(the controller, 10.123.45.1) by a veth pair, so tests and pyinfra reach each host over
real SSH at its own address, and each host reaches servers the test binds on the gateway.

Hosts have no route to the internet. apt works through a small forwarding HTTP proxy on
the gateway that only talks to the Debian mirror, so a deploy can ``apt-get install``.

Everything that touches the system (mounts, namespaces, links, processes) is recorded
under HOSTS_DIR or named ``bc*``, so ``cleanup_stale`` can find and remove the leftovers of
a crashed run. One process at a time owns the network: it holds ``CACHE/hosts.lock``
while it has hosts, and other pytest processes wait for it.

Needs root, debootstrap, iproute2 (``ip``), util-linux and openssh-client.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import http.server
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

CACHE = Path(os.environ.get("BACKCHAT_TEST_CACHE", "/var/cache/backchat-tests"))
MIRROR = os.environ.get("BACKCHAT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
ROOTS_DIR = CACHE / "roots"
HOSTS_DIR = CACHE / "hosts"

SUITES = ("bookworm", "trixie")
INCLUDE = (
    "openssh-server",
    "iproute2",
    "ca-certificates",
    "curl",
    "sudo",
    "python3",
    "gnupg",
    "procps",
)
# Bump when the post-debootstrap steps in _finish_root change: it is part of the cache key.
ROOT_RECIPE_VERSION = 1

BRIDGE = "bcbr0"
GATEWAY = "10.123.45.1"
PREFIX_LEN = 24
FIRST_HOST_OCTET = 10
MAX_HOSTS = 100
NETNS_PREFIX = "bc-"
VETH_PREFIX = "bcv"
APT_PROXY_PORT = 3142
BRIDGE_MAC = "02:bc:00:00:00:01"  # locally administered

LOCK_TIMEOUT = float(os.environ.get("BACKCHAT_TEST_LOCK_TIMEOUT", "1800"))
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")


# --------------------------------------------------------------------------- helpers


def sh(*argv: str | os.PathLike[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a host command; failures carry the command's output so test logs explain them."""
    cmd = [str(a) for a in argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        err = subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
        err.add_note(f"stdout: {proc.stdout[-4000:]}\nstderr: {proc.stderr[-4000:]}")
        raise err
    return proc


@contextlib.contextmanager
def flock(path: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Exclusive lock across processes (two pytest runs must not build or wire at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process holds {path} for over {timeout:.0f}s")
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ssh_host_data(hostname: str, port: int, key_path: str) -> dict:
    """Host data for pyinfra's @ssh connector (key names as in pyinfra 3.10's ssh.py)."""
    return {
        "ssh_hostname": hostname,
        "ssh_port": port,
        "ssh_user": "root",
        "ssh_key": key_path,
        "ssh_known_hosts_file": "/dev/null",
        "ssh_strict_host_key_checking": "no",
        # Only our key: the controller's agent or ~/.ssh keys have no business here.
        "ssh_allow_agent": False,
        "ssh_look_for_keys": False,
    }


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path, in mount order (unmount them reversed)."""
    prefix = str(path.resolve())
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].encode().decode("unicode_escape")  # undo \040 escapes
        if target == prefix or target.startswith(prefix + "/"):
            found.append(target)
    return found


def unmount_under(path: Path) -> None:
    for target in reversed(mounts_under(path)):
        if sh("umount", target, check=False).returncode != 0:
            # Something still has a file open (a straggling process): detach it anyway.
            sh("umount", "--lazy", target, check=False)


def remove_tree(path: Path) -> None:
    """Delete a host or build directory, never following a bind mount into /dev or /proc."""
    if not path.exists():
        return
    unmount_under(path)
    left = mounts_under(path)
    if left:
        raise RuntimeError(f"refusing to delete {path}: still mounted: {left}")
    sh("rm", "-rf", "--one-file-system", path)


def _kill(pids: set[int]) -> None:
    """SIGTERM, then SIGKILL whatever is left a moment later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = set()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                alive.add(pid)
        deadline = time.monotonic() + 3
        while alive and time.monotonic() < deadline:
            alive = {p for p in alive if Path(f"/proc/{p}").exists() and not _is_zombie(p)}
            time.sleep(0.05)
        pids = alive
        if not pids:
            return


def proc_stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (which may hold spaces and parentheses):
    [0] the state, [11] and [12] user and system time, [13] and [14] those of reaped children,
    in clock ticks (``os.sysconf("SC_CLK_TCK")``)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _is_zombie(pid: int) -> bool:
    try:
        return proc_stat(pid)[0] == "Z"
    except (OSError, IndexError):
        return True


def _pids_in_netns(netns: str) -> set[int]:
    out = sh("ip", "netns", "pids", netns, check=False).stdout
    return {int(p) for p in out.split()}


def _pids_rooted_under(path: Path) -> set[int]:
    """Processes chrooted into path (e.g. started by run() and not in a netns we know)."""
    prefix = str(path.resolve())
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                root = os.readlink(proc / "root")
                if root == prefix or root.startswith(prefix + "/"):
                    pids.add(int(proc.name))
    return pids


# --------------------------------------------------------------------------- roots


def _recipe(suite: str) -> dict:
    return {
        "suite": suite,
        "mirror": MIRROR,
        "variant": "minbase",
        "include": sorted(INCLUDE),
        "version": ROOT_RECIPE_VERSION,
    }


def debian_root(suite: str) -> Path:
    """Return a cached minbase root for suite, building it (about a minute) on first use.

    The directory name carries a hash of the recipe, so changing the package list, mirror or
    post-install steps builds a new root instead of reusing a stale one. A root is built in
    a temporary directory and renamed into place, so a present directory is a complete one.
    """
    if suite not in SUITES:
        raise ValueError(f"unsupported suite {suite!r}; expected one of {SUITES}")
    digest = hashlib.sha256(json.dumps(_recipe(suite), sort_keys=True).encode()).hexdigest()
    dest = ROOTS_DIR / f"{suite}-{digest[:12]}"
    if dest.is_dir():
        return dest
    with flock(ROOTS_DIR / f"{suite}-{digest[:12]}.lock"):
        if dest.is_dir():  # another process built it while we waited
            return dest
        for stale in ROOTS_DIR.glob(f".build-{dest.name}-*"):  # an interrupted build
            remove_tree(stale)
        build = Path(tempfile.mkdtemp(prefix=f".build-{dest.name}-", dir=ROOTS_DIR))
        try:
            started = time.monotonic()
            sh(
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(INCLUDE)}",
                suite,
                build,
                MIRROR,
            )
            _finish_root(build)
            build.chmod(0o755)  # mkdtemp made it 0700; sshd refuses a chroot like that
            os.rename(build, dest)
            log.info("built %s root in %.0fs: %s", suite, time.monotonic() - started, dest)
        except BaseException:
            remove_tree(build)
            raise
    return dest


def _finish_root(root: Path) -> None:
    """Make the root ready to clone: package lists present, no build-host identity left."""
    # debootstrap drops its package lists; fetch real ones now so `apt-get install` in a
    # host works even before an `apt-get update` (the build runs with the host's network).
    sh("chroot", root, "apt-get", "update", env={"PATH": HOST_PATH, "LC_ALL": "C"})
    sh("chroot", root, "apt-get", "clean", env={"PATH": HOST_PATH, "LC_ALL": "C"})
    if not list((root / "etc/ssh").glob("ssh_host_*_key")):
        sh("chroot", root, "ssh-keygen", "-A", env={"PATH": HOST_PATH})
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    (root / "etc/resolv.conf").write_text("nameserver 127.0.0.1\n")


# --------------------------------------------------------------------------- apt proxy


class _AptProxyHandler(http.server.BaseHTTPRequestHandler):
    """Forward plain-HTTP GET/HEAD requests for the Debian mirror, refuse everything else.

    apt sends absolute URLs to a proxy and happily keeps one connection open for many
    requests, so responses keep Content-Length and the connection alive when upstream
    gives a length.
    """

    protocol_version = "HTTP/1.1"
    timeout = 300  # an idle keep-alive connection (its host gone) does not hold a thread forever
    allowed_hosts: frozenset[str] = frozenset()
    hop_by_hop = frozenset(
        {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade"}
    )

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.scheme != "http" or url.hostname not in self.allowed_hosts:
            self.send_error(403, f"apt proxy only forwards to {sorted(self.allowed_hosts)}")
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in self.hop_by_hop}
        path = url.path + (f"?{url.query}" if url.query else "")
        upstream = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=60)
        try:
            upstream.request(self.command, path or "/", headers=headers)
            resp = upstream.getresponse()
            length = resp.getheader("Content-Length")
            self.send_response(resp.status, resp.reason)
            for key, value in resp.getheaders():
                if key.lower() not in self.hop_by_hop:
                    self.send_header(key, value)
            if length is None and self.command != "HEAD":
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                shutil.copyfileobj(resp, self.wfile, 64 * 1024)
        except OSError as exc:
            log.warning("apt-proxy: upstream %s failed: %s", self.path, exc)
            self.close_connection = True
        finally:
            upstream.close()

    do_HEAD = do_GET

    def log_message(self, fmt: str, *args) -> None:
        log.debug("apt-proxy: " + fmt, *args)


class _ProxyServer(http.server.ThreadingHTTPServer):
    # socketserver listens with a backlog of 5; several hosts' apt at once can fill it, and
    # a full backlog drops SYNs, which apt reports as "Could not connect ... timed out".
    request_queue_size = 128


class AptProxy:
    def __init__(self, bind: str) -> None:
        handler = type("Handler", (_AptProxyHandler,), {"allowed_hosts": _mirror_hosts()})
        try:
            self.server = _ProxyServer((bind, APT_PROXY_PORT), handler)
        except OSError:  # 3142 taken (e.g. a real apt-cacher-ng on *:3142): any port works
            self.server = _ProxyServer((bind, 0), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{bind}:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="apt-proxy", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _mirror_hosts() -> frozenset[str]:
    hosts = {urlsplit(MIRROR).hostname}
    hosts.update(os.environ.get("BACKCHAT_APT_PROXY_ALLOW", "").split())
    return frozenset(h for h in hosts if h)


# --------------------------------------------------------------------------- latency proxy


class _LatencyProxy:
    """TCP forwarder on 127.0.0.1 that sleeps before passing on each chunk, both ways.

    The CI kernel has no sch_netem, so WAN latency is simulated in userspace. Delaying per
    chunk (not per packet) is coarse, but round trips do get about 2*ms slower.
    """

    def __init__(self, target: tuple[str, int], delay_ms: float) -> None:
        self.target = target
        self.delay = delay_ms / 1000
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name=f"latency-{self.port}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                return  # listener closed (or target down: drop this client)
            server.settimeout(None)
            self.sockets += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(65536):
                time.sleep(self.delay)
                dst.sendall(chunk)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for sock in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                sock.close()


# --------------------------------------------------------------------------- network


class _Network:
    """Process-wide state shared by all live hosts: the lock, bridge, apt proxy, SSH key.

    Set up when the first host is created and torn down with the last one, so nested or
    successive ``sandbox_hosts`` contexts (e.g. a session fixture plus a test) share it.
    """

    def __init__(self) -> None:
        self.users = 0
        self.slots: set[int] = set()
        self.mutex = threading.Lock()
        self._stack: contextlib.ExitStack | None = None
        self.apt_proxy: AptProxy | None = None  # set while any host lives
        self.key_path = ""
        self.public_key = ""

    def acquire(self) -> None:
        with self.mutex:
            if self.users == 0:
                stack = contextlib.ExitStack()
                try:
                    stack.enter_context(flock(CACHE / "hosts.lock"))
                    _cleanup_stale_locked()
                    self._start(stack)
                except BaseException:
                    stack.close()
                    raise
                self._stack = stack
            self.users += 1

    def release(self) -> None:
        with self.mutex:
            self.users -= 1
            if self.users == 0 and self._stack is not None:
                self._stack.close()
                self._stack = None

    def _start(self, stack: contextlib.ExitStack) -> None:
        HOSTS_DIR.mkdir(parents=True, exist_ok=True)
        # A bridge without an address of its own takes its lowest port's, so the gateway's
        # MAC would change as hosts come and go, under hosts that cached the old one.
        sh("ip", "link", "add", BRIDGE, "address", BRIDGE_MAC, "type", "bridge")
        stack.callback(sh, "ip", "link", "del", BRIDGE, check=False)
        sh("ip", "addr", "add", f"{GATEWAY}/{PREFIX_LEN}", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        proxy = AptProxy(GATEWAY)
        stack.callback(proxy.close)
        self.apt_proxy = proxy
        # One key pair per session: it only ever opens throwaway hosts.
        key_dir = HOSTS_DIR / ".ssh"  # host names cannot start with a dot: no clash
        key_dir.mkdir(mode=0o700)
        stack.callback(remove_tree, key_dir)
        key = key_dir / "id_ed25519"
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "backchat-tests", "-f", key)
        self.key_path = str(key)
        self.public_key = key.with_suffix(".pub").read_text()

    def take_slot(self) -> int:
        with self.mutex:
            free = [i for i in range(MAX_HOSTS) if i not in self.slots]
            if not free:
                raise RuntimeError(f"more than {MAX_HOSTS} sandbox hosts at once")
            self.slots.add(free[0])
            return free[0]

    def free_slot(self, slot: int) -> None:
        with self.mutex:
            self.slots.discard(slot)


_network = _Network()


def cleanup_stale() -> None:
    """Remove what a crashed run left: processes, mounts and dirs under HOSTS_DIR, bc-*
    namespaces, the bridge. Called automatically before the first host is created; call
    it by hand only when this process has no live hosts (it waits for other processes')."""
    if _network.users:
        raise RuntimeError("cleanup_stale() while this process has live sandbox hosts")
    with flock(CACHE / "hosts.lock"):
        _cleanup_stale_locked()


def _cleanup_stale_locked() -> None:
    for netns in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = netns.split()[0] if netns.strip() else ""
        if name.startswith(NETNS_PREFIX):
            log.warning("removing stale network namespace %s", name)
            _kill(_pids_in_netns(name))
            sh("ip", "netns", "del", name, check=False)
    if HOSTS_DIR.exists():
        _kill(_pids_rooted_under(HOSTS_DIR))
        for child in HOSTS_DIR.iterdir():
            log.warning("removing stale sandbox dir %s", child)
            remove_tree(child)
    for link in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        ifname = link.split(":")[1].strip().split("@")[0]
        if ifname == BRIDGE or re.fullmatch(rf"{VETH_PREFIX}\d+", ifname):
            sh("ip", "link", "del", ifname, check=False)


def cannot_reach_gateway(output: str) -> bool:
    """Whether a command's output says it could not connect to the gateway (apt: "Could not
    connect to", "Cannot initiate the connection to", ...)."""
    return GATEWAY in output and "connect" in output


# --------------------------------------------------------------------------- hosts


class SandboxHost:
    """One Debian host: an overlay root, a netns with its own address, an sshd in both."""

    def __init__(self, name: str, suite: str, slot: int) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"host name {name!r} must match {_NAME_RE.pattern}")
        self.name = name
        self.suite = suite
        self.slot = slot
        self.netns = f"{NETNS_PREFIX}{name}"
        subnet = ipaddress.ip_network(f"{GATEWAY}/{PREFIX_LEN}", strict=False)
        self.address = str(subnet.network_address + FIRST_HOST_OCTET + slot)
        self.dir = HOSTS_DIR / name
        self.root = self.dir / "root"
        self.key_path = _network.key_path
        self._sshd: subprocess.Popen | None = None
        self._proxies: list[_LatencyProxy] = []
        self._stack = contextlib.ExitStack()

    # -- lifecycle (driven by sandbox_hosts) -----------------------------------------

    def _create(self, lower: Path) -> None:
        stack = self._stack
        if self.dir.exists():
            raise FileExistsError(f"sandbox host {self.name!r} already exists")
        stack.callback(remove_tree, self.dir)
        for sub in ("upper", "work", "root"):
            (self.dir / sub).mkdir(parents=True)
        self._mount_root(lower)
        # Exit callbacks run in reverse: processes die, then the netns goes, then the mounts.
        stack.callback(sh, "ip", "netns", "del", self.netns, check=False)
        stack.callback(self._kill_processes)
        self._write_config()
        self._wire_network()
        self.start_sshd()

    def _destroy(self) -> None:
        self._stack.close()

    def _mount_root(self, lower: Path) -> None:
        # Every mount gets unmounted by remove_tree (registered first, so it runs last);
        # mounts are made private so that, on a host with shared propagation, nothing
        # mounted or unmounted in a host root leaks back into the real /dev or /proc.
        opts = f"lowerdir={lower},upperdir={self.dir / 'upper'},workdir={self.dir / 'work'}"
        try:
            sh("mount", "-t", "overlay", "overlay", "-o", opts, self.root)
            sh("mount", "--make-private", self.root)
        except subprocess.CalledProcessError as exc:
            log.warning("overlayfs failed (%s); copying the root instead", exc.stderr.strip())
            self.root.rmdir()
            sh("cp", "-a", "--reflink=auto", lower, self.root)
        for src in ("/proc", "/sys", "/dev", "/dev/pts"):
            sh("mount", "--bind", src, f"{self.root}{src}")
            sh("mount", "--make-private", f"{self.root}{src}")

    def _write_config(self) -> None:
        etc = self.root / "etc"
        (etc / "hostname").write_text(f"{self.name}\n")
        (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n{self.address}\t{self.name}\n")
        (etc / "apt/apt.conf.d/01proxy").write_text(
            f'Acquire::http::Proxy "{_network.apt_proxy.url}";\n'
            # A CI run once saw one connect to the proxy time out (never reproduced): retry
            # a failed fetch rather than fail the test on a network blip.
            'Acquire::Retries "3";\n'
        )
        ssh_dir = self.root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(_network.public_key)
        (ssh_dir / "authorized_keys").chmod(0o600)
        (self.root / "run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privsep dir

    @property
    def _veth(self) -> str:
        """The bridge's end of this host's link (its other end is eth0 in the host)."""
        return f"{VETH_PREFIX}{self.slot}"

    def _wire_network(self) -> None:
        veth = self._veth
        sh("ip", "netns", "add", self.netns)
        # Deleting the namespace deletes eth0 and with it the veth's bridge end.
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", self.netns)
        sh("ip", "link", "set", veth, "master", BRIDGE, "up")
        in_ns = ("ip", "-n", self.netns)
        sh(*in_ns, "link", "set", "lo", "up")
        sh(*in_ns, "addr", "add", f"{self.address}/{PREFIX_LEN}", "dev", "eth0")
        sh(*in_ns, "link", "set", "eth0", "up")
        sh(*in_ns, "route", "add", "default", "via", GATEWAY)

    def _kill_processes(self) -> None:
        for proxy in self._proxies:
            proxy.close()
        self.stop_sshd()
        _kill(_pids_in_netns(self.netns) | _pids_rooted_under(self.dir))

    # -- public ----------------------------------------------------------------------

    def _in_host(self, *argv: str) -> list[str]:
        # A private UTS namespace per command, so `hostname` (and pyinfra's facts) name
        # this host rather than the controller; the name is set anew each time.
        set_name_then_chroot = 'hostname "$1" && shift && exec chroot "$@"'
        return [
            "ip", "netns", "exec", self.netns, "unshare", "--uts",
            "sh", "-c", set_name_then_chroot, "sh", self.name, str(self.root), *argv,
        ]  # fmt: skip

    def _env(self) -> dict[str, str]:
        # The controller's environment (pyenv paths, CI secrets) has no place in a host.
        return {
            "PATH": HOST_PATH,
            "HOME": "/root",
            "LC_ALL": "C.UTF-8",
            "DEBIAN_FRONTEND": "noninteractive",
        }

    def run(self, cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a shell command as root in the host (its root and netns), output captured.

        Like any captured subprocess this waits for stdout/stderr to close: a command that
        leaves a daemon behind must redirect its output (``cmd >/dev/null 2>&1 &``).
        """
        try:
            return sh(*self._in_host("sh", "-c", cmd), check=check, env=self._env())
        except subprocess.CalledProcessError as exc:
            if cannot_reach_gateway(exc.stderr or ""):
                exc.add_note(self.network_report())
            raise

    def reaches_gateway(self, port: int, seconds: int = 3) -> bool:
        """Whether a TCP connection from this host to the gateway's ``port`` opens."""
        return self.run(f"timeout {seconds} bash -c '</dev/tcp/{GATEWAY}/{port}'", check=False).returncode == 0

    def wait_for_apt_proxy(self, timeout: float = 240) -> None:
        """Return once this host's apt can reach the gateway's proxy.

        Two CI runs saw a host's apt time out connecting to the proxy, which never happened
        here. If it does, this says what the network looked like (as a warning in pytest's
        summary when it comes back, in the error when it does not), then waits for it.
        """
        port = _network.apt_proxy.port
        if self.reaches_gateway(port):
            return
        started, report = time.monotonic(), self.network_report()
        while time.monotonic() - started < timeout:
            if self.reaches_gateway(port):
                warnings.warn(
                    f"{self.name} could not reach the apt proxy for {time.monotonic() - started:.0f} s; "
                    f"when it could not:\n{report}",
                    stacklevel=2,
                )
                return
            time.sleep(2)
        raise TimeoutError(f"{self.name} cannot reach the apt proxy at {GATEWAY}:{port} ({timeout:.0f} s)\n{report}")

    def network_report(self) -> str:
        """What the host, the bridge and the apt proxy look like now, for a failure's message."""
        proxy = _network.apt_proxy
        ns = ("ip", "-n", self.netns)
        views = {
            "host addresses": [*ns, "-br", "addr"],
            "host routes": [*ns, "route"],
            "host neighbours": [*ns, "neigh"],
            "host link": [*ns, "-s", "link", "show", "eth0"],
            "bridge": ["ip", "link", "show", BRIDGE],
            "bridge ports": ["bridge", "link", "show"],
            "gateway neighbours": ["ip", "neigh", "show", "dev", BRIDGE],
            "listening on the proxy's port (Recv-Q: connections not yet accepted)": ["ss", "-ltnp", f"sport = :{proxy.port}"],
            "connections to the proxy": ["ss", "-tn", "state", "all", f"sport = :{proxy.port}"],
            "iptables": ["iptables", "-S"],
            "kernel": ["uname", "-rv"],
        }
        lines = [f"--- network of {self.name} ({self.address}) ---"]
        for title, argv in views.items():
            try:
                out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
                text = (out.stdout + out.stderr).strip()
            except (OSError, subprocess.TimeoutExpired) as exc:
                text = str(exc)
            lines.append(f"{title}:\n{text[-1500:]}")
        lines.append(
            f"apt proxy: {proxy.url}, serving thread alive: {proxy.thread.is_alive()}; "
            f"threads in this process: {threading.active_count()}; open fds: {len(os.listdir('/proc/self/fd'))}"
        )
        return "\n".join(lines)

    def start_sshd(self) -> None:
        if self._sshd is not None and self._sshd.poll() is None:
            return
        with open(self.dir / "sshd.log", "ab") as sshd_log:
            self._sshd = subprocess.Popen(
                # VERBOSE: sshd logs one "Starting session:" line per command (and per
                # SFTP upload), which remote_commands() counts.
                self._in_host(
                    "/usr/sbin/sshd", "-D", "-e", "-o", f"ListenAddress={self.address}", "-o", "LogLevel=VERBOSE"
                ),
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=sshd_log,
                stderr=sshd_log,
                start_new_session=True,  # a Ctrl-C in pytest must not kill it before teardown
            )
        self._wait_for_port(22)

    def remote_commands(self) -> int:
        """Sessions sshd has started so far: one per command run over SSH (an exec
        channel) or SFTP session, however the client batches them on one connection."""
        log_text = (self.dir / "sshd.log").read_text(errors="replace")
        return log_text.count("Starting session: ")

    def sshd_cpu(self) -> float:
        """CPU seconds of the sessions this host's sshd has reaped so far: every connection,
        its session and whatever command it ran (a session still open is not counted)."""
        fields = proc_stat(self._sshd.pid)
        return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")

    def limit_link(self, mbit: int | None) -> None:
        """Cap what the controller sends this host at ``mbit`` Mbit/s (a token bucket on the
        bridge's end of its link, as a LAN's switch port would), or lift the cap (None)."""
        if mbit is None:
            sh("tc", "qdisc", "del", "dev", self._veth, "root", check=False)
            return
        # A burst of a millisecond at that rate, and never less than one 64 KiB GSO segment.
        burst = max(64 * 1024, mbit * 1000 * 1000 // 8 // 1000)
        sh("tc", "qdisc", "replace", "dev", self._veth, "root", "tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency", "50ms")

    def link_bytes(self) -> int:
        """Bytes through the host's network link so far, both ways (TCP/IP headers included)."""
        stats = Path(f"/sys/class/net/{self._veth}/statistics")
        return sum(int((stats / name).read_text()) for name in ("rx_bytes", "tx_bytes"))

    def stop_sshd(self) -> None:
        """Stop the listening sshd; like `systemctl stop ssh`, open sessions survive."""
        if self._sshd is None:
            return
        self._sshd.terminate()
        try:
            self._sshd.wait(5)
        except subprocess.TimeoutExpired:
            self._sshd.kill()
            self._sshd.wait()
        self._sshd = None

    def _wait_for_port(self, port: int, timeout: float = 30) -> None:  # a loaded 2-core CI machine is slow
        deadline = time.monotonic() + timeout
        while True:
            if self._sshd is not None and self._sshd.poll() is not None:
                log_text = (self.dir / "sshd.log").read_text(errors="replace")
                raise RuntimeError(f"sshd in {self.name} exited: {log_text[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(
                (self.address, port), timeout=1
            ):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: nothing listens on {self.address}:{port}")
            time.sleep(0.05)

    def ssh_proxy_with_latency(self, ms: float) -> int:
        """Port on 127.0.0.1 that reaches this host's sshd with ms added per chunk each way."""
        proxy = _LatencyProxy((self.address, 22), ms)
        self._proxies.append(proxy)
        return proxy.port

    def pyinfra_data(self, port: int | None = None) -> dict:
        """Host data for pyinfra's @ssh connector.

        Pass the port from ssh_proxy_with_latency() to connect through that proxy.
        """
        return ssh_host_data("127.0.0.1" if port else self.address, port or 22, self.key_path)

    def ssh_command(self, *argv: str) -> list[str]:
        """argv for the OpenSSH client to run a command on this host."""
        return [
            "ssh", "-i", self.key_path, "-o", "UserKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=no", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            f"root@{self.address}", *argv,
        ]  # fmt: skip

    def __repr__(self) -> str:
        return f"SandboxHost({self.name!r}, {self.suite!r}, {self.address!r})"


@contextlib.contextmanager
def sandbox_hosts(suites: list[str], names: list[str] | None = None) -> Iterator[list[SandboxHost]]:
    """Create one host per suite (named names[i], default "<suite>-<slot>"); tear all down
    on exit, whatever happened inside."""
    if names is not None and len(names) != len(suites):
        raise ValueError("names must have one entry per suite")
    roots = {suite: debian_root(suite) for suite in set(suites)}  # before taking the lock
    with contextlib.ExitStack() as stack:
        _network.acquire()
        stack.callback(_network.release)
        hosts = []
        for i, suite in enumerate(suites):
            slot = _network.take_slot()
            stack.callback(_network.free_slot, slot)
            host = SandboxHost(names[i] if names else f"{suite}-{slot}", suite, slot)
            stack.callback(host._destroy)
            host._create(roots[suite])
            hosts.append(host)
        yield hosts
