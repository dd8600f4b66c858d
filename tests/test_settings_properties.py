"""Every setting, fed hostile values, is refused with a message or round-trips exactly (issue 12).

Property, for each setting in ``settings.SETTINGS`` (the list is read from there, so a new
setting is covered the day it is declared): ``validate({name: value})`` either

* raises ``SettingsError`` whose message names the setting, the host and says ``Fix:``, and
  shows no traceback and no exception class name (the value's own repr aside); or
* returns a Settings whose cleaned value is a fixed point of its check (a directory is
  also canonical: what the check compared is what the host resolves) and arrives exactly,
  at its place, in every file it reaches: the compose file and LocalAI's model YAML
  (``stack.rendered_files``), the ``.env`` (``secrets.reveal(stack.env_lines(cfg))``),
  Backstage's ``app-config.local.yaml`` (``backstage.render_config``) and the catalog
  (``backstage.render_catalog``, with the OpenAPI definitions it embeds). Every file must
  parse back to the same structure, with the same leaf types, as the same combination
  rendered from the defaults: a value that comes back different, breaks the YAML or adds
  a key is a bug. Any other exception from ``validate`` (a traceback) is a bug.

The values: arbitrary unicode text (control characters, ``\\x00``, newlines, tabs), shell
and YAML metacharacters, ``${VAR}``, unicode digits (``²``, ``٣``, fullwidth), path tricks
(``..``, ``//``, ``~``, leading and trailing slashes), very long strings, valid values
edited by one to three characters, numbers spelled as strings (``--4``, ``0x10``, `` 4``)
and non-strings (None, bool, int, float, bytes, lists, dicts). Beside the random search,
``test_listed_and_one_character_values`` tries, for every setting, a fixed list of such
values and every special character inserted at the start, middle and end of its default,
deterministically.

Where each setting arrives is listed in ``PLACES``. The renderers run on a Settings that
records which fields they read: a setting they read but ``PLACES`` does not list fails
``test_places_hold_for_the_defaults``, so a new setting cannot reach a file unchecked. A
file named by the settings must also be creatable (no name over NAME_MAX, no path over
PATH_MAX): a file the host cannot write is a value that never arrives.

``docker compose config`` is not run: this machine has no compose v2 plugin (``docker
compose version`` answers "unknown command"). Its rules are applied instead: the file
must be YAML that parses back as written (PyYAML's YAML 1.1 resolvers are stricter than
compose-go's yaml.v3, but both read ``true``, ``null``, ``1.5`` or ``123`` as non-strings),
and compose interpolates ``$`` in every value, so no parsed string may hold a ``$`` but the
template's own ``${BACKCHAT_API_KEY...}``.

Deterministic (``derandomize=True``); no example database (``database=None``) and
Hypothesis's other files (charmap cache, patches) go to a temporary directory, not the
repository. ``BACKCHAT_PROPERTY_EXAMPLES`` sets the examples per setting (default 200).

Each bug this test found has its minimal example pinned in ``KNOWN_BUG_EXAMPLES`` (all
fixed; they now guard against regressions). A bug found and not yet fixed goes in
``KNOWN_BUGS``: its setting's tests are then ``xfail(strict=True)``, and XPASS once fixed.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import posixpath
import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import hypothesis.configuration
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from backchat import backstage, secrets, settings, stack
from backchat.secrets import Secret
from backchat.settings import SETTINGS, SettingsError, validate
from tests.variants import COMBINATIONS

# Hypothesis writes a charmap cache (and, on failure, patches) under its home directory,
# by default .hypothesis/ in the working directory: keep the repository clean.
hypothesis.configuration.set_hypothesis_home_dir(Path(tempfile.gettempdir()) / f"backchat-hypothesis-{os.getuid()}")

WHERE = "ai-01"
KEY = "k3y-abcdefgh-0123456789"
# The inventory name a host is reached by when public_address is unset (no pyinfra host here).
INVENTORY_ADDRESS = "ai-01.lab.example"
THREADS_FROM_CORES = 4
KEY_REF = re.compile(r"\$\{BACKCHAT_API_KEY(:?[?-][^}]*)?\}")
# A leaked exception: a traceback, or a class name such as ValueError / KeyError.
LEAK = re.compile(r"Traceback|File \"|\b[A-Za-z_]*(Error|Exception)\b")

EXAMPLES = int(os.environ.get("BACKCHAT_PROPERTY_EXAMPLES", "200"))
PROPERTY = hsettings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- the values ---------------------------------------------------------------------------

# Single characters with a meaning to a shell, YAML, compose, .env, URLs or paths, and
# look-alikes of safe ones (unicode digits, fullwidth, dotless/dotted i, Kelvin sign).
SPECIAL_CHARS = list(
    " \t\n\r\x00\x0b\x0c\x1b\x7f\x85\u2028\ufeff\u200b$`;|&<>'\"\\#:%?*!@{}[],=/.~-_+^()"
    "²٣१１ａＡſ\u212a\u0130é\ud800aZ09"
)
FRAGMENTS = SPECIAL_CHARS + [
    "\r\n", "  ", "$(id)", "`id`", "&&", "${VAR}", "$VAR", "$$", " #x", ": ", "::", "--", "%eth0",
    "..", "//", "/..", "/.", "./", "../", "~root", "~nosuchuser", "~/", "/etc", "//etc", "/tmp", "\udcff",
    "true", "null", "yes", "no", "on", "0x10", "1e3", "1_0", "0o7", "1.5", "1:2", "-1", "123",
    "http://", "https://", "@sha256:", "sha256:" + "0" * 64, "a" * 70,
]
# Valid-looking values of every shape the settings take, so a setting whose default is
# None or not a string is edited from something near valid too.
SEEDS = sorted(
    {setting.default for setting in SETTINGS if isinstance(setting.default, str)}
    | {
        "http://mirror.lab:8000/models/x.gguf", "https://hub.example/", "ai-01.lab.example", "10.0.0.5",
        "127.0.0.1", "::1", "fe80::1", "fe80::1%eth0", "https://backstage.example.com:7007",
        "~/.config/backchat/api-key", "/tmp/backchat-report.json", "/etc/passwd",  # fixed: the same search everywhere
        "/srv/backchat/models", "alice", "main", "model.gguf", "4", "8080",
    }
)
# Numbers spelled the ways a command line or a copy-paste spells them.
NUMBERISH = [
    "4", "--4", "-4", "+4", " 4", "4 ", "4\n", "²", "٣", "４", "0x10", "0o7", "1_000", "1e3", "4.0", "",
    "-", "-0", "007", "99999999999999999999", "NaN", "inf", "0", "65536", "8080", "3001", "1024 ",
]
# Tried for every setting by the deterministic test.
LISTED: list[Any] = [
    *NUMBERISH, *FRAGMENTS, None, True, False, 0, 1, -1, 4, 2**70, 4.0, float("nan"), b"4", [], [""], ["a b"],
    [None], {}, ("x",), "/" + "a" * 300, "a" * 5000, "/opt/" + "a/" * 2100,
]


def _accepted(name: str, value: Any) -> bool:
    try:
        validate({name: value})
    except Exception:
        return False
    return True


# Per setting, the seeds its check accepts (its default first).
VALID_SEEDS = {
    setting.name: [seed for seed in dict.fromkeys([setting.default, *SEEDS] if isinstance(setting.default, str) else SEEDS)
                   if _accepted(setting.name, seed)]
    for setting in SETTINGS
}


@st.composite
def edited(draw, seeds: list[str]) -> str:
    """A valid value with one to three small edits: insert, delete, replace, double a
    character ("//opt", "~~/"), or stretch a piece past NAME_MAX and PATH_MAX."""
    text = draw(st.sampled_from(seeds))
    for _ in range(draw(st.sampled_from([1, 1, 2, 3]))):
        at = draw(st.sampled_from([0, len(text)]) | st.integers(0, len(text)))  # the ends are favoured
        piece = draw(st.sampled_from(SPECIAL_CHARS) | st.sampled_from(FRAGMENTS) | st.characters())
        edit = draw(st.sampled_from(["insert", "delete", "replace", "double", "stretch"]))
        if edit == "insert":
            text = text[:at] + piece + text[at:]
        elif edit == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 8)):]
        elif edit == "replace":
            text = text[:at] + piece + text[at + 1:]
        elif edit == "double":
            text = text[:at] + text[at:at + 1] + text[at:]
        else:
            text = text[:at] + piece * draw(st.integers(100, 2500)) + text[at:]
    return text


# Paths built from segments: leading, doubled and trailing slashes, dot segments, ~, system
# trees, odd names; half the segments are plain, so a path trick often comes alone.
_PLAIN_SEGMENTS = ["opt", "backchat", "models", "srv", "data"]
_ODD_SEGMENTS = ["etc", "tmp", "home", "alice", "var", "lib", "run", "usr", "", ".", "..", "~", "a b", "x;y",
                 "$(id)", "${VAR}", "²", "ｅｔｃ", "\n", "\ud800"]  # a lone surrogate: JSON's "\ud800"
_paths = st.builds(
    lambda head, segments, tail: head + "/".join(segments) + tail,
    st.sampled_from(["/", "//", "///", "", "~/", "./", "/./", "/../"]),
    st.lists(st.sampled_from(_PLAIN_SEGMENTS) | st.sampled_from(_ODD_SEGMENTS), min_size=1, max_size=4),
    st.sampled_from(["", "/", "//", "/.", "/.."]),
)
# IP addresses as written, with IPv6 scope ids, brackets, ports and padding.
_addresses = st.builds(
    lambda address, scope, wrap: wrap.format(f"{address}{scope}"),
    st.ip_addresses().map(str),
    st.sampled_from(["", "%eth0", "%"]) | st.text(st.sampled_from(SPECIAL_CHARS), max_size=3).map(lambda text: "%" + text),
    st.sampled_from(["{}", "[{}]", "{}:8080", " {}", "{}\n"]),
)

_strings = st.one_of(
    edited(SEEDS),
    st.text(max_size=30),  # arbitrary unicode, control characters included
    st.lists(st.sampled_from(FRAGMENTS) | st.sampled_from(SEEDS), min_size=1, max_size=4).map("".join),
    st.text(st.sampled_from("/.~-_:%$#a9²٣ \n\\"), max_size=20),  # path and number tricks
    st.sampled_from(NUMBERISH),
    st.integers(-(10**6), 10**9).map(str),
    # very long: past NAME_MAX (255) and PATH_MAX (4096)
    st.builds(lambda seed, unit, count: seed + unit * count,
              st.sampled_from(SEEDS), st.sampled_from(["a", "/a", "9", "-"]), st.integers(100, 2500)),
)
_others = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.binary(max_size=8),
    st.lists(_strings | st.integers() | st.none(), max_size=3),
    st.tuples(_strings), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def values_for(name: str) -> st.SearchStrategy:
    """Hostile values for one setting: mostly edits of values it accepts, then anything."""
    own = VALID_SEEDS[name]
    # Weights by repetition: one_of drops a branch that is the very same object, so each is new.
    near = [edited(own) for _ in range(3)] + [st.lists(edited(own), max_size=3)] if own else []
    if any(seed.startswith(("/", "~")) for seed in own):  # a path setting: more path tricks
        near += [_paths.map(str) for _ in range(2)]
    if any(_is_ip(seed) for seed in own):  # an address setting: more addresses
        near += [_addresses.map(str) for _ in range(2)]
    return st.one_of(*near, _paths, _addresses, _strings, _others)


# --- rendering ----------------------------------------------------------------------------

# The renderers are pure functions of the Settings: a field they never read while rendering
# the defaults cannot change what they render (execution is identical up to the first read
# of it, and there is none). So each group of files is re-rendered only for a setting it
# reads; for any other setting the default rendering *is* its rendering. The reads are
# recorded by a Settings subclass; they also tell which settings reach files (PLACES).
_recorders: list[set[str]] = []


class _Recording(settings.Settings):
    def __getattribute__(self, attribute: str):
        if _recorders and not attribute.startswith("__"):
            _recorders[-1].add(attribute)
        return super().__getattribute__(attribute)


def _recording(cfg) -> _Recording:
    return _Recording(**{field.name: getattr(cfg, field.name) for field in dataclasses.fields(cfg)})


def address_of(cfg) -> str:
    """The Backstage-facing address: public_address, else loopback when bound there, else the inventory name."""
    if cfg.public_address:
        return cfg.public_address
    bind = ipaddress.ip_address(cfg.bind_address)
    if bind.is_loopback:
        return f"[{cfg.bind_address}]" if bind.version == 6 else cfg.bind_address
    return INVENTORY_ADDRESS


def _stack_texts(cfg) -> dict[str, str]:
    threads = stack.thread_count(cfg, {"physical": THREADS_FROM_CORES})
    texts = {path: content for path, (content, _mode) in stack.rendered_files(cfg, threads).items()}
    texts[".env"] = secrets.reveal(stack.env_lines(cfg))
    return texts


# Each group of files and how it is rendered from a Settings.
GROUPS = {
    "stack": _stack_texts,
    "config": lambda cfg: {"app-config.local.yaml": backstage.render_config(None, cfg, address_of(cfg))},
    "catalog": lambda cfg: {"catalog": backstage.render_catalog(cfg, address_of(cfg))},
}


def render_group(group: str, cfg) -> tuple[dict[str, str], frozenset[str]]:
    """The group's texts, and the Settings fields read to render them (cached: Settings is frozen)."""
    try:
        hash(cfg)
    except TypeError:  # a cleaned value that is a list: no caching
        return _render_group(group, cfg)
    return _render_group_cached(group, cfg)


