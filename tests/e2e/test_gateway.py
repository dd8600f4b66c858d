"""One endpoint for a lab (issue 15), run for real: Debian's HAProxy with the haproxy.cfg the
deploy writes for a ``gateway`` host, in front of three AI hosts. Each host is a real
llama-server (Debian sid) serving a real instruct model (SmolLM2-135M-Instruct), behind its
own front door (Debian's nginx with the frontdoor.conf the deploy writes, a certificate from
backchat's CA). The GUI behind the gateway is the Chatbot UI stand-in (its ``/api/models``,
as the real app's), talking to the pool through the relay (nginx, the relay.conf the deploy
writes).

What only the compose network provides is replaced, nothing else: every listener is on
127.0.0.1 with its own port, the hosts' names are not in DNS (so each member's address is
127.0.0.1 and its port; the name its certificate is checked for stays), the certificate
and run directories are the test's, and the health checks run faster (the deploy's
intervals are seconds). HAProxy here is Debian 12's 2.6; the deploy pins the official
image of the newest LTS (the same directives).

Which host served a request is read from the hosts' own doors (their access logs, with a
marker in each request's query string), not from the gateway: that is how "the backends
never saw it" is shown. Each important check is also run against a mutated config and
must fail there (no health check, no retries, no key check, round robin, a buffering
gateway), so the checks are shown to be able to fail.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import ssl
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from backchat import gateway, probes, tls
from backchat.addresses import RELAY_PORT
from backchat.probes import ControllerProbe
from backchat.secrets import Secret
from backchat.verify import check_gateway
from tests.e2e.test_frontdoor import answer, check_streams, streamed
from tests.e2e.test_real_model import chatbot_ui_text, sse_data
from testbed import chatbot_ui_standin
from testbed import llama_server as ls
from testbed.proxies import (HAPROXY, FrontDoor, HAProxy, check_haproxy, door_cfg, edited, free_port, require, run_nginx,
                               wait_listening)

pytestmark = pytest.mark.realhost

KEY = "sk-gateway-test-0123456789"
# The third host is known by its IP address: HAProxy matches certificate names only, so
# that member is checked against the CA alone (the other two by name too).
NAMES = ("ai-01.test", "ai-02.test", "127.0.0.1")
# Two cores run three servers: one thread each, a small context.
LLAMA_ARGS = ["--chat-template", "chatml", "--threads", "1", "--ctx-size", "2048", "--parallel", "2"]
# The deploy's checks, faster (milliseconds): out after 2 failures, back after 2 passes.
CHECK = {"inter": 1000, "fastinter": 200, "downinter": 500, "fall": 2, "rise": 2, "timeout": 2000}
SHORT = {"model": "gpt-3.5-turbo", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}


class LabHost:
    """An AI host: llama-server behind its own front door (which logs every request)."""

    def __init__(self, model: Path, name: str, workdir: Path, ca_dir: Path) -> None:
        self.model, self.name = model, name
        self.server = ls.LlamaServer(model, alias="gpt-3.5-turbo", api_key=KEY, extra_args=LLAMA_ARGS)
        self.door = FrontDoor(workdir, f"127.0.0.1:{self.server.port}", KEY, host=name, ca_dir=ca_dir, access_log=True)

    def stop_backend(self) -> None:
        self.server.stop()

    def start_backend(self) -> None:
        self.server = ls.LlamaServer(self.model, alias="gpt-3.5-turbo", api_key=KEY, extra_args=LLAMA_ARGS,
                                     port=self.server.port).start().wait_ready()

    def saw(self, marker: str) -> list[str]:
        """The request lines (with status) of this host's door that carry ``marker``."""
        return [line.split('"')[1] + " " + line.split('"')[2].split()[0]
                for line in self.door.requests().splitlines() if marker in line]


