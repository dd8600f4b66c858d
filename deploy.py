"""Turn each host into a private AI workstation for Backstage's Backchat plugin.

    pyinfra inventory.py deploy.py

Every setting is in group_data/all.py; all of them are checked before any host changes.
"""

from pyinfra import host, state

from backchat import backstage, docker, model, preflight, report, stack, verify
from backchat.settings import settings_for, validate_inventory

validate_inventory(state.inventory)  # bad input stops the run here, for every host
cfg = settings_for(host)
report.install(state, cfg.report_path)

os_info = preflight.check(cfg)  # unsupported hosts are refused, one by one
if os_info:
    docker.install(cfg, os_info)  # 1. Docker Engine + compose v2
    if model.fetch(cfg):  # 2. the model: pinned, resumable, verified once
        threads = stack.thread_count(cfg, stack.tune())  # 3. threads = physical cores
        stack.write_and_start(cfg, threads)  # 4. compose file + model config, then up
        backstage.configure(cfg)  # 5. app-config.local.yaml and the catalog
        verify.backends(name="Verify /v1/models lists the model", cfg=cfg)  # 6.