def _render_group(group: str, cfg) -> tuple[dict[str, str], frozenset[str]]:
    reads: set[str] = set()
    _recorders.append(reads)
    try:
        texts = GROUPS[group](_recording(cfg))
    finally:
        _recorders.pop()
    return texts, frozenset(reads)


_render_group_cached = lru_cache(maxsize=256)(_render_group)


@lru_cache(maxsize=512)
def _load(text: str) -> Any:
    return yaml.safe_load(text)


@lru_cache(maxsize=64)
def _load_all(text: str) -> list:
    # libyaml's parser with PyYAML's safe constructor and resolvers (the same types as
    # yaml.safe_load_all), for speed: the catalog is the largest file.
    return list(yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))


@dataclass
class Files:
    """Every file a Settings reaches: text and parsed."""

    cfg: Any
    address: str
    texts: dict[str, str]  # path (or role) -> text
    compose_path: str
    compose: Any
    model_path: str | None
    model: Any
    env: str
    config: Any
    catalog: list
    definitions: dict[str, Any]  # API entity name -> its parsed OpenAPI definition
    frontdoor: str | None = None  # the front door's nginx.conf, when there is one


def parse(cfg, texts: dict[str, str]) -> Files:
    """Parse every file (a YAML error propagates: it is a failure of the property)."""
    paths = [path for path in texts if path.startswith("/")]
    compose_path = next(path for path in paths if path.endswith("/docker-compose.yaml"))
    door_paths = [path for path in paths if path.endswith("/frontdoor.conf")]
    model_paths = [path for path in paths if path != compose_path and path not in door_paths]
    assert len(model_paths) <= 1, f"unexpected files: {sorted(paths)}"
    model_path = model_paths[0] if model_paths else None
    catalog = _load_all(texts["catalog"])
    definitions = {
        entity["metadata"]["name"]: _load(entity["spec"]["definition"])
        for entity in catalog
        if isinstance(entity, dict) and entity.get("kind") == "API"
    }
    return Files(
        cfg=cfg,
        address=address_of(cfg),
        texts=texts,
        compose_path=compose_path,
        compose=_load(texts[compose_path]),
        model_path=model_path,
        model=_load(texts[model_path]) if model_path else None,
        env=texts[".env"],
        config=_load(texts["app-config.local.yaml"]),
        catalog=catalog,
        definitions=definitions,
        frontdoor=texts[door_paths[0]] if door_paths else None,
    )


