"""Day two: take backchat off each host, leaving Docker and everything not ours.

    pyinfra inventory.py uninstall.py                          # the model is kept
    pyinfra inventory.py uninstall.py --data remove_model=true

In order: ``docker compose down --volumes --remove-orphans`` for the ``backchat`` project
(and the lab gateway's ``backchat-gateway``) only; Backstage's ``app-config.local.yaml``
back as it was (backstage.restored_config);
then the files backchat wrote, under its own directories only, and those directories if
that leaves them empty. Nothing is followed through a symlink: a link at one of our names,
or under one of our directories, is named and left alone. A second run changes nothing.
"""

from __future__ import annotations

import io

from pyinfra import host, state
from pyinfra.api import QuoteString, StringCommand, deploy, operation
from pyinfra.facts.files import FileContents
from pyinfra.operations import files

from backchat import backstage, gateway, localai_backend, model_change, outcomes, report, rollout, stack, tls, transport
from backchat.own_paths import remove_own
from backchat.facts import COMPOSE_PROJECT, ComposeProject, OwnPaths, text_of
from backchat.run_settings import settings_for
from backchat.settings import DEFAULTS

COLUMNS = ("host", "result", "model")
BACKUP_SUFFIX = ".backchat.bak"


def gateway_paths() -> list[str]:
    """What the deploy writes for the lab's gateway, relative to its directory, then its
    directories (deepest first); the sockets are HAProxy's."""
    return [
        gateway.COMPOSE_FILE, ".env", gateway.CONFIG_FILE, gateway.RELAY_FILE,
        f"{tls.HOST_DIR}/{gateway.PEM_FILE}", f"{tls.HOST_DIR}/{gateway.CA_FILE}",
        f"run/{gateway.STATS_SOCKET}", "run/admin.sock", tls.HOST_DIR, "run", ".",
    ]


def stack_paths(cfg) -> list[str]:
    """What the deploy writes in stack_dir, relative to it, then its directories (deepest first)."""
    archives = [f"images/{path.rsplit('/', 1)[-1]}" for path in cfg.image_archives]
    return [
        "docker-compose.yaml", ".env", ".hf-token-header", "bin/fetch-model", *archives,
        stack.FRONTDOOR_CONF, f"{tls.HOST_DIR}/{tls.CERT_FILE}", f"{tls.HOST_DIR}/{tls.KEY_FILE}",
        f"{tls.HOST_DIR}/{stack.DOOR_KEY_MAP}",
        *(f"{gateway.DIR}/{path}".removesuffix("/.") for path in gateway_paths()),
        "bin", "images", tls.HOST_DIR, ".",
    ]


def models_paths(cfg) -> list[str]:
    """LocalAI's model config (and, with remove_model, every file fetch-model.sh writes:
    the model, its download, its lock, its marker)."""
    model_files = model_change.files_of(cfg.model_file) if cfg.remove_model else []
    return [f"{cfg.model_id}.yaml", *model_files, "."]


def backstage_paths(config_gone: bool) -> list[str]:
    config = [backstage.CONFIG_FILE] if config_gone else []
    return [*config, backstage.CONFIG_FILE + BACKUP_SUFFIX, backstage.CATALOG_FILE, "."]


_DOWN = (
    # With the compose file (and .env) when they are there; by project name when not.
    '{ [ -f "$2/docker-compose.yaml" ] && docker compose --project-directory "$2" -p "$1" '
    'down --volumes --remove-orphans; } || (cd / && docker compose -p "$1" down --volumes --remove-orphans) && '
    # Volumes of the project that compose did not know by name (no compose file).
    'docker volume ls -q --filter "label=com.docker.compose.project=$1" | xargs -r docker volume rm'
)


@operation(is_idempotent=False)
def compose_down(project_dir: str, project: str = COMPOSE_PROJECT):
    """
    Remove a project's containers, networks and volumes (only that project's).

    + project_dir: the directory holding its docker-compose.yaml, if still there
    + project: backchat's stack, or the lab gateway's
    """
    held = host.get_fact(ComposeProject, project=project)
    if held["docker"] == "missing":
        host.noop("Docker is not installed: no containers")
        return
    if held["docker"] != "ok":
        host.log_styled(
            f"Docker is {held['docker']}: containers and volumes of project {project}, "
            "if any, are left (start Docker and run uninstall.py again)",
            fg="yellow",
        )
        host.noop("Docker's daemon is not running")
        return
    if not (held["containers"] or held["volumes"] or held["networks"]):
        host.noop(f"Docker holds nothing of project {project}")
        return
    yield StringCommand("sh", "-c", QuoteString(_DOWN), "down", project, QuoteString(project_dir))


def restore_backstage_config(cfg) -> bool:
    """Put app-config.local.yaml back as it was; True when it is to be removed instead."""
    root = cfg.backstage_app_dir
    config, backup = backstage.CONFIG_FILE, backstage.CONFIG_FILE + BACKUP_SUFFIX
    found = host.get_fact(OwnPaths, root=root, paths=[config, backup])
    if any(found.get(name) not in (None, "file") for name in (config, backup)):
        host.log_styled(f"{root}/{config} or its backup is not a plain file: left alone", fg="yellow")
        return False
    current = text_of(host.get_fact(FileContents, path=f"{root}/{config}")) if config in found else None
    saved = text_of(host.get_fact(FileContents, path=f"{root}/{backup}")) if backup in found else None
    base = text_of(host.get_fact(FileContents, path=f"{root}/{backstage.BASE_CONFIG_FILE}"))
    wanted = backstage.restored_config(current, saved, cfg, base)
    if wanted is not None and wanted != current:
        files.put(name=f"Restore {config}", src=io.StringIO(wanted), dest=f"{root}/{config}", mode="0644")
    return wanted is None


@deploy("Backchat uninstall", data_defaults=DEFAULTS)
def uninstall_backchat():
    cfg = settings_for(state, host)  # the same checks as the deploy, remove_model included
    transport.prepare_run(state, host)  # TCP_NODELAY; no question when nothing changes; less CPU
    report.install(state, cfg.report_path, title="uninstall", columns=COLUMNS)

    compose_down(name="Remove the stack's containers, networks and volumes", project_dir=cfg.stack_dir)
    compose_down(name="Remove the lab gateway's containers and networks", project_dir=gateway.directory(cfg),
                 project=gateway.PROJECT)
    config_gone = restore_backstage_config(cfg)
    remove_own(name="Remove our Backstage files", root=cfg.backstage_app_dir, paths=backstage_paths(config_gone))
    remove_own(name="Remove the model config" + (" and the model" if cfg.remove_model else ""),
               root=cfg.models_dir, paths=models_paths(cfg))
    localai_backend.remove(cfg)
    rollout.forget(name="Remove the last verified state", cfg=cfg)
    remove_own(name="Remove the stack's files", root=cfg.stack_dir, paths=stack_paths(cfg))
    outcomes.record(
        host.name,
        verify="uninstalled",
        model="removed" if cfg.remove_model else f"kept: {cfg.model_path} (--data remove_model=true removes it)",
    )
