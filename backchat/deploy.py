"""``deploy_backchat``: the whole deploy as one reusable pyinfra ``@deploy``.

    from backchat import deploy_backchat
    deploy_backchat()

Its defaults (backchat.settings) are the lowest data layer, so a project's group data,
host data and ``--data`` override them. Every host's settings are checked once per run,
before the first operation is queued for any host.

A host of the inventory's ``backstage`` group gets the Backstage config for every AI host
of the run (and runs no stack unless it is in another group too); the host of the
``gateway`` group runs the lab's gateway over every AI host (and, likewise, no stack unless
it is in another group too); see run_settings.
"""

from __future__ import annotations

from pyinfra import host, state
from pyinfra.api import deploy

from backchat import backstage, docker, model, model_change, phases, preflight, report, rollout, stack, transport, verify
from backchat.run_settings import described_hosts, lab_gateway, pool_hosts, role, settings_for
from backchat.settings import DEFAULTS


@deploy("Backchat", data_defaults=DEFAULTS)
def deploy_backchat():
    cfg = settings_for(state, host)  # the first call checks every host of the run
    transport.prepare_run(state, host)  # TCP_NODELAY; no question when nothing changes; less CPU
    report.install(state, cfg.report_path)
    this = role(state.inventory, host)

    if this.serves_ai:
        model.look_up_early(cfg)  # the Hub answers while preflight and step 1 read the host
    transport.read_ahead(host, _reads(cfg, this))  # what the steps below read, in one command
    if this.serves_ai or this.runs_gateway:
        os_info = preflight.check(cfg, this.serves_ai, this.runs_gateway)  # unsupported hosts are refused
        if not os_info:
            return
        with phases.step("docker"):  # the report times each step on each host
            if not docker.install(cfg, os_info):  # 1. Docker Engine + compose v2, repo key pinned
                return
    if this.serves_ai:
        with phases.step("model"):
            if not model.fetch(cfg):  # 2. the model: pinned, resumable, verified once
                return
        threads = stack.thread_count(cfg, stack.tune())  # 3. threads = physical cores
        plan = stack.write(cfg, threads)  # 4. compose file + model config, the images at hand
    if this.runs_gateway:  # 4. the lab's gateway over every AI host
        pool = stack.gateway_pool(pool_hosts(state))
        stack.write_and_start_gateway(cfg, pool, load_archives=not this.serves_ai)
    if this.writes_backstage:  # 5. app-config.local.yaml, catalog (pointing at the gateway, if any)
        backstage.configure(cfg, described_hosts(state, host), lab_gateway(state))
    if this.serves_ai:  # 4 + 6. up batch by batch, each host verified; one failing after a change is rolled back
        rollout.start_and_verify(cfg, plan)
        model_change.remove_old(cfg)  # only once verify passed: the previous model, if the model changed
    if this.runs_gateway:  # 6. through the gateway, as users reach it; which hosts are in rotation
        verify.through_gateway(name="Verify the gateway serves the model from the AI hosts", cfg=cfg, pool=pool)


def _reads(cfg, this) -> list[tuple[type, dict]]:
    """The facts the steps read on this host whatever they find: one SSH session, not one each."""
    found = []
    if this.serves_ai or this.runs_gateway:
        found += preflight.reads(cfg) + docker.reads(cfg)
    if this.serves_ai:
        found += model.reads(cfg) + stack.reads(cfg) + model_change.reads(cfg)
    if this.writes_backstage:
        found += backstage.reads(cfg)
    return found
