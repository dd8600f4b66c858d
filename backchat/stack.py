"""Steps 3 and 4: thread count from the physical cores, then the compose stack; on the lab's
gateway host, the gateway's own compose project (backchat/gateway.py).

The files are rendered on the controller (pure functions, unit-tested) and put on the host;
``compose up`` runs only when a file changed or a container does not match its file, so a
re-run touches no container.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pyinfra import host
from pyinfra.api import QuoteString, StringCommand, operation
from pyinfra.operations import files, server

from backchat import addresses, gateway, images, localai_backend, outcomes, own_files, phases, resources, secrets, tls
from backchat.facts import COMPOSE_PROJECT as PROJECT
from backchat.facts import ComposeStack, DockerImageTags, PhysicalCores, out_of_date

FRONTDOOR_CONF = "frontdoor.conf"
# Beside the front door's certificate: the nginx map that knows the API key (mode 0600).
DOOR_KEY_MAP = "api-key.conf"
# How long compose may wait for the containers of a rollback to start or become healthy
# (they ran on these files before; a first start or an upgrade may wait up to 1800 s).
ROLLBACK_WAIT_SECONDS = 600


def thread_count(cfg, cores: dict) -> int:
    """The ``threads`` setting if given, else one per physical core the host may use."""
    return cfg.threads or cores["physical"]


def textgen_args(cfg, threads: int) -> str:
    """Text Gen WebUI's launch flags (the image word-splits EXTRA_LAUNCH_ARGS)."""
    args = [
        "--listen", "--api", "--api-port", str(addresses.CONTAINER_PORTS["textgen"]),
        "--model", cfg.model_id, "--loader", "llama.cpp",
        "--threads", str(threads), "--threads-batch", str(threads),
        "--ctx-size", str(cfg.context_size), "--gpu-layers", "0",
        # Without a template in the GGUF it would format chats as Alpaca; the model speaks ChatML.
        "--chat-template-file", "user_data/instruction-templates/ChatML.yaml",
    ]
    if cfg.frontend != "textgen":
        # Its GUI can load and unload models and has no password: not run unless it is the GUI.
        args.append("--nowebui")
    if cfg.api_key and not addresses.behind_front_door(cfg):
        # It prints the key in its log at start (modules/api/script.py); behind the front
        # door, which checks the key itself, it gets none to print.
        args += ["--api-key", "${BACKCHAT_API_KEY:?BACKCHAT_API_KEY missing from .env}"]
    return " ".join(args)


def render(template: str, cfg, threads: int, **where) -> str:
    """A template rendered for the compose network; ``where`` replaces what only the
    network provides (the front door's upstreams, certificate directory, resolver, pid
    file), so the tests can run the same file beside real servers."""
    # Chatbot UI talks to the chosen backend; with frontend = textgen it isn't started.
    # Rendered here, on the controller, rather than by files.template on the way: the
    # rendered text is what the unit tests check.
    values = {
        "textgen_args": textgen_args(cfg, threads),
        "chat_backend_service": cfg.backend,
        "chat_api_host": addresses.chat_api_url(cfg),
        "relay": addresses.chat_relay(cfg),
        "ports": addresses.CONTAINER_PORTS,
        "doors": addresses.doors(cfg),
        "tls_dir": tls.CONTAINER_DIR,
        "docker_dns": True,
        "pid_file": "/run/nginx.pid",
        "key_map_file": DOOR_KEY_MAP,
        "backend_dir": localai_backend.host_dir(cfg),
        "written_to": f"{cfg.stack_dir}/{FRONTDOOR_CONF}",
    }
    return resources.render(template, cfg=cfg, threads=threads, **{**values, **where})


def env_lines(cfg) -> tuple:
    """The .env file's lines (docker compose reads the key from it; mode 0600)."""
    lines = ["# Secrets for docker compose (mode 0600). Written by backchat.\n"]
    if cfg.api_key:
        lines += ["BACKCHAT_API_KEY=", cfg.api_key, "\n"]
    return tuple(lines)