@dataclass
class Baseline:
    files: Files
    groups: dict[str, dict[str, str]]  # group -> its texts
    reads: dict[str, frozenset[str]]  # group -> the Settings fields it read


@lru_cache(maxsize=None)
def baseline(backend: str, frontend: str, with_key: bool, door: bool = True) -> Baseline:
    """The same combination rendered from the declared defaults (``door``: with the HTTPS
    front door, the default, or without, as with tls = False or a loopback bind)."""
    data = {"backend": backend, "frontend": frontend, **({} if door else {"tls": False})}
    cfg = validate(data, api_key=Secret(KEY) if with_key else None)
    groups, reads = {}, {}
    for group in GROUPS:
        groups[group], reads[group] = render_group(group, cfg)
    texts = {path: text for group_texts in groups.values() for path, text in group_texts.items()}
    return Baseline(parse(cfg, texts), groups, reads)


def render(cfg, name: str, base: Baseline) -> Files:
    """cfg's files: a group that did not read ``name`` for the defaults is the defaults' (see above)."""
    texts: dict[str, str] = {}
    for group in GROUPS:
        texts.update(render_group(group, cfg)[0] if name in base.reads[group] else base.groups[group])
    return parse(cfg, texts)


def reaches(name: str, base: Baseline) -> bool:
    return any(name in reads for reads in base.reads.values())


