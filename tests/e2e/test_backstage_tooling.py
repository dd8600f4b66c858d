"""What backchat writes for Backstage, checked by Backstage's own tooling and a real browser.

- ``backstage-cli config:check --strict`` (with the schemas of backend-defaults, the catalog
  backend and the Backchat plugin's ``ai_server``) on an app's app-config.yaml plus our
  app-config.local.yaml; mutated files must fail.
- The catalog file read by the catalog's own file reader, entity policies, kind validators
  and rules (merged config), its OpenAPI definitions by swagger-parser.
- The CSP header helmet makes of the merged config equals :func:`backstage.csp_header`.
- A real llama-server answers the CORS preflight of the Backstage origin, and headless
  Chromium, on a page served with our CSP, loads the GUI iframe and fetches ``/v1/models``
  from the catalog's server URL; with ``'self'`` only, both are blocked.

The npm packages are pinned in tests/backstage/package-lock.json and installed once per
lockfile under ``$BACKCHAT_TEST_CACHE/npm/<hash>`` (``npm ci --ignore-scripts``). Without
``node``/``npm`` (or ``/usr/bin/chromium`` for the browser tests) these tests skip, unless
BACKCHAT_REQUIRE_REALHOSTS=1 (CI): then they fail.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from backchat import backstage, settings
from tests.cfg import make_cfg
from testbed import npm
from testbed.backstage_backend import deep_merge as backstage_merge
from testbed.sandbox import CACHE
from tests.variants import COMBINATIONS

pytestmark = pytest.mark.npm

HERE = Path(__file__).resolve().parent.parent  # tests/, which holds backstage/
PROJECT = HERE / "backstage"
CHROMIUM = Path(os.environ.get("BACKCHAT_CHROMIUM", "/usr/bin/chromium"))
# What decides node_modules: the cache key is the hash of these files.
INSTALL_FILES = (
    "package.json",
    "package-lock.json",
    ".npmrc",
    "backchat-plugin-schema/package.json",
    "backchat-plugin-schema/config.d.ts",
)
NPM_CI = ("npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund")
ADDRESS = "ai-01.lab"
BACKSTAGE_ORIGIN = "http://backstage.lab:3000"
MIN_NODE = 20  # playwright-core 1.65 and Backstage's packages need Node.js 20 or later

# Measured durations, printed at the end of the session (pytest -s, or -rA shows them too).
TIMINGS: dict[str, float] = {}


# --- availability --------------------------------------------------------------------------


def unavailable(reason: str) -> None:
    """Skip, or fail when BACKCHAT_REQUIRE_REALHOSTS=1 (CI): a skip there proves nothing."""
    if os.environ.get("BACKCHAT_REQUIRE_REALHOSTS") == "1":
        pytest.fail(f"BACKCHAT_REQUIRE_REALHOSTS=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def require_node() -> None:
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        unavailable(f"Backstage tooling tests need {' and '.join(missing)} on PATH (Node.js {MIN_NODE}+ with npm)")
    version = npm.version("node").lstrip("v")
    if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < MIN_NODE:
        unavailable(f"Backstage tooling tests need Node.js {MIN_NODE} or later, not {version or 'unknown'}")


def require_chromium() -> None:
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"browser tests need {CHROMIUM} (Debian package chromium)")


# --- the npm install, cached per lockfile --------------------------------------------------


def npm_install() -> Path:
    """node_modules for tests/backstage, installed once per lockfile; returns its project dir."""

    def build(directory: Path) -> dict:
        started = time.monotonic()
        done = subprocess.run(
            NPM_CI, cwd=directory, capture_output=True, text=True, timeout=1800,
            env={**os.environ, "npm_config_update_notifier": "false", "npm_config_progress": "false"},
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(NPM_CI)} in {directory} exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        TIMINGS["npm ci (no node_modules cached)"] = seconds = round(time.monotonic() - started, 1)
        return {"npm_ci_seconds": seconds}

    install, built = npm.cached_install(PROJECT, INSTALL_FILES, CACHE / "npm", build)
    if not built:
        TIMINGS.setdefault("npm install (cached)", 0.0)
    return install


@pytest.fixture(scope="session")
def npm_root() -> Path:
    require_node()
    try:
        return npm_install()
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired, OSError) as error:
        unavailable(f"could not install the Backstage npm packages: {error}")


@pytest.fixture(scope="session", autouse=True)
def _print_timings():
    yield
    if TIMINGS:
        print("\nBackstage tooling timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in TIMINGS.items()))


def node(npm_root: Path, script: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["node", str(PROJECT / script), *args],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "BACKCHAT_NPM_ROOT": str(npm_root)},
    )


def node_json(npm_root: Path, script: str, *args: str, timeout: float = 180):
    done = node(npm_root, script, *args, timeout=timeout)
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


def backstage_cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    """``backstage-cli`` run in ``project`` (whose package.json names the schemas to collect)."""
    started = time.monotonic()
    done = subprocess.run(
        ["node", str(project / "node_modules/@backstage/cli/bin/backstage-cli"), *args],
        cwd=project, capture_output=True, text=True, timeout=300,
    )
    TIMINGS.setdefault(f"backstage-cli {args[0]}", round(time.monotonic() - started, 1))
    return done


def config_check(project: Path, *files: Path) -> subprocess.CompletedProcess:
    flags = [arg for path in files for arg in ("--config", str(path))]
    return backstage_cli(project, "config:check", "--strict", *flags)


# --- what backchat writes ------------------------------------------------------------------


class App:
    """A Backstage app directory: the app's app-config.yaml and what backchat writes beside it."""

    def __init__(self, root: Path, cfg: settings.Settings, address: str = ADDRESS, existing: str | None = None):
        self.root = root
        self.cfg = cfg
        self.address = address
        self.base = root / "app-config.yaml"
        self.local = root / backstage.CONFIG_FILE
        self.catalog = root / backstage.CATALOG_FILE
        shutil.copy(PROJECT / "app-config.yaml", self.base)
        self.local.write_text(backstage.render_config(existing, cfg, address, self.base.read_text()))
        self.catalog.write_text(backstage.render_catalog(cfg, address))

    @property
    def configs(self) -> list[Path]:
        return [self.base, self.local]

    def local_config(self) -> dict:
        return yaml.safe_load(self.local.read_text())

    def merged(self) -> dict:
        return backstage_merge(yaml.safe_load(self.base.read_text()), self.local_config())


