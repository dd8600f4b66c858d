"""A real Backstage backend for tests, assembled from npm as create-app's packages/backend is.

The npm packages are pinned in tests/backstage_backend/package-lock.json and installed once
per lockfile under ``$BACKCHAT_TEST_CACHE/npm-backstage-backend/<hash>``:
``npm ci --ignore-scripts``, then ``npm rebuild better-sqlite3`` built from source against
the local Node headers (its prebuilt binaries are on GitHub, which CI cannot reach). The
other install scripts in the tree (core-js, protobufjs) only print banners and check
versions.

:class:`BackstageBackend` lays an app directory out like a create-app repository after
``yarn install`` (a root package.json with workspaces, ``packages/backend`` holding
backend.js, ``packages/app`` holding the stand-in frontend bundle, ``node_modules``: see
:func:`runtime_root`) and runs the backend in it on a free 127.0.0.1 port:

- ``configs=None``: no ``--config`` flag, as ``yarn start`` runs it (in packages/backend,
  NODE_ENV=development): Backstage reads app-config.yaml and app-config.local.yaml from
  the repository root (the nearest package.json with ``workspaces``).
- ``configs=[...]``: ``node packages/backend --config ... --config ...`` in the root with
  NODE_ENV=production, as create-app's Dockerfile runs it.

The test writes the config files, with the keys of :meth:`BackstageBackend.server_config`
(listen address and port, base URLs, the bundle, a static token: :data:`TOKEN`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from testbed import npm
from testbed.sandbox import flock

PROJECT = Path(__file__).resolve().parent / "backstage_backend"
CACHE = Path(os.environ.get("BACKCHAT_TEST_CACHE", "/var/cache/backchat-tests"))
INSTALL_BASE = CACHE / "npm-backstage-backend"
# What decides node_modules: the cache key is the hash of these files.
INSTALL_FILES = ("package.json", "package-lock.json")
# Copied into each app directory (not part of the install): the backend package and the
# stand-in frontend bundle, as packages/backend and packages/app of a create-app repository.
BACKEND_FILES = ("package.json", "backend.js")
APP_BUNDLE = PROJECT / "app"
NPM_CI = ("npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund")
NPM_REBUILD = ("npm", "rebuild", "better-sqlite3", "--foreground-scripts")
MIN_NODE = 20
LOCK_TIMEOUT = float(os.environ.get("BACKCHAT_TEST_LOCK_TIMEOUT", "1800"))
# The token tests send (backend.auth.externalAccess, type static; see server_config).
TOKEN = "backchat-tests-static-token-0f3a9c"
READY_PATH = "/.backstage/health/v1/readiness"
RUNTIME_MAX_AGE = 6 * 3600

# Measured durations (seconds) of the expensive phases, for the test module to print.
TIMINGS: dict[str, float] = {}


class BackendError(RuntimeError):
    pass


def _record(name: str, seconds: float) -> None:
    TIMINGS[name] = round(seconds, 1)
    print(f"[backstage backend] {name}: {seconds:.1f}s", flush=True)


# --- availability --------------------------------------------------------------------------


def missing_requirements() -> str | None:
    """Why the backend cannot run here, or None if it can."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        return f"the Backstage backend needs {' and '.join(missing)} on PATH (Node.js {MIN_NODE}+ with npm)"
    version = npm.version("node").lstrip("v")
    major = version.split(".")[0]
    if not major.isdigit() or int(major) < MIN_NODE:
        return f"the Backstage backend needs Node.js {MIN_NODE} or later, not {version or 'unknown'}"
    if node_dir() is None:
        return "better-sqlite3 is built from source and needs the Node.js headers (include/node/common.gypi)"
    return None


def node_dir() -> Path | None:
    """The prefix whose include/node holds the running Node's headers (npm's ``nodedir``).

    node-gyp otherwise downloads them from nodejs.org, which CI cannot reach.
    """
    candidates = []
    if os.environ.get("npm_config_nodedir"):
        candidates.append(Path(os.environ["npm_config_nodedir"]))
    node = shutil.which("node")
    if node:
        candidates.append(Path(node).resolve().parent.parent)
    candidates.append(Path("/usr"))
    for prefix in candidates:
        if (prefix / "include/node/common.gypi").is_file() and (prefix / "include/node/node_version.h").is_file():
            return prefix
    return None


# --- the npm install, cached per lockfile --------------------------------------------------


def _npm_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("npm_config_")}
    env.update(
        npm_config_update_notifier="false",
        npm_config_progress="false",
        # better-sqlite3: no prebuilt binary from GitHub; build against the local headers.
        npm_config_build_from_source="true",
        npm_config_nodedir=str(node_dir()),
    )
    return env