def door_key_lines(cfg) -> tuple:
    """The front door's key map (an nginx ``map``): 1 for the right Authorization header."""
    return ("map $http_authorization $backchat_key_ok {\n    default 0;\n    \"Bearer ", cfg.api_key, "\" 1;\n}\n")


def rendered_files(cfg, threads: int) -> dict[str, tuple[str, str]]:
    """Host path -> (content, mode) of every file the stack needs, .env aside (it holds a secret)."""
    return {path: (render(template, cfg, threads), mode) for path, (template, mode) in _templates(cfg).items()}


def _templates(cfg) -> dict[str, tuple[str, str]]:
    """Host path -> (template, mode) of each rendered file."""
    result = {f"{cfg.stack_dir}/docker-compose.yaml": ("docker-compose.yaml.j2", "0644")}
    if "localai" in cfg.services:
        result[f"{cfg.models_dir}/{cfg.model_id}.yaml"] = ("localai-model.yaml.j2", "0644")
    if addresses.behind_front_door(cfg):
        result[f"{cfg.stack_dir}/{FRONTDOOR_CONF}"] = ("frontdoor.conf.j2", "0644")
    return result


def _paths_written(cfg) -> list[str]:
    """Every path ``write`` looks at before writing: known from the settings alone."""
    tls_paths = certificate_paths(cfg) if addresses.behind_front_door(cfg) else ()
    return [cfg.stack_dir, f"{cfg.stack_dir}/.env", *_templates(cfg), *tls_paths]


def certificate_names(cfg) -> list[str]:
    """What the front door's certificate must name: what browsers and the controller call
    the host (its public address, inventory name and SSH address)."""
    names = [addresses.public_address(cfg), host.name, host.data.get("ssh_hostname") or ""]
    return [name for name in names if name and not name.startswith("@")] + (
        ["127.0.0.1", "localhost"] if host.name.startswith("@") else []
    )


def host_certificate(cfg) -> tls.HostCertificate:
    """This host's certificate (the front door's, and the gateway's on the gateway host)."""
    certificate = tls.host_certificate(cfg, host.name, certificate_names(cfg))
    outcomes.record(host.name, trust=certificate.trust or "your certificate's issuer")
    return certificate


def write_certificate(cfg, seen: dict[str, dict]) -> list:
    """The front door's certificate, its key and the API key map (both 0600) in
    ``stack_dir/tls``: their operations."""
    certificate = host_certificate(cfg)
    directory, cert, key, key_map = certificate_paths(cfg)
    own_files.directory(name="Create the front door's certificate directory", path=directory,
                        seen=seen.get(directory), mode="0700")
    return [
        own_files.file(name=f"Write {tls.HOST_DIR}/{tls.CERT_FILE}", dest=cert, content=certificate.cert_pem,
                       seen=seen.get(cert), mode="0644"),
        secrets.secret_file(name=f"Write {tls.HOST_DIR}/{tls.KEY_FILE} (0600)", dest=key,
                            lines=(certificate.key_pem,), seen=seen.get(key)),
    ] + ([secrets.secret_file(name=f"Write {tls.HOST_DIR}/{DOOR_KEY_MAP} (0600)", dest=key_map,
                              lines=door_key_lines(cfg), seen=seen.get(key_map))] if cfg.api_key else [])


def certificate_paths(cfg) -> tuple[str, str, str, str]:
    """The front door's certificate directory, certificate, key and API key map on the host."""
    directory = f"{cfg.stack_dir}/{tls.HOST_DIR}"
    return directory, f"{directory}/{tls.CERT_FILE}", f"{directory}/{tls.KEY_FILE}", f"{directory}/{DOOR_KEY_MAP}"


def reads(cfg) -> list[tuple[type, dict]]:
    """The facts steps 3 and 4 read whatever they find (``transport.read_ahead``)."""
    return [(PhysicalCores, {}), own_files.reading(_paths_written(cfg)),
            *([(DockerImageTags, {})] if cfg.start and cfg.image_archives else [])]


