"""Step 6: from the controller, every running backend lists the model in /v1/models, and
the GUI the user opens sees it.

What a user would poke by hand, with backoff until ``verify_timeout``, and a failure that
names its likely cause. Runs at execution time as an operation that changes nothing when
the check passes and fails only its own host when it does not.

A backend can serve the model while the GUI cannot: Chatbot UI with a wrong key shows only
"Error fetching models ... 500". So the GUI is asked too, the way its page asks it.

On the lab's gateway host, the same checks go through the gateway, as users reach it (the
model listed through the pool, the key refused at the door, the gateway's GUI), and
HAProxy's own statistics say which AI hosts are in rotation.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from typing import Callable

from pyinfra import host, logger
from pyinfra.api import FunctionCommand, operation
from pyinfra.context import state as current_state

from backchat import gateway, outcomes, tls
from backchat.addresses import api_urls, connect_address, gateway_url, gui_service, gui_url, public_address
from backchat.probes import Answer, ControllerProbe, HostProbe, Unreachable

QUESTION = "Who was the president of the United States in 1997?"
# What legacy Chatbot UI sends before every conversation (utils/app/const.ts at 5248f25b,
# baked into its image): verify asks the way the GUI a user opens does.
GUI_SYSTEM_PROMPT = (
    "You are ChatGPT, a large language model trained by OpenAI. Follow the user's "
    "instructions carefully. Respond using markdown."
)


@dataclass
class Result:
    service: str
    url: str
    ok: bool
    seconds: float
    model_ids: list[str] = field(default_factory=list)
    detail: str = ""


def _diagnose(answer: Answer | None, error: Unreachable | None, model_id: str) -> tuple[bool, str, list[str]]:
    """(model listed?, likely cause, ids seen) for one attempt."""
    if error is not None:
        if error.kind == "refused":
            return False, "connection refused: the service is not up (or not on this port)", []
        if error.kind == "timeout":
            return False, "no answer in time: the service is busy or still starting", []
        return False, f"request failed: {error}", []
    assert answer is not None
    if answer.status == 404:
        return False, "404 Not Found: wrong port or path (is this an OpenAI-compatible API?)", []
    if answer.status in (401, 403):
        return False, f"{answer.status}: the API key was refused or is missing", []
    if answer.status == 503:
        return False, "503: the server is still loading", []
    if answer.status != 200:
        return False, f"HTTP {answer.status}", []
    try:
        ids = [item.get("id") for item in answer.json().get("data", [])]
    except (ValueError, AttributeError):
        return False, "the answer is not an OpenAI model list", []
    if model_id in ids:
        return True, "", ids
    if not ids:
        return False, "the model list is empty: no model loaded (Text Gen WebUI without --model?)", ids
    return False, f"listed {ids}, not {model_id!r}: Chatbot UI will show no model", ids


def wait_for_model(
    service: str,
    base_url: str,
    model_id: str,
    probe,
    timeout: float,
    on_wait: Callable[[str], None] | None = None,
    every: float = 30.0,
) -> Result:
    """Poll ``{base_url}/v1/models`` with backoff until ``model_id`` is listed or time is up.

    ``on_wait`` hears about the wait every ``every`` seconds: a backend loading a 7B model
    on a CPU can take minutes, and silence would look like a hang.
    """

    def attempt() -> tuple[bool, str, list[str]]:
        try:
            answer = probe.request("GET", f"{base_url}/v1/models")
        except Unreachable as error:
            return _diagnose(None, error, model_id)
        return _diagnose(answer, None, model_id)

    return _poll(service, base_url, attempt, timeout, on_wait, every)


def _poll(service: str, url: str, attempt, timeout: float, on_wait, every: float) -> Result:
    """``attempt()`` -> (ok, why not, ids seen), retried with backoff until ok or ``timeout``."""
    start = time.monotonic()
    next_note = start + every
    delay = 1.0
    while True:
        ok, detail, ids = attempt()
        elapsed = time.monotonic() - start
        if ok:
            return Result(service, url, True, round(elapsed, 1), ids)
        if elapsed + delay > timeout:
            return Result(service, url, False, round(elapsed, 1), ids, f"{detail} (gave up after {elapsed:.0f}s)")
        if on_wait and time.monotonic() >= next_note:
            on_wait(f"still waiting for {service} ({elapsed:.0f}s of {timeout:.0f}s): {detail}")
            next_note += every
        time.sleep(delay)
        delay = min(delay * 2, 15.0)


# How each GUI's page learns the models: Chatbot UI's browser code POSTs {key} to its own
# /api/models, which asks the backend server-side with OPENAI_API_KEY and keeps only
# OpenAI model ids (a backend that refuses the key becomes a 500 there). Text Gen WebUI's
# GUI runs in the same process as its API: its page answering is enough.


def _gui_models(answer: Answer | None, error: Unreachable | None, frontend: str, model_id: str):
    """(GUI sees the model?, likely cause, ids the GUI shows) for one attempt."""
    if error is not None:
        return False, f"the GUI did not answer: {error}", []
    assert answer is not None
    if frontend != "chatbot-ui":
        return (True, "", []) if answer.status == 200 else (False, f"the GUI answered HTTP {answer.status}", [])
    if answer.status == 500:
        return False, ("Chatbot UI could not list its backend's models (HTTP 500: the backend refused its "
                       "key, or Chatbot UI cannot reach it; users see \"Error fetching models\")"), []
    if answer.status != 200:
        return False, f"Chatbot UI's /api/models answered HTTP {answer.status}", []
    try:
        ids = [item.get("id") for item in answer.json()]
    except (ValueError, AttributeError, TypeError):
        return False, "Chatbot UI's /api/models did not answer a model list", []
    if model_id in ids:
        return True, "", ids
    return False, f"Chatbot UI offers {ids or 'no model'}, not {model_id!r}", ids


def wait_for_gui(cfg, gui: str, probe, on_wait: Callable[[str], None] | None = None, every: float = 30.0) -> Result:
    """Poll the GUI the way its page does until it shows ``model_id``, or time is up."""

    def attempt() -> tuple[bool, str, list[str]]:
        try:
            if cfg.frontend == "chatbot-ui":
                answer = probe.request("POST", f"{gui}/api/models", with_key=False, body={"key": ""})
            else:
                answer = probe.request("GET", f"{gui}/", with_key=False)
        except Unreachable as error:
            return _gui_models(None, error, cfg.frontend, cfg.model_id)
        return _gui_models(answer, None, cfg.frontend, cfg.model_id)

    return _poll(gui_service(cfg), gui, attempt, cfg.verify_timeout, on_wait, every)


# /v1/models lists a model before (Text Gen WebUI: even when) loading fails; these answer
# 200 only once it is really loaded.
LOADED_CHECKS = {
    "llamacpp": ("GET", "/health", None),
    "localai": ("GET", "/readyz", None),
    "textgen": ("POST", "/v1/internal/token-count", {"text": "hello"}),
}


def model_is_loaded(service: str, base_url: str, probe) -> str | None:
    """None when the backend's model is really loaded, else why not."""
    method, path, body = LOADED_CHECKS[service]
    try:
        answer = probe.request(method, f"{base_url}{path}", body=body, timeout=30.0)
    except Unreachable as error:
        return f"lists the model, but {path} did not answer: {error}"
    if answer.status != 200:
        return f"lists the model, but it is not loaded ({path} answered HTTP {answer.status}; see the container's log)"
    return None


