"""What backchat writes for Backstage, served by a real Backstage backend (issue 14).

A minimal real backend, assembled from npm as create-app's packages/backend is (backend-
defaults with the app, catalog and proxy plugins on in-memory SQLite; tests/backstage_backend,
run by testbed/backstage_backend.py), serves an app directory holding the app's own
app-config.yaml (with its own catalog location and CSP entries) and the
app-config.local.yaml and backchat-catalog.yaml made by backchat's own
``backstage.render_config`` and ``backstage.render_catalog``. Checked through the backend:

- the catalog ingests every entity of ours with no processing errors, and the API
  entities' definitions list the host's URLs;
- the app's own catalog location survives our file (arrays replace on merge, so
  ``render_config`` carries the app's locations over into ours);
- the CSP header on ``/`` carries our frame-src and connect-src, and the frontend config
  app-backend injects into the page carries ``ai_server.url``;
- started as create-app's Docker image starts it (``--config app-config.yaml --config
  app-config.production.yaml``), Backstage does not read app-config.local.yaml at all
  (defect 2 of issue 14, documented by an assertion);
- headless Chromium loads the Backstage-served page, whose stand-in bundle makes the Backchat
  plugin's iframe, and the GUI loads in it under the real backend's CSP;
- the proxy, configured with a real llama-server's key as a server-side header, returns the
  model list, and the key shows up neither in its answers, nor in the page, nor in the logs
  (Backstage redacts config secrets from its logs, but only as whole values: with
  ``Authorization: Bearer <key>`` the bare key elsewhere is not redacted, with
  ``X-Api-Key: <key>`` it is).

Each check is a function that a mutation must make fail (``pytest.raises``): a CSP entry
removed (the iframe is blocked), an entity of a kind our location does not allow (the
catalog drops the whole file), a missing catalog file, the production start (no
app-config.local.yaml: no ai_server, CSP or catalog of ours), the app's locations dropped.

Catalog processing errors of an entity that was never processed successfully (such as the
Location of a dropped file) appear in no entity and no log line: backend.js records them
through the catalog's processing extension point and serves them to the tests.

App directories live under ``$BACKCHAT_TEST_CACHE/run`` (backchat refuses a
``backstage_app_dir`` in /tmp). Without node/npm (Node.js 20+ and its headers),
/usr/bin/chromium (browser tests) or root with debootstrap (the llama-server of the proxy
tests) these tests skip, unless BACKCHAT_REQUIRE_REALHOSTS=1 (CI): then they fail. Each
backend's log is kept in the test's tmp_path (backend.log).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import json
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from backchat import backstage, settings
from testbed import backstage_backend as bb

ADDRESS = "ai-01.test"  # the host as browsers name it; Chromium maps it to 127.0.0.1
BROWSER_SCRIPT = bb.PROJECT / "browser.js"
CHROMIUM = Path(os.environ.get("BACKCHAT_CHROMIUM", "/usr/bin/chromium"))
CATALOG_TIMEOUT = 120.0
LAB_COMPONENT = "component:default/lab-portal"
# The app's own CSP entries (as create-app writes them) and catalog rules.
APP_CONNECT_SRC = ["'self'", "http:", "https:"]
APP_IMG_SRC = ["'self'", "data:", "https://avatars.githubusercontent.com"]
APP_RULES = [{"allow": ["Component", "System", "API", "Resource", "Location"]}]
LAB_ENTITIES = """\
apiVersion: backstage.io/v1alpha1
kind: Component
metadata:
  name: lab-portal
  description: The app's own entity, from the location in its own app-config.yaml
spec:
  type: website
  lifecycle: production
  owner: platform-team
"""


# --- availability --------------------------------------------------------------------------


def unavailable(reason: str) -> None:
    """Skip, or fail when BACKCHAT_REQUIRE_REALHOSTS=1 (CI): a skip there proves nothing."""
    if os.environ.get("BACKCHAT_REQUIRE_REALHOSTS") == "1":
        pytest.fail(f"BACKCHAT_REQUIRE_REALHOSTS=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def npm_root() -> Path:
    why = bb.missing_requirements()
    if why:
        unavailable(why)
    try:
        return bb.npm_install()
    except (bb.BackendError, TimeoutError, subprocess.TimeoutExpired, OSError) as error:
        unavailable(f"could not install the Backstage backend's npm packages: {error}")


@pytest.fixture(scope="session")
def chromium() -> Path:
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"browser tests need {CHROMIUM} (Debian package chromium)")
    return CHROMIUM


@pytest.fixture(scope="session", autouse=True)
def _print_timings():
    yield
    if bb.TIMINGS:
        print("\nBackstage backend timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in bb.TIMINGS.items()))


# --- the GUI (a stand-in page) -------------------------------------------------------------

# A stand-in for the chat GUI (Chatbot UI or Text Gen WebUI): what matters here is whether
# the browser lets the iframe load it under Backstage's CSP, not what the GUI shows.
GUI_PAGE = b"""<!doctype html><html><head><title>Chat GUI (stand-in)</title></head>
<body><h1>GUI</h1><script>parent.postMessage('backchat-gui-loaded', '*');</script></body></html>
"""


class GuiStandIn:
    """A tiny HTTP server on 127.0.0.1 that serves :data:`GUI_PAGE` at every path."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(GUI_PAGE)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(GUI_PAGE)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "GuiStandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def gui():
    with GuiStandIn() as site:
        yield site


