"""The one place that reaches into pyinfra's internals: a command fed on its standard input.

pyinfra's public API runs commands and uploads files, but it has no way to stream bytes
into a command's stdin. backchat needs that twice:

* the controller push of the model (``model_source = "controller"``) appends exactly the
  bytes a host's ``.part`` file lacks, read once, without re-hashing 4 GB per run as
  ``files.put`` does and without rsync on both sides;
* secret files are written through ``umask 077; cat >file``, so the secret is never in a
  command line, a world-readable temp file (``files.put`` under ``_sudo`` uploads to /tmp
  first), or a ``--diff``.

What this touches, and why it is safe to rely on (pyinfra 3.x):
* ``host.connector.client``: the paramiko ``SSHClient`` of the ``@ssh`` connector; a new
  exec channel on its transport shares the authenticated connection.
* ``make_unix_command_for_host`` with the current operation's global arguments: wraps the
  command exactly as pyinfra does for ``_sudo``, ``_su_user``, ``_env``, ``_chdir``, ...
* ``@local`` runs the same wrapped command in a local shell. Other connectors (``@docker``,
  ``@chroot``) are not supported and say so.
* ``host.current_op_global_arguments`` also gives commands an operation runs itself while
  executing (verify's probe through the host) the operation's ``_sudo`` and friends.

If pyinfra changes these, ``tests/e2e/test_model_delivery.py`` and the secret-file canary test fail.
"""

from __future__ import annotations

import inspect
import socket
import subprocess
from typing import Callable, Iterable

from pyinfra.api import StringCommand
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS
from pyinfra.connectors.util import make_unix_command, make_unix_command_for_host

# Feed: given the command's first line of output, the bytes to send to its stdin.
Feed = Callable[[str], Iterable[bytes]]


class TransportError(OSError):
    """The command could not be run or fed; the message says what the host answered."""


def _wrapped(state, host, command: StringCommand) -> str:
    arguments = dict(host.current_op_global_arguments or {})
    allowed = inspect.signature(make_unix_command).parameters
    return make_unix_command_for_host(
        state, host, command, **{key: value for key, value in arguments.items() if key in allowed}
    ).get_raw_value()


def send_small_packets_now(host) -> None:
    """Turn off Nagle's algorithm on the host's SSH socket.

    Each of a run's many short exec-channel round trips otherwise waits for the peer's
    delayed ACK (about 40 ms on Linux): measured on the sandbox hosts, a round trip took
    47 ms with it and 6 ms without. paramiko (and so pyinfra's @ssh connector) leaves the
    socket as it is; OpenSSH sets TCP_NODELAY for interactive sessions. Belongs upstream.
    """
    client = getattr(host.connector, "client", None)
    sock = getattr(client.get_transport(), "sock", None) if client is not None else None
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def run_as_operation(host, command: StringCommand, **kwargs):
    """``host.run_shell_command`` with the current operation's connector arguments
    (``_sudo``, ``_su_user``, ...), which pyinfra applies to yielded commands but not to
    commands an operation runs itself while executing."""
    current = host.current_op_global_arguments or {}
    arguments = {key: value for key, value in current.items() if key in CONNECTOR_ARGUMENT_KEYS}
    return host.run_shell_command(command, **{**arguments, **kwargs})


def run_with_stdin(state, host, command: StringCommand, feed: Feed, reads_first_line: bool = False) -> tuple[str, int]:
    """Run ``command`` on ``host`` (as the current operation would) and stream ``feed`` into it.

    With ``reads_first_line``, the command's first output line is read before anything is
    sent and handed to ``feed`` (the push asks the host how much it already holds). Returns
    (that line, bytes sent); raises ``TransportError`` when the command fails.
    """
    raw = _wrapped(state, host, command)
    connector = type(host.connector).__name__
    client = getattr(host.connector, "client", None)
    if client is not None:
        return _over_ssh(client, raw, feed, reads_first_line)
    if connector == "LocalConnector":
        return _locally(raw, feed, reads_first_line)
    raise TransportError(f"streaming to a host over {connector} is not supported; use @ssh or @local")


def _over_ssh(client, raw: str, feed: Feed, reads_first_line: bool) -> tuple[str, int]:
    channel = client.get_transport().open_session()
    try:
        channel.exec_command(raw)
        first = b""
        while reads_first_line and not first.endswith(b"\n"):
            got = channel.recv(64)
            if not got:
                raise TransportError(f"the host said nothing: {channel.recv_stderr(4096).decode(errors='replace')}")
            first += got
        line = first.decode(errors="replace").split("\n")[0].strip()
        sent = 0
        for chunk in feed(line):
            channel.sendall(chunk)
            sent += len(chunk)
        channel.shutdown_write()
        status = channel.recv_exit_status()
        if status != 0:
            raise TransportError(f"exit {status}: {channel.recv_stderr(4096).decode(errors='replace').strip()}")
        return line, sent
    finally:
        channel.close()


def _locally(raw: str, feed: Feed, reads_first_line: bool) -> tuple[str, int]:
    process = subprocess.Popen(raw, shell=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = process.stdout.readline().decode(errors="replace").strip() if reads_first_line else ""
    sent = 0
    try:
        for chunk in feed(line):
            process.stdin.write(chunk)
            sent += len(chunk)
    finally:
        process.stdin.close()
    status = process.wait()
    if status != 0:
        raise TransportError(f"exit {status}: {process.stderr.read().decode(errors='replace').strip()}")
    return line, sent
