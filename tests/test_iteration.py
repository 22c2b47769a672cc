"""The subscriptions' iteration runs the compiled __next__ / __anext__ by their type slot,
not CPython's generic slot for a Python subclass (a method lookup and call per item), and a
subclass that defines its own keeps it."""

from __future__ import annotations

from typing import Any

import pytest

from pglistener._core.reader import _iterates_compiled, compiled_iteration
from pglistener.aio import AsyncJsonSubscription, AsyncSubscription
from pglistener.worker import JsonSubscription, Subscription

# Version-sensitive (the type slots; see scripts/test): run on every supported Python.
pytestmark = pytest.mark.every_python


@pytest.mark.parametrize("cls", [Subscription, JsonSubscription, AsyncSubscription,
                                 AsyncJsonSubscription])
def test_the_subscriptions_iterate_by_the_compiled_slot(cls: type) -> None:
    assert _iterates_compiled(cls)


def test_a_subclass_left_undecorated_has_the_generic_slot() -> None:
    """What the decorator is for: without it CPython's slot is the generic one."""
    class Plain(Subscription):
        pass

    assert not _iterates_compiled(Plain)
    assert _iterates_compiled(compiled_iteration(Plain))


def test_a_subclass_with_its_own_next_keeps_it() -> None:
    @compiled_iteration
    class Own(Subscription):
        def __next__(self) -> Any:
            return "own"

    @compiled_iteration
    class Below(Own):
        pass

    assert not _iterates_compiled(Own) and not _iterates_compiled(Below)
    assert next(Own.__new__(Own)) == "own"
    assert next(Below.__new__(Below)) == "own"


def test_compiled_iteration_refuses_what_is_no_stream() -> None:
    with pytest.raises(TypeError, match="neither a BlockingStream nor an AsyncStream"):
        compiled_iteration(dict)
    assert not _iterates_compiled(dict)
