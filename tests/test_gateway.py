"""The lab's gateway (backchat/gateway.py): the pool, haproxy.cfg, the relay, the compose
file, and reading which hosts are in rotation. tests/e2e/test_gateway.py runs the same
files with real HAProxy, nginx and llama-servers."""

from __future__ import annotations

import re

import pytest
import yaml

from backchat import addresses, gateway
from tests.cfg import make_cfg

KEY = "sk-gateway-unit-0123456789"

# HAProxy 2.6's statistics (/;csv) for a pool of two: ai-01 passing its check, ai-02 refusing
# connections (captured from Debian's haproxy running gateway.cfg.j2).
STATS_CSV = """\
# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,rtime,ttime,agent_status,agent_code,agent_duration,check_desc,agent_desc,check_rise,check_fall,check_health,agent_rise,agent_fall,agent_health,addr,cookie,mode,algo,conn_rate,conn_rate_max,conn_tot,intercepted,dcon,dses,wrew,connect,reuse,cache_lookups,cache_hits,srv_icur,src_ilim,qtime_max,ctime_max,rtime_max,ttime_max,eint,idle_conn_cur,safe_conn_cur,used_conn_cur,need_conn_est,uweight,agg_server_status,agg_server_check_status,agg_check_status,-,ssl_sess,ssl_reused_sess,ssl_failed_handshake,h2_headers_rcvd,h2_data_rcvd,h2_settings_rcvd,h2_rst_stream_rcvd,h2_goaway_rcvd,h2_detected_conn_protocol_errors,h2_detected_strm_protocol_errors,h2_rst_stream_resp,h2_goaway_resp,h2_open_connections,h2_backend_open_streams,h2_total_connections,h2_backend_total_streams,h1_open_connections,h1_open_streams,h1_total_connections,h1_total_streams,h1_bytes_in,h1_bytes_out,h1_spliced_bytes_in,h1_spliced_bytes_out,
pool,ai-01,0,0,0,0,,0,0,0,,0,,0,0,0,0,UP,1,1,0,0,0,2,0,,1,4,1,,0,,2,0,,0,L7OK,200,1,0,0,0,0,0,0,0,,,0,0,0,,,,,-1,,,0,0,0,0,,,,Layer7 check passed,,2,2,3,,,,127.0.0.1:37761,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,1,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
pool,ai-02,0,0,0,0,,0,0,0,,0,,0,0,0,0,DOWN,1,1,0,1,1,2,2,,1,4,2,,0,,2,0,,0,L4CON,,0,0,0,0,0,0,0,0,,,0,0,0,,,,,-1,Connection refused,,0,0,0,0,,,,Layer4 connection problem,,2,2,0,,,,127.0.0.1:60157,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,1,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
"""


def lab(**overrides):
    """Three AI hosts as the deploy sees them: (inventory name, settings, public address)."""
    return [
        ("ai-01", make_cfg(tls=True, **overrides), "ai-01.lab"),
        ("ai-02", make_cfg(tls=True, backend="textgen", textgen_api_port=5005, **overrides), "ai-02.lab"),
        ("10.0.0.7", make_cfg(tls=True, **overrides), "10.0.0.7"),
    ]


@pytest.fixture
def cfg():
    return make_cfg(tls=True, api_key=KEY, public_address="gw.lab")


def server_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("server ") and " # " in line]


# --- the pool ------------------------------------------------------------------------------


def test_each_ai_host_is_in_the_pool_at_its_api_behind_its_door():
    pool = gateway.members(lab())
    assert [(m.host, m.server, m.address, m.tls, m.verify_name) for m in pool] == [
        ("ai-01", "ai-01", "ai-01.lab:8080", True, "ai-01.lab"),
        ("ai-02", "ai-02", "ai-02.lab:5005", True, "ai-02.lab"),  # Text Gen WebUI's API port
        # HAProxy checks a certificate's DNS names only: an IP is checked against the CA alone.
        ("10.0.0.7", "10.0.0.7", "10.0.0.7:8080", True, None),
    ]


