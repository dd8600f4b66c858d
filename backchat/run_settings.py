"""Each host's validated settings and role for this run, checked for the whole inventory at once.

pyinfra runs the deploy file once per host; the first call here checks every host's data
(defaults, group and host data, ``--data``) and the API key, so one bad value anywhere
stops the run before any operation is queued for any host, with one message.

Roles come from the inventory's groups. A host in the ``backstage`` group is where the
lab's one Backstage app lives: it gets the Backstage config describing every AI host of
the run, and runs no stack unless it is also in another group. Without a ``backstage``
group, each AI host writes its own Backstage config (the one-box setup).

A host in the ``gateway`` group (at most one) runs the lab's gateway (backchat/gateway.py):
one endpoint load-balanced over every AI host of the run. It runs no stack unless it is
also in another group, and Backstage's config points at it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass

from backchat import addresses, secrets
from backchat.settings import DEFAULTS, Settings, SettingsError, ours, validate

BACKSTAGE_GROUP = "backstage"
GATEWAY_GROUP = "gateway"
# Groups that give a host a role of their own (not an AI host unless also in another group).
ROLE_GROUPS = (BACKSTAGE_GROUP, GATEWAY_GROUP)

_runs: dict[int, dict[str, Settings]] = {}


@dataclass(frozen=True)
class Role:
    serves_ai: bool  # runs the stack: Docker, the model, the containers
    writes_backstage: bool  # writes app-config.local.yaml and the catalog
    runs_gateway: bool = False  # runs the lab's gateway over every AI host


def _own_groups(inventory) -> set[str]:
    """The groups the inventory file defines. pyinfra adds two kinds of its own: one per
    connector (``@local``, ``@vagrant``) and one named after the inventory file that holds
    every host, last in each host's groups (unless the file defines a group of that name)."""
    hosts = list(inventory)
    names = {group for each in hosts for group in each.groups if not group.startswith("@") and group != "all"}
    lasts = {next((group for group in reversed(each.groups) if not group.startswith("@")), None) for each in hosts}
    if len(lasts) == 1:
        (last,) = lasts
        if last not in (None, *ROLE_GROUPS) and all(last in each.groups for each in hosts):
            names.discard(last)
    return names


def role(inventory, each) -> Role:
    """What a host does in this run, from its inventory groups."""
    own = _own_groups(inventory)
    groups = own & set(each.groups)
    serves_ai = not groups & set(ROLE_GROUPS) or bool(groups - set(ROLE_GROUPS))
    return Role(
        serves_ai=serves_ai,
        writes_backstage=BACKSTAGE_GROUP in groups or (BACKSTAGE_GROUP not in own and serves_ai),
        runs_gateway=GATEWAY_GROUP in groups,
    )


def ai_hosts(inventory) -> list:
    """The hosts that run the stack, in inventory order."""
    return [each for each in inventory if role(inventory, each).serves_ai]


def _host_settings(each) -> Settings:
    data = {**DEFAULTS, **ours(each.data.dict())}
    cfg = validate(data, where=each.name)
    try:
        key = secrets.api_key(cfg.auth, cfg.api_key_file)
    except secrets.SecretError as error:
        raise SettingsError(f"Invalid settings for {each.name} (nothing was changed):\n  {error}") from None
    return dataclasses.replace(cfg, api_key=key)


def validate_inventory(inventory) -> dict[str, Settings]:
    """Every host's settings, or one SettingsError naming every problem of every host."""
    found: dict[str, Settings] = {}
    problems = []
    for each in inventory:
        try:
            found[each.name] = _host_settings(each)
        except SettingsError as error:
            problems.append(str(error))
    if not problems:
        problems.extend(_lab_problems(inventory, found))
        problems.extend(_gateway_problems(inventory, found))
        problems.extend(_rollout_problems(inventory, found))
    if problems:
        raise SettingsError("\n".join(problems))
    return found


def _lab_problems(inventory, found: dict[str, Settings]) -> list[str]:
    """What a Backstage host needs of the AI hosts it describes."""
    backstage_hosts = [each for each in inventory if role(inventory, each).writes_backstage and BACKSTAGE_GROUP in each.groups]
    if not backstage_hosts:
        return []
    names = [each.name for each in ai_hosts(inventory)]
    if not names:
        return [f"Invalid inventory (nothing was changed):\n  the {BACKSTAGE_GROUP} group describes the "
                "AI hosts of the run, and there are none. Fix: list the AI hosts in another group too."]
    problems = []
    for each in backstage_hosts:
        chosen = found[each.name].ai_server_host
        if chosen is not None and chosen not in names:
            problems.append(
                f"Invalid settings for {each.name} (nothing was changed):\n  ai_server_host = {chosen!r} "
                f"is not an AI host of this run. Fix: use one of {', '.join(names)}."
            )
    keys = {secrets.fingerprint(found[name].api_key) for name in names if found[name].api_key}
    if len(keys) > 1:
        problems.append(
            "Invalid inventory (nothing was changed):\n  the AI hosts use different API keys, and "
            "Backstage's proxy sends one ($BACKCHAT_API_KEY). Fix: give every AI host the same api_key_file."
        )
    return problems


