"""Where each service listens, and the URLs every step uses to reach it.

The single home of ports: the container port each image listens on (fixed by the image),
the host port each service is published on (a setting), and the URLs built from them for
browsers (the GUI, Backstage), for the controller (verify) and inside the compose network
(Chatbot UI to its backend).
"""

from __future__ import annotations

import ipaddress

from pyinfra import host
from pyinfra.facts.server import Hostname

# Container-side ports, fixed by the images.
CONTAINER_PORTS = {"localai": 8080, "llamacpp": 8080, "textgen": 5000, "textgen-gui": 7860, "chatbot-ui": 3000}
# The services that serve the OpenAI API.
API_SERVICES = ("localai", "llamacpp", "textgen")


def host_port(cfg, service: str) -> int:
    """The host port a service is published on (LocalAI and llama.cpp share one setting)."""
    return {
        "localai": cfg.localai_port,
        "llamacpp": cfg.localai_port,
        "textgen": cfg.textgen_api_port,
        "textgen-gui": cfg.textgen_port,
        "chatbot-ui": cfg.chatbot_ui_port,
    }[service]


def public_address(cfg, of=None) -> str:
    """The name a browser uses for a host (``of``, else this one): never localhost, which
    is the browser's own.

    Unset, it is the inventory name (or, for ``@local``, the host name), except when the
    services listen on loopback only: then only a browser on the host itself can reach
    them, at that loopback address.
    """
    of = of or host
    if cfg.public_address:
        return cfg.public_address
    bind = ipaddress.ip_address(cfg.bind_address)
    if bind.is_loopback:
        return f"[{bind}]" if bind.version == 6 else str(bind)
    if not of.name.startswith("@"):
        return of.name
    return of.get_fact(Hostname)


def connect_address(reached) -> str:
    """Where the controller reaches a host: its SSH address, or loopback for @local."""
    address = reached.data.get("ssh_hostname") or reached.name
    return "127.0.0.1" if address.startswith("@") else address


def behind_front_door(cfg) -> bool:
    """The HTTPS front door serves every port: asked for (``tls``), and the services are
    reachable off the host (a loopback bind is reached only from the host itself)."""
    return bool(cfg.tls) and not ipaddress.ip_address(cfg.bind_address).is_loopback


def _scheme(cfg) -> str:
    return "https" if behind_front_door(cfg) else "http"


def compose_services(cfg) -> list[str]:
    """Every service of the compose file: the chosen ones, and the front door before them."""
    return [*cfg.services, *(["frontdoor"] if behind_front_door(cfg) else [])]


def published_services(cfg) -> list[str]:
    """Every service port users reach: the GUI and the APIs. Text Gen WebUI's own GUI only
    when it is the GUI users open: it can load and unload models, and has no password."""
    names = list(cfg.services)
    if cfg.frontend == "textgen":
        names.insert(names.index("textgen") + 1, "textgen-gui")
    return names


def gui_service(cfg) -> str:
    """The service whose port is the chat GUI users open."""
    return "chatbot-ui" if cfg.frontend == "chatbot-ui" else "textgen-gui"


def gui_url(cfg, address: str) -> str:
    """The chat GUI users open (and Backstage iframes)."""
    return f"{_scheme(cfg)}://{address}:{host_port(cfg, gui_service(cfg))}"


def api_urls(cfg, address: str) -> dict[str, str]:
    """Backend service -> its OpenAI API base URL (without /v1) at ``address``."""
    return {
        service: f"{_scheme(cfg)}://{address}:{host_port(cfg, service)}"
        for service in cfg.services
        if service in API_SERVICES
    }


def gateway_url(cfg, address: str) -> str:
    """The lab's one endpoint on the gateway host (``cfg`` its settings): the GUI at ``/``,
    the OpenAI API at ``/v1`` (the URL is the API's base, as elsewhere). The scheme's own
    port is left out, as browsers write the origin."""
    scheme = _scheme(cfg)
    own = cfg.gateway_port == {"https": 443, "http": 80}[scheme]
    return f"{scheme}://{address}" + ("" if own else f":{cfg.gateway_port}")


def internal_address(service: str) -> str:
    """host:port of a service on the compose network (Text Gen WebUI's GUI is its container)."""
    container = "textgen" if service == "textgen-gui" else service
    return f"{container}:{CONTAINER_PORTS[service]}"


def internal_api_url(service: str) -> str:
    """A backend's API base URL on the compose network (what Chatbot UI calls)."""
    return f"http://{internal_address(service)}"


# The front door's relay for Chatbot UI (compose network only, never published).
RELAY_PORT = 8079


def chat_relay(cfg) -> dict | None:
    """Chatbot UI's way to its backend through the front door, which mends the stream
    (see frontdoor.conf.j2); None when there is no front door or no Chatbot UI."""
    if not behind_front_door(cfg) or cfg.frontend != "chatbot-ui":
        return None
    return {"port": RELAY_PORT, "upstream": internal_address(cfg.backend)}


def chat_api_url(cfg) -> str:
    """What Chatbot UI calls (OPENAI_API_HOST, without /v1): the relay, else the backend."""
    if chat_relay(cfg):
        return f"http://frontdoor:{RELAY_PORT}"
    return internal_api_url(cfg.backend)


def doors(cfg) -> list[dict]:
    """The front door's listeners: each published host port, in front of its service."""
    if not behind_front_door(cfg):
        return []
    return [
        {"service": service, "port": host_port(cfg, service), "upstream": internal_address(service),
         "api": service in API_SERVICES}
        for service in published_services(cfg)
    ]