def tune() -> dict:
    """The host's physical cores (the fact the thread knobs are set from)."""
    return host.get_fact(PhysicalCores)


@dataclass(frozen=True)
class Plan:
    """What step 4 hands over: the stack's project, its services, the files it reads, and
    what this run changes in them."""

    project_dir: str
    services: list[str]
    files: list[str]  # every file the stack reads (what the last verified state keeps)
    files_changed: bool
    up_commands: Callable[[list[str]], list]  # stale services -> the commands that bring the stack up
    rollback_commands: list  # recreate every container on the files just restored


def write(cfg, threads: int) -> Plan | None:
    """The stack's files, then the images it needs; what starting it takes (for
    ``rollout``), or None with ``start = False``."""
    rendered = rendered_files(cfg, threads)
    env = f"{cfg.stack_dir}/.env"
    door = addresses.behind_front_door(cfg)
    # What is there now, in one command: each write below decides from it and reads nothing.
    seen = own_files.read(_paths_written(cfg))
    # No mode: a directory that already exists (maybe not ours) is never re-moded.
    own_files.directory(name="Create the stack directory", path=cfg.stack_dir, seen=seen.get(cfg.stack_dir))
    writes = {env: secrets.secret_file(name="Write .env (0600)", dest=env, lines=env_lines(cfg), seen=seen.get(env))}
    for path, (content, mode) in rendered.items():
        writes[path] = own_files.file(name=f"Write {Path(path).name}", dest=path, content=content,
                                      seen=seen.get(path), mode=mode)
    door_writes = write_certificate(cfg, seen) if door else []
    backend_changed = localai_backend.deliver(cfg)

    if not cfg.start:
        host.noop("start = False: the stack is written but not started")
        phases.skip("images", "start = False")
        phases.skip("compose_up", "start = False")
        return None
    # will_change costs no command here: the writes decide from what was read above.
    door_changed = any(write.will_change for write in door_writes)
    files_changed = door_changed or backend_changed or any(write.will_change for write in writes.values())
    with phases.step("images"):  # the report times each step on each host
        load_image_archives(cfg)
        pull_images(
            name="Pull the images the stack lacks",
            project_dir=cfg.stack_dir,
            services=addresses.compose_services(cfg),
            files_changed=files_changed,
        )
    # LocalAI reads its model config and registers its backends at start, nginx its
    # config and certificate; compose cannot see those files change.
    restart = (["localai"] if changed(writes, f"{cfg.models_dir}/{cfg.model_id}.yaml") or backend_changed else []) + (
        ["frontdoor"] if door_changed or changed(writes, f"{cfg.stack_dir}/{FRONTDOOR_CONF}") else [])
    base = _compose(cfg.stack_dir)
    return Plan(
        project_dir=cfg.stack_dir,
        services=addresses.compose_services(cfg),
        files=sorted([*writes, *(certificate_paths(cfg)[1:] if door else ())]),  # [0] is their directory
        files_changed=files_changed,
        up_commands=lambda stale: up_commands(base, stale, restart),
        rollback_commands=rollback_commands(cfg),
    )


def rollback_commands(cfg) -> list[StringCommand]:
    """Every container recreated on the files ``rollout`` just put back (LocalAI and the
    front door read theirs only as they start)."""
    return [StringCommand(*_compose(cfg.stack_dir), "up", "-d", "--force-recreate", "--remove-orphans",
                          "--wait", "--wait-timeout", str(ROLLBACK_WAIT_SECONDS))]


def changed(writes: dict, path: str) -> bool:
    """Will this run's write of ``path``, if it has one, change the file?"""
    return path in writes and writes[path].will_change


def gateway_files(cfg, pool: list[gateway.Member]) -> dict[str, str]:
    """Host path -> content of the gateway's files that hold no secret (all 0644)."""
    directory = gateway.directory(cfg)
    return {
        f"{directory}/{gateway.COMPOSE_FILE}": gateway.render_compose(cfg),
        f"{directory}/{gateway.CONFIG_FILE}": gateway.render_config(cfg, pool),
        f"{directory}/{gateway.RELAY_FILE}": gateway.render_relay(cfg),
    }


