"""Two ways to make the HTTP requests verify needs: from the controller, or from the host.

Services published on the LAN are checked from the controller, as a user's browser would
reach them (``ControllerProbe``, httpx). Services bound to loopback on a remote host can
only be reached from that host, so ``HostProbe`` runs curl there over the SSH connection
pyinfra already has. The key never appears in a command line on either side: curl reads
the header from its stdin, written by the shell's ``printf`` builtin from the 0600 ``.env``.
"""

from __future__ import annotations

import json as jsonlib
import ssl
from dataclasses import dataclass

from pyinfra.api import QuoteString, StringCommand

from backchat import transport
from backchat.secrets import Secret


@dataclass
class Answer:
    status: int
    text: str

    def json(self):
        return jsonlib.loads(self.text)


class Unreachable(Exception):
    """No HTTP answer: ``kind`` is "refused", "timeout" or "other"."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


class ControllerProbe:
    """Requests from the controller (httpx). ``trust``: the CA file for https (True: the
    system's store), as a browser that trusts the lab's CA would check."""

    def __init__(self, api_key: Secret | None, trust: str | bool = True):
        self.api_key = api_key
        self.trust = trust

    def request(self, method: str, url: str, with_key: bool = True, body: dict | None = None, timeout: float = 10.0):
        from backchat.http import httpx  # imported late (about 50 ms): a run that never asks needs none

        headers = {"Authorization": f"Bearer {self.api_key.reveal()}"} if (with_key and self.api_key) else {}
        try:
            verify = ssl.create_default_context(cafile=self.trust) if isinstance(self.trust, str) else self.trust
            response = httpx.request(method, url, headers=headers, json=body, timeout=timeout, verify=verify)
        except httpx.ConnectError as error:
            if "certificate" in str(error).lower():  # CERTIFICATE_VERIFY_FAILED and its kin
                raise Unreachable("other", f"HTTPS certificate not trusted: {error}") from None
            raise Unreachable("refused", str(error)) from None
        except httpx.TimeoutException as error:
            raise Unreachable("timeout", str(error)) from None
        except httpx.HTTPError as error:
            raise Unreachable("other", f"{error.__class__.__name__}: {error}") from None
        return Answer(response.status_code, response.text)


# $1 method, $2 url, $3 seconds, $4 the stack's .env (or ""), $5 a JSON body (or ""),
# $6 a unix socket to ask instead of the URL's host (or "").
_CURL = (
    'key=""; if [ -n "$4" ] && [ -r "$4" ]; then key=$(sed -n "s/^BACKCHAT_API_KEY=//p" "$4"); fi; '
    'if [ -n "$key" ]; then printf "Authorization: Bearer %s\\n" "$key"; fi | '
    'if [ -n "$5" ]; then curl -sS -X "$1" -m "$3" -H @- -H "Content-Type: application/json" --data-binary "$5" '
    '${6:+--unix-socket} ${6:+"$6"} -w "\\n%{http_code}" "$2"; '
    'else curl -sS -X "$1" -m "$3" -H @- ${6:+--unix-socket} ${6:+"$6"} -w "\\n%{http_code}" "$2"; fi'
)


class HostProbe:
    """Requests made by curl on the host, for services bound to its loopback address."""

    def __init__(self, host, env_file: str):
        self.host = host
        self.env_file = env_file

    def request(self, method: str, url: str, with_key: bool = True, body: dict | None = None, timeout: float = 10.0,
                unix_socket: str | None = None):
        command = StringCommand(
            "sh", "-c", QuoteString(_CURL), "probe", method, QuoteString(url), str(int(max(timeout, 1))),
            QuoteString(self.env_file if with_key else ""), QuoteString(jsonlib.dumps(body) if body else ""),
            QuoteString(unix_socket or ""),
        )
        status, output = transport.run_as_operation(self.host, command, _success_exit_codes=list(range(256)))
        lines = output.stdout_lines
        code = lines[-1].strip() if lines else ""
        if not code.isdigit() or code == "000":
            error = " ".join(output.stderr_lines)
            kind = "refused" if "onnect" in error else "timeout" if "timed out" in error.lower() else "other"
            raise Unreachable(kind, error or "curl gave no answer")
        return Answer(int(code), "\n".join(lines[:-1]))
