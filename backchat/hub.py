"""The controller's side of the Hub, run as a child process of the deploy (see backchat.model).

    python -m backchat.hub ENDPOINT REPO FILE REVISION
        resolve: prints {repo, filename, commit, sha256, size} or {error[, unreachable]}
    python -m backchat.hub download ENDPOINT REPO FILE COMMIT SHA256 SIZE
        put the file in huggingface_hub's cache, resumable and verified: prints
        {path, sha256, size, hashed, resumed_from, downloaded} or {error}

Each prints one JSON line. The token, if any, comes from $HF_TOKEN.

Why not just ``hf_hub_download``: in huggingface_hub 2.4 it downloads to a process-unique
``*.incomplete`` file and deletes it on failure (huggingface_hub PR #4228), so a 4.4 GB
download killed at 90 % starts again from zero on the next run, and it never checks the
sha256. So the bytes go to ``blobs/<sha256>.backchat-part`` in the same cache, resumed with
huggingface_hub's own ``http_get`` (its auth headers, redirects and retries), hashed once,
renamed to ``blobs/<sha256>``; then ``hf_hub_download`` links it into ``snapshots/`` as if
it had fetched it itself (one HEAD request, no bytes). The cache stays the normal one.

Hashing 4.4 GB takes about ten seconds, every time; the verdict is cached in
``$XDG_CACHE_HOME/backchat/controller-verified.json`` keyed by the blob's real path, size,
mtime and inode, so a later run (or a later host) trusts the blob without reading it.
``hub-answers.json`` beside it keeps what the Hub said of a commit (``remembered_answer``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

from backchat import local_files

SHA256 = re.compile(r"^[0-9a-f]{64}$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
VERIFIED_FILE = "controller-verified.json"  # in local_files.cache_dir()
ANSWERS_FILE = "hub-answers.json"
CHUNK = 8 * 1024 * 1024


def resolve(endpoint: str, repo: str, filename: str, revision: str, token: str | None) -> dict:
    # From their modules, not the package's lazy top level, and HfApi only when a file's etag
    # is not its sha256: ``huggingface_hub.hf_api`` alone takes about 0.2 s of CPU to import,
    # in a child process every run starts (the lookup of an LFS file never needs it).
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError
    from huggingface_hub.file_download import get_hf_file_metadata, hf_hub_url

    where = f"{repo}/{filename} at revision {revision} from {endpoint}"
    try:
        meta = get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision, endpoint=endpoint), token=token)
        sha256 = (meta.etag or "").strip('"')
        if not SHA256.match(sha256):
            # A non-LFS file's etag is a git blob id; the LFS oid is what can be verified.
            from huggingface_hub.hf_api import HfApi

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
            "Fix: check the network, or set hf_endpoint to a reachable mirror",
            # Only "nobody answered" may fall back to a pinned sha256 (model.py); a Hub that
            # answers "no such file" must not be second-guessed.
            "unreachable": True,
        }
    if not SHA256.match(sha256) or not meta.commit_hash or not meta.size:
        return {"error": f"{where}: the endpoint reported no sha256, commit or size"}
    return {"repo": repo, "filename": filename, "commit": meta.commit_hash, "sha256": sha256, "size": meta.size}


def _load(name: str) -> dict:
    try:
        return json.loads((local_files.cache_dir() / name).read_text())
    except (OSError, ValueError):
        return {}


def _store(name: str, entries: dict) -> None:
    local_files.replace(local_files.cache_dir() / name,
                        (json.dumps(entries, indent=1, sort_keys=True) + "\n").encode(), 0o644)


# --- the Hub's answers for commits -------------------------------------------------
# A commit's files never change, so what the Hub said of one (its sha256 and size) holds
# for good: a re-run pinned to a commit (the default) starts no child and asks nothing.


def _answer_key(endpoint: str, repo: str, filename: str, commit: str) -> str:
    return " ".join((endpoint, repo, filename, commit))


def remembered_answer(endpoint: str, repo: str, filename: str, revision: str) -> dict | None:
    """What ``resolve`` answered earlier for this commit, or None (a branch is always asked)."""
    if not COMMIT.match(revision):
        return None
    answer = _load(ANSWERS_FILE).get(_answer_key(endpoint, repo, filename, revision))
    if not isinstance(answer, dict) or answer.get("commit") != revision or not SHA256.match(answer.get("sha256", "")):
        return None
    return answer


def remember_answer(endpoint: str, revision: str, answer: dict) -> None:
    """Keep ``resolve``'s answer when it was asked by commit (a branch's answer can change)."""
    if answer.get("commit") != revision or not COMMIT.match(revision):
        return
    answers = _load(ANSWERS_FILE)
    answers[_answer_key(endpoint, answer["repo"], answer["filename"], revision)] = answer
    _store(ANSWERS_FILE, answers)


# --- the controller's verified copy ------------------------------------------------


def _stat_key(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _load_verified() -> dict:
    return _load(VERIFIED_FILE)


def is_known_good(path: Path, sha256: str) -> bool:
    """``path`` was hashed to ``sha256`` earlier and has not changed since (stat only)."""
    try:
        return _load_verified().get(sha256) == _stat_key(path)
    except OSError:
        return False


def _remember_good(path: Path, sha256: str) -> None:
    known = _load_verified()
    known[sha256] = _stat_key(path)
    _store(VERIFIED_FILE, known)


def known_good_blob(sha256: str) -> dict | None:
    """The controller's verified blob with this sha256, if one is cached and unchanged.

    Used when the Hub cannot be reached but model_sha256 is pinned: a blob verified earlier
    is still exactly those bytes. Reads nothing but a small JSON file and one stat.
    """
    entry = _load_verified().get(sha256)
    if not entry:
        return None
    path = Path(entry["path"])
    return {"path": str(path), "sha256": sha256, "size": entry["size"]} if is_known_good(path, sha256) else None


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download(endpoint: str, repo: str, filename: str, commit: str, sha256: str, size: int, token: str | None) -> dict:
    from huggingface_hub import constants, hf_hub_download, hf_hub_url
    from huggingface_hub.file_download import http_get, repo_folder_name
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
    blob = storage / "blobs" / sha256
    part = blob.with_name(f"{sha256}.backchat-part")
    lock = Path(constants.HF_HUB_CACHE) / ".locks" / repo_folder_name(repo_id=repo, repo_type="model") / f"{sha256}.lock"
    where = f"{repo}/{filename} at {commit} from {endpoint}"
    resumed_from = downloaded = 0
    hashed = False

    blob.parent.mkdir(parents=True, exist_ok=True)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):  # huggingface_hub's own lock: another download of this blob waits
        if blob.exists() and blob.stat().st_size != size:
            blob.unlink()  # not the file the Hub describes: fetch it properly
        if not blob.exists():
            have = part.stat().st_size if part.exists() else 0
            if have > size:
                part.unlink()
                have = 0
            free = shutil.disk_usage(blob.parent).free
            if free < size - have:
                return {
                    "error": f"not enough disk on the controller for {where} in {blob.parent}: "
                    f"{free:,} bytes free, {size - have:,} needed. Fix: free space, or point HF_HOME "
                    "at a larger disk"
                }
            resumed_from = have
            try:
                with open(part, "ab") as out:
                    http_get(
                        hf_hub_url(repo, filename, revision=commit, endpoint=endpoint),
                        out,
                        resume_size=have,
                        headers=build_hf_headers(token=token),
                        expected_size=size,
                        displayed_filename=filename,
                    )
            except Exception as error:  # the partial file stays: the next run resumes from it
                got = part.stat().st_size if part.exists() else 0
                return {
                    "error": f"the controller's download of {where} failed ({type(error).__name__}: "
                    f"{str(error)[:200]}) at {got:,} of {size:,} bytes; the next run resumes from there"
                }
            downloaded = part.stat().st_size - have
            actual = _sha256_of(part)
            hashed = True
            if actual != sha256:
                part.unlink()
                return {"error": f"{where}: downloaded sha256 {actual} is not {sha256} (partial file removed)"}
            os.replace(part, blob)
            _remember_good(blob, sha256)
        elif not is_known_good(blob, sha256):
            actual = _sha256_of(blob)
            hashed = True
            if actual != sha256:
                blob.unlink()
                return {
                    "error": f"the controller's cached {blob} has sha256 {actual}, not {sha256}; "
                    "removed it, the next run downloads it again"
                }
            _remember_good(blob, sha256)

    try:
        # The blob is in place, so this only links snapshots/<commit>/<file> to it.
        path = hf_hub_download(repo, filename, revision=commit, endpoint=endpoint, token=token)
    except Exception:
        path = str(blob)  # the link is a convenience; the verified blob is what gets pushed
    return {
        "path": str(Path(path).resolve()),
        "sha256": sha256,
        "size": size,
        "hashed": hashed,
        "resumed_from": resumed_from,
        "downloaded": downloaded,
    }


if __name__ == "__main__":
    args = sys.argv[1:]
    token = os.environ.get("HF_TOKEN") or None
    if args and args[0] == "download":
        endpoint, repo, filename, commit, sha256, size = args[1:7]
        print(json.dumps(download(endpoint, repo, filename, commit, sha256, int(size), token)))
    else:
        endpoint, repo, filename, revision = args[0:4]
        print(json.dumps(resolve(endpoint, repo, filename, revision, token)))
