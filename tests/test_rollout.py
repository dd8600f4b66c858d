"""The last verified state (backchat/rollout.py): its copy, its restore and its reading
(facts.VerifiedState), each run here with sh on a temporary tree; and the batch size."""

from __future__ import annotations

import os
import subprocess
from types import SimpleNamespace

import pytest

from backchat import checks, rollout
from backchat.facts import VerifiedState


def run(command) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", str(command.get_raw_value())], capture_output=True, text=True)


def verified_state(cfg, paths) -> dict:
    command = VerifiedState().command(rollout.saved_dir(cfg), [str(path) for path in paths])
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout
    return VerifiedState().process(out.splitlines())


@pytest.fixture
def stack(tmp_path):
    """A stack directory with a compose file, a 0600 .env and a model config elsewhere."""
    stack_dir, models = tmp_path / "opt", tmp_path / "models"
    (stack_dir / "tls").mkdir(parents=True)
    models.mkdir()
    files = {
        stack_dir / "docker-compose.yaml": "image: v1\n",
        stack_dir / ".env": "BACKCHAT_API_KEY=k1\n",
        stack_dir / "tls" / "server.key": "key1\n",
        models / "gpt.yaml": "threads: 4\n",
    }
    for path, text in files.items():
        path.write_text(text)
    (stack_dir / ".env").chmod(0o600)
    return SimpleNamespace(stack_dir=str(stack_dir)), sorted(files)


def test_a_verified_state_is_kept_and_put_back_exactly(stack, tmp_path):
    cfg, files = stack
    assert verified_state(cfg, files) and not rollout.has_saved(verified_state(cfg, files))
    assert run(rollout.save_command(cfg, files)).returncode == 0
    saved = verified_state(cfg, files)
    assert rollout.state_is_saved(saved), saved
    env = tmp_path / "opt" / ".env"
    assert oct(os.stat(f"{rollout.saved_dir(cfg)}{env}").st_mode & 0o777) == "0o600"  # the .env's mode kept

    compose = tmp_path / "opt" / "docker-compose.yaml"
    compose.write_text("image: v2\n")
    created = tmp_path / "opt" / "frontdoor.conf"  # a file the upgrade added
    created.write_text("new\n")
    after = verified_state(cfg, [*files, created])
    assert rollout.has_saved(after) and not rollout.state_is_saved(after)

    assert run(rollout.restore_command(cfg, [*files, created])).returncode == 0
    assert compose.read_text() == "image: v1\n"
    assert not created.exists()
    assert rollout.state_is_saved(verified_state(cfg, files))
    assert oct(env.stat().st_mode & 0o777) == "0o600"


def test_a_link_planted_at_a_file_is_replaced_not_followed(stack, tmp_path):
    cfg, files = stack
    assert run(rollout.save_command(cfg, files)).returncode == 0
    victim = tmp_path / "victim"
    victim.write_text("theirs\n")
    compose = tmp_path / "opt" / "docker-compose.yaml"
    compose.unlink()
    compose.symlink_to(victim)
    assert run(rollout.restore_command(cfg, files)).returncode == 0
    assert victim.read_text() == "theirs\n"
    assert not compose.is_symlink() and compose.read_text() == "image: v1\n"


def test_a_linked_file_is_not_kept_and_a_linked_state_not_read(stack, tmp_path):
    cfg, files = stack
    secret = tmp_path / "secret"
    secret.write_text("not ours\n")
    linked = tmp_path / "opt" / "linked.yaml"
    linked.symlink_to(secret)
    assert run(rollout.save_command(cfg, [*files, linked])).returncode == 0
    assert not os.path.lexists(f"{rollout.saved_dir(cfg)}{linked}")

    elsewhere = tmp_path / "elsewhere"
    os.rename(rollout.saved_dir(cfg), elsewhere)
    os.symlink(elsewhere, rollout.saved_dir(cfg))
    assert not rollout.has_saved(verified_state(cfg, files))
    restored = run(rollout.restore_command(cfg, files))
    assert restored.returncode != 0 and "no verified state" in restored.stderr


def test_without_a_verified_state_nothing_is_restored(stack):
    cfg, files = stack
    restored = run(rollout.restore_command(cfg, files))
    assert restored.returncode != 0 and "no verified state" in restored.stderr
    assert all(os.path.exists(path) for path in files)


@pytest.mark.parametrize(("setting", "hosts", "batch"), [(1, 10, 1), (0, 10, 0), ("25%", 10, 3), ("25%", 1, 1),
                                                         ("100%", 7, 7), ("10%", 3, 1)])
def test_the_batch_is_a_number_of_hosts_or_a_share_of_them(setting, hosts, batch):
    assert rollout.batch_hosts(checks.batch_size(setting), hosts) == batch


@pytest.mark.parametrize("bad", ["0%", "101%", "x", -1, True, "25 %%", 1.5])
def test_a_batch_size_that_is_neither_is_refused(bad):
    with pytest.raises(checks.Invalid):
        checks.batch_size(bad)
