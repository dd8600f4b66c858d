"""The one place that reaches into pyinfra's internals: a command fed on its standard input.

pyinfra's public API runs commands and uploads files, but it has no way to stream bytes
into a command's stdin. backchat needs that twice:

* the controller push of the model (``model_source = "controller"``) appends exactly the
  bytes a host's ``.part`` file lacks, read once, without re-hashing 4 GB per run as
  ``files.put`` does and without rsync on both sides (``stream_file``: through the system's
  OpenSSH client when it can, see below, else over pyinfra's own connection);
* the files the steps write (``own_files``; secret files through ``secrets.secret_file``)
  go through ``umask 077; cat >file.new`` and ``mv``, so a secret is never in a command
  line, a world-readable temp file (``files.put`` under ``_sudo`` uploads to /tmp first),
  or a ``--diff``, and a link planted at a file's name is replaced, never followed.

Fixes of pyinfra's own behaviour live here too, each with its upstream note, applied by
``prepare_run``: ``send_small_packets_now`` (TCP_NODELAY on the SSH socket),
``run_without_asking_when_nothing_changes`` (no "Press enter" for a plan without changes),
``order_operations_without_inspect`` (each operation's order from its frames),
``remember_global_argument_types`` (type hints read once) and
``read_host_data_once_per_call`` (a host's data layers read once per global-argument pop).

What this touches, and why it is safe to rely on (pyinfra 3.x):
* ``host.connector.client``: the paramiko ``SSHClient`` of the ``@ssh`` connector; a new
  exec channel on its transport shares the authenticated connection.
* ``make_unix_command_for_host`` with the current operation's global arguments: wraps the
  command exactly as pyinfra does for ``_sudo``, ``_su_user``, ``_env``, ``_chdir``, ...
* ``@local`` runs the same wrapped command in a local shell. Other connectors (``@docker``,
  ``@chroot``) are not supported and say so.
* ``host.current_op_global_arguments`` also gives commands an operation runs itself while
  executing (verify's probe through the host) the operation's ``_sudo`` and friends.
* ``Host.get_fact``, wrapped once (``read_ahead``): while planning it answers a fact this
  module read ahead for the host (kept on the host object as ``backchat_read_ahead``),
  once, and otherwise calls pyinfra's own method unchanged.
* ``pyinfra_cli.cli._do_confirm`` (looked up by name when ``_main`` asks) and each
  planned operation's ``OperationMeta._maybe_is_change`` (what ``print_meta`` prints).
* ``pyinfra.api.operation.get_operation_order_from_stack``, ``all_global_arguments``
  of ``pyinfra.api.arguments`` and ``pyinfra.api.facts``, and ``pop_global_arguments`` of
  those and ``pyinfra.api.operation`` and ``pyinfra.api.deploy`` (each looked up by name
  when called; ``pop_global_arguments`` reads a host's ``current_deploy_kwargs`` and
  ``data``, and ``HostData`` keeps its layers in ``datas``); ``tests/test_transport.py``
  checks the replacements against pyinfra's own.

If pyinfra changes these, ``tests/e2e/test_model_delivery.py``, the secret-file canary test
and the re-run without ``-y`` in ``tests/e2e/test_realhosts.py`` fail.

Why the model goes through the system's ``ssh`` when there is one: paramiko does the
crypto and the channel bookkeeping in Python, and a 4 GB push over it ran at a quarter of
what ``curl`` moves over the same link (bench/README.md). OpenSSH does the same work in C.
It gets no more trust than pyinfra's connection has: it must present the very host key
paramiko accepted for this host (pinned in a throw-away known_hosts, ``StrictHostKeyChecking
yes``), it never prompts (``BatchMode``), and its argv holds no command: the command, which
may carry a sudo password, goes on the first line of its standard input, ahead of the
bytes. If it cannot connect (no client, a passphrase or password needed, another host
key), the push goes over paramiko as before. ``BACKCHAT_SSH`` names another client, or
``none`` to always use paramiko.
"""

from __future__ import annotations

import importlib
import inspect
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from copy import copy
from typing import Callable, Iterable

import pyinfra
from pyinfra import logger
from pyinfra.api import StringCommand
from pyinfra.api import util as pyinfra_util

