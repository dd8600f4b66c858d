"""What a user reads stays true: the README's settings table, group_data/all.py, the set-up."""

import re
from pathlib import Path

from backchat import settings

ROOT = Path(__file__).resolve().parent.parent


def readme_setup_commands() -> list[str]:
    """The commands of the README's set-up block (comments stripped)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Set-up.*?```sh\n(.*?)```", text, flags=re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_table_is_the_declarations():
    """The README's settings table is generated from SETTINGS (python -m backchat.settings)."""
    readme = (ROOT / "README.md").read_text()
    assert settings.markdown_table() in readme, "regenerate it: python -m backchat.settings"


def test_manual_names_every_setting_at_its_default():
    """group_data/all.py is the commented manual: each setting once, at its declared default."""
    text = (ROOT / "group_data" / "all.py").read_text()
    found = dict(re.findall(r"^# ([a-z_0-9]+) = (.*)$", text, flags=re.M))
    assert set(found) == set(settings.BY_NAME)
    for name, shown in found.items():
        assert shown == repr(settings.DEFAULTS[name]), name
    assert not re.search(r"^[a-z_]+ *=", text, flags=re.M), "all.py overrides nothing: defaults live in settings.py"


def test_ci_runs_the_readmes_test_command_verbatim():
    deploy, test = readme_setup_commands()
    assert "pyinfra inventory.py deploy.py" in deploy and "pytest" in test
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()