def _run_npm(cmd: Sequence[str], cwd: Path, timeout: float) -> float:
    started = time.monotonic()
    done = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_npm_env())
    if done.returncode != 0:
        raise BackendError(f"{' '.join(cmd)} in {cwd} exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return time.monotonic() - started


def npm_install() -> Path:
    """The cached install (package.json + node_modules) for the current lockfile."""
    why = missing_requirements()
    if why:
        raise BackendError(why)

    def build(directory: Path) -> dict:
        ci = _run_npm(NPM_CI, directory, timeout=1800)
        rebuild = _run_npm(NPM_REBUILD, directory, timeout=1800)
        check = subprocess.run(
            ["node", "-e", "const D = require('better-sqlite3'); console.log(new D(':memory:').prepare('select 41 + 1 as x').get().x)"],
            cwd=directory, capture_output=True, text=True, timeout=60,
        )
        if check.stdout.strip() != "42":
            raise BackendError(f"better-sqlite3 does not load after the build:\n{check.stdout}{check.stderr[-3000:]}")
        _record("backend npm ci (cold)", ci)
        _record("backend better-sqlite3 build from source", rebuild)
        return {"npm_ci_seconds": round(ci, 1), "better_sqlite3_build_seconds": round(rebuild, 1), "nodedir": str(node_dir())}

    install, built = npm.cached_install(PROJECT, INSTALL_FILES, INSTALL_BASE, build)
    if not built:
        TIMINGS.setdefault("backend npm install (cached)", 0.0)
    return install


# --- the runtime: node_modules with the workspaces linked in -------------------------------


def _runtime_key() -> str:
    digest = hashlib.sha256()
    files = [PROJECT / name for name in BACKEND_FILES]
    files += sorted(path for path in APP_BUNDLE.rglob("*") if path.is_file())
    for path in files:
        digest.update(str(path.relative_to(PROJECT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def runtime_root(install: Path) -> Path:
    """``<install>/runtime-<hash>``: a create-app repository's installed state, shared by
    every app directory (whose ``node_modules`` links here), built once per backend.js and
    stand-in bundle.

    Its ``node_modules`` is a hard-linked copy of the install (seconds; no extra space)
    with the workspace packages linked in, as yarn does: ``app`` -> packages/app (the
    bundle app-backend serves) and the backend package -> packages/backend (whose
    dependencies' schemas tell the logger which config values are secrets). Linking to the
    install itself would not do: Node resolves modules from their real paths, so both are
    looked for beside the real node_modules. A directory that exists under its name is
    complete (built aside, renamed into place under a lock).
    """
    final = install / f"runtime-{_runtime_key()}"
    if (final / "node_modules").is_dir():
        return final
    with flock(install / f"{final.name}.lock"):
        if (final / "node_modules").is_dir():
            return final
        shutil.rmtree(final, ignore_errors=True)
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=install))
        try:
            backend = tmp / "packages/backend"
            backend.mkdir(parents=True)
            for name in BACKEND_FILES:
                shutil.copy2(PROJECT / name, backend / name)
            shutil.copytree(APP_BUNDLE, tmp / "packages/app")
            modules = tmp / "node_modules"
            done = subprocess.run(["cp", "-al", str(install / "node_modules"), str(modules)], capture_output=True, text=True)
            if done.returncode != 0:  # hard links impossible here: copy
                shutil.rmtree(modules, ignore_errors=True)
                shutil.copytree(install / "node_modules", modules, symlinks=True)
            for workspace in (backend, tmp / "packages/app"):
                name = json.loads((workspace / "package.json").read_text())["name"]
                (modules / name).symlink_to(os.path.relpath(workspace, modules), target_is_directory=True)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _record("backend runtime (hard-linked node_modules + workspaces)", time.monotonic() - started)
    # Runtimes of other versions of the bundle: only inodes, but 40,000 of them each.
    # Old ones go (a run uses its runtime for minutes, not hours).
    for other in install.glob("runtime-*"):
        if other != final and other.is_dir() and time.time() - other.stat().st_mtime > RUNTIME_MAX_AGE:
            shutil.rmtree(other, ignore_errors=True)
            (install / f"{other.name}.lock").unlink(missing_ok=True)
    return final


# --- running it ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deep_merge(low: dict, high: dict) -> dict:
    """Backstage's merge: objects deep-merge, everything else (arrays too) replaces."""
    merged = copy.deepcopy(low)
    for key, value in high.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _die_with_parent() -> None:
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


# Printed by backend-app-api when a plugin fails to start; the process then keeps running
# (readiness answers 503 forever), so the harness watches for it.
STARTUP_FAILED = "Backend startup failed"
# Winston's colours (the development log format ignores NO_COLOR and FORCE_COLOR).
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Https:
    """The backend serves https (``backend.https.certificate``, read with ``$file``):
    its certificate and key (PEM files) and the CA file that verifies them."""

    cert: Path
    key: Path
    ca: Path


class BackstageBackend:
    """A Backstage backend serving the app in ``app_dir`` on ``127.0.0.1:<port>``, over
    http, or over https with ``https``.

    The test writes the config files into ``app_dir``, including the keys of
    :meth:`server_config`. Use as a context manager: starts, waits until ready, always
    stops. The backend's output goes to ``log_path`` (``app_dir/backend.log`` by default).
    """

    def __init__(
        self,
        app_dir: Path,
        configs: Sequence[str] | None = None,
        port: int | None = None,
        npm_root: Path | None = None,
        log_path: Path | None = None,
        ready_timeout: float = 240.0,
        env: dict[str, str] | None = None,
        https: Https | None = None,
    ) -> None:
        self.app_dir = Path(app_dir)
        self.configs = list(configs) if configs is not None else None
        self.port = port if port is not None else free_port()
        self.npm_root = npm_root
        self.log_path = Path(log_path) if log_path else self.app_dir / "backend.log"
        self.ready_timeout = ready_timeout
        self.extra_env = dict(env or {})
        self.https = https
        self.url = f"{'https' if https else 'http'}://127.0.0.1:{self.port}"
        self.ssl_context = ssl.create_default_context(cafile=str(https.ca)) if https else None
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.start_seconds: float | None = None

    @property
    def app_package(self) -> Path:
        return self.app_dir / "packages/app"

    def server_config(self, token: str = TOKEN) -> dict:
        """The app-config keys the harness relies on: where the backend listens (127.0.0.1
        only), the URLs it and the app bundle are served at (production-style: the backend
        serves the app), a static access token for the tests' API calls, and the
        certificate when it serves https."""
        config = {
            "app": {"baseUrl": self.url},
            "backend": {
                "baseUrl": self.url,
                "listen": {"host": "127.0.0.1", "port": self.port},
                "auth": {
                    "externalAccess": [
                        {"type": "static", "options": {"token": token, "subject": "backchat-tests"}},
                    ],
                },
            },
        }
        if self.https:
            config["backend"]["https"] = {
                "certificate": {"cert": {"$file": str(self.https.cert)}, "key": {"$file": str(self.https.key)}},
            }
        return config

    # -- the app directory, laid out like a create-app repository ---------------------------

    def prepare(self) -> None:
        """Lay ``app_dir`` out as a create-app repository after ``yarn install``: the root
        package.json with workspaces, packages/backend, packages/app, and ``node_modules``
        (a link to the shared :func:`runtime_root`, where the workspaces are linked in)."""
        runtime = runtime_root(self.npm_root or npm_install())
        app = self.app_dir
        package = app / "package.json"
        if not package.exists():
            package.write_text(json.dumps({"name": "root", "private": True, "workspaces": ["packages/*"]}, indent=2) + "\n")
        backend = app / "packages/backend"
        backend.mkdir(parents=True, exist_ok=True)
        for name in BACKEND_FILES:
            shutil.copy2(PROJECT / name, backend / name)
        if not self.app_package.exists():
            shutil.copytree(APP_BUNDLE, self.app_package)
        modules = app / "node_modules"
        if not modules.is_symlink() and not modules.exists():
            modules.symlink_to(runtime / "node_modules", target_is_directory=True)

    def command(self) -> tuple[list[str], Path, str]:
        """(argv, working directory, NODE_ENV)."""
        if self.configs is None:
            # yarn start: `backstage-cli package start` in packages/backend, no --config.
            return ["node", "backend.js"], self.app_dir / "packages/backend", "development"
        flags = [arg for config in self.configs for arg in ("--config", config)]
        # create-app's Dockerfile: CMD ["node", "packages/backend", "--config", ...] in /app.
        return ["node", "packages/backend", *flags], self.app_dir, "production"

    @property
    def mode(self) -> str:
        return "no --config, as yarn start" if self.configs is None else "--config " + " --config ".join(self.configs)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "BackstageBackend":
        if self.proc is not None:
            raise BackendError("already started")
        self.prepare()
        argv, cwd, node_env = self.command()
        env = {
            key: value
            for key, value in os.environ.items()
            # No config from the test runner's environment leaks into the backend.
            if not key.startswith(("APP_CONFIG_", "npm_")) and key not in ("BACKSTAGE_ENV", "NODE_OPTIONS", "NODE_PATH")
        }
        env.update(NODE_ENV=node_env, FORCE_COLOR="0", NO_COLOR="1", **self.extra_env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ cd {cwd} && NODE_ENV={node_env} {' '.join(argv)}\n".encode())
            log.flush()
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        return self

    def log(self) -> str:
        """The backend's output so far, without colour codes."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return _ANSI.sub("", text)

    def wait_ready(self) -> "BackstageBackend":
        """Poll the readiness endpoint until it answers 200 (every plugin started)."""
        if self.proc is None:
            raise BackendError("not started")
        deadline = time.monotonic() + self.ready_timeout
        last = "no answer"
        while True:
            if self.proc.poll() is not None:
                raise BackendError(f"the backend exited {self.proc.returncode} before it was ready:\n{self.log()[-5000:]}")
            if STARTUP_FAILED in self.log():
                raise BackendError(f"the backend did not start ({self.mode}):\n{self.log()[-5000:]}")
            try:
                with urllib.request.urlopen(self.url + READY_PATH, timeout=5, context=self.ssl_context) as response:
                    if response.status == 200:
                        self.start_seconds = time.monotonic() - self.started_at
                        _record(f"backend start ({self.mode})", self.start_seconds)
                        return self
                    last = f"HTTP {response.status}"
            except urllib.error.HTTPError as error:
                last = f"HTTP {error.code}"
            except OSError as error:
                last = repr(error)
            if time.monotonic() > deadline:
                raise BackendError(f"the backend on {self.url} is not ready after {self.ready_timeout:.0f}s ({last}):\n{self.log()[-5000:]}")
            time.sleep(1)

    def stop(self) -> None:
        """Stop the backend (its whole process group); SIGKILL if SIGTERM is not enough."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def __enter__(self) -> "BackstageBackend":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- HTTP --------------------------------------------------------------------------------

    def request(
        self, path: str, method: str = "GET", token: str | None = TOKEN, headers: dict[str, str] | None = None,
        body: bytes | None = None, timeout: float = 30,
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body); HTTP errors are answers too."""
        all_headers = dict(headers or {})
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.url + path, method=method, headers=all_headers, data=body)
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self.ssl_context) as response:
                return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
        except urllib.error.HTTPError as error:
            return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()

    def json(self, path: str, method: str = "GET", payload=None, token: str | None = TOKEN):
        body = json.dumps(payload).encode() if payload is not None else None
        headers = {"Content-Type": "application/json"} if body is not None else {}
        status, _, data = self.request(path, method=method, token=token, headers=headers, body=body)
        if status != 200:
            raise BackendError(f"{method} {path} answered {status}: {data[:2000]!r}")
        return json.loads(data)


# --- the browser's trust ----------------------------------------------------------------------

CERTUTIL = "certutil"
NO_CERTUTIL = "certutil is not installed (Debian package libnss3-tools)"


def trusting_home(ca: Path, home: Path) -> Path:
    """A HOME for headless Chromium that trusts ``ca`` for web sites: Chromium on Linux
    takes the trust anchors a user added from the NSS db in ``$HOME/.pki/nssdb`` (not
    from the system's store), so the handshakes are really verified against ``ca``."""
    if shutil.which(CERTUTIL) is None:
        raise BackendError(NO_CERTUTIL)
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True, mode=0o700)
    for argv in (["-N", "--empty-password"], ["-A", "-n", "backchat-test-ca", "-t", "C,,", "-i", str(ca)]):
        done = subprocess.run([CERTUTIL, "-d", f"sql:{db}", *argv], capture_output=True, text=True)
        if done.returncode != 0:
            raise BackendError(f"certutil {' '.join(argv)} exited {done.returncode}: {done.stderr}")
    return home


# --- app directories outside /tmp ----------------------------------------------------------

RUN_BASE = CACHE / "run" / "backstage-backend"


@contextlib.contextmanager
def app_directory() -> Iterator[Path]:
    """A fresh directory for one Backstage app, removed afterwards.

    Not under /tmp: backchat refuses ``backstage_app_dir`` inside system trees (/tmp,
    /var/tmp, ...), and the catalog location it writes names that very path. Directories
    left by test processes that no longer exist are swept first.
    """
    RUN_BASE.mkdir(parents=True, exist_ok=True)
    for other in RUN_BASE.iterdir():
        pid = other.name.split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(other, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=RUN_BASE))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
