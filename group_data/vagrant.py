# Settings for the Vagrant test box (see Vagrantfile; BACKCHAT_VAGRANT=1 in inventory.py).

# Vagrant logs in as its `vagrant` user, which has sudo without a password (every box).
_sudo = True
# As `vagrant ssh` does: the box's host key is new with each `vagrant up`, often at an
# address an earlier box had, so it is neither checked nor kept.
ssh_known_hosts_file = "/dev/null"
ssh_strict_host_key_checking = "no"

# The box forwards its ports to the machine running Vagrant, so the browser (and the
# verify step) reach it as localhost there.
public_address = "localhost"
# The box has 10 GB of RAM: enough for the 7B model, less than a workstation.
min_memory_mb = 7000
