"""Turn each host into a private AI workstation for Backstage's Backchat plugin.

    pyinfra inventory.py deploy.py

Every setting is in group_data/all.py; all of them are checked before any host changes.
"""

from backchat import deploy_backchat

deploy_backchat()
