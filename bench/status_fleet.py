"""Status on a fleet: run by hand as root, prints seconds for one host and for all, as a ratio
(issue 16); CI does not run it.

    python bench/status_fleet.py [--hosts 10] [--rounds 5]

The no-op benchmark's hosts and settings (bench/noop_rerun.py: Debian 13 sandbox hosts,
``start = False``, ``docker_source = "debian"``, the model from a local Hub stand-in). After
one apply of all hosts, rounds alternate ``status.py`` on one host and on all hosts (medians
over the rounds): wall time, controller CPU, remote commands and bytes per host; then one
profiled run says where the controller's CPU goes. No Docker daemon runs in a sandbox, so
every run exits non-zero with every host UNHEALTHY ("Docker is unreachable"): that is what
each run is checked for, with nothing changed. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from bench import noop_rerun  # noqa: E402
from bench.noop_rerun import PROFILED, controller_cpu, cpu_by_area  # noqa: E402
from testbed.deploy_runner import run_deploy, write_inventory  # noqa: E402


def check_status(run, report: Path, hosts) -> None:
    """The run reported every host as a sandbox host is (no Docker daemon) and changed nothing."""
    if run.returncode == 0:
        raise SystemExit(f"status exited 0 on hosts without a Docker daemon:\n{run}")
    # When every host fails, pyinfra prints no --json results: then its log must show no change.
    changed = run.changed_ops() if run.stdout.strip() else "] Success" in run.stderr
    if changed:
        raise SystemExit(f"status changed something ({changed}):\n{run}")
    rows = {row["host"]: row for row in json.loads(report.read_text())} if report.exists() else {}
    for host in hosts:
        row = rows.get(host.name, {})
        if row.get("result") != "UNHEALTHY" or "Docker is unreachable" not in row.get("failure", ""):
            raise SystemExit(f"status did not report {host.name} as UNHEALTHY, Docker unreachable: {row}\n{run}")


def measure(inventory: Path, hosts, data: list[str], env: dict, report: Path) -> dict:
    """One status run of the real CLI: its wall time, the controller's CPU per host and, per
    host, the commands sshd started and the bytes on the host's link."""
    commands = {host.name: host.remote_commands() for host in hosts}
    link = {host.name: host.link_bytes() for host in hosts}
    cpu = controller_cpu()
    started = time.monotonic()
    run = run_deploy(inventory, *data, f"report_path={report}", env=env, command="status.py")
    seconds = time.monotonic() - started
    cpu = controller_cpu() - cpu
    check_status(run, report, hosts)
    return {
        "seconds": seconds,
        "cpu_per_host": cpu / len(hosts),
        "commands": max(host.remote_commands() - commands[host.name] for host in hosts),
        "bytes": statistics.mean(host.link_bytes() - link[host.name] for host in hosts),
    }


def describe(figures: dict) -> str:
    return (f"wall {figures['seconds']:.2f} s, controller CPU {figures['cpu_per_host']:.2f} s/host, "
            f"{figures['commands']:.0f} remote commands/host, {figures['bytes'] / 1000:.0f} KB/host")


@contextlib.contextmanager
def deployed_fleet(workdir: Path, size: int, env: dict):
    """``size`` sandbox hosts after one apply (start = False): yields ({1: (inventory, [first
    host]), size: (inventory, hosts)}, the --data items)."""
    from testbed.hub import FakeHub
    from testbed.sandbox import GATEWAY, sandbox_hosts

    # Hosts first: their bridge carries the gateway address the Hub stand-in binds to.
    names = [f"status-{number}" for number in range(1, size + 1)]
    with sandbox_hosts(["trixie"] * size, names=names) as hosts, FakeHub(bind=GATEWAY) as hub:
        data = noop_rerun.pinned_data(hub, workdir)
        fleets = {
            count: (write_inventory(workdir / f"hosts-{count}.py", {h.name: h.pyinfra_data() for h in hosts[:count]}),
                    hosts[:count])
            for count in (1, size)
        }
        started = time.monotonic()
        first = run_deploy(fleets[size][0], *data, env=env)
        (workdir / "first-apply.log").write_text(first.stderr)
        if first.returncode != 0:
            raise SystemExit(f"the first apply failed:\n{first}")
        print(f"first apply on {size} hosts (not measured): {time.monotonic() - started:.0f} s", flush=True)
        yield fleets, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=10, help="the fleet's size (default 10)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of (1 host, all hosts), interleaved")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (sandbox hosts: mounts, network namespaces)")

    workdir = Path(tempfile.mkdtemp(prefix="backchat-status-", dir="/var/tmp"))
    print(f"work directory: {workdir}", flush=True)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT")}
    env.update(HF_HOME=str(workdir / "hf"), XDG_CACHE_HOME=str(workdir / "xdg"), HOME=str(workdir))
    one, many = 1, args.hosts
    results: dict[int, list[dict]] = {one: [], many: []}
    profile_path = workdir / "status.prof"
    with deployed_fleet(workdir, many, env) as (fleets, data):
        measure(*fleets[many], data, env, workdir / "status-warm-up.json")  # settles caches on both sides
        # The order flips each round: 1, many, many, 1, 1, many...
        schedule = [(number, size) for number in range(1, args.rounds + 1)
                    for size in ((one, many) if number % 2 else (many, one))]
        for number, size in schedule:
            result = measure(*fleets[size], data, env, workdir / f"status-{size}-{number}.json")
            results[size].append(result)
            print(f"  round {number}, {size} host(s): {describe(result)}", flush=True)
        # One more run of all hosts under cProfile, through noop_rerun.py's wrapper of the CLI.
        profiled = run_deploy(fleets[many][0], *data, env=env, command="status.py",
                              python_args=(noop_rerun.__file__, PROFILED, str(profile_path)))
        (workdir / "status-profiled.log").write_text(profiled.stderr)

    medians = {size: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for size, runs in results.items()}
    print(f"\nmedians of {args.rounds} rounds (status.py on 1 host and on {many}, interleaved):")
    for size in (one, many):
        print(f"  {size:>3} host(s): {describe(medians[size])}")
    print(f"  ratio {many} hosts / 1 host (wall): {medians[many]['seconds'] / medians[one]['seconds']:.2f}")

    areas = cpu_by_area(profile_path) if profile_path.exists() else []
    total = sum(seconds for _area, seconds in areas) or 1
    print(f"\nwhere the controller's CPU goes ({many} hosts, one profiled status run, {total:.2f} s):")
    print("\n".join(f"  {s / total:6.1%}  {s:6.2f} s  {area}" for area, s in areas if s / total >= 0.005))
    print(f"\n(logs, reports and the profile: {workdir})")


if __name__ == "__main__":
    main()
