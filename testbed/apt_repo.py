"""A stand-in for Docker's apt repository, served on the sandbox gateway.

It lets ``docker_source = "docker"`` run for real on sandbox hosts, which cannot reach
Docker's servers. What is real: apt's repository format as Docker lays it out
(``<url>/debian/dists/<codename>/stable/binary-amd64/Packages``, an OpenPGP-signed
``InRelease``, the ``.deb`` files under ``dists/<codename>/pool/stable/amd64/`` and the key
at ``<url>/debian/gpg``), Docker's five package names, and the software inside them:
Debian's own docker.io, docker-cli, containerd, runc, docker-buildx and docker-compose (v2),
unpacked and rebuilt under Docker's names with ``dpkg-deb``. What stands in for Docker's:
the builds (Debian's, at Debian's versions), the control fields we write, and the signing
key (a throwaway ed25519 key made per test run instead of Docker's 9DC8...CD88).

The Debian packages are fetched on the controller from the test bed's mirror, as named and
hashed in the cached root's own package list (``testbed.sandbox.debian_root``); the rebuilt
packages are cached under ``CACHE/docker-repo``. Hosts reach the server directly, not
through the sandbox's apt proxy (which only forwards to the Debian mirror): see
``reach_directly``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import shutil
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

from testbed.sandbox import CACHE, GATEWAY, MIRROR, SandboxHost, debian_root, flock, remove_tree, sh

BUILD_CACHE = CACHE / "docker-repo"
ARCH = "amd64"
# Bump when the build below changes: it is part of the cache key.
RECIPE_VERSION = 3
# Debian's name -> Docker's, for the dependencies of what we rebuild.
DOCKER_NAMES = {"docker.io": "docker-ce", "docker-cli": "docker-ce-cli", "containerd": "containerd.io", "runc": "containerd.io"}
# Bookworm's docker.io holds the CLI too: these files go to docker-ce-cli instead.
BOOKWORM_CLI_FILES = ("usr/bin/docker",)


def recipe(suite: str) -> dict[str, list[tuple[str, str]]]:
    """Docker's package -> the (suite, Debian package) pairs whose files it carries.

    Like Docker's own containerd.io, ours bundles runc. Bookworm has neither compose v2 nor
    buildx, so trixie's builds of both serve it too (Go binaries needing only libc6 >= 2.34).
    """
    return {
        "containerd.io": [(suite, "containerd"), (suite, "runc")],
        "docker-ce": [(suite, "docker.io")],
        "docker-ce-cli": [(suite, "docker.io" if suite == "bookworm" else "docker-cli")],
        "docker-buildx-plugin": [("trixie", "docker-buildx")],
        "docker-compose-plugin": [("trixie", "docker-compose")],
    }


def _kept(suite: str, name: str, relative: str) -> bool:
    """Whether a file (or directory) of the unpacked Debian package belongs in Docker's ``name``."""
    if suite != "bookworm" or relative == "DEBIAN" or relative.startswith("DEBIAN/"):
        return True
    if name == "docker-ce-cli":
        return any(cli == relative or cli.startswith(relative + "/") for cli in BOOKWORM_CLI_FILES)
    return not (name == "docker-ce" and relative in BOOKWORM_CLI_FILES)


# --------------------------------------------------------------------------- Debian's packages


def _package_list(suite: str) -> dict[str, dict[str, str]]:
    """Package -> its stanza, from the cached root's own list of the Debian mirror."""
    lists = debian_root(suite) / "var/lib/apt/lists"
    found: dict[str, dict[str, str]] = {}
    for path in lists.glob(f"*_dists_{suite}_main_binary-{ARCH}_Packages"):
        for stanza in path.read_text().split("\n\n"):
            fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line[0].isspace())
            if "Package" in fields:
                found[fields["Package"]] = fields
    return found


