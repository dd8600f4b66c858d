# Settings for the `lab` group (inventory.py; BACKCHAT_HOSTS fills it). Anything here
# overrides the defaults (group_data/all.py lists them) for those hosts only.

# Lab machines are reached by their DNS names, which is also what browsers use.
public_address = None
# The API key is on by default and shared by the whole fleet (see all.py, "The API key").