def combinations_for(name: str) -> list[tuple[str, str]]:
    """The backend/frontend combinations whose files the setting reaches (all if none do):
    llamacpp_image is only searched where llama.cpp runs."""
    reached = [combo for combo in COMBINATIONS if any(reaches(name, baseline(*combo, key)) for key in (False, True))]
    return reached or COMBINATIONS


def shape(value: Any) -> Any:
    """The structure of parsed YAML: keys, list lengths and leaf types (not leaf values)."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__


def leaves(value: Any):
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from leaves(item)
    else:
        yield value


_MISSING = "<missing>"


def at(document: Any, *path: Any) -> Any:
    """document[path...], or a marker when the structure is not there."""
    for step in path:
        try:
            document = document[step]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return document


def after(words: Any, flag: str) -> Any:
    """The word after ``flag`` in a list (or space-separated string) of arguments."""
    if isinstance(words, str):
        words = words.split(" ")
    if not isinstance(words, list) or flag not in words or words.index(flag) + 1 >= len(words):
        return _MISSING
    return words[words.index(flag) + 1]


# --- where each setting arrives -------------------------------------------------------------


def _services(f: Files) -> list:
    door = ["frontdoor"] if _behind_door(f.cfg) else []
    return [("compose services", sorted(f.compose["services"]), sorted([*f.cfg.services, *door]))]


def _textgen_volume(cfg) -> str:
    """Text Gen WebUI gets the model file alone, in a folder named after model_id."""
    return f"{cfg.models_dir}/{cfg.model_file}:/app/user_data/models/{cfg.model_id}/{cfg.model_file}:ro"


def _model_id(f: Files) -> list:
    cfg, svc, found = f.cfg, f.compose["services"], []
    if "localai" in cfg.services:
        found += [
            ("LocalAI model file name", f.model_path, f"{cfg.models_dir}/{cfg.model_id}.yaml"),
            ("LocalAI YAML name", at(f.model, "name"), cfg.model_id),
            ("LOCALAI_LOAD_TO_MEMORY", at(svc, "localai", "environment", "LOCALAI_LOAD_TO_MEMORY"), cfg.model_id),
        ]
    if "llamacpp" in cfg.services:
        found.append(("llamacpp --alias", after(at(svc, "llamacpp", "command"), "--alias"), cfg.model_id))
    if "textgen" in cfg.services:
        args = at(svc, "textgen", "environment", "EXTRA_LAUNCH_ARGS")
        found += [
            ("textgen --model", after(args, "--model"), cfg.model_id),
            ("textgen volume", at(svc, "textgen", "volumes", 0), _textgen_volume(cfg)),
        ]
    if "chatbot-ui" in cfg.services:
        found.append(("DEFAULT_MODEL", at(svc, "chatbot-ui", "environment", "DEFAULT_MODEL"), cfg.model_id))
    for name, definition in f.definitions.items():
        model = at(definition, "paths", "/chat/completions", "post", "requestBody", "content",
                   "application/json", "schema", "properties", "model", "example")
        found += [
            (f"catalog {name} model example", model, cfg.model_id),
            (f"catalog {name} description", cfg.model_id in str(at(definition, "info", "description")), True),
        ]
    return found


def _model_file(f: Files) -> list:
    cfg, found = f.cfg, []
    if "localai" in cfg.services:
        found.append(("LocalAI parameters.model", at(f.model, "parameters", "model"), cfg.model_file))
    if "llamacpp" in cfg.services:
        found.append(("llamacpp --model", after(at(f.compose, "services", "llamacpp", "command"), "--model"),
                      f"/models/{cfg.model_file}"))
    if "textgen" in cfg.services:
        found.append(("textgen volume", at(f.compose, "services", "textgen", "volumes", 0), _textgen_volume(cfg)))
    return found


def _stack_dir(f: Files) -> list:
    return [
        ("compose path", f.compose_path, f"{f.cfg.stack_dir}/docker-compose.yaml"),
        ("compose header", f.texts[f.compose_path].splitlines()[0],
         f"# Written by backchat ({f.cfg.stack_dir}/docker-compose.yaml); edits are replaced on the next run."),
    ]


def _models_dir(f: Files) -> list:
    cfg, svc, found = f.cfg, f.compose["services"], []
    if "localai" in cfg.services:
        found += [("localai volume", at(svc, "localai", "volumes", 0), f"{cfg.models_dir}:/models"),
                  ("LocalAI model file dir", f.model_path, f"{cfg.models_dir}/{cfg.model_id}.yaml")]
    if "llamacpp" in cfg.services:
        found.append(("llamacpp volume", at(svc, "llamacpp", "volumes", 0), f"{cfg.models_dir}:/models:ro"))
    if "textgen" in cfg.services:
        found.append(("textgen volume", at(svc, "textgen", "volumes", 0), _textgen_volume(cfg)))
    return found


def _localai_backend(f: Files) -> list:
    """LocalAI's backends: the unpacked archive read-only (nothing downloaded), or the volume."""
    cfg, svc = f.cfg, f.compose["services"]
    if "localai" not in cfg.services:
        return []
    offline = bool(cfg.localai_backend_archive)
    return [
        ("localai backends volume", at(svc, "localai", "volumes", 1),
         f"{cfg.stack_dir}/localai-backends:/backends:ro" if offline else "localai-backends:/backends"),
        ("LOCALAI_EXTERNAL_BACKENDS", at(svc, "localai", "environment", "LOCALAI_EXTERNAL_BACKENDS"),
         _MISSING if offline else "llama-cpp"),
    ]


