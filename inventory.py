"""Which hosts to deploy to. Each list is a group; group_data/<group>.py holds its settings.

With nothing listed here (and BACKCHAT_HOSTS unset) the deploy targets the machine you run
it on (@local), after pyinfra shows the plan and asks to go ahead.
"""

import os

# One or more single machines, by SSH name or address: ["ai-01.example.com"].
workstations = []

# A lab fleet. BACKCHAT_HOSTS="ai-01,ai-02,ai-03" fills it without editing this file.
lab = [name for name in os.environ.get("BACKCHAT_HOSTS", "").split(",") if name]

# Where your Backstage app lives, for a lab: that host gets the Backstage config for every
# AI host above, and no stack unless it is listed above too. Empty: each AI host writes
# its own (the one-box setup). BACKCHAT_BACKSTAGE="portal.lab" fills it.
backstage = [name for name in os.environ.get("BACKCHAT_BACKSTAGE", "").split(",") if name]

# The lab's one endpoint: a host that runs the gateway (HAProxy) over every AI host above,
# with the GUI behind it; it may be one of them too. At most one. BACKCHAT_GATEWAY="gw.lab"
# fills it.
gateway = [name for name in os.environ.get("BACKCHAT_GATEWAY", "").split(",") if name]

# The Vagrant test box (see Vagrantfile): BACKCHAT_VAGRANT=1 targets it via `vagrant ssh-config`.
vagrant = ["@vagrant/default"] if os.environ.get("BACKCHAT_VAGRANT") else []

if not (workstations or lab or vagrant or backstage or gateway):
    workstations = ["@local"]
