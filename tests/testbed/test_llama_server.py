"""The harness's real llama-server answers like the OpenAI API backchat calls.

These need root and debootstrap (and, for the first build of the cached sid
root, a Debian mirror).  Without them they are skipped, unless
BACKCHAT_REQUIRE_REALHOSTS=1, which turns the skip into a failure.
"""

from __future__ import annotations

import os
import socket
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from testbed import llama_server as ls
from testbed.tiny_gguf import write_tiny_gguf

QUESTION = "Who was the president of the United States in 1997?"
ORIGIN = "http://backstage.example:7007"

# Every test that needs the real server is marked realhost; the GGUF check is not.
realhost_mark = pytest.mark.realhost


@pytest.fixture(scope="session")
def realhost() -> None:
    why = ls.missing_requirements()
    if why:
        if os.environ.get("BACKCHAT_REQUIRE_REALHOSTS") == "1":
            pytest.fail(f"real hosts required (BACKCHAT_REQUIRE_REALHOSTS=1) but {why}")
        pytest.skip(f"real llama-server host unavailable: {why}")


@pytest.fixture(scope="session")
def llama_root(realhost) -> Path:
    return ls.llama_root()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="module")
def server(llama_root, tiny_model):
    with ls.LlamaServer(tiny_model) as srv:
        yield srv


@pytest.fixture(scope="module")
def keyed_server(llama_root, tiny_model):
    with ls.LlamaServer(tiny_model, api_key="sekrit-test-key") as srv:
        yield srv


def chat(client: httpx.Client, **headers) -> httpx.Response:
    return client.post(
        "/v1/chat/completions",
        headers=headers,
        json={
            "model": "gpt-3.5-turbo",
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 8,
        },
    )


def assert_completion(resp: httpx.Response) -> None:
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"], body
    msg = body["choices"][0]["message"]
    assert msg["role"] == "assistant"
    assert isinstance(msg["content"], str)
    assert body["choices"][0]["finish_reason"] in ("length", "stop")
    assert body["usage"]["completion_tokens"] <= 8


def test_tiny_gguf_is_deterministic(tmp_path):
    a = write_tiny_gguf(tmp_path / "a.gguf")
    b = write_tiny_gguf(tmp_path / "b.gguf")
    c = write_tiny_gguf(tmp_path / "c.gguf", seed=1)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert 400_000 < a.stat().st_size < 600_000


@realhost_mark
def test_root_records_llama_server_version(llama_root):
    info = ls.root_info()
    assert (llama_root / "usr/bin/llama-server").exists()
    assert info["llama_server_version"]
    assert "llama.cpp-tools" in info["packages"]


@realhost_mark
def test_models_lists_alias(server):
    resp = httpx.get(server.url + "/v1/models", timeout=30)
    assert resp.status_code == 200, resp.text
    ids = [m["id"] for m in resp.json()["data"]]
    assert "gpt-3.5-turbo" in ids


@realhost_mark
def test_chat_completion(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert_completion(chat(client))


@realhost_mark
def test_api_key_is_enforced(keyed_server):
    with httpx.Client(base_url=keyed_server.url, timeout=60) as client:
        assert chat(client).status_code == 401
        assert chat(client, Authorization="Bearer wrong-key").status_code == 401
        assert_completion(chat(client, Authorization="Bearer sekrit-test-key"))
        # /health stays public (the harness's wait_ready relies on it), but
        # with --api-key /v1/models needs the key too.
        assert client.get("/health").status_code == 200
        assert client.get("/v1/models").status_code == 401
        models = client.get("/v1/models", headers={"Authorization": "Bearer sekrit-test-key"})
        assert [m["id"] for m in models.json()["data"]] == ["gpt-3.5-turbo"]


@realhost_mark
def test_cors_preflight(server):
    resp = httpx.options(
        server.url + "/v1/models",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"},
        timeout=30,
    )
    assert resp.status_code < 300, resp.text
    assert resp.headers.get("access-control-allow-origin") in (ORIGIN, "*")


@realhost_mark
def test_cors_preflight_with_api_key(keyed_server):
    # A browser sends no Authorization on a preflight.
    resp = httpx.options(
        keyed_server.url + "/v1/chat/completions",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
        timeout=30,
    )
    assert resp.status_code < 300, resp.text
    assert resp.headers.get("access-control-allow-origin") in (ORIGIN, "*")


@realhost_mark
def test_two_servers_at_once(llama_root, tiny_model):
    with ls.LlamaServer(tiny_model, alias="first") as one, \
            ls.LlamaServer(tiny_model, alias="second") as two:
        assert one.port != two.port
        for srv, alias in ((one, "first"), (two, "second")):
            ids = [m["id"] for m in httpx.get(srv.url + "/v1/models", timeout=30).json()["data"]]
            assert ids == [alias]
        with httpx.Client(base_url=two.url, timeout=60) as client:
            assert_completion(chat(client))


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@realhost_mark
def test_start_delay_and_cleanup(llama_root, tiny_model):
    srv = ls.LlamaServer(tiny_model, start_delay=2.0)
    try:
        srv.start()
        t0 = time.monotonic()
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/health", timeout=5)
        srv.wait_ready(60)
        assert time.monotonic() - t0 >= 1.5
        rundir = srv.rundir
    finally:
        srv.stop()
    assert not _port_open(srv.port)
    assert rundir is not None and not rundir.exists()
    assert ls.mounts_under(llama_root) == []


@realhost_mark
def test_bad_model_fails_fast(llama_root, tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a model")
    with pytest.raises(ls.HarnessError, match="exited"):
        with ls.LlamaServer(bogus, ready_timeout=60):
            pass
    assert ls.mounts_under(llama_root) == []


@realhost_mark
def test_rootfs_tar_for_docker_import(llama_root):
    tar = ls.llama_rootfs_tar()
    with tarfile.open(tar) as tf:
        names = set(tf.getnames())
    assert "./usr/bin/llama-server" in names
    assert "./proc" in names and "./dev" in names
    assert not any(n.startswith(("./proc/", "./sys/", "./dev/", "./var/cache/apt/")) for n in names)