# The modules, not what pyinfra.api exports under the same names.
pyinfra_operation = importlib.import_module("pyinfra.api.operation")
pyinfra_arguments = importlib.import_module("pyinfra.api.arguments")
pyinfra_facts = importlib.import_module("pyinfra.api.facts")
pyinfra_deploy = importlib.import_module("pyinfra.api.deploy")
pyinfra_host = importlib.import_module("pyinfra.api.host")
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS
from pyinfra.connectors.util import make_unix_command, make_unix_command_for_host

from backchat.facts import Together

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


def prepare_run(state, host) -> None:
    """What every entry point (deploy, status, uninstall) does first for each host: the
    fixes of pyinfra's own behaviour below, each applied once per run."""
    send_small_packets_now(host)
    run_without_asking_when_nothing_changes(state)
    order_operations_without_inspect()
    remember_global_argument_types()
    read_host_data_once_per_call()
    run_hosts_in_inventory_order(state)


class _InInventoryOrder(set):
    """A set of hosts that iterates in the inventory's order (``order``: host -> position)."""

    def __init__(self, hosts, order: dict):
        super().__init__(hosts)
        self.order = order

    def __iter__(self):
        return iter(sorted(set.__iter__(self), key=lambda each: self.order.get(each, len(self.order))))


def run_hosts_in_inventory_order(state) -> None:
    """Make an operation's batches (``_parallel``, the rollout's) follow the inventory's order.

    pyinfra (3.x, ``api/operations.py``, ``_run_single_op``) cuts its batches from
    ``inventory.get_active_hosts()``, a list of ``state.active_hosts``, which is a plain
    set: the order of the batches is then the set's, not the inventory's, and a rollout in
    batches of one would upgrade the hosts in no order a user can predict. pyinfra only
    adds to it and removes from it in place (``activate_host``, ``fail_hosts``), so the set
    keeps this type. Belongs upstream.
    """
    if not isinstance(state.active_hosts, _InInventoryOrder):
        order = {each: position for position, each in enumerate(state.inventory)}
        state.active_hosts = _InInventoryOrder(state.active_hosts, order)


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


def run_without_asking_when_nothing_changes(state) -> None:
    """Let a run whose plan changes nothing go on to execute without asking.

    pyinfra's CLI (3.x, ``pyinfra_cli/cli.py``, ``_main``) prints the plan and then, unless
    ``-y``, always asks "Press enter to execute..." (``_do_confirm``), even when no
    operation on any host will change anything. A re-run of an unchanged lab is exactly
    that, and what it is for happens while executing: verify asks every backend, and the
    report follows. Unanswered (no terminal: stdin closed), the question ends the run in
    click's "Aborted!" (exit 1) before any of it; answered with anything but Enter, it
    ends quietly. With nothing to change there is nothing to confirm, so the question is
    skipped then; a plan with any change (or a conditional one) still asks. Belongs
    upstream: skip the confirmation when the plan that ``print_meta`` shows is empty.
    """
    cli = sys.modules.get("pyinfra_cli.cli")  # absent when pyinfra runs as an API
    confirm = getattr(cli, "_do_confirm", None)
    if confirm is None or getattr(confirm, "nothing_changes_runs", False):
        return

    def confirm_unless_nothing_changes(message: str) -> bool:
        if message.startswith("Detected changes") and not _plan_changes_anything(state):
            logger.info("--> Nothing to change: executing without asking (verify runs, the report follows)")
            return True
        return confirm(message)

    confirm_unless_nothing_changes.nothing_changes_runs = True
    cli._do_confirm = confirm_unless_nothing_changes


