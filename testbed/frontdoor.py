"""The HTTPS front door run for real: Debian's nginx with the frontdoor.conf backchat writes.

What only the compose network provides is replaced, nothing else: each door's upstream is a
server on loopback instead of a container name, the certificate directory is the caller's
instead of the container's mount, Docker's DNS resolver line is left out, and the pid file
is the caller's. The certificate is signed by the CA backchat makes on the controller
(``tls.host_certificate`` with the settings' ``tls_ca_dir``). nginx here is Debian 12's
(1.22); the image the deploy pins is the official nginx 1.30 (same directives).

Used by tests/e2e/test_frontdoor.py, tests/e2e/test_mixed_content.py and
bench/frontdoor.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

from backchat import addresses, secrets, settings, stack, tls
from backchat.secrets import Secret
from testbed.llama_server import free_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
LLAMA_HOST = "ai-01.test"  # what the one-backend door's certificate names, beside 127.0.0.1


def missing_requirements() -> str | None:
    if not os.access(NGINX, os.X_OK):
        return "nginx is not installed (Debian package nginx)"
    return None


class FrontDoor:
    """nginx running backchat's frontdoor.conf for ``cfg``, its doors in front of
    ``upstreams`` (service -> host:port; services without one get no door).

    ``names``: what the certificate names (the first is the host's name). ``relay``: the
    chat relay's upstream (Chatbot UI's way to its backend), on a free port. ``conf_edits``
    (old text -> new) mutate the rendered file; each old text must be in it.
    """

    def __init__(self, workdir: Path, cfg, upstreams: dict[str, str], names, relay: str | None = None,
                 **conf_edits: str) -> None:
        assert addresses.behind_front_door(cfg), "the settings have no front door (tls off or a loopback bind)"
        names = list(names)
        certificate = tls.host_certificate(cfg, names[0], names)
        self.ca = certificate.trust
        self.trust = ssl.create_default_context(cafile=self.ca)
        certs = workdir / "tls"
        certs.mkdir(mode=0o700)
        (certs / tls.CERT_FILE).write_text(certificate.cert_pem)
        key = certs / tls.KEY_FILE
        key.touch(mode=0o600)
        key.write_text(certificate.key_pem.reveal())
        if cfg.api_key:
            key_map = certs / stack.DOOR_KEY_MAP
            key_map.touch(mode=0o600)
            key_map.write_text(secrets.reveal(stack.door_key_lines(cfg)))
        self.doors = [dict(door, upstream=upstreams[door["service"]])
                      for door in addresses.doors(cfg) if door["service"] in upstreams]
        assert self.doors, f"no door for {sorted(upstreams)} among {addresses.published_services(cfg)}"
        self.relay_port = free_port()
        conf = stack.render("frontdoor.conf.j2", cfg, 1, doors=self.doors, tls_dir=str(certs),
                            docker_dns=False, pid_file=str(workdir / "nginx.pid"),
                            relay={"port": self.relay_port, "upstream": relay} if relay else None)
        for old, new in conf_edits.items():
            assert old in conf, old
            conf = conf.replace(old, new)
        self.conf = workdir / "nginx.conf"
        self.conf.write_text(conf)
        self.log = workdir / "nginx.log"
        self.workdir = workdir
        self.cfg = cfg
        self.port = self.doors[0]["port"]
        self.url = f"https://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "FrontDoor":
        check = subprocess.run([NGINX, "-t", "-p", str(self.workdir), "-c", str(self.conf)],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        with self.log.open("w") as log:
            self.proc = subprocess.Popen([NGINX, "-p", str(self.workdir), "-c", str(self.conf), "-g", "daemon off;"],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        waiting = [door["port"] for door in self.doors]
        while waiting and time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", waiting[0])) == 0:
                    waiting.pop(0)
                    continue
            time.sleep(0.1)
        if waiting:
            self.__exit__()
            raise AssertionError(f"nginx did not listen on {waiting}: {self.log.read_text()}")
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
            self.proc = None


def llama_door(workdir: Path, upstream: str, api_key: str, relay: bool = False, **conf_edits: str) -> FrontDoor:
    """A door on a free port for one llama.cpp backend at ``upstream`` (host:port) that
    needs ``api_key``; its certificate names :data:`LLAMA_HOST` and 127.0.0.1."""
    port = free_port()
    cfg = settings.validate(
        settings.load_defaults() | {"backend": "llamacpp", "tls": True, "tls_ca_dir": str(workdir / "ca"),
                                    "localai_port": port, "proxy_timeout": 120},
        api_key=Secret(api_key),
    )
    return FrontDoor(workdir, cfg, {"llamacpp": upstream}, [LLAMA_HOST, "127.0.0.1"],
                     relay=upstream if relay else None, **conf_edits)
