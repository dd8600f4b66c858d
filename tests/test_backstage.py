"""Backstage's app-config.local.yaml and the catalog backchat writes (pure functions).

Contract (docs/upstream-facts.md, stack-contracts.md): the Backchat plugin iframes
``ai_server.url``; Backstage's backend CSP must list that origin in ``frame-src`` and the
API origins in ``connect-src`` (arrays replace, so ``'self'`` first); plain http needs
``upgrade-insecure-requests: false``; the catalog needs rules allowing System etc.
Backstage users browse from other machines, so no URL may say localhost.
"""

from __future__ import annotations

import copy

import pytest
import yaml

from backchat import addresses, backstage
from tests.cfg import make_cfg
from tests.variants import COMBINATIONS

ADDRESS = "ai-01.lab"
KINDS = {"System", "Component", "API", "Resource", "Domain", "Location", "Group", "User"}
# Host-side API origins (defaults: localai/llamacpp 8080, textgen API 5001).
API_ORIGINS = {
    ("localai", "chatbot-ui"): {"localai": "http://ai-01.lab:8080"},
    ("textgen", "textgen"): {"textgen": "http://ai-01.lab:5001"},
    ("llamacpp", "chatbot-ui"): {"llamacpp": "http://ai-01.lab:8080"},
    ("localai", "textgen"): {"localai": "http://ai-01.lab:8080", "textgen": "http://ai-01.lab:5001"},
    ("textgen", "chatbot-ui"): {"textgen": "http://ai-01.lab:5001"},
}
GUI = {"chatbot-ui": "http://ai-01.lab:3001", "textgen": "http://ai-01.lab:7860"}
CATALOG_TARGET = "/opt/backchat/backstage/backchat-catalog.yaml"


@pytest.fixture(params=COMBINATIONS, ids=lambda c: f"{c[0]}+{c[1]}")
def combo(request):
    return request.param


@pytest.fixture
def cfg(combo):
    backend, frontend = combo
    return make_cfg(backend=backend, frontend=frontend)


def walk_strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from walk_strings(key)
            yield from walk_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk_strings(item)


def our_locations(config: dict) -> list[dict]:
    return [
        location
        for location in config["catalog"]["locations"]
        if isinstance(location, dict) and location.get("target") == CATALOG_TARGET
    ]


# --- our_config ----------------------------------------------------------------------------


def test_ai_server_url_is_the_gui(cfg, combo):
    ours = backstage.our_config(cfg, ADDRESS)
    assert ours["ai_server"]["url"] == GUI[combo[1]]
    assert addresses.gui_url(cfg, ADDRESS) == GUI[combo[1]]


def test_csp_frame_src_and_connect_src(cfg, combo):
    csp = backstage.our_config(cfg, ADDRESS)["backend"]["csp"]
    assert csp["frame-src"] == ["'self'", GUI[combo[1]]]
    connect = csp["connect-src"]
    assert connect[0] == "'self'"
    for origin in API_ORIGINS[combo].values():
        assert origin in connect
    assert len(connect) == len(set(connect)), "no duplicate sources"
    assert set(connect) == {"'self'", *API_ORIGINS[combo].values()}
    # Helmet would upgrade the iframe's http to https.
    assert csp["upgrade-insecure-requests"] is False


def test_api_urls_per_backend(cfg, combo):
    assert addresses.api_urls(cfg, ADDRESS) == API_ORIGINS[combo]


def test_ports_follow_settings():
    cfg = make_cfg(backend="localai", frontend="textgen", localai_port=18080, textgen_port=17860,
                   textgen_api_port=15001)
    ours = backstage.our_config(cfg, ADDRESS)
    assert ours["ai_server"]["url"] == "http://ai-01.lab:17860"
    assert ours["backend"]["csp"]["frame-src"] == ["'self'", "http://ai-01.lab:17860"]
    assert set(ours["backend"]["csp"]["connect-src"]) == {
        "'self'", "http://ai-01.lab:18080", "http://ai-01.lab:15001"
    }


def test_no_localhost_anywhere(cfg):
    ours = backstage.our_config(cfg, ADDRESS)
    for text in walk_strings(ours):
        assert "localhost" not in text and "127.0.0.1" not in text, text
    rendered = backstage.render_config(None, cfg, ADDRESS)
    assert "localhost" not in rendered
    catalog = backstage.render_catalog(cfg, ADDRESS)
    assert "localhost" not in catalog


