"""The physical-core fact and the other facts' parsers, on fixed outputs and on this machine."""

import hashlib
import subprocess

import psutil
import pytest
from pyinfra.api import FactBase
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import FileContents

from backchat.facts import (
    ComposeStack,
    FreeDiskBytes,
    HostBasics,
    InstalledPackages,
    ModelFile,
    PathStates,
    PhysicalCores,
    Together,
    count_physical_cores,
    parse_cpu_list,
    parse_path_states,
)


def topology(pairs, online=None, allowed=None, quotas=(), logical=None):
    """Fact output for CPUs given as (package, core) pairs, CPU number = list index."""
    lines = []
    if online is not None:
        lines.append(f"online {online}")
    if allowed is not None:
        lines.append(f"allowed {allowed}")
    lines += [f"cpu {cpu} {package} {core}" for cpu, (package, core) in enumerate(pairs)]
    lines += [f"quota {quota}" for quota in quotas]
    lines.append(f"logical {logical if logical is not None else len(pairs)}")
    return lines


# 4 cores with SMT: siblings are cpu N and N+4, as Linux numbers them on x86.
SMT_4C8T = [(0, core) for core in range(4)] * 2
TWO_SOCKETS = [(package, core) for package in (0, 1) for core in range(4)] * 2


@pytest.mark.parametrize(
    "lines, physical, source",
    [
        (topology(SMT_4C8T, online="0-7", allowed="0-7"), 4, "topology"),
        (topology([(0, c) for c in range(4)], online="0-3", allowed="0-3"), 4, "topology"),  # SMT off
        (topology(TWO_SOCKETS, online="0-15", allowed="0-15"), 8, "topology"),  # core ids repeat per socket
        (topology(SMT_4C8T, online="0-2,4-6", allowed="0-7"), 3, "topology"),  # cpu 3 and 7 offline
        (topology(SMT_4C8T, online="0-7", allowed="0,4"), 1, "topology"),  # pinned to one core's threads
        (topology(SMT_4C8T, online="0-7", allowed="0-7", quotas=["200000 100000"]), 2, "quota"),
        (topology(SMT_4C8T, online="0-7", allowed="0-7", quotas=["150000 100000"]), 2, "quota"),  # 1.5 -> 2
        (topology(SMT_4C8T, online="0-7", allowed="0-7", quotas=["max 100000"]), 4, "topology"),
        # The tightest quota along the cgroup path wins.
        (topology(SMT_4C8T, online="0-7", quotas=["max 100000", "100000 100000"]), 1, "quota"),
        (topology(SMT_4C8T, online="0-7", quotas=["-1 100000"]), 4, "topology"),  # cgroup v1: no limit
        # A quota above the core count changes nothing.
        (topology(SMT_4C8T, online="0-7", quotas=["1600000 100000"]), 4, "topology"),
        # No topology exported: fall back to the CPUs we may use.
        (["online 0-5", "allowed 0-5", "logical 6"], 6, "logical"),
        (["logical 3"], 3, "logical"),
    ],
)
def test_core_count_table(lines, physical, source):
    result = count_physical_cores(lines)
    assert (result["physical"], result["source"]) == (physical, source)


def test_logical_count_is_reported_too():
    result = count_physical_cores(topology(SMT_4C8T, online="0-7", allowed="0-7"))
    assert result["logical"] == 8 and result["quota_cpus"] is None


def test_the_logical_count_is_the_online_list_when_the_host_has_one():
    # The fact asks getconf only where /sys/devices/system/cpu/online is unreadable.
    assert count_physical_cores(["online 0-5"])["logical"] == 6
    assert count_physical_cores(["online 0-5", "logical 9"])["logical"] == 6
    assert count_physical_cores(["logical 3"])["logical"] == 3


def test_core_fact_counts_logical_cpus_as_psutil_does_on_this_machine():
    assert run_fact_here(PhysicalCores())["logical"] == psutil.cpu_count(logical=True)


def test_cpu_list_syntax():
    assert parse_cpu_list("0-3,8,10-11") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpu_list("") == set()


def run_fact_here(fact, **kwargs):
    """Run a fact's real command on this machine and feed its output to its parser."""
    command = fact.command(**kwargs)
    command = command if isinstance(command, str) else command.get_raw_value()  # pyinfra's facts: a StringCommand
    output = subprocess.run(command, shell=True, capture_output=True, text=True, check=True)
    return fact.process(output.stdout.splitlines())


def test_core_fact_matches_psutil_on_this_machine():
    result = run_fact_here(PhysicalCores())
    expected = psutil.cpu_count(logical=False)
    affinity = len(psutil.Process().cpu_affinity())
    assert result["physical"] == min(expected, affinity), result