def debian_deb(suite: str, package: str, into: Path) -> Path:
    """Debian's .deb of ``package`` in ``suite``, fetched from the mirror and sha256-checked."""
    stanza = _package_list(suite)[package]
    dest = into / Path(stanza["Filename"]).name
    if not dest.exists():
        part = dest.with_suffix(".part")
        with urllib.request.urlopen(f"{MIRROR}/{stanza['Filename']}", timeout=120) as answer, open(part, "wb") as out:
            shutil.copyfileobj(answer, out, 1 << 20)
        digest = hashlib.sha256(part.read_bytes()).hexdigest()
        if digest != stanza["SHA256"]:
            part.unlink()
            raise RuntimeError(f"{package} ({suite}) from {MIRROR}: sha256 {digest}, the list says {stanza['SHA256']}")
        part.rename(dest)
    return dest


def cached_debian_deb(suite: str, package: str) -> Path:
    """Debian's .deb of ``package`` in ``suite``, kept under ``CACHE/docker-repo/debian``."""
    downloads = BUILD_CACHE / "debian"
    downloads.mkdir(parents=True, exist_ok=True)
    with flock(downloads / f".{suite}-{package}.lock"):
        return debian_deb(suite, package, downloads)


# --------------------------------------------------------------------------- rebuilding under Docker's names


def _control(path: Path) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = ""
    for line in path.read_text().splitlines():
        if line[:1].isspace() and key:
            fields[key] += "\n" + line
        elif ": " in line or line.endswith(":"):
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def _depends(name: str, controls: list[dict[str, str]]) -> str:
    """The parts' dependencies, Debian's names of what we rebuild turned into Docker's."""
    wanted: list[str] = []
    for control in controls:
        for clause in filter(None, (part.strip() for part in control.get("Depends", "").split(","))):
            first = clause.split("|")[0].split()[0].split(":")[0]
            clause = DOCKER_NAMES.get(first, clause)
            if clause != name and clause not in wanted:
                wanted.append(clause)
    return ", ".join(wanted)


def rebuild(name: str, suite: str, parts: list[tuple[str, Path]], into: Path) -> Path:
    """Docker's ``name`` holding the files of Debian's ``parts``, built with dpkg-deb."""
    with tempfile.TemporaryDirectory(dir=into) as work:
        tree = Path(work) / "tree"
        controls = []
        for index, (part_suite, deb) in enumerate(parts):
            unpacked = Path(work) / f"part{index}"
            sh("dpkg-deb", "-R", deb, unpacked)
            controls.append(_control(unpacked / "DEBIAN/control"))
            for source in sorted(unpacked.rglob("*")):
                relative = source.relative_to(unpacked).as_posix()
                if source.is_dir() and not source.is_symlink():
                    if _kept(part_suite, name, relative):  # empty ones too (/etc/docker)
                        (tree / relative).mkdir(parents=True, exist_ok=True)
                        (tree / relative).chmod(source.stat().st_mode & 0o7777)
                    continue
                if not _kept(part_suite, name, relative):
                    continue
                if relative.startswith("DEBIAN/") and (index or relative in ("DEBIAN/control", "DEBIAN/md5sums")):
                    continue  # maintainer scripts and conffiles of the first part; md5sums are optional
                target = tree / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                os.rename(source, target)
        conffiles = tree / "DEBIAN/conffiles"
        if conffiles.exists():  # only the files this package really holds
            kept = [line for line in conffiles.read_text().splitlines() if (tree / line.lstrip("/")).exists()]
            conffiles.write_text("".join(f"{line}\n" for line in kept)) if kept else conffiles.unlink()
        carried = sorted({control["Package"] for control in controls})
        # Like Docker's: only containerd.io stands in for others (containerd, runc) to apt.
        depends, provides = _depends(name, controls), ", ".join(carried) if name == "containerd.io" else ""
        if name == "docker-ce-cli" and suite == "bookworm":  # one file of docker.io: none of its duties
            for script in ("preinst", "postinst", "prerm", "postrm"):
                (tree / "DEBIAN" / script).unlink(missing_ok=True)
            depends, provides = "libc6 (>= 2.34)", ""
        size_kb = sum(path.stat().st_size for path in tree.rglob("*") if path.is_file() and not path.is_symlink()) // 1024
        fields = {
            "Package": name,
            "Version": controls[0]["Version"],
            "Architecture": ARCH,
            "Maintainer": "backchat test bed <tests@backchat.invalid>",
            "Installed-Size": str(size_kb),
            "Depends": depends,
            "Provides": provides,
            "Conflicts": ", ".join(carried),
            "Replaces": ", ".join(carried),
            "Section": "admin",
            "Priority": "optional",
            "Description": f"{name} stand-in (backchat tests)\n Debian's {', '.join(carried)} ({suite}) rebuilt under Docker's name.",
        }
        (tree / "DEBIAN").mkdir(parents=True, exist_ok=True)
        (tree / "DEBIAN/control").write_text("".join(f"{key}: {value}\n" for key, value in fields.items() if value))
        dest = into / f"{name}_{fields['Version']}_{ARCH}.deb"
        sh("dpkg-deb", "-Zgzip", "-z1", "--build", tree, dest)
    return dest


