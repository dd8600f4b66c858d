"""Settings for unit tests: the declared defaults with overrides, the API key as a Secret."""

from backchat import settings
from backchat.secrets import Secret


def make_cfg(**overrides) -> settings.Settings:
    key = overrides.pop("api_key", None)
    data = settings.load_defaults()
    data.update(overrides)
    return settings.validate(data, api_key=Secret(key) if key else None)
