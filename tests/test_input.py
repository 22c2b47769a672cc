"""Bad input gets a clear error that repeats no secret; values round-trip."""

from __future__ import annotations

import copy
import pickle

import pytest

from pglistener import Gap, Supervisor


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
    with pytest.raises(ValueError, match="'reconnect', 'overflow' or 'restart'"):
        Gap("lost")