def _published(cfg, service: str) -> list[tuple[str, int]]:
    """[(host-port setting, index in the service's ports list)]; Text Gen WebUI's GUI port
    only when it is the GUI users open."""
    if service == "textgen":
        return [("textgen_port", 0), ("textgen_api_port", 1)] if cfg.frontend == "textgen" else [("textgen_api_port", 0)]
    return [({"chatbot-ui": "chatbot_ui_port"}.get(service, "localai_port"), 0)]
_API_PORT = {"localai": "localai_port", "llamacpp": "localai_port", "textgen": "textgen_api_port"}


# The front door's server block for a host-port setting of a service.
_DOOR = {("textgen", "textgen_port"): "textgen-gui"}


def _behind_door(cfg) -> bool:
    return cfg.tls is True and not ipaddress.ip_address(cfg.bind_address).is_loopback


def _scheme(cfg) -> str:
    return "https" if _behind_door(cfg) else "http"


def _door_listen(f: Files, door: str) -> Any:
    """The port the front door listens on for ``door`` (its server block in frontdoor.conf)."""
    found = re.search(rf"server {{  # {re.escape(door)}\n\s+listen (\d+) ssl;", f.frontdoor or "")
    return found.group(1) if found else _MISSING


def _gui(f: Files) -> str:
    port = f.cfg.chatbot_ui_port if f.cfg.frontend == "chatbot-ui" else f.cfg.textgen_port
    return f"{_scheme(f.cfg)}://{f.address}:{port}"


def _backstage_urls(f: Files) -> list:
    """The GUI and API URLs in app-config.local.yaml and the catalog, built from the settings."""
    cfg, gui = f.cfg, _gui(f)
    apis = {svc: f"{_scheme(cfg)}://{f.address}:{getattr(cfg, _API_PORT[svc])}" for svc in cfg.services if svc in _API_PORT}
    found = [
        ("ai_server.url", at(f.config, "ai_server", "url"), gui),
        ("csp frame-src", at(f.config, "backend", "csp", "frame-src"), ["'self'", gui]),
        ("csp connect-src", at(f.config, "backend", "csp", "connect-src"), ["'self'", *sorted(set(apis.values()))]),
        ("catalog System link", at(f.catalog, 0, "metadata", "links", 0, "url"), gui),
    ]
    for svc, url in apis.items():
        # With a key, Backstage's proxy comes first and targets the host.
        found.append((f"catalog {svc} API server", at(f.definitions, f"backchat-{svc}-api", "servers", -1, "url"), f"{url}/v1"))
        if cfg.api_key:
            found.append((f"proxy endpoint for {svc}", at(f.config, "proxy", "endpoints", f"/backchat-{svc}", "target"), url))
    return found


