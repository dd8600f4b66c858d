"""Model delivery benchmark: run by hand as root, prints figures (CI does not run it).

    python bench/model_delivery.py [--big-mb 1024] [--small-mb 10]

Three Debian 13 sandbox hosts (testbed/sandbox.py), a local Hub (testbed/hub.py)
and a second one as the LAN mirror; the real pyinfra CLI and deploy.py. See bench/README.md
for what each figure means and how it is measured.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from testbed.deploy_runner import run_deploy, sandbox_data, write_inventory  # noqa: E402
from testbed.hub import FakeHub  # noqa: E402
from testbed.sandbox import GATEWAY, sandbox_hosts  # noqa: E402

REPO = "bench/delivery-GGUF"
MB = 1024 * 1024


def make_file(path: Path, size: int) -> Path:
    # Random bytes: nothing on the way (TLS, compression) can make them cheaper than they are.
    with open(path, "wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(16 * MB, left))
            out.write(chunk)
            left -= len(chunk)
    return path


class Bench:
    def __init__(self, hosts, hub: FakeHub, mirror: FakeHub, workdir: Path):
        self.hosts, self.hub, self.mirror, self.workdir = hosts, hub, mirror, workdir
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT")},
            "HF_HOME": str(workdir / "hf"),
            "XDG_CACHE_HOME": str(workdir / "xdg"),
        }
        self.runs = 0

    def deploy(self, hosts, model: str, models_dir: str, **overrides):
        data = sandbox_data(self.hub.endpoint(GATEWAY), REPO, model, models_dir=models_dir, **overrides)
        self.runs += 1
        inventory = write_inventory(self.workdir / f"inventory-{self.runs}.py", {h.name: h.pyinfra_data() for h in hosts})
        started = time.monotonic()
        run = run_deploy(inventory, *data, env=self.env)
        seconds = time.monotonic() - started
        (self.workdir / f"run-{self.runs}.log").write_text(run.stderr)
        if run.returncode != 0:
            raise SystemExit(f"deploy failed ({data}):\n{run}")
        return run, seconds


def traced_openat(host, action):
    """Run action() while strace records every openat of the host's sshd and its children."""
    trace = Path(tempfile.mktemp(prefix="bench-openat-"))
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "trace=openat,open", "-o", str(trace), "-p", str(host._sshd.pid)],
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1)
    try:
        result = action()
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(10)
    text = trace.read_text()
    trace.unlink()
    return result, text


def timed_on_host(host, command: str) -> float:
    out = host.run(f"s=$(date +%s.%N); {command} >/dev/null; e=$(date +%s.%N); python3 -c \"print($e - $s)\"").stdout
    return float(out.strip().splitlines()[-1])


def timed_push(bench: Bench, host, name: str, env: dict | None = None) -> tuple[float, str]:
    """A push of the whole file to ``host`` (none there before), as the deploy logs it."""
    host.run("rm -rf /opt/m-controller")
    saved = bench.env
    bench.env = {**saved, **(env or {})}
    try:
        run, _seconds = bench.deploy([host], name, "/opt/m-controller", model_source="controller")
    finally:
        bench.env = saved
    found = re.findall(r"pushed [\d,]+ bytes \(resumed at 0\) in ([\d.]+)s, \d+ MB/s over (\w+)", run.stderr)
    if not found:
        raise SystemExit(f"no push logged:\n{run.stderr[-3000:]}")
    return float(found[0][0]), found[0][1]