def _rollout_problems(inventory, found: dict[str, Settings]) -> list[str]:
    """The rollout runs the AI hosts in batches of one size for the whole run."""
    sizes = {found[each.name].rollout_batch_size for each in ai_hosts(inventory)}
    if len(sizes) <= 1:
        return []
    listed = ", ".join(f"{each.name}: {found[each.name].rollout_batch_size!r}" for each in ai_hosts(inventory))
    return ["Invalid inventory (nothing was changed):\n  rollout_batch_size differs between AI hosts "
            f"({listed}); a run rolls out in batches of one size. Fix: set it once, in group_data/all.py."]


def _gateways(inventory) -> list:
    return [each for each in inventory if role(inventory, each).runs_gateway]


def _gateway_problems(inventory, found: dict[str, Settings]) -> list[str]:
    """What the lab's gateway needs: to be one, and to reach, check and pass on the same
    model with the same key on every AI host."""
    gateways = _gateways(inventory)
    if not gateways:
        return []
    head = "Invalid inventory (nothing was changed):\n  "
    if len(gateways) > 1:
        return [head + f"the {GATEWAY_GROUP} group holds {len(gateways)} hosts "
                f"({', '.join(each.name for each in gateways)}); a lab has one gateway. "
                f"Fix: keep one host in the {GATEWAY_GROUP} group."]
    (door,) = gateways
    cfg = found[door.name]
    ai = ai_hosts(inventory)
    if not ai:
        return [head + f"the {GATEWAY_GROUP} host {door.name} balances the AI hosts of the run, and there are "
                "none. Fix: list the AI hosts in another group too (e.g. lab)."]
    problems = []
    if cfg.frontend != "chatbot-ui":
        problems.append(
            f"Invalid settings for {door.name} (nothing was changed):\n  frontend = {cfg.frontend!r}, but the "
            "gateway's GUI talks to the pool of every AI host, which Text Generation WebUI's GUI cannot "
            "(it is its own backend). Fix: frontend = 'chatbot-ui' for the gateway host.")
    unreachable = [each.name for each in ai if ipaddress.ip_address(found[each.name].bind_address).is_loopback]
    if unreachable:
        problems.append(head + f"the gateway {door.name} cannot reach {', '.join(unreachable)}: their "
                        "services listen on loopback only (bind_address). Fix: a bind_address the "
                        "gateway can reach, or leave those hosts out of the lab.")
    models = {found[each.name].model_id for each in ai}
    if models != {cfg.model_id}:
        listed = ", ".join(f"{each.name}: {found[each.name].model_id}" for each in ai)
        problems.append(head + f"the gateway checks every AI host for one model_id ({door.name}: "
                        f"{cfg.model_id}), and they differ ({listed}). Fix: one model_id for the whole lab.")
    ours = secrets.fingerprint(cfg.api_key)
    keyed = [each.name for each in ai if found[each.name].api_key and secrets.fingerprint(found[each.name].api_key) != ours]
    if keyed:
        problems.append(head + f"the gateway {door.name} checks its API key at the door and sends it to "
                        f"every AI host, and {', '.join(keyed)} expect another key (or the gateway has none). "
                        "Fix: one api_key_file (or $BACKCHAT_API_KEY) for the whole lab, and auth alike.")
    signed = {found[each.name].tls_ca_dir for each in ai
              if addresses.behind_front_door(found[each.name]) and not found[each.name].tls_cert_file}
    if len(signed) > 1:
        problems.append(head + f"the gateway checks the AI hosts' certificates against one CA, and their "
                        f"tls_ca_dir differ ({', '.join(sorted(signed))}). Fix: one tls_ca_dir for the whole lab.")
    if role(inventory, door).serves_ai:
        taken = {addresses.host_port(cfg, service): service for service in addresses.published_services(cfg)}
        if cfg.gateway_port in taken:
            problems.append(
                f"Invalid settings for {door.name} (nothing was changed):\n  gateway_port = {cfg.gateway_port} "
                f"is also {taken[cfg.gateway_port]}'s port on this host (it is an AI host too). "
                "Fix: give the gateway its own port.")
    return problems


def _run(state) -> dict[str, Settings]:
    if id(state) not in _runs:
        _runs.clear()
        _runs[id(state)] = validate_inventory(state.inventory)
    return _runs[id(state)]


def settings_for(state, host) -> Settings:
    """This host's settings; the first call of a run validates the whole inventory."""
    return _run(state)[host.name]


def pool_hosts(state) -> list[tuple[object, Settings]]:
    """Every AI host of the run, with its settings: what the lab's gateway balances over."""
    return [(each, _run(state)[each.name]) for each in ai_hosts(state.inventory)]


def lab_gateway(state) -> tuple[object, Settings] | None:
    """The host of the ``gateway`` group and its settings (None: no gateway)."""
    found = _gateways(state.inventory)
    return (found[0], _run(state)[found[0].name]) if found else None


def described_hosts(state, host) -> list[tuple[object, Settings]] | None:
    """The AI hosts (and their settings) that a ``backstage`` group host's config
    describes: every AI host of the run. ``None`` elsewhere: a host describes itself."""
    if BACKSTAGE_GROUP not in host.groups:
        return None
    return pool_hosts(state)