def _port(name: str):
    def places(f: Files) -> list:
        found = []
        value = str(getattr(f.cfg, name))
        for svc in f.cfg.services:
            for setting, index in _published(f.cfg, svc):
                if setting != name:
                    continue
                if f.frontdoor is not None:
                    door = _DOOR.get((svc, setting), svc)
                    found.append((f"front door listener for {door}", _door_listen(f, door), value))
                    published = at(f.compose, "services", "frontdoor", "ports")
                    found.append((f"front door publishes {door}", f"{f.cfg.bind_address}:{value}:{value}" in published, True))
                    continue
                entry = at(f.compose, "services", svc, "ports", index)
                host_port = entry.rsplit(":", 2)[1] if isinstance(entry, str) and entry.count(":") >= 2 else entry
                found.append((f"{svc} ports[{index}] host port", host_port, value))
        return found + _backstage_urls(f)

    return places


def _bind_address(f: Files) -> list:
    found = []
    for svc in [*f.cfg.services, "frontdoor"]:
        ports = at(f.compose, "services", svc, "ports")
        for index, entry in enumerate(ports if isinstance(ports, list) else []):
            bind = entry.rsplit(":", 2)[0] if isinstance(entry, str) and entry.count(":") >= 2 else entry
            found.append((f"{svc} ports[{index}] address", bind, f.cfg.bind_address))
    return found + _tls(f)


def _tls(f: Files) -> list:
    """Behind the front door only it publishes ports, and every URL is https."""
    behind = _behind_door(f.cfg)
    published = sorted(svc for svc, entry in f.compose["services"].items() if entry.get("ports"))
    return [
        ("front door runs", "frontdoor" in f.compose["services"], behind),
        ("services publishing ports", published, ["frontdoor"] if behind else sorted(f.cfg.services)),
    ] + _backstage_urls(f)


def _frontdoor_setting(pattern: str, name: str):
    def places(f: Files) -> list:
        if f.frontdoor is None:
            return []
        found = re.search(pattern, f.frontdoor)
        return [(f"frontdoor.conf {name}", found.group(1) if found else _MISSING, str(getattr(f.cfg, name)))]

    return places


def _image(service: str, name: str):
    def places(f: Files) -> list:
        if service not in f.compose["services"]:
            return []
        return [(f"services.{service}.image", at(f.compose, "services", service, "image"), getattr(f.cfg, name))]

    return places


def _backstage_origin(f: Files) -> list:
    if "localai" not in f.cfg.services:
        return []
    return [("LOCALAI_CORS_ALLOW_ORIGINS",
             at(f.compose, "services", "localai", "environment", "LOCALAI_CORS_ALLOW_ORIGINS"), f.cfg.backstage_origin)]


def _backstage_app_dir(f: Files) -> list:
    return [("catalog location target", at(f.config, "catalog", "locations", -1, "target"),
             f"{f.cfg.backstage_app_dir}/{backstage.CATALOG_FILE}")]


def _knob(name: str, localai_env: str, localai_key: str, flag: str):
    """threads / context_size: LocalAI's env and model YAML, llama.cpp's and textgen's flags."""

    def places(f: Files) -> list:
        cfg, svc = f.cfg, f.compose["services"]
        value = getattr(cfg, name) or THREADS_FROM_CORES  # threads None: one per physical core
        found = []
        if "localai" in cfg.services:
            found += [(localai_env, at(svc, "localai", "environment", localai_env), str(value)),
                      (f"LocalAI {localai_key}", at(f.model, localai_key), value)]
        if "llamacpp" in cfg.services:
            found.append((f"llamacpp {flag}", after(at(svc, "llamacpp", "command"), flag), str(value)))
        if "textgen" in cfg.services:
            found.append((f"textgen {flag}", after(at(svc, "textgen", "environment", "EXTRA_LAUNCH_ARGS"), flag), str(value)))
        return found

    return places


PLACES = {
    "backend": _services,
    "frontend": _services,
    "model_id": _model_id,
    "model_file": _model_file,
    "stack_dir": _stack_dir,
    "models_dir": _models_dir,
    "bind_address": _bind_address,
    "localai_port": _port("localai_port"),
    "chatbot_ui_port": _port("chatbot_ui_port"),
    "textgen_port": _port("textgen_port"),
    "textgen_api_port": _port("textgen_api_port"),
    "localai_image": _image("localai", "localai_image"),
    "chatbot_ui_image": _image("chatbot-ui", "chatbot_ui_image"),
    "textgen_image": _image("textgen", "textgen_image"),
    "llamacpp_image": _image("llamacpp", "llamacpp_image"),
    "frontdoor_image": _image("frontdoor", "frontdoor_image"),
    "tls": _tls,
    "proxy_timeout": _frontdoor_setting(r"proxy_read_timeout (\d+)s;", "proxy_timeout"),
    "backstage_origin": _backstage_origin,
    "public_address": _backstage_urls,
    "backstage_app_dir": _backstage_app_dir,
    "threads": _knob("threads", "LOCALAI_THREADS", "threads", "--threads"),
    "context_size": _knob("context_size", "LOCALAI_CONTEXT_SIZE", "context_size", "--ctx-size"),
    "localai_backend_archive": _localai_backend,
}
# Settings that name a directory on the host (their checks compare strings to system trees).
DIRECTORY_SETTINGS = {"stack_dir", "models_dir", "backstage_app_dir"}


