"""After a model change: which files are the previous models (facts.VerifiedModels, its
command run here on a temporary directory), and what removing one removes."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

from pyinfra.context import ctx_host

from backchat import model_change, outcomes
from backchat.facts import VerifiedModels


def verified_models(models_dir) -> dict:
    command = VerifiedModels().command(str(models_dir))
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout
    return VerifiedModels().process(out.splitlines())


def test_the_models_fetch_model_sh_verified_are_found_by_their_markers(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "a.gguf").write_bytes(b"a" * 1000)
    (models / ".a.gguf.verified").write_text("{}\n")
    (models / ".gone.gguf.verified").write_text("{}\n")  # the marker outlived its file
    (models / "theirs.gguf").write_bytes(b"t")  # no marker: not ours, never a candidate
    (models / "gpt-3.5-turbo.yaml").write_text("name: x\n")
    elsewhere = tmp_path / "elsewhere.gguf"
    elsewhere.write_bytes(b"e" * 50)
    (models / "linked.gguf").symlink_to(elsewhere)
    (models / ".linked.gguf.verified").write_text("{}\n")
    (models / ".planted.gguf.verified").symlink_to(tmp_path / "x")  # a linked marker is not read as one
    (models / "with space.gguf").write_bytes(b"s" * 3)
    (models / ".with space.gguf.verified").write_text("{}\n")
    (models / ".dir.gguf.verified").mkdir()  # not a file: not a marker
    assert verified_models(models) == {"a.gguf": 1000, "gone.gguf": None, "linked.gguf": None, "with space.gguf": 3}

    linked_dir = tmp_path / "linked-models"
    linked_dir.symlink_to(models)
    assert verified_models(linked_dir) == {}
    assert verified_models(tmp_path / "missing") == {}


def test_a_previous_model_goes_with_everything_fetch_model_sh_wrote_for_it():
    assert model_change.files_of("a.gguf") == ["a.gguf", "a.gguf.part", "a.gguf.lock", ".a.gguf.verified",
                                               ".a.gguf.verified.tmp"]
    assert model_change.described({"a.gguf": 4_368_450_304, "gone.gguf": None}) == (
        "a.gguf (4,368,450,304 bytes), gone.gguf"
    )


def test_a_host_the_rollout_held_back_keeps_its_previous_model(monkeypatch):
    monkeypatch.setattr(outcomes, "_records", {"ai-01": {"verify": outcomes.HELD_BACK}, "ai-02": {"verify": "pass"}})
    with ctx_host.use(SimpleNamespace(name="ai-01")):
        assert "held this host back" in model_change._held_back()
    with ctx_host.use(SimpleNamespace(name="ai-02")):
        assert model_change._held_back() is None