def stand_in_debs(suite: str) -> list[Path]:
    """Docker's five packages for ``suite``, rebuilt from Debian's (cached)."""
    plan = recipe(suite)
    key = hashlib.sha256(json.dumps([plan, RECIPE_VERSION, MIRROR]).encode()).hexdigest()[:12]
    dest = BUILD_CACHE / f"{suite}-{key}"
    with flock(BUILD_CACHE / f"{suite}-{key}.lock"):
        if dest.is_dir():
            return sorted(dest.glob("*.deb"))
        build = Path(tempfile.mkdtemp(prefix=f".build-{dest.name}-", dir=BUILD_CACHE))
        try:
            for name, parts in plan.items():
                rebuild(name, suite, [(part_suite, cached_debian_deb(part_suite, package)) for part_suite, package in parts], build)
            build.chmod(0o755)
            os.rename(build, dest)
        except BaseException:
            remove_tree(build)
            raise
    return sorted(dest.glob("*.deb"))


# --------------------------------------------------------------------------- signing


class SigningKey:
    """A throwaway OpenPGP key (ed25519, no passphrase) in its own GnuPG home."""

    def __init__(self, home: Path) -> None:
        self.home = home
        home.mkdir(mode=0o700, parents=True)
        self._gpg("--quick-gen-key", "backchat test apt repo <repo@backchat.invalid>", "ed25519", "sign", "never")
        colons = self._gpg("--with-colons", "--list-keys").stdout.splitlines()
        self.fingerprint = next(line.split(":")[9] for line in colons if line.startswith("fpr:"))
        self.armored = self._gpg("--armor", "--export", self.fingerprint).stdout

    def _gpg(self, *args: str):
        return sh("gpg", "--homedir", self.home, "--batch", "--pinentry-mode", "loopback", "--passphrase", "", *args)

    def clearsign(self, source: Path, dest: Path) -> None:
        self._gpg("--yes", "--local-user", self.fingerprint, "--digest-algo", "SHA512", "--clearsign", "-o", str(dest), str(source))

    def close(self) -> None:
        sh("gpgconf", "--homedir", self.home, "--kill", "gpg-agent", check=False)