# backstage_app_dir must be a directory of its own: /tmp (where tmp_path lives) is refused.
APPS = CACHE / "run" / "backstage-tooling-apps"


def app_dir(tmp_path: Path) -> Path:
    path = APPS / f"{os.getpid()}-{tmp_path.name}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def app_for(tmp_path: Path, backend: str = "localai", frontend: str = "chatbot-ui", **overrides) -> App:
    root = app_dir(tmp_path)
    cfg = make_cfg(backend=backend, frontend=frontend, backstage_app_dir=str(root), **overrides)
    return App(root, cfg)


# An app-config.local.yaml a team already has (keys the installed schemas declare).
EXISTING_LOCAL = """\
app:
  title: Lab Portal
  baseUrl: http://backstage.lab:3000
backend:
  database:
    client: pg
    connection:
      host: db.lab
      port: 5432
  csp:
    frame-src: ["'self'", 'http://old-host:9999']
ai_server:
  url: http://localhost:3001
catalog:
  rules:
    - allow: [Component, API, Resource, System, Domain, Location, Group, User]
  locations:
    - type: url
      target: https://github.com/lab/repo/blob/main/catalog-info.yaml
"""


# --- config:check --strict -----------------------------------------------------------------


@pytest.mark.parametrize("combo", COMBINATIONS, ids=lambda c: "+".join(c))
def test_config_check_strict_accepts_our_file(npm_root, tmp_path, combo):
    app = app_for(tmp_path, *combo)
    done = config_check(npm_root, *app.configs)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Loaded config from app-config.yaml, {backstage.CONFIG_FILE}" in done.stderr


def test_config_check_strict_accepts_our_file_merged_into_theirs(npm_root, tmp_path):
    root = app_dir(tmp_path)
    app = App(root, make_cfg(backstage_app_dir=str(root)), existing=EXISTING_LOCAL)
    local = app.local_config()
    assert local["app"]["title"] == "Lab Portal" and local["backend"]["database"]["client"] == "pg"
    assert "rules" not in local["catalog"], "the global rules an older backchat wrote are gone"
    done = config_check(npm_root, *app.configs)
    assert done.returncode == 0, done.stderr[-3000:]


