"""Step 2 on the controller: the source decision table, the once-per-run lookup, and
backchat.hub's resolution against a stand-in Hub that speaks the Hub's protocol."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys

import pytest

from backchat import hub, model_source
from backchat.model_source import ModelSourceError, ResolvedModel, choose_source, is_verified, pinned_mismatch
from tests.cfg import make_cfg
from testbed.hub import FakeHub

SHA, PIN = "a" * 64, "b" * 64
RESOLVED = ResolvedModel("org/m-GGUF", "m.gguf", "main", "c" * 40, SHA, 1000, "https://hub.example")
MIRROR = "http://mirror.lab/m.gguf"


def found():
    return RESOLVED


def unreachable():
    raise ModelSourceError("could not reach the Hub", unreachable=True)


def refused():
    raise ModelSourceError("HTTP 404: no such file")


def mirror_size(url):
    assert url == MIRROR
    return 1234


def no_mirror(url):
    raise ModelSourceError("mirror down")


def blob(sha):
    return {"path": "/cache/blob", "size": 999} if sha == PIN else None


@pytest.mark.parametrize(
    "source, lookup, pin, size_of, expected",
    [
        # The Hub answers: it is the reference for every source.
        ("hub", found, None, mirror_size, (SHA, 1000, RESOLVED.url, None)),
        ("mirror", found, None, mirror_size, (SHA, 1000, MIRROR, None)),
        ("controller", found, None, mirror_size, (SHA, 1000, None, None)),
        # The Hub is down: a pinned sha256 lets the mirror or the controller's copy serve.
        ("mirror", unreachable, PIN, mirror_size, (PIN, 1234, MIRROR, None)),
        ("controller", unreachable, PIN, mirror_size, (PIN, 999, None, "/cache/blob")),
        # ... but not without the pin, not for hub, not with the mirror down, not without a copy.
        ("mirror", unreachable, None, mirror_size, "model_sha256 is not set"),
        ("controller", unreachable, None, mirror_size, "model_sha256 is not set"),
        ("hub", unreachable, PIN, mirror_size, "could not reach the Hub"),
        ("mirror", unreachable, PIN, no_mirror, "mirror down"),
        ("controller", unreachable, "c" * 64, mirror_size, "holds no verified copy"),
        # A Hub that answers "no such file" is never second-guessed.
        ("mirror", refused, PIN, mirror_size, "HTTP 404"),
        ("controller", refused, PIN, mirror_size, "HTTP 404"),
    ],
)
def test_source_decision_table(source, lookup, pin, size_of, expected):
    cfg = make_cfg(model_source=source, model_sha256=pin, model_mirror_url=MIRROR)
    if isinstance(expected, str):
        with pytest.raises(ModelSourceError, match=expected):
            choose_source(cfg, lookup, size_of, blob)
        return
    chosen = choose_source(cfg, lookup, size_of, blob)
    assert (chosen.sha256, chosen.size, chosen.url, chosen.controller_path) == expected
    assert bool(chosen.note) == (lookup is unreachable), "a fallback is said to the user"


def test_a_pin_that_differs_from_the_source_is_named():
    cfg = make_cfg(model_sha256=PIN)
    assert "pinned to " + PIN in pinned_mismatch(cfg, SHA)
    assert pinned_mismatch(cfg, PIN) is None
    assert pinned_mismatch(make_cfg(model_sha256=None), SHA) is None


def test_marker_is_trusted_only_when_size_and_mtime_match():
    marker = {"sha256": SHA, "size": 100, "mtime": 7}
    assert is_verified({"size": 100, "mtime": 7, "marker": marker}, SHA, 100)
    assert not is_verified({"size": 100, "mtime": 8, "marker": marker}, SHA, 100)  # touched since
    assert not is_verified({"size": 99, "mtime": 7, "marker": marker}, SHA, 100)  # truncated
    assert not is_verified({"size": 100, "mtime": 7, "marker": marker}, PIN, 100)  # another file wanted
    assert not is_verified({"size": 100, "mtime": 7, "marker": None}, SHA, 100)


def test_the_hub_is_asked_once_per_run_however_many_hosts(monkeypatch):
    calls = []

    def fake_hub(args, token):
        calls.append(args)
        return {"repo": "r/m", "filename": "f.gguf", "commit": "c" * 40, "sha256": SHA, "size": 5}

    monkeypatch.setattr(model_source, "run_hub", fake_hub)
    monkeypatch.setattr(model_source, "_lookups", {})
    answers = {model_source.resolve("http://hub", "r/m", "f.gguf", "main", None) for _host in range(10)}
    assert len(calls) == 1 and len(answers) == 1


def test_a_lookup_started_early_is_the_one_resolve_uses(monkeypatch):
    started, waited = [], []

    def start_hub(args, token):
        started.append(args)
        return lambda: waited.append(args) or {"repo": "r/m", "filename": "f.gguf", "commit": "c" * 40, "sha256": SHA, "size": 5}

    monkeypatch.setattr(model_source, "start_hub", start_hub)
    monkeypatch.setattr(model_source, "run_hub", lambda args, token: pytest.fail("a second lookup"))
    monkeypatch.setattr(model_source, "_lookups", {})
    monkeypatch.setattr(model_source, "_started", {})
    for _host in range(3):  # every host's deploy starts it; the first start counts
        model_source.start_resolve("http://hub", "r/m", "f.gguf", "main", None)
    assert len(started) == 1 and not waited, "started, not waited for"
    for _host in range(3):
        assert model_source.resolve("http://hub", "r/m", "f.gguf", "main", None).sha256 == SHA
    assert len(started) == 1 and len(waited) == 1


def test_a_failed_lookup_is_not_repeated_either(monkeypatch):
    calls = []
    monkeypatch.setattr(model_source, "run_hub", lambda args, token: calls.append(1) or {"error": "down", "unreachable": True})
    monkeypatch.setattr(model_source, "_lookups", {})
    for _host in range(3):
        with pytest.raises(ModelSourceError) as raised:
            model_source.resolve("http://hub", "r/m", "f.gguf", "main", None)
        assert raised.value.unreachable
    assert len(calls) == 1


COMMIT = "c" * 40


def _answer(commit=COMMIT):
    return {"repo": "r/m", "filename": "f.gguf", "commit": commit, "sha256": SHA, "size": 5}


def _new_run(monkeypatch):
    monkeypatch.setattr(model_source, "_lookups", {})
    monkeypatch.setattr(model_source, "_started", {})


def test_the_hub_is_never_asked_again_about_a_commit(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(model_source, "run_hub", lambda args, token: calls.append(args) or _answer())
    monkeypatch.setattr(model_source, "start_hub", lambda args, token: pytest.fail("a child for a known commit"))
    _new_run(monkeypatch)
    assert model_source.resolve("http://hub", "r/m", "f.gguf", COMMIT, None).sha256 == SHA
    assert len(calls) == 1
    _new_run(monkeypatch)  # the next run, from the same controller
    again = model_source.resolve("http://hub", "r/m", "f.gguf", COMMIT, None)
    assert len(calls) == 1 and (again.commit, again.sha256, again.size) == (COMMIT, SHA, 5)
    _new_run(monkeypatch)
    model_source.start_resolve("http://hub", "r/m", "f.gguf", COMMIT, None)  # starts no child (see start_hub)
    _new_run(monkeypatch)  # another endpoint, file or commit is another question
    model_source.resolve("http://other-hub", "r/m", "f.gguf", COMMIT, None)
    assert len(calls) == 2


@pytest.mark.parametrize("revision, answer", [
    ("main", _answer()),  # a branch moves: its answer is never kept
    ("d" * 40, _answer(commit=COMMIT)),  # the Hub answered for another commit than asked
    (COMMIT, {"error": "down", "unreachable": True}),  # no answer, nothing kept
])
def test_only_an_answer_for_the_commit_asked_is_kept(monkeypatch, tmp_path, revision, answer):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(model_source, "run_hub", lambda args, token: calls.append(args) or answer)
    for _run in range(2):
        _new_run(monkeypatch)
        try:
            model_source.resolve("http://hub", "r/m", "f.gguf", revision, None)
        except ModelSourceError:
            pass
    assert len(calls) == 2


def test_the_answers_file_is_replaced_never_written_through_a_link(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    (tmp_path / "backchat").mkdir()
    (tmp_path / "backchat" / hub.ANSWERS_FILE).symlink_to(victim)
    hub.remember_answer("http://hub", COMMIT, _answer())
    assert victim.read_text() == "untouched\n"
    assert not (tmp_path / "backchat" / hub.ANSWERS_FILE).is_symlink()
    assert hub.remembered_answer("http://hub", "r/m", "f.gguf", COMMIT)["sha256"] == SHA


# --- backchat.hub.resolve against a stand-in Hub (huggingface_hub speaking HTTP to it) --------


@pytest.fixture(scope="module")
def fake_hub():
    with FakeHub() as served:
        served.add_file("org/model-GGUF", "model.gguf", b"GGUF" * 1000)
        served.add_file("org/gated-GGUF", "model.gguf", b"GGUF" * 10, gated=True, token="hf_right")
        yield served


def test_hub_resolves_commit_sha256_and_size(fake_hub):
    answer = hub.resolve(fake_hub.endpoint(), "org/model-GGUF", "model.gguf", "main", None)
    assert answer["sha256"] == hashlib.sha256(b"GGUF" * 1000).hexdigest()
    assert answer["size"] == 4000 and len(answer["commit"]) == 40


@pytest.mark.parametrize(
    "repo, filename, token, words",
    [
        ("org/model-GGUF", "missing.gguf", None, ["HTTP 404", "Fix: check model_repo"]),
        ("org/gated-GGUF", "model.gguf", None, ["gated or private", "HF_TOKEN"]),
    ],
)
def test_hub_names_the_problem_and_the_fix(fake_hub, repo, filename, token, words):
    answer = hub.resolve(fake_hub.endpoint(), repo, filename, "main", token)
    assert "unreachable" not in answer
    for word in words:
        assert word in answer["error"]


def test_a_hub_nobody_answers_is_unreachable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    answer = hub.resolve(f"http://127.0.0.1:{port}", "org/model-GGUF", "model.gguf", "main", None)
    assert answer["unreachable"] is True and "Fix: check the network" in answer["error"]


# Under pyinfra every host plans in its own greenlet, with threading patched by gevent. The
# lookup must hold the others back while its child process runs: run it as pyinfra does.
_CONCURRENT_LOOKUPS = r"""
from gevent import monkey
monkey.patch_all()  # as pyinfra_cli does, before anything else is imported

