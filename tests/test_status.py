"""status.py's judgement of a host, from fixed facts (pure: no host, no network)."""

from __future__ import annotations

import pytest

from backchat import stack, status
from tests.cfg import make_cfg
from tests.variants import COMBINATIONS

CORES = {"physical": 4, "logical": 8, "quota_cpus": None, "source": "topology"}
SHA = "ab" * 32


def running(service: str, image: str, health: str | None = "healthy", state: str = "running") -> dict:
    word = {"healthy": " (healthy)", "unhealthy": " (unhealthy)", "starting": " (health: starting)", None: ""}[health]
    return {"service": service, "image": image, "state": state, "status": f"Up 3 minutes{word}", "health": health}


def project(*rows: dict, docker: str = "ok") -> dict:
    return {"docker": docker, "containers": list(rows), "volumes": [], "networks": []}


def model_state(marker: dict | None = None, size: int = 100, mtime: int = 7) -> dict:
    return {"size": size, "mtime": mtime, "part_size": 0, "marker": marker}


GOOD_MARKER = {"sha256": SHA, "size": 100, "mtime": 7}


@pytest.fixture
def cfg():
    return make_cfg(public_address="ai-01.lab", model_sha256=SHA)


def healthy_project(cfg) -> dict:
    return project(running("localai", cfg.localai_image), running("chatbot-ui", cfg.chatbot_ui_image, health=None))


def test_a_stack_running_its_pinned_images_is_healthy(cfg):
    rows, problems = status.containers(cfg, healthy_project(cfg))
    assert problems == []
    assert [(row["service"], row["state"], row["image"] == row["pinned"]) for row in rows] == [
        ("localai", "running", True), ("chatbot-ui", "running", True)
    ]
    assert status.container_summary(rows) == "localai running (healthy), chatbot-ui running"
    assert status.image_summary(rows) == f"localai {cfg.localai_image}, chatbot-ui {cfg.chatbot_ui_image}"
    rows[0]["image"] = "localai/localai:latest"
    assert status.image_summary(rows).startswith(f"localai localai/localai:latest (pinned: {cfg.localai_image}), ")


def test_no_containers_is_unhealthy_with_the_reason(cfg):
    rows, problems = status.containers(cfg, project())
    assert [row["state"] for row in rows] == ["missing", "missing"]
    assert problems == [
        "localai has no container (not started: start = False, or removed)",
        "chatbot-ui has no container (not started: start = False, or removed)",
    ]


@pytest.mark.parametrize("docker, words", [("missing", "Docker is not installed"), ("unreachable: Cannot connect", "Docker is unreachable: Cannot connect")])
def test_docker_not_answering_is_named(cfg, docker, words):
    assert status.containers(cfg, project(docker=docker)) == ([], [f"{words}: localai, chatbot-ui cannot be running"])


def test_a_stopped_an_unhealthy_and_an_unpinned_container_are_each_named(cfg):
    _, problems = status.containers(cfg, project(
        running("localai", "localai/localai:latest", health="unhealthy"),
        running("chatbot-ui", cfg.chatbot_ui_image, health=None, state="exited"),
    ))
    assert problems[0].startswith("localai is running but unhealthy")
    assert problems[1] == f"localai runs localai/localai:latest, but localai_image pins {cfg.localai_image}"
    assert problems[2].startswith("chatbot-ui is exited")


def test_the_model_verified_by_its_marker(cfg):
    assert status.model_problem(cfg, model_state(GOOD_MARKER)) is None


@pytest.mark.parametrize(
    "state, words",
    [
        (model_state(size=None), "is missing"),
        (model_state(None), "marker /opt/backchat/models/.mistral-7b-openorca.Q4_K_M.gguf.verified is missing or unreadable"),
        (model_state({"sha256": "cd" * 32, "size": 100, "mtime": 7}), "pins " + SHA),
        (model_state(GOOD_MARKER, mtime=8), "changed since it was verified"),
        (model_state(GOOD_MARKER, size=99), "changed since it was verified"),
    ],
    ids=["no file", "corrupted marker", "other sha256", "touched", "truncated"],
)
def test_a_model_not_as_verified_is_named(cfg, state, words):
    assert words in status.model_problem(cfg, state)


