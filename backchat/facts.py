"""What backchat needs to know about a host, read before anything changes.

pyinfra reads facts in its prepare phase and keeps no cache, so each fact is one cheap
command whose output a pure ``process`` turns into data (tested against fixed outputs).
"""

from __future__ import annotations

import base64
import json
import math
import re
import shlex

from pyinfra.api import FactBase

# --- physical cores --------------------------------------------------------------

# One line per item so the parser never depends on the host's locale or tool versions.
_CORES_SCRIPT = r"""
{ read -r online < /sys/devices/system/cpu/online; } 2>/dev/null
echo "online $online"
while read -r key value; do [ "$key" = Cpus_allowed_list: ] && echo "allowed $value"; done < /proc/self/status
for cpu in /sys/devices/system/cpu/cpu[0-9]*; do
  [ -d "$cpu/topology" ] || continue
  package= core=
  { read -r package < "$cpu/topology/physical_package_id"; read -r core < "$cpu/topology/core_id"; } 2>/dev/null
  echo "cpu ${cpu##*/cpu} $package $core"
done
cg=
while read -r line; do case $line in 0::*) cg=${line#0::};; esac; done 2>/dev/null < /proc/self/cgroup
dir="/sys/fs/cgroup${cg%/}"
while [ -n "$dir" ]; do
  [ -r "$dir/cpu.max" ] && read -r quota < "$dir/cpu.max" && echo "quota $quota"
  [ "$dir" = /sys/fs/cgroup ] && break
  dir=${dir%/*}
done
if [ -r /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then
  read -r quota < /sys/fs/cgroup/cpu/cpu.cfs_quota_us
  read -r period < /sys/fs/cgroup/cpu/cpu.cfs_period_us
  echo "quota $quota $period"
fi
# glibc counts the online list, read above; only without it ask getconf (a process)
[ -n "$online" ] || echo "logical $(getconf _NPROCESSORS_ONLN 2>/dev/null || nproc)"
"""


