"""How long each step took on each host, for the report: measured on the controller while
pyinfra executes.

While planning, the deploy names the step each operation belongs to (``with
phases.step("model"): ...`` records the operations queued for the current host inside the
block) and says which steps it leaves out and why (``phases.skip``). While executing,
pyinfra's callbacks time every operation on every host. At the end, ``summary`` adds the
times up per step: what a first apply on a fresh host spends on Docker, the model, the
images, ``compose up`` and verify, and which of them changed nothing or were skipped.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from pyinfra import host
from pyinfra.api.state import BaseStateCallback

# (key in the JSON report, title in the table), in the order a deploy runs them.
PHASES = (
    ("docker", "Docker packages"),
    ("model", "model"),
    ("images", "images"),
    ("compose_up", "compose up"),
    ("verify", "verify"),
)
OTHER = ("other", "other")  # preflight, threads, the stack's files, Backstage's config
CHECKS = {"verify"}  # steps that only look: "checked" when they ran, not "changed" or "no-op"

_planned: dict[str, dict[str, list[str]]] = {}  # host -> phase -> operation hashes
_skipped: dict[str, dict[str, str]] = {}  # host -> phase -> why
_started: dict[tuple[str, str], float] = {}
_seconds: dict[tuple[str, str], float] = {}
_failed: set[tuple[str, str]] = set()
_credited: dict[tuple[str, str], float] = {}  # (host, phase) -> seconds spent inside another step's operation
_debited: dict[tuple[str, str], float] = {}  # (host, op hash) -> those seconds, taken off that operation


@contextmanager
def step(name: str):
    """While planning: the operations the current host queues inside belong to ``name``."""
    before = len(host.op_hash_order)
    try:
        yield
    finally:
        _planned.setdefault(host.name, {}).setdefault(name, []).extend(host.op_hash_order[before:])


def expect(name: str) -> None:
    """While planning: the current host does step ``name`` inside another step's operation
    (its time comes from ``credit``)."""
    _planned.setdefault(host.name, {}).setdefault(name, [])


def skip(name: str, why: str) -> None:
    """While planning: the current host does not do step ``name``, because ``why``."""
    _skipped.setdefault(host.name, {})[name] = why
    _planned.setdefault(host.name, {}).setdefault(name, [])


def credit(host_obj, name: str, seconds: float) -> None:
    """While executing: ``seconds`` of the running operation belong to step ``name`` (the
    rollout verifies inside its ``compose up`` operation)."""
    _credited[(host_obj.name, name)] = _credited.get((host_obj.name, name), 0.0) + seconds
    if host_obj.current_op_hash:
        key = (host_obj.name, host_obj.current_op_hash)
        _debited[key] = _debited.get(key, 0.0) + seconds


class Timer(BaseStateCallback):
    """pyinfra's callbacks: each operation's time on each host (retries included)."""

    @staticmethod
    def operation_host_start(state, host, op_hash):
        _started[(host.name, op_hash)] = time.monotonic()

    @staticmethod
    def operation_host_success(state, host, op_hash, retry_count=0):
        _stop(host.name, op_hash)

    @staticmethod
    def operation_host_error(state, host, op_hash, retry_count=0, max_retries=0):
        _stop(host.name, op_hash)
        _failed.add((host.name, op_hash))


def _stop(host_name: str, op_hash: str) -> None:
    started = _started.pop((host_name, op_hash), None)
    if started is not None:
        _seconds[(host_name, op_hash)] = _seconds.get((host_name, op_hash), 0.0) + time.monotonic() - started


def _changed(state, host_obj, op_hash: str) -> bool:
    try:
        return state.ops[host_obj][op_hash].operation_meta.did_change()
    except (KeyError, AttributeError, RuntimeError, TypeError):
        return False


def summary(state, host_obj) -> dict | None:
    """Per step: seconds, result ("changed", "no-op", "checked" for verify, "skipped",
    "failed", "not run"), operations, and why when skipped. None for a run that planned no steps (status.py)."""
    planned = _planned.get(host_obj.name)
    if planned is None:
        return None
    skipped = _skipped.get(host_obj.name, {})
    result: dict[str, dict] = {}
    in_a_phase: set[str] = set()
    for name, _title in PHASES:
        hashes = list(dict.fromkeys(planned.get(name, [])))
        in_a_phase.update(hashes)
        result[name] = _one(state, host_obj, name, hashes, skipped.get(name), name in planned)
    others = [
        op_hash for (host_name, op_hash) in _seconds if host_name == host_obj.name and op_hash not in in_a_phase
    ]
    result[OTHER[0]] = _one(state, host_obj, OTHER[0], others, None, True)
    result["total"] = {"seconds": round(sum(entry["seconds"] for entry in result.values()), 1)}
    return result


def _one(state, host_obj, name: str, hashes: list[str], why_skipped: str | None, entered: bool) -> dict:
    key = host_obj.name
    ran = [op_hash for op_hash in hashes if (key, op_hash) in _seconds]
    credited = _credited.get((key, name), 0.0)
    seconds = sum(_seconds[(key, op_hash)] - _debited.get((key, op_hash), 0.0) for op_hash in ran) + credited
    entry = {"seconds": round(float(seconds), 1), "operations": len(ran)}
    if why_skipped:
        entry.update(result="skipped", why=why_skipped)
    elif any((key, op_hash) in _failed for op_hash in ran):
        entry["result"] = "failed"
    elif not entered or (hashes and not ran) or (name in CHECKS and not ran and not credited):
        entry["result"] = "not run"  # the host was refused or failed before this step
    elif name in CHECKS and (ran or credited):
        entry["result"] = "checked"
    else:
        changed = sum(1 for op_hash in ran if _changed(state, host_obj, op_hash))
        entry.update(result="changed" if changed else "no-op", changed=changed)
    return entry


def cell(entry: dict | None) -> str:
    """One step of one host in the text table."""
    if not entry:
        return ""
    result = entry.get("result")
    if result in ("skipped", "not run"):
        return result
    text = f"{entry['seconds']:.1f}s"
    if result == "no-op":
        return f"{text} no-op"
    if result == "failed":
        return f"{text} FAILED"
    return text


def format_table(entries: list[dict]) -> str:
    """The steps' times per host (from the report's entries); "" when no entry has them."""
    timed = [entry for entry in entries if entry.get("phases")]
    if not timed:
        return ""
    columns = ["host", *(title for _key, title in PHASES), OTHER[1], "total"]
    keys = [key for key, _title in PHASES] + [OTHER[0], "total"]
    table = [columns] + [
        [entry["host"], *(cell(entry["phases"].get(key)) if key != "total" else
                          f"{entry['phases']['total']['seconds']:.1f}s" for key in keys)]
        for entry in timed
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() for row in table]
    for entry in timed:
        whys: dict[str, list[str]] = {}
        for key, title in PHASES:
            if entry["phases"].get(key, {}).get("result") == "skipped":
                whys.setdefault(entry["phases"][key].get("why", ""), []).append(title)
        for why, titles in whys.items():
            lines.append(f"  {entry['host']}: skipped {', '.join(titles)}: {why}")
    return "\n".join(lines)