def test_catalog_location_and_rules(cfg):
    catalog = backstage.our_config(cfg, ADDRESS)["catalog"]
    assert len(catalog["locations"]) == 1
    location = catalog["locations"][0]
    assert location["type"] == "file"
    assert location["target"] == CATALOG_TARGET
    assert len(location["rules"]) == 1
    assert set(location["rules"][0]["allow"]) == KINDS
    assert len(location["rules"][0]["allow"]) == len(KINDS)
    # No global rules: an array there would replace the app's own catalog.rules.
    assert "rules" not in catalog


def test_catalog_target_follows_backstage_app_dir():
    cfg = make_cfg(backstage_app_dir="/srv/backstage")
    location = backstage.our_config(cfg, ADDRESS)["catalog"]["locations"][0]
    assert location["target"] == "/srv/backstage/backchat-catalog.yaml"


# --- merge -----------------------------------------------------------------------------------


EXISTING = {
    "app": {"title": "Lab Portal", "baseUrl": "http://backstage.lab:3000"},
    "backend": {
        "database": {"client": "pg", "connection": {"host": "db.lab", "port": 5432}},
        "csp": {
            "img-src": ["'self'", "data:", "https://img.lab"],
            "frame-src": ["'self'", "http://old-host:9999"],
        },
    },
    "ai_server": {"url": "http://localhost:3001"},
    "catalog": {
        "locations": [
            {"type": "url", "target": "https://github.com/org/repo/blob/main/catalog-info.yaml"},
        ],
    },
}


def test_merge_keeps_theirs_and_replaces_ours():
    cfg = make_cfg()
    existing = copy.deepcopy(EXISTING)
    merged = backstage.merge(existing, backstage.our_config(cfg, ADDRESS))
    assert existing == EXISTING, "merge must not modify its input"
    assert merged["app"] == EXISTING["app"]
    assert merged["backend"]["database"] == EXISTING["backend"]["database"]
    assert merged["backend"]["csp"]["img-src"] == ["'self'", "data:", "https://img.lab"]
    assert merged["backend"]["csp"]["frame-src"] == ["'self'", "http://ai-01.lab:3001"]
    assert merged["ai_server"] == {"url": "http://ai-01.lab:3001"}
    assert merged["backend"]["csp"]["connect-src"] == ["'self'", "http://ai-01.lab:8080"]
    assert merged["backend"]["csp"]["upgrade-insecure-requests"] is False
    targets = [location["target"] for location in merged["catalog"]["locations"]]
    assert targets == ["https://github.com/org/repo/blob/main/catalog-info.yaml", CATALOG_TARGET]
    assert merged["catalog"]["locations"][0] == EXISTING["catalog"]["locations"][0]


def test_merge_twice_is_idempotent_and_keeps_one_location():
    cfg = make_cfg()
    ours = backstage.our_config(cfg, ADDRESS)
    once = backstage.merge(copy.deepcopy(EXISTING), ours)
    twice = backstage.merge(once, ours)
    assert twice == once
    assert len(our_locations(twice)) == 1
    assert len(twice["catalog"]["locations"]) == 2


def test_merge_replaces_our_location_written_by_an_older_run():
    cfg = make_cfg()
    existing = copy.deepcopy(EXISTING)
    existing["catalog"]["locations"].append({"type": "file", "target": CATALOG_TARGET})
    merged = backstage.merge(existing, backstage.our_config(cfg, ADDRESS))
    mine = our_locations(merged)
    assert len(mine) == 1
    assert set(mine[0]["rules"][0]["allow"]) == KINDS


def test_merge_switching_frontend_replaces_the_url():
    first = backstage.merge(EXISTING, backstage.our_config(make_cfg(), ADDRESS))
    second = backstage.merge(first, backstage.our_config(make_cfg(frontend="textgen"), ADDRESS))
    assert second["ai_server"]["url"] == "http://ai-01.lab:7860"
    assert second["backend"]["csp"]["frame-src"] == ["'self'", "http://ai-01.lab:7860"]
    assert "http://ai-01.lab:3001" not in yaml.safe_dump(second)