import json
import subprocess
import sys

import gevent

from backchat import model_source

calls, ended, started = [], [], []


def slow_hub(args, token):
    calls.append(args)
    # A real child process, as run_hub starts: under gevent, waiting for it lets the
    # other greenlets run, so they reach resolve() while this lookup is still going.
    subprocess.run([sys.executable, "-c", "import time; time.sleep(0.5)"], check=True)
    ended.append(args)
    return {"repo": "r/m", "filename": "f.gguf", "commit": "c" * 40, "sha256": "a" * 64, "size": 5}


model_source.run_hub = slow_hub


def host():
    started.append(len(ended))
    return model_source.resolve("http://hub", "r/m", "f.gguf", "main", None)


greenlets = [gevent.spawn(host) for _ in range(10)]
gevent.joinall(greenlets, raise_error=True)
print(json.dumps({"calls": len(calls), "answers": len({g.value for g in greenlets}), "started": started}))
"""


def test_ten_hosts_planning_at_once_under_gevent_ask_the_hub_once():
    done = subprocess.run([sys.executable, "-c", _CONCURRENT_LOOKUPS], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    # Every greenlet entered resolve() before the first lookup had ended, so they really
    # ran at the same time ...
    assert seen["started"] == [0] * 10, seen
    # ... and the Hub was asked once, every host getting the same answer.
    assert seen["calls"] == 1 and seen["answers"] == 1, seen