def test_an_unpinned_sha256_trusts_the_marker_of_an_unchanged_file():
    cfg = make_cfg(public_address="ai-01.lab", model_sha256=None)
    assert status.model_problem(cfg, model_state({"sha256": "cd" * 32, "size": 100, "mtime": 7})) is None


@pytest.mark.parametrize("backend, frontend", COMBINATIONS)
def test_threads_are_read_back_from_the_compose_file_we_render(backend, frontend):
    cfg = make_cfg(backend=backend, frontend=frontend, api_key="k3y-abcdefgh-0123456789")
    assert status.threads_in_compose(stack.render("docker-compose.yaml.j2", cfg, 5)) == 5


def test_threads_missing_or_not_the_cores_are_problems():
    assert status.threads_in_compose(None) is None
    assert status.threads_in_compose("services: [") is None
    assert "no thread count" in status.threads_problem(None, 4, CORES)
    assert "runs 8 threads" in status.threads_problem(8, 4, CORES) and "4 physical cores" in status.threads_problem(8, 4, CORES)
    assert status.threads_problem(4, 4, CORES) is None


def test_assess_gathers_the_urls_and_every_problem(cfg):
    compose = stack.render("docker-compose.yaml.j2", cfg, 4)
    entry, problems = status.assess(cfg, healthy_project(cfg), model_state(GOOD_MARKER), compose, CORES)
    assert problems == []
    assert entry["gui_url"] == "http://ai-01.lab:3001"
    assert entry["backends"] == {"localai": "http://ai-01.lab:8080"}
    assert entry["threads"] == "4 (4 physical cores)" and entry["model"].endswith(" verified")

    entry, problems = status.assess(cfg, project(), model_state(None), None, CORES)
    assert entry["containers"] == "localai missing, chatbot-ui missing"
    assert len(problems) == 4 and "NOT verified" in entry["model"]


# --- the lab's gateway -----------------------------------------------------------------------


def test_a_gateway_running_its_pins_with_every_host_in_rotation_is_healthy(cfg):
    from backchat.gateway import Standing
    from backchat.verify import Result

    rows = project(running("gateway", cfg.gateway_image, health=None), running("relay", cfg.frontdoor_image, health=None),
                   running("chatbot-ui", cfg.chatbot_ui_image, health=None))
    results = [Result("gateway", "https://gw", True, 0.1), Result("rotation", "stats", True, 0.0)]
    standings = [Standing("ai-01", "UP", "L7OK/200", ""), Standing("ai-02", "UP", "L7OK/200", "")]
    entry, problems = status.assess_gateway(cfg, rows, results, standings)
    assert problems == []
    assert entry["gateway_containers"] == "gateway running, relay running, chatbot-ui running"
    assert entry["in_rotation"] == "in rotation: ai-01, ai-02" and entry["gateway_url"] == "http://ai-01.lab:443"


def test_a_host_out_of_the_gateways_rotation_and_an_unpinned_gateway_are_named(cfg):
    from backchat.gateway import Standing
    from backchat.verify import Result

    rows = project(running("gateway", "haproxy:2.6", health=None), running("relay", cfg.frontdoor_image, health=None))
    results = [Result("gateway", "https://gw", True, 0.1), Result("rotation", "stats", False, 0.0, detail="x")]
    standings = [Standing("ai-01", "UP", "L7OK/200", ""), Standing("ai-02", "DOWN", "L7RSP", "HTTP content check did not match")]
    _, problems = status.assess_gateway(cfg, rows, results, standings)
    assert "gateway runs haproxy:2.6, but gateway_image pins haproxy:3.4.2" in problems
    assert "chatbot-ui has no container (not started: start = False, or removed)" in problems
    assert "ai-02 (DOWN: L7RSP, HTTP content check did not match) is out of the gateway's rotation" in problems
