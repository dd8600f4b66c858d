"""The API key and the Hub token: generated once, kept 0600, never shown."""

from __future__ import annotations

import stat

import pytest

from backchat import secrets
from backchat.secrets import Secret, SecretError


@pytest.fixture(autouse=True)
def no_key_in_environment(monkeypatch):
    monkeypatch.delenv("BACKCHAT_API_KEY", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def test_a_secret_never_prints():
    secret = Secret("sk-canary-1234567890")
    shown = [repr(secret), str(secret), f"{secret}", "%s" % secret, repr({"k": secret}), repr([secret])]
    assert all("canary" not in text for text in shown)
    assert secret.reveal() == "sk-canary-1234567890"


def test_the_key_is_generated_once_0600_and_reused(tmp_path):
    path = tmp_path / "config" / "api-key"
    first = secrets.api_key(True, str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first.reveal()) >= 32
    assert secrets.api_key(True, str(path)) == first, "a second run reuses the key"


def test_the_environment_wins_and_auth_off_means_no_key(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKCHAT_API_KEY", "from-the-environment-123\n")
    assert secrets.api_key(True, str(tmp_path / "k")).reveal() == "from-the-environment-123"
    assert not (tmp_path / "k").exists()
    assert secrets.api_key(False, None) is None


@pytest.mark.parametrize("bad", ["short", "has space in it 12345", "dollar$(id)abcdefgh", "quote'abcdefghijkl"])
def test_a_bad_key_is_refused_without_showing_it(monkeypatch, bad):
    monkeypatch.setenv("BACKCHAT_API_KEY", bad)
    with pytest.raises(SecretError) as raised:
        secrets.api_key(True, None)
    assert bad not in str(raised.value) and "openssl rand" in str(raised.value)


def test_a_key_file_others_can_read_or_a_link_is_refused(tmp_path):
    readable = tmp_path / "readable"
    readable.write_text("a-perfectly-good-key-123456\n")
    readable.chmod(0o644)
    with pytest.raises(SecretError, match="can be read by others"):
        secrets.api_key(True, str(readable))
    target = tmp_path / "target"
    target.write_text("a-perfectly-good-key-123456\n")
    target.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(SecretError, match="not a regular file"):
        secrets.api_key(True, str(link))


def test_generation_never_writes_through_a_planted_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    planted = tmp_path / "api-key"
    planted.symlink_to(victim)
    with pytest.raises(SecretError):
        secrets.api_key(True, str(planted))
    assert victim.read_text() == "untouched"


def test_hf_token_comes_only_from_the_environment(monkeypatch):
    assert secrets.hf_token() is None
    monkeypatch.setenv("HF_TOKEN", "hf_canary")
    assert secrets.hf_token().reveal() == "hf_canary" and "canary" not in repr(secrets.hf_token())


def test_reveal_joins_lines_for_writing_only():
    lines = ("KEY=", Secret("value-1234567890"), "\n")
    assert secrets.reveal(lines) == "KEY=value-1234567890\n"
    assert "value" not in repr(lines)
