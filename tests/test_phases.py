"""The time each step took per host: grouped while planning, timed while executing, reported."""

import json
from types import SimpleNamespace

import pytest
from pyinfra.context import ctx_host

from backchat import outcomes, phases, report


class Host:
    def __init__(self, name: str):
        self.name, self.op_hash_order = name, []


class FakeMeta:
    def __init__(self, changed: bool):
        self.changed = changed

    def did_change(self) -> bool:
        return self.changed


@pytest.fixture
def clean(monkeypatch):
    for name in ("_planned", "_skipped", "_started", "_seconds", "_credited", "_debited"):
        monkeypatch.setattr(phases, name, {})
    monkeypatch.setattr(phases, "_failed", set())
    monkeypatch.setattr(outcomes, "_records", {})


def plan(host, step_ops: dict[str, list[str]], skipped: dict[str, str] = ()):
    """Queue operations (their hashes) in steps for ``host``, as deploy.py does while planning."""
    with ctx_host.use(host):
        for name, hashes in step_ops.items():
            if name == "other":
                host.op_hash_order.extend(hashes)
                continue
            with phases.step(name):
                host.op_hash_order.extend(hashes)
        for name, why in dict(skipped).items():
            phases.skip(name, why)


def run(state, host, op_hash: str, seconds: float, changed: bool, fails: bool = False, clock=None):
    phases.Timer.operation_host_start(state, host, op_hash)
    clock.now += seconds
    if fails:
        phases.Timer.operation_host_error(state, host, op_hash)
    else:
        phases.Timer.operation_host_success(state, host, op_hash)
    state.ops.setdefault(host, {})[op_hash] = SimpleNamespace(operation_meta=FakeMeta(changed and not fails))


def test_a_first_apply_reports_each_step_and_a_rerun_says_no_op(clean, monkeypatch):
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(phases, "time", SimpleNamespace(monotonic=lambda: clock.now))
    fresh, again = Host("ai-01"), Host("ai-02")
    state = SimpleNamespace(inventory=[fresh, again], failed_hosts=set(), ops={})
    ops = {"other": ["pre"], "docker": ["apt-update", "apt-install"], "model": ["fetcher", "download"],
           "images": ["pull"], "compose_up": ["up"], "verify": ["verify"]}
    plan(fresh, ops)
    plan(again, {**ops, "model": []})  # the model was verified earlier: nothing queued
    times = {"pre": 0.5, "apt-update": 10.0, "apt-install": 30.0, "fetcher": 0.2, "download": 12.0, "pull": 20.0,
             "up": 8.0, "verify": 5.0}
    for op_hash, seconds in times.items():
        run(state, fresh, op_hash, seconds, changed=op_hash != "verify", clock=clock)
        if op_hash not in ("fetcher", "download"):
            run(state, again, op_hash, 0.3, changed=False, clock=clock)

    first = phases.summary(state, fresh)
    assert {key: (first[key]["seconds"], first[key]["result"]) for key, _ in phases.PHASES} == {
        "docker": (40.0, "changed"), "model": (12.2, "changed"), "images": (20.0, "changed"),
        "compose_up": (8.0, "changed"), "verify": (5.0, "checked"),
    }
    assert first["other"]["seconds"] == 0.5 and first["total"]["seconds"] == 85.7
    second = phases.summary(state, again)
    assert [second[key]["result"] for key, _ in phases.PHASES] == ["no-op"] * 4 + ["checked"]
    assert second["model"] == {"seconds": 0.0, "operations": 0, "result": "no-op", "changed": 0}

    entries = report.rows(state)
    assert entries[0]["phases"] == first
    json.dumps(entries)  # plain data for the JSON report
    table = phases.format_table(entries).splitlines()
    assert table[0].split("  ")[0] == "host" and "Docker packages" in table[0] and "compose up" in table[0]
    assert table[1].split() == ["ai-01", "40.0s", "12.2s", "20.0s", "8.0s", "5.0s", "0.5s", "85.7s"]
    assert table[2].startswith("ai-02") and table[2].count("no-op") == 5


def test_skipped_failed_and_not_run_steps_say_so(clean, monkeypatch):
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(phases, "time", SimpleNamespace(monotonic=lambda: clock.now))
    written, broken = Host("ai-01"), Host("ai-02")
    refused = Host("ai-03")  # refused by preflight: no step planned
    state = SimpleNamespace(inventory=[written, broken, refused], failed_hosts={broken, refused}, ops={})
    plan(written, {"docker": ["apt"], "model": ["push"], "verify": ["verify"]},
         skipped={"images": "start = False", "compose_up": "start = False", "verify": "start = False"})
    plan(broken, {"docker": ["apt"], "model": ["push"], "verify": ["verify"]})
    run(state, written, "apt", 3.0, changed=True, clock=clock)
    run(state, written, "push", 2.0, changed=True, clock=clock)
    run(state, written, "verify", 0.1, changed=False, clock=clock)
    run(state, broken, "apt", 1.0, changed=True, clock=clock)
    run(state, broken, "push", 4.0, changed=False, fails=True, clock=clock)

    ok, bad = phases.summary(state, written), phases.summary(state, broken)
    assert [ok[key]["result"] for key, _ in phases.PHASES] == ["changed", "changed", "skipped", "skipped", "skipped"]
    assert ok["images"]["why"] == "start = False"
    assert [bad[key]["result"] for key, _ in phases.PHASES] == ["changed", "failed", "not run", "not run", "not run"]
    assert phases.summary(state, refused) is None

    outcomes.record("ai-02", failure="push failed")
    entries = report.rows(state)
    assert "phases" not in entries[2]
    table = phases.format_table(entries)
    assert "ai-01: skipped images, compose up, verify: start = False" in table
    assert "4.0s FAILED" in table and "not run" in table
    assert phases.format_table([{"host": "ai-01", "result": "ok"}]) == ""  # status.py, uninstall.py


def test_verify_inside_the_rollouts_operation_is_timed_as_verify(clean, monkeypatch):
    """rollout.up_and_verify starts the stack and verifies it in one operation: the seconds
    verify took are the verify step's, not compose up's; a host that never got to verify
    says so."""
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(phases, "time", SimpleNamespace(monotonic=lambda: clock.now))
    upgraded, stopped = Host("ai-01"), Host("ai-02")
    state = SimpleNamespace(inventory=[upgraded, stopped], failed_hosts=set(), ops={})
    for each in (upgraded, stopped):
        plan(each, {"images": ["pull"], "compose_up": ["up-and-verify"]})
        with ctx_host.use(each):
            phases.expect("verify")
    phases.Timer.operation_host_start(state, upgraded, "up-and-verify")
    clock.now += 30.0
    upgraded.current_op_hash = "up-and-verify"
    phases.credit(upgraded, "verify", 12.0)
    phases.Timer.operation_host_success(state, upgraded, "up-and-verify")
    state.ops[upgraded] = {"up-and-verify": SimpleNamespace(operation_meta=FakeMeta(True))}
    summary = phases.summary(state, upgraded)
    assert (summary["compose_up"]["seconds"], summary["compose_up"]["result"]) == (18.0, "changed")
    assert (summary["verify"]["seconds"], summary["verify"]["result"]) == (12.0, "checked")
    assert summary["total"]["seconds"] == 30.0
    assert phases.summary(state, stopped)["verify"]["result"] == "not run"
