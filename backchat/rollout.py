"""Steps 4 and 6 together, batch by batch: an upgrade that fails on a host cannot take the lab down.

``compose up`` and verify run as one operation in batches of ``rollout_batch_size`` hosts
(pyinfra's ``_parallel``: a batch is done before the next starts). A host that passes
verify keeps a copy of every file its stack reads (compose file, ``.env``, the front
door's config and certificate, LocalAI's model config), modes kept, as its **last verified
state** in ``stack_dir/last-verified``. When a run changed what a host runs (an image tag,
the model, a setting that restarts containers) and verify then fails on it:

1. the host is put back: its last verified files are restored and ``compose up
   --force-recreate`` starts it on them, on the images it ran before (backchat never
   removes an image, so they are still there), and it is verified again;
2. the rollout stops: a host of a later batch that had changes gets its last verified
   files back before anything restarts, so its containers are never touched ("held
   back"), and the run fails, naming the host, what failed and that it was rolled back.

A host with nothing to change is only verified. A host never verified before has no state
to return to: it fails alone, as before, and the rollout goes on (its failure says nothing
about the change). ``pyinfra inventory.py rollback.py`` returns each host to its last
verified state by hand (``rollback_backchat``).

The copies are made and restored by ``cp -p`` from a directory created afresh, restoring
with ``--remove-destination``, so a link planted at one of our names is replaced, never
followed.
"""

from __future__ import annotations

import math
import time

from pyinfra import host, state
from pyinfra.api import FunctionCommand, QuoteString, StringCommand, operation
from pyinfra.context import state as current_state

from backchat import outcomes, phases, transport, verify
from backchat.facts import COMPOSE_PROJECT, ComposeStack, VerifiedState, out_of_date
from backchat.run_settings import ai_hosts

SAVED_DIR = "last-verified"

# The copy: a fresh directory, then swapped in, so a failed copy leaves the last one whole.
_SAVE = (
    'umask 077; d=$1; shift; rm -rf "$d.new" && mkdir "$d.new" && cd / || exit 1; '
    'for f do if [ -f "$f" ] && [ ! -L "$f" ]; then cp -p --parents -- "${f#/}" "$d.new/" || exit 1; fi; done; '
    'rm -rf "$d" && mv "$d.new" "$d"'
)
# The files the saved state did not have are removed (this run created them), then every
# saved file goes back to its place.
_RESTORE = (
    'd=$1; shift; [ -d "$d" ] && [ ! -L "$d" ] || { echo "no verified state in $d" >&2; exit 1; }; '
    'for f do [ -e "$d$f" ] || rm -f -- "$f" || exit 1; done; '
    '(cd "$d" && find . -type f) | while IFS= read -r s; do '
    'cp -p --remove-destination -- "$d${s#.}" "${s#.}" || exit 1; done'
)

_stopped_by: dict[int, str] = {}  # id(state) -> why the rollout stopped (the first host's failure)


def saved_dir(cfg) -> str:
    return f"{cfg.stack_dir}/{SAVED_DIR}"


def batch_hosts(setting: int | str, hosts: int) -> int:
    """pyinfra's ``_parallel`` for ``rollout_batch_size``: 0 is every host at once, ``"25%"``
    a quarter of the AI hosts (at least one)."""
    if isinstance(setting, str):
        return max(1, math.ceil(hosts * int(setting.rstrip("%")) / 100))
    return setting


def save_command(cfg, files: list[str]) -> StringCommand:
    return StringCommand("sh", "-c", QuoteString(_SAVE), "save", QuoteString(saved_dir(cfg)),
                         *(QuoteString(path) for path in files))


def restore_command(cfg, files: list[str]) -> StringCommand:
    return StringCommand("sh", "-c", QuoteString(_RESTORE), "restore", QuoteString(saved_dir(cfg)),
                         *(QuoteString(path) for path in files))


def has_saved(saved: dict) -> bool:
    """A last verified state is on the host (``VerifiedState``)."""
    return any(entry["saved"] for entry in saved.values())


def state_is_saved(saved: dict) -> bool:
    """The last verified state holds the stack's files exactly as they are now."""
    return has_saved(saved) and all(entry["saved"] == entry["live"] for entry in saved.values())


def stopped() -> str | None:
    """Why this run's rollout stopped, if a host was rolled back."""
    return _stopped_by.get(id(state))


def _stop(why: str) -> None:
    _stopped_by.setdefault(id(state), why)


def _tail(output) -> str:
    return " / ".join((output.stderr_lines or output.stdout_lines)[-3:])[-400:]


def _run(state, host, commands: list, outcome: dict) -> bool:  # pyinfra passes state and host by these names
    """Run ``commands`` in order as the operation would; record how it went instead of
    failing the operation, so that verify and the rollback can follow."""
    for command in commands:
        ok, output = transport.run_as_operation(host, command)
        if not ok:
            verb = next((bit for bit in command.bits if bit in ("up", "restart", "kill")), "")
            outcome.update(ok=False, why=f"docker compose {verb} failed: {_tail(output)}")
            return True
    outcome["ok"] = True
    return True


def _verify(cfg) -> tuple[bool, str]:
    started = time.monotonic()
    ok, results = verify.check_host(cfg, on_wait=host.log)
    phases.credit(host, "verify", time.monotonic() - started)
    return ok, "; ".join(f"{r.service}: {r.detail}" for r in results if not r.ok and r.detail)


