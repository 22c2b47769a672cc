"""The ring, in one process, against a model: no database here.

The model is an independent byte-exact simulation of the layout documented in _ring.h:
records of align8(16 + channel + payload) bytes, a padding record where one would wrap, and
a gap record (16 bytes) written before the first notification that fits after a loss.
"""

from __future__ import annotations

import errno
import mmap
import os
import resource
import select
import socket
import struct
from collections import deque

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pglistener import Gap, Notification, PGListenerError
from pglistener._core.dispatch import HEADER_BYTES
from pglistener._core.reader import MIN_CAPACITY, RingReader, WaitStatus
from pglistener._supervisor.notify.decoder import NotifyDispatcher

# Version-sensitive (see scripts/test): run on every supported Python.
pytestmark = pytest.mark.every_python


def align8(n: int) -> int:
    return (n + 7) & ~7


class Ring:
    """A dispatcher with one ring routed from channel 'c', and its reader."""

    def __init__(self, capacity: int, block: bool = False) -> None:
        self.dispatcher = NotifyDispatcher()
        memfd = os.memfd_create("test-ring")
        os.ftruncate(memfd, HEADER_BYTES + capacity)
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        self.ctl, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.dispatcher.add_ring(1, memfd, os.dup(efd), capacity, block)
        self.reader = RingReader(memfd, efd, self.ctl.fileno(), os.dup(self.dispatcher.wake_fd))
        os.close(memfd)
        self.efd = efd

    def route(self, channel: bytes) -> None:
        self.dispatcher.set_route(channel, [1])

    def close(self) -> None:
        self.reader.close()
        self.dispatcher.remove_ring(1)
        os.close(self.efd)
        self.ctl.close()
        self.peer.close()


class Model:
    def __init__(self, capacity: int) -> None:
        self.cap = capacity
        self.tail = 0
        self.head = 0
        self.queue: deque[tuple[object, int]] = deque()   # (item, bytes it took incl. padding)
        self.gap = 0

    def span(self, pos: int, n: int) -> int:
        to_end = self.cap - pos % self.cap
        return n if n <= to_end else to_end + n

    def push(self, item: Notification) -> None:
        n = align8(16 + len(item.channel.encode()) + len(item.payload.encode()))
        if self.gap:
            gap_span = self.span(self.tail, 16)
            need = gap_span + self.span(self.tail + gap_span, n)
            if self.tail + need - self.head > self.cap:
                self.gap += 1
                return
            self.queue.append((Gap("overflow", self.gap), gap_span))
            self.tail += gap_span
            self.gap = 0
        elif self.tail + self.span(self.tail, n) - self.head > self.cap:
            self.gap = 1
            return
        s = self.span(self.tail, n)
        self.queue.append((item, s))
        self.tail += s

    def flush(self) -> None:
        if self.gap and self.tail + self.span(self.tail, 16) - self.head <= self.cap:
            s = self.span(self.tail, 16)
            self.queue.append((Gap("overflow", self.gap), s))
            self.tail += s
            self.gap = 0

    def pop(self) -> object:
        item, s = self.queue.popleft()
        self.head += s
        return item


# PostgreSQL text never holds NUL, and libpq hands payloads over as C strings.
no_nul = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))
payloads = st.one_of(
    st.text(no_nul, max_size=40),
    st.text(alphabet="éあ🙂x", min_size=0, max_size=2000),
    st.integers(0, 7999).map(lambda n: "p" * n),
)


class RingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ring: Ring | None = None
        self.model: Model | None = None
        self.pid = 1

    @precondition(lambda self: self.ring is None)
    @rule(shift=st.integers(0, 3))
    def create(self, shift: int) -> None:
        capacity = MIN_CAPACITY << shift
        self.ring = Ring(capacity)
        self.ring.route(b"c")
        self.model = Model(capacity)

    @precondition(lambda self: self.ring is not None)
    @rule(payload=payloads, count=st.integers(1, 20))
    def notify(self, payload: str, count: int) -> None:
        for _ in range(count):
            self.pid += 1
            raw = payload.encode()
            self.ring.dispatcher.dispatch(b"c", raw, self.pid)
            self.model.push(Notification("c", payload, self.pid))

    @precondition(lambda self: self.ring is not None)
    @rule(payload=payloads)
    def notify_unrouted(self, payload: str) -> None:
        self.ring.dispatcher.dispatch(b"other", payload.encode(), 1)

    @precondition(lambda self: self.ring is not None)
    @rule(count=st.integers(1, 50), batch=st.booleans())
    def read(self, count: int, batch: bool) -> None:
        if batch:
            got = self.ring.reader.get_many(count)
        else:
            got = []
            for _ in range(count):
                item = self.ring.reader.get_nowait()
                if item is None:
                    break
                got.append(item)
        want = [self.model.pop() for _ in range(min(count, len(self.model.queue)))]
        assert got == want

    @precondition(lambda self: self.ring is not None)
    @rule()
    def flush(self) -> None:
        self.ring.dispatcher.flush()
        self.model.flush()

    @invariant()
    def nothing_is_lost(self) -> None:
        if self.ring is None:
            return
        delivered, missed, used, _held = self.ring.dispatcher.ring_stats(1)
        assert used == self.model.tail - self.model.head

    def teardown(self) -> None:
        if self.ring is not None:
            # Drain: every record left must match the model, then the ring is empty.
            self.ring.dispatcher.flush()
            self.model.flush()
            rest = self.ring.reader.get_many(1 << 20)
            assert rest == [item for item, _ in self.model.queue]
            self.ring.close()


TestRingAgainstModel = RingMachine.TestCase
TestRingAgainstModel.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])


def test_seen_plus_missed_equals_sent() -> None:
    ring = Ring(MIN_CAPACITY)
    ring.route(b"c")
    sent = 0
    seen: list[Notification] = []
    missed = 0
    for round_ in range(50):
        for i in range(1000):
            sent += 1
            ring.dispatcher.dispatch(b"c", f"{round_}:{i}".encode() * 3, sent)
        ring.dispatcher.flush()
        for item in ring.reader.get_many(100_000):
            if isinstance(item, Gap):
                assert item.reason == "overflow" and item.missed > 0
                missed += item.missed
            else:
                seen.append(item)
    ring.dispatcher.flush()
    for item in ring.reader.get_many(100_000):
        if isinstance(item, Gap):
            missed += item.missed
        else:
            seen.append(item)
    assert missed > 0, "the ring never overflowed: the test proves nothing"
    assert len(seen) + missed == sent
    pids = [n.pid for n in seen]
    assert pids == sorted(pids)
    ring.close()


def test_wait_times_out_then_wakes_on_data() -> None:
    ring = Ring(MIN_CAPACITY)
    ring.route(b"c")
    assert ring.reader.wait(10, 0) == WaitStatus.WAIT_TIMEOUT
    ring.dispatcher.dispatch(b"c", b"x", 1)
    assert ring.reader.wait(-1, 0) == WaitStatus.WAIT_READY
    assert ring.reader.get_nowait() == Notification("c", "x", 1)
    ring.close()


def test_wait_sees_the_peer_hang_up() -> None:
    ring = Ring(MIN_CAPACITY)
    ring.peer.close()
    assert ring.reader.wait(-1, 0) == WaitStatus.WAIT_PEER_GONE
    ring.reader.close()
    ring.dispatcher.remove_ring(1)
    os.close(ring.efd)
    ring.ctl.close()


def test_reader_refuses_what_is_not_a_ring() -> None:
    memfd = os.memfd_create("junk")
    os.ftruncate(memfd, HEADER_BYTES + MIN_CAPACITY)
    try:
        RingReader(memfd, -1, -1)
    except ValueError as exc:
        assert "not a pglistener ring" in str(exc)
    else:
        raise AssertionError("a zeroed segment was accepted as a ring")
    finally:
        os.close(memfd)