def test_merge_keeps_their_global_rules_and_drops_the_ones_backchat_wrote():
    ours = backstage.our_config(make_cfg(), ADDRESS)
    theirs = {"catalog": {"rules": [{"allow": ["Component", "API", "Location", "Template"]}]}}
    assert backstage.merge(theirs, ours)["catalog"]["rules"] == theirs["catalog"]["rules"]
    older_backchat = {"catalog": {"rules": [{"allow": list(backstage.CATALOG_KINDS)}]}}
    assert "rules" not in backstage.merge(older_backchat, ours)["catalog"]


@pytest.mark.parametrize("existing", [None, {}, {"catalog": None}, {"catalog": {"locations": None}}])
def test_merge_from_nothing(existing):
    cfg = make_cfg()
    ours = backstage.our_config(cfg, ADDRESS)
    merged = backstage.merge(existing, ours)
    assert merged == ours


# --- render_config ---------------------------------------------------------------------------


def test_render_config_without_existing_file(cfg, combo):
    text = backstage.render_config(None, cfg, ADDRESS)
    parsed = yaml.safe_load(text)
    assert parsed == backstage.our_config(cfg, ADDRESS)
    assert parsed["ai_server"]["url"] == GUI[combo[1]]


def test_render_config_keeps_other_keys_of_an_existing_file():
    cfg = make_cfg()
    existing_text = (
        "# the team's local overrides\n"
        "app:\n"
        "  title: Lab Portal\n"
        "backend:\n"
        "  database:\n"
        "    client: better-sqlite3\n"
        "    connection: ':memory:'\n"
        "  csp:\n"
        "    img-src: [\"'self'\", 'data:']\n"
        "ai_server:\n"
        "  url: http://localhost:3001\n"
        "catalog:\n"
        "  locations:\n"
        "    - type: file\n"
        "      target: ../../examples/entities.yaml\n"
    )
    parsed = yaml.safe_load(backstage.render_config(existing_text, cfg, ADDRESS))
    assert parsed["app"] == {"title": "Lab Portal"}
    assert parsed["backend"]["database"] == {"client": "better-sqlite3", "connection": ":memory:"}
    assert parsed["backend"]["csp"]["img-src"] == ["'self'", "data:"]
    assert parsed["backend"]["csp"]["frame-src"] == ["'self'", "http://ai-01.lab:3001"]
    assert parsed["ai_server"]["url"] == "http://ai-01.lab:3001"
    assert [location["target"] for location in parsed["catalog"]["locations"]] == [
        "../../examples/entities.yaml",
        CATALOG_TARGET,
    ]
    # Rendering the result again changes nothing.
    again = backstage.render_config(backstage.render_config(existing_text, cfg, ADDRESS), cfg, ADDRESS)
    assert yaml.safe_load(again) == parsed


def test_render_config_of_an_empty_file():
    cfg = make_cfg()
    assert yaml.safe_load(backstage.render_config("# nothing yet\n", cfg, ADDRESS)) == backstage.our_config(cfg, ADDRESS)


def test_render_config_rejects_invalid_yaml():
    with pytest.raises(yaml.YAMLError):
        backstage.render_config("app: [unclosed\n", make_cfg(), ADDRESS)


def test_csp_keeps_the_sources_of_the_apps_own_config():
    """Our lists replace the ones in app-config.yaml when Backstage merges: carry theirs over."""
    base_text = (
        "backend:\n  csp:\n    connect-src: [\"'self'\", 'http:', 'https:']\n"
        "    frame-src: ['https://www.youtube.com', \"'self'\"]\n    img-src: [\"'self'\", 'data:']\n"
    )
    cfg = make_cfg()
    parsed = yaml.safe_load(backstage.render_config(None, cfg, ADDRESS, base_text))
    csp = parsed["backend"]["csp"]
    assert csp["connect-src"] == ["'self'", "http://ai-01.lab:8080", "http:", "https:"]
    assert csp["frame-src"] == ["'self'", "http://ai-01.lab:3001", "https://www.youtube.com"]
    assert "img-src" not in csp, "directives we do not own stay in their file"
    for broken in ("backend: nope\n", "backend:\n  csp: [1]\n", "backend:\n  csp:\n    frame-src: false\n", ""):
        csp = yaml.safe_load(backstage.render_config(None, cfg, ADDRESS, broken))["backend"]["csp"]
        assert csp["frame-src"] == ["'self'", "http://ai-01.lab:3001"], broken


