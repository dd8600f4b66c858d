"""No-op re-run benchmark: run by hand as root, prints figures beside their goals (CI does not run it).

    python bench/noop_rerun.py [--hosts 10] [--rounds 5]

Sandbox hosts (testbed/sandbox.py: Debian 13 roots over SSH), ``start = False``,
``docker_source = "debian"``, the model from a local Hub stand-in (testbed/hub.py), pinned
to a commit and its sha256 as the defaults pin theirs. After a
first apply, rounds alternate one host and all hosts (medians over the rounds): wall time,
controller CPU, remote commands and bytes per host; then one profiled run says where the
controller's CPU goes. See bench/README.md.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import os
import pstats
import resource
import runpy
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from testbed.deploy_runner import run_deploy, sandbox_data, write_inventory  # noqa: E402

REPO, MODEL = "bench/tiny-GGUF", "tiny.gguf"
PROFILED = "--as-profiled-pyinfra"  # argv[1] of this script when it wraps a profiled pyinfra run

# Issue 18's figures (the same hosts and settings, before): per host, one host alone and ten at once.
BEFORE_CPU_PER_HOST = {1: 2.0, 10: 9.7 / 10}
GOAL_COMMANDS = 20
GOAL_RATIO = 1.5
GOAL_ONE_HOST_SECONDS = 2.0


def pinned_data(hub, workdir: Path) -> list[str]:
    """The sandbox deploy's ``--data`` with the model pinned as the defaults pin it: a
    commit and its sha256 (so a re-run asks the Hub nothing, as a user's does)."""
    from testbed.sandbox import GATEWAY
    from testbed.tiny_gguf import write_tiny_gguf

    model = write_tiny_gguf(workdir / MODEL).read_bytes()
    commit = hub.add_file(REPO, MODEL, model)
    return sandbox_data(hub.endpoint(GATEWAY), REPO, MODEL, model_revision=commit,
                        model_sha256=hashlib.sha256(model).hexdigest())


def controller_cpu() -> float:
    """CPU seconds (user + system) of every child process that has ended so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_cpu() -> float:
    """CPU seconds every process on this machine has used so far (/proc/stat): the sandbox
    hosts' sshd and commands run on the controller's cores, so a fleet's wall time here
    follows this, not only the controller's share."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq = (int(field) for field in stat.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def measure(inventory: Path, hosts, data: list[str], env: dict, project: Path = PROJECT) -> dict:
    """One no-op run of the real CLI (from ``project``): its wall time, the controller's CPU,
    the whole machine's CPU and, per host, the commands sshd started and the bytes on the
    host's link."""
    commands = {host.name: host.remote_commands() for host in hosts}
    link = {host.name: host.link_bytes() for host in hosts}
    reaped = {host.name: host.sshd_cpu() for host in hosts}
    cpu, everything = controller_cpu(), machine_cpu()
    started = time.monotonic()
    run = run_deploy(inventory, *data, env=env, project=project)
    seconds = time.monotonic() - started
    cpu, everything = controller_cpu() - cpu, machine_cpu() - everything
    if run.returncode != 0:
        raise SystemExit(f"the no-op run failed:\n{run}")
    if run.changed_ops():
        raise SystemExit(f"a no-op run changed {run.changed_ops()}:\n{run}")
    per_host_commands = [host.remote_commands() - commands[host.name] for host in hosts]
    per_host_bytes = [host.link_bytes() - link[host.name] for host in hosts]
    time.sleep(0.2)  # each sshd reaps its session once the client has gone
    per_host_cpu = [host.sshd_cpu() - reaped[host.name] for host in hosts]
    return {
        "seconds": seconds,
        "cpu_per_host": cpu / len(hosts),
        "machine_cpu_per_host": everything / len(hosts),
        "commands": max(per_host_commands),
        "bytes": statistics.mean(per_host_bytes),
        "host_cpu": statistics.mean(per_host_cpu),
    }


# --- where the controller's CPU goes ---------------------------------------------------

AREAS = (
    # (area, what a function's file path or a C function's name contains), first match wins
    ("paramiko (SSH: crypto, packets, channels)", ("/paramiko/",)),
    ("cryptography / hashes", ("/cryptography/", "_hashlib", "openssl", "_ssl.")),
    ("gevent (scheduling, patched I/O)", ("/gevent/", "greenlet")),
    ("pyinfra: operation order (stack inspection)", ("inspect.py", "/pyinfra/api/util.py")),
    ("pyinfra: facts", ("/pyinfra/api/facts.py", "/pyinfra/facts/")),
    ("pyinfra: operations", ("/pyinfra/api/operation", "/pyinfra/operations/")),
    ("pyinfra: commands, connectors", ("/pyinfra/api/command.py", "/pyinfra/connectors/")),
    ("pyinfra: other", ("/pyinfra/", "/pyinfra_cli/", "/click/")),
    ("YAML", ("/yaml/",)),
    ("Jinja templates", ("/jinja2/", "/markupsafe/", "<template>")),
    ("backchat", ("/backchat/",)),
    ("imports (finding, loading, compiling modules)", ("<frozen importlib", "<frozen zipimport", "marshal", "builtins.compile", "_imp.")),
    ("logging", ("/logging/",)),
    ("package metadata (entry points: gevent's plugins, pyinfra's connectors)", ("/importlib/metadata/",)),
    ("type hints (typing: pyinfra's global arguments, per fact class)", ("/typing.py",)),
    ("regular expressions (compiled on import)", ("/re/_",)),
)


def area_of(func: tuple) -> str:
    filename, _line, name = func
    where = filename if filename != "~" else name
    for area, needles in AREAS:
        if any(needle in where for needle in needles):
            return area
    return "Python and C, other" if filename != "~" else "C functions, other"


def cpu_by_area(profile_path: Path) -> list[tuple[str, float]]:
    """Self CPU time per area. A C function's time goes to the area of the Python code that
    called it (in proportion to each caller's share), so socket and hash calls count where
    they are made."""
    stats = pstats.Stats(str(profile_path)).stats  # func -> (cc, nc, tottime, cumtime, callers)
    areas: dict[str, float] = defaultdict(float)
    for func, (_cc, _nc, tottime, _cum, callers) in stats.items():
        if func[0] == "~" and callers and area_of(func).startswith("C functions"):
            for caller, (_c, _n, caller_tt, _ct) in callers.items():
                share = tottime * caller_tt / (sum(c[2] for c in callers.values()) or 1)
                areas[area_of(caller)] += share
        else:
            areas[area_of(func)] += tottime
    return sorted(areas.items(), key=lambda item: -item[1])


def run_profiled_pyinfra(out: str, argv: list[str]) -> None:
    """This script as ``python bench/noop_rerun.py --as-profiled-pyinfra OUT -m pyinfra ARGS``:
    pyinfra's CLI under cProfile counting CPU time (wall time would count waits on hosts)."""
    if argv[:2] != ["-m", "pyinfra"]:
        raise SystemExit("usage: noop_rerun.py --as-profiled-pyinfra OUT -m pyinfra ARGS")
    sys.argv = ["pyinfra", *argv[2:]]
    sys.path.insert(0, os.getcwd())  # as `python -m pyinfra` run from the project has it
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    try:
        runpy.run_module("pyinfra", run_name="__main__", alter_sys=True)
    finally:
        profiler.disable()
        profiler.dump_stats(out)


# --- the benchmark -------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=10, help="the fleet's size (default 10)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of (1 host, all hosts), interleaved")
    parser.add_argument("--baseline", type=Path, help="another checkout of the project (e.g. `git worktree add "
                        "../base main`), run in the same rounds: its medians, and this one's over its")
    args = parser.parse_args()
    checkouts = {"this": PROJECT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    for checkout in checkouts.values():
        if not (checkout / "deploy.py").is_file() or not (checkout / "backchat").is_dir():
            raise SystemExit(f"{checkout} is not a checkout of the project (no deploy.py and backchat/)")
    if os.geteuid() != 0:
        raise SystemExit("needs root (sandbox hosts: mounts, network namespaces)")

    from testbed.hub import FakeHub
    from testbed.sandbox import GATEWAY, sandbox_hosts

    workdir = Path(tempfile.mkdtemp(prefix="backchat-noop-", dir="/var/tmp"))
    print(f"work directory: {workdir}", flush=True)
    env = {
        # PYTHONDONTWRITEBYTECODE: some machines set it for every process; a user's does not,
        # and without it backchat's modules are compiled once, not on every run.
        **{k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT", "PYTHONDONTWRITEBYTECODE")},
        "HF_HOME": str(workdir / "hf"),
        "XDG_CACHE_HOME": str(workdir / "xdg"),
        "HOME": str(workdir),  # the API key and the CA are made once, here
    }
    names = [f"noop-{i + 1}" for i in range(args.hosts)]
    # Hosts first: their bridge carries the gateway address the Hub stand-in binds to.
    with sandbox_hosts(["trixie"] * args.hosts, names=names) as hosts, FakeHub(bind=GATEWAY) as hub:
        data = pinned_data(hub, workdir)
        fleets = {
            1: (write_inventory(workdir / "one.py", {hosts[0].name: hosts[0].pyinfra_data()}), hosts[:1]),
            len(hosts): (write_inventory(workdir / "all.py", {h.name: h.pyinfra_data() for h in hosts}), hosts),
        }
        all_inventory = fleets[len(hosts)][0]

        print(f"first apply on {len(hosts)} hosts (Docker from Debian, the model, the files; not measured)", flush=True)
        started = time.monotonic()
        first = run_deploy(all_inventory, *data, env=env)
        (workdir / "first-apply.log").write_text(first.stderr)
        if first.returncode != 0:
            raise SystemExit(f"the first apply failed:\n{first}")
        print(f"  {time.monotonic() - started:.0f}s", flush=True)
        for project in checkouts.values():
            measure(all_inventory, hosts, data, env, project)  # settles caches (page cache, pyc) on both sides

        # Every round runs each (checkout, fleet) once; the order turns from round to round.
        runs = [(checkout, size) for checkout in checkouts for size in sorted(fleets)]
        every: dict[tuple[str, int], list[dict]] = {run: [] for run in runs}
        for round_number in range(args.rounds):
            shift = round_number % len(runs)
            order = runs[shift:] + runs[:shift]
            for checkout, size in order if round_number % 2 == 0 else reversed(order):
                inventory, members = fleets[size]
                result = measure(inventory, members, data, env, checkouts[checkout])
                every[checkout, size].append(result)
                print(
                    f"  round {round_number + 1}, {checkout if args.baseline else ''}{size:>3} host(s): "
                    f"{result['seconds']:.2f}s, CPU {result['cpu_per_host']:.2f}s/host, "
                    f"{result['commands']} commands/host, {result['bytes'] / 1000:.0f} KB/host",
                    flush=True,
                )
        results = {size: every["this", size] for size in fleets}

        profiles = {size: workdir / f"noop-{size}.prof" for size in fleets}
        for size, profile_path in profiles.items():
            run = run_deploy(fleets[size][0], *data, env=env, python_args=(__file__, PROFILED, str(profile_path)))
            if run.returncode != 0:
                raise SystemExit(f"the profiled run failed:\n{run}")

    def median(size: int, key: str) -> float:
        return statistics.median(result[key] for result in results[size])

    sizes = sorted(fleets)
    print(f"\nmedians of {args.rounds} rounds (one host and {sizes[-1]} hosts interleaved):\n")
    print("| hosts | no-op wall | controller CPU / host | remote commands / host | bytes / host |")
    print("|---|---|---|---|---|")
    for size in sizes:
        print(
            f"| {size} | {median(size, 'seconds'):.2f} s | {median(size, 'cpu_per_host'):.2f} s "
            f"| {median(size, 'commands'):.0f} | {median(size, 'bytes') / 1000:.0f} KB |"
        )

    one, many = sizes[0], sizes[-1]
    if many > one:  # what one more host costs: the fixed costs (start-up, the Hub lookup) cancel
        extra = (median(many, "cpu_per_host") * many - median(one, "cpu_per_host") * one) / (many - one)
        print(f"\ncontroller CPU per extra host ({one} -> {many} hosts, from the medians): {extra:.3f} s")
        machine = (median(many, "machine_cpu_per_host") * many - median(one, "machine_cpu_per_host") * one) / (many - one)
        print(f"the machine's CPU per extra host (the controller, and the host's sshd and commands, which share "
              f"its {os.cpu_count()} cores here): {machine:.3f} s")
        print(f"each host's own CPU per run, {many} hosts (its sshd: the connection, the session and the command): "
              f"{median(many, 'host_cpu'):.3f} s")
        # The goal's ratio moves from round to round on a shared machine: say how far.
        rounds = [a["seconds"] / b["seconds"] for a, b in zip(results[many], results[one])]
        print(f"{many} hosts / 1 host, each round's ratio: {min(rounds):.2f} to {max(rounds):.2f}")
    ratio = median(many, "seconds") / median(one, "seconds")
    goals = [
        (f"no-op wall, {many} hosts / 1 host", f"{ratio:.2f}", f"<= {GOAL_RATIO}", ratio <= GOAL_RATIO),
        ("no-op wall, 1 host", f"{median(one, 'seconds'):.2f} s", f"<= {GOAL_ONE_HOST_SECONDS:.0f} s",
         median(one, "seconds") <= GOAL_ONE_HOST_SECONDS),
    ]
    for size in sizes:
        commands = median(size, "commands")
        goals.append((f"remote commands / host, {size} host(s)", f"{commands:.0f}", f"<= {GOAL_COMMANDS}",
                      commands <= GOAL_COMMANDS))
    for size in sizes:
        cpu, before = median(size, "cpu_per_host"), BEFORE_CPU_PER_HOST.get(size)
        if before:
            goals.append((f"controller CPU / host, {size} host(s)", f"{cpu:.2f} s",
                          f"<= {before / 2:.2f} s (half of issue 18's {before:.2f} s)", cpu <= before / 2))
    print("\n| goal | measured | wanted | met |\n|---|---|---|---|")
    for label, value, wanted, met in goals:
        print(f"| {label} | {value} | {wanted} | {'yes' if met else 'NO'} |")

    areas = {size: dict(cpu_by_area(path)) for size, path in profiles.items()}
    totals = {size: sum(areas[size].values()) or 1 for size in sizes}
    print(f"\nwhere the controller's CPU goes (one profiled run of the pyinfra process each, {one} host and "
          f"{many} hosts; child processes not included; the profiler slows Python code most):\n")
    print(f"| area | {one} host | {many} hosts | per extra host |\n|---|---|---|---|")
    for area in sorted(areas[many], key=lambda name: -areas[many][name]):
        first, last = areas[one].get(area, 0.0), areas[many][area]
        if last / totals[many] >= 0.005:
            print(f"| {area} | {first:.2f} s ({first / totals[one]:.0%}) | {last:.2f} s ({last / totals[many]:.0%}) "
                  f"| {(last - first) / max(many - one, 1) * 1000:.0f} ms |")
    print(f"| total | {totals[one]:.2f} s | {totals[many]:.2f} s "
          f"| {(totals[many] - totals[one]) / max(many - one, 1) * 1000:.0f} ms |")
    if args.baseline:
        print_comparison(every, sorted(fleets), args.baseline)
    print(f"\n(logs and the profiles: {workdir}; `python -m pstats {profiles[many]}` for the details)")


def print_comparison(every: dict, sizes: list[int], baseline: Path) -> None:
    """This checkout over the baseline, measured in the same rounds: the ratio of their
    medians, and the median of each round's ratio (a round's runs are minutes apart at
    most, so the machine's changing load mostly cancels)."""
    one, many = sizes[0], sizes[-1]

    def figures(checkout: str, index: int | None = None) -> dict[str, float]:
        def value(size: int, key: str) -> float:
            values = [result[key] for result in every[checkout, size]]
            return values[index] if index is not None else statistics.median(values)

        found = {f"wall, {size} host(s)": value(size, "seconds") for size in sizes}
        found.update({f"controller CPU / host, {size} host(s)": value(size, "cpu_per_host") for size in sizes})
        if many > one:
            found[f"wall, {many} hosts / 1 host"] = value(many, "seconds") / value(one, "seconds")
            for key, label in (("cpu_per_host", "controller CPU"), ("machine_cpu_per_host", "the machine's CPU")):
                found[f"{label} / extra host"] = (value(many, key) * many - value(one, key) * one) / (many - one)
        return found

    before, after = figures("baseline"), figures("this")
    rounds = len(every["this", one])
    per_round = [(figures("baseline", i), figures("this", i)) for i in range(rounds)]
    print(f"\nthis checkout against {baseline}, in the same {rounds} rounds:\n")
    print("| figure | baseline (median) | this (median) | this / baseline | median of each round's ratio |")
    print("|---|---|---|---|---|")
    for name in before:
        unit = "" if "/ 1 host" in name else " s"
        ratios = [b[name] and a[name] / b[name] for b, a in per_round]
        print(f"| {name} | {before[name]:.3f}{unit} | {after[name]:.3f}{unit} | "
              f"{after[name] / before[name]:.2f} | {statistics.median(ratios):.2f} |")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == PROFILED:
        run_profiled_pyinfra(sys.argv[2], sys.argv[3:])
    else:
        main()