def test_capacity_must_be_a_power_of_two() -> None:
    d = NotifyDispatcher()
    memfd = os.memfd_create("x")
    try:
        for bad in (1000, MIN_CAPACITY + 8, MIN_CAPACITY // 2):
            try:
                d.add_ring(1, memfd, -1, bad)
            except ValueError as exc:
                assert "power of two" in str(exc)
            else:
                raise AssertionError(f"capacity {bad} accepted")
    finally:
        os.close(memfd)


def _forge(capacity: int, record: bytes) -> tuple[int, mmap.mmap]:
    """A well-formed ring segment holding one record, as a memfd (and its mapping)."""
    memfd = os.memfd_create("forged")
    os.ftruncate(memfd, HEADER_BYTES + capacity)
    mem = mmap.mmap(memfd, HEADER_BYTES + capacity)
    struct.pack_into("<IIQ", mem, 0, 0x524C4750, 3, capacity)  # magic, layout 3
    mem[HEADER_BYTES:HEADER_BYTES + len(record)] = record
    struct.pack_into("<Q", mem, 64, len(record))        # tail: published
    return memfd, mem


@pytest.mark.parametrize("length", [0, 4, 12, 1 << 20])
@pytest.mark.parametrize("read", ["get_nowait", "discard"])
def test_a_record_length_is_checked_before_it_is_trusted(length: int, read: str) -> None:
    """0 would loop for ever (with or without the GIL), others read past what was published
    or out of alignment: each is an error, in every way of reading."""
    record = struct.pack("<IHHiI", length, 1, 1, 7, 1) + b"cx" + b"\0" * 6
    memfd, mem = _forge(MIN_CAPACITY, record)
    reader = RingReader(memfd, -1, -1)
    os.close(memfd)
    with pytest.raises(PGListenerError, match=f"corrupt ring record \\(length {length}\\)"):
        getattr(reader, read)(10) if read == "discard" else reader.get_nowait()
    reader.close()
    mem.close()


def test_a_notification_longer_than_its_record_is_refused() -> None:
    record = struct.pack("<IHHiI", 24, 1, 1, 7, 5000) + b"cx" + b"\0" * 6
    memfd, mem = _forge(MIN_CAPACITY, record)
    reader = RingReader(memfd, -1, -1)
    os.close(memfd)
    with pytest.raises(PGListenerError, match="corrupt ring record"):
        reader.get_nowait()
    reader.close()
    mem.close()


def test_reader_refuses_a_capacity_that_is_not_a_power_of_two() -> None:
    memfd, mem = _forge(MIN_CAPACITY + 8, b"")
    with pytest.raises(ValueError, match="not a pglistener ring"):
        RingReader(memfd, -1, -1)
    os.close(memfd)
    mem.close()


def test_a_second_reconnect_gap_with_nothing_between_is_not_written() -> None:
    """A replay that fails marks the streams it reached again; where nothing came after the
    first gap, that gap already covers it."""
    ring = Ring(MIN_CAPACITY)
    ring.route(b"c")
    ring.dispatcher.mark_gap([1], "reconnect")
    ring.dispatcher.mark_gap([1], "reconnect")
    ring.dispatcher.dispatch(b"c", b"x", 1)
    ring.dispatcher.mark_gap([1], "reconnect")
    assert ring.reader.get_many(10) == [Gap("reconnect"), Notification("c", "x", 1),
                                        Gap("reconnect")]
    ring.close()


def test_a_failing_poll_is_an_error_not_a_gone_supervisor() -> None:
    """poll() refuses more descriptors than RLIMIT_NOFILE allows (EINVAL): that is reported
    as such, not taken for the supervisor's hang-up (which ends every stream)."""
    ring = Ring(MIN_CAPACITY)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1, hard))
    try:
        status = ring.reader.wait(1000, 0)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert (status, ring.reader.wait_errno) == (WaitStatus.WAIT_FAILED, errno.EINVAL)
    ring.close()


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_a_reader_that_frees_room_wakes_the_producer_only_then() -> None:
    """A gap that does not fit waits for room without a timer: the producer raises the ring's
    flag, and the reader's next release of room writes the supervisor's wake eventfd."""
    ring = Ring(MIN_CAPACITY)
    ring.route(b"c")
    sent = 0
    while ring.dispatcher.ring_stats(1)[1] == 0:      # until one is missed
        sent += 1
        ring.dispatcher.dispatch(b"c", b"x" * 1000, sent)
    ring.dispatcher.flush()
    wake = ring.dispatcher.wake_fd
    assert not _readable(wake)              # nobody read: nobody woke us
    first = ring.reader.get_nowait()
    assert isinstance(first, Notification) and first.pid == 1
    assert _readable(wake)
    os.read(wake, 8)
    assert not _readable(wake)              # the flag is down: one wake-up per wait
    ring.reader.get_nowait()
    assert not _readable(wake)
    ring.dispatcher.flush()                 # what run() does when woken: the gap goes in
    items = ring.reader.get_many(sent)
    assert items[-1] == Gap("overflow", 1) and len(items) == sent - 2
    ring.close()