def push_vs_curl(bench: Bench, host, url: str, name: str, mb: float, rounds: int, say, label: str = "") -> None:
    """Figure 3's ratio: push and curl take turns (the machine's other load shifts within
    seconds), and their medians are compared."""
    pushes, curls, ways = [], [], set()
    for _ in range(rounds):
        curls.append(timed_on_host(host, f"curl -fsSL -o /var/tmp/plain {url}"))
        host.run("rm -f /var/tmp/plain")
        seconds, way = timed_push(bench, host, name)
        pushes.append(seconds)
        ways.add(way)
    push, curl = statistics.median(pushes), statistics.median(curls)
    say(
        f"{label}controller: push alone (one host, over {', '.join(sorted(ways))}; median of {rounds})",
        f"{push:.2f}s, {mb / push:.0f} MB/s ({', '.join(f'{t:.2f}' for t in pushes)})",
    )
    say(
        f"{label}plain curl from the controller's server to the host (median of {rounds})",
        f"{curl:.2f}s, {mb / curl:.0f} MB/s ({', '.join(f'{t:.2f}' for t in curls)})",
    )
    say(f"{label}controller: ratio push / plain curl from the controller", f"{curl / push:.2f} (goal >= 0.8)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big-mb", type=int, default=1024)
    parser.add_argument("--small-mb", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="push / curl rounds for figure 3 (medians)")
    parser.add_argument("--push-only", action="store_true", help="one host, only the controller push vs curl")
    parser.add_argument(
        "--link-mbit", type=int, nargs="*", default=[], metavar="MBIT",
        help="figure 3 again with the host's link capped at each rate (e.g. 1000 2500: 1 and 2.5 GbE)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (sandbox hosts: mounts, network namespaces)")

    workdir = Path(tempfile.mkdtemp(prefix="backchat-bench-", dir="/var/tmp"))
    print(f"work directory (logs of every run): {workdir}")
    small_name, big_name = "small.gguf", "big.gguf"
    small = make_file(workdir / small_name, args.small_mb * MB)
    big = make_file(workdir / big_name, args.big_mb * MB)
    size = {small_name: small.stat().st_size, big_name: big.stat().st_size}
    figures: list[tuple[str, str]] = []

    def say(label: str, value: str) -> None:
        figures.append((label, value))
        print(f"  {label}: {value}", flush=True)

    # Hosts first: their bridge carries the gateway address the servers bind to.
    count = 1 if args.push_only else 3
    with sandbox_hosts(["trixie"] * count, names=["bench-1", "bench-2", "bench-3"][:count]) as hosts, FakeHub(
        bind=GATEWAY
    ) as hub, FakeHub(bind=GATEWAY) as mirror:
        for name, path in ((small_name, small), (big_name, big)):
            hub.add_file(REPO, name, path)
        mirror.add_file(REPO, big_name, big)
        bench = Bench(hosts, hub, mirror, workdir)

        print(f"warm-up: Docker and the stack on {count} host(s) (hub, small file; not measured)", flush=True)
        bench.deploy(hosts, small_name, "/opt/backchat/models")

        mb = size[big_name] / 1e6
        if args.push_only:
            print("\n3. (--push-only) the controller push vs plain curl on the same link (one host)", flush=True)
        else:
            print(f"\n1. fleet of 3, {args.big_mb} MiB, bytes served by upstream for the whole run", flush=True)
            before = hub.bytes_served.get(big_name, 0)
            run, seconds = bench.deploy(hosts, big_name, "/opt/m-controller", model_source="controller")
            upstream = hub.bytes_served.get(big_name, 0) - before
            say("controller: upstream bytes / model size", f"{upstream / size[big_name]:.2f} ({upstream:,} bytes), run {seconds:.1f}s")
            pushes = [float(m) for m in re.findall(r"pushed [\d,]+ bytes \(resumed at 0\) in ([\d.]+)s", run.stderr)]
            rate = [size[big_name] / s / 1e6 for s in pushes if s > 0]
            if rate:
                say("controller: push per host (3 in parallel)", ", ".join(f"{r:.0f} MB/s" for r in rate))

            before, before_mirror = hub.bytes_served.get(big_name, 0), mirror.bytes_served.get(big_name, 0)
            url = mirror.url(REPO, big_name, host=GATEWAY)
            _, seconds = bench.deploy(hosts, big_name, "/opt/m-mirror", model_source="mirror", model_mirror_url=url)
            upstream = hub.bytes_served.get(big_name, 0) - before
            lan = mirror.bytes_served.get(big_name, 0) - before_mirror
            say(
                "mirror: upstream bytes / model size",
                f"{upstream / size[big_name]:.2f} ({upstream:,} bytes; the mirror was filled once beforehand = 1.00), "
                f"mirror served {lan / size[big_name]:.2f} x, run {seconds:.1f}s",
            )

            print("\n2. no-op re-run on a host holding the model (hub source; same settings as its last run)", flush=True)
            # Each host keeps its own settings (models_dir and model_file appear in the compose
            # file, so switching them is not a no-op): hosts[0] holds the small file since the
            # warm-up, hosts[1] gets the big one now (that download is figure 3's).
            small_host, big_host = hosts[0], hosts[1]
            download_run, download_seconds = bench.deploy([big_host], big_name, "/opt/m-hub")
            noop = {}
            for name, host, models_dir in (
                (small_name, small_host, "/opt/backchat/models"),
                (big_name, big_host, "/opt/m-hub"),
            ):
                times, model_opens = [], 0
                bench.deploy([host], name, models_dir)  # settle: earlier runs left other settings
                for _ in range(3):
                    (run, seconds), opened = traced_openat(host, lambda: bench.deploy([host], name, models_dir))
                    assert run.changed_ops() == [], f"a no-op run changed {run.changed_ops()}"
                    times.append(seconds)
                    model_opens += opened.count(f'"{models_dir}/{name}"')
                noop[name] = min(times)
                say(
                    f"no-op, {size[name] // MB} MiB model",
                    f"{noop[name]:.2f}s (best of 3; {', '.join(f'{t:.2f}' for t in times)}), "
                    f"openat of the model on the host in 3 runs: {model_opens}",
                )
            say("no-op time ratio big/small", f"{noop[big_name] / noop[small_name]:.2f}")

            print("\n3. transfer throughput vs plain curl on the same link (one host)", flush=True)
            delivery = download_seconds - noop[big_name]
            url = hub.url(REPO, big_name, host=GATEWAY)
            curl = timed_on_host(big_host, f"curl -fsSL -o /var/tmp/plain {url}")
            curl_sha = timed_on_host(big_host, f"curl -fsSL -o /var/tmp/plain {url} && sha256sum /var/tmp/plain")
            big_host.run("rm -f /var/tmp/plain")
            say("hub: deploy download + verify (its run minus a no-op run)", f"{delivery:.2f}s, {mb / delivery:.0f} MB/s")
            say("plain curl on the host", f"{curl:.2f}s, {mb / curl:.0f} MB/s")
            say("plain curl + sha256sum on the host", f"{curl_sha:.2f}s, {mb / curl_sha:.0f} MB/s")
            say("hub: ratio deploy / plain curl", f"{curl / delivery:.2f} (vs curl + sha256sum: {curl_sha / delivery:.2f})")

        host, cdn = hosts[-1], mirror.url(REPO, big_name, host=GATEWAY)
        push_vs_curl(bench, host, cdn, big_name, mb, args.rounds, say)
        seconds, _way = timed_push(bench, host, big_name, {"BACKCHAT_SSH": "none"})
        say("controller: the same push over paramiko (BACKCHAT_SSH=none)", f"{seconds:.2f}s, {mb / seconds:.0f} MB/s")
        _, noop_seconds = bench.deploy([host], big_name, "/opt/m-controller", model_source="controller")
        host.run("rm -rf /opt/m-controller")
        run, whole = bench.deploy([host], big_name, "/opt/m-controller", model_source="controller")
        say("controller: push + host sha256 (its run minus a no-op run)", f"{whole - noop_seconds:.2f}s, {mb / (whole - noop_seconds):.0f} MB/s")
        for mbit in args.link_mbit:
            print(f"\n3b. the same, the host's link capped at {mbit} Mbit/s", flush=True)
            host.limit_link(mbit)
            try:
                push_vs_curl(bench, host, cdn, big_name, mb, args.rounds, say, f"{mbit} Mbit/s link: ")
            finally:
                host.limit_link(None)

    print("\nfigures:")
    for label, value in figures:
        print(f"  {label}: {value}")
    print(f"\n(logs: {workdir}; remove it when done: rm -rf {workdir})")
    for path in (small, big):
        path.unlink()


if __name__ == "__main__":
    main()
