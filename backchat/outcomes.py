"""How a step ends for one host: refused, failed, or recorded for the report.

Every step uses these, so a host that cannot be served fails alone (a fleet run carries
on with the others) and the end-of-run report names it with the first cause.
"""

from __future__ import annotations

from pyinfra import host, logger
from pyinfra.api import FunctionCommand, operation

# The report's verify value for a host the rollout stopped before it (backchat/rollout.py).
HELD_BACK = "held back"

_records: dict[str, dict] = {}
_planned_refusals: dict[str, str] = {}


def record(host_name: str, **fields) -> None:
    """Add fields to a host's line of the report; the first failure is the one kept."""
    entry = _records.setdefault(host_name, {})
    if "failure" in fields and entry.get("failure"):
        fields.pop("failure")  # the first cause is the one worth reading
    entry.update(fields)


def records() -> dict[str, dict]:
    return _records


def planned_refusals() -> dict[str, str]:
    """Host name -> why it will be refused, known while planning (before anything runs)."""
    return _planned_refusals


def fail(failed_host, reason: str) -> bool:
    """Fail a host while an operation runs, with a reason the report shows. Returns False."""
    failed_host.log_styled(reason, fg="red", log_func=logger.error)
    record(failed_host.name, failure=reason)
    return False


def fail_now(state, host, reason: str) -> bool:  # a FunctionCommand: pyinfra passes state and host
    """Fail the host running this command, with ``reason`` in the report."""
    return fail(host, reason)


def refuse_host(reason: str) -> None:
    """Say why now (the plan shows it) and fail the current host when the run executes."""
    host.log_styled(f"Will refuse: {reason}", fg="red", log_func=logger.warning)
    _planned_refusals.setdefault(host.name, reason)
    refuse(name="Refuse this host", reason=reason)


def _refuse(state, host, reason: str) -> bool:  # pyinfra passes state and host by these names
    host.log_styled(f"Refused: {reason}", fg="red", log_func=logger.error)
    record(host.name, failure=reason)
    return False


@operation(is_idempotent=False)
def refuse(reason: str):
    """
    Fail this host (and only this host) with ``reason``.

    + reason: what is wrong and how to fix it
    """
    yield FunctionCommand(_refuse, (reason,), {})


def _fail_now(state, host, reason: str) -> bool:  # pyinfra passes state and host by these names
    return fail(host, reason)


def failing_command(reason: str) -> FunctionCommand:
    """For an operation that found a problem while executing: yield this, and the host
    fails with ``reason`` (an operation that yields nothing reports no change)."""
    return FunctionCommand(_fail_now, (reason,), {})
