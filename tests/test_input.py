"""Bad input gets a clear error that repeats no secret; values round-trip."""

from __future__ import annotations

import asyncio
import copy
import multiprocessing
import pickle
import re
from typing import Any

import pytest

from pglistener import Gap, Subscription, Supervisor, Worker


@pytest.mark.parametrize("dsn", ["postgresql://u:SECRET@[::1",
                                 "host=db password=SECRET port"])
def test_a_dsn_that_does_not_parse_is_refused_without_its_password(dsn: str) -> None:
    with pytest.raises(ValueError, match="invalid DSN") as caught:
        Supervisor(dsn)
    assert "SECRET" not in str(caught.value)


@pytest.mark.parametrize("dsn", [None, b"dbname=x", 42])
def test_a_dsn_of_the_wrong_type_names_the_type(dsn: object) -> None:
    with pytest.raises(TypeError, match=type(dsn).__name__):
        Supervisor(dsn)  # type: ignore[arg-type]


@pytest.mark.parametrize("gap", [Gap("restart"), Gap("reconnect"), Gap("overflow", 7)])
def test_every_gap_can_be_built_pickled_and_copied(gap: Gap) -> None:
    assert pickle.loads(pickle.dumps(gap)) == gap
    assert copy.copy(gap) == gap and copy.deepcopy(gap) == gap


def test_an_unknown_gap_reason_is_refused() -> None:
    with pytest.raises(ValueError, match="'reconnect', 'overflow', 'restart' or 'slot'"):
        Gap("lost")


@pytest.mark.parametrize("channel", [None, b"orders", 7, ["orders", b"refunds"], [None]])
def test_a_channel_of_the_wrong_type_names_the_expected_type(worker: Worker,
                                                             channel: object) -> None:
    with pytest.raises(TypeError, match="str"):
        worker.subscribe(channel, timeout=30)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="str"):
        asyncio.run(worker.subscribe_async(channel, timeout=30))  # type: ignore[arg-type]


def _use_in_child(sub: Subscription, out: Any) -> None:
    try:
        sub.get(timeout=1)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        out.put(f"{type(exc).__name__}: {exc}")
    else:
        out.put("no error")


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_subscription_refuses_to_go_to_another_process_with_advice(
        worker: Worker, method: str) -> None:
    """Whatever the start method: spawn and forkserver pickle it, and are refused at once;
    fork copies it, and the child's first use is refused. Each says to pass the Worker."""
    ctx = multiprocessing.get_context(method)
    out = ctx.SimpleQueue()
    with worker.subscribe("stays-here", timeout=30) as sub:
        process = ctx.Process(target=_use_in_child, args=(sub, out))
        if method != "fork":
            with pytest.raises(TypeError, match="pass the Worker to the other process"):
                process.start()
            return
        process.start()
        process.join(30)
        assert re.fullmatch(r"RuntimeError: .*\(pass the Worker, not the Subscription\)",
                            out.get())