def test_public_address_on_loopback_is_the_bind_address():
    assert addresses.public_address(make_cfg(bind_address="127.0.0.1")) == "127.0.0.1"
    assert addresses.public_address(make_cfg(bind_address="::1")) == "[::1]"
    assert addresses.public_address(make_cfg(bind_address="0.0.0.0", public_address="ai.lab")) == "ai.lab"


# --- the CSP header --------------------------------------------------------------------------


def test_csp_header_is_helmets_format():
    """Byte for byte what Backstage 1.x (backend-defaults 0.19, helmet 6.2) sent for this map."""
    csp = {"frame-src": ["'self'", "http://x:1"], "upgrade-insecure-requests": False, "connectSrc": ["a"]}
    assert backstage.csp_header(csp) == (
        "default-src 'self';base-uri 'self';font-src 'self' https: data:;frame-ancestors 'self';"
        "img-src 'self' data:;object-src 'none';script-src 'self' 'unsafe-eval';"
        "script-src-attr 'none';style-src 'self' https: 'unsafe-inline';"
        "frame-src 'self' http://x:1;connect-src a"
    )


def test_csp_header_without_config_has_upgrade_and_no_frame_src():
    directives = backstage.csp_directives(None)
    assert directives["upgrade-insecure-requests"] == [] and "frame-src" not in directives
    assert backstage.csp_header(None).endswith(";upgrade-insecure-requests")


def test_csp_header_of_our_config(cfg, combo):
    directives = backstage.csp_directives(backstage.our_config(cfg, ADDRESS)["backend"]["csp"])
    assert directives["frame-src"] == ["'self'", GUI[combo[1]]]
    assert set(directives["connect-src"]) == {"'self'", *API_ORIGINS[combo].values()}
    assert "upgrade-insecure-requests" not in directives
    assert directives["default-src"] == ["'self'"]


# --- render_catalog --------------------------------------------------------------------------


def test_render_catalog(cfg, combo):
    entities = [entity for entity in yaml.safe_load_all(backstage.render_catalog(cfg, ADDRESS)) if entity]
    for entity in entities:
        assert entity["apiVersion"] == "backstage.io/v1alpha1"
    by_kind: dict[str, list[dict]] = {}
    for entity in entities:
        by_kind.setdefault(entity["kind"], []).append(entity)
    assert set(by_kind) == {"System", "Component", "API"}

    assert [system["metadata"]["name"] for system in by_kind["System"]] == ["backchat"]

    components = {c["metadata"]["name"]: c for c in by_kind["Component"]}
    assert set(components) == {f"backchat-{service}" for service in cfg.services}
    for component in components.values():
        assert component["spec"]["system"] == "backchat"

    apis = {a["metadata"]["name"]: a for a in by_kind["API"]}
    backends = API_ORIGINS[combo]
    assert set(apis) == {f"backchat-{service}-api" for service in backends}
    for service, origin in backends.items():
        api = apis[f"backchat-{service}-api"]
        assert api["spec"]["type"] == "openapi"
        assert api["spec"]["system"] == "backchat"
        assert isinstance(api["spec"]["definition"], str)
        definition = yaml.safe_load(api["spec"]["definition"])
        assert definition["servers"][0]["url"] == f"{origin}/v1"
        assert definition["servers"][0]["url"] == f"http://{ADDRESS}:{origin.rsplit(':', 1)[1]}/v1"
        assert "/models" in definition["paths"]
        assert components[f"backchat-{service}"]["spec"]["providesApis"] == [f"backchat-{service}-api"]
    for name, component in components.items():
        if name.removeprefix("backchat-") not in backends:
            assert "providesApis" not in component["spec"]


