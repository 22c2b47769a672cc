"""The WAL source's compiled core without a server: WAL records in the ring, positions that
skip what a replay sends again, and what the slot may be confirmed to while readers hold
messages."""

from __future__ import annotations

import pytest
from fix_rings import Rings

from pglistener import Gap, Notification, format_lsn, parse_lsn
from pglistener._core.reader import MIN_CAPACITY

# Version-sensitive (see scripts/test): run on every supported Python.
pytestmark = pytest.mark.every_python


@pytest.fixture
def rings() -> Rings:
    r = Rings(2)
    yield r
    r.close()


def payloads(items: list[object]) -> list[str]:
    return [f"GAP:{i.reason}" if isinstance(i, Gap) else i.payload for i in items]


def test_a_wal_record_carries_its_positions_and_exact_bytes(rings: Rings) -> None:
    rings.d.set_route(b"c", [1])
    content = bytes(range(256)) * 40        # every byte value, past NOTIFY's 8000 bytes
    assert rings.d.dispatch_wal(b"c", content, 0x1_0000_0010, 0x1_0000_0100)
    assert rings.d.dispatch_wal(b"c", b"x", 0x1_0000_0200, 0x1_0000_01FF, transactional=False)
    first, second = rings.take(1)
    assert isinstance(first, Notification)
    assert first.data == content and first.pid == 0
    assert (first.lsn, first.commit_lsn) == (0x1_0000_0010, 0x1_0000_0100)
    assert first.position == (0x1_0000_0100, 0x1_0000_0010)
    assert format_lsn(first.lsn) == "1/10" and parse_lsn("1/10") == first.lsn
    assert second.position == (0x1_0000_01FF, 0x1_0000_0200)
    assert repr(first).startswith("Notification(channel='c'") and "lsn=1/10" in repr(first)


def test_a_replay_writes_nothing_twice(rings: Rings) -> None:
    """After a reconnect the slot sends again what was not confirmed: each ring skips what
    it had, and a ring added meanwhile starts where the stream stood."""
    rings.d.set_route(b"c", [1])
    stream = [(b"a", 10, 30), (b"b", 20, 30), (b"c", 30, 30), (b"d", 40, 50)]
    for payload, lsn, commit in stream[:3]:
        rings.d.dispatch_wal(b"c", payload, lsn, commit)
    rings.add(3)
    rings.d.set_route(b"c", [1, 3])
    rings.d.stream_reset()
    for payload, lsn, commit in stream:       # the replay, from the slot
        rings.d.dispatch_wal(b"c", payload, lsn, commit)
    assert payloads(rings.take(1)) == ["a", "b", "c", "d"]
    assert payloads(rings.take(3)) == ["d"]


def test_overlapping_transactions_are_ordered_by_commit_not_by_lsn(rings: Rings) -> None:
    """A transaction that wrote earlier and committed later comes later with lower LSNs:
    positions compare (commit, lsn), so nothing of it is taken for a repeat."""
    rings.d.set_route(b"c", [1])
    rings.d.dispatch_wal(b"c", b"b1", 50, 60)       # committed first, written second
    rings.d.dispatch_wal(b"c", b"a1", 10, 90)       # written first, committed second
    rings.d.dispatch_wal(b"c", b"a2", 70, 90)
    assert payloads(rings.take(1)) == ["b1", "a1", "a2"]


def test_a_group_gets_each_message_once_across_a_replay() -> None:
    r = Rings(2)
    try:
        r.d.set_route(b"c", [[1, 2]])
        for i in range(10):
            r.d.dispatch_wal(b"c", str(i).encode(), 10 + i, 100)
        r.d.stream_reset()
        for i in range(12):
            r.d.dispatch_wal(b"c", str(i).encode(), 10 + i, 100)
        got = payloads(r.take(1)) + payloads(r.take(2))
        assert sorted(got, key=int) == [str(i) for i in range(12)]
    finally:
        r.close()


def test_the_slot_is_not_confirmed_past_what_a_reader_holds(rings: Rings) -> None:
    rings.d.set_route(b"c", [1, 2])
    rings.d.dispatch_wal(b"c", b"t1", 100, 110)
    rings.d.dispatch_wal(b"c", b"t2", 200, 210)
    # Nothing consumed: the oldest transaction bounds the slot.
    assert rings.d.confirmable() == 110
    assert payloads(rings.take(1)) == ["t1", "t2"]
    assert rings.d.confirmable() == 110             # ring 2 has not read t1
    r2 = rings.readers[2]
    assert payloads(r2.get_many(1)) == ["t1"]
    r2.mark_consumed()                              # asked for more: t1 is done with
    assert rings.d.confirmable() == 210
    assert payloads(r2.get_many(1)) == ["t2"]
    assert rings.d.confirmable() == 210             # taken, not consumed yet
    r2.mark_consumed()
    assert rings.d.confirmable() == 211             # past t2's commit: all is done with


