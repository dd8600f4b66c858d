"""The lab's gateway: one endpoint for every AI host, on the ``gateway`` group's host.

One door (HAProxy) serves the GUI at ``/`` and the OpenAI API at ``/v1/``, load-balanced
over every AI host's API (the pool) with least-connections. A host is in rotation only
while its ``/v1/models``, asked with the key, lists the model (an active health check:
open-source nginx has none, which is why the gateway is HAProxy); a host that fails drops
out and comes back by itself, and re-running the deploy with a host added adds it. The API
key is checked at the door, so a request without it never reaches a host. A connection
that fails is tried on another host; a request that was sent is retried only when it is
idempotent.

The GUI is Chatbot UI, as on each host, but its backend is the pool: it calls the relay
(nginx, the front door's relay that mends llama.cpp's ``"content":null`` first chunk),
which calls the pool's own listener on the compose network.

The gateway runs as its own compose project (``backchat-gateway`` in ``stack_dir/gateway``)
beside the host's stack, if the host is an AI host too. Everything here is pure: the
files' text, rendered on the controller, and the reading of HAProxy's statistics.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import re
from dataclasses import dataclass

from backchat import addresses, resources, tls

DIR = "gateway"  # under stack_dir
PROJECT = "backchat-gateway"
CONFIG_FILE = "haproxy.cfg"
RELAY_FILE = "relay.conf"
COMPOSE_FILE = "docker-compose.yaml"
PEM_FILE = "gateway.pem"  # the certificate and its key in one file, as HAProxy reads them (0600)
CA_FILE = "ca.crt"  # what the hosts' certificates are checked against
SERVICES = ("gateway", "relay", "chatbot-ui")
# Inside the gateway's container.
CONTAINER_CONFIG = "/usr/local/etc/haproxy/haproxy.cfg"
CONTAINER_TLS_DIR = "/etc/backchat/gateway"
CONTAINER_RUN_DIR = "/run/backchat-gateway"
# The pool's listener for the relay (compose network only, never published).
POOL_PORT = 8081
STATS_SOCKET = "stats.sock"
# HAProxy's statistics page on that socket, as CSV (curl --unix-socket <socket> <url>).
STATS_URL = "http://gateway/;csv"
# Health checks, in milliseconds: every 5 s; after a failure (or an error answer seen by a
# user: a door whose backend is gone answers 502) every second, so a host is out about 2 s
# after it fails; back after 2 passes, asked every 2 s while it is out. A busy host still
# answers /v1/models at once (llama.cpp's HTTP threads are not its generation's).
CHECK = {"inter": 5000, "fastinter": 1000, "downinter": 2000, "fall": 3, "rise": 2, "timeout": 10000}
RETRIES = 2


@dataclass(frozen=True)
class Member:
    """An AI host in the pool: HAProxy's name for it, where the gateway reaches its API,
    whether that is HTTPS (the host's front door), the name its certificate must carry, and
    the controller's CA directory that signed it (None: your own certificate, checked
    against the system's trust store).

    HAProxy matches a certificate's DNS names only, never its IP addresses, so a host
    whose public address is an IP has its certificate checked against the CA alone (our
    CA signs nothing but the lab's hosts)."""

    host: str
    server: str
    address: str
    tls: bool
    verify_name: str | None
    ca_dir: str | None = None


def server_name(host_name: str) -> str:
    """HAProxy's name for a host (letters, digits and ``._-`` only; ``@local`` -> ``local``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", host_name).strip("_") or "host"


def members(hosts) -> list[Member]:
    """The pool, from ``(inventory name, settings, public address)`` of every AI host: each
    host's API where browsers reach it, checked against its certificate when it has a door."""
    found = []
    taken: set[str] = set()
    for name, cfg, address in hosts:
        server = server_name(name)
        while server in taken:
            server += "_"
        taken.add(server)
        door = addresses.behind_front_door(cfg)
        found.append(Member(name, server, f"{address}:{addresses.host_port(cfg, cfg.backend)}", door,
                            address if door and not _is_ip(address) else None,
                            cfg.tls_ca_dir if door and not cfg.tls_cert_file else None))
    return found


def ca_dirs(pool: list[Member]) -> set[str]:
    """The CA directories whose certificate the gateway checks hosts against (one, or none)."""
    return {member.ca_dir for member in pool if member.tls and member.ca_dir}


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    return True


def model_listed(model_id: str) -> str:
    """HAProxy's health-check regex (single-quoted: no escapes, no variables) for a model
    list holding ``model_id`` as an id: ``"id": "<model_id>"``, spaces allowed."""
    literal = "".join(char if char.isalnum() else f"[{char}]" for char in model_id)
    return f"'\"id\" *: *\"{literal}\"'"


def render_config(cfg, pool: list[Member], **where) -> str:
    """haproxy.cfg for the gateway host (``cfg``) over ``pool``. ``where`` replaces what only
    the container provides (its binds, paths and neighbours), so the tests run this file."""
    door = addresses.behind_front_door(cfg)
    values = {
        "members": pool,
        "model_listed": model_listed(cfg.model_id),
        "door_bind": f":{cfg.gateway_port}",
        "pool_bind": f":{POOL_PORT}",
        "tls": {"crt": f"{CONTAINER_TLS_DIR}/{PEM_FILE}"} if door else None,
        "ca_file": f"{CONTAINER_TLS_DIR}/{CA_FILE}",
        "gui_upstream": addresses.internal_address("chatbot-ui"),
        "run_dir": CONTAINER_RUN_DIR,
        "check": CHECK,
        "retries": RETRIES,
    }
    return resources.render("gateway.cfg.j2", cfg=cfg, **{**values, **where})


def relay_upstream() -> str:
    """Where the relay sends Chatbot UI's calls: the pool's own listener."""
    return f"gateway:{POOL_PORT}"


def render_relay(cfg, **where) -> str:
    """The relay's nginx config: the front door's template with the relay alone."""
    values = {
        "doors": [],
        "relay": {"port": addresses.RELAY_PORT, "upstream": relay_upstream()},
        "tls_dir": tls.CONTAINER_DIR,
        "docker_dns": True,
        "pid_file": "/run/nginx.pid",
        "written_to": f"{directory(cfg)}/{RELAY_FILE}",
    }
    return resources.render("frontdoor.conf.j2", cfg=cfg, **{**values, **where})


def render_compose(cfg) -> str:
    """The gateway's compose file (project ``backchat-gateway``)."""
    return resources.render(
        "gateway-compose.yaml.j2",
        cfg=cfg,
        directory=directory(cfg),
        container_config=CONTAINER_CONFIG,
        container_tls_dir=CONTAINER_TLS_DIR,
        container_run_dir=CONTAINER_RUN_DIR,
        chat_api_host=f"http://relay:{addresses.RELAY_PORT}",
    )


def directory(cfg) -> str:
    return f"{cfg.stack_dir}/{DIR}"


def stats_socket(cfg) -> str:
    """The statistics socket on the gateway host (root only)."""
    return f"{directory(cfg)}/run/{STATS_SOCKET}"


# --- which hosts are in rotation ----------------------------------------------------------


@dataclass(frozen=True)
class Standing:
    """One host as the gateway sees it: ``in_rotation`` while its checks pass."""

    host: str
    status: str  # HAProxy's: UP, DOWN, "UP 1/3" (going down), "DOWN 1/2" (coming back), MAINT, ...
    check: str  # the last check's result, e.g. "L7OK/200", "L4CON", "L7RSP"
    detail: str  # what that check saw, e.g. "Connection refused", "HTTP content check did not match"

    @property
    def in_rotation(self) -> bool:
        """Does HAProxy send it requests? UP (even while going down), or unchecked."""
        return self.status.startswith("UP") or self.status == "no check"

    def describe(self) -> str:
        if self.in_rotation:
            return self.host
        why = ", ".join(part for part in (self.check, self.detail) if part)
        return f"{self.host} ({self.status}{': ' + why if why else ''})"


def rotation(stats_csv: str, pool: list[Member]) -> list[Standing]:
    """The pool's hosts, in pool order, from HAProxy's statistics in CSV (``/;csv``)."""
    text = stats_csv.lstrip("# ")
    rows = {row.get("svname"): row for row in csv.DictReader(io.StringIO(text)) if row.get("pxname") == "pool"}
    found = []
    for member in pool:
        row = rows.get(member.server)
        if row is None:
            found.append(Standing(member.host, "unknown", "", "not in the gateway's pool: re-run the deploy"))
            continue
        code = row.get("check_code") or ""
        check = (row.get("check_status") or "").strip("* ") + (f"/{code}" if code else "")
        found.append(Standing(member.host, row.get("status") or "", check,
                              row.get("last_chk") or row.get("check_desc") or ""))
    return found


def summary(standings: list[Standing]) -> str:
    """One line: who is in rotation, who is out and why."""
    inside = [each.describe() for each in standings if each.in_rotation]
    outside = [each.describe() for each in standings if not each.in_rotation]
    line = f"in rotation: {', '.join(inside) or 'none'}"
    return line + (f"; out: {', '.join(outside)}" if outside else "")