def key_is_enforced(base_url: str, probe) -> str | None:
    """With an API key set, a request without it must be refused. None if it is."""
    body = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    try:
        answer = probe.request("POST", f"{base_url}/v1/chat/completions", with_key=False, body=body, timeout=30.0)
    except Unreachable as error:
        return f"could not check the API key: {error}"
    if answer.status in (401, 403):
        return None
    return f"a request without the API key got HTTP {answer.status}: the key is not enforced"


def ask(base_url: str, model_id: str, probe, timeout: float) -> tuple[str, float]:
    """One chat completion: (first line of the answer, seconds it took)."""
    start = time.monotonic()
    # Temperature 0: the same model gives the same answer every run, so a report can be compared.
    messages = [{"role": "system", "content": GUI_SYSTEM_PROMPT}, {"role": "user", "content": QUESTION}]
    body = {"model": model_id, "messages": messages, "max_tokens": 64, "temperature": 0}
    answer = probe.request("POST", f"{base_url}/v1/chat/completions", body=body, timeout=timeout)
    if answer.status != 200:
        raise ValueError(f"HTTP {answer.status}")
    content = answer.json()["choices"][0]["message"]["content"]
    if not isinstance(content, str):
        raise ValueError("the completion has no text content")
    first_line = content.strip().splitlines()[0] if content.strip() else "(empty answer)"
    return first_line, round(time.monotonic() - start, 1)


