"""A change of model: the previous file stays until the new one is verified and running.

When ``model_repo`` or ``model_file`` changes, the host still holds the previous model,
and the stack runs on it until the new one is in place. So it is not touched while the new
file downloads (step 2's disk check counts it: it is already on the disk and stays there),
nor until the stack has been verified on the new file (step 6); only then are the files
fetch-model.sh left for it removed, unless ``keep_old_models`` keeps them. If anything
fails on the way, the host stops there and the old model is still on it.

Which files are models backchat put there: those fetch-model.sh verified, each of which
has its ``.<name>.verified`` marker in ``models_dir`` (facts.VerifiedModels). Nothing
else in ``models_dir`` is ever removed, and nothing through a link (own_paths).
"""

from __future__ import annotations

from pyinfra import host

from backchat import outcomes, own_paths
from backchat.facts import VerifiedModels


def files_of(model_file: str) -> list[str]:
    """What fetch-model.sh writes for one model in models_dir: the file, its download, its
    lock, its marker and the marker's temporary."""
    marker = f".{model_file}.verified"
    return [model_file, f"{model_file}.part", f"{model_file}.lock", marker, f"{marker}.tmp"]


def reads(cfg) -> list[tuple[type, dict]]:
    """The facts ``remove_old`` reads whatever it finds (``transport.read_ahead``)."""
    return [_verified_models(cfg)]


def _verified_models(cfg) -> tuple[type, dict]:
    return VerifiedModels, {"models_dir": cfg.models_dir}


def old_models(cfg) -> dict[str, int | None]:
    """The models this host was given before, not the current one: name -> size."""
    fact, arguments = _verified_models(cfg)
    found = host.get_fact(fact, **arguments)
    return {name: size for name, size in sorted(found.items()) if name != cfg.model_file}


def described(old: dict[str, int | None]) -> str:
    return ", ".join(f"{name} ({size:,} bytes)" if size else name for name, size in old.items())


def remove_old(cfg) -> None:
    """After verify: remove the previous models, or say they are kept."""
    old = old_models(cfg)
    if not old:
        return
    if cfg.keep_old_models:
        # Said aloud (not a no-op note, which pyinfra shows only with -v): it is disk in use.
        host.log_styled(f"keep_old_models: kept {described(old)} in {cfg.models_dir}", fg="yellow")
        return
    own_paths.remove_own(
        name=f"Remove the previous model ({', '.join(old)}): {cfg.model_file} is verified and running",
        root=cfg.models_dir,
        paths=[path for name in old for path in files_of(name)],
        unless=_held_back,
    )


def _held_back() -> str | None:
    """A host the rollout held back still runs the previous model (backchat/rollout.py)."""
    if outcomes.records().get(host.name, {}).get("verify") == outcomes.HELD_BACK:
        return "the rollout held this host back: it still runs the previous model"
    return None
