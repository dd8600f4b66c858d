"""Resolve a model file on the Hub: ``python -m backchat.hub ENDPOINT REPO FILE REVISION``.

Prints one JSON line: {repo, filename, commit, sha256, size} or {error}. Run as a child
process of the deploy (see model.resolve); the token, if any, comes from $HF_TOKEN.
"""

from __future__ import annotations

import json
import os
import re
import sys

SHA256 = re.compile(r"^[0-9a-f]{64}$")


def resolve(endpoint: str, repo: str, filename: str, revision: str, token: str | None) -> dict:
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    where = f"{repo}/{filename} at revision {revision} from {endpoint}"
    try:
        meta = get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision, endpoint=endpoint), token=token)
        sha256 = (meta.etag or "").strip('"')
        if not SHA256.match(sha256):
            # A non-LFS file's etag is a git blob id; the LFS oid is what can be verified.
            info = HfApi(endpoint=endpoint, token=token).get_paths_info(repo, [filename], revision=revision, expand=True)
            lfs = getattr(info[0], "lfs", None) if info else None
            sha256 = getattr(lfs, "sha256", "") or ""
    except GatedRepoError:
        return {"error": f"{where} is gated or private. Fix: set HF_TOKEN to a token with access"}
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", "?")
        return {
            "error": f"could not resolve {where}: HTTP {status} ({type(error).__name__}). "
            "Fix: check model_repo, model_file and model_revision"
        }
    except Exception as error:  # network failures come in many types; all mean the same here
        return {
            "error": f"could not reach {endpoint} to resolve {where}: {type(error).__name__}. "
            "Fix: check the network, or set hf_endpoint to a reachable mirror"
        }
    if not SHA256.match(sha256) or not meta.commit_hash or not meta.size:
        return {"error": f"{where}: the endpoint reported no sha256, commit or size"}
    return {"repo": repo, "filename": filename, "commit": meta.commit_hash, "sha256": sha256, "size": meta.size}


if __name__ == "__main__":
    endpoint, repo, filename, revision = sys.argv[1:5]
    print(json.dumps(resolve(endpoint, repo, filename, revision, os.environ.get("HF_TOKEN") or None)))