# --- an app directory with what backchat writes --------------------------------------------


def make_cfg(**overrides) -> settings.Settings:
    # Plain http: the GUI stand-in and llama-server here speak http (the front door's
    # https is tested with a real nginx in test_frontdoor.py).
    return settings.validate(settings.load_defaults() | {"tls": False} | overrides)


class App:
    """A Backstage app: its own files, what backchat renders beside them, and a backend.

    The app's own app-config.yaml is create-app's, trimmed: its own catalog location (a
    file with one Component, :data:`LAB_ENTITIES`), its own rules and CSP entries, and the
    harness's keys (port, URLs, static token). app-config.production.yaml is what the
    Docker image adds. app-config.local.yaml and backchat-catalog.yaml come from backchat.
    """

    def __init__(self, root: Path, log_dir: Path, npm_root: Path, gui_port: int,
                 configs: list[str] | None = None, base_extra: dict | None = None,
                 env: dict[str, str] | None = None, lab_hosts: list | None = None, https: bb.Https | None = None,
                 **cfg_overrides) -> None:
        self.root = root
        self.backend = bb.BackstageBackend(root, configs=configs, npm_root=npm_root,
                                           log_path=log_dir / "backend.log", env=env, https=https)
        self.base = bb.deep_merge(self.app_config(), self.backend.server_config())
        self.base = bb.deep_merge(self.base, base_extra or {})
        self.base_path.write_text(yaml.safe_dump(self.base, sort_keys=False))
        production = {
            "app": {"baseUrl": self.backend.url},
            "backend": {"baseUrl": self.backend.url, "listen": self.base["backend"]["listen"],
                        "database": {"client": "better-sqlite3", "connection": ":memory:"}},
        }
        (root / "app-config.production.yaml").write_text(yaml.safe_dump(production, sort_keys=False))
        self.lab_path.write_text(LAB_ENTITIES)
        self.cfg = make_cfg(backend="localai", frontend="chatbot-ui", chatbot_ui_port=gui_port,
                            backstage_app_dir=str(root), **cfg_overrides)
        if lab_hosts is None:  # one box: what an AI host writes for itself
            self.local_path.write_text(backstage.render_config(None, self.cfg, ADDRESS, self.base_path.read_text()))
            self.catalog_path.write_text(backstage.render_catalog(self.cfg, ADDRESS))
        else:  # the lab's Backstage host: every AI host, (name, settings, address)
            self.served = backstage.lab(lab_hosts)
            self.local_path.write_text(backstage.render_lab_config(None, self.cfg, self.served, self.base_path.read_text()))
            self.catalog_path.write_text(backstage.render_lab_catalog(self.served, backstage.backend_url(self.base)))
        self.our_refs_at_start = self.our_refs()  # what backchat wrote, before any mutation
        # What a browser must reach, named independently of backchat's helpers.
        scheme = "https" if cfg_overrides.get("tls") else "http"
        self.gui = f"{scheme}://{ADDRESS}:{gui_port}"
        self.api = f"{scheme}://{ADDRESS}:{self.cfg.localai_port}"

    def app_config(self) -> dict:
        return {
            "app": {"title": "Lab Portal"},
            "organization": {"name": "Lab"},
            "backend": {
                "csp": {"connect-src": APP_CONNECT_SRC, "img-src": APP_IMG_SRC},
                "cors": {"origin": self.backend.url, "methods": ["GET", "HEAD", "PATCH", "POST", "PUT", "DELETE"],
                         "credentials": True},
                "database": {"client": "better-sqlite3", "connection": ":memory:"},
            },
            "catalog": {
                "rules": APP_RULES,
                "locations": [{"type": "file", "target": str(self.lab_path)}],
            },
        }

    @property
    def base_path(self) -> Path:
        return self.root / "app-config.yaml"

    @property
    def local_path(self) -> Path:
        return self.root / backstage.CONFIG_FILE

    @property
    def catalog_path(self) -> Path:
        return self.root / backstage.CATALOG_FILE

    @property
    def lab_path(self) -> Path:
        return self.root / "lab-entities.yaml"

    def local(self) -> dict:
        return yaml.safe_load(self.local_path.read_text())

    def write_local(self, config: dict) -> None:
        self.local_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def catalog_entities(self) -> list[dict]:
        return list(yaml.safe_load_all(self.catalog_path.read_text()))

    def our_refs(self) -> set[str]:
        return {entity_ref(entity) for entity in self.catalog_entities()}


