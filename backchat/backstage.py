"""Step 5: Backstage's app-config.local.yaml for the Backchat plugin, and its catalog.

Backstage deep-merges config objects but REPLACES arrays, so every CSP directive we set is
written whole, with ``'self'`` first, and keeps the sources the app's own app-config.yaml
lists for it (our list replaces theirs when Backstage merges the two files). An existing
app-config.local.yaml keeps everything that is not ours; the previous version is kept
beside it when we change it.

The catalog is registered as a file location whose own ``rules`` allow its kinds; the
global ``catalog.rules`` are left alone (an array we wrote there would replace the app's).

One Backstage can describe a whole lab: a host of the ``backstage`` inventory group gets one
config and one catalog for every AI host of the run (entity names carry each host's name,
so they never clash); ``ai_server.url`` opens one host's GUI. Without that group, each AI
host describes only itself, under the plain ``backchat-*`` names (the one-box setup).

A lab with a gateway (the ``gateway`` group) is one endpoint: ``ai_server.url``, the CSP
lists and the one API's servers are the gateway's URLs (its GUI, and the API over every AI
host), whoever writes the config; the hosts stay in the catalog as the components behind it.

With an API key, Swagger UI's "Try it out" cannot call a backend from the browser: the
browser would need the key, and LocalAI answers the CORS preflight with 401. So each
backend also gets a Backstage proxy endpoint that adds the key on Backstage's server
(``${BACKCHAT_API_KEY}`` from the backend's environment; it is in no file) and, as every
proxy endpoint by default, requires a signed-in Backstage user: no open relay to the model.
The API definition lists that endpoint first; the app sends its Backstage token through
api-docs' ``requestInterceptor`` (the README has the snippet for ``apis.ts``).

Checked against Backstage's own code by tests/e2e/test_backstage_tooling.py (backstage-cli
config:check --strict, the catalog's processors and rules, helmet's CSP header, Chromium).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import re
from dataclasses import dataclass

import yaml
from pyinfra import host

from backchat import outcomes, own_files, resources
from backchat.addresses import api_urls, gateway_url, gui_url, public_address

# libyaml's parser and emitter (PyYAML's C bindings) where PyYAML has them: the same YAML,
# without most of a re-run's CPU on the controller (the catalog's OpenAPI text, char by char).
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_SafeDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _load(text):
    return yaml.load(text, Loader=_SafeLoader)


def _dump(data, **options) -> str:
    return yaml.dump(data, Dumper=_SafeDumper, **options)


CONFIG_FILE = "app-config.local.yaml"
BASE_CONFIG_FILE = "app-config.yaml"
CATALOG_FILE = "backchat-catalog.yaml"
# Backstage's default catalog rules allow only Component, API and Location; our location's
# own rules allow what the talk's catalog needs (System, and the rest of its sample list).
CATALOG_KINDS = ["Component", "API", "Resource", "System", "Domain", "Location", "Group", "User"]
# The CSP directives we own (written whole: Backstage replaces arrays).
CSP_DIRECTIVES = ("frame-src", "connect-src")
SYSTEM = "backchat"
# Backstage entity names: at most 63 characters of [A-Za-z0-9] joined by single [-_.].
ENTITY_NAME_MAX = 63
LONGEST_SUFFIX = "-llamacpp-api"
# Backstage substitutes it from the backend's environment when it reads the config.
PROXY_KEY_HEADER = {"Authorization": "Bearer ${BACKCHAT_API_KEY}"}
PROXY_METHODS = ["GET", "POST"]


@dataclass(frozen=True)
class Served:
    """An AI host as Backstage sees it: its settings, the address browsers use for it,
    and the prefix of its entity names (and proxy endpoints)."""

    cfg: object
    address: str
    prefix: str = SYSTEM
    host: str | None = None

    @property
    def gui(self) -> str:
        return gui_url(self.cfg, self.address)

    @property
    def apis(self) -> dict[str, str]:
        return api_urls(self.cfg, self.address)

    def name(self, service: str) -> str:
        """A service's Component name (its API is this plus ``-api``; its proxy endpoint
        is ``/`` plus this)."""
        return f"{self.prefix}-{service}"


GATEWAY = "gateway"


@dataclass(frozen=True)
class Door:
    """The lab's gateway as Backstage sees it: the GUI and one API over every AI host, at
    one URL (``cfg``: the gateway host's settings). Named ``backchat-gateway``."""

    cfg: object
    address: str
    host: str
    prefix: str = SYSTEM

    @property
    def gui(self) -> str:
        return gateway_url(self.cfg, self.address)

    @property
    def apis(self) -> dict[str, str]:
        return {GATEWAY: self.gui}

    def name(self, service: str) -> str:
        return f"{self.prefix}-{service}"


def one_box(cfg, address: str) -> tuple[Served, ...]:
    """A Backstage on (or for) one AI host: the plain ``backchat-*`` names."""
    return (Served(cfg, address),)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "host"


def lab(hosts) -> tuple[Served, ...]:
    """A lab's AI hosts, from ``(inventory name, settings, address)``: each host's entities
    are named ``backchat-<host>-...``, shortened with a hash where they would be too long
    or where two names would read the same."""
    room = ENTITY_NAME_MAX - len(SYSTEM) - 1 - len(LONGEST_SUFFIX)
    slugs = [_slug(name) for name, _, _ in hosts]
    served = []
    for (name, cfg, address), slug in zip(hosts, slugs):
        if len(slug) > room or slugs.count(slug) > 1:
            digest = hashlib.sha256(name.encode()).hexdigest()[:6]
            slug = f"{slug[:room - 7].rstrip('-')}-{digest}"
        served.append(Served(cfg, address, prefix=f"{SYSTEM}-{slug}", host=name))
    return tuple(served)


def gui_host(cfg, served: tuple[Served, ...]) -> Served:
    """The host whose GUI ``ai_server.url`` opens: ``ai_server_host``, else the first."""
    if len(served) == 1:
        return served[0]
    return next((each for each in served if each.host == cfg.ai_server_host), served[0])


def backend_url(base: dict | None) -> str:
    """Where browsers reach Backstage's backend: the app's ``backend.baseUrl`` when it is a
    plain URL, else the page's own origin (a production app serves both from one origin)."""
    base_backend = base.get("backend") if isinstance(base, dict) else None
    url = base_backend.get("baseUrl") if isinstance(base_backend, dict) else None
    if isinstance(url, str) and re.fullmatch(r"https?://[^\s$]+", url):
        return url.rstrip("/")
    return ""


def proxy_url(served: Served, service: str, backend: str) -> str:
    """A backend's OpenAI API base URL through Backstage's proxy (without /v1)."""
    return f"{backend}/api/proxy/{served.name(service)}"


def proxy_endpoints(served: tuple[Served, ...]) -> dict:
    """One proxy endpoint per backend that needs a key: the key added server-side, only
    the methods the API uses, a signed-in Backstage user required (the default policy,
    written out so nobody has to look it up)."""
    return {
        f"/{each.name(service)}": {
            "target": url,
            "headers": dict(PROXY_KEY_HEADER),
            "allowedMethods": list(PROXY_METHODS),
            "credentials": "require",
        }
        for each in served
        if each.cfg.api_key
        for service, url in each.apis.items()
    }


def _sources(values) -> list[str]:
    """The string sources of a CSP directive value from someone's config (else none)."""
    if not isinstance(values, list):
        return []
    return [value for value in values if isinstance(value, str)]


def _unique(values) -> list[str]:
    return list(dict.fromkeys(values))


def our_config(cfg, address: str, base: dict | None = None) -> dict:
    """Our keys of app-config.local.yaml for one AI host (see :func:`lab_config`)."""
    return lab_config(cfg, one_box(cfg, address), base)


def lab_config(cfg, served: tuple[Served, ...], base: dict | None = None, door: Door | None = None) -> dict:
    """Our keys of app-config.local.yaml, describing the AI hosts ``served`` (behind the
    lab's gateway ``door``, if there is one: then every URL is the gateway's).

    ``cfg`` is the Backstage host's settings. ``base`` is the app's own app-config.yaml
    (parsed), if any: the sources its ``backend.csp`` lists for a directive we write are
    kept in ours, since ours replaces theirs when Backstage merges the files.
    """
    fronts = (door,) if door else served
    gui = door.gui if door else gui_host(cfg, served).gui
    apis = sorted({url for each in fronts for url in each.apis.values()})
    base_backend = base.get("backend") if isinstance(base, dict) else None
    base_csp = base_backend.get("csp") if isinstance(base_backend, dict) else None
    base_csp = base_csp if isinstance(base_csp, dict) else {}
    wanted = {"frame-src": [gui], "connect-src": apis}
    csp: dict = {
        directive: _unique(["'self'", *wanted[directive], *_sources(base_csp.get(directive))])
        for directive in CSP_DIRECTIVES
    }
    if gui.startswith("http://"):
        # Helmet's default upgrade-insecure-requests would turn the iframe's http into https.
        csp["upgrade-insecure-requests"] = False
    location = {
        "type": "file",
        "target": f"{cfg.backstage_app_dir}/{CATALOG_FILE}",
        "rules": [{"allow": CATALOG_KINDS}],
    }
    # Arrays replace on merge, catalog.locations too: ours would drop the app's own
    # entities, so the app's locations are carried over, as the CSP lists are.
    base_catalog = base.get("catalog") if isinstance(base, dict) else None
    base_locations = base_catalog.get("locations") if isinstance(base_catalog, dict) else None
    theirs = [
        copy.deepcopy(entry)
        for entry in (base_locations if isinstance(base_locations, list) else [])
        if isinstance(entry, dict) and entry.get("target") != location["target"]
    ]
    ours = {
        "ai_server": {"url": gui},
        "backend": {"csp": csp},
        "catalog": {"locations": [*theirs, location]},
    }
    endpoints = proxy_endpoints(fronts)
    if endpoints:
        ours["proxy"] = {"endpoints": endpoints}
    return ours


def merge(existing: dict | None, ours: dict) -> dict:
    """Our keys replace theirs; everything else stays. Our catalog location is kept once."""
    merged = copy.deepcopy(existing) if isinstance(existing, dict) else {}
    catalog = merged.get("catalog")
    if isinstance(catalog, dict) and catalog.get("rules") == [{"allow": CATALOG_KINDS}]:
        # Written by an older backchat: global rules replace the app's own. Ours now
        # live on our location.
        del catalog["rules"]

    def deep(into: dict, new: dict) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                deep(into[key], value)
            else:
                into[key] = copy.deepcopy(value)

    proxy = merged.get("proxy")
    if isinstance(proxy, dict) and isinstance(proxy.get("endpoints"), dict):
        # Endpoints named like ours are ours: a host that left the lab, or a key turned
        # off, takes its endpoint along.
        for route in [route for route in proxy["endpoints"] if _is_our_route(route)]:
            del proxy["endpoints"][route]

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


def _our_target(cfg) -> str:
    return f"{cfg.backstage_app_dir}/{CATALOG_FILE}"


def _locations(doc) -> list:
    catalog = doc.get("catalog") if isinstance(doc, dict) else None
    locations = catalog.get("locations") if isinstance(catalog, dict) else None
    return locations if isinstance(locations, list) else []


def carries_ours(doc, cfg) -> bool:
    """Whether a parsed app-config.local.yaml has been through backchat (it lists our catalog)."""
    return any(isinstance(entry, dict) and entry.get("target") == _our_target(cfg) for entry in _locations(doc))


def _drop_empty(doc: dict, *keys: str) -> None:
    """Remove ``doc[keys[0]]...[keys[-1]]`` and every object on that path it leaves empty."""
    inner = doc.get(keys[0])
    if len(keys) > 1 and isinstance(inner, dict):
        _drop_empty(inner, *keys[1:])
    if len(keys) == 1 or inner in ({}, []):
        doc.pop(keys[0], None)


def without_ours(doc: dict, cfg, base: dict | None = None) -> dict:
    """``merge`` undone: our keys out of a parsed app-config.local.yaml, what remains kept.

    Out go ``ai_server.url``, the CSP directives we write, our proxy endpoints, our catalog
    location and the app's own locations we carried over from ``base`` (its app-config.yaml,
    which lists them anyway once ours are gone). Objects left empty go too.
    """
    result = copy.deepcopy(doc)
    carried = [entry for entry in _locations(base) if isinstance(entry, dict)]
    locations = [
        entry for entry in _locations(result)
        if not (isinstance(entry, dict) and (entry.get("target") == _our_target(cfg) or entry in carried))
    ]
    if _locations(result):
        result["catalog"]["locations"] = locations
        if not locations:
            _drop_empty(result, "catalog", "locations")
    for directive in (*CSP_DIRECTIVES, "upgrade-insecure-requests"):
        _drop_empty(result, "backend", "csp", directive)
    endpoints = (result.get("proxy") or {}).get("endpoints")
    if isinstance(endpoints, dict):
        for route in [route for route in endpoints if _is_our_route(route)]:
            _drop_empty(result, "proxy", "endpoints", route)
    _drop_empty(result, "ai_server", "url")
    return result


def _is_our_route(route) -> bool:
    """Proxy endpoints named like ours are ours (``/backchat-...``)."""
    return str(route).startswith(f"/{SYSTEM}-")


def restored_config(current_text: str | None, backup_text: str | None, cfg, base_text: str | None = None) -> str | None:
    """What app-config.local.yaml must hold once backchat is uninstalled (None: no file).

    Our backup is the app's own file from before backchat changed it: it comes back as it
    was. Without one, backchat created the file: our keys go, and the file goes if nothing
    else is left. A file backchat never touched stays as it is. (A backup an older backchat
    wrote over with its own file loses our keys the same way.)
    """
    text = backup_text if backup_text is not None else current_text
    if text is None:
        return None
    doc = _load(text)
    if not carries_ours(doc, cfg):
        return text
    rest = without_ours(doc, cfg, _load(base_text) if base_text else None)
    return _dump(rest, sort_keys=False, default_flow_style=False) if rest else None


def render_config(existing_text: str | None, cfg, address: str, base_text: str | None = None) -> str:
    """app-config.local.yaml for one AI host (see :func:`render_lab_config`)."""
    return render_lab_config(existing_text, cfg, one_box(cfg, address), base_text)


def render_lab_config(existing_text: str | None, cfg, served: tuple[Served, ...], base_text: str | None = None,
                      door: Door | None = None) -> str:
    """app-config.local.yaml: ``existing_text`` merged with ours (``base_text``: app-config.yaml)."""
    existing = _load(existing_text) if existing_text else None
    base = _load(base_text) if base_text else None
    merged = merge(existing, lab_config(cfg, served, base, door))
    return _dump(merged, sort_keys=False, default_flow_style=False)


# Helmet 6's defaults (helmet.contentSecurityPolicy.getDefaultDirectives()), in its order.
HELMET_DEFAULT_DIRECTIVES: dict[str, list[str]] = {
    "default-src": ["'self'"],
    "base-uri": ["'self'"],
    "font-src": ["'self'", "https:", "data:"],
    "form-action": ["'self'"],
    "frame-ancestors": ["'self'"],
    "img-src": ["'self'", "data:"],
    "object-src": ["'none'"],
    "script-src": ["'self'"],
    "script-src-attr": ["'none'"],
    "style-src": ["'self'", "https:", "'unsafe-inline'"],
    "upgrade-insecure-requests": [],
}


def _kebab(key: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", key).replace("_", "-").lower()


def csp_directives(csp: dict | None) -> dict[str, list[str]]:
    """The directives Backstage's backend sends for a ``backend.csp`` map.

    As backend-defaults' readHelmetOptions does: helmet's defaults, ``script-src`` with
    ``'unsafe-eval'``, no ``form-action``; then each configured key (kebab-cased) replaces
    its directive, and ``false`` removes it.
    """
    result = copy.deepcopy(HELMET_DEFAULT_DIRECTIVES)
    result["script-src"] = ["'self'", "'unsafe-eval'"]
    del result["form-action"]
    for key, value in (csp or {}).items():
        name = _kebab(key)
        if value is False:
            result.pop(name, None)
        else:
            result[name] = [str(item) for item in value]
    return result


def csp_header(csp: dict | None) -> str:
    """The Content-Security-Policy header Backstage's backend (helmet) sends for ``csp``."""
    return ";".join(
        " ".join([name, *values]) for name, values in csp_directives(csp).items()
    )


class _CatalogDumper(_SafeDumper):
    """Readable catalog YAML: multi-line strings (the OpenAPI definition) as ``|`` blocks,
    no anchors for repeated parts."""

    def ignore_aliases(self, data) -> bool:
        return True


def _represent_str(dumper: _SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_CatalogDumper.add_representer(str, _represent_str)


def openapi_definition(cfg, service: str, servers: list[dict], where: str = "on this host") -> dict:
    """The OpenAI API subset every backend serves, at ``servers`` (no api.openai.com).

    Swagger UI on Backstage's API page ("Try it out") calls the chosen server from the
    browser: Backstage's proxy (with a key), or the host itself, which must be allowed by
    Backstage's ``connect-src`` and answer CORS for Backstage's origin.
    """
    definition = copy.deepcopy(_api_template(service, cfg.model_id, where))
    definition["servers"] = servers
    if cfg.api_key:
        definition["security"] = [{"apiKey": []}]
    return definition


@functools.lru_cache(maxsize=64)
def _api_template(service: str, model_id: str, where: str) -> dict:
    """The rendered and parsed template, once per run for all hosts that serve the same
    (callers get a deep copy: parsing it is most of a host's catalog)."""
    return _load(resources.render("openai-api.yaml.j2", service=service, model_id=model_id, where=where))


def openapi_yaml(cfg, service: str, servers: list[dict], where: str = "on this host") -> str:
    """``openapi_definition`` as the catalog's YAML text. The parts every host shares are
    dumped once per run; each host adds only its ``servers`` (and the key's ``security``)."""
    before, after = _api_text_around_servers(service, cfg.model_id, where)
    security = _catalog_yaml({"security": [{"apiKey": []}]}) if cfg.api_key else ""
    return before + _catalog_yaml({"servers": servers}) + after + security


@functools.lru_cache(maxsize=64)
def _api_text_around_servers(service: str, model_id: str, where: str) -> tuple[str, str]:
    template = _api_template(service, model_id, where)
    keys = list(template)
    at = keys.index("servers")
    return (_catalog_yaml({key: template[key] for key in keys[:at]}),
            _catalog_yaml({key: template[key] for key in keys[at + 1:]}))


def _catalog_yaml(data) -> str:
    return yaml.dump(data, Dumper=_CatalogDumper, sort_keys=False)


def api_servers(served: Served, service: str, url: str, backend: str) -> list[dict]:
    """The servers an API definition lists: Backstage's proxy first when the backend needs
    a key (the browser has none), then the host itself (for clients holding the key)."""
    direct = {"url": f"{url}/v1", "description": f"{service} on {served.address}"}
    if not served.cfg.api_key:
        return [direct]
    proxied = {"url": f"{proxy_url(served, service, backend)}/v1",
               "description": "through Backstage's proxy, which adds the key (signed-in users)"}
    return [proxied, direct]


def render_catalog(cfg, address: str) -> str:
    """The catalog for one AI host (see :func:`render_lab_catalog`)."""
    return render_lab_catalog(one_box(cfg, address))


def render_lab_catalog(served: tuple[Served, ...], backend: str = "", door: Door | None = None) -> str:
    """The Backchat System; per AI host a Component per service and an API per backend
    (with a gateway: the gateway's Component and its one API, the hosts' Components behind it).

    ``backend`` is Backstage's backend URL for browsers (:func:`backend_url`).
    """
    links = ([{"url": door.gui, "title": "Chat (every AI host, through the gateway)", "icon": "chat"}] if door else [
        {"url": each.gui, "title": f"Chat ({each.host})" if each.host else "Chat", "icon": "chat"} for each in served
    ])
    system = {
        "apiVersion": "backstage.io/v1alpha1",
        "kind": "System",
        "metadata": {"name": SYSTEM, "description": "Private AI chat served from this lab", "links": links},
        "spec": {"owner": "platform-team"},
    }
    entities = [system]
    if door:
        entities.extend(_gateway_entities(door, served, backend))
    for each in served:
        entities.extend(_host_entities(each, backend, with_apis=door is None))
    return yaml.dump_all(entities, Dumper=_CatalogDumper, sort_keys=False)


def _gateway_entities(door: Door, served: tuple[Served, ...], backend: str) -> list[dict]:
    """The gateway's Component (in front of every host's backend) and the lab's one API."""
    url = door.gui
    api = f"{door.name(GATEWAY)}-api"
    component = {
        "apiVersion": "backstage.io/v1alpha1",
        "kind": "Component",
        "metadata": {
            "name": door.name(GATEWAY),
            "description": f"The lab's gateway on {door.host}: the GUI and the API of every AI host, load-balanced",
            "links": [{"url": url, "title": "Chat"}, {"url": f"{url}/v1/models", "title": "Models"}],
        },
        "spec": {
            "type": "service", "lifecycle": "experimental", "owner": "platform-team", "system": SYSTEM,
            "providesApis": [api],
            "dependsOn": [f"component:{each.name(each.cfg.backend)}" for each in served],
        },
    }
    definition = openapi_yaml(door.cfg, GATEWAY, api_servers(door, GATEWAY, url, backend),
                              where="for the whole lab, load-balanced over every AI host")
    entity = {
        "apiVersion": "backstage.io/v1alpha1",
        "kind": "API",
        "metadata": {"name": api, "description": f"OpenAI-compatible API of the whole lab at {url}/v1"},
        "spec": {
            "type": "openapi", "lifecycle": "experimental", "owner": "platform-team", "system": SYSTEM,
            "definition": definition,
        },
    }
    return [component, entity]


def _host_entities(served: Served, backend: str, with_apis: bool = True) -> list[dict]:
    """A host's Components, and its APIs (``with_apis``; behind a gateway the lab has one)."""
    cfg, gui = served.cfg, served.gui
    apis = served.apis if with_apis else {}
    on = f" on {served.host}" if served.host else ""
    backends = [service for service in cfg.services if service in apis]
    entities = []
    for service in cfg.services:
        component: dict = {
            "apiVersion": "backstage.io/v1alpha1",
            "kind": "Component",
            "metadata": {"name": served.name(service), "description": f"Backchat's {service}{on}"},
            "spec": {"type": "service", "lifecycle": "experimental", "owner": "platform-team", "system": SYSTEM},
        }
        links = []
        if service == cfg.frontend:
            links.append({"url": gui, "title": "Chat"})
        if service in apis:
            component["spec"]["providesApis"] = [f"{served.name(service)}-api"]
            links.append({"url": f"{apis[service]}/v1/models", "title": "Models"})
        elif service == cfg.backend:
            links.append({"url": f"{served.apis[service]}/v1/models", "title": "Models"})
        if service == "chatbot-ui":
            component["spec"]["dependsOn"] = [f"component:{served.name(cfg.backend)}"]
            if backends:
                component["spec"]["consumesApis"] = [f"{served.name(api_service)}-api" for api_service in backends]
        if links:
            component["metadata"]["links"] = links
        entities.append(component)
    for service, url in apis.items():
        definition = openapi_yaml(cfg, service, api_servers(served, service, url, backend))
        entities.append(
            {
                "apiVersion": "backstage.io/v1alpha1",
                "kind": "API",
                "metadata": {
                    "name": f"{served.name(service)}-api",
                    "description": f"OpenAI-compatible API of {service}{on} at {url}/v1",
                },
                "spec": {
                    "type": "openapi",
                    "lifecycle": "experimental",
                    "owner": "platform-team",
                    "system": SYSTEM,
                    "definition": definition,
                },
            }
        )
    return entities


def reads(cfg) -> list[tuple[type, dict]]:
    """The facts ``configure`` reads whatever it finds (``transport.read_ahead``)."""
    return [own_files.reading(*_paths_read(cfg))]


def _paths(cfg) -> tuple[str, str, str, str]:
    """Backstage's app config, its base config, our backup of the first, our catalog."""
    config_path = f"{cfg.backstage_app_dir}/{CONFIG_FILE}"
    return (config_path, f"{cfg.backstage_app_dir}/{BASE_CONFIG_FILE}", f"{config_path}.backchat.bak",
            f"{cfg.backstage_app_dir}/{CATALOG_FILE}")


def _paths_read(cfg) -> tuple[list[str], list[str]]:
    config_path, base_path, backup_path, catalog_path = _paths(cfg)
    return [cfg.backstage_app_dir, backup_path, catalog_path], [config_path, base_path]


def configure(cfg, lab_hosts=None, gateway=None) -> None:
    """Write app-config.local.yaml and the catalog into ``backstage_app_dir``.

    ``lab_hosts``: the AI hosts to describe, as ``(host, settings)``, on a ``backstage``
    group host; ``None`` on an AI host that describes only itself. ``gateway``: the lab's
    gateway host and its settings, if the lab has one (every URL is then the gateway's).
    """
    if lab_hosts is None:
        served = one_box(cfg, public_address(cfg))
    else:
        served = lab([(each.name, each_cfg, public_address(each_cfg, each)) for each, each_cfg in lab_hosts])
    door = None
    if gateway is not None:
        gateway_host, gateway_cfg = gateway
        door = Door(gateway_cfg, public_address(gateway_cfg, gateway_host), gateway_host.name)
    config_path, base_path, backup_path, catalog_path = _paths(cfg)
    # What is there now, with the two configs' texts, in one command.
    seen = own_files.read(*_paths_read(cfg))
    existing_text = seen.get(config_path, {}).get("text") or None
    base_text = seen.get(base_path, {}).get("text") or None
    for path, text in ((config_path, existing_text), (base_path, base_text)):
        try:
            _load(text or "")
        except yaml.YAMLError as error:
            raise ValueError(f"{path} on {host.name} is not valid YAML: {error}") from None
    content = render_lab_config(existing_text, cfg, served, base_text, door)
    catalog = render_lab_catalog(served, backend_url(_load(base_text) if base_text else None), door)

    # No mode: this is the user's Backstage app, whose directory is theirs.
    own_files.directory(name="Create the Backstage app directory", path=cfg.backstage_app_dir,
                        seen=seen.get(cfg.backstage_app_dir))
    existing = _load(existing_text) if existing_text is not None else None
    # The backup is the app's own file from before backchat changed it (uninstall.py puts
    # it back): a file that already lists our catalog is one of ours, never backed up.
    if existing_text is not None and existing != _load(content) and not carries_ours(existing, cfg):
        own_files.file(name=f"Keep the previous {CONFIG_FILE}", dest=backup_path, content=existing_text,
                       seen=seen.get(backup_path), mode="0644")
    own_files.file(name=f"Write {CONFIG_FILE}", dest=config_path, content=content, seen=seen.get(config_path),
                   mode="0644")
    outcomes.record(host.name, backstage_config=config_path, ai_server_url=door.gui if door else gui_host(cfg, served).gui)
    if any(each.cfg.api_key for each in ((door,) if door else served)):
        outcomes.record(host.name, backstage_env="BACKCHAT_API_KEY")
    own_files.file(name=f"Write {CATALOG_FILE}", dest=catalog_path, content=catalog, seen=seen.get(catalog_path),
                   mode="0644")