def test_a_closed_reader_holds_nothing(rings: Rings) -> None:
    rings.d.set_route(b"c", [1, 2])
    rings.d.dispatch_wal(b"c", b"t1", 100, 110)
    rings.take(1)
    assert rings.d.confirmable() == 110
    rings.readers.pop(2).close()
    rings.d.set_route(b"c", [1])
    rings.d.remove_ring(2)
    assert rings.d.confirmable() == 111


def test_after_an_lsn_skips_up_to_that_message(rings: Rings) -> None:
    rings.d.set_route(b"c", [1])
    rings.d.set_position(1, 0, 0, 20)
    for i, lsn in enumerate((10, 20, 5, 30)):   # 5: a later transaction's earlier write
        rings.d.dispatch_wal(b"c", str(i).encode(), lsn, 40 if i < 2 else 50)
    assert payloads(rings.take(1)) == ["2", "3"]


def test_a_full_ring_misses_with_a_gap_and_holds_nothing_for_it() -> None:
    r = Rings(1)
    try:
        r.d.set_route(b"c", [1])
        big = b"x" * 6000
        sent = 0
        while r.d.dispatch_wal(b"c", big, 100 + sent, 100 + sent) and sent < 10:
            sent += 1
        items = r.take(1)
        assert sum(isinstance(i, Notification) for i in items) == 2
        assert isinstance(items[-1], Notification)
        r.d.dispatch_wal(b"c", b"after", 1000, 1000)
        assert payloads(r.take(1)) == ["GAP:overflow", "after"]
    finally:
        r.close()


def test_a_message_larger_than_a_blocking_ring_is_missed_not_waited_for() -> None:
    """A WAL hold has no block_timeout, so a record that can never fit must not hold the
    stream: it is missed, counted, and said with an overflow Gap."""
    r = Rings(1, block=True)
    try:
        r.d.set_route(b"c", [1])
        assert r.d.dispatch_wal(b"c", b"x" * (MIN_CAPACITY + 1), 100, 100)
        assert r.d.dispatch_wal(b"c", b"after", 200, 200)
        items = r.take(1)
        assert isinstance(items[0], Gap) and (items[0].reason, items[0].missed) == ("overflow", 1)
        assert payloads(items[1:]) == ["after"]
    finally:
        r.close()


def test_the_switch_point_of_a_timeline_history() -> None:
    """Where the history of a promoted server left the timeline a slot was read on: the
    first switch at or after it (TIMELINE_HISTORY's file: parent timeline, LSN, why)."""
    from pglistener._supervisor.wal.setup import switch_point

    history = ("1\t0/3000000\tno recovery target specified\n"
               "\n"
               "2\t0/50000A8\tno recovery target specified\n")
    assert switch_point(history, 1) == parse_lsn("0/3000000")
    assert switch_point(history, 2) == parse_lsn("0/50000A8")
    assert switch_point(history, 3) is None         # not in this history: a loss
    assert switch_point("", 1) is None


def test_a_kept_route_goes_on_watching_its_channel(rings: Rings) -> None:
    """What the server asks whether a resume missed anything: the newest position seen on a
    channel, its readers gone or not; and after a slot is lost, no position is kept."""
    rings.d.set_route(b"w", [1])
    assert rings.d.route_position(b"w") == (0, 0)
    assert rings.d.dispatch_wal(b"w", b"a", lsn=110, commit=200)
    assert rings.d.dispatch_wal(b"w", b"b", lsn=100, commit=300)   # later, lower LSN
    assert rings.d.route_position(b"w") == (300, 100)
    rings.d.set_route(b"w", [], keep=True)          # nobody reads it: still watched
    assert rings.d.dispatch_wal(b"w", b"c", lsn=400, commit=400)
    assert rings.d.route_position(b"w") == (400, 400) and rings.d.unrouted == 1
    assert payloads(rings.take(1)) == ["a", "b"]
    rings.d.set_route(b"w", [2])                    # read again: the watch goes on
    assert rings.d.route_position(b"w") == (400, 400)
    rings.d.set_route(b"w", [])
    assert rings.d.route_position(b"w") is None and rings.d.route_position(b"x") is None
    # A slot lost: every position forgotten, so that what the new one sends is new to all.
    rings.d.set_route(b"w", [1])
    rings.d.reset_positions()
    assert rings.d.position(1) == (0, 0) and rings.d.route_position(b"w") == (0, 0)
    assert rings.d.dispatch_wal(b"w", b"d", lsn=50, commit=60)      # another server's LSNs
    assert payloads(rings.take(1)) == ["d"]
    # A new timeline: positions past its switch point go back to it, the rest stay.
    rings.d.reset_positions(55)
    assert rings.d.position(1) == (55, 0)
    assert rings.d.dispatch_wal(b"w", b"e", lsn=56, commit=56)
    assert payloads(rings.take(1)) == ["e"]