# --- the property --------------------------------------------------------------------------


def check_refusal(name: str, value: Any, message: str) -> None:
    assert name in message, f"refusal of {name} = {value!r} does not name it:\n{message}"
    assert "Fix:" in message, f"refusal of {name} = {value!r} has no Fix:\n{message}"
    assert WHERE in message, f"refusal of {name} = {value!r} does not name the host:\n{message}"
    shown = message.replace(repr(value), "<value>")
    assert not LEAK.search(shown), f"refusal of {name} = {value!r} leaks an exception:\n{message}"


def check_round_trip(name: str, value: Any, cfg, data: dict, api_key) -> None:
    cleaned = getattr(cfg, name)
    again = getattr(validate({**data, name: cleaned}, where=WHERE, api_key=api_key), name)
    assert again == cleaned, f"{name} = {value!r} cleans to {cleaned!r}, which cleans to {again!r}"
    if name in DIRECTORY_SETTINGS:
        # What the check compared with the system trees must be what the kernel resolves:
        # "//etc" and "/opt/../etc" are /etc, but not "/etc" to a string comparison.
        canonical = "/" + posixpath.normpath(cleaned).lstrip("/")
        assert cleaned == canonical, f"{name} = {value!r} is accepted as {cleaned!r}, which the host reads as {canonical!r}"

    base = baseline(cfg.backend, cfg.frontend, api_key is not None)
    if reaches(name, base) and name not in PLACES:
        raise AssertionError(f"{name} reaches the rendered files but the test does not know where: add it to PLACES")
    files = render(cfg, name, base)  # a YAML error here: the value broke a file
    problems = []
    for where, found, expected in PLACES[name](files) if name in PLACES else []:
        if found != expected or type(found) is not type(expected):
            problems.append(f"{where}: {found!r} != {expected!r}")
    # The front door changes the layout on purpose: compare with the defaults' layout with
    # or without it, as this value has it.
    layout = baseline(cfg.backend, cfg.frontend, api_key is not None, door=_behind_door(cfg)).files
    for role, mine, theirs in (
        ("compose", files.compose, layout.compose),
        ("LocalAI model YAML", files.model, layout.model),
        ("app-config.local.yaml", files.config, layout.config),
        ("catalog", files.catalog, layout.catalog),
        ("OpenAPI definitions", files.definitions, layout.definitions),
    ):
        if shape(mine) != shape(theirs):
            problems.append(f"{role}: structure or types changed:\n    {shape(mine)}\n != {shape(theirs)}")
    for leaf in leaves(files.compose):
        if isinstance(leaf, str) and "$" in KEY_REF.sub("", leaf):
            problems.append(f"compose would interpolate {leaf!r}")
    for path in _host_paths(files):
        # A file the host cannot create is a value that never arrives (the run stops midway).
        if len(path.encode()) > PATH_MAX or any(len(part.encode()) > NAME_MAX for part in path.split("/")):
            problems.append(f"the host cannot create {path[:80]!r}... (over NAME_MAX {NAME_MAX} or PATH_MAX {PATH_MAX})")
    if files.env != base.files.env:
        problems.append(f".env changed: {files.env!r}")
    if name in base.reads["config"]:
        over_itself = backstage.render_config(files.texts["app-config.local.yaml"], cfg, files.address)
        if _load(over_itself) != files.config:
            problems.append("app-config.local.yaml changes when rendered over itself")
    assert not problems, f"{name} = {value!r} is accepted but does not round-trip:\n  " + "\n  ".join(problems)


NAME_MAX, PATH_MAX = 255, 4095  # Linux's limits on a file name and a path, in bytes


def _host_paths(files: Files) -> list[str]:
    """The files on the host the settings name: the rendered ones, the model, Backstage's."""
    cfg = files.cfg
    return [
        *(path for path in files.texts if path.startswith("/")),
        f"{cfg.models_dir}/{cfg.model_file}",
        f"{cfg.backstage_app_dir}/{backstage.CONFIG_FILE}.backchat.bak",
        f"{cfg.backstage_app_dir}/{backstage.CATALOG_FILE}",
    ]


def check_value(name: str, value: Any, combo: tuple[str, str] = COMBINATIONS[0], with_key: bool = True) -> None:
    backend, frontend = combo
    data = {"backend": backend, "frontend": frontend, name: value}
    api_key = Secret(KEY) if with_key else None
    try:
        cfg = validate(data, where=WHERE, api_key=api_key)
    except SettingsError as error:
        check_refusal(name, value, str(error))
        return
    except Exception as error:  # a traceback instead of a message
        raise AssertionError(
            f"{name} = {value!r}: validate raised {type(error).__name__}: {error} (not a SettingsError naming it)"
        ) from error
    check_round_trip(name, value, cfg, data, api_key)


# Known product bugs: setting -> why its tests fail today. Delete the entry when it is fixed
# (strict: the tests then XPASS, which fails).
KNOWN_BUGS: dict[str, str] = {}  # none open; the examples below are the ones this test found


def _known_bug(name: str) -> list:
    return [pytest.mark.xfail(strict=True, reason=f"known bug: {KNOWN_BUGS[name]}")] if name in KNOWN_BUGS else []