def start_and_verify(cfg, plan) -> None:
    """Steps 4 and 6 on an AI host: ``up_and_verify`` in this run's batches (``plan``, a
    ``stack.Plan``, is None with ``start = False``: then nothing starts and verify is skipped)."""
    if plan:
        with phases.step("compose_up"):  # the report times each step on each host
            up_and_verify(name="Start the stack where it changed, verify /v1/models lists the model",
                          cfg=cfg, plan=plan, _parallel=batch(state, cfg))
    else:
        verify.not_run(name="Verify /v1/models lists the model", cfg=cfg)
    why = verify.skipped_because(cfg)
    if why:
        phases.skip("verify", why)
    else:
        phases.expect("verify")  # timed inside up_and_verify


@operation(is_idempotent=False)
def up_and_verify(cfg, plan):
    """
    Bring the stack up where it differs from its files, verify it, keep what verified, and
    put a host that fails after a change back to its last verified state.

    + cfg: the host's settings
    + plan: the stack's files, what changed in them, its commands (``stack.Plan``)
    """
    stale = out_of_date(host.get_fact(ComposeStack, project_dir=plan.project_dir, project=COMPOSE_PROJECT),
                        plan.services)
    changing = bool(stale) or plan.files_changed
    skipped = verify.skipped_because(cfg)
    if not current_state.is_executing:
        if changing:
            yield from plan.up_commands(stale)
        host.noop(f"verify skipped: {skipped}" if skipped else verify.planned_checks(cfg))
        return
    saved = host.get_fact(VerifiedState, directory=saved_dir(cfg), paths=plan.files)
    if changing and stopped():
        # Held back: the files this run wrote go back to what the running containers read.
        outcomes.record(host.name, verify=outcomes.HELD_BACK, rollout=f"held back: {stopped()}")
        host.log_styled(f"held back, containers untouched: {stopped()}", fg="yellow")
        if has_saved(saved):
            yield restore_command(cfg, plan.files)
        return
    up = {"ok": True}
    if changing:
        yield FunctionCommand(_run, (plan.up_commands(stale), up), {})
    if skipped:  # verify_timeout = 0: started, never verified, so never kept as verified
        verify.record_skipped(cfg)
        if not up["ok"]:
            yield FunctionCommand(outcomes.fail_now, (up["why"],), {})
        return
    ok, why = _verify(cfg) if up["ok"] else (False, up["why"])
    if ok:
        if not state_is_saved(saved):
            yield save_command(cfg, plan.files)
        if changing and has_saved(saved):
            outcomes.record(host.name, rollout="upgraded")
        return
    if not (changing and has_saved(saved)):
        # Nothing changed, or nothing to go back to: this host alone fails, the rollout goes on.
        yield FunctionCommand(outcomes.fail_now, (why,), {})
        return
    _stop(f"{host.name} failed after the change and was rolled back")
    back = {"ok": True}
    yield restore_command(cfg, plan.files)
    yield FunctionCommand(_run, (plan.rollback_commands, back), {})
    again, why_again = _verify(cfg) if back["ok"] else (False, back["why"])
    serving = "serving again" if again else f"NOT serving after the rollback either: {why_again}"
    outcomes.record(host.name, rollout=f"rolled back to its last verified state ({serving})")
    yield FunctionCommand(
        outcomes.fail_now,
        (f"failed after the change: {why}. Rolled back to its last verified state, {serving}; "
         "the rollout stopped here", ),
        {},
    )


def batch(run_state, cfg) -> int:
    """This run's hosts per batch (the same on every host: run_settings checks it)."""
    return batch_hosts(cfg.rollout_batch_size, len(ai_hosts(run_state.inventory)))


@operation(is_idempotent=False)
def back_to_last_verified(cfg, services: list[str], rollback_commands: list):
    """
    Put the host's stack back on its last verified state, unless it runs it already; verify it.

    + cfg: the host's settings
    + services: the services that must be running
    + rollback_commands: what recreates the containers on the restored files
    """
    saved = host.get_fact(VerifiedState, directory=saved_dir(cfg), paths=[])
    stale = out_of_date(host.get_fact(ComposeStack, project_dir=cfg.stack_dir, project=COMPOSE_PROJECT), services)
    if not has_saved(saved):
        yield FunctionCommand(outcomes.fail_now, (f"no verified state in {saved_dir(cfg)}: nothing to return to. "
                                                  "Fix: run the deploy (a verified run keeps one)",), {})
        return
    if state_is_saved(saved) and not stale:
        host.noop("already on its last verified state")
        outcomes.record(host.name, rollout="already on its last verified state")
    else:
        outcomes.record(host.name, rollout="returned to its last verified state")
        yield restore_command(cfg, [])
        if current_state.is_executing:
            back = {"ok": True}
            yield FunctionCommand(_run, (rollback_commands, back), {})
            if not back["ok"]:
                yield FunctionCommand(outcomes.fail_now, (back["why"],), {})
                return
        else:
            yield from rollback_commands
    if not current_state.is_executing or verify.skipped_because(cfg):
        return
    ok, why = _verify(cfg)
    if not ok:
        yield FunctionCommand(outcomes.fail_now, (f"on its last verified state, and still: {why}",), {})


@operation(is_idempotent=False)
def forget(cfg):
    """
    Remove the last verified state (uninstall). A link at its name is left alone.

    + cfg: the host's settings
    """
    if not has_saved(host.get_fact(VerifiedState, directory=saved_dir(cfg), paths=[])):
        host.noop(f"no verified state in {saved_dir(cfg)}")
        return
    yield StringCommand("rm", "-rf", "--one-file-system", QuoteString(saved_dir(cfg)))
