"""Real proxies running the files backchat writes (the lab gateway's tests; testbed.frontdoor
is the single-host door's harness): nginx with ``frontdoor.conf`` (a host's
front door, or the gateway's relay) and HAProxy with the gateway's ``haproxy.cfg``.

Both are Debian's packages (nginx 1.22 and HAProxy 2.6 on Debian 12); the deploy pins the
official images (nginx 1.30, HAProxy 3.4), which read the same directives. What only the
compose network provides is replaced by the caller (upstream addresses, certificate
paths, the pid file, Docker's DNS resolver), nothing else.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from backchat import secrets, settings, stack, tls
from backchat.secrets import Secret

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require(program: str, package: str) -> None:
    """Skip without ``program``, except in CI (BACKCHAT_REQUIRE_REALHOSTS=1): fail there."""
    if os.access(program, os.X_OK):
        return
    if os.environ.get("BACKCHAT_REQUIRE_REALHOSTS") == "1":
        pytest.fail(f"{Path(program).name} is not installed (Debian package {package})")
    pytest.skip(f"{Path(program).name} is not installed (Debian package {package})")


def wait_listening(port: int, log: Path, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not listen: {log.read_text()}")


def edited(conf: str, edits: dict[str, str]) -> str:
    """``conf`` with each ``old`` replaced by ``new`` (a mutation; ``old`` must be there)."""
    for old, new in edits.items():
        assert old in conf, old
        conf = conf.replace(old, new)
    return conf


def door_cfg(key: str, **overrides) -> settings.Settings:
    """Settings of a host with a front door (llama.cpp's server behind it, the API key)."""
    data = {**settings.load_defaults(), "backend": "llamacpp", "tls": True, "proxy_timeout": 120, **overrides}
    return settings.validate(data, api_key=Secret(key))


class FrontDoor:
    """nginx running backchat's frontdoor.conf for one llama.cpp backend, with a
    certificate for ``host`` (and 127.0.0.1) signed by the CA in ``ca_dir``.

    ``access_log``: log every request that reaches this host (the gateway's tests count
    which host served what); the deploy's door logs nothing.
    """

    def __init__(self, workdir: Path, upstream: str, key: str, host: str = "ai-01.test", relay: bool = False,
                 ca_dir: Path | None = None, access_log: bool = False, **conf_edits: str) -> None:
        require(NGINX, "nginx")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        ca_dir = ca_dir or workdir / "ca"
        self.cfg = door_cfg(key, tls_ca_dir=str(ca_dir), localai_port=self.port)
        certificate = tls.host_certificate(self.cfg, host, [host, "127.0.0.1"])
        self.host = host
        self.ca = str(ca_dir / "ca.crt")
        self.trust = ssl.create_default_context(cafile=self.ca)
        certs = workdir / "tls"
        certs.mkdir(mode=0o700)
        (certs / tls.CERT_FILE).write_text(certificate.cert_pem)
        (certs / tls.KEY_FILE).write_text(certificate.key_pem.reveal())
        (certs / tls.KEY_FILE).chmod(0o600)
        (certs / stack.DOOR_KEY_MAP).write_text(secrets.reveal(stack.door_key_lines(self.cfg)))
        doors = [{"service": "llamacpp", "port": self.port, "upstream": upstream, "api": True}]
        self.relay_port = free_port()
        conf = stack.render("frontdoor.conf.j2", self.cfg, 1, doors=doors, tls_dir=str(certs),
                            docker_dns=False, pid_file=str(workdir / "nginx.pid"),
                            relay={"port": self.relay_port, "upstream": upstream} if relay else None)
        self.access_log = workdir / "access.log"
        if access_log:
            conf_edits = {"access_log off;": f"access_log {self.access_log};", **conf_edits}
        self.conf = workdir / "nginx.conf"
        self.conf.write_text(edited(conf, conf_edits))
        self.log = workdir / "nginx.log"
        self.workdir = workdir
        self.url = f"https://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "FrontDoor":
        self.proc = run_nginx(self.workdir, self.conf, self.log)
        wait_listening(self.port, self.log, "nginx")
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=20)

    def requests(self) -> str:
        """The access log so far (with ``access_log``)."""
        return self.access_log.read_text() if self.access_log.exists() else ""

    def __enter__(self) -> "FrontDoor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_nginx(workdir: Path, conf: Path, log: Path) -> subprocess.Popen:
    check = subprocess.run([NGINX, "-t", "-p", str(workdir), "-c", str(conf)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    return subprocess.Popen([NGINX, "-p", str(workdir), "-c", str(conf), "-g", "daemon off;"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def check_haproxy(conf: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``haproxy -c``: does this HAProxy accept the file (with this environment)?"""
    return subprocess.run([HAPROXY, "-c", "-f", str(conf)], capture_output=True, text=True, env=env)


class HAProxy:
    """Debian's HAProxy running a config file, with ``env`` as its environment.
    ``master_worker``: as the official image runs it (``haproxy -W -db``), which reloads
    its file on SIGUSR2 without dropping the connections under way."""

    def __init__(self, conf: Path, env: dict[str, str], port: int, master_worker: bool = False) -> None:
        require(HAPROXY, "haproxy")
        self.conf, self.env, self.port = conf, env, port
        self.mode = ["-W"] if master_worker else []
        self.log = conf.with_suffix(".log")
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "HAProxy":
        check = check_haproxy(self.conf, self.env)
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = subprocess.Popen([HAPROXY, *self.mode, "-db", "-f", str(self.conf)], env=self.env,
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        wait_listening(self.port, self.log, "haproxy")
        return self

    def reload(self) -> None:
        """What ``docker compose kill -s USR2 gateway`` does to the official image."""
        assert self.mode == ["-W"] and self.proc is not None
        check = check_haproxy(self.conf, self.env)
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc.send_signal(signal.SIGUSR2)

    def __exit__(self, *exc) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=20)
