"""transport's fixes of pyinfra behaviour, against pyinfra's own code where they replace it."""

from types import SimpleNamespace

import pyinfra
import pytest
from pyinfra.api import util as pyinfra_util

from backchat import transport

pyinfra_operation = transport.pyinfra_operation  # the module (pyinfra.api exports a decorator of that name)


@pytest.fixture
def replaced(monkeypatch):
    """The replacement of get_operation_order_from_stack (pyinfra's own is put back after)."""
    monkeypatch.setattr(pyinfra_operation, "get_operation_order_from_stack", pyinfra_util.get_operation_order_from_stack)
    transport.order_operations_without_inspect()
    ours = pyinfra_operation.get_operation_order_from_stack
    assert ours is not pyinfra_util.get_operation_order_from_stack
    transport.order_operations_without_inspect()  # a second call changes nothing
    assert pyinfra_operation.get_operation_order_from_stack is ours
    return ours


def deeper(depth, state, ours):
    if depth:
        return deeper(depth - 1, state, ours)
    return pyinfra_util.get_operation_order_from_stack(state), ours(state)  # one line: one f_lineno


@pytest.mark.parametrize("cli", [False, True])
@pytest.mark.parametrize("deploy_file", [__file__, None, "/nowhere/deploy.py"])
def test_operation_order_is_the_one_pyinfra_computes(replaced, monkeypatch, cli, deploy_file):
    monkeypatch.setattr(pyinfra, "is_cli", cli)
    state = SimpleNamespace(current_deploy_filename=deploy_file, current_op_file_number=2)
    theirs, ours = deeper(3, state, replaced)
    assert ours == theirs
    assert len(ours) > 3 or deploy_file == "/nowhere/deploy.py", "the test's own frames are counted"


def test_global_argument_types_are_pyinfras_own(monkeypatch):
    arguments, facts = transport.pyinfra_arguments, transport.pyinfra_facts
    original = arguments.all_global_arguments
    monkeypatch.setattr(arguments, "all_global_arguments", original)
    monkeypatch.setattr(facts, "all_global_arguments", original)
    transport.remember_global_argument_types()
    assert arguments.all_global_arguments is facts.all_global_arguments is not original
    assert arguments.all_global_arguments() == original() and len(original()) > 10
    # Callers get their own list, as from pyinfra's.
    arguments.all_global_arguments().clear()
    assert arguments.all_global_arguments() == original()