def parse_cpu_list(text: str) -> set[int]:
    """Kernel CPU list syntax: "0-3,8,10-11"."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if "-" in part:
            start, end = part.split("-", 1)
            cpus.update(range(int(start), int(end) + 1))
        else:
            cpus.add(int(part))
    return cpus


def count_physical_cores(lines: list[str]) -> dict:
    """Distinct (package, core) pairs among the CPUs this host lets us use.

    llama.cpp runs best with one thread per physical core: SMT siblings share the
    execution units, so counting logical CPUs oversubscribes them. A cgroup CPU quota
    caps the result, since more threads than the quota only contend for time slices.
    """
    online: set[int] | None = None
    allowed: set[int] | None = None
    topology: dict[int, tuple[str, str]] = {}
    quotas: list[float] = []
    logical = 0
    for line in lines:
        key, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if key == "online" and rest:
            online = parse_cpu_list(rest)
            logical = logical or len(online)
        elif key == "allowed" and rest:
            allowed = parse_cpu_list(rest)
        elif key == "cpu":
            fields = rest.split()
            if len(fields) == 3:
                topology[int(fields[0])] = (fields[1], fields[2])
        elif key == "quota":
            quota, _, period = rest.partition(" ")
            if quota not in ("max", "-1", "") and period:
                quotas.append(int(quota) / int(period))
        elif key == "logical" and rest.isdigit() and online is None:
            logical = int(rest)

    usable = set(topology) if topology else set()
    if online is not None:
        usable &= online
    if allowed is not None:
        usable &= allowed

    if usable:
        physical = len({topology[cpu] for cpu in usable})
        source = "topology"
    else:
        # No topology exported (some VMs and containers): logical CPUs is the best we know.
        physical = len(allowed) if allowed else max(logical, 1)
        source = "logical"

    quota_cpus = None
    if quotas:
        quota_cpus = max(1, math.ceil(min(quotas)))
        if quota_cpus < physical:
            physical = quota_cpus
            source = "quota"

    return {
        "physical": max(physical, 1),
        "logical": logical or len(usable) or physical,
        "quota_cpus": quota_cpus,
        "source": source,
    }


class PhysicalCores(FactBase):
    """
    Returns the physical cores this host may use, and how that was decided:

    .. code:: python

        {"physical": 8, "logical": 16, "quota_cpus": None, "source": "topology"}
    """

    def command(self) -> str:
        return _CORES_SCRIPT  # run by the shell pyinfra starts: no second one

    def process(self, output):
        return count_physical_cores(list(output))


# --- memory and disk -------------------------------------------------------------


class FreeDiskBytes(FactBase):
    """Returns free bytes on the filesystem that will hold ``path`` (which may not exist yet)."""

    def command(self, path: str) -> str:
        # Walk up to the nearest existing directory: on a fresh host the models dir is new.
        return (
            f"p={shlex.quote(path)}; while [ ! -d \"$p\" ]; do p=$(dirname \"$p\"); done; "
            "df -P -k \"$p\" | tail -n 1"
        )

    def process(self, output):
        for line in output:
            fields = line.split()
            if len(fields) >= 4 and fields[3].isdigit():
                return int(fields[3]) * 1024
        return None


class HostBasics(FactBase):
    """Returns what preflight checks, in one command: ID, VERSION_ID, VERSION_CODENAME and
    PRETTY_NAME from /etc/os-release, the dpkg architecture, the total memory in MB
    (``memory_mb``) and the name of PID 1 (``init``: ``systemd`` on a booted host; a shell or
    nothing in a chroot).

    Not pyinfra's ``server.LinuxDistribution`` + ``deb.DebArch`` + ``hardware.Memory``: three
    commands where one does; LinuxDistribution parses the release files in a temporary
    directory on the controller for every host, and Memory runs ``vmstat`` (procps), which
    minimal Debian and Ubuntu images do not have.
    """

    def command(self) -> str:
        return (
            # Builtins wherever they do: a lab's re-run runs this on every host.
            "{ while IFS= read -r line || [ -n \"$line\" ]; do printf '%s\\n' \"$line\"; done < /etc/os-release; } 2>/dev/null; "
            "echo ARCH=$(dpkg --print-architecture 2>/dev/null || uname -m); "
            "while read -r key value _; do [ \"$key\" = MemTotal: ] && echo \"MEMTOTAL_KB=$value\"; done < /proc/meminfo; "
            "{ read -r init < /proc/1/comm; } 2>/dev/null; echo \"INIT=$init\""
        )

    def process(self, output):
        info = {}
        for line in output:
            key, sep, value = line.partition("=")
            if sep:
                info[key.strip()] = value.strip().strip('"')
        memory = info.get("MEMTOTAL_KB", "")
        return {
            "id": info.get("ID", ""),
            "version_id": info.get("VERSION_ID", ""),
            "codename": info.get("VERSION_CODENAME", ""),
            "pretty_name": info.get("PRETTY_NAME", ""),
            "arch": info.get("ARCH", ""),
            "memory_mb": int(memory) // 1024 if memory.isdigit() else None,
            "init": info.get("INIT", ""),
        }


# --- the model file --------------------------------------------------------------


class ModelFile(FactBase):
    """
    Returns what is known of a model file without reading it: its size and mtime, the
    verification marker written after its sha256 was last checked, and the size of any
    partial download. Reading 4 GB to answer "is it there?" is what this avoids.
    """

    def command(self, path: str, marker: str) -> str:
        # One stat for both files and the marker read by builtins: a lab's re-run runs
        # this on every host. printf, not dash's echo, which would rewrite backslashes.
        path, marker, part = shlex.quote(path), shlex.quote(marker), shlex.quote(path + ".part")
        return (
            f"printf 'path %s\\n' {path}; stat -c 'stat %s %Y %n' -- {path} {part} 2>/dev/null; "
            f"m=; {{ while IFS= read -r line || [ -n \"$line\" ]; do m=\"$m$line\"; done < {marker}; }} 2>/dev/null; "
            "printf 'marker %s\\n' \"$m\""
        )

    def process(self, output):
        result = {"size": None, "mtime": None, "part_size": 0, "marker": None}
        path = None
        for line in output:
            key, _, rest = line.partition(" ")
            if key == "path":
                path = rest
            elif key == "stat":
                size, mtime, name = rest.split(" ", 2)
                if name == path:
                    result["size"], result["mtime"] = int(size), int(mtime)
                elif name == f"{path}.part":
                    result["part_size"] = int(size)
            elif key == "marker" and rest.strip():
                try:
                    result["marker"] = json.loads(rest)
                except ValueError:
                    result["marker"] = None
        return result


def text_of(lines: list[str] | None) -> str | None:
    """A file's text from pyinfra's ``FileContents`` lines (None: no file, or empty)."""
    return "\n".join(lines) + "\n" if lines else None


# --- the compose stack -----------------------------------------------------------

# The compose project every backchat container belongs to.
COMPOSE_PROJECT = "backchat"


def out_of_date(stack: dict | None, services: list[str]) -> list[str]:
    """Services whose container is missing, stopped, or built from another compose file."""
    known = (stack or {}).get("services", {})
    stale = []
    for name in services:
        entry = known.get(name, {})
        if not entry.get("have") or entry.get("have") != entry.get("want") or entry.get("state") != "running":
            stale.append(name)
    return stale


class ComposeStack(FactBase):
    """
    Returns, per service, whether the running container matches the compose file on disk:
    ``{"services": {"localai": {"want": hash, "have": hash, "state": "running"}},
    "published": [8080, 3001]}`` (the host ports the project's containers publish), or
    ``None`` when Docker or the project is not there yet.
    """

    def command(self, project_dir: str, project: str) -> str:
        project_dir, project = shlex.quote(project_dir), shlex.quote(project)
        label = "com.docker.compose"
        return (
            "command -v docker >/dev/null 2>&1 || exit 0; "
            f"[ -f {project_dir}/docker-compose.yaml ] || exit 0; "
            f"docker compose --project-directory {project_dir} -p {project} config --hash '*' "
            "2>/dev/null | sed 's/^/want /'; "
            f"docker ps -a --filter label={label}.project={project} --format "
            f"'have {{{{.Label \"{label}.service\"}}}} {{{{.Label \"{label}.config-hash\"}}}} "
            "{{.State}}' 2>/dev/null; "
            f"docker ps -a --filter label={label}.project={project} --format 'ports {{{{.Ports}}}}' 2>/dev/null; true"
        )

    def process(self, output):
        services: dict[str, dict] = {}
        published: set[int] = set()
        for line in output:
            fields = line.split()
            if fields[:1] == ["ports"]:  # "0.0.0.0:8080->8080/tcp, :::8080->8080/tcp"
                published.update(int(port) for port in re.findall(r":(\d+)->", line))
            elif len(fields) == 3 and fields[0] == "want":
                services.setdefault(fields[1], {})["want"] = fields[2]
            elif len(fields) == 4 and fields[0] == "have":
                entry = services.setdefault(fields[1], {})
                entry["have"], entry["state"] = fields[2], fields[3]
        return {"services": services, "published": sorted(published)} if services else None


class InstalledPackages(FactBase):
    """Returns which of ``names`` dpkg has installed, as ``{name: {versions}}``: what pyinfra's
    ``DebPackages`` says of them (state ``ii`` or ``hi``), asked of those names only.

    Why not ``DebPackages``: ``dpkg -l`` lists every package (most of a no-op re-run's bytes
    per host, 100 KB on a desktop install) and pyinfra parses each line on the controller,
    to answer a question about a dozen names.
    """

    default = dict
    requires_command = "dpkg-query"

    def command(self, names: list[str]) -> str:
        # Exit 1 is "some name is not installed", an answer; 2 and up is dpkg-query failing.
        return (
            "dpkg-query -W -f '${db:Status-Abbrev}|${Package}|${Version}\\n' -- "
            + " ".join(shlex.quote(name) for name in names)
            + " 2>/dev/null; [ $? -le 1 ]"
        )

    def process(self, output):
        installed: dict[str, set[str]] = {}
        for line in output:
            status, _, rest = line.partition("|")
            name, _, version = rest.partition("|")
            if status.strip() in ("ii", "hi") and name:
                installed.setdefault(name, set()).add(version.strip())
        return installed


class DockerImageTags(FactBase):
    """Returns the ``repo:tag`` names of the images the host's Docker has (empty without Docker)."""

    default = list

    def command(self) -> str:
        return (
            "command -v docker >/dev/null 2>&1 || exit 0; "
            "docker image ls --format '{{.Repository}}:{{.Tag}}' 2>/dev/null; true"
        )

    def process(self, output):
        return sorted({line.strip() for line in output if line.strip()})


# --- ports and users ---------------------------------------------------------------


class ListeningPorts(FactBase):
    """
    Returns the TCP ports something listens on, with the process when the host can tell:
    ``{8080: "docker-proxy", 22: "sshd", 3001: ""}``. Read with ``ss`` (iproute2), or from
    ``/proc/net/tcp*`` on hosts without it (no process names there).
    """

    default = dict

    def command(self) -> str:
        return (
            "if command -v ss >/dev/null 2>&1; then ss -Htlnp 2>/dev/null | sed 's/^/ss /'; "
            "else cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | sed 's/^/proc /'; fi"
        )

    def process(self, output):
        ports: dict[int, str] = {}
        for line in output:
            fields = line.split()
            if fields[:1] == ["ss"] and len(fields) >= 5:
                port = fields[4].rsplit(":", 1)[-1]
                name = line.split('(("', 1)[1].split('"', 1)[0] if '(("' in line else ""
                if port.isdigit():
                    ports[int(port)] = ports.get(int(port)) or name
            elif fields[:1] == ["proc"] and len(fields) > 4 and fields[4] == "0A":  # 0A: LISTEN
                port = int(fields[2].rsplit(":", 1)[-1], 16)
                ports.setdefault(port, "")
        return ports


class MissingUsers(FactBase):
    """Returns which of the given user names have no account on the host."""

    default = list

    def command(self, names: list[str]) -> str:
        quoted = " ".join(shlex.quote(name) for name in names)
        return f"for name in {quoted}; do getent passwd \"$name\" >/dev/null || echo \"$name\"; done"

    def process(self, output):
        return [line.strip() for line in output if line.strip()]


class ComposeProject(FactBase):
    """
    Returns what Docker holds of one compose project, found by its label (no compose file
    needed): ``{"docker": "ok", "containers": [{"service", "image", "state", "status",
    "health"}], "volumes": [...], "networks": [...]}``. ``docker`` is ``"missing"`` without
    the CLI, or ``"unreachable: <why>"`` when the daemon does not answer.
    """

    def command(self, project: str) -> str:
        label = shlex.quote(f"label=com.docker.compose.project={project}")
        row = (
            '{"service":{{json (.Label "com.docker.compose.service")}},"image":{{json .Image}},'
            '"state":{{json .State}},"status":{{json .Status}}}'
        )
        return (
            "command -v docker >/dev/null 2>&1 || { echo missing; exit 0; }; "
            f"out=$(docker ps -a --filter {label} --format {shlex.quote(row)} 2>&1) || "
            '{ echo "unreachable $(printf %s "$out" | tail -n 1)"; exit 0; }; '
            'echo ok; printf "%s\\n" "$out" | sed -n "s/^{/container {/p"; '
            f"docker volume ls -q --filter {label} 2>/dev/null | sed 's/^/volume /'; "
            f"docker network ls -q --filter {label} 2>/dev/null | sed 's/^/network /'; true"
        )

    def process(self, output):
        return parse_compose_project(list(output))


def container_health(status: str) -> str | None:
    """``docker ps``'s health word in its Status column: healthy, unhealthy, starting, or None."""
    for word, health in (("(healthy)", "healthy"), ("(unhealthy)", "unhealthy"), ("(health: starting)", "starting")):
        if word in status:
            return health
    return None


def parse_compose_project(lines: list[str]) -> dict:
    result: dict = {"docker": "missing", "containers": [], "volumes": [], "networks": []}
    for line in lines:
        key, _, rest = line.strip().partition(" ")
        if key in ("ok", "missing"):
            result["docker"] = key
        elif key == "unreachable":
            result["docker"] = f"unreachable: {rest.strip() or 'the Docker daemon did not answer'}"
        elif key == "container":
            try:
                row = json.loads(rest)
            except ValueError:
                continue
            row["health"] = container_health(row.get("status", ""))
            result["containers"].append(row)
        elif key in ("volume", "network") and rest.strip():
            result[f"{key}s"].append(rest.strip())
    result["containers"].sort(key=lambda row: row.get("service", ""))
    return result


# Classifies paths under one of our directories, or (mode "remove") removes the files and
# empty directories among them. A path is never followed through a symlink: one that is a
# link, or lies under a link below the root (or the root itself is a link), is "link" or
# "unsafe" and left alone. Arguments: mode, root, then paths relative to root ("." is the root).
OWN_PATHS_SCRIPT = r"""
mode=$1; root=$2; shift 2
if [ -L "$root" ]; then echo "unsafe ."; exit 0; fi
[ -d "$root" ] || exit 0
for rel in "$@"; do
  p=$root; rest=$rel; safe=1
  while [ "${rest#*/}" != "$rest" ]; do
    p=$p/${rest%%/*}; rest=${rest#*/}
    if [ -L "$p" ]; then safe=0; break; fi
  done
  if [ "$rel" = . ]; then t=$root; else t=$root/$rel; fi
  if [ $safe = 0 ]; then echo "unsafe $rel"
  elif [ -L "$t" ]; then echo "link $rel"
  elif [ -f "$t" ]; then
    if [ "$mode" = remove ]; then rm -f -- "$t" || exit 1; fi
    echo "file $rel"
  elif [ -d "$t" ]; then
    if [ "$mode" = remove ]; then rmdir -- "$t" 2>/dev/null && echo "emptydir $rel" || echo "dir $rel"
    elif [ -z "$(ls -A -- "$t")" ]; then echo "emptydir $rel"
    else echo "dir $rel"; fi
  elif [ -S "$t" ]; then
    if [ "$mode" = remove ]; then rm -f -- "$t" || exit 1; fi
    echo "socket $rel"
  elif [ -e "$t" ]; then echo "other $rel"
  fi
done
"""


class OwnPaths(FactBase):
    """
    Returns what each of ``paths`` (relative to our directory ``root``) is, without following
    a symlink: ``{"models/x.yaml": "file", "bin": "emptydir", ".": "dir", "y": "link"}``
    (also ``socket``: one of our servers' sockets; ``unsafe``: under a link; ``other``: a
    device or fifo). Missing paths are left out.
    """

    default = dict

    def command(self, root: str, paths: list[str]) -> str:
        quoted = " ".join(shlex.quote(path) for path in paths)
        return f"sh -c {shlex.quote(OWN_PATHS_SCRIPT)} own-paths list {shlex.quote(root)} {quoted}"

    def process(self, output):
        found = {}
        for line in output:
            kind, _, rel = line.strip().partition(" ")
            if rel:
                found[rel] = kind
        return found


# --- the files and directories a step writes -------------------------------------------

# Every path in one ``stat`` (which never follows a link at the path), every regular file
# in one ``sha256sum``: a few processes however many paths, not a few per path (on a fleet
# the hosts' forks are most of a re-run's time). Arguments: the number of paths whose text
# is wanted too, then those paths, then the others. A text comes base64-encoded (exact
# bytes); a link's is its target's, when that is a file (a config may be a link to the real one).
PATH_STATES_SCRIPT = r"""
read=$1; shift
stat -c 'stat %F|%a|%U|%G|%n' -- "$@" 2>/dev/null
for p in "$@"; do
  [ "$read" -gt 0 ] && [ -f "$p" ] && echo "text $(base64 -w 0 < "$p") $p"
  read=$((read - 1))
  shift
  [ -f "$p" ] && [ ! -L "$p" ] && set -- "$@" "$p"
done
[ $# -eq 0 ] || sha256sum -- "$@" 2>/dev/null
exit 0
"""


class PathStates(FactBase):
    """
    Returns what each of ``paths`` is, read in one command without following a link at
    the path: ``{"/opt/backchat/.env": {"kind": "file", "mode": "600", "user": "root",
    "group": "root", "sha256": "..."}}``; ``kind`` is also ``directory``, ``link`` or
    ``other``. Missing paths are left out. The files in ``texts`` also carry their ``text``.
    """

    default = dict

    def command(self, paths: list[str], texts: list[str] = ()) -> str:
        ordered = [*texts, *(path for path in paths if path not in texts)]
        quoted = " ".join(shlex.quote(path) for path in ordered)
        return f"set -- {len(texts)} {quoted}\n{PATH_STATES_SCRIPT}"  # in pyinfra's shell: no second one

    def process(self, output):
        return parse_path_states(list(output))


_KINDS = {"regular file": "file", "regular empty file": "file", "directory": "directory", "symbolic link": "link"}


def parse_path_states(lines: list[str]) -> dict[str, dict]:
    found: dict[str, dict] = {}
    texts: dict[str, str | None] = {}
    sums: dict[str, str] = {}
    for line in lines:
        word, _, rest = line.partition(" ")
        if word == "stat":
            fields = rest.split("|", 4)
            if len(fields) == 5:
                kind, mode, user, group, path = fields
                kind = _KINDS.get(kind, "other")
                owned = kind in ("file", "directory")
                found[path] = {"kind": kind, "mode": mode if owned else None, "user": user if owned else None,
                               "group": group if owned else None, "sha256": None}
        elif word == "text":
            encoded, _, path = rest.partition(" ")
            try:
                texts[path] = base64.b64decode(encoded).decode()
            except (ValueError, UnicodeDecodeError):
                texts[path] = None  # not text: treated as a file to replace
        elif len(word) == 64 and rest.startswith(" "):  # sha256sum: "<sum>  <path>"
            sums[rest[1:]] = word
    for path, entry in found.items():
        if entry["kind"] == "file":
            entry["sha256"] = sums.get(path)
        if path in texts:
            entry["text"] = texts[path]
    return found


# --- LocalAI's backend, unpacked from the controller's archive -------------------------


class UnpackedBackend(FactBase):
    """
    Returns ``{"sha256": <the archive's sha256 the marker records, or None>, "run": <the
    backend's run.sh is a regular file>}`` for backend ``backend`` under ``base``.
    """

    def command(self, base: str, backend: str) -> str:
        marker, run = shlex.quote(f"{base}/.{backend}.sha256"), shlex.quote(f"{base}/{backend}/run.sh")
        return (
            f"echo \"sha256 $(cat {marker} 2>/dev/null | head -n 1)\"; "
            f"if [ -f {run} ] && [ ! -L {run} ]; then echo run yes; else echo run no; fi"
        )

    def process(self, output):
        result = {"sha256": None, "run": False}
        for line in output:
            key, _, rest = line.strip().partition(" ")
            if key == "sha256" and rest.strip():
                result["sha256"] = rest.strip()
            elif key == "run":
                result["run"] = rest.strip() == "yes"
        return result


class VerifiedModels(FactBase):
    """
    Returns ``{file name: size in bytes, or None when the file itself is gone}`` for every
    model fetch-model.sh verified in ``models_dir`` (each left a ``.<name>.verified``
    marker there). A link is neither followed nor counted.
    """

    default = dict

    def command(self, models_dir: str) -> str:
        return (
            f"d={shlex.quote(models_dir)}; [ -d \"$d\" ] && [ ! -L \"$d\" ] || exit 0; "
            # A glob and one stat, not find and a stat per model: a lab's re-run runs this
            # on every host.
            "set --; for m in \"$d\"/.*.verified; do [ -f \"$m\" ] && [ ! -L \"$m\" ] || continue; "
            "n=${m##*/}; n=${n#.}; n=${n%.verified}; "
            "if [ -f \"$d/$n\" ] && [ ! -L \"$d/$n\" ]; then set -- \"$@\" \"$d/$n\"; else printf 'model - %s\\n' \"$n\"; fi; done; "
            "[ $# -eq 0 ] || stat -c 'size %s %n' -- \"$@\""
        )

    def process(self, output):
        found = {}
        for line in output:
            key, _, rest = line.strip().partition(" ")
            size, _, name = rest.partition(" ")
            if key == "model" and name:
                found[name] = None
            elif key == "size" and size.isdigit() and name:
                found[name.rpartition("/")[2]] = int(size)
        return found


_VERIFIED_STATE_SCRIPT = (
    'sha() { if [ -f "$1" ] && [ ! -L "$1" ]; then sha256sum <"$1" | cut -c1-64; else echo -; fi; }; '
    'd=$1; shift; for f do echo "live $(sha "$f") $f"; done; '
    '[ -d "$d" ] && [ ! -L "$d" ] || exit 0; '
    'cd "$d" && find . -type f | while IFS= read -r s; do echo "saved $(sha "$s") $(sha "${s#.}") ${s#.}"; done'
)


class VerifiedState(FactBase):
    """
    Returns a host's last verified state (backchat/rollout.py) against its files now:
    ``{"/opt/backchat/.env": {"saved": sha256 or None, "live": sha256 or None}}`` for every
    file kept in ``directory`` and every one of ``paths``. No link is followed.
    """

    default = dict

    def command(self, directory: str, paths: list[str]) -> str:
        quoted = " ".join(shlex.quote(path) for path in paths)
        return f"sh -c {shlex.quote(_VERIFIED_STATE_SCRIPT)} verified-state {shlex.quote(directory)} {quoted}"

    def process(self, output):
        found: dict[str, dict] = {}
        for line in output:
            kind, _, rest = line.partition(" ")
            fields = rest.split(" ", 2 if kind == "saved" else 1)
            if kind == "live" and len(fields) == 2:
                found.setdefault(fields[1], {"saved": None, "live": None})["live"] = None if fields[0] == "-" else fields[0]
            elif kind == "saved" and len(fields) == 3:
                saved, live, path = (None if value == "-" else value for value in fields)
                found[path] = {"saved": saved, "live": live}
        return found


# --- several facts in one command ----------------------------------------------------

_PART = "@@backchat-fact"


def _command_text(command) -> str:
    return command if isinstance(command, str) else command.get_raw_value()


class Together(FactBase):
    """
    Returns each of ``facts`` (pairs of a fact class and its keyword arguments), read in one
    command, as a list of ``(read, value)``: ``value`` is what the fact alone returns when
    ``read``; a part whose command failed, or needs a program the host lacks (pyinfra's
    ``requires_command``), is ``(False, None)``, to be read alone so pyinfra says why.

    Why: on a fleet every command is an SSH session each host's sshd starts, on the hosts'
    CPUs; a no-op re-run reads five things before it knows it has nothing to do.
    """

    default = list

    def command(self, facts: list) -> str:
        parts = []
        for index, (cls, kwargs) in enumerate(facts):
            fact = cls()
            run = f"( {_command_text(fact.command(**kwargs))}\n) 2>/dev/null; echo \"{_PART} {index} $?\""
            needs = fact.requires_command(**kwargs) if callable(fact.requires_command) else fact.requires_command
            if needs:
                run = f"if command -v {_command_text(needs)} >/dev/null 2>&1; then {run}; else echo '{_PART} {index} missing'; fi"
            parts.append(run)
        return "\n".join(parts)

    def process(self, output):
        return list(output)

    @staticmethod
    def values(facts: list, lines: list[str]) -> list[tuple[bool, object]]:
        """``process``'s lines, split per fact and given to that fact's own ``process``."""
        found, part = {}, []
        for line in lines:
            if line.startswith(f"{_PART} "):
                _, index, status = line.split(" ", 2)
                if index.isdigit():
                    found[int(index)] = (status == "0", part)
                part = []
            else:
                part.append(line)
        values = []
        for index, (cls, kwargs) in enumerate(facts):
            read, lines_of_fact = found.get(index, (False, []))
            fact = cls()
            fact.command(**kwargs)  # as pyinfra does first: some facts keep state for process (FileContents)
            values.append((read, (fact.process(lines_of_fact) if lines_of_fact else fact.default()) if read else None))
        return values