def test_a_host_without_a_front_door_is_reached_over_plain_http():
    (member,) = gateway.members([("ai-01", make_cfg(tls=False), "ai-01.lab")])
    assert (member.tls, member.verify_name) == (False, None)
    line = server_lines(gateway.render_config(make_cfg(tls=True), [member]))[0]
    assert line == "server ai-01 ai-01.lab:8080  # ai-01"


def test_server_names_are_haproxys_and_never_clash():
    hosts = [("@local", make_cfg(), "box"), ("ai 01", make_cfg(), "a"), ("ai_01", make_cfg(), "b")]
    assert [m.server for m in gateway.members(hosts)] == ["local", "ai_01", "ai_01_"]


@pytest.mark.parametrize("body, listed", [
    ('{"object":"list","data":[{"id":"gpt-3.5-turbo","object":"model"}]}', True),
    ('{"data": [{"id": "gpt-3.5-turbo"}]}', True),  # Python servers put spaces in
    ('{"data":[{"id":"gpt-3.5-turbo-16k"}]}', False),
    ('{"data":[{"id":"gpt-3x5-turbo"}]}', False),  # the dot is a dot
    ('{"data":[]}', False),
    ('{"error":{"message":"Invalid API Key","code":401}}', False),
    ('{"models":[{"name":"gpt-3.5-turbo"}],"data":[]}', False),  # named, but not listed as an id
])
def test_the_health_check_passes_only_when_the_model_is_listed_as_an_id(body, listed):
    quoted = gateway.model_listed("gpt-3.5-turbo")
    assert quoted[0] == quoted[-1] == "'", "single quotes: HAProxy takes it literally"
    assert bool(re.search(quoted[1:-1], body)) is listed


# --- haproxy.cfg ---------------------------------------------------------------------------


def test_the_pool_is_least_connections_with_health_checks_that_ask_for_the_model(cfg):
    text = gateway.render_config(cfg, gateway.members(lab()))
    assert "    balance leastconn\n" in text
    assert "    option httpchk\n" in text
    assert '    http-check send meth GET uri /v1/models hdr Authorization "Bearer ${BACKCHAT_API_KEY}"\n' in text
    assert f"    http-check expect rstring {gateway.model_listed('gpt-3.5-turbo')}\n" in text
    assert ("default-server check inter 5000ms fastinter 1000ms downinter 2000ms fall 3 rise 2 "
            "observe layer7 error-limit 1 on-error sudden-death") in text


def test_retries_are_on_another_host_and_repeat_only_idempotent_requests(cfg):
    text = gateway.render_config(cfg, gateway.members(lab()))
    for line in ("retries 2", "option redispatch 1", "retry-on conn-failure empty-response 502 503 504",
                 "acl idempotent method GET HEAD OPTIONS PUT DELETE TRACE",
                 "http-request disable-l7-retry unless idempotent"):
        assert f"    {line}\n" in text, line


def test_the_key_is_checked_at_the_door_and_is_never_in_the_file(cfg):
    text = gateway.render_config(cfg, gateway.members(lab()))
    assert KEY not in text
    check = next(line for line in text.splitlines() if "http-request return status 401" in line)
    assert check.endswith('unless { req.hdr(authorization) -m str "Bearer ${BACKCHAT_API_KEY}" }')
    assert '"code":"invalid_api_key"' in check
    # An empty variable would make "Bearer " the key: HAProxy refuses to start instead.
    assert '.if streq("${BACKCHAT_API_KEY}","")\n    .alert' in text


def test_without_a_key_nothing_is_checked_and_nothing_is_sent():
    text = gateway.render_config(make_cfg(tls=True, auth=False), gateway.members(lab()))
    assert "BACKCHAT_API_KEY" not in text and "401" not in text
    assert "    http-check send meth GET uri /v1/models\n" in text


