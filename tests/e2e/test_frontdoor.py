"""The HTTPS front door (issue 15), run for real: Debian's nginx with the frontdoor.conf
backchat writes, in front of a real llama-server (Debian sid) serving a real instruct model
(SmolLM2-135M-Instruct from PyPI) that needs the API key, with the certificate signed by
the CA backchat makes on the controller.

The door is testbed/frontdoor.py's: the file the deploy writes, with what only the compose
network provides replaced (upstreams on loopback, the certificate directory, no Docker DNS).

Checked as a browser that trusts the lab's CA would see it: the TLS handshake verifies
against the generated CA (and fails against the system's trust store), the certificate
names the host's address and name, plain http to the port is refused, the key is still
needed, and a streamed answer (``stream: true``) arrives in pieces while it is generated,
not all at once at the end. Mutation: the same file with ``proxy_buffering on`` (and
llama-server's ``X-Accel-Buffering: no`` ignored, as for a backend that does not send it).
"""

from __future__ import annotations

import os
import ssl
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from backchat.verify import GUI_SYSTEM_PROMPT
from tests.e2e.test_real_model import chatbot_ui_text, correct_client_text, sse_data
from testbed import frontdoor as fd
from testbed import llama_server as ls
from testbed.frontdoor import FrontDoor

pytestmark = pytest.mark.realhost

KEY = "sk-frontdoor-test-0123456789"
HOST = fd.LLAMA_HOST
QUESTION = "Who was the president of the United States in 1997?"


@pytest.fixture(scope="module")
def llama(smollm2):
    if os.geteuid() != 0:
        pytest.skip("llama-server runs in a chroot: needs root")
    # No key of its own, like Text Gen WebUI behind the door: a 401 can come only from the door.
    with ls.LlamaServer(Path(smollm2.path), alias="gpt-3.5-turbo",
                        extra_args=["--chat-template", "chatml", "--threads", "1"]) as server:
        yield server


def front_door(workdir: Path, upstream: str, relay: bool = False, **conf_edits: str) -> FrontDoor:
    why = fd.missing_requirements()
    if why:
        if os.environ.get("BACKCHAT_REQUIRE_REALHOSTS") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return fd.llama_door(workdir, upstream, KEY, relay=relay, **conf_edits)


@pytest.fixture(scope="module")
def door(llama, tmp_path_factory):
    with front_door(tmp_path_factory.mktemp("door"), f"127.0.0.1:{llama.port}") as running:
        yield running


def streamed(door, base_url: str | None = None, key: str = KEY) -> tuple[list[float], str, float]:
    """A streamed chat completion through the door (or ``base_url``; ``door``: anything with
    a ``url`` and the ``trust`` to reach it, the gateway too): when each piece arrived
    (seconds from the request), the raw stream, and how long the answer took."""
    body = {"model": "gpt-3.5-turbo", "stream": True, "temperature": 0, "max_tokens": 48,
            "messages": [{"role": "system", "content": GUI_SYSTEM_PROMPT}, {"role": "user", "content": QUESTION}]}
    started = time.monotonic()
    arrivals, raw = [], b""
    with httpx.Client(verify=door.trust, timeout=120) as client:
        with client.stream("POST", f"{base_url or door.url}/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {key}"}) as response:
            assert response.status_code == 200, response.read()
            for piece in response.iter_raw():
                arrivals.append(time.monotonic() - started)
                raw += piece
    return arrivals, raw.decode(), time.monotonic() - started


def answer(raw: str) -> str:
    return correct_client_text(sse_data(raw))


def check_streams(arrivals: list[float], total: float) -> None:
    """The answer came in pieces while it was generated (a buffering door sends it in one
    or two pieces once the backend is done)."""
    span = arrivals[-1] - arrivals[0] if arrivals else 0.0
    assert len(arrivals) >= 5 and span >= 0.05, (
        f"{len(arrivals)} pieces over {span:.3f}s of {total:.2f}s: buffered, not streamed")


