# Settings for the `lab` group (inventory.py; BACKCHAT_HOSTS fills it). Anything here
# overrides group_data/all.py for those hosts only.

# Lab machines are reached by their DNS names, which is also what browsers use.
public_address = None
# A shared lab usually wants the API locked down.
# api_key comes from $BACKCHAT_API_KEY (see all.py).