@pytest.fixture
def make_app(npm_root, gui, tmp_path):
    """A factory of apps; each in its own directory (outside /tmp, as backchat requires)."""
    with contextlib.ExitStack() as stack:
        def make(**kwargs) -> App:
            root = stack.enter_context(bb.app_directory())
            log_dir = tmp_path / root.name
            log_dir.mkdir()
            return App(root, log_dir, npm_root, gui.port, **kwargs)

        yield make


@pytest.fixture(scope="module")
def main_app(npm_root, gui, tmp_path_factory):
    """The app with what backchat writes, started as ``yarn start`` does (no --config)."""
    with bb.app_directory() as root:
        app = App(root, tmp_path_factory.mktemp("main"), npm_root, gui.port)
        with app.backend:
            yield app


@pytest.fixture(scope="module")
def production_app(npm_root, gui, tmp_path_factory):
    """The same files, started as create-app's Docker image starts the backend."""
    with bb.app_directory() as root:
        app = App(root, tmp_path_factory.mktemp("production"), npm_root, gui.port,
                  configs=["app-config.yaml", "app-config.production.yaml"])
        with app.backend:
            yield app


# --- the catalog, through the backend's API ------------------------------------------------


def entity_ref(entity: dict) -> str:
    namespace = entity["metadata"].get("namespace", "default")
    return f"{entity['kind'].lower()}:{namespace}/{entity['metadata']['name']}"


def catalog(backend: bb.BackstageBackend) -> dict[str, dict]:
    """Every entity in the catalog, by ref (with its status and relations)."""
    answer = backend.json("/api/catalog/entities/by-query?limit=1000")
    assert answer["totalItems"] == len(answer["items"]), "more entities than one page"
    return {entity_ref(entity): entity for entity in answer["items"]}


def processing_errors(entity: dict) -> list[str]:
    """The processing errors in an entity's ``status.items`` (entities that were processed
    once, then failed)."""
    return [
        f"{item.get('error', {}).get('name', '')}: {item.get('message', '')}"
        for item in (entity.get("status") or {}).get("items", [])
        if item.get("level") == "error"
    ]


def reported_errors(backend: bb.BackstageBackend) -> list[dict]:
    """Every processing error the catalog reported (backend.js records them: an entity that
    never processed successfully, e.g. a location whose file was dropped, is not in the
    catalog at all, and the catalog does not log its errors)."""
    return backend.json("/api/backchat-tests/processing-errors")


def errors_for(backend: bb.BackstageBackend, target: Path) -> list[str]:
    """The reported errors of the Location entity made for a config location of type file."""
    return [
        f"{error['name']}: {error['message']}"
        for record in reported_errors(backend)
        if record["target"] == str(target)
        for error in record["errors"]
    ]


def location_of(entities: dict[str, dict], target: Path) -> dict | None:
    """The Location entity the catalog made for a config location of type file."""
    for entity in entities.values():
        if entity["kind"] == "Location" and entity["spec"].get("target") == str(target):
            return entity
    return None


def wait_for_catalog(backend: bb.BackstageBackend, ready: Callable[[dict[str, dict]], bool], what: str,
                     timeout: float = CATALOG_TIMEOUT) -> dict[str, dict]:
    started = time.monotonic()
    deadline = started + timeout
    while True:
        entities = catalog(backend)
        if ready(entities):
            bb.TIMINGS.setdefault(f"catalog: {what}", round(time.monotonic() - started, 1))
            return entities
        if time.monotonic() > deadline:
            pytest.fail(
                f"the catalog did not have {what} within {timeout:.0f}s: {sorted(entities)}\n"
                f"reported errors: {reported_errors(backend)}\n{backend.log()[-3000:]}"
            )
        time.sleep(1)


def relations(entity: dict) -> set[tuple[str, str]]:
    return {(relation["type"], relation["targetRef"]) for relation in entity.get("relations", [])}


# --- the page app-backend serves -----------------------------------------------------------


def parse_csp(header: str) -> dict[str, list[str]]:
    return {part.split()[0]: part.split()[1:] for part in header.split(";") if part.strip()}


