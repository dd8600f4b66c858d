"""Run the deploy the way a user does: the pyinfra CLI, from the project directory."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


@dataclass
class DeployRun:
    returncode: int
    stdout: str
    stderr: str

    @property
    def results(self) -> dict:
        """pyinfra's --json results: operations with success (changed) / no_change / error hosts."""
        return json.loads(self.stdout)["results"]

    def changed_ops(self, host: str | None = None) -> list[str]:
        return [
            op["name"]
            for op in self.results["operations"]
            if (host in op["success"] if host else op["success"])
        ]

    def __str__(self) -> str:
        return f"exit {self.returncode}\n--- stderr ---\n{self.stderr[-6000:]}"


def write_inventory(path: Path, hosts: dict[str, dict], group: str = "lab", **groups: dict[str, dict]) -> Path:
    """An inventory file listing ``hosts`` (name -> host data) in ``group``, and each of
    ``groups`` (group name -> hosts) in its own."""
    every = {group: hosts, **groups}
    path.write_text("".join(f"{name} = {list(members.items())!r}\n" for name, members in every.items()))
    return path


def sandbox_data(endpoint: str, repo: str, model_file: str, **overrides) -> list[str]:
    """``--data`` items for a deploy to sandbox hosts (no systemd there: start = False) with
    the model from a Hub stand-in at ``endpoint``."""
    data = {
        "start": "false",
        "docker_source": "debian",
        "model_repo": repo,
        "model_file": model_file,
        "model_revision": "main",
        "model_sha256": "null",
        "hf_endpoint": endpoint,
        "min_memory_mb": "0",
        "public_address": "ai.lab.test",
        **overrides,
    }
    return [f"{key}={value}" for key, value in data.items()]


def run_deploy(
    inventory: Path, *data: str, limit: str | None = None, timeout: int = 1800, env=None, command: str = "deploy.py",
    python_args: tuple[str, ...] = (), project: Path = PROJECT,
) -> DeployRun:
    """``command``: deploy.py, or the day-two status.py / uninstall.py. ``python_args`` go
    before ``-m pyinfra`` (e.g. ``-m cProfile -o FILE``). ``project``: the checkout to run
    from (its deploy.py and its backchat, found first on ``python -m``'s path)."""
    args = [sys.executable, *python_args, "-m", "pyinfra", "-y", "--json", str(inventory), command]
    for item in data:
        args += ["--data", item]
    if limit:
        args += ["--limit", limit]
    done = subprocess.run(args, cwd=project, capture_output=True, text=True, timeout=timeout, env=env)
    return DeployRun(done.returncode, done.stdout, done.stderr)