def test_hosts_are_reached_over_https_checked_against_our_ca(cfg):
    lines = server_lines(gateway.render_config(cfg, gateway.members(lab())))
    assert lines == [
        "server ai-01 ai-01.lab:8080 ssl verify required ca-file /etc/backchat/gateway/ca.crt "
        "verifyhost ai-01.lab sni str(ai-01.lab) check-sni ai-01.lab  # ai-01",
        "server ai-02 ai-02.lab:5005 ssl verify required ca-file /etc/backchat/gateway/ca.crt "
        "verifyhost ai-02.lab sni str(ai-02.lab) check-sni ai-02.lab  # ai-02",
        "server 10.0.0.7 10.0.0.7:8080 ssl verify required ca-file /etc/backchat/gateway/ca.crt  # 10.0.0.7",
    ]


def test_a_host_with_your_own_certificate_is_checked_against_the_systems_store(cfg, tmp_path):
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    own = make_cfg(tls=True, tls_cert_file=str(tmp_path / "cert.pem"), tls_key_file=str(tmp_path / "key.pem"))
    pool = gateway.members([("ai-01", own, "ai-01.lab"), ("ai-02", make_cfg(tls=True), "ai-02.lab")])
    ours = make_cfg().tls_ca_dir
    assert [member.ca_dir for member in pool] == [None, ours]
    assert gateway.ca_dirs(pool) == {ours}
    lines = server_lines(gateway.render_config(cfg, pool))
    assert "ca-file @system-ca verifyhost ai-01.lab" in lines[0]
    assert "ca-file /etc/backchat/gateway/ca.crt verifyhost ai-02.lab" in lines[1]
    assert gateway.ca_dirs(gateway.members([("ai-01", own, "a"), ("ai-02", make_cfg(), "b")])) == set()


def test_the_door_is_https_on_the_gateway_port_and_routes_v1_to_the_pool(cfg):
    text = gateway.render_config(cfg, [])
    assert "    bind :443 ssl crt /etc/backchat/gateway/gateway.pem alpn http/1.1\n" in text
    assert "    use_backend pool if { path_beg /v1/ }\n    default_backend gui\n" in text
    assert "    server gui chatbot-ui:3000 " in text
    assert f"    bind :{gateway.POOL_PORT}\n    default_backend pool\n" in text
    plain = gateway.render_config(make_cfg(tls=False, gateway_port=8000), [])
    assert "    bind :8000\n" in plain and "X-Forwarded-Proto http\n" in plain


def test_long_answers_stream_and_are_not_cut(cfg):
    text = gateway.render_config(make_cfg(tls=True, proxy_timeout=2400), [])
    for line in ("timeout client 2400s", "timeout server 2400s", "timeout tunnel 2400s", "option http-no-delay"):
        assert f"    {line}\n" in text, line


def test_the_statistics_are_on_a_socket_only_root_reads(cfg):
    text = gateway.render_config(cfg, [])
    assert f"    bind unix@{gateway.CONTAINER_RUN_DIR}/{gateway.STATS_SOCKET} mode 600\n" in text
    assert f"    stats socket {gateway.CONTAINER_RUN_DIR}/admin.sock mode 600 level user\n" in text
    assert "    user haproxy\n    group haproxy\n" in text


# --- the relay and the compose file ----------------------------------------------------------


def test_the_relay_mends_the_stream_on_its_way_to_the_pool(cfg):
    text = gateway.render_relay(cfg)
    assert f"listen {addresses.RELAY_PORT};" in text and f"set $upstream gateway:{gateway.POOL_PORT};" in text
    assert "sub_filter '\"content\":null' '\"content\":\"\"';" in text
    assert "ssl_certificate" not in text and "listen 443" not in text
    assert f"({cfg.stack_dir}/gateway/relay.conf)" in text.splitlines()[0]