def served_page(backend: bb.BackstageBackend) -> tuple[dict[str, str], str]:
    status, headers, body = backend.request("/", token=None)
    assert status == 200, (status, body[:500])
    return headers, body.decode()


def frontend_config(page: str) -> dict:
    """The config app-backend injected into the page (script type backstage.io/config),
    merged as the frontend's config loader reads it (later entries win)."""
    blocks = re.findall(r'<script type="backstage.io/config">(.*?)</script>', page, re.S)
    assert blocks, f"no injected config in the page:\n{page[:2000]}"
    merged: dict = {}
    for block in blocks:
        for entry in json.loads(block):
            merged = bb.deep_merge(merged, entry["data"])
    return merged


# --- the checks (each one is also run on a mutation, where it must fail) -------------------


def check_our_catalog_ingested(app: App, entities: dict[str, dict]) -> None:
    """Every entity of our file is in the catalog, from our location, without errors."""
    ours = app.our_refs_at_start
    missing = ours - entities.keys()
    assert not missing, f"not in the catalog: {sorted(missing)}; reported errors: {errors_for(app.backend, app.catalog_path)}"
    location = location_of(entities, app.catalog_path)
    assert location is not None and processing_errors(location) == []
    origin = f"file:{app.catalog_path}"
    for ref in ours:
        assert processing_errors(entities[ref]) == [], ref
        assert entities[ref]["metadata"]["annotations"]["backstage.io/managed-by-origin-location"] == origin
    assert errors_for(app.backend, app.catalog_path) == []


def check_our_csp(app: App, headers: dict[str, str]) -> None:
    csp = parse_csp(headers["content-security-policy"])
    assert csp.get("frame-src") == ["'self'", app.gui], csp
    assert csp["connect-src"][:2] == ["'self'", app.api], csp
    assert set(APP_CONNECT_SRC) <= set(csp["connect-src"]), "the app's own connect-src sources were lost"
    assert csp["img-src"] == APP_IMG_SRC, "a directive we do not own changed"
    assert "upgrade-insecure-requests" not in csp
    assert csp["default-src"] == ["'self'"]


def check_ai_server_url(app: App, page: str) -> None:
    config = frontend_config(page)
    assert config.get("ai_server") == {"url": app.gui}, config
    assert config["app"]["baseUrl"] == app.backend.url


def check_apps_own_location(app: App, entities: dict[str, dict]) -> None:
    # The catalog registers every config location at start-up, at once: when our entities
    # are in, the app's location would be there too.
    assert location_of(entities, app.lab_path) is not None, "the app's own catalog location is gone"
    entities = wait_for_catalog(app.backend, lambda entities: LAB_COMPONENT in entities, "the app's own entity", timeout=30)
    assert processing_errors(entities[LAB_COMPONENT]) == []


def wait_for_ours(app: App) -> dict[str, dict]:
    """Until our entities and the relations between them are in (relations are stitched
    once both ends were processed), or our location failed."""
    ours = app.our_refs_at_start

    def done(entities: dict[str, dict]) -> bool:
        if errors_for(app.backend, app.catalog_path):
            return True
        return ours <= entities.keys() and (
            ("providesApi", "api:default/backchat-localai-api") in relations(entities["component:default/backchat-localai"])
        )

    return wait_for_catalog(app.backend, done, "our location processed")


# --- the catalog ---------------------------------------------------------------------------


def test_catalog_ingests_every_entity_of_ours_without_errors(main_app):
    assert main_app.our_refs_at_start == {
        "system:default/backchat", "component:default/backchat-localai",
        "component:default/backchat-chatbot-ui", "api:default/backchat-localai-api",
    }
    entities = wait_for_ours(main_app)
    check_our_catalog_ingested(main_app, entities)
    assert ("partOf", "system:default/backchat") in relations(entities["api:default/backchat-localai-api"])
    assert ("consumesApi", "api:default/backchat-localai-api") in relations(entities["component:default/backchat-chatbot-ui"])
    # Nothing in the whole catalog has errors.
    assert {ref: processing_errors(entity) for ref, entity in entities.items() if processing_errors(entity)} == {}
    assert reported_errors(main_app.backend) == []


def test_api_definitions_list_the_host_urls(main_app):
    entities = wait_for_ours(main_app)
    api = entities["api:default/backchat-localai-api"]
    assert api["spec"]["type"] == "openapi"
    definition = yaml.safe_load(api["spec"]["definition"])
    assert [server["url"] for server in definition["servers"]] == [f"{main_app.api}/v1"]
    assert {"/models", "/chat/completions"} <= definition["paths"].keys()
    for text in ("localhost", "127.0.0.1", "api.openai.com"):
        assert text not in api["spec"]["definition"]
    for ref in ("component:default/backchat-chatbot-ui", "system:default/backchat"):
        assert main_app.gui in {link["url"] for link in entities[ref]["metadata"].get("links", [])}, ref


