"""Day two on real Debian 13 roots over SSH: status.py, then uninstall.py, then a fresh deploy.

Two sandbox hosts (see test_realhosts, whose Hub stand-in and settings these reuse) are
deployed with start = False: no Docker daemon runs there, so status must call both
unhealthy and say why, and name a corrupted model marker on one of them. Uninstall puts
the Backstage config back, removes our files (not through a planted link), leaves Docker
and, unless asked, the model; a second uninstall changes nothing; a deploy then works again.
The tests run in order, each on the state the one before left.
"""

from __future__ import annotations

import json

import pytest

from testbed.deploy_runner import run_deploy, write_inventory
from tests.e2e.test_realhosts import MODEL, deploy_data, hub, model_bytes, snapshot  # noqa: F401 (fixtures)

pytestmark = pytest.mark.realhost

APP = "/srv/backstage"
THEIR_CONFIG = "app:\n  title: Our Portal\nai_server:\n  url: http://localhost:3001\n"
MARKER = f"/opt/backchat/models/.{MODEL}.verified"


@pytest.fixture(scope="module")
def fleet(sandbox_factory):
    # Overrides test_realhosts' fleet for its hub fixture: the hub binds once hosts exist.
    return sandbox_factory(["trixie", "trixie"], names=["ai-day2", "ai-day2-b"])


@pytest.fixture(scope="module")
def day2(fleet, hub, tmp_path_factory):
    """Both hosts deployed; the first into a Backstage app that has its own local config."""
    first, second = fleet
    first.run(f"mkdir -p {APP} && printf '%s' '{THEIR_CONFIG}' > {APP}/app-config.local.yaml")
    workdir = tmp_path_factory.mktemp("day2")
    inventory = write_inventory(
        workdir / "inventory.py",
        {
            first.name: {**first.pyinfra_data(), "backstage_app_dir": APP},
            second.name: second.pyinfra_data(),
        },
    )
    run = run_deploy(inventory, *deploy_data(hub))
    assert run.returncode == 0, run
    return inventory, workdir


def changed_nothing(run) -> bool:
    """No operation reported a change. When every host failed, pyinfra stops before its
    --json results ("No hosts remaining"): then its log must show no change either."""
    if run.stdout.strip():
        return run.changed_ops() == []
    return "] Success" not in run.stderr


def rows(path) -> dict[str, dict]:
    return {row["host"]: row for row in json.loads(path.read_text())}


def test_status_names_every_unhealthy_host_and_why_and_changes_nothing(day2, fleet, hub):
    inventory, workdir = day2
    first, second = fleet
    second.run(f"echo 'not json {{' > {MARKER}")  # a corrupted marker
    before = [snapshot(host) for host in fleet]
    report = workdir / "status.json"
    run = run_deploy(inventory, *deploy_data(hub, report_path=report), command="status.py")
    assert run.returncode != 0, "unhealthy hosts must fail the run"
    assert changed_nothing(run), run
    assert [snapshot(host) for host in fleet] == before
    table = run.stderr.split("--> Backchat status:")[-1]
    found = rows(report)
    for name in (first.name, second.name):
        row = found[name]
        assert row["result"] == "UNHEALTHY", row
        # No Docker daemon runs in a sandbox root: nothing can be running, and status says so.
        assert "Docker is unreachable" in row["failure"] and "localai, chatbot-ui, frontdoor cannot be running" in row["failure"]
        assert "/v1/models" in row["failure"] and row["models_listed"] == {"localai": False}
        # Behind the HTTPS front door (the default for a LAN bind).
        assert row["gui_url"] == "https://ai.lab.test:3001" and row["backends"] == {"localai": "https://ai.lab.test:8080"}
        assert row["threads"].split()[0].isdigit(), row
        assert f"{name}: unhealthy:" in table
    assert found[first.name]["model"] == f"{MODEL} verified"
    assert "marker" not in found[first.name]["failure"]
    assert found[second.name]["model"] == f"{MODEL} NOT verified"
    assert f"{MARKER} is missing or unreadable" in found[second.name]["failure"]


def test_an_unreachable_host_hides_nobody_elses_status(day2, fleet, hub):
    inventory, workdir = day2
    report = workdir / "status-one-down.json"
    fleet[1].stop_sshd()
    try:
        run = run_deploy(inventory, *deploy_data(hub, report_path=report), command="status.py")
    finally:
        fleet[1].start_sshd()
    assert run.returncode != 0
    found = rows(report)
    assert "could not connect" in found[fleet[1].name]["failure"]
    assert found[fleet[0].name]["model"] == f"{MODEL} verified", "the reachable host's results are all there"
    assert found[fleet[0].name]["result"] == "UNHEALTHY"


