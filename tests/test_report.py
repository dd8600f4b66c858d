"""The end-of-run report: one line per host, the first cause of a failure kept."""

import json
from types import SimpleNamespace

from backchat import outcomes, report


def test_report_names_every_host_and_why(tmp_path, monkeypatch):
    monkeypatch.setattr(outcomes, "_records", {})
    hosts = [SimpleNamespace(name=name) for name in ("ai-01", "ai-02", "ai-03")]
    state = SimpleNamespace(inventory=hosts, failed_hosts=[hosts[1], hosts[2]])
    outcomes.record("ai-01", verify="pass", backends="localai", model_id="gpt-3.5-turbo", seconds=3.2)
    outcomes.record("ai-02", failure="Refused: Debian 11 is not supported")
    outcomes.record("ai-02", failure="a later, less useful error")
    rows = report.rows(state)
    assert [row["result"] for row in rows] == ["ok", "FAILED", "FAILED"]
    assert rows[1]["failure"] == "Refused: Debian 11 is not supported"
    assert "could not connect" in rows[2]["failure"]
    table = report.format_table(rows)
    assert table.splitlines()[0].split()[:2] == ["host", "result"]
    assert "ai-02: Refused: Debian 11 is not supported" in table
    json.dumps(rows)  # the JSON report holds plain data



def test_the_report_says_how_a_production_backstage_loads_our_file():
    rows = [{"host": "ai-01", "result": "ok", "backstage_config": "/srv/backstage/app-config.local.yaml"}]
    table = report.format_table(rows)
    assert "ai-01:/srv/backstage/app-config.local.yaml only when started without --config" in table
    assert "--config app-config.local.yaml added last" in table
    assert "BACKCHAT_API_KEY" not in table
    rows[0]["backstage_env"] = "BACKCHAT_API_KEY"
    assert "proxy adds the API key from BACKCHAT_API_KEY" in report.format_table(rows)
    assert "without --config" not in report.format_table([{"host": "ai-01", "result": "FAILED", "failure": "x"}])


def test_the_report_says_which_ca_to_trust():
    rows = [{"host": "ai-01", "result": "ok", "trust": "/root/.config/backchat/ca/ca.crt"},
            {"host": "ai-02", "result": "ok", "trust": "/root/.config/backchat/ca/ca.crt"}]
    table = report.format_table(rows)
    assert table.count("must trust /root/.config/backchat/ca/ca.crt") == 1, table
    assert "NODE_EXTRA_CA_CERTS" in table


def test_the_report_shows_the_gateways_urls_and_who_is_in_rotation():
    rows = [{"host": "gw", "result": "ok", "gateway_url": "https://gw.lab",
             "in_rotation": "in rotation: ai-01, ai-02; out: ai-03 (DOWN: L4CON, Connection refused)"}]
    table = report.format_table(rows)
    assert ("The lab's one endpoint (gateway gw): https://gw.lab (the GUI) and https://gw.lab/v1 (the OpenAI API, "
            "with the key); in rotation: ai-01, ai-02; out: ai-03 (DOWN: L4CON, Connection refused)") in table
    rows[0]["failure"] = "could not connect"
    assert "one endpoint" not in report.format_table(rows)
