"""Day two: what each host runs, checked against the settings, changing nothing.

    pyinfra inventory.py status.py

Per host: each service's container and its health, the image it runs against the pinned
one, the model file and its verification marker, the threads in the compose file against
the physical cores, the URLs, and whether ``/v1/models`` lists the model right now (the
deploy's own verify, one attempt). On the lab's gateway host: its containers and images,
the model through the gateway, and which AI hosts are in its rotation (a host out of it is
a problem). A host with any problem fails with the problems named, so the run exits
non-zero; the others still report. The table (and ``report_path``'s JSON) comes from the
deploy's report.
"""

from __future__ import annotations

import dataclasses

import yaml
from pyinfra import host, state
from pyinfra.api import deploy, operation
from pyinfra.context import state as current_state
from pyinfra.facts.files import FileContents

from backchat import addresses, gateway, model, outcomes, report, stack, transport, verify
from backchat.addresses import api_urls, gateway_url, gui_url, public_address
from backchat.facts import COMPOSE_PROJECT, ComposeProject, PhysicalCores, text_of
from backchat.model_source import is_verified
from backchat.run_settings import pool_hosts, role, settings_for
from backchat.settings import DEFAULTS

COLUMNS = ("host", "result", "containers", "model", "threads", "gui_url")
# The setting that pins each service's image.
IMAGE_SETTINGS = {
    "localai": "localai_image",
    "llamacpp": "llamacpp_image",
    "textgen": "textgen_image",
    "chatbot-ui": "chatbot_ui_image",
    "frontdoor": "frontdoor_image",
}
# The same for the gateway's own project (its relay is the front door's nginx).
GATEWAY_IMAGE_SETTINGS = {"gateway": "gateway_image", "relay": "frontdoor_image", "chatbot-ui": "chatbot_ui_image"}
# libyaml when PyYAML has it: the compose file in 0.4 ms instead of 5 ms of CPU per host.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def containers(cfg, project: dict, services: list[str] | None = None,
               image_settings: dict[str, str] = IMAGE_SETTINGS) -> tuple[list[dict], list[str]]:
    """(one row per service: state, health, image and pinned image; the problems).
    ``services``: the project's (default: the host's stack)."""
    services = services if services is not None else addresses.compose_services(cfg)
    if project["docker"] != "ok":
        why = "Docker is not installed" if project["docker"] == "missing" else f"Docker is {project['docker']}"
        return [], [f"{why}: {', '.join(services)} cannot be running"]
    found = {row.get("service"): row for row in project["containers"]}
    rows, problems = [], []
    for service in services:
        pinned = getattr(cfg, image_settings[service])
        row = found.get(service)
        if row is None:
            rows.append({"service": service, "state": "missing", "health": None, "image": None, "pinned": pinned})
            problems.append(f"{service} has no container (not started: start = False, or removed)")
            continue
        rows.append({"service": service, "state": row["state"], "health": row["health"], "image": row["image"], "pinned": pinned})
        if row["state"] != "running":
            problems.append(f"{service} is {row['state']} ({row['status']})")
        elif row["health"] in ("unhealthy", "starting"):
            problems.append(f"{service} is running but {row['health']} ({row['status']})")
        if row["image"] != pinned:
            problems.append(f"{service} runs {row['image']}, but {image_settings[service]} pins {pinned}")
    return rows, problems


def container_summary(rows: list[dict]) -> str:
    return ", ".join(
        f"{row['service']} {row['state']}" + (f" ({row['health']})" if row["health"] else "") for row in rows
    )


def image_summary(rows: list[dict]) -> str:
    return ", ".join(
        f"{row['service']} {row['image']}" + ("" if row["image"] == row["pinned"] else f" (pinned: {row['pinned']})")
        for row in rows
        if row["image"]
    )