def test_ai_server_url_is_visible_to_the_frontend(npm_root, tmp_path):
    """@visibility frontend in the plugin's config.d.ts: the app's frontend gets the URL."""
    app = app_for(tmp_path)
    flags = [arg for path in app.configs for arg in ("--config", str(path))]
    done = backstage_cli(npm_root, "config:print", "--frontend", "--format", "json", *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    frontend = json.loads(done.stdout)
    assert frontend["ai_server"] == {"url": f"http://{ADDRESS}:3001"}
    assert "backend" not in frontend and "catalog" not in frontend


def _set(path: str, value):
    def mutate(config: dict) -> None:
        *parents, last = path.split(".")
        node_ = config
        for part in parents:
            node_ = node_[int(part)] if isinstance(node_, list) else node_.setdefault(part, {})
        node_[last] = value

    return mutate


def _rename_top(old: str, new: str):
    def mutate(config: dict) -> None:
        config[new] = config.pop(old)

    return mutate


MUTATIONS = {
    # CSP values must be lists of strings (or false): one string is not a list.
    "csp-list-as-one-string": (_set("backend.csp.frame-src", "'self' http://ai-01.lab:3001"), "/backend/csp/frame-src"),
    "csp-list-of-objects": (_set("backend.csp.connect-src", [{"url": "http://ai-01.lab:8080"}]), "/backend/csp/connect-src"),
    "csp-true": (_set("backend.csp.upgrade-insecure-requests", True), "/backend/csp/upgrade-insecure-requests"),
    "unknown-key-in-ai_server": (_set("ai_server.uri", "http://ai-01.lab:3001"), "additionalProperty=uri"),
    "unknown-top-level-key": (_rename_top("ai_server", "aiserver"), "additionalProperty=aiserver"),
    "unknown-key-in-catalog": (_set("catalog.location", []), "additionalProperty=location"),
    "csp-under-the-wrong-parent": (_set("app.csp", {"frame-src": ["'self'"]}), "additionalProperty=csp"),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_config_check_strict_rejects_a_broken_file(npm_root, tmp_path, name):
    mutate, words = MUTATIONS[name]
    app = app_for(tmp_path)
    config = app.local_config()
    mutate(config)
    broken = tmp_path / "app-config.broken.yaml"
    broken.write_text(yaml.safe_dump(config, sort_keys=False))
    done = config_check(npm_root, app.base, broken)
    assert done.returncode != 0, f"config:check --strict accepted the {name} file:\n{broken.read_text()}"
    assert "Configuration does not match schema" in done.stderr and words in done.stderr, done.stderr[-3000:]


def test_without_the_plugin_schema_ai_server_is_an_unknown_key(npm_root, tmp_path):
    """Proves the schema package is what declares ai_server (the pass above is not vacuous)."""
    package = json.loads((npm_root / "package.json").read_text())
    del package["dependencies"]["backchat-plugin-schema"]
    project = tmp_path / "project"
    project.mkdir()
    (project / "package.json").write_text(json.dumps(package))
    (project / "node_modules").symlink_to(npm_root / "node_modules")
    app = app_for(tmp_path)
    done = config_check(project, *app.configs)
    assert done.returncode != 0
    assert "additionalProperty=ai_server" in done.stderr, done.stderr[-3000:]


# --- the catalog, as Backstage's catalog reads it ------------------------------------------


@pytest.mark.parametrize("combo", COMBINATIONS, ids=lambda c: "+".join(c))
def test_catalog_passes_backstage_validation_and_rules(npm_root, tmp_path, combo):
    backend, frontend = combo
    app = app_for(tmp_path, backend, frontend, api_key="sk-test-12345678")
    started = time.monotonic()
    report = node_json(npm_root, "check-catalog.js", "--catalog", str(app.catalog),
                       *[arg for path in app.configs for arg in ("--config", str(path))])
    TIMINGS.setdefault("catalog validation (node)", round(time.monotonic() - started, 1))
    assert report["errors"] == []
    entities = {entity["ref"]: entity for entity in report["entities"]}
    for entity in entities.values():
        assert entity["errors"] == [], entity
        assert entity["allowed"] is True, f"the catalog rules reject {entity['ref']} from our file location"

    apis = backstage.api_urls(app.cfg, ADDRESS)
    expected = {"system:default/backchat"}
    expected |= {f"component:default/backchat-{service}" for service in app.cfg.services}
    expected |= {f"api:default/backchat-{service}-api" for service in apis}
    assert set(entities) == expected
    for service, url in apis.items():
        api = entities[f"api:default/backchat-{service}-api"]
        assert api["openapi"]["valid"] is True, api["openapi"]
        # With a key, Backstage's proxy endpoint first (relative, the page's own origin: the
        # catalog is rendered here without the app's backend.baseUrl), then the host itself.
        assert api["openapi"]["servers"] == [f"/api/proxy/backchat-{service}/v1", f"{url}/v1"]
        assert api["openapi"]["paths"]["/models"] == ["get"]
        assert api["openapi"]["paths"]["/chat/completions"] == ["post"]
        relations = entities[f"component:default/backchat-{service}"]["relations"]
        assert {"type": "providesApi", "target": f"api:default/backchat-{service}-api"} in relations
    for ref, entity in entities.items():
        if ref != "system:default/backchat":
            assert {"type": "partOf", "target": "system:default/backchat"} in entity["relations"]
    # The app's own global rules still apply elsewhere, and ours did not widen them.
    assert report["elsewhere"] == {
        "Component": True, "API": True, "Location": True, "Template": True,
        "System": False, "Group": False, "User": False,
    }


def test_a_lab_behind_a_gateway_passes_config_check_and_the_catalogs_validation(npm_root, tmp_path):
    """Issue 15: a lab's Backstage config and catalog with a gateway, as a ``backstage``
    host writes them: Backstage's schema accepts the config, and its catalog accepts the
    gateway's Component and the lab's one API (the proxy endpoint first, then the gateway),
    with the hosts' Components behind it."""
    root = app_dir(tmp_path)

    def lab(key: str | None):
        served = backstage.lab([(name, make_cfg(api_key=key), f"{name}.lab") for name in ("ai-01", "ai-02")])
        return served, backstage.Door(make_cfg(tls=True, api_key=key), "gw.lab", "gw")

    base = root / "app-config.yaml"
    shutil.copy(PROJECT / "app-config.yaml", base)
    local = root / backstage.CONFIG_FILE
    # Without a key (these installed schemas have no proxy plugin; test_backstage_backend runs
    # the proxy endpoint for real).
    served, door = lab(None)
    local.write_text(backstage.render_lab_config(None, make_cfg(backstage_app_dir=str(root)), served, base.read_text(), door))
    done = config_check(npm_root, base, local)
    assert done.returncode == 0, done.stderr[-3000:]
    assert yaml.safe_load(local.read_text())["ai_server"]["url"] == "https://gw.lab"
    catalog = root / backstage.CATALOG_FILE
    served, door = lab("sk-test-12345678")
    catalog.write_text(backstage.render_lab_catalog(served, "", door))
    report = node_json(npm_root, "check-catalog.js", "--catalog", str(catalog), "--config", str(base), "--config", str(local))
    assert report["errors"] == []
    entities = {entity["ref"]: entity for entity in report["entities"]}
    for entity in entities.values():
        assert entity["errors"] == [] and entity["allowed"] is True, entity
    assert set(entities) == {"system:default/backchat", "component:default/backchat-gateway",
                             "api:default/backchat-gateway-api"} | {
        f"component:default/backchat-{name}-{service}" for name in ("ai-01", "ai-02") for service in ("localai", "chatbot-ui")}
    api = entities["api:default/backchat-gateway-api"]
    assert api["openapi"]["valid"] is True and api["openapi"]["servers"] == [
        "/api/proxy/backchat-gateway/v1", "https://gw.lab/v1"]
    relations = entities["component:default/backchat-gateway"]["relations"]
    assert {"type": "providesApi", "target": "api:default/backchat-gateway-api"} in relations
    assert {"type": "dependsOn", "target": "component:default/backchat-ai-02-localai"} in relations


CATALOG_BREAKAGES = {
    "bad-name": (lambda entities: entities[1]["metadata"].__setitem__("name", "backchat localai"), "metadata.name"),
    "no-owner": (lambda entities: entities[1]["spec"].pop("owner"), "owner"),
    "api-definition-not-openapi": (
        lambda entities: entities[-1]["spec"].__setitem__("definition", "openapi: 3.0.3\nservers: []\n"),
        "is not a valid Openapi API definition",
    ),
}


@pytest.mark.parametrize("name", CATALOG_BREAKAGES)
def test_catalog_validation_catches_a_broken_entity(npm_root, tmp_path, name):
    """The validation above is not vacuous: broken entities are reported."""
    breakage, words = CATALOG_BREAKAGES[name]
    app = app_for(tmp_path)
    entities = list(yaml.safe_load_all(app.catalog.read_text()))
    breakage(entities)
    app.catalog.write_text(yaml.safe_dump_all(entities, sort_keys=False))
    report = node_json(npm_root, "check-catalog.js", "--catalog", str(app.catalog))
    problems = [
        text
        for entity in report["entities"]
        for text in entity["errors"] + ([entity["openapi"]["error"]] if entity.get("openapi", {}).get("valid") is False else [])
    ]
    assert problems, report
    assert any(words in problem for problem in problems), problems


def parse_csp(header: str) -> dict[str, list[str]]:
    return {part.split(" ")[0]: part.split(" ")[1:] for part in header.split(";")}


# --- the CSP header Backstage sends --------------------------------------------------------


@pytest.mark.parametrize("combo", COMBINATIONS, ids=lambda c: "+".join(c))
def test_csp_header_is_what_backstages_helmet_sends(npm_root, tmp_path, combo):
    app = app_for(tmp_path, *combo)
    headers = node_json(npm_root, "csp-header.js", *[arg for path in app.configs for arg in ("--config", str(path))])
    header = headers["Content-Security-Policy"]
    directives = parse_csp(header)
    # Same directives and sources; only the order of directives may differ (it follows the
    # key order of Backstage's merged config, which carries no meaning).
    assert directives == parse_csp(backstage.csp_header(app.merged()["backend"]["csp"]))
    gui = backstage.gui_url(app.cfg, ADDRESS)
    assert directives["frame-src"][:2] == ["'self'", gui]
    for url in backstage.api_urls(app.cfg, ADDRESS).values():
        assert url in directives["connect-src"]
    # The app's own connect-src sources (create-app's http: https:) are carried over.
    assert {"http:", "https:"} <= set(directives["connect-src"])
    assert "upgrade-insecure-requests" not in directives
    assert directives["default-src"] == ["'self'"]


def test_csp_header_of_the_app_alone_blocks_the_iframe(npm_root, tmp_path):
    """Without our file Backstage sends no frame-src: default-src 'self' blocks the GUI."""
    app = app_for(tmp_path)
    header = node_json(npm_root, "csp-header.js", "--config", str(app.base))["Content-Security-Policy"]
    assert header == backstage.csp_header(yaml.safe_load(app.base.read_text())["backend"]["csp"])
    assert "frame-src" not in parse_csp(header) and parse_csp(header)["upgrade-insecure-requests"] == []


# --- CORS and the browser, against a real llama-server ------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from testbed.llama_server import LlamaServer
    from testbed.tiny_gguf import write_tiny_gguf

    model = write_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf")
    with LlamaServer(model, alias="gpt-3.5-turbo") as server:
        yield server


def _request(url: str, method: str, headers: dict[str, str]):
    request = urllib.request.Request(url, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, {key.lower(): value for key, value in response.headers.items()}, response.read()


@pytest.mark.realhost
def test_llama_server_answers_the_cors_preflight_of_backstage(llama):
    status, headers, _ = _request(
        f"{llama.url}/v1/chat/completions", "OPTIONS",
        {
            "Origin": BACKSTAGE_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert 200 <= status < 300, status
    assert headers.get("access-control-allow-origin") in (BACKSTAGE_ORIGIN, "*"), headers
    assert "POST" in headers.get("access-control-allow-methods", "").upper(), headers
    allowed = headers.get("access-control-allow-headers", "").lower()
    assert allowed == "*" or {"authorization", "content-type"} <= {h.strip() for h in allowed.split(",")}, headers

    status, headers, body = _request(f"{llama.url}/v1/models", "GET", {"Origin": BACKSTAGE_ORIGIN})
    assert status == 200 and headers.get("access-control-allow-origin") in (BACKSTAGE_ORIGIN, "*"), headers
    assert "gpt-3.5-turbo" in [model["id"] for model in json.loads(body)["data"]]


class Site:
    """A tiny HTTP site on 127.0.0.1: path -> (content type, body, extra headers)."""

    def __init__(self, routes: dict[str, tuple[str, str, dict[str, str]]] | None = None):
        self.routes = dict(routes or {})
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                route = site.routes.get(self.path.split("?", 1)[0])
                if route is None:
                    self.send_error(404)
                    return
                content_type, body, headers = route
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Site":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


GUI_PAGE = """<!doctype html><html><head><title>Chatbot UI (stand-in)</title></head>
<body><h1>GUI</h1><script>parent.postMessage('backchat-gui-loaded', '*');</script></body></html>
"""

BACKSTAGE_PAGE = """<!doctype html><html><head><title>Backstage (stand-in)</title>
<script src="/app.js"></script></head>
<body><iframe id="backchat" src="{gui}" width="800" height="600"
 sandbox="allow-same-origin allow-scripts allow-popups allow-forms allow-modals"></iframe></body></html>
"""

# Served from the page's origin: Backstage's script-src allows 'self', not inline scripts.
BACKSTAGE_SCRIPT = """
const state = {fetch: null, gui: null, frameLoadedAt: null, violations: []};
window.backchat = {
  state,
  done: () => state.fetch !== null &&
    (state.gui !== null || (state.frameLoadedAt !== null && Date.now() - state.frameLoadedAt > 1000)),
};
document.addEventListener('securitypolicyviolation', e =>
  state.violations.push({directive: e.effectiveDirective, blocked: e.blockedURI}));
window.addEventListener('message', e => { if (e.data === 'backchat-gui-loaded') state.gui = e.origin; });
document.addEventListener('DOMContentLoaded', () =>
  document.getElementById('backchat').addEventListener('load', () => { state.frameLoadedAt = Date.now(); }));
// As Swagger UI's "Try it out" does: the API's servers[0] + path, with the key header
// (which makes it a CORS request with a preflight).
fetch(%(models)s, {headers: {Authorization: 'Bearer sk-browser-test'}})
  .then(r => r.json().then(body => { state.fetch = {ok: r.ok, status: r.status, ids: body.data.map(m => m.id)}; }))
  .catch(e => { state.fetch = {ok: false, error: String(e)}; });
"""


def browser_visit(npm_root: Path, setup: dict, csp: dict) -> dict:
    """Open the Backstage stand-in (served with ``csp``) in headless Chromium."""
    page = BACKSTAGE_PAGE.format(gui=setup["gui"])
    script = BACKSTAGE_SCRIPT % {"models": json.dumps(setup["models"])}
    header = {"Content-Security-Policy": backstage.csp_header(csp)}
    with Site({"/": ("text/html", page, header), "/app.js": ("text/javascript", script, header)}) as site:
        url = site.url.replace("127.0.0.1", setup["backstage_host"]) + "/"
        maps = [arg for name in setup["mapped"] for arg in ("--map", name)]
        started = time.monotonic()
        result = node_json(npm_root, "browser-check.js", "--url", url, "--timeout-ms", "15000", *maps, timeout=120)
        result["seconds"] = round(time.monotonic() - started, 1)
        result["header"] = header["Content-Security-Policy"]
        return result


# "loopback": GUI and API at 127.0.0.1, as generated for address 127.0.0.1. "named": as a
# lab sees it, Backstage at http://backstage.test:PORT and the host at http://ai-01.test,
# which Chromium resolves to 127.0.0.1 (nothing leaves the machine). Only a name shows
# upgrade-insecure-requests at work: Chromium never upgrades 127.0.0.1, a trustworthy origin.
ADDRESSING = {
    "loopback": {"address": "127.0.0.1", "backstage_host": "127.0.0.1", "mapped": []},
    "named": {"address": "ai-01.test", "backstage_host": "backstage.test", "mapped": ["ai-01.test", "backstage.test"]},
}


@pytest.fixture(scope="session")
def chromium() -> Path:
    require_chromium()
    return CHROMIUM


@pytest.fixture(scope="module", params=list(ADDRESSING))
def browser_setup(request, chromium, npm_root, llama, tmp_path_factory):
    """Our config and catalog for a host whose GUI is a stand-in page and whose API is the
    real llama-server, both on 127.0.0.1."""
    addressing = ADDRESSING[request.param]
    with Site({"/": ("text/html", GUI_PAGE, {})}) as gui:
        root = app_dir(tmp_path_factory.mktemp("app"))
        cfg = make_cfg(backend="llamacpp", frontend="chatbot-ui", localai_port=llama.port,
                       chatbot_ui_port=gui.port, backstage_app_dir=str(root))
        app = App(root, cfg, address=addressing["address"])
        entities = list(yaml.safe_load_all(app.catalog.read_text()))
        api = next(entity for entity in entities if entity["kind"] == "API")
        server = yaml.safe_load(api["spec"]["definition"])["servers"][0]["url"]
        yield {
            **addressing,
            "name": request.param,
            "app": app,
            "gui": app.local_config()["ai_server"]["url"],
            "models": f"{server}/models",
            "csp": app.local_config()["backend"]["csp"],
        }


@pytest.mark.realhost
@pytest.mark.browser
def test_browser_loads_the_gui_and_calls_the_api_under_our_csp(browser_setup, npm_root, llama):
    setup = browser_setup
    host = setup["address"]
    assert setup["gui"].startswith(f"http://{host}:")
    assert setup["models"] == f"http://{host}:{llama.port}/v1/models"
    result = browser_visit(npm_root, setup, setup["csp"])
    TIMINGS[f"browser check ({setup['name']}, allowed)"] = result["seconds"]
    assert result["violations"] == [], result
    assert result["fetch"] == {"ok": True, "status": 200, "ids": ["gpt-3.5-turbo"]}, result
    assert result["gui"] == setup["gui"], result


@pytest.mark.realhost
@pytest.mark.browser
def test_browser_blocks_both_with_self_only(browser_setup, npm_root):
    setup = browser_setup
    csp = {**setup["csp"], "frame-src": ["'self'"], "connect-src": ["'self'"]}
    result = browser_visit(npm_root, setup, csp)
    TIMINGS[f"browser check ({setup['name']}, blocked)"] = result["seconds"]
    assert result["gui"] is None, result
    assert result["fetch"]["ok"] is False, result
    blocked = {(violation["directive"], violation["blocked"].rstrip("/")) for violation in result["violations"]}
    assert ("frame-src", setup["gui"]) in blocked, result
    assert ("connect-src", setup["models"]) in blocked, result


@pytest.mark.realhost
@pytest.mark.browser
def test_browser_upgrade_insecure_requests_loses_the_http_iframe(browser_setup, npm_root):
    """Helmet's default upgrade-insecure-requests turns the iframe's http:// into https://,
    which the plain-http GUI does not serve: hence ``upgrade-insecure-requests: false``."""
    setup = browser_setup
    csp = {key: value for key, value in setup["csp"].items() if key != "upgrade-insecure-requests"}
    assert parse_csp(backstage.csp_header(csp))["upgrade-insecure-requests"] == []
    result = browser_visit(npm_root, setup, csp)
    if setup["name"] == "loopback":
        # Chromium never upgrades 127.0.0.1 (a trustworthy origin): why "named" exists.
        assert result["gui"] == setup["gui"], result
        return
    # The iframe went to https://, where nothing answers: Chromium shows its error page.
    assert result.get("gui") is None, result
    assert len(result["frames"]) == 2 and result["frames"][1] != setup["gui"] + "/", result
    assert result["frames"][1].startswith(("chrome-error://", "https://")), result
    # So did the page's own script (served over http from the page's origin): Backstage
    # itself breaks over plain http unless the directive is turned off.
    assert result["script"] is False, result
