"""The deploy as a package others build on: a wheel, installed in a fresh venv outside this
checkout, runs from an unrelated pyinfra project whose own data overrides the defaults."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from testbed.apt_repo import key_only_mirror
from testbed.hub import FakeHub
from testbed.tiny_gguf import write_tiny_gguf
from tests.test_openpgp import KEY_A, KEY_A_FINGERPRINT

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, wheel path): the wheel built from this checkout, installed with its dependencies."""
    base = tmp_path_factory.mktemp("packaging")
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(base / "dist"), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = (base / "dist").glob("backchat-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True)
    python = base / "venv" / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], check=True, capture_output=True, text=True)
    print(f"\n[timing] wheel build + venv install: {time.monotonic() - started:.1f}s")
    return python, wheel


def test_the_wheel_ships_the_templates_and_the_fetcher(installed):
    _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("fetch-model.sh", "docker-compose.yaml.j2", "localai-model.yaml.j2", "openai-api.yaml.j2"):
        assert f"backchat/templates/{shipped}" in names, sorted(names)
    assert not any(name.startswith(("tests/", "group_data/")) for name in names)


def write_project(directory: Path, group_data: str) -> Path:
    (directory / "group_data").mkdir(parents=True)
    (directory / "inventory.py").write_text('ai_hosts = ["@local"]\n')
    (directory / "group_data" / "ai_hosts.py").write_text(group_data)
    (directory / "deploy.py").write_text("from backchat import deploy_backchat\n\ndeploy_backchat()\n")
    return directory


def dry_run(python: Path, project: Path, endpoint: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "BACKCHAT_API_KEY": "packaging-test-key-0123456789"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [str(python), "-m", "pyinfra", "--dry", "inventory.py", "deploy.py"],
        cwd=project, env=env, capture_output=True, text=True, timeout=600,
    )


def test_a_dry_deploy_from_an_unrelated_project(installed, tmp_path):
    python, _ = installed
    where = subprocess.run([str(python), "-c", "import backchat.resources as r; print(r.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert "site-packages" in where and str(ROOT) not in where

    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    # Docker's repo as a mirror holding only its key: the controller checks the key even
    # in a dry run, and these tests reach no server but PyPI.
    with FakeHub() as hub, key_only_mirror(KEY_A) as (docker_repo_url, _):
        hub.add_file("test/tiny-GGUF", "tiny.gguf", model)
        common = textwrap.dedent(f"""\
            model_repo = "test/tiny-GGUF"
            model_file = "tiny.gguf"
            model_revision = "main"
            model_sha256 = None
            start = False
            stack_dir = "/opt/backchat-packaging-test"
            models_dir = "/opt/backchat-packaging-test/models"
            docker_repo_url = "{docker_repo_url}"
            docker_repo_key_fingerprint = "{KEY_A_FINGERPRINT}"
        """)
        planned = dry_run(python, write_project(tmp_path / "plain", common + "min_memory_mb = 0\n"), hub.endpoint())
        assert planned.returncode == 0, planned.stderr
        for step in ("Install Docker Engine and compose v2", "Download and verify tiny.gguf",
                     "Write docker-compose.yaml", "Write app-config.local.yaml"):
            assert step in planned.stderr, planned.stderr

        # The project's own group data is above the package's defaults.
        strict = dry_run(python, write_project(tmp_path / "strict", common + "min_memory_mb = 10**7\n"), hub.endpoint())
        assert "MB of RAM is less than the 10000000 MB the model needs" in strict.stderr, strict.stderr
        # A dry run that would refuse a host says so at the end and fails, for scripts.
        assert strict.returncode == 1 and "1 host(s) would be refused" in strict.stderr, strict.stderr

        # A name that is no setting stops the run before any host is touched.
        typo = dry_run(python, write_project(tmp_path / "typo", common + "backnd = 'textgen'\n"), hub.endpoint())
        assert typo.returncode != 0 and "did you mean backend?" in typo.stderr, typo.stderr
    assert not Path("/opt/backchat-packaging-test").exists(), "a dry run changed this machine"