def order_operations_without_inspect() -> None:
    """Number each operation from its call stack without ``inspect.stack()``.

    pyinfra (3.x, ``pyinfra/api/util.py``, ``get_operation_order_from_stack``) orders an
    operation by the line numbers of the stack that queued it, read with
    ``inspect.stack()``, which builds a ``FrameInfo`` with source context (a module
    lookup and a source line read) for every frame, twice, for every operation of every
    host: the largest share of pyinfra's own CPU in a no-op run of this deploy. The same
    numbers come straight from the frames (``f_code.co_filename``, ``f_lineno``).
    Belongs upstream.
    """
    if getattr(pyinfra_operation.get_operation_order_from_stack, "without_inspect", False):
        return

    def get_operation_order_from_stack(state):
        frames = []
        frame = sys._getframe(1)  # pyinfra's caller of this function, as inspect.stack()[1:]
        while frame is not None:
            frames.append(frame)
            frame = frame.f_back
        frames.reverse()
        first = 0
        # From the *first* frame of the deploy file on, as pyinfra does.
        if state.current_deploy_filename:
            for first, frame in enumerate(frames):
                if frame.f_code.co_filename == state.current_deploy_filename:
                    break
            else:  # pyinfra is left with its own frame then, which it leaves out
                first = len(frames)
        numbers = [state.current_op_file_number] if pyinfra.is_cli else []
        return numbers + [
            frame.f_lineno for frame in frames[first:]
            if not frame.f_code.co_filename.startswith(pyinfra_util.PYINFRA_INSTALL_DIR)
        ]

    get_operation_order_from_stack.without_inspect = True
    pyinfra_operation.get_operation_order_from_stack = get_operation_order_from_stack


def remember_global_argument_types() -> None:
    """Read the type hints of pyinfra's global arguments once, not for every call.

    pyinfra (3.x, ``pyinfra/api/arguments.py``, ``all_global_arguments``) evaluates
    ``typing.get_type_hints(AllArguments)`` (32 string annotations, each ``eval``ed)
    each time an operation or a fact pops its global arguments: after the stack inspection
    above, the largest share of pyinfra's own CPU per operation. The hints are fixed when
    pyinfra is imported. Belongs upstream (a cache on ``all_global_arguments``).
    """
    original = pyinfra_arguments.all_global_arguments
    if getattr(original, "remembered", False):
        return
    hints = original()

    def all_global_arguments():
        return list(hints)

    all_global_arguments.remembered = True
    for module in (pyinfra_arguments, pyinfra_facts):  # both look it up by name
        module.all_global_arguments = all_global_arguments


def read_host_data_once_per_call() -> None:
    """Read a host's data layers once each time pyinfra pops the global arguments.

    pyinfra (3.x, ``pyinfra/api/arguments.py``, ``pop_global_arguments``), for every
    operation, every fact read and every ``@deploy`` call, looks each of the 32 global
    arguments up in the host's data (``getattr(host.data, key)``), and ``HostData``
    (``pyinfra/api/host.py``) evaluates every data layer for every lookup: the override,
    host, groups (merged anew each time), inventory and ``@deploy`` defaults, about 160
    calls per pop. After the two fixes above, the largest share of pyinfra's CPU per host.
    Here pyinfra's own function runs unchanged (defaults, handlers, type checks), with a
    view of the host whose ``data`` evaluates the same layers once, in the same order, and
    answers each key as ``HostData`` does (a shallow copy of the first layer holding it).
    Belongs upstream (evaluate the layers once per ``pop_global_arguments``).
    """
    original = pyinfra_arguments.pop_global_arguments
    if getattr(original, "reads_host_data_once", False):
        return

    def pop_global_arguments(state, host, kwargs, *args, **options):
        return original(state, _HostDataReadOnce(host), kwargs, *args, **options)

    pop_global_arguments.reads_host_data_once = True
    for module in (pyinfra_arguments, pyinfra_operation, pyinfra_facts, pyinfra_deploy):  # each looks it up by name
        module.pop_global_arguments = pop_global_arguments


class _HostDataReadOnce:
    """A host as ``pop_global_arguments`` reads it: its ``data`` layers evaluated once."""

    __slots__ = ("_host", "data")

    def __init__(self, host):
        self._host = host
        layers = getattr(host.data, "__dict__", {}).get("datas")
        self.data = host.data if layers is None else _DataLayers(layers)

    def __getattr__(self, name):
        return getattr(self._host, name)


class _DataLayers:
    __slots__ = ("_layers",)

    def __init__(self, layers):
        self._layers = list(pyinfra_host.extract_callable_datas(layers))

    def __getattr__(self, key):
        for layer in self._layers:  # as HostData.__getattr__
            try:
                return copy(layer[key])
            except KeyError:
                pass
        raise AttributeError(key)


def _plan_changes_anything(state) -> bool:
    for each in state.inventory.iter_activated_hosts():
        for op_hash in state.ops.get(each, {}):
            # None: not checked while planning (-y); only False is a known "no change".
            if state.get_op_data_for_host(each, op_hash).operation_meta._maybe_is_change is not False:
                return True
    return False