def test_the_handshake_verifies_against_our_ca_and_names_the_host(door):
    answer = httpx.get(f"{door.url}/v1/models", verify=door.trust, headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200 and [m["id"] for m in answer.json()["data"]] == ["gpt-3.5-turbo"]
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{door.url}/v1/models", verify=True)  # the system's store does not know our CA
    pem = ssl.get_server_certificate(("127.0.0.1", door.port))
    names = x509.load_pem_x509_certificate(pem.encode()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [HOST]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_plain_http_is_refused_and_the_key_is_still_needed(door):
    plain = httpx.get(f"http://127.0.0.1:{door.port}/v1/models")
    assert plain.status_code == 400 and "HTTPS port" in plain.text
    assert httpx.get(f"{door.url}/v1/models", verify=door.trust).status_code == 401


def test_the_door_checks_the_key_before_any_backend_sees_the_request(door, llama):
    """Issue 13, defect 5: Text Gen WebUI prints its own key in its log, so behind the door
    it has none and the door checks it. The backend here has no key either: it answers a
    keyless request (the defect the door closes), and through the door a missing or wrong
    key gets the door's 401 while the right one and a CORS preflight pass."""
    assert httpx.get(f"{llama.url}/v1/models").status_code == 200, "the backend itself checks no key"
    for headers in ({}, {"Authorization": "Bearer sk-wrong-key-0123456789"}, {"Authorization": KEY}):
        refused = httpx.get(f"{door.url}/v1/models", verify=door.trust, headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == 401, headers
        assert refused.headers["content-type"] == "application/json"
    right = httpx.get(f"{door.url}/v1/models", verify=door.trust, headers={"Authorization": f"Bearer {KEY}"})
    assert right.status_code == 200
    preflight = httpx.options(f"{door.url}/v1/chat/completions", verify=door.trust, headers={
        "Origin": "https://backstage.example.com", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code != 401
    assert KEY not in door.conf.read_text(), "the key lives in the 0600 map file, not in frontdoor.conf"


def test_a_streamed_answer_arrives_in_pieces_through_the_door(door):
    arrivals, raw, total = streamed(door)
    check_streams(arrivals, total)
    assert "Clinton" in answer(raw), raw


def test_the_stream_check_fails_when_the_door_buffers(llama, tmp_path):
    """Mutation: the same file with nginx's default buffering, for a backend that does not
    say ``X-Accel-Buffering: no`` (llama-server does; LocalAI and Text Gen WebUI need not):
    the answer arrives at once."""
    buffering = {"proxy_buffering off;": "proxy_buffering on; proxy_ignore_headers X-Accel-Buffering;"}
    with front_door(tmp_path, f"127.0.0.1:{llama.port}", **buffering) as buffered:
        arrivals, raw, total = streamed(buffered)
    with pytest.raises(AssertionError):
        check_streams(arrivals, total)
    assert "Clinton" in answer(raw), raw


def test_chatbot_ui_reads_no_null_through_the_relay(llama, tmp_path):
    """Issue 13, defect 6: llama-server's first chunk says ``"content": null`` and Chatbot UI
    (its stream parsing, transcribed in test_real_model.chatbot_ui_text; the real app cannot
    be built in CI) shows "null" before the answer. Through the front door's relay, which
    Chatbot UI's OPENAI_API_HOST points at, the text starts with the answer, still streamed."""
    _, raw_direct, _ = streamed_plain(llama.url)
    shown, state = chatbot_ui_text(sse_data(raw_direct))
    assert shown.startswith("null") and state == "closed", "the defect is real without the relay"
    with front_door(tmp_path, f"127.0.0.1:{llama.port}", relay=True) as door:
        arrivals, raw, total = streamed(door, f"http://127.0.0.1:{door.relay_port}")
    shown, state = chatbot_ui_text(sse_data(raw))
    assert not shown.startswith("null") and "Clinton" in shown and state == "closed", shown
    check_streams(arrivals, total)


def streamed_plain(base_url: str) -> tuple[list[float], str, float]:
    """A streamed chat completion straight from the backend (no door)."""
    return streamed(FrontDoorless(), base_url)


class FrontDoorless:
    trust = True