# The minimal example of each bug this test found (all fixed since: quoted YAML values,
# no IPv6 zones, "//" normalised, length limits, unencodable paths refused). Each is tried
# first by the tests of its setting, so a regression does not depend on the search.
KNOWN_BUG_EXAMPLES = [
    ("model_id", "true", COMBINATIONS[0]),
    ("model_id", "null", COMBINATIONS[0]),
    ("model_id", "4", COMBINATIONS[0]),
    ("model_id", "a" * 251, COMBINATIONS[0]),
    ("model_file", "4", COMBINATIONS[0]),
    ("model_file", "a" * 256, COMBINATIONS[1]),
    ("localai_image", "a:", COMBINATIONS[0]),
    ("localai_image", "1:2", COMBINATIONS[0]),
    ("chatbot_ui_image", "null", COMBINATIONS[0]),
    ("textgen_image", "1.5", COMBINATIONS[1]),
    ("llamacpp_image", "true", COMBINATIONS[2]),
    ("bind_address", 'fe80::1%"', COMBINATIONS[0]),
    ("bind_address", "::1%\n", COMBINATIONS[0]),
    ("stack_dir", "//etc/backchat", COMBINATIONS[0]),
    ("stack_dir", "/opt/" + "a" * 256, COMBINATIONS[0]),
    ("models_dir", "//tmp/x", COMBINATIONS[0]),
    ("backstage_app_dir", "//etc/x", COMBINATIONS[0]),
    ("api_key_file", "/x\ud800", COMBINATIONS[0]),
    ("report_path", "/x\ud800", COMBINATIONS[0]),
]


def _check_known_bug_examples(name: str) -> None:
    for pinned, value, combo in KNOWN_BUG_EXAMPLES:
        if pinned == name:
            check_value(name, value, combo)


@pytest.mark.parametrize("name", [pytest.param(setting.name, marks=_known_bug(setting.name)) for setting in SETTINGS])
def test_setting_is_refused_or_round_trips(name):
    """The property, searched by Hypothesis (for a setting with a known bug, after its pinned examples)."""
    _check_known_bug_examples(name)

    @PROPERTY
    @given(value=values_for(name), combo=st.sampled_from(combinations_for(name)), with_key=st.booleans())
    def search(value, combo, with_key):
        check_value(name, value, combo, with_key)

    search()


def _one_character_edits(name: str) -> list[str]:
    """Every special character inserted at the start, the middle and the end of a valid value."""
    edits = []
    for seed in VALID_SEEDS[name][:1]:  # the default, if it is a string
        for at in sorted({0, len(seed) // 2, len(seed)}):
            edits += [seed[:at] + char + seed[at:] for char in SPECIAL_CHARS]
    return edits


@pytest.mark.parametrize("name", [pytest.param(setting.name, marks=_known_bug(setting.name)) for setting in SETTINGS])
def test_listed_and_one_character_values(name):
    """Deterministic: the listed hostile values, and one-character edits of a valid value."""
    _check_known_bug_examples(name)
    failures = []
    for index, value in enumerate(LISTED + _one_character_edits(name)):
        try:
            check_value(name, value, COMBINATIONS[index % len(COMBINATIONS)], with_key=index % 2 == 0)
        except AssertionError as failure:
            failures.append(str(failure))
    assert not failures, f"{len(failures)} values fail, e.g.:\n\n" + "\n\n".join(failures[:5])


@pytest.mark.parametrize(
    "name, value, combo",
    [pytest.param(*case, marks=_known_bug(case[0]), id=f"{case[0]}={case[1]!r}"[:50]) for case in KNOWN_BUG_EXAMPLES],
)
def test_known_bug_example(name, value, combo):
    check_value(name, value, combo)


def test_lists_name_real_settings():
    """A renamed or removed setting must not leave its entries here unchecked."""
    assert set(PLACES) <= set(settings.BY_NAME)
    assert set(KNOWN_BUGS) <= set(settings.BY_NAME)
    assert set(KNOWN_BUGS) <= {case[0] for case in KNOWN_BUG_EXAMPLES}, "a pinned example per known bug"
    assert DIRECTORY_SETTINGS <= set(settings.BY_NAME)


@pytest.mark.parametrize("combo", COMBINATIONS, ids=lambda c: f"{c[0]}+{c[1]}")
@pytest.mark.parametrize("with_key", [False, True], ids=["nokey", "key"])
def test_places_hold_for_the_defaults(combo, with_key):
    """The oracle agrees with the defaults (so a failure above is the value's), and every
    setting the renderers read has its places listed."""
    base = baseline(*combo, with_key)
    read = set().union(*base.reads.values()) & set(settings.BY_NAME)
    assert read <= set(PLACES), f"settings that reach files with no places listed: {sorted(read - set(PLACES))}"
    assert {"backend", "model_id", "stack_dir", "bind_address"} <= read, "the read recording is broken"
    for name, places in PLACES.items():
        for where, found, expected in places(base.files):
            assert found == expected and type(found) is type(expected), (name, where, found, expected)
    for setting in SETTINGS:
        data = {"backend": combo[0], "frontend": combo[1]}
        check_round_trip(setting.name, getattr(base.files.cfg, setting.name), base.files.cfg, data,
                         base.files.cfg.api_key)
