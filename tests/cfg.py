"""Settings for unit tests: the declared defaults with overrides, the API key as a Secret.

The front door is off unless a test asks for it (``tls=True``): most unit tests are about
what sits behind it, and read plain ``http://`` URLs. tests/test_frontdoor.py and the
end-to-end tests run with the default (on).
"""

from backchat import settings
from backchat.secrets import Secret


def make_cfg(**overrides) -> settings.Settings:
    key = overrides.pop("api_key", None)
    data = settings.load_defaults()
    data["tls"] = False
    data.update(overrides)
    return settings.validate(data, api_key=Secret(key) if key else None)