# --- facts read at once ------------------------------------------------------------
# A host's facts, read in one command (``facts.Together``) instead of one SSH session each.


def _fact_key(cls, kwargs: dict) -> tuple:
    return cls, repr(sorted(kwargs.items()))


def read_together(host, wanted: list[tuple[type, dict]]) -> list:
    """The values of ``wanted`` (fact class, keyword arguments) on ``host``, as
    ``host.get_fact`` gives each, in one command; a part that could not be read that way
    is read alone, so that pyinfra handles it (and says why) as usual."""
    return [value if read else host.get_fact(cls, **kwargs) for (read, value), (cls, kwargs) in _read_in_one(host, wanted)]


def _read_in_one(host, wanted: list[tuple[type, dict]]):
    """((read, value), (fact class, keyword arguments)) for each of ``wanted``, one command."""
    return zip(Together.values(wanted, host.get_fact(Together, facts=wanted)), wanted)


def read_ahead(host, wanted: list[tuple[type, dict]]) -> None:
    """Read ``wanted`` now in one command; while planning, the step that then asks for one
    of them (``host.get_fact``, same class and arguments) gets this answer, once.

    Planning changes nothing on a host, so a fact read at its start is what it would read
    later in the same plan. While executing every fact is read afresh. pyinfra (3.x,
    ``Host.get_fact``) has no fact cache of its own to fill; the method is wrapped here,
    once, and answers from ``host``'s read-ahead only while ``state.is_executing`` is false.
    """
    if not wanted:
        return
    _answer_facts_read_ahead()
    host.backchat_read_ahead = {_fact_key(cls, kwargs): value for (read, value), (cls, kwargs) in _read_in_one(host, wanted) if read}


def _answer_facts_read_ahead() -> None:
    original = pyinfra_host.Host.get_fact
    if getattr(original, "answers_read_ahead", False):
        return

    def get_fact(self, name_or_cls, *args, **kwargs):
        ahead = self.__dict__.get("backchat_read_ahead")
        if ahead and not args and not self.state.is_executing:
            key = _fact_key(name_or_cls, kwargs)
            if key in ahead:
                return ahead.pop(key)
        return original(self, name_or_cls, *args, **kwargs)

    get_fact.answers_read_ahead = True
    pyinfra_host.Host.get_fact = get_fact


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


# --- a file streamed into a command, through the system's OpenSSH client -----------------

SSH_CLIENT_ENV = "BACKCHAT_SSH"  # another client's path, or "none": paramiko only
STREAM_CHUNK = 1024 * 1024
_PINNED = "backchat-pinned-host"  # HostKeyAlias: the known_hosts entry holds only this host's key
_READY = "backchat-stream-ready"
# The remote side: say it runs, then read the real command from the first line of stdin and
# run it with the rest of stdin. The client's argv (any local user can read it with ps) is
# always this, whatever the command holds. `read` takes one byte at a time from a pipe,
# so the command's stdin starts exactly at the first byte after that line.
_REMOTE = f"exec sh -c 'echo {_READY}; IFS= read -r command && eval \"$command\"'"
# Preferred ciphers: AES-GCM is the fastest with AES instructions (every amd64 and arm64
# server CPU of the last decade); the rest of OpenSSH's defaults follow.
_CIPHERS = ",".join((
    "aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
    "aes128-ctr", "aes192-ctr", "aes256-ctr",
))
# Key exchange: the elliptic-curve ones paramiko offers too. OpenSSH 9's first choice, the
# post-quantum sntrup761x25519 hybrid, took 0.45 s of CPU more per connection on the
# sandbox hosts (about a fifth of a 300 MB push there), and protects nothing pyinfra's own
# connection to the same host does not already expose.
_KEX = ",".join((
    "curve25519-sha256", "curve25519-sha256@libssh.org", "ecdh-sha2-nistp256", "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521", "diffie-hellman-group-exchange-sha256", "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512", "diffie-hellman-group14-sha256",
))