def gateway_pool(lab_hosts) -> list[gateway.Member]:
    """The gateway's pool: every AI host of the run (``(host, settings)``), where browsers reach it."""
    return gateway.members([(each.name, each_cfg, addresses.public_address(each_cfg, each))
                            for each, each_cfg in lab_hosts])


def write_and_start_gateway(cfg, pool: list[gateway.Member], load_archives: bool = True) -> None:
    """Step 4 on the lab's gateway host: its files, its certificate, then its own compose
    project (``backchat-gateway``, beside the host's stack if it is an AI host too).

    A host added to the inventory is in the pool after a re-run; HAProxy reloads its
    config without dropping the answers under way.
    """
    directory = gateway.directory(cfg)
    subdirectories = [f"{directory}/{name}" for name in (tls.HOST_DIR, "run")]
    env, ca, pem = f"{directory}/.env", f"{directory}/{tls.HOST_DIR}/{gateway.CA_FILE}", f"{directory}/{tls.HOST_DIR}/{gateway.PEM_FILE}"
    plain = gateway_files(cfg, pool)
    # What is there now, in one command: each write below decides from it (and follows no link).
    seen = own_files.read([cfg.stack_dir, directory, *subdirectories, env, ca, pem, *plain])
    own_files.directory(name="Create the stack directory", path=cfg.stack_dir, seen=seen.get(cfg.stack_dir))
    own_files.directory(name="Create the gateway's directory", path=directory, seen=seen.get(directory))
    for path in subdirectories:
        own_files.directory(name=f"Create the gateway's {Path(path).name} directory (0700)", path=path,
                            seen=seen.get(path), mode="0700")
    env_write = secrets.secret_file(name="Write gateway/.env (0600)", dest=env, lines=env_lines(cfg), seen=seen.get(env))
    changed = {"env": env_write.will_change}
    for path, content in plain.items():
        changed[Path(path).name] = own_files.file(name=f"Write gateway/{Path(path).name}", dest=path, content=content,
                                                  seen=seen.get(path), mode="0644").will_change
    for ca_dir in gateway.ca_dirs(pool):  # one at most (run_settings)
        changed["ca"] = own_files.file(name=f"Write gateway/{tls.HOST_DIR}/{gateway.CA_FILE}",
                                       content=tls.ca_certificate(ca_dir), dest=ca, seen=seen.get(ca),
                                       mode="0644").will_change
    if addresses.behind_front_door(cfg):
        certificate = host_certificate(cfg)
        changed["pem"] = secrets.secret_file(
            name=f"Write gateway/{tls.HOST_DIR}/{gateway.PEM_FILE} (0600)", dest=pem,
            lines=(certificate.cert_pem, certificate.key_pem), seen=seen.get(pem),
        ).will_change
    outcomes.record(host.name, gateway_url=addresses.gateway_url(cfg, addresses.public_address(cfg)),
                    pool=", ".join(member.host for member in pool))

    if not cfg.start:
        host.noop("start = False: the gateway is written but not started")
        return
    if load_archives:
        load_image_archives(cfg)
    pull_images(
        name="Pull the images the gateway lacks",
        project_dir=directory,
        project=gateway.PROJECT,
        services=list(gateway.SERVICES),
        files_changed=any(changed.values()),
    )
    compose_up(
        name="Start the gateway (docker compose up -d)",
        project_dir=directory,
        project=gateway.PROJECT,
        services=list(gateway.SERVICES),
        files_changed=any(changed.values()),
        # HAProxy (master-worker) reloads on SIGUSR2: new hosts join, answers under way finish.
        reload=["gateway"] if any(changed.get(name) for name in (gateway.CONFIG_FILE, "ca", "pem")) else [],
        restart=["relay"] if changed.get(gateway.RELAY_FILE) else [],
    )


