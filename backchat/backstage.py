"""Step 5: Backstage's app-config.local.yaml for the Backchat plugin, and its catalog.

Backstage deep-merges config objects but REPLACES arrays, so every CSP directive we set is
written whole, with ``'self'`` first. An existing file keeps everything that is not ours;
the previous version is kept beside it when we change it.
"""

from __future__ import annotations

import copy
import io

import yaml
from pyinfra import host
from pyinfra.facts.files import FileContents
from pyinfra.facts.server import Hostname
from pyinfra.operations import files

from backchat.settings import Settings

CONFIG_FILE = "app-config.local.yaml"
CATALOG_FILE = "backchat-catalog.yaml"
# Backstage's default catalog rules allow only Component, API and Location.
CATALOG_KINDS = ["Component", "API", "Resource", "System", "Domain", "Location", "Group", "User"]


def public_address(cfg: Settings) -> str:
    """The name a browser uses for this host: never localhost, which is the browser's own."""
    if cfg.public_address:
        return cfg.public_address
    if not host.name.startswith("@"):
        return host.name
    return host.get_fact(Hostname)


def gui_url(cfg: Settings, address: str) -> str:
    port = cfg.chatbot_ui_port if cfg.frontend == "chatbot-ui" else cfg.textgen_port
    return f"http://{address}:{port}"


def api_urls(cfg: Settings, address: str) -> dict[str, str]:
    """Backend service -> its OpenAI API base URL (without /v1) at ``address``."""
    urls = {}
    for service in cfg.services:
        if service in ("localai", "llamacpp"):
            urls[service] = f"http://{address}:{cfg.localai_port}"
        elif service == "textgen":
            urls[service] = f"http://{address}:{cfg.textgen_api_port}"
    return urls


def our_config(cfg: Settings, address: str) -> dict:
    gui = gui_url(cfg, address)
    apis = sorted(set(api_urls(cfg, address).values()))
    csp: dict = {
        "frame-src": ["'self'", gui],
        "connect-src": ["'self'", *apis],
    }
    if gui.startswith("http://"):
        # Helmet's default upgrade-insecure-requests would turn the iframe's http into https.
        csp["upgrade-insecure-requests"] = False
    return {
        "ai_server": {"url": gui},
        "backend": {"csp": csp},
        "catalog": {
            "rules": [{"allow": CATALOG_KINDS}],
            "locations": [
                {
                    "type": "file",
                    "target": f"{cfg.backstage_app_dir}/{CATALOG_FILE}",
                    "rules": [{"allow": CATALOG_KINDS}],
                }
            ],
        },
    }


def merge(existing: dict | None, ours: dict) -> dict:
    """Our keys replace theirs; everything else stays. Our catalog location is kept once."""
    merged = copy.deepcopy(existing) if isinstance(existing, dict) else {}

    def deep(into: dict, new: dict) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                deep(into[key], value)
            else:
                into[key] = copy.deepcopy(value)

    their_locations = (merged.get("catalog") or {}).get("locations") or []
    ours_targets = {location["target"] for location in ours["catalog"]["locations"]}
    deep(merged, ours)
    kept = [
        location
        for location in their_locations
        if not (isinstance(location, dict) and location.get("target") in ours_targets)
    ]
    merged["catalog"]["locations"] = kept + ours["catalog"]["locations"]
    return merged


def render_config(existing_text: str | None, cfg: Settings, address: str) -> str:
    existing = yaml.safe_load(existing_text) if existing_text else None
    merged = merge(existing, our_config(cfg, address))
    return yaml.safe_dump(merged, sort_keys=False, default_flow_style=False)


def render_catalog(cfg: Settings, address: str) -> str:
    """The Backchat System, a Component per service and the OpenAI-compatible API."""
    apis = api_urls(cfg, address)
    system = {
        "apiVersion": "backstage.io/v1alpha1",
        "kind": "System",
        "metadata": {"name": "backchat", "description": "Private AI chat served from this lab"},
        "spec": {"owner": "platform-team"},
    }
    entities = [system]
    for service in cfg.services:
        component = {
            "apiVersion": "backstage.io/v1alpha1",
            "kind": "Component",
            "metadata": {"name": f"backchat-{service}"},
            "spec": {"type": "service", "lifecycle": "experimental", "owner": "platform-team", "system": "backchat"},
        }
        if service in apis:
            component["spec"]["providesApis"] = [f"backchat-{service}-api"]
        entities.append(component)
    for service, url in apis.items():
        definition = {
            "openapi": "3.0.3",
            "info": {"title": f"OpenAI-compatible API ({service})", "version": "1.0.0"},
            "servers": [{"url": f"{url}/v1"}],
            "paths": {"/models": {"get": {"summary": "List models", "responses": {"200": {"description": "Models"}}}}},
        }
        entities.append(
            {
                "apiVersion": "backstage.io/v1alpha1",
                "kind": "API",
                "metadata": {"name": f"backchat-{service}-api"},
                "spec": {
                    "type": "openapi",
                    "lifecycle": "experimental",
                    "owner": "platform-team",
                    "system": "backchat",
                    "definition": yaml.safe_dump(definition, sort_keys=False),
                },
            }
        )
    return yaml.safe_dump_all(entities, sort_keys=False)


def configure(cfg: Settings) -> None:
    address = public_address(cfg)
    config_path = f"{cfg.backstage_app_dir}/{CONFIG_FILE}"
    lines = host.get_fact(FileContents, path=config_path)
    existing_text = "\n".join(lines) + "\n" if lines else None
    try:
        content = render_config(existing_text, cfg, address)
    except yaml.YAMLError as error:
        raise ValueError(f"{config_path} on {host.name} is not valid YAML: {error}") from None

    files.directory(name="Create the Backstage app directory", path=cfg.backstage_app_dir, mode="0755")
    if existing_text is not None and yaml.safe_load(existing_text) != yaml.safe_load(content):
        files.put(
            name=f"Keep the previous {CONFIG_FILE}",
            src=io.StringIO(existing_text),
            dest=f"{config_path}.backchat.bak",
            mode="0644",
        )
    files.put(name=f"Write {CONFIG_FILE}", src=io.StringIO(content), dest=config_path, mode="0644")
    files.put(
        name=f"Write {CATALOG_FILE}",
        src=io.StringIO(render_catalog(cfg, address)),
        dest=f"{cfg.backstage_app_dir}/{CATALOG_FILE}",
        mode="0644",
    )
