# Every backchat setting, at its default (declared in backchat/settings.py, which is
# where the defaults really come from). To change one for every host, remove the `# `
# in front of it and edit the value; per group use group_data/<group>.py, per host the
# host data in inventory.py, per run `--data key=value` (JSON: null, true, "text").
# Every value is checked before anything runs; a name that is not a setting is an error.

# --- What runs -------------------------------------------------------------------
# The OpenAI-compatible server: "localai", "textgen" (Text Gen WebUI's API) or
# "llamacpp" (llama.cpp's own server: the lightest, for small hosts).
# backend = 'localai'
# The chat GUI that Backstage iframes: "chatbot-ui" (talks to `backend`) or "textgen"
# (Text Gen WebUI's own GUI; it is then started as well, sharing the model file).
# frontend = 'chatbot-ui'
# False installs and writes everything but starts nothing (image baking, roots with no
# systemd). The run says so.
# start = True

# --- Docker ----------------------------------------------------------------------
# "docker": Docker's own apt repository (docker-ce + compose v2 plugin).
# "debian": the distribution's docker.io + compose v2 (Debian 13, Ubuntu); for mirrors
# and air-gapped labs. Debian 12 only packages compose v1 and is refused.
# docker_source = 'docker'
# Docker's apt repository, or a mirror/proxy with Docker's layout (<url>/debian and
# <url>/ubuntu, each with dists/<codename>/stable and gpg, the signing key).
# docker_repo_url = 'https://download.docker.com/linux'
# The controller fetches <docker_repo_url>/<debian|ubuntu>/gpg and refuses the host
# (nothing installed) unless it is exactly one key with this fingerprint. This one is
# Docker's release key ("Docker Release (CE deb) <docker@docker.com>"); a mirror that
# re-signs with its own key needs that key's fingerprint (gpg --show-keys FILE).
# docker_repo_key_fingerprint = '9DC858229FC7DD38854AE2D88D81803C0EBFCD88'
# Existing users added to the docker group (they can then run docker without sudo).
# docker_users = []

# --- The model -------------------------------------------------------------------
# model_repo = 'TheBloke/Mistral-7B-OpenOrca-GGUF'
# model_file = 'mistral-7b-openorca.Q4_K_M.gguf'
# A commit id pins the exact bytes; a branch name is resolved to a commit each run.
# This commit and sha256 were read from go-skynet/model-gallery's scrape of the Hub
# (2023-11, docs/model-pin.md); the first real download checks both against the Hub.
# model_revision = 'fbd9cd059e5fa0bba72a0abe8aea7e127d7994cb'
# When set, the run stops unless the source reports exactly this sha256 (supply chain).
# model_sha256 = '83967e58c10c25fbe9d358b6d9e9a8212ca8a292061110dcb68511d39133407b'
# The id every backend lists in /v1/models. Legacy Chatbot UI only shows the ids
# gpt-3.5-turbo, gpt-35-turbo, gpt-4 and gpt-4-32k, so the local model wears one.
# model_id = 'gpt-3.5-turbo'
# Where hosts get the model: "hub" (each host from the Hub by the resolved commit),
# "controller" (downloaded once here, pushed to the hosts over SSH: a fleet pulls it from
# upstream once), or "mirror" (each host from model_mirror_url, a LAN HTTP server).
# model_source = 'hub'
# model_mirror_url = None
# After model_repo or model_file changes, the previous file stays until the new one is
# verified and the stack verified on it (so the disk must hold both for a while); then it
# is removed, unless this keeps it (to switch back without downloading it again).
# keep_old_models = False
# "marker": trust a file whose size and mtime match the record of its last verification
# (re-runs read nothing). "full": hash it again (after disk trouble, or to be sure).
# model_verify = 'marker'
# Hub or Hub mirror; None means $HF_ENDPOINT or https://huggingface.co. The token for
# gated repos is read from $HF_TOKEN on the controller and stored 0600 on hosts.
# hf_endpoint = None
# Hosts with less RAM are refused: a 7B Q4_K_M model wants about 8 GB.
# min_memory_mb = 7500

# --- Tuning ----------------------------------------------------------------------
# None: one thread per physical core the host may use (read from /sys topology and the
# cgroup CPU quota), which is what llama.cpp runs best with. A number overrides it.
# threads = None
# Tokens of context. Chatbot UI keeps up to 3,000 (cl100k) tokens of history, about 3,300
# to 4,000 of Mistral's, and asks for 1,000 more to answer: 4096 overflows on long chats
# (measured with llama-server, tests/test_real_model.py). 8192 costs ~1 GB of KV cache.
# context_size = 8192

# --- Where things go on the host (directories of backchat's own: system and shared
# directories such as /, /etc, /tmp, /opt or a home directory are refused) ---------
# Compose file, .env, the model fetcher.
# stack_dir = '/opt/backchat'
# One copy of the model, shared by every backend (root-owned, not writable by others).
# models_dir = '/opt/backchat/models'