def test_a_blocking_ring_refuses_rather_than_misses_and_its_reader_wakes_the_producer() -> None:
    ring = Ring(MIN_CAPACITY, block=True)
    ring.route(b"c")
    sent = 0
    while ring.dispatcher.dispatch(b"c", b"x" * 1000, sent + 1):
        sent += 1
    assert ring.dispatcher.ring_stats(1)[1] == 0        # nothing missed: refused instead
    wake = ring.dispatcher.wake_fd
    assert not _readable(wake)
    assert ring.reader.get_nowait() == Notification("c", "x" * 1000, 1)
    assert _readable(wake)                              # room: the producer is told
    assert ring.dispatcher.dispatch(b"c", b"x" * 1000, sent + 1)
    assert [n.pid for n in ring.reader.get_many(sent + 1)] == list(range(2, sent + 2))
    ring.close()


def test_a_group_gives_each_notification_to_one_member_the_least_behind_in_turn() -> None:
    """Two rings as one consumer group beside a plain one: the plain ring gets every
    notification; the group's members share them, evenly while both keep up, and the one
    that reads gets them while the other falls behind."""
    d = NotifyDispatcher()
    ctl, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    readers, efds = [], []
    for ring_id in (1, 2, 3):
        memfd = os.memfd_create("group-ring")
        os.ftruncate(memfd, HEADER_BYTES + MIN_CAPACITY)
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        d.add_ring(ring_id, memfd, os.dup(efd), MIN_CAPACITY)
        readers.append(RingReader(memfd, efd, ctl.fileno()))
        os.close(memfd)
        efds.append(efd)
    d.set_route(b"jobs", [[1, 2], 3])
    for i in range(10):
        d.dispatch(b"jobs", b"j", i)
    a, b, plain = ([n.pid for n in r.get_many(100)] for r in readers)
    assert plain == list(range(10))
    assert sorted(a + b) == list(range(10)) and a == sorted(a) and b == sorted(b)
    assert len(a) == len(b) == 5                # in turn while equally behind
    for i in range(10, 20):                     # only the first member reads
        d.dispatch(b"jobs", b"j", i)
        a += [n.pid for n in readers[0].get_many(100)]
    assert len(a) >= 5 + 9                      # the one behind got at most one more
    d.set_route(b"jobs", [[2], 3])              # a member leaves: the rest take it all
    d.remove_ring(1)
    d.dispatch(b"jobs", b"j", 20)
    assert readers[1].get_many(100)[-1].pid == 20
    for r in readers:
        r.close()
    for ring_id in (2, 3):
        d.remove_ring(ring_id)
    for efd in efds:
        os.close(efd)
    ctl.close()
    peer.close()