@pytest.fixture(scope="module")
def lab(smollm2, tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("llama-server runs in a chroot: needs root")
    work = tmp_path_factory.mktemp("lab")
    hosts = [LabHost(Path(smollm2.path), name, work / f"host{i}", work / "ca") for i, name in enumerate(NAMES)]
    try:
        for each in hosts:
            each.server.start()
        for each in hosts:
            each.server.wait_ready()
            each.door.start()
        yield hosts
    finally:
        for each in hosts:
            each.door.stop()
            each.server.stop()


class Gateway:
    """The gateway as the deploy writes it: HAProxy (haproxy.cfg), the relay (relay.conf)
    and the GUI behind them; ``edits`` mutate haproxy.cfg."""

    def __init__(self, lab: list[LabHost], workdir: Path, members: list[LabHost] | None = None,
                 master_worker: bool = False, **edits: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.ca_dir = Path(lab[0].door.cfg.tls_ca_dir)  # the lab's CA (backchat's, on the controller)
        self.cfg = door_cfg(KEY, tls_ca_dir=str(self.ca_dir), gateway_port=free_port())
        certificate = tls.host_certificate(self.cfg, "gateway.test", ["gateway.test", "127.0.0.1"])
        self.pem = workdir / gateway.PEM_FILE
        self.pem.write_text(certificate.cert_pem + certificate.key_pem.reveal())
        self.pem.chmod(0o600)
        self.pool_port, self.gui_port, self.relay_port = free_port(), free_port(), free_port()
        self.socket = workdir / gateway.STATS_SOCKET
        self.workdir, self.edits = workdir, edits
        self.conf = workdir / gateway.CONFIG_FILE
        self.write_config(lab if members is None else members)
        relay = gateway.render_relay(self.cfg, docker_dns=False, pid_file=str(workdir / "nginx.pid"),
                                     relay={"port": self.relay_port, "upstream": f"127.0.0.1:{self.pool_port}"})
        self.relay_conf = workdir / gateway.RELAY_FILE
        self.relay_conf.write_text(relay)
        self.url = f"https://127.0.0.1:{self.cfg.gateway_port}"
        self.trust = ssl.create_default_context(cafile=str(self.ca_dir / "ca.crt"))
        self.haproxy = HAProxy(self.conf, {"PATH": os.environ["PATH"], "BACKCHAT_API_KEY": KEY}, self.cfg.gateway_port,
                               master_worker=master_worker)
        self.client = httpx.Client(verify=self.trust, timeout=120, headers={"Authorization": f"Bearer {KEY}"})

    def write_config(self, members: list[LabHost]) -> None:
        """haproxy.cfg over ``members``: the pool as the deploy makes it (each host's public
        address and its door's port), reached on 127.0.0.1 (the names are not in DNS here)."""
        pool = gateway.members([(each.name, door_cfg(KEY, localai_port=each.door.port), each.name) for each in members])
        self.pool = [dataclasses.replace(member, address=f"127.0.0.1:{each.door.port}")
                     for member, each in zip(pool, members)]
        conf = gateway.render_config(
            self.cfg, self.pool, door_bind=f"127.0.0.1:{self.cfg.gateway_port}", pool_bind=f"127.0.0.1:{self.pool_port}",
            tls={"crt": str(self.pem)}, ca_file=str(self.ca_dir / "ca.crt"), gui_upstream=f"127.0.0.1:{self.gui_port}",
            run_dir=str(self.workdir), check=CHECK)
        self.conf.write_text(edited(conf, self.edits))

    def __enter__(self) -> "Gateway":
        self.haproxy.__enter__()
        self.relay = run_nginx(self.workdir, self.relay_conf, self.workdir / "relay.log")
        wait_listening(self.relay_port, self.workdir / "relay.log", "the relay")
        # Chatbot UI's OPENAI_API_HOST, as the gateway's compose file sets it: the relay.
        env = {"PATH": os.environ["PATH"], "PORT": str(self.gui_port), "OPENAI_API_KEY": KEY,
               "OPENAI_API_HOST": f"http://127.0.0.1:{self.relay_port}"}
        self.gui = subprocess.Popen(chatbot_ui_standin.entrypoint(), env=env)
        wait_listening(self.gui_port, self.workdir / "relay.log", "the GUI")
        wait_until(lambda: all(each.in_rotation for each in self.rotation()), 15, lambda: self.summary())
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()
        for proc in (self.gui, self.relay):
            proc.terminate()
            proc.wait(timeout=20)
        self.haproxy.__exit__(*exc)

    def rotation(self) -> list[gateway.Standing]:
        """Which hosts are in rotation, read as the deploy's verify reads it: HAProxy's
        statistics over its unix socket, with curl."""
        done = subprocess.run(["curl", "-sS", "--unix-socket", str(self.socket), gateway.STATS_URL],
                              capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, done.stderr
        return gateway.rotation(done.stdout, self.pool)

    def summary(self) -> str:
        return gateway.summary(self.rotation())

    def standing(self, name: str) -> gateway.Standing:
        return next(each for each in self.rotation() if each.host == name)


def wait_until(condition, seconds: float, say=lambda: "") -> float:
    """Seconds until ``condition()`` held; AssertionError (with ``say()``) after ``seconds``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"not within {seconds}s: {say()}")
        time.sleep(0.1)
    return time.monotonic() - started


def marker() -> str:
    return uuid.uuid4().hex[:12]


def served_by(lab: list[LabHost], mark: str) -> dict[str, list[str]]:
    return {each.name: each.saw(mark) for each in lab if each.saw(mark)}


@pytest.fixture(scope="module")
def gw(lab, tmp_path_factory):
    with Gateway(lab, tmp_path_factory.mktemp("gateway")) as running:
        yield running


# --- the checks, each a function a mutated gateway must fail ---------------------------------


def check_spread(gw: Gateway, lab: list[LabHost]) -> dict[str, int]:
    """Requests (listing models, and short chat completions) spread over every host."""
    mark = marker()
    for n in range(6):
        assert gw.client.get(f"{gw.url}/v1/models?{mark}-{n}").status_code == 200
        assert gw.client.post(f"{gw.url}/v1/chat/completions?{mark}-c{n}", json=SHORT).status_code == 200
    counts = {name: len(lines) for name, lines in served_by(lab, mark).items()}
    assert set(counts) == set(NAMES), f"served by {counts}, not by every host"
    return counts


def check_least_connections(gw: Gateway, lab: list[LabHost]) -> None:
    """While two hosts each stream a long answer, quick requests go to the third (the one
    with the fewest connections), not around the pool in turn."""
    mark = marker()
    # llama-server's ignore_eos: the answers last until the streams are closed.
    body = {"model": "gpt-3.5-turbo", "stream": True, "max_tokens": 2000, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}]}
    with gw.client.stream("POST", f"{gw.url}/v1/chat/completions?{mark}-hold1", json=body) as one, \
            gw.client.stream("POST", f"{gw.url}/v1/chat/completions?{mark}-hold2", json=body) as two:
        # Both are being answered (the iterators are kept: dropping one closes its stream).
        pieces = [one.iter_raw(), two.iter_raw()]
        for each in pieces:
            next(each)
        for n in range(4):
            assert gw.client.get(f"{gw.url}/v1/models?{mark}-quick{n}").status_code == 200
    time.sleep(0.5)  # a door logs a request when it ends: the held ones end with the streams
    seen = served_by(lab, mark)
    holding = {name for name, lines in seen.items() if any("-hold" in line for line in lines)}
    quick = {name for name, lines in seen.items() if any("-quick" in line for line in lines)}
    assert len(holding) == 2 and len(quick) == 1 and not quick & holding, seen


def check_refused_at_the_door(gw: Gateway, lab: list[LabHost]) -> None:
    """Without the key (or with a wrong one) the gateway answers 401 itself: no host sees
    the request. With the key the same request reaches a host (the marker can be seen)."""
    mark = marker()
    asks = [("GET", "/v1/models", None, {}), ("POST", "/v1/chat/completions", SHORT, {}),
            ("GET", "/v1/models", None, {"Authorization": "Bearer sk-wrong-key-0123456789"})]
    with httpx.Client(verify=gw.trust, timeout=30) as keyless:
        answers = [keyless.request(method, f"{gw.url}{path}?{mark}-{n}", json=body, headers=headers)
                   for n, (method, path, body, headers) in enumerate(asks)]
    # The same with the key, after them: once a host has logged it, it would have logged them.
    assert gw.client.get(f"{gw.url}/v1/models?{mark}-with-key").status_code == 200
    wait_until(lambda: served_by(lab, f"{mark}-with-key"), 5, lambda: "the request with the key was not logged")
    assert [line for lines in served_by(lab, mark).values() for line in lines if "-with-key" not in line] == [], (
        "a request without the key reached a host")
    for refused in answers:
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key", refused.text


def check_streaming(gw: Gateway) -> str:
    arrivals, raw, total = streamed(gw, gw.url, KEY)
    check_streams(arrivals, total)
    assert "Clinton" in answer(raw), raw
    return raw


def check_a_failed_backend_drops_out_and_comes_back(gw: Gateway, lab: list[LabHost]) -> dict:
    """Stop one host's llama-server (its door stays up and answers 502): the next requests
    still succeed (an idempotent one that meets the dead backend is retried on another
    host), the host is reported out of rotation, requests then avoid it, and once its
    server runs again it is back in rotation and serving."""
    victim = lab[1]
    figures = {}
    victim.stop_backend()
    try:
        mark = marker()
        for n in range(30):  # until the dead backend has been met twice, or the gateway dropped it
            got = gw.client.get(f"{gw.url}/v1/models?{mark}-{n}")
            assert got.status_code == 200, f"request {n} after the stop: HTTP {got.status_code}"
            if len(victim.saw(mark)) >= 2 or not gw.standing(victim.name).in_rotation:
                break
        met = victim.saw(mark)
        figures["out_after"] = wait_until(lambda: not gw.standing(victim.name).in_rotation, 10, gw.summary)
        figures["reported"] = gw.summary()
        assert f"out: {victim.name}" in figures["reported"], figures["reported"]
        mark = marker()
        for n in range(6):
            got = gw.client.post(f"{gw.url}/v1/chat/completions?{mark}-{n}", json=SHORT)
            assert got.status_code == 200, f"completion {n} with the host out: HTTP {got.status_code}"
        assert victim.name not in served_by(lab, mark), "a host out of rotation got a request"
        # It stays out while its backend is down (longer than it takes to come back).
        time.sleep(2 * CHECK["rise"] * CHECK["inter"] / 1000)
        assert not gw.standing(victim.name).in_rotation, f"back in rotation while its backend is down: {gw.summary()}"
        figures["retried"] = met
    finally:
        victim.start_backend()
    figures["back_after"] = wait_until(lambda: gw.standing(victim.name).in_rotation, 15, gw.summary)
    mark = marker()
    for n in range(9):
        assert gw.client.get(f"{gw.url}/v1/models?{mark}-{n}").status_code == 200
    assert victim.name in served_by(lab, mark), "the host came back but serves nothing"
    return figures


def check_a_host_that_goes_away(gw: Gateway, lab: list[LabHost]) -> None:
    """The whole host goes away (its door too): every request still succeeds at once,
    chat completions included (the connection failed: nothing was sent, so it is tried on
    another host)."""
    victim = lab[2]
    victim.door.stop()
    try:
        # At once, before a check can notice: least-connections gives the gone host its share.
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(
                lambda n: gw.client.post(f"{gw.url}/v1/chat/completions?{marker()}", json=SHORT), range(6)))
        for n, got in enumerate(answers):
            assert got.status_code == 200, f"completion {n} after the host went away: HTTP {got.status_code}"
        wait_until(lambda: not gw.standing(victim.name).in_rotation, 10, gw.summary)
        # Out by its health check (L4CON), or by the failed requests themselves first (HANA:
        # observe layer7 ... on-error sudden-death); which one wins depends on the machine's load.
        standing = gw.standing(victim.name)
        assert "L4CON" in standing.check or (
            standing.check == "HANA" and "L4 unsuccessful connection" in standing.detail), standing
    finally:
        victim.door.start()
    wait_until(lambda: gw.standing(victim.name).in_rotation, 15, gw.summary)


# --- the gateway the deploy writes ------------------------------------------------------------


def test_the_door_verifies_against_our_ca_and_names_the_gateway(gw):
    assert gw.client.get(f"{gw.url}/v1/models").json()["data"][0]["id"] == "gpt-3.5-turbo"
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{gw.url}/v1/models", verify=True)


def test_every_host_is_in_rotation_and_requests_spread_over_all_three(gw, lab):
    assert gw.summary() == f"in rotation: {', '.join(NAMES)}"
    check_spread(gw, lab)


def test_quick_requests_go_to_the_host_with_the_fewest_connections(gw, lab):
    check_least_connections(gw, lab)


def test_a_request_without_the_key_is_refused_at_the_door(gw, lab):
    check_refused_at_the_door(gw, lab)


def test_a_streamed_answer_arrives_in_pieces_through_the_gateway(gw):
    check_streaming(gw)


def test_the_gui_behind_the_gateway_lists_the_model_from_the_pool(gw, lab):
    """The page's first request, at the gateway's https URL: Chatbot UI's /api/models asks
    its OPENAI_API_HOST (the relay, then the pool) with the key."""
    page = httpx.get(f"{gw.url}/", verify=gw.trust)
    assert page.status_code == 200 and "Chatbot UI" in page.text
    models = httpx.post(f"{gw.url}/api/models", json={"key": ""}, verify=gw.trust, timeout=60)
    assert models.status_code == 200 and [m["id"] for m in models.json()] == ["gpt-3.5-turbo"], models.text


def check_relay(gw: Gateway) -> None:
    """llama.cpp's first chunk says ``"content": null``; what Chatbot UI reads through the
    gateway's relay starts with the answer (test_frontdoor shows the defect without it),
    and it arrives event by event, not in batches."""
    arrivals, raw, total = streamed(gw, f"http://127.0.0.1:{gw.relay_port}", KEY)
    events = sse_data(raw)
    shown, state = chatbot_ui_text(events)
    assert not shown.startswith("null") and "Clinton" in shown and state == "closed", shown
    check_streams(arrivals, total)
    assert len(arrivals) >= len(events) / 2, f"{len(events)} events in {len(arrivals)} pieces: batched"


def test_the_gui_reads_no_null_through_the_relay_and_the_pool(gw):
    check_relay(gw)


def test_a_failed_backend_drops_out_without_a_config_change_and_comes_back(gw, lab):
    figures = check_a_failed_backend_drops_out_and_comes_back(gw, lab)
    assert any(" 502" in line for line in figures["retried"]), (
        "the dead backend was never met: the retry was not exercised", figures)
    print(f"\nout of rotation {figures['out_after']:.1f}s after the 502s, back {figures['back_after']:.1f}s after "
          f"the restart; reported: {figures['reported']}")


def test_a_host_that_goes_away_costs_no_request(gw, lab):
    check_a_host_that_goes_away(gw, lab)


def test_verify_checks_the_gateway_and_reads_its_rotation_as_the_deploy_does(gw, lab):
    """The deploy's verify of a gateway host (verify.check_gateway) against this gateway:
    the model through the pool with the key trusted by our CA, the key refused at the door,
    the GUI's model list, and the rotation read with the same curl script the deploy runs
    on the gateway host (here, locally). A host that goes away is named out of rotation."""
    probe = ControllerProbe(Secret(KEY), str(gw.ca_dir / "ca.crt"))

    def read() -> list[gateway.Standing]:
        done = subprocess.run(["sh", "-c", probes._CURL, "probe", "GET", gateway.STATS_URL, "10", "", "", str(gw.socket)],
                              capture_output=True, text=True, timeout=30)
        *body, code = done.stdout.splitlines()
        assert code == "200", done.stderr
        return gateway.rotation("\n".join(body), gw.pool)

    cfg = dataclasses.replace(gw.cfg, verify_timeout=10)
    results, _ = check_gateway(cfg, gw.url, probe, read, list(NAMES))
    assert [(r.service, r.ok) for r in results] == [("gateway", True), ("chatbot-ui", True), ("rotation", True)], results
    assert results[-1].detail == f"in rotation: {', '.join(NAMES)}"
    lab[2].door.stop()
    try:
        wait_until(lambda: not gw.standing(NAMES[2]).in_rotation, 10, gw.summary)
        results, _ = check_gateway(dataclasses.replace(cfg, verify_timeout=3), gw.url, probe, read, list(NAMES))
    finally:
        lab[2].door.start()
    assert results[0].ok and not results[-1].ok, results
    assert f"out: {NAMES[2]} (DOWN: L4CON, Connection refused)" in results[-1].detail, results[-1].detail
    wait_until(lambda: gw.standing(NAMES[2]).in_rotation, 15, gw.summary)


def test_the_relay_listens_where_the_compose_file_says():
    """The relay's port in relay.conf is the one Chatbot UI's OPENAI_API_HOST names."""
    cfg = door_cfg(KEY)
    assert f"listen {RELAY_PORT};" in gateway.render_relay(cfg)
    assert f"OPENAI_API_HOST: \"http://relay:{RELAY_PORT}\"" in gateway.render_compose(cfg)


def check_a_host_added_joins_and_answers_go_on(gw: Gateway, lab: list[LabHost], reload) -> None:
    """``gw`` runs over the first two hosts; a re-run with the third host added rewrites
    haproxy.cfg and ``reload()``s: the new host joins the rotation and serves, and an
    answer streaming all along goes on after the new pool is in place."""
    assert [each.host for each in gw.rotation()] == list(NAMES[:2])
    body = {"model": "gpt-3.5-turbo", "stream": True, "max_tokens": 900, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Count to a thousand."}]}
    arrivals: list[float] = []
    reloaded: list[float] = []

    def read_the_answer() -> None:  # as a browser does, all along, until it has seen enough
        with gw.client.stream("POST", f"{gw.url}/v1/chat/completions", json=body) as under_way:
            for _ in under_way.iter_raw():
                arrivals.append(time.monotonic())
                if reloaded and sum(when > reloaded[0] for when in arrivals) >= 10:
                    return

    with concurrent.futures.ThreadPoolExecutor(1) as reader:
        done = reader.submit(read_the_answer)
        wait_until(lambda: arrivals, 30, lambda: "no answer")
        gw.write_config(lab)
        reload()
        wait_until(lambda: [each.host for each in gw.rotation() if each.in_rotation] == list(NAMES), 15, gw.summary)
        reloaded.append(time.monotonic())
        done.result(timeout=300)  # the answer went on after the reload (or this raises)
    assert sum(when > reloaded[0] for when in arrivals) >= 10
    mark = marker()
    for n in range(9):
        assert gw.client.get(f"{gw.url}/v1/models?{mark}-{n}").status_code == 200
    assert NAMES[2] in served_by(lab, mark), "the host added serves nothing"


def test_a_host_added_to_the_lab_joins_on_a_reload_and_answers_under_way_go_on(lab, tmp_path):
    """The deploy reloads HAProxy (SIGUSR2 to the master of the official image, which runs
    ``haproxy -W``) when its file changes."""
    with Gateway(lab, tmp_path / "grow", members=lab[:2], master_worker=True) as gw:
        check_a_host_added_joins_and_answers_go_on(gw, lab, gw.haproxy.reload)


def test_a_restart_instead_of_a_reload_cuts_the_answer(lab, tmp_path):
    """Mutation: what ``docker compose restart gateway`` would do."""
    with Gateway(lab, tmp_path / "grow", members=lab[:2], master_worker=True) as gw:
        def restart() -> None:
            gw.haproxy.__exit__(None, None, None)
            gw.haproxy.__enter__()

        with pytest.raises(httpx.HTTPError):
            check_a_host_added_joins_and_answers_go_on(gw, lab, restart)


# --- mutations: each check fails against a gateway without what it checks ---------------------


def mutated(lab, tmp_path, **edits) -> Gateway:
    return Gateway(lab, tmp_path / "mutant", **edits)


def test_without_the_health_check_the_stopped_host_keeps_getting_requests(lab, tmp_path):
    """Mutation: HAProxy's plain TCP check instead of asking /v1/models: the door of the
    stopped backend still accepts connections, so the host stays in rotation (HAProxy 2.6),
    or comes back soon after the errors users met took it out (3.2)."""
    edits = {"    option httpchk\n": "", "    http-check send": "    #", "    http-check expect": "    #"}
    with mutated(lab, tmp_path, **edits) as gw, pytest.raises(
            AssertionError, match="not within|out of rotation|with the host out: HTTP 502|back in rotation while"):
        check_a_failed_backend_drops_out_and_comes_back(gw, lab)


def test_without_retries_a_request_meets_the_stopped_backend(lab, tmp_path):
    """Mutation: no retries on another host: a request that meets the dead backend fails."""
    edits = {"    retry-on conn-failure empty-response 502 503 504\n": "", "    option redispatch 1\n": "",
             "    retries 2\n": "    retries 0\n"}
    with mutated(lab, tmp_path, **edits) as gw, pytest.raises(AssertionError, match="after the stop: HTTP 502"):
        check_a_failed_backend_drops_out_and_comes_back(gw, lab)


def test_without_retries_a_host_that_went_away_costs_requests(lab, tmp_path):
    """Mutation: no retry after a failed connection: a host that went away fails the
    requests sent to it until the check notices."""
    with mutated(lab, tmp_path, **{"    retries 2\n": "    retries 0\n"}) as gw, \
            pytest.raises(AssertionError, match="after the host went away: HTTP 503"):
        check_a_host_that_goes_away(gw, lab)


def test_without_the_key_check_the_request_reaches_a_host(lab, tmp_path):
    """Mutation: no key check at the door: the host refuses it too (llama-server checks the
    key), but it has seen the request."""
    gw_text = gateway.render_config(door_cfg(KEY), [])
    line = next(line for line in gw_text.splitlines() if "http-request return status 401" in line)
    with mutated(lab, tmp_path, **{line + "\n": ""}) as gw, \
            pytest.raises(AssertionError, match="without the key reached a host"):
        check_refused_at_the_door(gw, lab)


def test_round_robin_fails_the_least_connections_check(lab, tmp_path):
    with mutated(lab, tmp_path, **{"balance leastconn": "balance roundrobin"}) as gw, pytest.raises(AssertionError):
        check_least_connections(gw, lab)


def test_a_buffering_gateway_fails_the_stream_check(lab, tmp_path):
    """Mutation: the gateway waits for the whole answer before passing it on."""
    edits = {"    balance leastconn\n": "    balance leastconn\n    http-response wait-for-body time 60s\n"}
    with mutated(lab, tmp_path, **edits) as gw, pytest.raises(AssertionError, match="buffered, not streamed"):
        check_streaming(gw)


def test_without_no_delay_the_relay_gets_the_answer_in_batches(lab, tmp_path):
    """Mutation: HAProxy's default (it may hold small writes up to 200 ms for more): the
    relay, a plain TCP client, then gets several events per piece."""
    with mutated(lab, tmp_path, **{"    option http-no-delay\n": ""}) as gw, pytest.raises(AssertionError, match="batched|buffered"):
        check_relay(gw)


def written(tmp_path: Path, **overrides) -> Path:
    """haproxy.cfg as the deploy writes it for a gateway with ``overrides``, over a pool of
    a host with a name, one with an IP and one without a door; the container's paths made
    real (the certificate from our CA, the CA, the run directory)."""
    cfg = door_cfg(KEY, public_address="gw.lab", **overrides)
    own = {name: overrides[name] for name in ("tls_cert_file", "tls_key_file") if name in overrides}
    pool = gateway.members([("ai-01", door_cfg(KEY, **own), "ai-01.lab"), ("10.0.0.7", door_cfg(KEY), "10.0.0.7"),
                            ("ai-03", door_cfg(KEY, tls=False), "ai-03.lab")])
    certificate = tls.host_certificate(door_cfg(KEY, tls_ca_dir=str(tmp_path / "ca")), "gw.lab", ["gw.lab"])
    (tmp_path / gateway.PEM_FILE).write_text(certificate.cert_pem + certificate.key_pem.reveal())
    where = {"run_dir": str(tmp_path), "tls": {"crt": str(tmp_path / gateway.PEM_FILE)} if cfg.tls else None,
             "ca_file": str(tmp_path / "ca" / "ca.crt")}
    conf = tmp_path / gateway.CONFIG_FILE
    conf.write_text(gateway.render_config(cfg, pool, **where))
    return conf


@pytest.mark.parametrize("variant", [
    {}, {"auth": False}, {"tls": False}, {"own_certificate": True}, {"gateway_port": 8443, "proxy_timeout": 60},
])
def test_every_variant_of_the_file_is_accepted_by_haproxy(variant, tmp_path):
    require(HAPROXY, "haproxy")
    overrides = dict(variant)
    if overrides.pop("own_certificate", False):
        for name in ("cert.pem", "key.pem"):
            (tmp_path / name).write_text("read by the front doors, not by the gateway")
        overrides.update(tls_cert_file=str(tmp_path / "cert.pem"), tls_key_file=str(tmp_path / "key.pem"))
    done = check_haproxy(written(tmp_path, **overrides), {"PATH": os.environ["PATH"], "BACKCHAT_API_KEY": KEY})
    assert done.returncode == 0, done.stdout + done.stderr


def test_without_the_key_in_its_environment_the_gateway_does_not_start(tmp_path):
    """An empty BACKCHAT_API_KEY would make "Bearer " the key: HAProxy refuses the file."""
    require(HAPROXY, "haproxy")
    conf = written(tmp_path)
    for env in ({"PATH": os.environ["PATH"]}, {"PATH": os.environ["PATH"], "BACKCHAT_API_KEY": ""}):
        done = check_haproxy(conf, env)
        assert done.returncode != 0 and "BACKCHAT_API_KEY is empty or missing" in done.stderr, done.stderr
