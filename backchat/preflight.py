"""Before step 1: refuse, one host at a time, the hosts this deploy cannot serve.

A refusal is an operation that fails on its host only, so a fleet run carries on with the
other hosts and the final report names each refused host and why.
"""

from __future__ import annotations

from pyinfra import host

from backchat import addresses, gateway, outcomes
from backchat.facts import COMPOSE_PROJECT, ComposeStack, HostBasics, ListeningPorts, MissingUsers

# The process Docker publishes a container's port with (userland proxy).
DOCKER_PROXY = "docker-proxy"
PORT_SETTINGS = {
    "localai": "localai_port", "llamacpp": "localai_port", "textgen": "textgen_api_port",
    "textgen-gui": "textgen_port", "chatbot-ui": "chatbot_ui_port",
}

SUPPORTED = {("debian", "12"), ("debian", "13"), ("ubuntu", "22.04"), ("ubuntu", "24.04")}
ARCHITECTURES = {"amd64", "arm64"}


def problems(cfg, os_info: dict, memory_mb: int | None, init: str = "systemd", serves_ai: bool = True) -> list[str]:
    """Why this host cannot take the deploy, in words a user can act on (empty: it can).
    ``serves_ai``: it runs the model (a gateway alone needs no RAM for it)."""
    found = []
    release = (os_info["id"], os_info["version_id"])
    if release not in SUPPORTED:
        names = ", ".join(f"{name.title()} {version}" for name, version in sorted(SUPPORTED))
        found.append(
            f"{os_info['pretty_name'] or 'this OS'} is not supported (supported: {names})"
        )
    if os_info["arch"] not in ARCHITECTURES:
        found.append(f"CPU architecture {os_info['arch']} is not supported (amd64, arm64)")
    if cfg.docker_source == "debian" and release == ("debian", "12"):
        found.append(
            "docker_source = 'debian' on Debian 12: bookworm packages only compose v1 "
            "(docker-compose 1.29), and backchat needs compose v2. Fix: use "
            "docker_source = 'docker' (Docker's apt repo) or Debian 13"
        )
    if serves_ai and memory_mb is not None and memory_mb < cfg.min_memory_mb:
        found.append(
            f"{memory_mb} MB of RAM is less than the {cfg.min_memory_mb} MB the model needs "
            "(min_memory_mb). Fix: a bigger host, or a smaller model_file and min_memory_mb"
        )
    if cfg.start and init != "systemd":
        found.append(
            f"start = True, but this host's init is {init or 'unknown'!r}, not systemd, so "
            "Docker cannot run as a service. Fix: boot it with systemd, or set start = False "
            "to install and write everything without starting it"
        )
    return found


def wanted_ports(cfg, serves_ai: bool = True, runs_gateway: bool = False) -> dict[int, str]:
    """Host port -> the setting that chose it, for every service this host will run."""
    ports = {addresses.host_port(cfg, service): PORT_SETTINGS[service]
             for service in addresses.published_services(cfg)} if serves_ai else {}
    if runs_gateway:
        ports[cfg.gateway_port] = "gateway_port"
    return ports


def port_problems(cfg, listening: dict[int, str], stack_exists: bool, serves_ai: bool = True,
                  runs_gateway: bool = False, published: frozenset[int] = frozenset()) -> list[str]:
    """Ports we need that a process other than our own stack holds. ``published``: the ports
    our own project's containers publish, whatever ``ss`` names as their holder (while Docker
    starts the containers after a boot, a port can show with no process for a moment)."""
    found = []
    for port, setting in sorted(wanted_ports(cfg, serves_ai, runs_gateway).items()):
        if port not in listening:
            continue
        process = listening[port]
        if port in published or (process == DOCKER_PROXY and stack_exists):
            continue  # our own containers, published by Docker
        found.append(
            f"port {port} ({setting}) is already in use by {process or 'another process'}. "
            f"Fix: stop it, or set {setting} to a free port"
        )
    return found


def user_problems(missing: list[str]) -> list[str]:
    if not missing:
        return []
    return [
        f"docker_users names users this host does not have: {', '.join(missing)}. "
        "Fix: create them first (backchat never creates accounts), or remove them from docker_users"
    ]


def _listening_locally() -> dict[int, str]:
    """@local: the controller is the host, so psutil reads its sockets directly."""
    import psutil  # imported late: only a run on the controller itself (@local) needs it

    ports: dict[int, str] = {}
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr:
            try:
                name = psutil.Process(connection.pid).name() if connection.pid else ""
            except psutil.Error:
                name = ""
            ports[connection.laddr.port] = ports.get(connection.laddr.port) or name
    return ports


def reads(cfg) -> list[tuple[type, dict]]:
    """The facts ``check`` reads whatever it finds (``transport.read_ahead``)."""
    return [(HostBasics, {}),
            *([(ListeningPorts, {})] if cfg.start and host.name != "@local" else []),
            *([_missing_users(cfg)] if cfg.docker_users else [])]


def _missing_users(cfg) -> tuple[type, dict]:
    return MissingUsers, {"names": list(cfg.docker_users)}


def check(cfg, serves_ai: bool = True, runs_gateway: bool = False) -> dict | None:
    """Read the host's OS, RAM, ports and users; queue a refusal and return None when it
    cannot be served (as an AI host, the lab's gateway, or both)."""
    os_info = host.get_fact(HostBasics)
    found = problems(cfg, os_info, os_info["memory_mb"], os_info["init"], serves_ai)
    if cfg.start:
        listening = _listening_locally() if host.name == "@local" else host.get_fact(ListeningPorts)
        taken = any(port in listening for port in wanted_ports(cfg, serves_ai, runs_gateway))
        projects = ([(cfg.stack_dir, COMPOSE_PROJECT)] if serves_ai else []) + (
            [(gateway.directory(cfg), gateway.PROJECT)] if runs_gateway else [])
        # Only when one of our ports is taken: by our own containers on a re-run, or not.
        stacks = [host.get_fact(ComposeStack, project_dir=directory, project=project)
                  for directory, project in projects] if taken else []
        published = frozenset(port for stack in stacks if stack for port in stack.get("published", ()))
        found += port_problems(cfg, listening, any(stacks), serves_ai, runs_gateway, published)
    if cfg.docker_users:
        fact, arguments = _missing_users(cfg)
        found += user_problems(host.get_fact(fact, **arguments))
    if found:
        outcomes.refuse_host("; ".join(found))
        return None
    return os_info
