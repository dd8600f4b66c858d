"""Each host's validated settings for this run, checked for the whole inventory at once.

pyinfra runs the deploy file once per host; the first call here checks every host's data
(defaults, group and host data, ``--data``) and the API key, so one bad value anywhere
stops the run before any operation is queued for any host, with one message.
"""

from __future__ import annotations

import dataclasses

from backchat import secrets
from backchat.settings import DEFAULTS, Settings, SettingsError, ours, validate

_runs: dict[int, dict[str, Settings]] = {}


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
    if problems:
        raise SettingsError("\n".join(problems))
    return found


def settings_for(state, host) -> Settings:
    """This host's settings; the first call of a run validates the whole inventory."""
    if id(state) not in _runs:
        _runs.clear()
        _runs[id(state)] = validate_inventory(state.inventory)
    return _runs[id(state)][host.name]
