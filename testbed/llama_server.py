"""A real OpenAI-compatible server for tests: Debian sid's ``llama-server``.

``llama-server`` comes from the ``llama.cpp-tools`` package of Debian sid,
installed in a ``debootstrap --variant=minbase sid`` root that is built once
and cached (see :func:`llama_root`).  Each :class:`LlamaServer` runs the server
chrooted into that root, inside its own private mount namespace
(``unshare --mount``): the namespace gets its own ``/proc``, a bind of the
host's ``/dev`` and a bind of a per-server directory holding a copy of the
model.  The shared root is never modified at run time, so several servers can
run at once, and every mount disappears with the server's process even if the
test process dies without cleaning up.

Needs root, ``debootstrap``, ``unshare``/``mount``/``chroot`` (util-linux,
coreutils) and network access to a Debian mirror for the first build.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Sequence

from testbed.sandbox import flock as _locked, mounts_under, remove_tree as _rmtree, unmount_under

CACHE = Path(os.environ.get("BACKCHAT_TEST_CACHE", "/var/cache/backchat-tests"))
DEFAULT_MIRROR = "http://deb.debian.org/debian"

SUITE = "sid"
VARIANT = "minbase"
PACKAGES = ("llama.cpp-tools",)
# Directory inside the root on which each server binds its own model directory.
MODEL_MOUNTPOINT = "/srv/backchat-models"
# Written inside the root once the build finished; records what was built.
INFO_PATH = "etc/backchat-root.json"

# Anything that changes what ends up in the root goes in the recipe: its hash
# names the cached root, so a changed recipe builds a new one.
RECIPE = {
    "suite": SUITE,
    "variant": VARIANT,
    "packages": list(PACKAGES),
    "install_recommends": False,
    "check_valid_until": False,
    "model_mountpoint": MODEL_MOUNTPOINT,
    "revision": 1,
}
_TAR_EXCLUDES = (
    "./proc/*",
    "./sys/*",
    "./dev/*",
    "./run/*",
    "./tmp/*",
    "./var/tmp/*",
    "./var/cache/apt/*",
    "./var/lib/apt/lists/*",
    "./var/log/apt/*",
)


class HarnessError(RuntimeError):
    pass


def mirror() -> str:
    return os.environ.get("BACKCHAT_DEBIAN_MIRROR", DEFAULT_MIRROR)


def recipe_hash() -> str:
    blob = json.dumps(RECIPE, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def root_name() -> str:
    return f"sid-llama-{recipe_hash()}"


def missing_requirements() -> str | None:
    """Why real llama-server hosts cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot, mount namespaces)"
    for tool in ("debootstrap", "unshare", "mount", "chroot", "tar"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


# --------------------------------------------------------------------------
# helpers


def _run(cmd: Sequence[str], log: Path | None = None, **kw) -> subprocess.CompletedProcess:
    """Run a command; on failure raise with the end of its output."""
    if log is not None:
        with open(log, "ab") as fh:
            fh.write(f"\n$ {shlex.join(map(str, cmd))}\n".encode())
            fh.flush()
            proc = subprocess.run(list(map(str, cmd)), stdout=fh, stderr=subprocess.STDOUT, **kw)
        if proc.returncode != 0:
            tail = log.read_bytes()[-4000:].decode(errors="replace")
            raise HarnessError(f"{shlex.join(map(str, cmd))} exited {proc.returncode}:\n{tail}")
        return proc
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise HarnessError(
            f"{shlex.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return proc


def _umount_all(path: Path) -> None:
    unmount_under(path)
    left = mounts_under(path)
    if left:
        raise HarnessError(f"could not unmount {left}")


def _chroot_env() -> dict[str, str]:
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
    }


# --------------------------------------------------------------------------
# the cached root


def _build_root(dest: Path, log: Path) -> dict:
    """Build the root in ``dest`` (which must not exist yet)."""
    t0 = time.monotonic()
    _run(
        ["debootstrap", f"--variant={VARIANT}", SUITE, dest, mirror()],
        log=log,
    )
    t_debootstrap = time.monotonic() - t0
    # No daemon may start from a maintainer script inside the chroot.
    policy = dest / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    (dest / "etc/apt/apt.conf.d/90backchat").write_text(
        'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n'
        # The mirror may be a frozen snapshot whose Release file has expired
        # (seen here: sid's InRelease "invalid since 18d"); debootstrap itself
        # does not check Valid-Until, apt does.
        'Acquire::Check-Valid-Until "false";\n'
    )
    (dest / MODEL_MOUNTPOINT.lstrip("/")).mkdir(parents=True, exist_ok=True)
    env = _chroot_env()
    _run(["mount", "-t", "proc", "proc", dest / "proc"], log=log)
    try:
        _run(["chroot", dest, "apt-get", "update"], log=log, env=env)
        _run(["chroot", dest, "apt-get", "install", "-y", *PACKAGES], log=log, env=env)
        _run(["chroot", dest, "apt-get", "clean"], log=log, env=env)
        version = subprocess.run(
            ["chroot", str(dest), "llama-server", "--version"],
            capture_output=True, text=True, env=env, timeout=60,
        )
        pkg_versions = subprocess.run(
            ["chroot", str(dest), "dpkg-query", "-W", "-f", "${Package} ${Version}\\n",
             *PACKAGES, "libllama0", "libggml0"],
            capture_output=True, text=True, env=env,
        )
    finally:
        _umount_all(dest / "proc")
    shutil.rmtree(dest / "var/lib/apt/lists", ignore_errors=True)
    (dest / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    info = {
        "recipe": RECIPE,
        "recipe_hash": recipe_hash(),
        "mirror": mirror(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - t0, 1),
        "debootstrap_seconds": round(t_debootstrap, 1),
        "llama_server_version": (version.stdout + version.stderr).strip(),
        "packages": dict(
            line.split(" ", 1) for line in pkg_versions.stdout.splitlines() if " " in line
        ),
    }
    (dest / INFO_PATH).write_text(json.dumps(info, indent=2) + "\n")
    return info


def llama_root() -> Path:
    """The cached sid root holding ``llama.cpp-tools``; built on first use.

    Lives at ``CACHE/roots/sid-llama-<recipehash>/``.  It is built in a
    temporary directory next to it and renamed into place under a lock, so a
    root that exists is complete, and concurrent callers build it only once.
    """
    roots = CACHE / "roots"
    final = roots / root_name()
    if (final / INFO_PATH).is_file():
        return final
    why = missing_requirements()
    if why:
        raise HarnessError(f"cannot build the llama root: {why}")
    with _locked(roots / f"{root_name()}.lock"):
        if (final / INFO_PATH).is_file():
            return final
        if final.exists():  # left by something else: never trust it
            _rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root_name()}.", dir=roots))
        log = roots / f"{root_name()}.build.log"
        log.write_text("")
        try:
            tmp.rmdir()  # debootstrap wants to create it
            _build_root(tmp, log)
            os.rename(tmp, final)
        except BaseException:
            _rmtree(tmp)
            raise
    return final


def root_info() -> dict:
    """What :func:`llama_root` recorded about the build (versions, timings)."""
    return json.loads((llama_root() / INFO_PATH).read_text())


def llama_server_version() -> str:
    return root_info()["llama_server_version"]


def llama_rootfs_tar() -> Path:
    """A cached tarball of :func:`llama_root`, suitable for ``docker import``.

    The contents of /proc, /sys, /dev, /run, /tmp and the apt caches are left
    out (the directories themselves are kept).
    """
    root = llama_root()
    out = CACHE / "roots" / f"{root_name()}.tar"
    if out.is_file():
        return out
    with _locked(CACHE / "roots" / f"{root_name()}.tar.lock"):
        if out.is_file():
            return out
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            cmd = ["tar", "-C", str(root), "--numeric-owner", "--xattrs", "--one-file-system"]
            cmd += [f"--exclude={pat}" for pat in _TAR_EXCLUDES]
            cmd += ["-cf", str(tmp), "."]
            _run(cmd)
            os.rename(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return out


# --------------------------------------------------------------------------
# servers


def _die_with_parent() -> None:
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _sweep_stale_rundirs(run_base: Path) -> None:
    """Remove run directories left by test processes that no longer exist."""
    for d in run_base.iterdir():
        pid = d.name.split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """``llama-server`` from the sid root, serving ``model`` on 127.0.0.1.

    Use as a context manager (starts, waits until ready, stops) or call
    :meth:`start` / :meth:`wait_ready` / :meth:`stop` yourself.  With
    ``start_delay`` the server process itself starts only that many seconds
    after :meth:`start`, so nothing listens on the port until then.
    """

    def __init__(
        self,
        model: Path,
        alias: str = "gpt-3.5-turbo",
        port: int | None = None,
        api_key: str | None = None,
        start_delay: float = 0.0,
        extra_args: Iterable[str] = (),
        ready_timeout: float = 120.0,
    ) -> None:
        self.model = Path(model)
        self.alias = alias
        self.port = port if port is not None else free_port()
        self.api_key = api_key
        self.start_delay = float(start_delay)
        self.extra_args = tuple(map(str, extra_args))
        self.ready_timeout = ready_timeout
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.rundir: Path | None = None
        self.log_path: Path | None = None
        self.started_at: float | None = None
        self.ready_after: float | None = None  # seconds from start() to ready

    # -- lifecycle ---------------------------------------------------------

    def command(self) -> list[str]:
        """The llama-server command line, as seen inside the root."""
        cmd = [
            "llama-server",
            "-m", f"{MODEL_MOUNTPOINT}/{self.model.name}",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--alias", self.alias,
        ]
        if self.api_key is not None:
            cmd += ["--api-key", self.api_key]
        return cmd + list(self.extra_args)

    def start(self) -> "LlamaServer":
        if self.proc is not None:
            raise HarnessError("already started")
        if not self.model.is_file():
            raise FileNotFoundError(self.model)
        root = llama_root()
        run_base = CACHE / "run" / "llama-server"
        run_base.mkdir(parents=True, exist_ok=True)
        _sweep_stale_rundirs(run_base)
        self.rundir = Path(
            tempfile.mkdtemp(prefix=f"{os.getpid()}-{self.port}-", dir=run_base)
        )
        models = self.rundir / "models"
        models.mkdir()
        shutil.copy2(self.model, models / self.model.name)
        self.log_path = self.rundir / "server.log"
        q = lambda p: shlex.quote(str(p))  # noqa: E731
        r = str(root)
        # All mounts are made in the server's private mount namespace.  The
        # shared root is bound read-only onto itself there, so no server can
        # change it; /tmp is a private tmpfs.
        script = "\n".join([
            "set -e",
            f"sleep {self.start_delay:.3f}" if self.start_delay > 0 else ":",
            f"mount --bind {q(r)} {q(r)}",
            f"mount -o remount,bind,ro {q(r)}",
            f"mount -t tmpfs -o size=64m,mode=1777 tmpfs {q(r + '/tmp')}",
            f"mount --bind {q(models)} {q(r + MODEL_MOUNTPOINT)}",
            f"mount -o remount,bind,ro {q(r + MODEL_MOUNTPOINT)}",
            f"mount -t proc proc {q(r + '/proc')}",
            f"mount --bind /dev {q(r + '/dev')}",
            f"exec chroot {q(r)} {shlex.join(self.command())}",
        ])
        log = open(self.log_path, "wb")
        try:
            self.started_at = time.monotonic()
            # unshare --kill-child takes the server down with unshare, and
            # PR_SET_PDEATHSIG takes unshare down with this process: a killed
            # test run leaves no server behind.
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--fork",
                 "--kill-child=SIGKILL", "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=_chroot_env(), start_new_session=True, preexec_fn=_die_with_parent,
            )
        except BaseException:
            log.close()
            self._cleanup_files()
            raise
        log.close()
        return self

    def log(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")
        return ""

    def wait_ready(self, timeout: float = 120.0) -> "LlamaServer":
        """Poll ``/health`` until it answers 200 (model loaded)."""
        if self.proc is None:
            raise HarnessError("not started")
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"llama-server exited {self.proc.returncode} before ready:\n{self.log()[-4000:]}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        if self.ready_after is None:
                            self.ready_after = time.monotonic() - (self.started_at or 0)
                        return self
                    last = f"HTTP {resp.status}"
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
            except (OSError, urllib.error.URLError) as e:
                last = repr(e)
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"llama-server on {self.url} not ready after {timeout}s ({last}):\n{self.log()[-4000:]}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Kill the server (its whole process group) and remove its files.

        The mounts live in the server's own mount namespace, so they go away
        with its processes; this still checks that none leaked into ours.
        """
        proc, self.proc = self.proc, None
        try:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            if proc is not None:
                # grandchildren (chroot'd llama-server) share the group
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        finally:
            self._cleanup_files()

    def _cleanup_files(self) -> None:
        if self.rundir is not None:
            with contextlib.suppress(HarnessError):
                _umount_all(self.rundir)
            shutil.rmtree(self.rundir, ignore_errors=True)
            self.rundir = None

    def __enter__(self) -> "LlamaServer":
        self.start()
        try:
            if self.start_delay <= 0:
                self.wait_ready(self.ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