def check_all(cfg, address: str, probe, on_wait: Callable[[str], None] | None = None) -> list[Result]:
    results = []
    for service, url in api_urls(cfg, address).items():
        result = wait_for_model(service, url, cfg.model_id, probe, cfg.verify_timeout, on_wait)
        if result.ok:
            problem = model_is_loaded(service, url, probe)
            if problem:
                result.ok, result.detail = False, problem
        if result.ok and cfg.api_key:
            problem = key_is_enforced(url, probe)
            if problem:
                result.ok, result.detail = False, problem
        if result.ok and cfg.verify_chat:
            if on_wait:
                on_wait(f"asking {service}: {QUESTION!r} (a 7B model on CPU takes a while)")
            try:
                answer, seconds = ask(url, cfg.model_id, probe, cfg.chat_timeout)
                result.detail = f"answered in {seconds}s: {answer}"
            except (Unreachable, ValueError, KeyError, IndexError, TypeError) as error:
                result.ok, result.detail = False, f"chat failed: {error.__class__.__name__}: {error}"
        results.append(result)
    if all(result.ok for result in results):  # a GUI over a broken backend says nothing new
        results.append(wait_for_gui(cfg, gui_url(cfg, address), probe, on_wait))
    return results


def probe_for(cfg, checked_host):
    """From the controller, unless the services listen on loopback of a remote host."""
    remote = not checked_host.name.startswith("@") or checked_host.data.get("ssh_hostname")
    if remote and ipaddress.ip_address(cfg.bind_address).is_loopback:
        return HostProbe(checked_host, f"{cfg.stack_dir}/.env"), "127.0.0.1"
    return ControllerProbe(cfg.api_key, tls.trust(cfg)), connect_address(checked_host)


def _report_results(state, host, cfg, results: list[Result]) -> bool:
    for result in results:
        where = "" if result.service == gui_service(cfg) else "/v1/models"
        line = f"{result.service} {result.url}{where}: " + (
            f"lists {cfg.model_id} ({result.seconds}s)" if result.ok else result.detail
        )
        host.log_styled(line, fg="green" if result.ok else "red", log_func=logger.info if result.ok else logger.error)
    return all(result.ok for result in results)


def skipped_because(cfg) -> str | None:
    """Why this host's settings leave verify out, or None when it runs."""
    if not cfg.start:
        return "start = False"
    if cfg.verify_timeout == 0:
        return "verify_timeout = 0"
    return None


# How long the gateway's checks may take to bring in the hosts verified a moment ago
# (a few check intervals; an AI host that failed its own verify is not waited for).
ROTATION_SECONDS = 60.0


def read_rotation(cfg, pool: list[gateway.Member], checked_host) -> list[gateway.Standing]:
    """Which hosts HAProxy sends requests to now: its statistics, read on the gateway host
    (the socket is root's; curl over the SSH connection)."""
    answer = HostProbe(checked_host, "").request(
        "GET", gateway.STATS_URL, with_key=False, unix_socket=gateway.stats_socket(cfg))
    if answer.status != 200:
        raise Unreachable("other", f"HAProxy's statistics answered HTTP {answer.status}")
    return gateway.rotation(answer.text, pool)


def wait_for_rotation(read: Callable[[], list[gateway.Standing]], expected: list[str], timeout: float,
                      on_wait: Callable[[str], None] | None = None) -> tuple[Result, list[gateway.Standing]]:
    """Poll ``read()`` until every ``expected`` host is in rotation (and at least one is)."""
    seen: list[gateway.Standing] = []

    def attempt() -> tuple[bool, str, list[str]]:
        try:
            seen[:] = read()
        except Unreachable as error:
            return False, f"could not read HAProxy's statistics: {error}", []
        missing = [each.host for each in seen if each.host in expected and not each.in_rotation]
        ok = not missing and any(each.in_rotation for each in seen)
        return ok, gateway.summary(seen), []

    result = _poll("rotation", "HAProxy's statistics", attempt, timeout, on_wait, 30.0)
    if result.ok:
        result.detail = gateway.summary(seen)
    return result, seen


def check_gateway(cfg, url: str, probe, read_rotation_now, expected: list[str],
                  on_wait: Callable[[str], None] | None = None) -> tuple[list[Result], list[gateway.Standing]]:
    """The gateway at ``url`` as a user reaches it: the model through the pool, the key
    refused at the door, the GUI over the pool; then which hosts are in rotation."""
    through = wait_for_model("gateway", url, cfg.model_id, probe, cfg.verify_timeout, on_wait)
    if through.ok and cfg.api_key:
        problem = key_is_enforced(url, probe)
        if problem:
            through.ok, through.detail = False, f"{problem} (at the gateway's door)"
    results = [through]
    if through.ok:
        results.append(wait_for_gui(cfg, url, probe, on_wait))
    rotation, standings = wait_for_rotation(read_rotation_now, expected, min(cfg.verify_timeout, ROTATION_SECONDS),
                                            on_wait)
    results.append(rotation)
    return results, standings


