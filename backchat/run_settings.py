"""Each host's validated settings and role for this run, checked for the whole inventory at once.

pyinfra runs the deploy file once per host; the first call here checks every host's data
(defaults, group and host data, ``--data``) and the API key, so one bad value anywhere
stops the run before any operation is queued for any host, with one message.

Roles come from the inventory's groups. A host in the ``backstage`` group is where the
lab's one Backstage app lives: it gets the Backstage config describing every AI host of
the run, and runs no stack unless it is also in another group. Without a ``backstage``
group, each AI host writes its own Backstage config (the one-box setup).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from backchat import secrets
from backchat.settings import DEFAULTS, Settings, SettingsError, ours, validate

BACKSTAGE_GROUP = "backstage"

_runs: dict[int, dict[str, Settings]] = {}


@dataclass(frozen=True)
class Role:
    serves_ai: bool  # runs the stack: Docker, the model, the containers
    writes_backstage: bool  # writes app-config.local.yaml and the catalog


def _own_groups(inventory) -> set[str]:
    """The groups the inventory file defines. pyinfra adds two kinds of its own: one per
    connector (``@local``, ``@vagrant``) and one named after the inventory file that holds
    every host, last in each host's groups (unless the file defines a group of that name)."""
    hosts = list(inventory)
    names = {group for each in hosts for group in each.groups if not group.startswith("@") and group != "all"}
    lasts = {next((group for group in reversed(each.groups) if not group.startswith("@")), None) for each in hosts}
    if len(lasts) == 1:
        (last,) = lasts
        if last not in (None, BACKSTAGE_GROUP) and all(last in each.groups for each in hosts):
            names.discard(last)
    return names


def role(inventory, each) -> Role:
    """What a host does in this run, from its inventory groups."""
    own = _own_groups(inventory)
    groups = own & set(each.groups)
    in_backstage = BACKSTAGE_GROUP in groups
    return Role(
        serves_ai=not in_backstage or bool(groups - {BACKSTAGE_GROUP}),
        writes_backstage=in_backstage or BACKSTAGE_GROUP not in own,
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


def _run(state) -> dict[str, Settings]:
    if id(state) not in _runs:
        _runs.clear()
        _runs[id(state)] = validate_inventory(state.inventory)
    return _runs[id(state)]


def settings_for(state, host) -> Settings:
    """This host's settings; the first call of a run validates the whole inventory."""
    return _run(state)[host.name]


def described_hosts(state, host) -> list[tuple[object, Settings]] | None:
    """The AI hosts (and their settings) that a ``backstage`` group host's config
    describes: every AI host of the run. ``None`` elsewhere: a host describes itself."""
    if BACKSTAGE_GROUP not in host.groups:
        return None
    return [(each, _run(state)[each.name]) for each in ai_hosts(state.inventory)]
