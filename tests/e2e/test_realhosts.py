"""The deploy applied by the pyinfra CLI over SSH to real Debian 12 and 13 roots.

Each host is a debootstrap root with its own sshd in its own network namespace (see
testbed/sandbox.py). No systemd runs there, so these runs use start = False; the
VM test starts the stack for real. The model comes from a local endpoint that speaks the
Hugging Face Hub's protocol, serving a small GGUF file made by the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from cryptography import x509

from backchat import gateway, secrets, stack
from tests.cfg import make_cfg
from testbed.deploy_runner import PROJECT, run_deploy, sandbox_data, write_inventory
from testbed.proxies import HAPROXY, check_haproxy, require
from testbed.hub import FakeHub
from testbed.sandbox import GATEWAY
from testbed.tiny_gguf import write_tiny_gguf
from tests.variants import COMBINATIONS

pytestmark = pytest.mark.realhost

REPO, MODEL = "test/tiny-GGUF", "tiny.gguf"


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("model") / MODEL).read_bytes()


@pytest.fixture(scope="module")
def hub(model_bytes, fleet):
    # Bound on the bridge's gateway address, which exists once the fleet's hosts do.
    with FakeHub(bind=GATEWAY) as hub:
        hub.commit = hub.add_file(REPO, MODEL, model_bytes)
        yield hub


def deploy_data(hub, **overrides) -> list[str]:
    return sandbox_data(hub.endpoint(GATEWAY), REPO, MODEL, **overrides)


def snapshot(host, root="/opt/backchat") -> dict[str, str]:
    """Every file under ``root`` on the host: path -> sha256, mode and mtime."""
    listing = host.run(
        f"find {root} -type f -exec stat -c '%n %a %Y' {{}} + 2>/dev/null; "
        f"find {root} -type f -exec sha256sum {{}} + 2>/dev/null", check=False
    ).stdout
    return dict(sorted((line.split()[-1 if len(line.split()) == 2 else 0], line) for line in listing.splitlines()))


@pytest.fixture(scope="module")
def fleet(sandbox_factory):
    return sandbox_factory(
        ["bookworm", "trixie", "trixie", "trixie"], names=["ai-bookworm", "ai-trixie", "ai-trixie-2", "ai-trixie-3"]
    )


@pytest.fixture(scope="module")
def first_report(tmp_path_factory):
    """Where the first run writes its JSON report."""
    return tmp_path_factory.mktemp("report") / "first.json"


@pytest.fixture(scope="module")
def first_run(fleet, hub, tmp_path_factory, first_report):
    bookworm, trixie = fleet[:2]
    inventory = write_inventory(
        tmp_path_factory.mktemp("inv") / "inventory.py",
        {host.name: host.pyinfra_data() for host in (bookworm, trixie)},
    )
    return inventory, run_deploy(inventory, *deploy_data(hub, report_path=first_report))


def test_bookworm_with_debian_packages_is_refused_clearly(first_run, fleet):
    _, run = first_run
    bookworm = fleet[0]
    assert run.returncode != 0, run
    assert "[ai-bookworm] Will refuse:" in run.stderr and "compose v1" in run.stderr, run
    assert "docker_source = 'docker'" in run.stderr
    # The refusal is the first thing that runs there: nothing on the host changed.
    assert bookworm.run("test -e /opt/backchat", check=False).returncode != 0
    assert bookworm.run("dpkg -s docker.io", check=False).returncode != 0
    assert run.results["failed_hosts"] == ["ai-bookworm"]


def test_trixie_is_deployed_for_real(first_run, fleet, model_bytes, hub):
    _, run = first_run
    trixie = fleet[1]
    assert "ai-trixie" not in run.results["failed_hosts"], run
    # Docker from Debian's own packages, compose v2 as the docker CLI plugin.
    assert trixie.run("dpkg -s docker.io docker-compose >/dev/null && echo ok").stdout.strip() == "ok"
    assert re.search(r"version v?2\.", trixie.run("docker compose version").stdout)

    # The model: fetched from the Hub endpoint by commit, verified, with its marker.
    sha = hashlib.sha256(model_bytes).hexdigest()
    assert trixie.run(f"sha256sum /opt/backchat/models/{MODEL}").stdout.split()[0] == sha
    marker = yaml.safe_load(trixie.run(f"cat /opt/backchat/models/.{MODEL}.verified").stdout)
    assert marker["sha256"] == sha and marker["size"] == len(model_bytes)
    assert f"/{REPO}/resolve/{hub.commit}/{MODEL}" in marker["url"], "fetched by commit, not by branch"

    # Threads from the physical-core fact as read on the host.
    cores = int(trixie.run("python3 -c \"import os;print(len({open(f'/sys/devices/system/cpu/cpu{c}/topology/core_id').read()+open(f'/sys/devices/system/cpu/cpu{c}/topology/physical_package_id').read() for c in os.sched_getaffinity(0)}))\"").stdout)
    compose = yaml.safe_load(trixie.run("cat /opt/backchat/docker-compose.yaml").stdout)
    localai = compose["services"]["localai"]
    assert localai["environment"]["LOCALAI_THREADS"] == str(cores)
    assert localai["environment"]["LOCALAI_EXTERNAL_BACKENDS"] == "llama-cpp"
    # Chatbot UI reaches LocalAI through the front door's relay (which mends streams).
    assert compose["services"]["chatbot-ui"]["environment"]["OPENAI_API_HOST"] == "http://frontdoor:8079"

    model_config = yaml.safe_load(trixie.run("cat /opt/backchat/models/gpt-3.5-turbo.yaml").stdout)
    assert model_config["name"] == "gpt-3.5-turbo" and model_config["threads"] == cores
    assert model_config["parameters"]["model"] == MODEL

    assert trixie.run("stat -c %a /opt/backchat/.env").stdout.strip() == "600"

    app_config = yaml.safe_load(trixie.run("cat /opt/backchat/backstage/app-config.local.yaml").stdout)
    # Behind the HTTPS front door (the default for a LAN bind).
    assert app_config["ai_server"]["url"] == "https://ai.lab.test:3001"
    assert app_config["backend"]["csp"]["frame-src"] == ["'self'", "https://ai.lab.test:3001"]
    assert trixie.run("test -s /opt/backchat/backstage/backchat-catalog.yaml").returncode == 0
    assert "start = False" in run.stderr

    # The front door: its config, and a certificate for the host's names with a 0600 key.
    assert sorted(compose["services"]) == ["chatbot-ui", "frontdoor", "localai"]
    assert compose["services"]["frontdoor"]["ports"] == ["0.0.0.0:8080:8080", "0.0.0.0:3001:3001"]
    assert "listen 8080 ssl;" in trixie.run("cat /opt/backchat/frontdoor.conf").stdout
    assert trixie.run("stat -c %a /opt/backchat/tls /opt/backchat/tls/key.pem /opt/backchat/tls/api-key.conf"
                      ).stdout.split() == ["700", "600", "600"]
    cert = x509.load_pem_x509_certificate(trixie.run("cat /opt/backchat/tls/cert.pem").stdout.encode())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"ai.lab.test", "ai-trixie"} <= set(names.get_values_for_type(x509.DNSName))
    assert trixie.run("cat /opt/backchat/tls/key.pem").stdout not in run.stdout + run.stderr


def test_the_first_apply_reports_how_long_each_step_took(first_run, first_report):
    _, run = first_run
    entries = {entry["host"]: entry for entry in json.loads(first_report.read_text())}
    assert "phases" not in entries["ai-bookworm"], "refused while planning: no step ran there"
    steps = entries["ai-trixie"]["phases"]
    # What a sandbox host can do with start = False: Docker's packages and the model, for real.
    for name in ("docker", "model"):
        assert steps[name]["result"] == "changed" and steps[name]["seconds"] > 0, steps
    assert steps["docker"]["seconds"] > steps["model"]["seconds"], "apt installs Docker; the model is tiny"
    for name in ("images", "compose_up", "verify"):
        assert (steps[name]["result"], steps[name]["why"]) == ("skipped", "start = False"), steps
        assert steps[name]["seconds"] < 0.5, steps
    assert steps["total"]["seconds"] >= steps["docker"]["seconds"] + steps["model"]["seconds"] + steps["other"]["seconds"] - 0.2
    # The same table at the end of what pyinfra prints.
    table = run.stderr.split("--> Backchat time per step (on the controller, while executing):", 1)[1]
    header, row = table.strip().splitlines()[:2]
    assert header.split("  ")[0] == "host" and "Docker packages" in header and "compose up" in header, table
    assert row.startswith("ai-trixie") and row.split()[1] == f"{steps['docker']['seconds']:.1f}s", table
    assert "ai-trixie: skipped images, compose up, verify: start = False" in table


def test_compose_file_accepted_by_docker_compose(first_run, fleet):
    trixie = fleet[1]
    done = trixie.run("cd /opt/backchat && docker compose config -q && echo valid", check=False)
    assert done.stdout.strip() == "valid", done.stderr


@pytest.mark.parametrize("api_key", [None, "k3y-abcdefgh-0123456789"])
@pytest.mark.parametrize("backend, frontend", COMBINATIONS)
def test_every_variant_is_accepted_by_docker_compose(first_run, fleet, backend, frontend, api_key):
    """Every backend/frontend/key combination, rendered here, parsed by compose v2 there."""
    cfg = make_cfg(backend=backend, frontend=frontend, api_key=api_key)
    project = f"/tmp/variant-{backend}-{frontend}-{bool(api_key)}"
    rendered = stack.rendered_files(cfg, threads=3)
    rendered[f"{cfg.stack_dir}/.env"] = (secrets.reveal(stack.env_lines(cfg)), "0600")
    target = fleet[1].root / project.lstrip("/")
    target.mkdir(parents=True, exist_ok=True)
    for name in ("docker-compose.yaml", ".env"):
        (target / name).write_text(rendered[f"{cfg.stack_dir}/{name}"][0])
    done = fleet[1].run(f"cd {project} && docker compose config -q && echo valid", check=False)
    assert done.stdout.strip() == "valid", done.stderr


# Issue 18: a no-op re-run reads what it needs in one command: what the steps read whatever
# they find, each step's files with them (transport.read_ahead), and nothing again while
# executing. 1 today; 8 before read_ahead; 47 before issue 18. The goal is 20; this
# holds the line where it is.
NOOP_COMMANDS_MAX = 2


def test_second_run_changes_nothing(first_run, fleet, hub, tmp_path):
    inventory, _ = first_run
    trixie = fleet[1]
    before = snapshot(trixie)
    served_before = hub.bytes_served.get(MODEL, 0)
    trixie.run("rm -f /tmp/sha256-ran; true")
    commands_before = trixie.remote_commands()
    report = tmp_path / "again.json"
    run = run_deploy(inventory, *deploy_data(hub, report_path=report), limit="ai-trixie")
    commands = trixie.remote_commands() - commands_before
    assert run.returncode == 0, run
    assert run.changed_ops() == [], run
    (steps,) = [entry["phases"] for entry in json.loads(report.read_text()) if entry["host"] == "ai-trixie"]
    assert {name: steps[name]["result"] for name in ("docker", "model", "images")} == {
        "docker": "no-op", "model": "no-op", "images": "skipped"
    }, steps
    assert hub.bytes_served.get(MODEL, 0) == served_before, "the model was downloaded again"
    assert snapshot(trixie) == before, "a file changed on the second run"
    assert commands <= NOOP_COMMANDS_MAX, f"a no-op run ran {commands} commands on the host (sshd's count)"


def test_a_rerun_pinned_to_a_commit_asks_the_hub_nothing(first_run, fleet, hub, model_bytes, tmp_path):
    """The default settings pin a commit and its sha256: what the Hub said of a commit never
    changes, so after one run the controller asks it nothing (and starts no lookup process)."""
    inventory, _ = first_run
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}  # this controller's cache, empty
    pinned = deploy_data(hub, model_revision=hub.commit, model_sha256=hashlib.sha256(model_bytes).hexdigest())
    before = len(hub.requests)
    first = run_deploy(inventory, *pinned, limit="ai-trixie", env=env)
    assert first.returncode == 0 and first.changed_ops() == [], first
    asked = len(hub.requests)
    assert asked > before, "the first run with an empty cache asks the Hub"
    again = run_deploy(inventory, *pinned, limit="ai-trixie", env=env)
    assert again.returncode == 0 and again.changed_ops() == [], again
    assert hub.requests[asked:] == [], "a re-run pinned to a commit asked the Hub again"


def test_a_rerun_without_y_verifies_and_reports_without_asking(first_run, fleet, hub):
    """The README's command (no -y) on an unchanged host: nothing to confirm, so it goes on
    to verify and the report, with no terminal to answer a question (stdin closed). With a
    change to make, it still asks, and without an answer changes nothing."""
    inventory, _ = first_run
    trixie = fleet[1]

    def pyinfra_without_y():
        return subprocess.run(
            [sys.executable, "-m", "pyinfra", str(inventory), "deploy.py", "--limit", "ai-trixie",
             *[arg for item in deploy_data(hub) for arg in ("--data", item)]],
            cwd=PROJECT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
        )

    done = pyinfra_without_y()
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Press enter to execute" not in done.stderr, done.stderr[-4000:]
    assert "Starting operation: Backchat | Verify /v1/models lists the model" in done.stderr, done.stderr[-4000:]
    report = done.stderr.split("--> Backchat report:")[-1]
    assert "--> Backchat report:" in done.stderr and "ai-trixie" in report, done.stderr[-4000:]
    assert "installed, not started (start = False)" in report, report  # verify's own result here
    total = re.search(r"Grand total\s+\d+\s+(\S+)", done.stderr)  # hosts, then successes (changes)
    assert total and total.group(1) == "-", "a no-op run changed something"

    trixie.run("rm /opt/backchat/docker-compose.yaml")
    try:
        asked = pyinfra_without_y()
        assert "Press enter to execute" in asked.stderr, asked.stderr[-4000:]
        assert "Beginning operation run" not in asked.stderr, "a change ran without being confirmed"
        assert trixie.run("test -e /opt/backchat/docker-compose.yaml", check=False).returncode != 0
    finally:
        assert run_deploy(inventory, *deploy_data(hub), limit="ai-trixie").returncode == 0


def test_fleet_in_parallel_and_a_dead_host_is_named(fleet, hub, tmp_path):
    trixies = fleet[1:]
    hosts = {host.name: host.pyinfra_data() for host in trixies}
    inventory = write_inventory(tmp_path / "inventory.py", hosts)
    all_up = run_deploy(inventory, *deploy_data(hub))
    assert all_up.returncode == 0, all_up
    assert all_up.results["failed_hosts"] == []

    # One host's sshd goes away: the other two still complete, and the report says who failed.
    fleet[3].stop_sshd()
    try:
        for host in fleet[1:3]:
            host.run("rm -f /opt/backchat/docker-compose.yaml")  # work the next run must redo
        one_down = run_deploy(inventory, *deploy_data(hub, report_path=tmp_path / "report.json"))
    finally:
        fleet[3].start_sshd()
    assert one_down.returncode != 0, "a failed host must fail the run"
    assert one_down.results["failed_hosts"] == ["ai-trixie-3"], one_down
    for host in fleet[1:3]:
        assert host.run("test -s /opt/backchat/docker-compose.yaml").returncode == 0
    report = one_down.stderr.split("--> Backchat report:")[-1]
    lines = {line.split()[0]: line for line in report.strip().splitlines()[1:4]}
    assert "FAILED" in lines["ai-trixie-3"] and "could not connect" in report, report
    assert "not started" in lines["ai-trixie"] and "not started" in lines["ai-trixie-2"], report
    as_json = {row["host"]: row for row in json.loads((tmp_path / "report.json").read_text())}
    assert as_json["ai-trixie-3"]["result"] == "FAILED"
    assert as_json["ai-trixie"]["gui_url"] == "https://ai.lab.test:3001"


def test_existing_backstage_config_is_kept(fleet, hub, tmp_path):
    trixie = fleet[1]
    trixie.run(
        "mkdir -p /srv/backstage && cat > /srv/backstage/app-config.local.yaml <<'YAML'\n"
        "app:\n  title: Our Portal\n"
        "backend:\n  database:\n    client: pg\n  csp:\n    img-src: [\"'self'\", 'data:']\n"
        "ai_server:\n  url: http://localhost:3001\n"
        "catalog:\n  locations:\n    - type: url\n      target: https://example.test/catalog-info.yaml\n"
        "YAML"
    )
    trixie.run("chmod 0750 /srv/backstage")  # the app's directory, as its owners keep it
    inventory = write_inventory(tmp_path / "inventory.py", {trixie.name: trixie.pyinfra_data()})
    run = run_deploy(inventory, *deploy_data(hub, backstage_app_dir="/srv/backstage"))
    assert run.returncode == 0, run
    assert trixie.run("stat -c %a /srv/backstage").stdout.strip() == "750", "a directory we did not create was re-moded"
    config = yaml.safe_load(trixie.run("cat /srv/backstage/app-config.local.yaml").stdout)
    assert config["app"]["title"] == "Our Portal"
    assert config["backend"]["database"] == {"client": "pg"}
    assert config["backend"]["csp"]["img-src"] == ["'self'", "data:"]
    assert config["ai_server"]["url"] == "https://ai.lab.test:3001"
    targets = [location["target"] for location in config["catalog"]["locations"]]
    assert targets == ["https://example.test/catalog-info.yaml", "/srv/backstage/backchat-catalog.yaml"]
    previous = trixie.run("cat /srv/backstage/app-config.local.yaml.backchat.bak").stdout
    assert "http://localhost:3001" in previous


@pytest.mark.parametrize(
    "bad, words",
    [
        ("backend=nope", ["backend = 'nope'", "localai, textgen, llamacpp"]),
        ("threads=-4", ["threads = -4", "1 to 1024"]),
        ("model_file=tiny;touch /tmp/pwned.gguf", ["model_file", "plain file name"]),
    ],
)
def test_bad_input_stops_before_the_host_changes(fleet, hub, tmp_path, bad, words):
    host = fleet[2]
    before = host.run("find / -xdev -newer /etc/hostname -type f 2>/dev/null | grep -v '^/proc' | wc -l; ls /opt/backchat 2>/dev/null; ls /tmp").stdout
    inventory = write_inventory(tmp_path / "inventory.py", {host.name: host.pyinfra_data()})
    run = run_deploy(inventory, *deploy_data(hub), bad)
    assert run.returncode != 0
    for word in words:
        assert word in run.stderr, run
    assert "Traceback" not in run.stderr, run
    assert "Starting operation" not in run.stderr, "an operation ran despite the bad setting"
    assert not run.stdout.strip() or "results" not in run.stdout
    assert host.run("test -e /tmp/pwned.gguf", check=False).returncode != 0
    after = host.run("find / -xdev -newer /etc/hostname -type f 2>/dev/null | grep -v '^/proc' | wc -l; ls /opt/backchat 2>/dev/null; ls /tmp").stdout
    assert after == before


def test_a_taken_port_and_a_missing_user_refuse_the_host_untouched(fleet, hub, tmp_path):
    """sshd holds port 22: asking for it as localai_port is refused, naming the port, the
    setting and the process; a docker_users typo never creates an account."""
    host = fleet[2]
    before = host.run("getent passwd | wc -l; ls /opt; dpkg -l | wc -l", check=False).stdout
    inventory = write_inventory(tmp_path / "inventory.py", {host.name: host.pyinfra_data()})
    run = run_deploy(inventory, *deploy_data(hub, start="true", localai_port=22, docker_users='["nosuchuser"]'))
    assert run.returncode != 0, run
    assert "port 22 (localai_port) is already in use by sshd" in run.stderr, run
    assert "docker_users names users this host does not have: nosuchuser" in run.stderr, run
    assert host.run("getent passwd nosuchuser", check=False).returncode != 0
    assert host.run("getent passwd | wc -l; ls /opt; dpkg -l | wc -l", check=False).stdout == before


def test_dry_run_shows_the_whole_plan_and_changes_nothing(sandbox_factory, hub, tmp_path):
    (host,) = sandbox_factory(["trixie"], names=["ai-dry"])
    inventory = write_inventory(tmp_path / "inventory.py", {host.name: host.pyinfra_data()})
    before = host.run("ls -R /opt /etc/apt; dpkg -l | wc -l").stdout
    served = hub.bytes_served.get(MODEL, 0)
    done = subprocess.run(
        [sys.executable, "-m", "pyinfra", "--dry", str(inventory), "deploy.py",
         *[arg for item in deploy_data(hub) for arg in ("--data", item)]],
        cwd=PROJECT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    for step in ("Install Docker Engine and compose v2", "Download and verify tiny.gguf",
                 "Write docker-compose.yaml", "Write app-config.local.yaml", "Verify /v1/models"):
        assert step in done.stderr, done.stderr
    assert host.run("ls -R /opt /etc/apt; dpkg -l | wc -l").stdout == before
    assert hub.bytes_served.get(MODEL, 0) == served, "a dry run downloaded the model"
    assert "Starting operation" not in done.stderr


def test_secrets_are_stored_0600_and_never_printed(fleet, hub, model_bytes, tmp_path):
    host = fleet[2]
    token, key = "hf_gatedTOKEN0123456789", "sk-backchat-SECRET-42"
    hub.add_file("test/gated-GGUF", MODEL, model_bytes, gated=True, token=token)
    inventory = write_inventory(tmp_path / "inventory.py", {host.name: host.pyinfra_data()})
    env = {**os.environ, "HF_TOKEN": token, "BACKCHAT_API_KEY": key}
    run = run_deploy(
        inventory, *deploy_data(hub, model_repo="test/gated-GGUF", models_dir="/opt/gated"), env=env
    )
    assert run.returncode == 0, run
    assert token not in run.stdout + run.stderr and key not in run.stdout + run.stderr
    assert host.run("stat -c %a /opt/backchat/.env /opt/backchat/.hf-token-header").stdout.split() == ["600", "600"]
    assert f"BACKCHAT_API_KEY={key}" in host.run("cat /opt/backchat/.env").stdout
    assert key not in host.run("cat /opt/backchat/docker-compose.yaml /opt/gated/gpt-3.5-turbo.yaml").stdout

    # Without the token the gated repo is refused with the fix named.
    env.pop("HF_TOKEN")
    refused = run_deploy(
        inventory, *deploy_data(hub, model_repo="test/gated-GGUF", models_dir="/opt/gated-2"), env=env
    )
    assert refused.returncode != 0 and "HF_TOKEN" in refused.stderr, refused
    # Every host failed, so pyinfra stops early ("No hosts remaining"); the report still comes.
    report = refused.stderr.split("--> Backchat report:")[-1]
    assert "FAILED" in report and "HF_TOKEN" in report, refused


def test_no_secret_in_any_output_of_any_pyinfra_command(fleet, hub, model_bytes, tmp_path):
    """Canary secrets through every command and flag a user may try: the run, a re-run with
    another key under --dry --diff (the .env exists and would change), -vv, --debug,
    debug-inventory, the report and its JSON. None may show either secret."""
    host = fleet[2]
    token, key, new_key = "hf_CANARYtoken0123456789", "CANARY-api-key-0123456789", "CANARY-new-key-9876543210"
    hub.add_file("test/canary-GGUF", MODEL, model_bytes, gated=True, token=token)
    inventory = write_inventory(tmp_path / "inventory.py", {host.name: host.pyinfra_data()})
    report_json = tmp_path / "report.json"
    data = deploy_data(hub, model_repo="test/canary-GGUF", models_dir="/opt/canary", report_path=str(report_json))
    env = {**os.environ, "HF_TOKEN": token, "BACKCHAT_API_KEY": key}
    first = run_deploy(inventory, *data, env=env)
    assert first.returncode == 0, first
    outputs = {"run": first.stdout + first.stderr, "report.json": report_json.read_text()}

    def pyinfra(*flags, command="deploy.py", key_now=key):
        done = subprocess.run(
            [sys.executable, "-m", "pyinfra", *flags, str(inventory), command,
             *[arg for item in data for arg in ("--data", item)]],
            cwd=PROJECT, capture_output=True, text=True, timeout=600,
            env={**env, "BACKCHAT_API_KEY": key_now},
        )
        return done.stdout + done.stderr

    outputs["--dry --diff, another key"] = pyinfra("--dry", "--diff", key_now=new_key)
    assert ".env (it holds a secret: no diff is shown)" in outputs["--dry --diff, another key"]
    outputs["-y -vv"] = pyinfra("-y", "-vv")
    outputs["-y --debug"] = pyinfra("-y", "--debug")
    outputs["debug-inventory"] = pyinfra("--debug", command="debug-inventory")
    assert "ssh_hostname" in outputs["debug-inventory"], "debug-inventory printed no host data at all"
    for name, text in outputs.items():
        for secret in (token, key, new_key):
            assert secret not in text, f"{secret[:6]}... printed by {name}"
    assert host.run("stat -c %a /opt/backchat/.env /opt/backchat/.hf-token-header").stdout.split() == ["600", "600"]


def test_one_backstage_host_describes_the_whole_lab(fleet, hub, tmp_path):
    """Issue 14: a lab has one Backstage. The ``backstage`` group's host gets the config
    and catalog for every AI host (entity names carry each host's name); the AI hosts get
    the stack and no Backstage config; the Backstage host gets no stack. A re-run changes
    nothing."""
    portal, ai_1, ai_2 = fleet[0], fleet[1], fleet[2]  # bookworm needs no Docker to hold Backstage
    key = "sk-lab-key-SECRET-0123456789"
    for host in (ai_1, ai_2):
        host.run("rm -rf /opt/backchat/backstage")
    inventory = write_inventory(
        tmp_path / "inventory.py",
        {host.name: {**host.pyinfra_data(), "public_address": f"{host.name}.lab.test"} for host in (ai_1, ai_2)},
        backstage={portal.name: {**portal.pyinfra_data(), "backstage_app_dir": "/srv/portal", "ai_server_host": ai_2.name}},
    )
    data = [item for item in deploy_data(hub) if not item.startswith("public_address=")]
    env = {**os.environ, "BACKCHAT_API_KEY": key}
    run = run_deploy(inventory, *data, env=env)
    assert run.returncode == 0, run

    config = yaml.safe_load(portal.run("cat /srv/portal/app-config.local.yaml").stdout)
    assert config["ai_server"]["url"] == f"https://{ai_2.name}.lab.test:3001"
    assert config["backend"]["csp"]["connect-src"] == [
        "'self'", *sorted(f"https://{host.name}.lab.test:8080" for host in (ai_1, ai_2))]
    endpoints = config["proxy"]["endpoints"]
    assert {route: endpoint["target"] for route, endpoint in endpoints.items()} == {
        f"/backchat-{host.name}-localai": f"https://{host.name}.lab.test:8080" for host in (ai_1, ai_2)}
    catalog = portal.run("cat /srv/portal/backchat-catalog.yaml").stdout
    names = {entity["metadata"]["name"] for entity in yaml.safe_load_all(catalog) if entity}
    assert names == {"backchat"} | {
        f"backchat-{host.name}-{part}" for host in (ai_1, ai_2) for part in ("localai", "chatbot-ui", "localai-api")}
    assert key not in catalog + yaml.safe_dump(config) and key not in run.stdout + run.stderr
    assert portal.run("test -e /opt/backchat/docker-compose.yaml", check=False).returncode != 0, "the Backstage host got a stack"
    for host in (ai_1, ai_2):
        assert host.run("test -s /opt/backchat/docker-compose.yaml").returncode == 0
        assert host.run("test -e /opt/backchat/backstage/app-config.local.yaml", check=False).returncode != 0
    report = run.stderr.split("--> Backchat report:")[-1]
    assert "/srv/portal/app-config.local.yaml" in report and "BACKCHAT_API_KEY" in report, report

    again = run_deploy(inventory, *data, env=env)
    assert again.returncode == 0, again
    assert again.changed_ops() == [], again.changed_ops()


def test_a_gateway_host_gets_the_gateway_and_backstage_points_at_it(fleet, hub, tmp_path):
    """Issue 15: the ``gateway`` group's host gets the lab's gateway (its own compose
    project, HAProxy's config over every AI host, the relay, its certificate) and no stack;
    each AI host's Backstage config points at the gateway. An AI host added to the
    inventory joins the pool on the next run. What HAProxy does with that file is
    tests/e2e/test_gateway.py; here, the file the deploy wrote is accepted by HAProxy. A
    re-run changes nothing; status.py names what is wrong on the gateway host (no Docker
    daemon runs here); uninstall.py takes the gateway away."""
    ai_1, ai_2, door = fleet[1], fleet[2], fleet[3]
    key = "sk-gateway-lab-SECRET-0123456789"
    for host in (ai_1, ai_2):
        host.run("rm -rf /opt/backchat/backstage /opt/backchat/gateway")
    door.run("rm -rf /opt/backchat")  # another test may have made it an AI host

    def lab_of(*hosts):
        return write_inventory(
            tmp_path / "inventory.py",
            {host.name: {**host.pyinfra_data(), "public_address": f"{host.name}.lab.test"} for host in hosts},
            gateway={door.name: {**door.pyinfra_data(), "public_address": "gw.lab.test"}},
        )

    data = [item for item in deploy_data(hub) if not item.startswith("public_address=")]
    env = {**os.environ, "BACKCHAT_API_KEY": key}
    one = run_deploy(lab_of(ai_1), *data, env=env)
    assert one.returncode == 0, one
    config = door.run("cat /opt/backchat/gateway/haproxy.cfg").stdout
    assert f"server {ai_1.name} " in config and f"server {ai_2.name} " not in config
    inventory = lab_of(ai_1, ai_2)  # a host added to the lab
    run = run_deploy(inventory, *data, env=env)
    assert run.returncode == 0, run
    assert run.changed_ops(door.name) == ["Backchat | Write gateway/haproxy.cfg"], run.changed_ops(door.name)

    directory = "/opt/backchat/gateway"
    listing = door.run(f"cd {directory} && stat -c '%n %a' haproxy.cfg relay.conf docker-compose.yaml .env "
                       "tls tls/gateway.pem tls/ca.crt run").stdout.split("\n")
    assert [line for line in listing if line] == [
        "haproxy.cfg 644", "relay.conf 644", "docker-compose.yaml 644", ".env 600",
        "tls 700", "tls/gateway.pem 600", "tls/ca.crt 644", "run 700"]
    assert door.run("test -e /opt/backchat/docker-compose.yaml", check=False).returncode != 0, "the gateway got a stack"
    config = door.run(f"cat {directory}/haproxy.cfg").stdout
    servers = [line.split("#")[0].split()[1:3] for line in config.splitlines() if line.strip().startswith("server ai-")]
    assert servers == [[host.name, f"{host.name}.lab.test:8080"] for host in (ai_1, ai_2)], config
    assert f"verifyhost {ai_1.name}.lab.test" in config and key not in config
    compose = yaml.safe_load(door.run(f"cat {directory}/docker-compose.yaml").stdout)
    assert compose["name"] == gateway.PROJECT and compose["services"]["gateway"]["ports"] == ["0.0.0.0:443:443"]
    # The certificate names the gateway as browsers call it.
    pem = door.run(f"cat {directory}/tls/gateway.pem").stdout
    cert = x509.load_pem_x509_certificate(pem.encode())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "gw.lab.test" in names.get_values_for_type(x509.DNSName)

    # HAProxy accepts the file as written (the container's paths made this machine's).
    require(HAPROXY, "haproxy")
    (tmp_path / "run").mkdir()
    (tmp_path / "tls").mkdir()
    for name in ("gateway.pem", "ca.crt"):
        (tmp_path / "tls" / name).write_text(door.run(f"cat {directory}/tls/{name}").stdout)
    local = (config.replace(gateway.CONTAINER_TLS_DIR, str(tmp_path / "tls"))
             .replace(gateway.CONTAINER_RUN_DIR, str(tmp_path / "run")))
    (tmp_path / "haproxy.cfg").write_text(local)
    checked = check_haproxy(tmp_path / "haproxy.cfg", {"PATH": os.environ["PATH"], "BACKCHAT_API_KEY": key})
    assert checked.returncode == 0, checked.stdout + checked.stderr

    for host in (ai_1, ai_2):
        assert host.run("test -s /opt/backchat/docker-compose.yaml").returncode == 0
        local_config = yaml.safe_load(host.run("cat /opt/backchat/backstage/app-config.local.yaml").stdout)
        assert local_config["ai_server"]["url"] == "https://gw.lab.test"
        assert local_config["backend"]["csp"]["connect-src"] == ["'self'", "https://gw.lab.test"]
        assert set(local_config["proxy"]["endpoints"]) == {"/backchat-gateway"}
    assert door.run("test -e /opt/backchat/backstage/app-config.local.yaml", check=False).returncode != 0
    report = run.stderr.split("--> Backchat report:")[-1]
    assert "The lab's one endpoint (gateway ai-trixie-3): https://gw.lab.test (the GUI)" in report, report
    assert key not in run.stdout + run.stderr

    again = run_deploy(inventory, *data, env=env)
    assert again.returncode == 0, again
    assert again.changed_ops() == [], again.changed_ops()

    status = run_deploy(inventory, *data, env=env, command="status.py", limit=door.name)
    assert status.returncode != 0, status
    table = status.stderr.split("--> Backchat status:")[-1]
    assert f"{door.name}: unhealthy:" in table and "gateway, relay, chatbot-ui cannot be running" in table, table
    assert "gateway gateway: connection refused" in table, table

    gone = run_deploy(inventory, *data, env=env, command="uninstall.py", limit=door.name)
    assert gone.returncode == 0, gone
    assert door.run("test -e /opt/backchat/gateway", check=False).returncode != 0
    assert run_deploy(inventory, *data, env=env, command="uninstall.py", limit=door.name).changed_ops() == []