def test_memory_and_disk_facts_on_this_machine(tmp_path):
    basics = run_fact_here(HostBasics())
    assert abs(basics["memory_mb"] - psutil.virtual_memory().total // 2**20) <= 1
    assert basics["id"] == "debian" and basics["arch"] == "amd64" and basics["init"], basics
    # A path that does not exist yet is measured on its nearest existing parent.
    free = run_fact_here(FreeDiskBytes(), path=str(tmp_path / "not" / "yet"))
    assert abs(free - psutil.disk_usage(str(tmp_path)).free) < 64 * 2**20


def test_os_release_parser():
    lines = ['PRETTY_NAME="Debian GNU/Linux 13 (trixie)"', 'ID=debian', 'VERSION_ID="13"', "VERSION_CODENAME=trixie",
             "ARCH=amd64", "MEMTOTAL_KB=8150000", "INIT=systemd"]
    assert HostBasics().process(lines) == {
        "id": "debian", "version_id": "13", "codename": "trixie",
        "pretty_name": "Debian GNU/Linux 13 (trixie)", "arch": "amd64", "memory_mb": 7958, "init": "systemd",
    }
    assert HostBasics().process(["ID=debian", "MEMTOTAL_KB=", "INIT="])["memory_mb"] is None  # no /proc/meminfo


def test_model_file_fact_on_this_machine(tmp_path):
    model = tmp_path / "m.gguf"
    marker = tmp_path / ".m.gguf.verified"
    assert run_fact_here(ModelFile(), path=str(model), marker=str(marker)) == {
        "size": None, "mtime": None, "part_size": 0, "marker": None,
    }
    model.write_bytes(b"x" * 10)
    (tmp_path / "m.gguf.part").write_bytes(b"y" * 3)
    marker.write_text('{"sha256": "ab", "size": 10, "mtime": 5}\n')
    state = run_fact_here(ModelFile(), path=str(model), marker=str(marker))
    assert state["size"] == 10 and state["part_size"] == 3
    assert state["marker"] == {"sha256": "ab", "size": 10, "mtime": 5}
    assert state["mtime"] == int(model.stat().st_mtime)


def test_model_file_fact_reads_the_marker_byte_for_byte_and_tells_the_part_from_the_file(tmp_path):
    model = tmp_path / "with space.gguf"
    marker = tmp_path / ".m.verified"
    # JSON escapes a backslash; dash's echo would turn "\\n" into a newline.
    marker.write_text('{"sha256": "ab",\n "note": "a\\\\nb"}')  # two lines, no final newline
    (tmp_path / "with space.gguf.part").write_bytes(b"y" * 7)
    state = run_fact_here(ModelFile(), path=str(model), marker=str(marker))
    assert state == {"size": None, "mtime": None, "part_size": 7, "marker": {"sha256": "ab", "note": "a\\nb"}}
    model.write_bytes(b"x" * 4)
    assert run_fact_here(ModelFile(), path=str(model), marker=str(marker))["size"] == 4


def test_model_file_fact_quotes_paths(tmp_path):
    # Settings forbid such names; the fact quotes them anyway.
    evil = tmp_path / "a b;touch pwned"
    run_fact_here(ModelFile(), path=str(evil), marker=str(evil) + ".m")
    assert not (tmp_path / "pwned").exists()


def test_compose_stack_parser():
    lines = [
        "want localai aaa", "want chatbot-ui bbb",
        "have localai aaa running", "have chatbot-ui old exited",
        "ports 0.0.0.0:8080->8080/tcp, :::8080->8080/tcp", "ports ", "ports 127.0.0.1:3001->3000/tcp",
    ]
    assert ComposeStack().process(lines) == {
        "services": {
            "localai": {"want": "aaa", "have": "aaa", "state": "running"},
            "chatbot-ui": {"want": "bbb", "have": "old", "state": "exited"},
        },
        "published": [3001, 8080],
    }
    assert ComposeStack().process([]) is None


def test_listening_ports_from_ss_and_from_proc():
    from backchat.facts import ListeningPorts

    ss = [
        'ss LISTEN 0 4096 0.0.0.0:8080 0.0.0.0:* users:(("docker-proxy",pid=812,fd=7))',
        'ss LISTEN 0 128 [::]:22 [::]:* users:(("sshd",pid=1,fd=4))',
    ]
    assert ListeningPorts().process(ss) == {8080: "docker-proxy", 22: "sshd"}
    proc = [
        "proc   sl  local_address rem_address   st tx_queue rx_queue",
        "proc    0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1",
        "proc    1: 0100007F:0BB9 0100007F:9C40 01 00000000:00000000 00:00000000 00000000 0 0 2",
    ]
    assert ListeningPorts().process(proc) == {8080: ""}  # 0x1F90 listens; 0x0BB9 is a connection


def test_compose_project_reads_containers_health_volumes_and_networks():
    from backchat.facts import ComposeProject

    output = [
        "ok",
        'container {"service":"localai","image":"localai/localai:v4.9.0","state":"running","status":"Up 2 minutes (healthy)"}',
        'container {"service":"chatbot-ui","image":"ghcr.io/mckaywrigley/chatbot-ui:main","state":"exited","status":"Exited (137) 5 seconds ago"}',
        'container {"service":"llamacpp","image":"x","state":"running","status":"Up 1 second (health: starting)"}',
        "volume backchat_localai-backends",
        "network 0123abcd",
    ]
    found = ComposeProject().process(output)
    assert found["docker"] == "ok"
    assert [(row["service"], row["state"], row["health"]) for row in found["containers"]] == [
        ("chatbot-ui", "exited", None), ("llamacpp", "running", "starting"), ("localai", "running", "healthy")
    ]
    assert found["volumes"] == ["backchat_localai-backends"] and found["networks"] == ["0123abcd"]
    assert ComposeProject().process(["missing"])["docker"] == "missing"
    daemon_down = ComposeProject().process(["unreachable Cannot connect to the Docker daemon at unix:///var/run/docker.sock."])
    assert daemon_down["docker"].startswith("unreachable: Cannot connect") and daemon_down["containers"] == []
    assert "label=com.docker.compose.project=backchat" in ComposeProject().command("backchat")


def test_path_states_on_this_machine_never_follow_a_link(tmp_path):
    """One command reads every path: kind, mode, owner, sha256, and the texts asked for;
    a link is reported as a link (never as what it points to), a missing path is absent."""
    (tmp_path / "dir").mkdir(mode=0o750)
    (tmp_path / "dir").chmod(0o750)
    secret = tmp_path / "dir" / ".env"
    secret.write_text("KEY=1\n")
    secret.chmod(0o600)
    config = tmp_path / "config.yaml"
    config.write_bytes(b"a: 1\nno newline at the end")
    (tmp_path / "empty").write_text("")
    (tmp_path / "link").symlink_to(secret)
    (tmp_path / "config-link.yaml").symlink_to(config)
    (tmp_path / "a file with spaces").write_text("x\n")
    paths = [str(tmp_path / name) for name in ("dir", "dir/.env", "link", "missing", "a path with spaces",
                                               "a file with spaces")]
    texts = [str(config), str(tmp_path / "config-link.yaml"), str(tmp_path / "empty"), str(tmp_path / "gone.yaml")]
    found = run_fact_here(PathStates(), paths=paths, texts=texts)
    user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    directory = found[str(tmp_path / "dir")]
    assert (directory["kind"], directory["mode"], directory["user"], directory["sha256"]) == ("directory", "750", user, None)
    assert found[str(secret)]["kind"] == "file" and found[str(secret)]["mode"] == "600"
    assert found[str(secret)]["sha256"] == hashlib.sha256(b"KEY=1\n").hexdigest() and "text" not in found[str(secret)]
    assert found[str(tmp_path / "link")] == {"kind": "link", "mode": None, "user": None, "group": None, "sha256": None}
    assert found[str(config)]["text"] == "a: 1\nno newline at the end", "the exact bytes"
    # A config may be a link to the real one: its text is read (it is never written through).
    assert found[str(tmp_path / "config-link.yaml")]["kind"] == "link"
    assert found[str(tmp_path / "config-link.yaml")]["text"] == "a: 1\nno newline at the end"
    assert found[str(tmp_path / "empty")].get("text", "") == ""
    assert found[str(tmp_path / "a file with spaces")]["sha256"] == hashlib.sha256(b"x\n").hexdigest()
    assert not {str(tmp_path / "missing"), str(tmp_path / "gone.yaml"), str(tmp_path / "a path with spaces")} & set(found)


def test_path_states_parser_takes_paths_with_spaces():
    sha = "a" * 64
    found = parse_path_states(["stat regular file|644|root|root|/opt/my stack/x.yaml", "text eDogMQo= /opt/my stack/x.yaml",
                               "junk", "stat directory|755|root|root|/opt", f"{sha}  /opt/my stack/x.yaml",
                               "stat symbolic link|777|root|root|/opt/l", "stat fifo|644|root|root|/opt/f"])
    assert found["/opt/my stack/x.yaml"] == {"kind": "file", "mode": "644", "user": "root", "group": "root", "sha256": sha, "text": "x: 1\n"}
    assert found["/opt"]["kind"] == "directory" and "text" not in found["/opt"] and found["/opt"]["sha256"] is None
    assert found["/opt/l"] == {"kind": "link", "mode": None, "user": None, "group": None, "sha256": None}
    assert found["/opt/f"]["kind"] == "other" and set(found) == {"/opt/my stack/x.yaml", "/opt", "/opt/l", "/opt/f"}


class _Fails(FactBase):
    def command(self):
        return "echo half; exit 3"

    def process(self, output):
        return output


class _NeedsAMissingProgram(FactBase):
    requires_command = "backchat-no-such-program"

    def command(self):
        return "backchat-no-such-program --list"

    def process(self, output):
        return output


def test_facts_read_together_are_what_each_reads_alone(tmp_path):
    """One command for several facts: each part goes to its own fact's parser, so the
    values are the ones each fact gives alone; a part that fails or lacks its program is
    marked unread (read alone later, so pyinfra says why)."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" * 10)
    (tmp_path / ".m.gguf.verified").write_text('{"sha256": "x", "size": 40, "mtime": 1}\n')
    (tmp_path / "config.yaml").write_text("a: 1\n")
    wanted = [
        (HostBasics, {}),
        (_Fails, {}),
        (ModelFile, {"path": str(model), "marker": str(tmp_path / ".m.gguf.verified")}),
        (_NeedsAMissingProgram, {}),
        (PathStates, {"paths": [str(tmp_path), str(model)], "texts": [str(tmp_path / "config.yaml")]}),
        (PhysicalCores, {}),
        (ModelFile, {"path": str(tmp_path / "none.gguf"), "marker": str(tmp_path / ".none")}),
        (FileContents, {"path": str(tmp_path / "config.yaml")}),  # pyinfra's: command() keeps state for process()
        (FileContents, {"path": str(tmp_path / "gone.yaml")}),
    ]
    lines = run_fact_here(Together(), facts=wanted)
    together = Together.values(wanted, lines)
    assert [read for read, _value in together] == [True, False, True, False, True, True, True, True, True]
    for (read, value), (cls, kwargs) in zip(together, wanted):
        if read:
            assert value == run_fact_here(cls(), **kwargs), cls
        else:
            assert value is None


# A dpkg database (dpkg-query and dpkg -l read $DPKG_ADMINDIR) with each state that counts or
# not: installed, held, config files only, half-configured, and one name in two architectures.
def dpkg_status(multi_arch: str = "Multi-Arch: same\n") -> str:
    return "".join(
        f"Package: {name}\nStatus: {status}\nMaintainer: x\nArchitecture: {arch}\n{extra}Version: {version}\n"
        "Description: x\n\n"
        for name, status, arch, version, extra in (
            ("curl", "install ok installed", "amd64", "8.14.1-2", ""),
            ("docker.io", "hold ok installed", "amd64", "26.1.5+dfsg1-9+b9", ""),
            ("runc", "deinstall ok config-files", "amd64", "1.1.15+ds1-2", ""),
            ("containerd", "install ok half-configured", "amd64", "1.7.24~ds1-6", ""),
            ("libfoo", "install ok installed", "i386", "1.0", multi_arch),
            ("libfoo", "install ok installed", "amd64", "1.0", multi_arch),
        )
    )


def use_dpkg_database(directory, monkeypatch, status: str) -> None:
    (directory / "status").write_text(status)
    (directory / "updates").mkdir()
    monkeypatch.setenv("DPKG_ADMINDIR", str(directory))


def test_installed_packages_says_of_its_names_what_dpkg_l_says(tmp_path, monkeypatch):
    use_dpkg_database(tmp_path, monkeypatch, dpkg_status())
    names = ["curl", "docker.io", "runc", "containerd", "libfoo", "no-such-package"]
    # run_fact_here checks the exit status: a name dpkg does not know is an answer, not a failure.
    asked = run_fact_here(InstalledPackages(), names=names)
    assert asked == {name: versions for name, versions in run_fact_here(DebPackages()).items() if name in names}
    assert set(asked) == {"curl", "docker.io", "libfoo"}


def test_installed_packages_fails_when_dpkg_cannot_answer(tmp_path, monkeypatch):
    # Two instances of a name without Multi-Arch: dpkg-query refuses the database (exit 2).
    use_dpkg_database(tmp_path, monkeypatch, dpkg_status(multi_arch=""))
    command = InstalledPackages().command(names=["curl"])
    assert subprocess.run(command, shell=True, capture_output=True).returncode != 0
