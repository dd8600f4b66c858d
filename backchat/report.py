"""One line per host at the end of every run, and the same as JSON for scripts.

pyinfra prints per-operation results; a user wants to know, per host, whether it works and
where to point the browser. Hosts that failed anywhere are named with why. A deploy adds
how long each step took on each host (backchat.phases), as a second table and under
``phases`` in the JSON.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

from pyinfra.api.state import BaseStateCallback, StateStage

from backchat import phases
from backchat.outcomes import planned_refusals, record, records

_installed: dict = {}
# The deploy's table; status.py and uninstall.py name their own columns and title.
COLUMNS = ("host", "result", "backends", "model_id", "gui_url", "ai_server_url", "seconds")


class _FailureCallbacks(BaseStateCallback):
    @staticmethod
    def operation_host_error(state, host, op_hash, retry_count=0, max_retries=0):
        names = ", ".join(state.get_op_meta(op_hash).names) or "an operation"
        # The command's output is stored only after this callback: read it at report time.
        record(host.name, failure=f"failed at: {names}", failed_op=op_hash)


def _last_error_line(state, host, op_hash) -> str:
    """The command's last stderr line, which usually says what went wrong."""
    try:
        lines = [line for line in state.ops[host][op_hash].operation_meta.stderr_lines if line.strip()]
    except (KeyError, AttributeError, RuntimeError):
        return ""
    return f": {lines[-1].strip()}" if lines else ""


def install(state, report_path: str | None, title: str = "report", columns: tuple = COLUMNS) -> None:
    """Register the end-of-run report once per run (deploy.py runs once per host)."""
    if "state" in _installed:
        return
    _installed.update(state="yes", path=report_path, title=title, columns=columns)
    state.add_callback_handler(_FailureCallbacks())
    state.add_callback_handler(phases.Timer())
    atexit.register(_print_at_exit, state)


def rows(state) -> list[dict]:
    result = []
    failed = {host.name for host in getattr(state, "failed_hosts", set())}
    for host in state.inventory:
        entry = dict(records().get(host.name, {}))
        entry["host"] = host.name
        failed_op = entry.pop("failed_op", None)
        if failed_op and entry.get("failure", "").startswith("failed at:"):
            entry["failure"] += _last_error_line(state, host, failed_op)
        if host.name in failed and not entry.get("failure"):
            entry["failure"] = "could not connect or failed (see pyinfra's error above)"
        bad = "UNHEALTHY" if entry.get("verify") == "unhealthy" else "FAILED"
        entry["result"] = bad if entry.get("failure") or entry.get("verify") == "fail" else (
            "ok" if entry.get("verify") == "pass" else entry.get("verify", "not verified")
        )
        timing = phases.summary(state, host)
        if timing:
            entry["phases"] = timing
        result.append(entry)
    return result


def format_table(entries: list[dict], columns: tuple = COLUMNS) -> str:
    table = [columns] + [[str(entry.get(column, "") or "") for column in columns] for entry in entries]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]
    for entry in entries:
        for key in ("failure", "detail"):
            if entry.get(key):
                lines.append(f"  {entry['host']}: {entry[key]}")
    written = [entry for entry in entries if entry.get("backstage_config") and not entry.get("failure")]
    if written:
        configs = ", ".join(sorted({f"{entry['host']}:{entry['backstage_config']}" for entry in written}))
        lines.append(
            f"  Backstage reads {configs} only when started without --config (yarn start); "
            "a production backend (create-app's Dockerfile) needs --config app-config.local.yaml added last."
        )
    for entry in entries:
        if entry.get("gateway_url") and not entry.get("failure"):
            url = entry["gateway_url"]
            lines.append(f"  The lab's one endpoint (gateway {entry['host']}): {url} (the GUI) and {url}/v1 "
                         "(the OpenAI API, with the key)" + (f"; {entry['in_rotation']}" if entry.get("in_rotation") else ""))
    trusted = sorted({entry["trust"] for entry in entries if entry.get("trust") and not entry.get("failure")})
    if trusted:
        lines.append(
            f"  HTTPS: browsers, and Backstage's backend (NODE_EXTRA_CA_CERTS), must trust {', '.join(trusted)}."
        )
    if any(entry.get("backstage_env") for entry in written):
        lines.append(
            "  Backstage's proxy adds the API key from BACKCHAT_API_KEY: set it in the Backstage backend's "
            "environment (the key: $BACKCHAT_API_KEY, api_key_file, or ~/.config/backchat/api-key here)."
        )
    return "\n".join(lines)


def _print_at_exit(state) -> None:
    if getattr(state, "current_stage", StateStage.Setup) < StateStage.Execute:
        # --dry, or stopped at the question: nothing ran. A plan that refuses a host is
        # still a failure a script must see.
        refused = planned_refusals()
        if refused:
            lines = [f"  {name}: {reason}" for name, reason in refused.items()]
            print(f"\n--> Backchat: {len(refused)} host(s) would be refused:\n" + "\n".join(lines), file=sys.stderr)
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(1)  # atexit cannot change the exit status otherwise
        return
    entries = rows(state)
    title, columns = _installed.get("title", "report"), _installed.get("columns", COLUMNS)
    print(f"\n--> Backchat {title}:\n" + format_table(entries, columns), file=sys.stderr)
    timing = phases.format_table(entries)
    if timing:
        print(f"\n--> Backchat time per step (on the controller, while executing):\n{timing}", file=sys.stderr)
    path = _installed.get("path")
    if path:
        Path(path).write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
        print(f"    (also written to {path})", file=sys.stderr)