def test_render_catalog_api_is_the_openai_subset_at_the_host(cfg, combo):
    entities = list(yaml.safe_load_all(backstage.render_catalog(cfg, ADDRESS)))
    for api in (entity for entity in entities if entity["kind"] == "API"):
        definition = yaml.safe_load(api["spec"]["definition"])
        assert definition["openapi"].startswith("3.")
        service = api["metadata"]["name"].removeprefix("backchat-").removesuffix("-api")
        assert [server["url"] for server in definition["servers"]] == [f"{API_ORIGINS[combo][service]}/v1"]
        assert set(definition["paths"]["/models"]) == {"get"}
        assert set(definition["paths"]["/chat/completions"]) == {"post"}
        body = definition["paths"]["/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert set(body["required"]) == {"model", "messages"}
        assert body["properties"]["model"]["example"] == cfg.model_id
        assert "security" not in definition  # no api_key: nothing to send
    text = backstage.render_catalog(cfg, ADDRESS)
    assert "openai.com" not in text and "localhost" not in text
    # Readable: the definition is a block of YAML, with no anchors/aliases.
    assert "  definition: |\n    openapi: 3.0.3\n" in text
    assert "&id" not in text and "*id" not in text


def test_render_catalog_with_an_api_key_asks_for_a_bearer_token():
    cfg = make_cfg(api_key="sk-test-12345678")
    text = backstage.render_catalog(cfg, ADDRESS)
    assert "sk-test-12345678" not in text, "the key itself never goes in the catalog"
    api = [entity for entity in yaml.safe_load_all(text) if entity["kind"] == "API"][0]
    definition = yaml.safe_load(api["spec"]["definition"])
    assert definition["security"] == [{"apiKey": []}]
    assert definition["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": "The api_key setting, if set"
    }


def test_render_catalog_links_and_dependencies():
    cfg = make_cfg(backend="llamacpp", frontend="chatbot-ui")
    entities = {entity["metadata"]["name"]: entity for entity in yaml.safe_load_all(backstage.render_catalog(cfg, ADDRESS))}
    gui = entities["backchat-chatbot-ui"]
    assert gui["metadata"]["links"] == [{"url": "http://ai-01.lab:3001", "title": "Chat"}]
    assert gui["spec"]["dependsOn"] == ["component:backchat-llamacpp"]
    assert gui["spec"]["consumesApis"] == ["backchat-llamacpp-api"]
    assert entities["backchat-llamacpp"]["metadata"]["links"] == [
        {"url": "http://ai-01.lab:8080/v1/models", "title": "Models"}
    ]


def test_render_catalog_entity_names_are_valid():
    """Backstage entity names: [a-zA-Z0-9] separated by [-_.], at most 63 characters."""
    import re

    pattern = re.compile(r"^([A-Za-z0-9][-_.]?)*[A-Za-z0-9]$")
    for backend, frontend in COMBINATIONS:
        cfg = make_cfg(backend=backend, frontend=frontend)
        for entity in yaml.safe_load_all(backstage.render_catalog(cfg, ADDRESS)):
            name = entity["metadata"]["name"]
            assert pattern.match(name) and len(name) <= 63, name


def test_the_apps_own_catalog_locations_are_carried_over():
    """Backstage replaces arrays on merge: without theirs in ours, the app's entities vanish
    (seen with a real backend, tests/test_backstage_backend.py)."""
    base = {"catalog": {"locations": [
        {"type": "file", "target": "../../examples/entities.yaml"},
        {"type": "url", "target": "https://example.test/org.yaml", "rules": [{"allow": ["Group"]}]},
    ]}}
    cfg = make_cfg(backstage_app_dir="/srv/backstage")
    locations = backstage.our_config(cfg, ADDRESS, base)["catalog"]["locations"]
    assert locations[:2] == base["catalog"]["locations"]
    assert locations[2]["target"] == "/srv/backstage/backchat-catalog.yaml" and len(locations) == 3
    # Our own location listed in their file is not doubled.
    base["catalog"]["locations"].append({"type": "file", "target": "/srv/backstage/backchat-catalog.yaml"})
    assert len(backstage.our_config(cfg, ADDRESS, base)["catalog"]["locations"]) == 3


# --- one Backstage for a lab -------------------------------------------------------------

ENTITY_NAME = r"[A-Za-z0-9]([-_.]?[A-Za-z0-9])*"


def lab_of(*names, key=None, **overrides):
    hosts = [(name, make_cfg(api_key=key, **overrides), f"{name}.lab") for name in names]
    return backstage.lab(hosts)


def test_lab_entity_names_carry_the_host_and_never_clash():
    import re

    long_name = "ai-" + "x" * 80 + ".lab.example.com"
    served = lab_of("ai-01", "AI_01", "@local", long_name, long_name.replace("x", "y"))
    entities = [entity for entity in yaml.safe_load_all(backstage.render_lab_catalog(served)) if entity]
    names = [entity["metadata"]["name"] for entity in entities]
    assert len(names) == len(set(names)), names
    for name in names:
        assert len(name) <= backstage.ENTITY_NAME_MAX and re.fullmatch(ENTITY_NAME, name), name
    assert "backchat-local-chatbot-ui" in names
    # ai-01 and AI_01 would both read "ai-01": each gets a hash of its own name instead.
    hashed = {name.split("-")[3] for name in names if name.startswith("backchat-ai-01-")}
    assert len(hashed) == 2 and all(len(part) == 6 for part in hashed), names
    assert backstage.lab([("ai-01", make_cfg(), "a")])[0].name("localai") == "backchat-ai-01-localai"


def test_lab_config_describes_every_host_and_opens_the_chosen_gui():
    served = lab_of("ai-01", "ai-02")
    cfg = make_cfg()
    ours = backstage.lab_config(cfg, served)
    assert ours["ai_server"]["url"] == "http://ai-01.lab:3001"
    assert ours["backend"]["csp"]["frame-src"] == ["'self'", "http://ai-01.lab:3001"]
    assert ours["backend"]["csp"]["connect-src"] == ["'self'", "http://ai-01.lab:8080", "http://ai-02.lab:8080"]
    chosen = backstage.lab_config(make_cfg(ai_server_host="ai-02"), served)
    assert chosen["ai_server"]["url"] == "http://ai-02.lab:3001"
    assert chosen["backend"]["csp"]["frame-src"] == ["'self'", "http://ai-02.lab:3001"]
    assert "proxy" not in ours, "no key: the browser calls the hosts directly"


def test_with_a_key_each_backend_gets_a_proxy_endpoint_that_adds_it_server_side():
    from backchat.secrets import Secret

    key = Secret("sk-lab-key-0123456789")
    served = lab_of("ai-01", "ai-02", key=key, backend="localai", frontend="textgen")
    ours = backstage.lab_config(make_cfg(api_key=key), served)
    endpoints = ours["proxy"]["endpoints"]
    assert set(endpoints) == {f"/backchat-{name}-{service}" for name in ("ai-01", "ai-02") for service in ("localai", "textgen")}
    assert endpoints["/backchat-ai-02-textgen"] == {
        "target": "http://ai-02.lab:5001",
        "headers": {"Authorization": "Bearer ${BACKCHAT_API_KEY}"},
        "allowedMethods": ["GET", "POST"],
        "credentials": "require",
    }
    catalog = backstage.render_lab_catalog(served, "https://portal.lab")
    text = yaml.safe_dump(ours) + catalog
    assert key.reveal() not in text
    apis = {entity["metadata"]["name"]: yaml.safe_load(entity["spec"]["definition"])
            for entity in yaml.safe_load_all(catalog) if entity and entity["kind"] == "API"}
    assert [server["url"] for server in apis["backchat-ai-01-localai-api"]["servers"]] == [
        "https://portal.lab/api/proxy/backchat-ai-01-localai/v1", "http://ai-01.lab:8080/v1"]


def test_backend_url_is_the_apps_literal_base_url_else_the_page_origin():
    assert backstage.backend_url({"backend": {"baseUrl": "http://localhost:7007/"}}) == "http://localhost:7007"
    assert backstage.backend_url({"backend": {"baseUrl": "${BACKEND_URL}"}}) == ""
    assert backstage.backend_url(None) == ""


def test_merge_drops_our_stale_proxy_endpoints_and_keeps_the_apps():
    from backchat.secrets import Secret

    existing = {"proxy": {"endpoints": {"/backchat-ai-09-localai": {"target": "http://gone:8080"},
                                         "/their-api": {"target": "http://theirs"}}}}
    ours = backstage.lab_config(make_cfg(), lab_of("ai-01", key=Secret("sk-0123456789abcdef")))
    merged = backstage.merge(existing, ours)
    assert set(merged["proxy"]["endpoints"]) == {"/their-api", "/backchat-ai-01-localai"}
    # The key turned off: our endpoints go, theirs stay.
    assert backstage.merge(merged, backstage.lab_config(make_cfg(), lab_of("ai-01")))["proxy"]["endpoints"] == {
        "/their-api": {"target": "http://theirs"}}


def test_one_box_keeps_the_plain_names():
    served = backstage.one_box(make_cfg(), ADDRESS)
    names = {entity["metadata"]["name"] for entity in yaml.safe_load_all(backstage.render_lab_catalog(served)) if entity}
    assert names == {"backchat", "backchat-localai", "backchat-chatbot-ui", "backchat-localai-api"}


# --- a lab with a gateway: Backstage points at it ------------------------------------------


def door_of(key=None, **overrides):
    return backstage.Door(make_cfg(tls=True, api_key=key, **overrides), "gw.lab", "gw")


def test_with_a_gateway_every_url_is_the_gateways():
    """ai_server.url, the CSP's frame-src and connect-src: the gateway's https origin, not
    a host's (the Backchat page frames the gateway's GUI, the API goes through it)."""
    ours = backstage.lab_config(make_cfg(ai_server_host="ai-02"), lab_of("ai-01", "ai-02"), door=door_of())
    assert ours["ai_server"]["url"] == "https://gw.lab"
    assert ours["backend"]["csp"]["frame-src"] == ["'self'", "https://gw.lab"]
    assert ours["backend"]["csp"]["connect-src"] == ["'self'", "https://gw.lab"]
    assert "upgrade-insecure-requests" not in ours["backend"]["csp"]
    port = backstage.lab_config(make_cfg(), lab_of("ai-01"), door=door_of(gateway_port=8443))
    assert port["ai_server"]["url"] == "https://gw.lab:8443"


def test_with_a_gateway_and_a_key_the_one_proxy_endpoint_is_the_gateway():
    from backchat.secrets import Secret

    key = Secret("sk-lab-key-0123456789")
    ours = backstage.lab_config(make_cfg(api_key=key), lab_of("ai-01", "ai-02", key=key), door=door_of(key))
    assert ours["proxy"]["endpoints"] == {"/backchat-gateway": {
        "target": "https://gw.lab", "headers": {"Authorization": "Bearer ${BACKCHAT_API_KEY}"},
        "allowedMethods": ["GET", "POST"], "credentials": "require"}}
    # A host's old endpoint goes when the gateway arrives (named like ours).
    before = backstage.lab_config(make_cfg(api_key=key), lab_of("ai-01", key=key))
    assert set(backstage.merge(before, ours)["proxy"]["endpoints"]) == {"/backchat-gateway"}


def test_with_a_gateway_the_catalog_has_one_api_at_the_gateway_and_the_hosts_behind_it():
    from backchat.secrets import Secret

    key = Secret("sk-lab-key-0123456789")
    served = lab_of("ai-01", "ai-02", key=key)
    catalog = backstage.render_lab_catalog(served, "https://portal.lab", door=door_of(key))
    entities = {entity["metadata"]["name"]: entity for entity in yaml.safe_load_all(catalog) if entity}
    apis = [name for name, entity in entities.items() if entity["kind"] == "API"]
    assert apis == ["backchat-gateway-api"]
    definition = yaml.safe_load(entities["backchat-gateway-api"]["spec"]["definition"])
    assert [server["url"] for server in definition["servers"]] == [
        "https://portal.lab/api/proxy/backchat-gateway/v1", "https://gw.lab/v1"]
    assert "load-balanced over every AI host" in definition["info"]["description"]
    gateway = entities["backchat-gateway"]["spec"]
    assert gateway["providesApis"] == ["backchat-gateway-api"]
    assert gateway["dependsOn"] == ["component:backchat-ai-01-localai", "component:backchat-ai-02-localai"]
    assert entities["backchat"]["metadata"]["links"] == [
        {"url": "https://gw.lab", "title": "Chat (every AI host, through the gateway)", "icon": "chat"}]
    for name in ("backchat-ai-01-localai", "backchat-ai-01-chatbot-ui"):
        spec = entities[name]["spec"]
        assert "providesApis" not in spec and "consumesApis" not in spec, name
    assert entities["backchat-ai-01-chatbot-ui"]["spec"]["dependsOn"] == ["component:backchat-ai-01-localai"]
    for name in entities:
        assert len(name) <= backstage.ENTITY_NAME_MAX
    assert key.reveal() not in catalog


def test_an_ai_host_describing_itself_points_at_the_gateway_too():
    ours = backstage.lab_config(make_cfg(), backstage.one_box(make_cfg(), ADDRESS), door=door_of())
    assert ours["ai_server"]["url"] == "https://gw.lab"
    names = {entity["metadata"]["name"] for entity in yaml.safe_load_all(
        backstage.render_lab_catalog(backstage.one_box(make_cfg(), ADDRESS), door=door_of())) if entity}
    assert names == {"backchat", "backchat-gateway", "backchat-gateway-api", "backchat-localai", "backchat-chatbot-ui"}


# --- uninstall: app-config.local.yaml back as it was --------------------------------------

THEIR_LOCAL = (
    "app:\n  title: Our Portal\n"
    "backend:\n  csp:\n    img-src: [\"'self'\", 'data:']\n    frame-src: [\"'self'\", 'https://grafana.lab']\n"
    "catalog:\n  locations:\n    - type: url\n      target: https://example.test/catalog-info.yaml\n"
)
THEIR_BASE = "catalog:\n  locations:\n    - type: file\n      target: ../../examples/entities.yaml\n"


def test_a_file_backchat_created_is_removed(cfg):
    for base in (None, THEIR_BASE):  # the app's own locations, carried over into ours, go too
        ours = backstage.render_config(None, cfg, ADDRESS, base)
        assert backstage.restored_config(ours, None, cfg, base) is None


def test_the_apps_own_file_comes_back_from_the_backup_verbatim(cfg):
    merged = backstage.render_config(THEIR_LOCAL, cfg, ADDRESS, THEIR_BASE)
    assert backstage.restored_config(merged, THEIR_LOCAL, cfg, THEIR_BASE) == THEIR_LOCAL


def test_without_a_backup_only_our_keys_go():
    """A file we created that the app's owners added to since: theirs stays, ours goes."""
    cfg = make_cfg()
    ours = yaml.safe_load(backstage.render_config(None, cfg, ADDRESS, THEIR_BASE))
    ours["app"] = {"title": "Added later"}
    ours["backend"]["csp"]["img-src"] = ["'self'"]
    ours["catalog"]["locations"].append({"type": "url", "target": "https://example.test/more.yaml"})
    restored = yaml.safe_load(backstage.restored_config(yaml.safe_dump(ours), None, cfg, THEIR_BASE))
    assert restored == {
        "app": {"title": "Added later"},
        "backend": {"csp": {"img-src": ["'self'"]}},
        "catalog": {"locations": [{"type": "url", "target": "https://example.test/more.yaml"}]},
    }


def test_a_file_backchat_never_touched_stays_and_nothing_stays_nothing():
    cfg = make_cfg()
    assert backstage.restored_config(THEIR_LOCAL, None, cfg) == THEIR_LOCAL
    assert backstage.restored_config(None, None, cfg) is None


def test_a_backup_an_older_backchat_overwrote_with_its_own_file_loses_our_keys():
    cfg = make_cfg()
    first = backstage.render_config(THEIR_LOCAL, cfg, ADDRESS)
    restored = yaml.safe_load(backstage.restored_config(first, first, cfg))
    assert restored["app"] == {"title": "Our Portal"} and "ai_server" not in restored
    assert restored["catalog"]["locations"] == [{"type": "url", "target": "https://example.test/catalog-info.yaml"}]
    assert not backstage.carries_ours(restored, cfg) and backstage.carries_ours(yaml.safe_load(first), cfg)


def test_uninstall_takes_our_proxy_endpoints_and_keeps_the_apps():
    from backchat.secrets import Secret

    cfg = make_cfg(api_key="sk-0123456789abcdef")
    mine = backstage.merge({"proxy": {"endpoints": {"/their-api": {"target": "http://theirs"}}}},
                           backstage.our_config(cfg, ADDRESS))
    assert "/backchat-localai" in mine["proxy"]["endpoints"]
    assert backstage.without_ours(mine, cfg) == {"proxy": {"endpoints": {"/their-api": {"target": "http://theirs"}}}}
    alone = backstage.our_config(cfg, ADDRESS)
    assert backstage.restored_config(yaml.safe_dump(alone), None, cfg) is None, "nothing of theirs: no file"


@pytest.mark.parametrize("api_key", [None, "k3y-abcdefgh-0123456789"])
@pytest.mark.parametrize("servers", [[], [{"url": "https://a.lab/v1", "description": "on a"}],
                                     [{"url": "https://b/v1", "description": "x"}, {"url": "https://c/v1", "description": "y\nz"}]])
def test_the_api_text_is_the_definition_dumped_whole(api_key, servers):
    """The catalog's API text is put together from parts dumped once per run: it must be
    byte for byte what dumping each host's whole definition gives."""
    cfg = make_cfg(api_key=api_key)
    whole = yaml.dump(backstage.openapi_definition(cfg, "localai", servers), Dumper=backstage._CatalogDumper,
                      sort_keys=False)
    assert backstage.openapi_yaml(cfg, "localai", servers) == whole