def test_apps_own_catalog_location_survives_our_file(main_app):
    check_apps_own_location(main_app, wait_for_ours(main_app))


def test_apps_own_location_check_fails_when_our_file_drops_it(make_app):
    """Mutation: our file with only our location (as backchat wrote it before):
    Backstage replaces the array, the app's own entity disappears, and the check says so."""
    app = make_app()
    local = app.local()
    local["catalog"]["locations"] = [
        entry for entry in local["catalog"]["locations"] if entry not in app.base["catalog"]["locations"]
    ]
    app.write_local(local)
    with app.backend:
        entities = wait_for_ours(app)
        check_our_catalog_ingested(app, entities)
        with pytest.raises(AssertionError):
            check_apps_own_location(app, entities)


def test_catalog_check_fails_for_an_entity_of_a_kind_our_location_does_not_allow(make_app):
    """Mutation: one Template (a kind our location's rules leave out) in our catalog file.
    The catalog then drops the whole file, and says so nowhere but in the processing
    errors (no entity, no status, no log line)."""
    app = make_app()
    template = {
        "apiVersion": "scaffolder.backstage.io/v1beta3",
        "kind": "Template",
        "metadata": {"name": "backchat-template"},
        "spec": {"owner": "platform-team", "type": "service", "steps": []},
    }
    app.catalog_path.write_text(app.catalog_path.read_text() + "---\n" + yaml.safe_dump(template))
    with app.backend:
        entities = wait_for_ours(app)
        with pytest.raises(AssertionError):
            check_our_catalog_ingested(app, entities)
        errors = errors_for(app.backend, app.catalog_path)
    assert any(error.startswith("NotAllowedError: Entity template:default/backchat-template ")
               and "is not of an allowed kind for that location" in error for error in errors), errors
    assert not app.our_refs_at_start & entities.keys(), "entities of the dropped file were ingested"
    assert location_of(entities, app.catalog_path) is None


def test_catalog_check_fails_for_a_missing_catalog_file(make_app):
    app = make_app()
    app.catalog_path.unlink()
    with app.backend:
        entities = wait_for_ours(app)
        with pytest.raises(AssertionError):
            check_our_catalog_ingested(app, entities)
        errors = errors_for(app.backend, app.catalog_path)
    assert errors == [f"NotFoundError: file {app.catalog_path} does not exist"], errors


# --- what the page gets -------------------------------------------------------------------


def test_csp_header_on_the_app_page_carries_our_sources(main_app):
    headers, _ = served_page(main_app.backend)
    check_our_csp(main_app, headers)


def test_frontend_config_carries_ai_server_url(main_app):
    _, page = served_page(main_app.backend)
    check_ai_server_url(main_app, page)
    # app-backend filters by the bundle's schema: nothing backend-only reaches the page.
    config = frontend_config(page)
    assert "catalog" not in config and "csp" not in config.get("backend", {})


def test_with_explicit_config_flags_app_config_local_yaml_is_not_read(production_app):
    """Issue 14 defect 2, as a fact: create-app's Docker image runs ``node packages/backend
    --config app-config.yaml --config app-config.production.yaml``, and then Backstage
    never reads app-config.local.yaml: no iframe URL, no CSP entries, no catalog of ours."""
    app = production_app
    loaded = next(line for line in app.backend.log().splitlines() if line.startswith("Loading config from"))
    assert "app-config.production.yaml" in loaded and backstage.CONFIG_FILE not in loaded, loaded
    headers, page = served_page(app.backend)
    with pytest.raises(AssertionError):
        check_ai_server_url(app, page)
    assert "ai_server" not in frontend_config(page)
    with pytest.raises(AssertionError):
        check_our_csp(app, headers)
    assert "frame-src" not in parse_csp(headers["content-security-policy"]), "falls back to default-src 'self'"
    entities = wait_for_catalog(app.backend, lambda entities: LAB_COMPONENT in entities, "the app's own entity")
    with pytest.raises(AssertionError):
        check_our_catalog_ingested(app, entities)
    assert location_of(entities, app.catalog_path) is None
    assert not app.our_refs_at_start & entities.keys()


# --- the browser ---------------------------------------------------------------------------