def model_problem(cfg, file_state: dict) -> str | None:
    """Why the host's model file is not the verified one (None: it is, as its marker says)."""
    marker = file_state.get("marker") or {}
    if file_state.get("size") is None:
        return f"the model {cfg.model_path} is missing"
    if not marker.get("sha256"):
        return (
            f"the model's marker {model.marker_path(cfg)} is missing or unreadable: "
            "run deploy.py with --data model_verify=full to hash the file again"
        )
    if cfg.model_sha256 and marker["sha256"] != cfg.model_sha256:
        return f"the model's marker records sha256 {marker['sha256']}, but model_sha256 pins {cfg.model_sha256}"
    if not is_verified(file_state, marker["sha256"], marker.get("size")):
        return "the model changed since it was verified (its size or mtime differs from its marker)"
    return None


def threads_in_compose(text: str | None) -> int | None:
    """The thread count the compose file gives its backend (None: no file, or none there)."""
    try:
        compose = yaml.load(text or "", Loader=_SafeLoader) or {}
    except yaml.YAMLError:
        return None
    services = compose.get("services") if isinstance(compose, dict) else None
    for name, service in (services or {}).items():
        if not isinstance(service, dict):
            continue
        environment = service.get("environment") or {}
        if name == "localai" and "LOCALAI_THREADS" in environment:
            return int(environment["LOCALAI_THREADS"])
        args = service.get("command") if name == "llamacpp" else str(environment.get("EXTRA_LAUNCH_ARGS", "")).split()
        if isinstance(args, list) and "--threads" in args[:-1]:
            return int(args[args.index("--threads") + 1])
    return None


def threads_problem(in_use: int | None, wanted: int, cores: dict) -> str | None:
    if in_use is None:
        return "no thread count in the compose file (is docker-compose.yaml there?)"
    if in_use != wanted:
        return f"the compose file runs {in_use} threads, the settings and {cores['physical']} physical cores give {wanted}: run deploy.py"
    return None


def assess(cfg, project: dict, file_state: dict, compose_text: str | None, cores: dict) -> tuple[dict, list[str]]:
    """Everything but the live /v1/models check, from the facts: (report fields, problems)."""
    rows, problems = containers(cfg, project)
    wanted = stack.thread_count(cfg, cores)
    in_use = threads_in_compose(compose_text)
    found_model = model_problem(cfg, file_state)
    found_threads = threads_problem(in_use, wanted, cores)
    problems += [problem for problem in (found_model, found_threads) if problem]
    address = public_address(cfg)
    entry = {
        "services": rows,
        "containers": container_summary(rows) or "none",
        "images": image_summary(rows) or "none running",
        "model": f"{cfg.model_file} {'NOT verified' if found_model else 'verified'}",
        "model_path": cfg.model_path,
        "threads": f"{in_use if in_use is not None else '?'} ({cores['physical']} physical cores)",
        "backends": api_urls(cfg, address),
        "gui_url": gui_url(cfg, address),
        "ai_server_url": gui_url(cfg, address),
        "model_id": cfg.model_id,
    }
    return entry, problems


@operation(is_idempotent=False)
def check(cfg):
    """
    Report this host's stack against its settings; fail the host if anything is wrong.

    + cfg: the host's settings
    """
    if not current_state.is_executing:
        host.noop("will report the containers, images, model, threads and /v1/models")
        return
    compose, model_file, compose_file, cores = transport.read_together(host, [  # one command, not four
        (ComposeProject, {"project": COMPOSE_PROJECT}),
        model.file_fact(cfg),
        (FileContents, {"path": f"{cfg.stack_dir}/docker-compose.yaml"}),
        (PhysicalCores, {}),
    ])
    entry, problems = assess(cfg, compose, model_file, text_of(compose_file), cores)
    probe, address = verify.probe_for(cfg, host)
    once = dataclasses.replace(cfg, verify_timeout=0, verify_chat=False)  # one attempt, no question
    results = verify.check_all(once, address, probe)
    entry["models_listed"] = {result.service: result.ok for result in results}
    problems += [f"{result.service} {result.url}/v1/models: {result.detail}" for result in results if not result.ok]
    outcomes.record(host.name, verify="unhealthy" if problems else "healthy", **entry)
    for name in ("containers", "images", "model", "threads", "gui_url", "backends", "models_listed"):
        host.log_styled(f"{name}: {entry[name]}")
    if not problems:
        host.noop(f"healthy: every service runs its pinned image and {cfg.model_id} is listed")
        return
    # Failing needs a command; a healthy host yields none, so status never reports a change.
    yield outcomes.failing_command("unhealthy: " + "; ".join(problems))