# -- the pgoutput decoder, fed bytes (h11's rule: bytes in, records out, no I/O) -------------

def _xlog(body: bytes, end: int = 0) -> bytes:
    """XLogData: 'w', start LSN, end LSN, send time, then one pgoutput message."""
    return b"w" + (0).to_bytes(8, "big") + end.to_bytes(8, "big") + bytes(8) + body


def _begin(commit: int) -> bytes:
    return _xlog(b"B" + commit.to_bytes(8, "big") + bytes(8) + (7).to_bytes(4, "big"))


def _message(lsn: int, prefix: bytes, content: bytes, transactional: bool = True) -> bytes:
    return _xlog(b"M" + bytes([1 if transactional else 0]) + lsn.to_bytes(8, "big") + prefix
                 + b"\0" + len(content).to_bytes(4, "big") + content)


def _commit(commit: int, end: int) -> bytes:
    return _xlog(b"C" + bytes(1) + commit.to_bytes(8, "big") + end.to_bytes(8, "big")
                 + bytes(8))


def _keepalive(end: int, reply: bool = False) -> bytes:
    return b"k" + end.to_bytes(8, "big") + bytes(8) + bytes([1 if reply else 0])


def test_the_pgoutput_decoder_turns_a_transaction_into_positioned_records(rings: Rings) -> None:
    """Begin, messages, Commit, as the walsender sends them: each message routed by its prefix
    with its own LSN and its transaction's commit LSN; the slot may be confirmed to the commit
    once its reader is done, and a replay of the same transaction writes nothing twice."""
    d = rings.d
    d.set_route(b"c", [1])
    txn = [_begin(0x500), _message(0x410, b"c", b"one"), _message(0x420, b"other", b"x"),
           _message(0x430, b"c", b"two"), _commit(0x500, 0x520)]
    assert [d.feed(m) for m in txn] == ["done"] * 5
    one, two = rings.take(1)
    assert (one.payload, one.lsn, one.commit_lsn) == ("one", 0x410, 0x500)
    assert (two.payload, two.position) == ("two", (0x500, 0x430))
    assert (d.received, d.unrouted, d.last_end, d.copy_messages) == (3, 1, 0x520, 5)
    assert d.confirmable() == 0x520         # read and consumed: past the commit
    assert [d.feed(m) for m in txn] == ["done"] * 5      # sent again after a reconnect
    assert rings.take(1) == []
    assert d.feed(_keepalive(0x600, reply=True)) == "done"     # fed: no answer to send
    assert d.server_end == 0x600 and d.confirmable() == 0x600


def test_the_pgoutput_decoder_holds_what_is_not_consumed_and_refuses_what_it_cannot_read(
        ) -> None:
    """A message a blocking ring has no room for is held, and goes first once there is room;
    the slot may not pass a transaction its reader has not consumed; a message too short
    for what it says is refused (the stream is then read again from the slot)."""
    r = Rings(1, block=True)
    try:
        d = r.d
        d.set_route(b"c", [1])
        big = b"x" * (MIN_CAPACITY // 2)
        assert d.feed(_begin(0x900)) == "done"
        assert d.feed(_message(0x810, b"c", big)) == "done"
        assert d.feed(_message(0x820, b"c", big)) == "held"  # the blocking ring is full
        assert d.holding
        assert [n.lsn for n in r.take(1)] == [0x810]
        assert d.feed(_commit(0x900, 0x920)) == "done"    # the held one goes first
        assert not d.holding
        assert d.confirmable() == 0x900     # its transaction is not consumed yet
        assert [n.lsn for n in r.take(1)] == [0x820]
        assert d.confirmable() == 0x920
        for broken in (b"w" + bytes(10), _xlog(b"M\x01" + bytes(4)), b"?" + bytes(30),
                       _xlog(b"M\x01" + (1).to_bytes(8, "big") + b"no terminator")):
            assert d.feed(broken) == "bad", broken
    finally:
        r.close()
