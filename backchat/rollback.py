"""Day two: put each AI host back on its last verified state (backchat/rollout.py).

    pyinfra inventory.py rollback.py

For a host a failed or interrupted run left on files or containers that never verified:
the files the stack read when it last passed verify go back in place, the containers are
recreated on them (batch by batch, ``rollout_batch_size``), and it is verified again. A
host already on its last verified state is only verified; a second run changes nothing.
"""

from __future__ import annotations

from pyinfra import host, state
from pyinfra.api import deploy

from backchat import addresses, report, rollout, stack, transport
from backchat.run_settings import role, settings_for
from backchat.settings import DEFAULTS


@deploy("Backchat rollback", data_defaults=DEFAULTS)
def rollback_backchat():
    cfg = settings_for(state, host)  # the same checks as the deploy
    transport.prepare_run(state, host)  # TCP_NODELAY; no question when nothing changes; less CPU
    report.install(state, cfg.report_path, title="rollback")
    if not role(state.inventory, host).serves_ai:
        return
    rollout.back_to_last_verified(
        name="Return to the last verified state",
        cfg=cfg,
        services=addresses.compose_services(cfg),
        rollback_commands=stack.rollback_commands(cfg),
        _parallel=rollout.batch(state, cfg),
    )