def write_suite(base: Path, suite: str, debs: list[Path], key: SigningKey) -> None:
    """``dists/<suite>``: the pool, ``stable/binary-amd64/Packages``, ``Release`` and a signed ``InRelease``."""
    dists = base / "dists" / suite
    pool = dists / "pool/stable" / ARCH
    pool.mkdir(parents=True)
    stanzas = []
    for deb in debs:
        copy = pool / deb.name
        try:
            os.link(deb, copy)
        except OSError:  # the cache is on another file system
            shutil.copy(deb, copy)
        data = copy.read_bytes()
        control = sh("dpkg-deb", "-f", copy).stdout.rstrip("\n")
        stanzas.append(
            f"{control}\nFilename: {copy.relative_to(base).as_posix()}\nSize: {len(data)}\n"
            f"MD5sum: {hashlib.md5(data).hexdigest()}\nSHA256: {hashlib.sha256(data).hexdigest()}\n"
        )
    packages = dists / "stable" / f"binary-{ARCH}" / "Packages"
    packages.parent.mkdir(parents=True)
    packages.write_text("\n".join(stanzas))
    index = packages.read_bytes()
    release = dists / "Release"
    release.write_text(
        f"Origin: backchat-tests\nLabel: Docker CE stand-in\nSuite: {suite}\nCodename: {suite}\n"
        f"Architectures: {ARCH}\nComponents: stable\nDate: {formatdate(usegmt=True)}\n"
        f"SHA256:\n {hashlib.sha256(index).hexdigest()} {len(index)} stable/binary-{ARCH}/Packages\n"
    )
    key.clearsign(release, dists / "InRelease")


# --------------------------------------------------------------------------- serving


class _Quiet(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, fmt: str, *args) -> None:
        # "10.123.45.10 GET /linux/debian/gpg 200": who asked (a host, or the gateway's controller).
        self.requests.append(f"{self.client_address[0]} {self.command} {self.path} {args[1] if len(args) > 1 else ''}".strip())


@dataclass
class DockerRepo:
    url: str  # docker_repo_url: Docker's layout below it (<url>/debian/...)
    fingerprint: str  # the throwaway key's, to pin as docker_repo_key_fingerprint
    key: str  # the armored key served at <url>/debian/gpg
    requests: list[str] = field(default_factory=list)  # "<client> GET /path 200", as served


def reach_directly(host: SandboxHost, address: str = GATEWAY) -> None:
    """Let the host's apt fetch from ``address`` directly, as a LAN mirror is reached, not
    through the sandbox's apt proxy (which only forwards to the Debian mirror)."""
    (host.root / "etc/apt/apt.conf.d/02backchat-lan-mirror").write_text(f'Acquire::http::Proxy::{address} "DIRECT";\n')


@contextlib.contextmanager
def docker_repo(hosts: list[SandboxHost], workdir: Path, bind: str = GATEWAY) -> Iterator[DockerRepo]:
    """Docker's repo layout for the hosts' suites, signed by a fresh key, served on ``bind``
    (the gateway: it exists once the hosts do); the hosts' apt reaches it directly."""
    base = workdir / "repo/linux/debian"
    key = SigningKey(workdir / "gnupg")
    with contextlib.ExitStack() as stack:
        stack.callback(key.close)
        for suite in sorted({host.suite for host in hosts}):
            write_suite(base, suite, stand_in_debs(suite), key)
        (base / "gpg").write_text(key.armored)
        requests: list[str] = []
        handler = type("Handler", (_Quiet,), {"requests": requests})
        server = http.server.ThreadingHTTPServer((bind, 0), functools.partial(handler, directory=str(workdir / "repo")))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="docker-repo", daemon=True).start()
        stack.callback(server.server_close)
        stack.callback(server.shutdown)
        for host in hosts:
            reach_directly(host, bind)
        yield DockerRepo(f"http://{bind}:{server.server_address[1]}/linux", key.fingerprint, key.armored, requests)


@contextlib.contextmanager
def key_only_mirror(key: str, bind: str = "127.0.0.1") -> Iterator[tuple[str, list[str]]]:
    """Only the keys of Docker's layout (``<url>/debian/gpg``, ``<url>/ubuntu/gpg``), for runs
    that plan or check the key and install nothing; yields (docker_repo_url, paths asked)."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            found = self.path in ("/linux/debian/gpg", "/linux/ubuntu/gpg")
            body = key.encode() if found else b"not found\n"
            self.send_response(200 if found else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer((bind, 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="key-mirror", daemon=True).start()
    try:
        yield f"http://{bind}:{server.server_address[1]}/linux", asked
    finally:
        server.shutdown()
        server.server_close()