@operation(is_idempotent=False)
def through_gateway(cfg, pool):
    """
    Check the lab's gateway as users reach it, and which AI hosts are in its rotation.

    + cfg: the gateway host's settings
    + pool: the AI hosts behind it (gateway.Member)
    """
    entry = {"gateway_url": gateway_url(cfg, public_address(cfg)), "model_id": cfg.model_id}
    previous = outcomes.records().get(host.name, {})
    if not previous.get("gui_url"):  # a gateway alone: its GUI is the one users open
        entry["gui_url"] = entry["gateway_url"]
    if not cfg.start or cfg.verify_timeout == 0:
        outcomes.record(host.name, **entry)
        host.noop("gateway not verified: " + ("start = False" if not cfg.start else "verify_timeout = 0"))
        return
    probe, address = probe_for(cfg, host)
    url = gateway_url(cfg, address)
    if not current_state.is_executing:
        host.noop(f"will check /v1/models and the GUI through the gateway at {url}, and which of "
                  f"{', '.join(member.host for member in pool)} are in rotation")
        return

    started = time.monotonic()
    # The hosts whose own verify passed in this run must be in rotation (the gateway's
    # verify runs after theirs); a host that failed is named, not waited for.
    expected = [member.host for member in pool if outcomes.records().get(member.host, {}).get("verify") == "pass"]
    results, standings = check_gateway(cfg, url, probe, lambda: read_rotation(cfg, pool, host), expected, host.log)
    ok = all(result.ok for result in results)
    details = [f"gateway {r.service}: {r.detail}" for r in results if r.detail and not r.ok]
    outcomes.record(
        host.name,
        verify="fail" if not ok else previous.get("verify", "pass"),
        in_rotation=gateway.summary(standings) if standings else "unknown",
        seconds=previous.get("seconds", round(time.monotonic() - started, 1)),
        detail="; ".join(part for part in (previous.get("detail", ""), *details) if part),
        **entry,
    )
    if ok:
        _report_gateway(None, host, cfg, results)
        host.noop(f"the gateway serves {cfg.model_id} from {sum(each.in_rotation for each in standings)} host(s)")
        return
    yield FunctionCommand(_report_gateway, (cfg, results), {})


def _report_gateway(state, host, cfg, results: list[Result]) -> bool:
    """The checks through the gateway, then its rotation (the last result)."""
    *through, rotation = results
    _report_results(state, host, cfg, through)
    line = f"gateway {rotation.service}: {rotation.detail}"
    host.log_styled(line, fg="green" if rotation.ok else "red", log_func=logger.info if rotation.ok else logger.error)
    return all(result.ok for result in results)


def _entry(cfg) -> dict:
    address = public_address(cfg)
    return {"backends": ",".join(api_urls(cfg, address)), "model_id": cfg.model_id, "gui_url": gui_url(cfg, address)}


def record_skipped(cfg) -> None:
    """The report's line for a host whose settings leave verify out."""
    outcomes.record(
        host.name,
        verify="installed, not started (start = False)" if not cfg.start else "not verified (verify_timeout = 0)",
        **_entry(cfg),
    )


@operation(is_idempotent=False)
def not_run(cfg):
    """
    Say why verify does not run on this host (its settings leave it out), in the report too.

    + cfg: the host's settings
    """
    record_skipped(cfg)
    host.noop(f"verify skipped: {skipped_because(cfg)}")
    return
    yield  # an operation: pyinfra wants a generator


def planned_checks(cfg) -> str:
    """What verify will check on this host (said while planning)."""
    probe, address = probe_for(cfg, host)
    where = " (from the host: the services listen on its loopback)" if isinstance(probe, HostProbe) else ""
    return (f"will check /v1/models on {', '.join(api_urls(cfg, address).values())} "
            f"and the GUI at {gui_url(cfg, address)}{where}")


def check_host(cfg, on_wait: Callable[[str], None] | None = None) -> tuple[bool, list[Result]]:
    """Check this host now, log each result, and record the report's line; True when all pass."""
    probe, address = probe_for(cfg, host)
    started = time.monotonic()
    results = check_all(cfg, address, probe, on_wait=on_wait)
    ok = all(result.ok for result in results)
    outcomes.record(
        host.name,
        verify="pass" if ok else "fail",
        seconds=round(time.monotonic() - started, 1),
        detail="; ".join(f"{r.service}: {r.detail}" for r in results if r.detail),
        **_entry(cfg),
    )
    _report_results(None, host, cfg, results)
    return ok, results