def test_the_compose_file_runs_the_gateway_the_relay_and_the_gui(cfg):
    compose = yaml.safe_load(gateway.render_compose(cfg))
    assert compose["name"] == gateway.PROJECT
    services = compose["services"]
    assert tuple(services) == gateway.SERVICES
    door = services["gateway"]
    assert door["image"] == "haproxy:3.4.2" and door["user"] == "root"
    assert door["ports"] == ["0.0.0.0:443:443"]
    assert door["environment"] == {"BACKCHAT_API_KEY": "${BACKCHAT_API_KEY:?BACKCHAT_API_KEY missing from .env}"}
    assert door["volumes"] == [
        f"/opt/backchat/gateway/haproxy.cfg:{gateway.CONTAINER_CONFIG}:ro",
        f"/opt/backchat/gateway/tls:{gateway.CONTAINER_TLS_DIR}:ro",
        f"/opt/backchat/gateway/run:{gateway.CONTAINER_RUN_DIR}",
    ]
    assert services["relay"]["image"] == "nginx:1.30.4"
    assert "ports" not in services["relay"] and "ports" not in services["chatbot-ui"]
    gui = services["chatbot-ui"]["environment"]
    assert gui["OPENAI_API_HOST"] == f"http://relay:{addresses.RELAY_PORT}"
    assert gui["OPENAI_API_KEY"].startswith("${BACKCHAT_API_KEY:?") and gui["DEFAULT_MODEL"] == "gpt-3.5-turbo"
    assert KEY not in gateway.render_compose(cfg)


def test_the_compose_file_follows_bind_port_and_images():
    cfg = make_cfg(bind_address="10.0.0.2", gateway_port=8443, gateway_image="registry.lab/haproxy:3.4.2",
                   auth=False)
    services = yaml.safe_load(gateway.render_compose(cfg))["services"]
    assert services["gateway"]["ports"] == ["10.0.0.2:8443:8443"] and "environment" not in services["gateway"]
    assert services["gateway"]["image"] == "registry.lab/haproxy:3.4.2"


@pytest.mark.parametrize("port, tls, url", [
    (443, True, "https://gw.lab"), (8443, True, "https://gw.lab:8443"),
    (80, False, "http://gw.lab"), (443, False, "http://gw.lab:443"),
])
def test_the_gateway_url_leaves_out_the_schemes_own_port(port, tls, url):
    assert addresses.gateway_url(make_cfg(tls=tls, gateway_port=port), "gw.lab") == url


# --- which hosts are in rotation ---------------------------------------------------------------


def test_rotation_reads_haproxys_statistics():
    pool = gateway.members([("ai-01", make_cfg(), "ai-01"), ("ai-02", make_cfg(), "ai-02"),
                            ("ai-03", make_cfg(), "ai-03")])
    standings = gateway.rotation(STATS_CSV, pool)
    assert [(s.host, s.in_rotation, s.status, s.check) for s in standings] == [
        ("ai-01", True, "UP", "L7OK/200"),
        ("ai-02", False, "DOWN", "L4CON"),
        ("ai-03", False, "unknown", ""),
    ]
    assert standings[1].detail == "Connection refused"
    assert gateway.summary(standings) == (
        "in rotation: ai-01; out: ai-02 (DOWN: L4CON, Connection refused), "
        "ai-03 (unknown: not in the gateway's pool: re-run the deploy)")


@pytest.mark.parametrize("status, inside", [
    ("UP", True), ("UP 1/3", True), ("no check", True),
    ("DOWN", False), ("DOWN 1/2", False), ("MAINT", False), ("DRAIN", False), ("NOLB", False),
])
def test_in_rotation_is_what_haproxy_sends_requests_to(status, inside):
    assert gateway.Standing("ai-01", status, "", "").in_rotation is inside


def test_nobody_in_rotation_says_so():
    assert gateway.summary([gateway.Standing("ai-01", "DOWN", "L7RSP", "HTTP content check did not match")]) == (
        "in rotation: none; out: ai-01 (DOWN: L7RSP, HTTP content check did not match)")