def assess_gateway(cfg, project: dict, results: list, standings: list) -> tuple[dict, list[str]]:
    """The gateway host's status from its containers and one round of verify's checks
    through it: (report fields, problems). Every AI host out of rotation is a problem."""
    rows, problems = containers(cfg, project, list(gateway.SERVICES), GATEWAY_IMAGE_SETTINGS)
    problems += [f"gateway {result.service}: {result.detail}" for result in results if not result.ok]
    problems += [f"{each.describe()} is out of the gateway's rotation" for each in standings if not each.in_rotation]
    entry = {
        "gateway_services": rows,
        "gateway_containers": container_summary(rows) or "none",
        "gateway_images": image_summary(rows) or "none running",
        "gateway_url": gateway_url(cfg, public_address(cfg)),
        "in_rotation": gateway.summary(standings) if standings else "unknown",
    }
    return entry, problems


@operation(is_idempotent=False)
def check_gateway(cfg, pool):
    """
    Report the lab's gateway against its settings, and which AI hosts are in its rotation.

    + cfg: the gateway host's settings
    + pool: the AI hosts behind it (gateway.Member)
    """
    if not current_state.is_executing:
        host.noop("will report the gateway's containers, the model through it, and its rotation")
        return
    probe, address = verify.probe_for(cfg, host)
    once = dataclasses.replace(cfg, verify_timeout=0, verify_chat=False)  # one attempt
    results, standings = verify.check_gateway(once, gateway_url(cfg, address), probe,
                                              lambda: verify.read_rotation(cfg, pool, host), [m.host for m in pool])
    entry, problems = assess_gateway(cfg, host.get_fact(ComposeProject, project=gateway.PROJECT), results, standings)
    previous = outcomes.records().get(host.name, {})
    fields = {**entry, "containers": "; ".join(part for part in (previous.get("containers"), entry["gateway_containers"]) if part)}
    if not previous.get("gui_url"):
        fields["gui_url"] = entry["gateway_url"]
    unhealthy = bool(problems) or previous.get("verify") == "unhealthy"
    outcomes.record(host.name, verify="unhealthy" if unhealthy else "healthy", **fields)
    for name in ("gateway_containers", "gateway_images", "gateway_url", "in_rotation"):
        host.log_styled(f"{name}: {entry[name]}")
    if not problems:
        host.noop("healthy: the gateway runs its pinned images and every AI host is in rotation")
        return
    yield outcomes.failing_command("unhealthy: " + "; ".join(problems))


@deploy("Backchat status", data_defaults=DEFAULTS)
def status_backchat():
    cfg = settings_for(state, host)  # the same checks as the deploy: a typo is refused
    transport.prepare_run(state, host)  # TCP_NODELAY; no question when nothing changes; less CPU
    report.install(state, cfg.report_path, title="status", columns=COLUMNS)
    this = role(state.inventory, host)
    if this.serves_ai:
        check(name="Status of the stack, the model and /v1/models", cfg=cfg)
    if this.runs_gateway:
        check_gateway(name="Status of the lab's gateway and its rotation", cfg=cfg,
                      pool=stack.gateway_pool(pool_hosts(state)))
    if not (this.serves_ai or this.runs_gateway):
        outcomes.record(host.name, verify="no stack (the lab's Backstage host)")
        host.noop("the lab's Backstage host runs no stack")