def load_image_archives(cfg) -> None:
    """`docker load` the archives whose images the host lacks (no registry needed)."""
    if not cfg.image_archives:
        return
    present = set(host.get_fact(DockerImageTags))
    for archive in cfg.image_archives:
        tags = images.archive_tags(archive)
        if tags and set(tags) <= present:
            host.noop(f"images {', '.join(tags)} already loaded")
            continue
        remote = f"{cfg.stack_dir}/images/{Path(archive).name}"
        files.put(name=f"Upload {Path(archive).name}", src=archive, dest=remote, mode="0600")
        server.shell(
            name=f"Load {', '.join(tags) or Path(archive).name}",
            # Loaded images live in Docker; the tarball would only take disk space.
            commands=[StringCommand("docker", "load", "-i", QuoteString(remote), "&&", "rm", "-f", QuoteString(remote))],
        )


_IMAGES_PRESENT_OR_PULLED = (
    'missing=""; while read -r image; do docker image inspect "$image" >/dev/null 2>&1 && continue; '
    'docker pull -q "$image" >/dev/null 2>&1 || missing="$missing $image"; done; '
    '[ -z "$missing" ] || { echo "not on this host and cannot be pulled:$missing. Fix: make '
    'the registry reachable, point the image settings at one that is, or list docker save '
    'archives of them in image_archives" >&2; exit 1; }'
)


def _compose(project_dir: str, project: str = PROJECT) -> list:
    return ["docker", "compose", "--project-directory", QuoteString(project_dir), "-p", project]


@operation(is_idempotent=False)
def pull_images(project_dir: str, services: list[str], files_changed: bool = False, project: str = PROJECT):
    """
    Pull the images the stack needs and the host lacks, when the stack is to be (re)started.

    + project_dir: directory holding docker-compose.yaml and .env
    + services: the services that must be running
    + files_changed: a compose input was rewritten in this run
    + project: the compose project (the host's stack, or the lab's gateway)
    """
    stale = out_of_date(host.get_fact(ComposeStack, project_dir=project_dir, project=project), services)
    if not stale and not files_changed:
        host.noop("stack up to date: no image to pull")
        return
    # compose names the service, not the image, when a pull fails: say which image and why.
    # A step of its own, so the report times pulling apart from starting.
    yield StringCommand(
        *_compose(project_dir, project), "config", "--images", "|", "sh", "-c", QuoteString(_IMAGES_PRESENT_OR_PULLED)
    )


@operation(is_idempotent=False)
def compose_up(
    project_dir: str, services: list[str], files_changed: bool = False, restart: list[str] | None = None,
    project: str = PROJECT, reload: list[str] | None = None,
):
    """
    Bring the stack up (its images are there: ``pull_images`` ran first), only when something differs.

    + project_dir: directory holding docker-compose.yaml and .env
    + services: the services that must be running
    + files_changed: a compose input was rewritten in this run
    + restart: services to restart because a file they read at start changed
    + project: the compose project (the host's stack, or the lab's gateway)
    + reload: services told to read their files again (SIGUSR2) instead of restarting
    """
    stale = out_of_date(host.get_fact(ComposeStack, project_dir=project_dir, project=project), services)
    if not stale and not files_changed:
        host.noop(f"stack up to date: {', '.join(services)} running")
        return
    yield from up_commands(_compose(project_dir, project), stale, restart or [], reload or [])


def up_commands(base: list, stale: list[str], restart: list[str], reload: list[str] = ()) -> list[StringCommand]:
    """``compose up`` (``base`` names the project), then the restarts and reloads it leaves to do."""
    # --pull missing: images loaded from archives (air-gapped labs) are never pulled.
    commands = [StringCommand(*base, "up", "-d", "--pull", "missing", "--remove-orphans", "--wait", "--wait-timeout", "1800")]
    if restart:
        commands.append(StringCommand(*base, "restart", *restart))
    # A container `up` just created reads its files as it starts (and may not yet handle the
    # signal, whose default is to end the process): only the ones it left running reload.
    reload = [service for service in reload if service not in stale]
    if reload:
        commands.append(StringCommand(*base, "kill", "-s", "USR2", *reload))
    return commands
