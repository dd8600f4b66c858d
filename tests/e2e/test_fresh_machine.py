"""Issue 12: the README's two set-up commands, verbatim, on a fresh Debian 13.

"Fresh" means debootstrap's minbase plus only what the README asks the user to have:
``python3`` and ``python3-venv`` (no pip, git, curl, compiler or Node). The commands are
read from README.md (the first ```sh block under "## Set-up"), so the README cannot change
without the commands still working. Each runs in its own throwaway copy of that root
(an overlay on a cached root), as root, with ``chroot``, from a copy of this checkout's
files as they are on disk (tracked plus untracked, not ignored: what ``git status`` sees),
with a minimal environment (PATH, HOME, LANG: none of this machine's settings, and never
BACKCHAT_REQUIRE_REALHOSTS; plus SSL_CERT_FILE only where this machine's network re-signs
TLS with a CA of its own, see network_ca_bundle).

- The deploy command targets ``@local``, i.e. the root itself. It has no systemd, so the
  deploy must refuse it (``start = True`` ... ``not systemd``) before changing anything.
  The test answers pyinfra's question with Enter (go ahead) only when the plan holds
  nothing but that refusal, and "n" otherwise; afterwards nothing outside the checkout
  may have changed in the root.
- The test command runs the whole suite inside the root, where nothing of what the
  real-host, Node or Vagrant tests need exists: those must skip, the rest must pass.

Each command runs in ``unshare --mount --pid --fork``: its mounts (overlay, /proc, /sys,
/dev, /etc/resolv.conf) exist only in a private mount namespace and vanish with it, however
the run ends, and PID 1 there is the command's shell, not this machine's init (so the
deploy sees a machine without systemd even where this one has it). The network is this
machine's: pip reaches PyPI as a user's would.

Needs root, debootstrap, util-linux (unshare, mount), chroot and git; marked ``realhost``,
so it skips elsewhere, or fails when BACKCHAT_REQUIRE_REALHOSTS=1 (CI).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testbed.sandbox import (
    CACHE,
    HOST_PATH,
    MIRROR,
    ROOTS_DIR,
    flock,
    mounts_under,
    remove_tree,
    sh,
)

PROJECT = Path(__file__).resolve().parents[2]
SUITE = "trixie"  # Debian 13
# What the README asks a user to install, and nothing more. minbase is Debian's smallest
# root (essential packages + apt); everything else a command needs must come from PyPI.
FRESH_PACKAGES = (
    "python3",
    "python3-venv",  # `python3 -m venv` (ensurepip's bundled pip); not in python3 itself
)
# No ca-certificates here: it is not an extra. python3-venv depends on it (python3.13-venv ->
# python3-pip-whl -> ca-certificates), because Debian's pip wheel trusts the system bundle
# (its certifi returns /etc/ssl/certs/ca-certificates.crt), so `apt install python3-venv`
# brings it and pip reaches PyPI over https without anything else.
# Bump when fresh_root's post-debootstrap steps change: it is part of the cache key.
FRESH_RECIPE_VERSION = 1
# Present on many machines, absent here: the commands must not rely on them.
ABSENT = ("usr/bin/pip3", "usr/bin/git", "usr/bin/curl", "usr/bin/gcc", "usr/bin/node", "usr/bin/sudo")

FRESH_DIR = CACHE / "fresh-machine"
CHECKOUT = "/root/backchat"  # where the user cloned the project
DEPLOY_TIMEOUT = 1800  # venv + pip install + plan (two shared cores: pip takes minutes)
TESTS_TIMEOUT = 3600  # venv + pip install with the test extras + the whole suite
# pyinfra 3's question before it changes anything. Enter goes ahead; any text typed
# ("n", but "y" too) aborts the run without executing anything.
PROMPT = "Press enter to execute..."
ASK_STALL = 60  # seconds of silence after the plan that count as being asked (another wording)
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# --------------------------------------------------------------------------- README


def _strip_comment(line: str) -> str:
    """Drop a shell comment: a ``#`` that starts a word outside quotes, as sh reads it."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
            elif ch == "\\" and quote == '"':
                continue
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_setup_commands(text: str) -> list[str]:
    """The commands of the first ```sh block in the "## Set-up" section, comments dropped."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("## Set-up")]
    assert starts, 'README.md has no "## Set-up" section'
    commands: list[str] = []
    in_block = False
    pending = ""
    for line in lines[starts[0] + 1 :]:
        if not in_block:
            if line.startswith("## "):
                break  # the next section: the Set-up section has no sh block
            if line.strip() == "```sh":
                in_block = True
            continue
        if line.strip() == "```":
            return commands
        if line.rstrip().endswith("\\"):  # a continued line
            pending += line.rstrip()[:-1] + " "
            continue
        command = _strip_comment(pending + line).strip()
        pending = ""
        if command:
            commands.append(command)
    raise AssertionError('README.md: no complete ```sh block in the "## Set-up" section')


def setup_commands() -> dict[str, str]:
    """{"deploy": ..., "tests": ...} as README.md spells them."""
    commands = readme_setup_commands((PROJECT / "README.md").read_text())
    deploy = [c for c in commands if "pyinfra" in c]
    tests = [c for c in commands if "pytest" in c]
    assert len(commands) == 2 and len(deploy) == 1 and len(tests) == 1, (
        f"README.md's set-up should be two commands, one running pyinfra, one pytest: {commands}"
    )
    return {"deploy": deploy[0], "tests": tests[0]}


def test_the_readme_set_up_is_two_commands():
    """Cheap and everywhere: the block the fresh-machine tests run is there and complete."""
    commands = setup_commands()
    assert "inventory.py deploy.py" in commands["deploy"], commands
    for command in commands.values():
        # A fresh Debian has no `pip` command (and refuses system-wide installs, PEP 668):
        # each command must make its own venv first.
        assert command.startswith("python3 -m venv "), command


# --------------------------------------------------------------------------- the root


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("BACKCHAT_REQUIRE_REALHOSTS") == "1":
        pytest.fail(f"BACKCHAT_REQUIRE_REALHOSTS=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _recipe() -> dict:
    return {
        "suite": SUITE,
        "mirror": MIRROR,
        "variant": "minbase",
        "include": sorted(FRESH_PACKAGES),
        "version": FRESH_RECIPE_VERSION,
    }


def fresh_root() -> tuple[Path, float | None]:
    """(root, seconds it took to build, None when cached): minbase + FRESH_PACKAGES.

    Cached under ROOTS_DIR by a hash of the recipe, built in a temporary directory under a
    file lock and renamed into place (as testbed/sandbox.py does), so a present
    directory is a complete root. Never changed afterwards: each command runs on an overlay.
    """
    digest = hashlib.sha256(json.dumps(_recipe(), sort_keys=True).encode()).hexdigest()
    dest = ROOTS_DIR / f"fresh-{SUITE}-{digest[:12]}"
    if dest.is_dir():
        return dest, None
    with flock(ROOTS_DIR / f"{dest.name}.lock"):
        if dest.is_dir():  # another process built it while we waited
            return dest, None
        for stale in ROOTS_DIR.glob(f".build-{dest.name}-*"):  # an interrupted build
            remove_tree(stale)
        build = Path(tempfile.mkdtemp(prefix=f".build-{dest.name}-", dir=ROOTS_DIR))
        started = time.monotonic()
        try:
            sh(
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(FRESH_PACKAGES)}",
                SUITE,
                build,
                MIRROR,
            )
            # debootstrap copies the build host's resolver; each run binds this machine's
            # over a plain file (never a symlink, which would resolve outside the root).
            (build / "etc/resolv.conf").unlink(missing_ok=True)
            (build / "etc/resolv.conf").write_text("# bound over at run time\n")
            (build / "etc/hostname").write_text("fresh\n")
            build.chmod(0o755)  # mkdtemp made it 0700
            os.rename(build, dest)
        except BaseException:
            remove_tree(build)
            raise
    return dest, time.monotonic() - started


@pytest.fixture(scope="module")
def root() -> Path:
    if shutil.which("git") is None or not (PROJECT / ".git").exists():
        _skip_or_fail("the fresh-machine test copies the checkout's files with git (a git checkout, git on PATH)")
    started = time.monotonic()
    path, built = fresh_root()
    if built is None:
        print(f"\n[timing] fresh {SUITE} root: cached ({time.monotonic() - started:.2f}s) {path}")
    else:
        print(f"\n[timing] fresh {SUITE} root: built cold in {built:.0f}s {path}")
    present = [name for name in ABSENT if (path / name).exists()]
    assert not present, f"the fresh root should not have {present}: it would hide what the commands need"
    return path


@pytest.fixture(scope="module")
def workspace() -> Path:
    """A directory for this run's overlays; what a crashed run left is removed first.

    One fresh-machine run at a time per machine (they are heavy): the lock is held until
    the module's tests are done.
    """
    FRESH_DIR.mkdir(parents=True, exist_ok=True)
    with flock(FRESH_DIR / "fresh.lock"):
        for stale in FRESH_DIR.iterdir():
            if stale.name != "fresh.lock":
                remove_tree(stale)
        run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=FRESH_DIR))
        try:
            yield run_dir
        finally:
            remove_tree(run_dir)


# --------------------------------------------------------------------------- checkout


def checkout_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files, as on disk (the lead's uncommitted work too)."""
    out = subprocess.run(
        ["git", "-C", str(PROJECT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=True,
    ).stdout.decode()
    names = sorted({name for name in out.split("\0") if name})
    return [name for name in names if os.path.lexists(PROJECT / name)]  # not deleted ones


def copy_checkout(dest: Path) -> int:
    count = 0
    for name in checkout_files():
        src, dst = PROJECT / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_file():
            shutil.copy2(src, dst)
        else:
            continue  # a submodule or other non-file entry
        count += 1
    return count


def network_ca_bundle() -> str:
    """CAs this machine's admin added (Debian: /usr/local/share/ca-certificates), PEM.

    Only for networks that intercept TLS (this CI's egress proxy re-signs PyPI with its own
    CA): the root shares this machine's network, so it must trust that network's CA, as a
    machine on that network would. Empty on an ordinary network, where nothing is added.
    """
    local = Path("/usr/local/share/ca-certificates")
    if not local.is_dir():
        return ""
    return "".join(path.read_text() for path in sorted(local.rglob("*.crt")) if path.is_file())


# --------------------------------------------------------------------------- running


# Runs as root in a new mount + PID namespace. Every mount is private to the namespace, so
# they all disappear with it, however the command ends (even if pytest is killed: unshare's
# --kill-child takes the namespace down with it). Read-only binds: the command must not
# write this machine's resolver.
_IN_NAMESPACE = r"""
set -eu
lower=$1 upper=$2 work=$3 root=$4 checkout=$5 command=$6
if [ -n "$lower" ]; then
    mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$root" || {
        echo "fresh-machine: overlayfs failed" >&2; exit 99; }
fi
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
mount --bind /etc/resolv.conf "$root/etc/resolv.conf"
mount -o remount,bind,ro "$root/etc/resolv.conf"
exec chroot "$root" /bin/sh -c 'cd "$1" && exec /bin/sh -c "$2"' sh "$checkout" "$command"
"""

NETWORK_CA = "run/fresh-machine-network-ca.pem"  # in the root, only when there is one
# What may change in the root besides the checkout (and its .venv): the user's caches and
# the controller's own state. With @local the root is also the controller, and the deploy
# keeps its API key there (README: api_key_file; generated once, 0600) from the first
# plan on, refused host or not.
API_KEY_FILE = "root/.config/backchat/api-key"
CONTROLLER_STATE = ("root/.cache", "tmp", API_KEY_FILE)


@dataclass
class Transcript:
    """A command's output (stdout and stderr interleaved) with when each part arrived."""

    started: float = field(default_factory=time.monotonic)
    chunks: list[tuple[float, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, chunk: bytes) -> None:
        with self.lock:
            self.chunks.append((time.monotonic() - self.started, chunk))

    @property
    def text(self) -> str:
        with self.lock:
            raw = b"".join(chunk for _, chunk in self.chunks)
        return ANSI.sub("", raw.decode(errors="replace"))

    def seconds_until(self, needle: str) -> float | None:
        """When the output first contained needle (seconds after the start), or None."""
        with self.lock:
            chunks = list(self.chunks)
        seen = b""
        for at, chunk in chunks:
            seen += chunk
            if needle.encode() in seen:
                return at
        return None

    def idle(self) -> float:
        """Seconds since the last output arrived."""
        with self.lock:
            last = self.chunks[-1][0] if self.chunks else 0.0
        return time.monotonic() - self.started - last

    def tail(self, chars: int = 6000) -> str:
        return self.text[-chars:]


@dataclass
class Run:
    command: str
    returncode: int
    seconds: float
    transcript: Transcript
    answer: str | None  # what was typed at pyinfra's question (None: not asked)
    changed: list[str] | None  # root paths changed outside the allowed ones (None: unknown)

    @property
    def output(self) -> str:
        return self.transcript.text


def _changed_paths(upper: Path, allowed: tuple[str, ...]) -> list[str]:
    """Paths an overlay's upper layer holds (written, created or deleted) outside allowed."""
    changed = []
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in dirnames + filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), upper)
            if any(rel == a or rel.startswith(a + "/") for a in allowed):
                continue
            if "__pycache__" in rel.split("/"):
                continue  # Python compiling a module it was shipped without: not the deploy
            if name in dirnames and any(a.startswith(rel + "/") for a in allowed):
                continue  # a parent of an allowed path (e.g. root/)
            changed.append(rel)
    return sorted(changed)


def run_fresh(
    lower: Path,
    run_dir: Path,
    command: str,
    timeout: float,
    answer_for=None,
) -> Run:
    """Run command verbatim (``sh -c``) in a fresh overlay of lower, cwd the checkout copy.

    answer_for(plan_text) -> str is called if pyinfra asks before changing anything; what
    it returns is typed (without it, stdin is closed).
    """
    upper, work, merged = run_dir / "upper", run_dir / "work", run_dir / "root"
    for sub in (upper, work, merged):
        sub.mkdir(parents=True)
    (upper / "root").mkdir(mode=0o700)
    files = copy_checkout(upper / CHECKOUT.lstrip("/"))
    env = {"PATH": HOST_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
    allowed = [CHECKOUT.lstrip("/"), *CONTROLLER_STATE]
    bundle = network_ca_bundle()
    if bundle:
        (upper / NETWORK_CA).parent.mkdir(parents=True, exist_ok=True)
        (upper / NETWORK_CA).write_text(bundle)
        env["SSL_CERT_FILE"] = f"/{NETWORK_CA}"  # see network_ca_bundle
        allowed.append(NETWORK_CA)
    # If pytest dies (SIGKILL, OOM) unshare dies with it (setpriv's parent-death signal),
    # and --kill-child then ends everything in the namespace, the command included.
    die_with_us = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
    argv = [
        *die_with_us, "unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
        "sh", "-c", _IN_NAMESPACE, "sh", str(lower), str(upper), str(work), str(merged), CHECKOUT, command,
    ]  # fmt: skip
    print(f"[fresh-machine] {files} checkout files -> {CHECKOUT}; env {sorted(env)}; $ {command}", flush=True)
    transcript = Transcript()
    proc = subprocess.Popen(
        argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def read() -> None:
        fd = proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            transcript.add(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    answer = None
    deadline = time.monotonic() + timeout
    try:
        if answer_for is None:
            proc.stdin.close()
        else:
            while proc.poll() is None and PROMPT not in transcript.text:
                if "--> Detected changes:" in transcript.text and transcript.idle() > ASK_STALL:
                    break  # waiting for an answer, in words we do not know: answer anyway
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(command, timeout)
                time.sleep(0.2)
            if proc.poll() is None:
                answer = answer_for(transcript.text)
                proc.stdin.write(answer.encode())
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # unshare; --kill-child takes its namespace
        proc.wait()
        reader.join(10)
        pytest.fail(f"{command!r} took over {timeout}s; output:\n{transcript.tail()}", pytrace=False)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(30)
    seconds = time.monotonic() - transcript.started
    if proc.returncode == 99 and "fresh-machine: overlayfs failed" in transcript.text:
        pytest.fail(f"overlayfs is needed for the throwaway roots:\n{transcript.tail()}", pytrace=False)
    left = mounts_under(run_dir)
    assert not left, f"mounts outlived the command's namespace: {left}"
    key = upper / API_KEY_FILE
    if key.exists():
        assert key.stat().st_mode & 0o077 == 0, f"the API key file is {oct(key.stat().st_mode)}, not 0600"
    return Run(command, proc.returncode, seconds, transcript, answer, _changed_paths(upper, tuple(allowed)))


def print_timings(label: str, run: Run) -> None:
    pip_started = run.transcript.seconds_until("Obtaining file://")
    pip_done = run.transcript.seconds_until("Successfully installed")
    parts = [f"total {run.seconds:.1f}s"]
    if pip_started is not None:
        parts.append(f"venv {pip_started:.1f}s")
    if pip_started is not None and pip_done is not None:
        parts.append(f"pip install {pip_done - pip_started:.1f}s")
    if pip_done is not None:
        parts.append(f"{label} {run.seconds - pip_done:.1f}s")
    print(f"[timing] {label} command: {', '.join(parts)}; exit status {run.returncode}", flush=True)


def _section(text: str, start: str, ends: tuple[str, ...]) -> str:
    at = text.find(start)
    if at < 0:
        return ""
    rest = text[at + len(start) :]
    stops = [i for i in (rest.find(end) for end in ends) if i >= 0]
    return rest[: min(stops)] if stops else rest


def planned_operations(output: str) -> list[str]:
    """The rows of pyinfra's "Detected changes" table (header dropped)."""
    table = _section(output, "--> Detected changes:", ("Detected changes may not", "Detected changes displayed", PROMPT))
    rows = [line.strip() for line in table.splitlines() if line.strip()]
    return [row for row in rows if not row.startswith("Operation ")]


# --------------------------------------------------------------------------- the tests


@pytest.mark.realhost
def test_the_deploy_command_on_a_fresh_debian_13(root, workspace):
    command = setup_commands()["deploy"]

    def answer(plan: str) -> str:
        # Go ahead (Enter) only when the plan is the refusal alone: running it fails the
        # host and changes nothing. Anything else would change the root (apt, Docker):
        # typing anything aborts the run.
        rows = planned_operations(plan)
        return "\n" if rows and all("Refuse this host" in row for row in rows) else "n\n"

    run = run_fresh(root, workspace / "deploy", command, DEPLOY_TIMEOUT, answer_for=answer)
    print_timings("pyinfra", run)
    out = run.output
    print(_section(out, "--> Detected changes:", ("\n    Detected changes may",)).rstrip())
    print("\n".join(out.rstrip().splitlines()[-8:]), flush=True)

    why = f"exit status {run.returncode}, typed {run.answer!r}; output:\n{run.transcript.tail()}"
    # pip installed the package and its dependencies from PyPI, with the machine's pip.
    assert re.search(r"^Successfully installed .*\bbackchat-", out, re.M), why
    assert re.search(r"^Successfully installed .*\bpyinfra-3\.", out, re.M), why
    # pyinfra ran the deploy against @local (the root) and showed its plan before acting.
    assert "[@local] Connected" in out and "--> Detected changes:" in out, why
    assert re.search(r"Will refuse: start = True, but this host's init is 'sh', not systemd", out), why
    assert planned_operations(out) and all("Refuse this host" in r for r in planned_operations(out)), why
    assert run.answer == "\n", why
    # Going ahead ran only the refusal: the host failed with the reason, the report names it.
    assert re.search(r"Refused: start = True, .*not systemd", out), why
    assert "--> Backchat report:" in out, why
    # A refused host is a failed run for scripts and shells alike.
    assert run.returncode == 1, why
    assert run.changed == [], f"the refused deploy changed the root outside the checkout: {run.changed}\n{why}"


@pytest.mark.realhost
def test_the_test_command_on_a_fresh_debian_13(root, workspace):
    command = setup_commands()["tests"]
    run = run_fresh(root, workspace / "tests", command, TESTS_TIMEOUT)
    print_timings("pytest", run)
    out = run.output
    finals = [line for line in out.splitlines() if re.fullmatch(r"=+ .* in [0-9.]+s( \(.*\))? =+", line.strip())]
    summary = finals[-1].strip("= ") if finals else "(no pytest summary)"
    short = _section(out, "short test summary info", ("\n" + (finals[-1] if finals else "\0"),)).strip("= \n")
    print(f"[fresh-machine] pytest in the fresh root: {summary}\n{short}", flush=True)
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)", summary)}
    problems = [line for line in short.splitlines() if line.startswith(("FAILED", "ERROR"))]
    # The exception lines of failures and collection errors (e.g. a module the test extras
    # do not install), once each: what the fresh machine lacked.
    causes = list(dict.fromkeys(
        line.strip() for line in out.splitlines() if re.match(r"E\s+\w+(Error|Exception|Failed):", line)
    ))[:30]
    why = (
        f"the README's test command in a fresh Debian 13: exit status {run.returncode}; "
        f"pytest summary: {summary}\n"
        + "".join(f"  {line}\n" for line in problems + causes)
        + f"output:\n{run.transcript.tail(12000)}"
    )
    assert re.search(r"^Successfully installed .*\bpytest-", out, re.M), why
    assert finals, why
    assert not (counts.get("failed") or counts.get("error") or counts.get("errors")), why
    assert counts.get("passed", 0) > 0, why
    assert run.returncode == 0, why