# --- Ports (on the host) ---------------------------------------------------------
# 0.0.0.0 so browsers on other machines (Backstage users) can reach the GUI and API;
# 127.0.0.1 keeps everything local to the host.
# bind_address = '0.0.0.0'
# LocalAI, or llama.cpp's server when backend = "llamacpp".
# localai_port = 8080
# chatbot_ui_port = 3001
# Text Gen WebUI's GUI, and its OpenAI API (container port 5000).
# textgen_port = 7860
# textgen_api_port = 5001

# --- The HTTPS front door -------------------------------------------------------
# nginx terminates TLS on every published port (the services behind it publish none),
# unless bind_address is loopback. Browsers block an http:// iframe in an https://
# Backstage page, so leave it on for anything users reach over the network.
# tls = True
# The controller's CA: made once, reused, never printed. Trust its ca.crt in browsers
# and in Backstage's backend (NODE_EXTRA_CA_CERTS).
# tls_ca_dir = '~/.config/backchat/ca'
# Your own certificate and key instead (PEM files on the controller; both or neither).
# tls_cert_file = None
# tls_key_file = None
# Seconds a streamed answer may take through the door (a 7B model on CPU is slow).
# proxy_timeout = 1800

# --- The lab's gateway (a host in inventory.py's `gateway` group) -----------------
# One HTTPS endpoint for the whole lab: the GUI at /, the OpenAI API at /v1, spread over
# every AI host's API (HAProxy: least connections, a host in rotation only while its
# /v1/models lists the model, the key checked at the door). Backstage points at it.
# gateway_port = 443

# --- Images (pinned; point them at a private registry for air-gapped labs) -------
# localai_image = 'localai/localai:v4.9.0'
# chatbot_ui_image = 'ghcr.io/mckaywrigley/chatbot-ui:main'
# textgen_image = 'atinoda/text-generation-webui:default-cpu-v4.7.3'
# llama.cpp's build-numbered tag (its default port is changing; the compose file sets it).
# llamacpp_image = 'ghcr.io/ggml-org/llama.cpp:server-b11206'
# The front door: nginx's stable line (the official image, Debian-based, with curl).
# frontdoor_image = 'nginx:1.30.4'
# The gateway: HAProxy's newest LTS (3.4; the tests run Debian 12's 2.6 with the same file).
# gateway_image = 'haproxy:3.4.2'
# Image tarballs on the controller (docker save ...) to `docker load` on hosts with no
# registry access. Their tags must match the image settings above.
# image_archives = []
# LocalAI (v3.2+) downloads its llama-cpp backend from a registry on first start. For
# hosts with no registry access: the backend's files as a tarball on the controller
# (run.sh at its top; README "Air-gapped labs" shows how to make one) and its sha256. The
# hosts get it from the controller, check the sha256, and LocalAI then fetches nothing.
# localai_backend_archive = None
# localai_backend_sha256 = None

# --- The API key -----------------------------------------------------------------
# The backends require a key, and Chatbot UI and verify send it. The key itself never
# goes in any settings file or --data: it is $BACKCHAT_API_KEY if set, else the file
# api_key_file names, else ~/.config/backchat/api-key, generated once (0600) and reused,
# so a whole fleet shares one key. auth = False turns the key off (then keep
# bind_address on loopback: anyone who reaches the port can use the model).
# auth = True
# api_key_file = None

# --- Backstage -------------------------------------------------------------------
# Where app-config.local.yaml is written on the host: your Backstage app's root.
# backstage_app_dir = '/opt/backchat/backstage'
# The name browsers use to reach this host; None means the inventory name (or, for
# @local, the host name). Never localhost: that is the browser's own machine.
# public_address = None
# Backstage's own origin in the browser (allowed by the backends' CORS): scheme, host
# and port only, no path or trailing slash.
# backstage_origin = 'http://localhost:3000'
# Only on a host of the inventory's `backstage` group (one Backstage for a lab): the AI
# host whose GUI the Backchat page opens, by inventory name. None: the first AI host.
# ai_server_host = None

# --- Upgrades --------------------------------------------------------------------
# When a run changes what the AI hosts run (an image tag, the model, a setting that
# restarts containers), they are started and verified this many at a time: a number of
# hosts (0: all at once) or a share of them ("25%": a quarter, at least one). A host
# that fails verify after the change goes back to its last verified state (kept in
# stack_dir/last-verified; its old images are still there), and the rollout stops: the
# later hosts keep running what they ran. `pyinfra inventory.py rollback.py` returns
# hosts to their last verified state by hand. One value for the whole lab.
# rollout_batch_size = '25%'

# --- Verify ----------------------------------------------------------------------
# Seconds to wait for each backend's /v1/models to list model_id (0 skips the check).
# verify_timeout = 600
# Also ask one chat question and report the answer's first line.
# verify_chat = False
# chat_timeout = 900
# Where the run's JSON report is written on the controller (None: not written).
# report_path = None

# --- Uninstall (uninstall.py only) -------------------------------------------------
# The model (4.4 GB) is kept by uninstall.py, so a later deploy need not download it
# again; --data remove_model=true removes it too.
# remove_model = False