def browser_visit(app: App, npm_root: Path, url: str | None = None, names: tuple[str, ...] = (ADDRESS,),
                  home: Path | None = None) -> dict:
    """Open the Backstage-served page (or ``url``) in headless Chromium, with ``names``
    resolved to 127.0.0.1 and, with ``home``, the CAs of its NSS db trusted
    (:func:`bb.trusting_home`); what the stand-in bundle saw."""
    started = time.monotonic()
    maps = [arg for name in names for arg in ("--map", name)]
    done = subprocess.run(
        ["node", str(BROWSER_SCRIPT), "--url", url or app.backend.url + "/", "--timeout-ms", "15000", *maps],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "BACKCHAT_NPM_ROOT": str(npm_root), "BACKCHAT_CHROMIUM": str(CHROMIUM),
             **({"HOME": str(home)} if home else {})},
    )
    assert done.returncode == 0, f"browser.js exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result = json.loads(done.stdout)
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def check_gui_loads(app: App, result: dict) -> None:
    """The stand-in bundle iframed ai_server.url as the plugin does, and the GUI loaded."""
    assert result["script"] is True and result["error"] is None, result
    assert result["aiServerUrl"] == app.gui, result
    assert result["iframe"] == {
        "src": app.gui + "/",
        "sandbox": "allow-same-origin allow-scripts allow-popups allow-forms allow-modals",
    }, result
    assert result["violations"] == [], result
    assert result["gui"] == app.gui, result


@pytest.mark.usefixtures("chromium")
def test_browser_loads_the_gui_in_the_plugins_iframe(main_app, npm_root):
    result = browser_visit(main_app, npm_root)
    bb.TIMINGS["browser (our CSP)"] = result["seconds"]
    check_gui_loads(main_app, result)


@pytest.mark.usefixtures("chromium")
def test_browser_check_fails_when_our_frame_src_entry_is_removed(make_app, npm_root):
    """Mutation: our frame-src without the GUI's origin (only 'self')."""
    app = make_app()
    local = app.local()
    local["backend"]["csp"]["frame-src"] = [source for source in local["backend"]["csp"]["frame-src"] if source != app.gui]
    assert local["backend"]["csp"]["frame-src"] == ["'self'"]
    app.write_local(local)
    with app.backend:
        headers, _ = served_page(app.backend)
        with pytest.raises(AssertionError):
            check_our_csp(app, headers)
        result = browser_visit(app, npm_root)
    bb.TIMINGS["browser (frame-src entry removed)"] = result["seconds"]
    with pytest.raises(AssertionError):
        check_gui_loads(app, result)
    assert result["aiServerUrl"] == app.gui and result["gui"] is None, result
    blocked = {(violation["directive"], violation["blocked"].rstrip("/")) for violation in result["violations"]}
    assert ("frame-src", app.gui) in blocked, result


# --- the proxy, to a real llama-server with a key ------------------------------------------

