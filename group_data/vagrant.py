# Settings for the Vagrant test box (see Vagrantfile; BACKCHAT_VAGRANT=1 in inventory.py).

# The box forwards its ports to the machine running Vagrant, so the browser (and the
# verify step) reach it as localhost there.
public_address = "localhost"
# The box has 10 GB of RAM: enough for the 7B model, less than a workstation.
min_memory_mb = 7000