def stream_file(
    state, host, command: StringCommand, path: str, start: Callable[[str], int], size: int,
    connection: "OpenSSHStream | None" = None,
) -> tuple[str, int, str]:
    """Run ``command`` on ``host`` (as the current operation would) and stream ``path`` into it.

    The command's first output line is read before anything is sent and ``start(line)``
    says where in the file to begin; bytes up to ``size`` follow. ``connection``: one made
    earlier by ``open_stream`` (used up here). Returns (that line, bytes sent, the way they
    went: "OpenSSH" or "paramiko"); raises ``TransportError`` when the command fails.
    """
    raw = _wrapped(state, host, command)
    connection = connection or open_stream(host)
    if connection is not None:
        try:
            done = connection.run(raw, path, start, size)
        finally:
            connection.close()
        if done is not None:
            return (*done, "OpenSSH")

    def tail(first_line: str):
        with open(path, "rb") as src:
            offset = start(first_line)
            src.seek(offset)
            remaining = size - offset
            while remaining > 0:
                chunk = src.read(min(STREAM_CHUNK, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
                yield chunk

    return (*run_with_stdin(state, host, command, tail, reads_first_line=True), "paramiko")


def open_stream(host) -> "OpenSSHStream | None":
    """Start an OpenSSH connection to ``host`` for a ``stream_file`` to come: it is made in
    the background (the host can check what it holds meanwhile). None when there is no way
    (then ``stream_file`` goes over paramiko). Close what is not used."""
    client = getattr(host.connector, "client", None)
    if client is None:
        return None
    scratch = tempfile.TemporaryDirectory(prefix="backchat-ssh-")
    argv = openssh_argv(host, client, os.path.join(scratch.name, "known_hosts"))
    if argv is None:
        scratch.cleanup()
        return None
    return OpenSSHStream(host, argv, scratch)


def ssh_client() -> str | None:
    """The OpenSSH client to stream through, or None (not installed, or ``BACKCHAT_SSH=none``)."""
    chosen = os.environ.get(SSH_CLIENT_ENV, "").strip()
    if chosen.lower() in ("none", "off", "no", "0", "paramiko"):
        return None
    return shutil.which(chosen or "ssh")


def _known_hosts_line(client) -> str | None:
    key = client.get_transport().get_remote_server_key()
    if "-cert-" in key.get_name():  # a certificate needs @cert-authority: not worth it here
        return None
    return f"{_PINNED} {key.get_name()} {key.get_base64()}\n"


def openssh_argv(host, client, known_hosts_file: str) -> list[str] | None:
    """The ``ssh`` command line that reaches the host pyinfra's connection reaches, with
    the same user, port, key and ssh_config, trusting only the host key that connection
    accepted (written to ``known_hosts_file`` here). None when it cannot: no client, a
    password or a key passphrase needed, a host certificate."""
    program = ssh_client()
    data = host.connector.data
    if program is None or data.get("ssh_password") or data.get("ssh_key_password"):
        return None
    transport = client.get_transport()
    pinned = _known_hosts_line(client) if transport is not None and transport.is_active() else None
    if pinned is None:
        return None
    with open(known_hosts_file, "w") as out:
        out.write(pinned)
    timeout = getattr(getattr(getattr(host, "state", None), "config", None), "CONNECT_TIMEOUT", None) or 10
    argv = [
        program, "-T", "-x", "-a", "-e", "none",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"HostKeyAlias={_PINNED}",
        "-o", f"UserKnownHostsFile={known_hosts_file}",
        "-o", f"HostKeyAlgorithms={transport.host_key_type}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "UpdateHostKeys=no",
        "-o", "CheckHostIP=no",
        "-o", "ControlMaster=no",
        "-o", "ControlPath=none",
        "-o", "ClearAllForwardings=yes",
        "-o", "PermitLocalCommand=no",
        "-o", "RemoteCommand=none",
        "-o", "Compression=no",
        "-o", f"Ciphers={_CIPHERS}",
        "-o", f"KexAlgorithms={_KEX}",
        "-o", "PasswordAuthentication=no",
        "-o", "KbdInteractiveAuthentication=no",
        "-o", "LogLevel=ERROR",
        "-o", "ServerAliveInterval=30",
        "-o", "ServerAliveCountMax=4",
        "-o", f"ConnectTimeout={timeout}",
        "-l", transport.get_username(),
    ]
    if data.get("ssh_config_file"):
        argv += ["-F", os.path.expanduser(data["ssh_config_file"])]
    if data.get("ssh_port"):
        argv += ["-p", str(int(data["ssh_port"]))]
    if data.get("ssh_key"):
        argv += ["-i", os.path.expanduser(data["ssh_key"]), "-o", "IdentitiesOnly=yes"]
    elif data.get("ssh_allow_agent") is False:
        argv += ["-o", "IdentityAgent=none"]
    return argv + ["--", data.get("ssh_hostname") or host.name, _REMOTE]


class OpenSSHStream:
    """One ``ssh`` process, connecting from the start; ``run`` sends it a command and a file."""

    def __init__(self, host, argv: list[str], scratch: tempfile.TemporaryDirectory):
        self.host, self.scratch, self.process = host, scratch, None
        self.errors = open(os.path.join(scratch.name, "stderr"), "w+b")
        read_end, self.write_end = os.pipe()
        _widen_pipe(self.write_end)
        try:
            self.process = subprocess.Popen(argv, stdin=read_end, stdout=subprocess.PIPE, stderr=self.errors)
        except OSError as error:
            self.failed_to_start = str(error)
        finally:
            os.close(read_end)

    def said(self) -> str:
        """ssh's (or the command's) last line on stderr."""
        self.errors.seek(0)
        lines = [line for line in self.errors.read().decode(errors="replace").splitlines() if line.strip()]
        return lines[-1].strip() if lines else "no error output"

    def _end_input(self) -> None:
        if self.write_end >= 0:
            os.close(self.write_end)
            self.write_end = -1

    def run(self, raw: str, path: str, start, size: int) -> tuple[str, int] | None:
        """(first line, bytes sent), or None when ssh could not connect (then paramiko goes)."""
        if self.process is None:
            self.host.log_styled(
                f"the system ssh client did not start ({self.failed_to_start}); pushing over paramiko", fg="yellow"
            )
            return None
        if "\n" in raw:  # the command must fit on the first line of stdin
            return None
        try:
            os.write(self.write_end, raw.encode() + b"\n")  # far below a pipe's capacity: never blocks
        except BrokenPipeError:
            pass  # ssh has already ended: what it said is read below
        if self.process.stdout.readline().strip() != _READY.encode():
            self._end_input()
            status = self.process.wait()
            self.host.log_styled(
                f"the system ssh client could not connect (exit {status}: {self.said()}); pushing over paramiko",
                fg="yellow",
            )
            return None
        line = self.process.stdout.readline().decode(errors="replace").strip()
        if not line:
            self._end_input()
            raise TransportError(f"the host said nothing (exit {self.process.wait()}): {self.said()}")
        offset = start(line)
        sent = 0
        try:
            sent = _send_range(path, offset, size - offset, self.write_end)
        except BrokenPipeError:
            pass  # the command ended early: its exit status says why
        self._end_input()
        self.process.stdout.read()
        status = self.process.wait()
        if status != 0:
            raise TransportError(f"exit {status}: {self.said()}")
        return line, sent

    def close(self) -> None:
        """Stop ssh if it still runs (unused, or interrupted) and remove its scratch files."""
        self._end_input()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.errors.close()
        self.scratch.cleanup()


def _widen_pipe(fd: int) -> None:
    """Fewer, larger hand-overs between us and ssh (Linux: F_SETPIPE_SZ)."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), STREAM_CHUNK)
    except (ImportError, OSError):
        pass


def _send_range(path: str, offset: int, count: int, fd: int) -> int:
    """Copy path[offset:offset + count] into the pipe ``fd``, in the kernel (splice) where it
    can. Non-blocking, waiting through gevent: other hosts' greenlets go on meanwhile."""
    from gevent.socket import wait_write

    os.set_blocking(fd, False)
    splice = getattr(os, "splice", None)
    sent = 0
    with open(path, "rb") as src:
        while sent < count:
            want = min(STREAM_CHUNK, count - sent)
            try:
                if splice is not None:
                    moved = splice(src.fileno(), fd, want, offset_src=offset + sent, flags=os.SPLICE_F_NONBLOCK)
                else:
                    data = os.pread(src.fileno(), want, offset + sent)
                    moved = os.write(fd, data) if data else 0
            except BlockingIOError:
                wait_write(fd)
                continue
            if moved == 0:
                raise TransportError(f"{path} ended at {offset + sent:,} bytes, before {offset + count:,}")
            sent += moved
    return sent