def test_an_unknown_setting_is_refused_before_uninstalling(day2, hub):
    inventory, _ = day2
    run = run_deploy(inventory, *deploy_data(hub), "remove_modle=true", command="uninstall.py")
    assert run.returncode != 0 and "did you mean remove_model?" in run.stderr, run
    assert "Starting operation" not in run.stderr


def test_uninstall_restores_backstage_keeps_docker_and_the_model_and_follows_no_link(day2, fleet, hub):
    inventory, _ = day2
    first, second = fleet
    assert first.run(f"test -f {APP}/app-config.local.yaml.backchat.bak").returncode == 0
    # A link planted where our bin directory was: its target is not ours.
    second.run("mkdir /root/elsewhere && mv /opt/backchat/bin/fetch-model /root/elsewhere/ && "
               "rmdir /opt/backchat/bin && ln -s /root/elsewhere /opt/backchat/bin")
    run = run_deploy(inventory, *deploy_data(hub), command="uninstall.py")
    assert run.returncode == 0, run

    # The app's own config is back byte for byte; our catalog and backup are gone.
    assert first.run(f"cat {APP}/app-config.local.yaml").stdout == THEIR_CONFIG
    assert first.run(f"ls -A {APP}").stdout.split() == ["app-config.local.yaml"]
    # The file we created is gone, with the directory it made.
    assert second.run("test -e /opt/backchat/backstage", check=False).returncode != 0
    for host in fleet:
        assert host.run("dpkg -s docker.io >/dev/null && echo kept").stdout.strip() == "kept"
        assert host.run(f"test -s /opt/backchat/models/{MODEL} && test -f {MARKER}").returncode == 0
        assert host.run("test -e /opt/backchat/docker-compose.yaml || test -e /opt/backchat/.env || "
                        "test -e /opt/backchat/models/gpt-3.5-turbo.yaml", check=False).returncode != 0
    assert sorted(first.run("find /opt/backchat").stdout.split()) == sorted(
        ["/opt/backchat", "/opt/backchat/models", f"/opt/backchat/models/{MODEL}", MARKER,
         f"/opt/backchat/models/{MODEL}.lock"]  # fetch-model.sh's lock stays with the model
    )
    assert second.run("test -f /root/elsewhere/fetch-model && test -L /opt/backchat/bin").returncode == 0
    assert "left alone, not followed: /opt/backchat/bin/fetch-model (unsafe)" in run.stderr, run


def test_a_second_uninstall_changes_nothing(day2, fleet, hub):
    inventory, _ = day2
    before = [host.run("find /opt /srv | sort").stdout for host in fleet]
    run = run_deploy(inventory, *deploy_data(hub), command="uninstall.py")
    assert run.returncode == 0, run
    assert run.changed_ops() == [], run
    assert [host.run("find /opt /srv | sort").stdout for host in fleet] == before


def test_remove_model_takes_the_model_and_our_directories(day2, fleet, hub):
    inventory, _ = day2
    first = fleet[0]
    run = run_deploy(inventory, *deploy_data(hub), "remove_model=true", command="uninstall.py", limit=first.name)
    assert run.returncode == 0, run
    assert first.run("test -e /opt/backchat", check=False).returncode != 0
    assert first.run(f"cat {APP}/app-config.local.yaml").stdout == THEIR_CONFIG


def test_a_fresh_deploy_after_uninstall_works(day2, fleet, hub, model_bytes):  # noqa: F811
    inventory, _ = day2
    first = fleet[0]
    served = hub.bytes_served.get(MODEL, 0)
    run = run_deploy(inventory, *deploy_data(hub), limit=first.name)
    assert run.returncode == 0, run
    assert hub.bytes_served.get(MODEL, 0) - served == len(model_bytes), "the removed model is fetched again"
    for path in ("/opt/backchat/docker-compose.yaml", "/opt/backchat/.env", MARKER, f"{APP}/backchat-catalog.yaml"):
        assert first.run(f"test -s {path}").returncode == 0, path
    assert first.run(f"cat {APP}/app-config.local.yaml.backchat.bak").stdout == THEIR_CONFIG
    # And a deploy after that keeps the app's own file as the backup (not ours).
    again = run_deploy(inventory, *deploy_data(hub, public_address="ai2.lab.test"), limit=first.name)
    assert again.returncode == 0, again
    assert first.run(f"cat {APP}/app-config.local.yaml.backchat.bak").stdout == THEIR_CONFIG
    assert "ai2.lab.test" in first.run(f"cat {APP}/app-config.local.yaml").stdout