LLAMA_KEY = "sk-backchat-proxy-test-5c1e0d7b"
NOT_A_SECRET = "not-a-secret-9e2b"
# How the proxy endpoint sends the key (llama-server takes either). The config names it by
# environment variable, as Backstage's docs advise: it is in no file.
KEY_HEADERS = {
    "authorization-bearer": ("Authorization", "Bearer ${BACKCHAT_LLAMA_KEY}", f"Bearer {LLAMA_KEY}"),
    "x-api-key": ("X-Api-Key", "${BACKCHAT_LLAMA_KEY}", LLAMA_KEY),
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from testbed.llama_server import LlamaServer
    from testbed.tiny_gguf import write_tiny_gguf

    model = write_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf")
    with LlamaServer(model, alias="gpt-3.5-turbo", api_key=LLAMA_KEY) as server:
        yield server


@pytest.fixture(scope="module", params=list(KEY_HEADERS))
def proxied(request, npm_root, gui, llama, tmp_path_factory):
    """An app whose app-config.yaml has a proxy endpoint to llama-server that adds the key."""
    header, configured, _ = KEY_HEADERS[request.param]
    with bb.app_directory() as root:
        app = App(root, tmp_path_factory.mktemp(f"proxy-{request.param}"), npm_root, gui.port,
                  base_extra={"proxy": {"endpoints": {"/llama": {"target": llama.url, "headers": {header: configured}}}}},
                  env={"BACKCHAT_LLAMA_KEY": LLAMA_KEY})
        assert LLAMA_KEY not in app.base_path.read_text()
        with app.backend:
            app.key_header = request.param
            yield app


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def logged(backend: bb.BackstageBackend, text: str, timeout: float = 10) -> str:
    """The log, once ``text`` is in it (request log lines are written after the answer)."""
    deadline = time.monotonic() + timeout
    while text not in backend.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = backend.log()
    assert text in log, f"{text!r} never reached the log"
    return log


def request_lines(log: str, marker: str) -> list[str]:
    return [line for line in log.splitlines() if "incomingRequest" in line and marker in line]


@pytest.mark.realhost
def test_proxy_adds_the_key_server_side_and_never_shows_it(proxied, llama):
    backend = proxied.backend
    # The key is needed: llama-server refuses a request without it.
    assert _get(f"{llama.url}/v1/models")[0] == 401
    # Credentials required (the proxy's default): no Backstage token, no answer.
    status, _, body = backend.request("/api/proxy/llama/v1/models", token=None)
    assert status == 401, body[:500]
    status, headers, body = backend.request("/api/proxy/llama/v1/models", headers={"User-Agent": "backchat-models"})
    assert status == 200, body[:500]
    assert [model["id"] for model in json.loads(body)["data"]] == ["gpt-3.5-turbo"]
    assert LLAMA_KEY not in body.decode() and LLAMA_KEY not in json.dumps(headers)
    # Neither the page, nor its script, nor the config injected into it carries the key.
    _, page = served_page(backend)
    assert LLAMA_KEY not in page and "proxy" not in frontend_config(page)
    status, _, script = backend.request("/static/backchat.js", token=None)
    assert status == 200 and LLAMA_KEY not in script.decode()
    # The proxied request was logged, the key was not.
    log = logged(backend, "backchat-models")
    assert request_lines(log, "backchat-models") and LLAMA_KEY not in log


@pytest.mark.realhost
def test_the_log_redacts_the_configured_header_value(proxied):
    """The logger redacts config values the schemas mark secret (the proxy's Authorization
    and X-Api-Key headers): a request carrying the configured value in a logged field (its
    User-Agent) is logged with ``***``; a request with another value shows it (so the log
    checks above can fail)."""
    backend = proxied.backend
    _, _, value = KEY_HEADERS[proxied.key_header]
    for agent in (value, NOT_A_SECRET):
        assert backend.request("/api/proxy/llama/v1/models", headers={"User-Agent": agent})[0] == 200
    log = logged(backend, NOT_A_SECRET)
    assert request_lines(log, f'userAgent="{NOT_A_SECRET}"')
    assert request_lines(log, 'userAgent="***"')
    assert value not in log and LLAMA_KEY not in log
    found = re.search(r"Found (\d+) new secrets in config that will be redacted", log)
    assert found and int(found.group(1)) >= 3, "database connection, static token and the key header"


@pytest.mark.realhost
def test_a_bare_key_is_redacted_only_where_it_is_a_whole_config_value(proxied):
    """Backstage redacts each secret config value as a whole string. ``Authorization:
    Bearer <key>`` makes "Bearer <key>" the secret, so the bare key, seen elsewhere (here:
    in a URL a client sent), is logged as it is; ``X-Api-Key: <key>`` makes the key itself
    the secret, and it is redacted wherever it shows up."""
    # Last of the tests on each proxied backend (file order): with the Bearer header it
    # puts the key into the log, which the tests above check is free of it.
    backend = proxied.backend
    assert backend.request(f"/api/proxy/llama/v1/models?probe={LLAMA_KEY}&after={NOT_A_SECRET}")[0] == 200
    log = logged(backend, f"after={NOT_A_SECRET}")
    if proxied.key_header == "x-api-key":
        assert request_lines(log, f"probe=***&after={NOT_A_SECRET}") and LLAMA_KEY not in log
    else:
        assert request_lines(log, f"probe={LLAMA_KEY}&after={NOT_A_SECRET}"), "Backstage now redacts parts of values"


# --- one Backstage for a lab, and "Try it out" through our proxy endpoints --------------------

LAB = ("ai-01.test", "ai-02.test", "ai-03.test")


@pytest.fixture(scope="module")
def lab_app(npm_root, gui, llama, tmp_path_factory):
    """The lab's Backstage host, as backchat writes it: three AI hosts with a key, the
    second one a real llama-server (llama.cpp backend) that only answers with that key.
    The key reaches the backend only as $BACKCHAT_API_KEY, as the README tells admins."""
    from backchat.secrets import Secret

    key = Secret(LLAMA_KEY)
    llama_port = int(llama.url.rsplit(":", 1)[1])
    hosts = [
        (LAB[0], make_cfg(backend="localai", frontend="chatbot-ui", chatbot_ui_port=gui.port), LAB[0]),
        (LAB[1], make_cfg(backend="llamacpp", frontend="chatbot-ui", localai_port=llama_port), "127.0.0.1"),
        (LAB[2], make_cfg(backend="localai", frontend="textgen"), LAB[2]),
    ]
    hosts = [(name, dataclasses.replace(cfg, api_key=key), address) for name, cfg, address in hosts]
    with bb.app_directory() as root:
        app = App(root, tmp_path_factory.mktemp("lab"), npm_root, gui.port, lab_hosts=hosts,
                  env={"BACKCHAT_API_KEY": LLAMA_KEY})
        assert LLAMA_KEY not in app.local_path.read_text() + app.catalog_path.read_text()
        with app.backend:
            yield app


def lab_entities(app: App) -> dict[str, dict]:
    ours = app.our_refs_at_start
    return wait_for_catalog(app.backend, lambda entities: ours <= entities.keys() or bool(errors_for(app.backend, app.catalog_path)),
                            "the lab's entities")


@pytest.mark.realhost
def test_the_lab_catalog_holds_every_hosts_services_without_clashes(lab_app):
    refs = lab_app.our_refs_at_start
    assert refs == {"system:default/backchat"} | {
        f"{kind}:default/backchat-{host}-{name}"
        for host, services in (("ai-01-test", ("localai", "chatbot-ui")), ("ai-02-test", ("llamacpp", "chatbot-ui")),
                               ("ai-03-test", ("localai", "textgen")))
        for service in services
        for kind, name in (("component", service), *((("api", f"{service}-api"),) if service != "chatbot-ui" else ()))
    }, sorted(refs)
    entities = lab_entities(lab_app)
    check_our_catalog_ingested(lab_app, entities)
    for name in ("ai-01-test", "ai-02-test"):
        provided = relations(entities[f"component:default/backchat-{name}-chatbot-ui"])
        assert any(kind == "consumesApi" and target.startswith(f"api:default/backchat-{name}-") for kind, target in provided)
    config = frontend_config(served_page(lab_app.backend)[1])
    assert config["ai_server"] == {"url": f"http://{LAB[0]}:{lab_app.cfg.chatbot_ui_port}"}


@pytest.mark.realhost
def test_try_it_out_goes_through_our_proxy_endpoint_with_the_key_added_server_side(lab_app, llama):
    """What Swagger UI on the API page does after the app's requestInterceptor added the
    user's Backstage token: call the definition's first server. Backstage adds the model's
    key; without Backstage credentials nothing passes (no open relay to the model)."""
    entities = lab_entities(lab_app)
    definition = yaml.safe_load(entities["api:default/backchat-ai-02-test-llamacpp-api"]["spec"]["definition"])
    servers = [server["url"] for server in definition["servers"]]
    assert servers == [f"{lab_app.backend.url}/api/proxy/backchat-ai-02-test-llamacpp/v1", f"{llama.url}/v1"]
    path = servers[0].removeprefix(lab_app.backend.url)
    status, headers, body = lab_app.backend.request(f"{path}/models", headers={"User-Agent": "backchat-try-it-out"})
    assert status == 200, body[:500]
    assert [model["id"] for model in json.loads(body)["data"]] == ["gpt-3.5-turbo"]
    chat = json.dumps({"model": "gpt-3.5-turbo", "max_tokens": 4,
                       "messages": [{"role": "user", "content": "Hi"}]}).encode()
    status, _, body = lab_app.backend.request(f"{path}/chat/completions", method="POST", body=chat,
                                               headers={"Content-Type": "application/json"})
    assert status == 200 and json.loads(body)["choices"], body[:500]
    # No Backstage credentials: refused by Backstage, the model is never asked.
    assert lab_app.backend.request(f"{path}/models", token=None)[0] == 401
    # Only the methods the API uses.
    assert lab_app.backend.request(f"{path}/models", method="DELETE")[0] != 200
    log = logged(lab_app.backend, "backchat-try-it-out")
    assert LLAMA_KEY not in log and LLAMA_KEY not in body.decode() and LLAMA_KEY not in json.dumps(headers)
    _, page = served_page(lab_app.backend)
    assert LLAMA_KEY not in page and "proxy" not in frontend_config(page)


@pytest.mark.realhost
def test_the_proxy_check_fails_without_the_key_in_backstages_environment(make_app, llama):
    """Mutation: the admin did not set BACKCHAT_API_KEY for Backstage: the endpoint is
    there, the model refuses the call (so the check above depends on the key we add)."""
    from backchat.secrets import Secret

    port = int(llama.url.rsplit(":", 1)[1])
    cfg = dataclasses.replace(make_cfg(backend="llamacpp", localai_port=port), api_key=Secret(LLAMA_KEY))
    app = make_app(lab_hosts=[(LAB[1], cfg, "127.0.0.1")], env={"BACKCHAT_API_KEY": ""})
    with app.backend:
        status, _, body = app.backend.request("/api/proxy/backchat-ai-02-test-llamacpp/v1/models")
    assert status == 401, body[:500]
