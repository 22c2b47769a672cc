"""The supervisor's conversations with the server, driven with canned answers (no server):
the WAL source's setup, subscribe_changes()'s table lookup and the failover judgement,
every branch of each, the
commands sent in their order and what is made of the answers. The answers are the server's
own shapes (the replication commands' result columns, as the docs' "Streaming Replication
Protocol" gives them; the lookup's own query's); the same conversations run against real
servers in test_wal.py, test_failover.py and test_changes.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from pglistener import format_lsn, parse_lsn
from pglistener._supervisor.conversation import Answer, Command, drive
from pglistener._supervisor.wal.decoder import WalDispatcher
from pglistener._supervisor.wal.failover import Verdict, judge
from pglistener._supervisor.wal.setup import (
    PUBLICATION_POLL,
    PUBLICATION_REPLAY,
    SetupError,
    Started,
    setup,
)
from pglistener._supervisor.wal.tables import Found, TableError, find_tables

SYSTEM = b"7400000000000000001"


@dataclass
class Host:
    """What a WalConnection holds for its setup, across setups."""

    slot: str = "app"
    publication: str = "app_pub"
    safe_target: str = "db.example:5432"
    failover: bool | None = None
    dispatcher: WalDispatcher = field(default_factory=WalDispatcher)
    tables: Callable[[], list[int]] = list
    recovery: bool = False
    server_version: int = 0
    sync_slots: str = ""
    slot_failover: bool = False
    slot_confirmed: int = 0
    has_read: bool = False
    system: tuple[str, int] | None = None
    publication_gone: float | None = None
    undecodable: tuple[str, int] | None = None


def rows(*rows: tuple[bytes | None, ...]) -> Answer:
    return Answer([list(rows)])


def error(message: str) -> Answer:
    return Answer([], message)


def check(version: int = 170004, level: bytes = b"logical", recovery: bool = False,
          at: str = "0/5000000", effective: bytes | None = None) -> Answer:
    return rows((level, b"t" if recovery else b"f", str(version).encode(), at.encode(), b"",
                 effective))


def identify(timeline: int = 1, system: bytes = SYSTEM) -> Answer:
    return rows((system, str(timeline).encode(), b"0/5000000", b"app"))


def slot_row(confirmed: str = "0/4000000", status: bytes = b"reserved",
             active: bytes | None = None, plugin: bytes = b"pgoutput", failover: bytes = b"f",
             synced: bytes = b"f", invalidated: bytes | None = None) -> Answer:
    return rows((plugin, active, status, confirmed.encode(), b"t", failover, synced,
                 invalidated))


NO_ROWS = rows()
DONE = Answer([[]])
STREAMING = Answer([], copy_both=True)
CREATED = rows((b"app", b"0/4800000", None, b"pgoutput"))
PUBLICATION_THERE = rows((b"1",))
NO_KEEP_TABLE = rows((b"f",))

#: The script's steps: what the command starts with, and the answer it gets.
Script = list[tuple[bytes, Answer]]

START: Script = [(b"WITH RECURSIVE d(oid, base)", NO_ROWS),
                 (b'START_REPLICATION SLOT "app" LOGICAL 0/0', STREAMING)]


def converse(host: Host, script: Script) -> tuple[Started | SetupError, list[Command]]:
    """Drive the setup with the script's answers, each to the command it names, in order;
    what it returned or raised, and every command it sent."""
    steps = setup(host)
    sent: list[Command] = []
    answer: Answer | None = None
    for expected, reply in script:
        try:
            command = next(steps) if answer is None else steps.send(answer)
        except StopIteration as stop:
            pytest.fail(f"the setup returned {stop.value} before {expected!r}")
        except SetupError as exc:
            pytest.fail(f"the setup failed before {expected!r}: {exc}")
        assert command.sql.startswith(expected), (command.sql, expected)
        sent.append(command)
        answer = reply
    try:
        command = steps.send(answer) if answer is not None else next(steps)
    except StopIteration as stop:
        return stop.value, sent
    except SetupError as exc:
        return exc, sent
    pytest.fail(f"the setup went on past the script: {command.sql!r}")


def first_start(version: int = 170004) -> Script:
    return [(b"SELECT current_setting('wal_level')", check(version)),
            (b"IDENTIFY_SYSTEM", identify()),
            (b"SELECT plugin, active_pid", NO_ROWS),
            (b"SELECT 1 FROM pg_publication", NO_ROWS),
            (b"DO $pglistener$", DONE),
            (b'CREATE_REPLICATION_SLOT "app" LOGICAL pgoutput', CREATED)] + START


def found(answer: Answer, version: int = 170004, timeline: int = 1,
          system: bytes = SYSTEM) -> Script:
    """A setup's first three steps, finding the slot as `answer` says."""
    return [(b"SELECT current_setting('wal_level')", check(version)),
            (b"IDENTIFY_SYSTEM", identify(timeline, system)),
            (b"SELECT plugin, active_pid", answer)]


def made_again() -> Script:
    """After a slot found gone: the publication is there, the slot is made, the stream runs."""
    return [(b"SELECT 1 FROM pg_publication", PUBLICATION_THERE),
            (b'CREATE_REPLICATION_SLOT "app" LOGICAL pgoutput', CREATED)] + START


def read_before(host: Host, confirmed: int = parse_lsn("0/4000000")) -> Host:
    """A host whose supervisor has read the slot, up to `confirmed`."""
    host.has_read = True
    host.system = (SYSTEM.decode(), 1)
    host.dispatcher.confirmed = confirmed
    return host


def test_a_first_start_makes_the_publication_then_the_slot_and_streams() -> None:
    host = Host()
    started, sent = converse(host, first_start())
    assert started == Started(start_lsn=parse_lsn("0/5000000"), created=True)
    assert host.has_read and host.system == (SYSTEM.decode(), 1)
    assert host.slot_confirmed == parse_lsn("0/4800000")     # the slot's consistent point
    # PostgreSQL 17 on a primary: a failover slot unless told otherwise; no nudge.
    assert sent[5].sql.endswith(b"(SNAPSHOT 'nothing', FAILOVER)") and not sent[5].nudge
    assert host.slot_failover


def test_on_postgresql_16_the_slot_is_made_without_failover() -> None:
    host = Host()
    started, sent = converse(host, first_start(160004))
    assert isinstance(started, Started) and started.created
    assert sent[5].sql.endswith(b"NOEXPORT_SNAPSHOT") and not host.slot_failover


def test_a_slot_found_on_first_read_is_read_from_where_it_stands() -> None:
    host = Host()
    kept = rows((b"6368616e", b"10", b"11", None, None), (b"62", b"20", b"21", b"30", b"31"))
    started, _ = converse(host, found(slot_row(failover=b"t")) + [
        (b"SELECT to_regclass('pglistener_positions')", rows((b"t",))),
        (b"SELECT encode(channel, 'hex')", kept),
        (b"SELECT 1 FROM pg_publication", PUBLICATION_THERE)] + START)
    assert isinstance(started, Started)
    assert (started.loss, started.created) == (None, False)
    assert started.kept == {"chan": ((10, 11), None), "b": ((20, 21), (30, 31))}
    assert host.slot_confirmed == parse_lsn("0/4000000") and host.slot_failover


def test_a_slot_found_again_where_it_was_left_goes_on() -> None:
    host = read_before(Host())
    started, _ = converse(host, found(slot_row()) + [
        (b"SELECT 1 FROM pg_publication", PUBLICATION_THERE)] + START)
    assert isinstance(started, Started) and started.loss is None and started.kept is None


def test_a_slot_gone_since_it_was_read_is_made_again_and_said_lost() -> None:
    host = read_before(Host())
    started, _ = converse(host, found(NO_ROWS) + made_again())
    assert isinstance(started, Started) and started.created
    assert started.loss is not None and started.loss.startswith("it is gone")


def test_an_invalidated_slot_is_dropped_made_again_and_said_lost() -> None:
    host = read_before(Host())
    started, sent = converse(host, found(slot_row(status=b"lost",
                                                  invalidated=b"rows_removed")) + [
        (b'DROP_REPLICATION_SLOT "app"', DONE)] + made_again())
    assert isinstance(started, Started) and started.created
    assert started.loss is not None and started.loss.startswith(
        "the server invalidated it (rows_removed): rows the slot still needed")
    # Before PostgreSQL 16 no reason is given: lost is max_slot_wal_keep_size's.
    host = read_before(Host())
    started, _ = converse(host, found(slot_row(status=b"lost"), version=150004) + [
        (b'DROP_REPLICATION_SLOT "app"', DONE)] + made_again())
    assert isinstance(started, Started) and started.loss is not None
    assert "max_slot_wal_keep_size" in started.loss


def test_a_slot_confirmed_past_what_was_reported_was_made_again_by_someone_else() -> None:
    host = read_before(Host(), confirmed=parse_lsn("0/3000000"))
    started, _ = converse(host, found(slot_row(confirmed="0/4000000")) + [
        (b"SELECT 1 FROM pg_publication", PUBLICATION_THERE)] + START)
    assert isinstance(started, Started) and started.loss == (
        "it is confirmed at 0/4000000, past the 0/3000000 this supervisor reported (made "
        "again, or advanced, by someone else)")


def test_another_cluster_is_a_loss() -> None:
    host = read_before(Host())
    started, _ = converse(host, found(slot_row(), system=b"7499999999999999999") + [
        (b"SELECT 1 FROM pg_publication", PUBLICATION_THERE)] + START)
    assert isinstance(started, Started) and started.loss is not None
    assert started.loss.startswith("the server is another cluster")
    assert host.system == ("7499999999999999999", 1)


def test_an_older_timeline_is_a_loss() -> None:
    host = read_before(Host())
    host.system = (SYSTEM.decode(), 3)
    started, _ = converse(host, found(slot_row(), timeline=2) + [
        (b"SELECT 1 FROM pg_publication", PUBLICATION_THERE)] + START)
    assert isinstance(started, Started) and started.loss is not None
    assert "older than the 3 read before" in started.loss


def test_a_new_timeline_goes_on_from_where_its_history_left_the_one_read() -> None:
    """A standby promoted: the slot (synced, or made there) goes on, rewound to the switch
    point, even though it may be confirmed past what was reported."""
    history = b"1\t0/4100000\tno recovery target specified\n"
    host = read_before(Host(), confirmed=parse_lsn("0/3000000"))
    started, _ = converse(host, [
        (b"SELECT current_setting('wal_level')", check()),
        (b"IDENTIFY_SYSTEM", identify(timeline=2)),
        (b"TIMELINE_HISTORY 2", rows((b"00000002.history", history))),
        (b"SELECT plugin, active_pid", slot_row(confirmed="0/4000000")),
        (b"SELECT 1 FROM pg_publication", PUBLICATION_THERE)] + START)
    assert isinstance(started, Started)
    assert (started.rewind_to, started.loss) == (parse_lsn("0/4100000"), None)
    # A history that does not hold the timeline read: a loss (bytea, as the server may send).
    host = read_before(Host())
    host.system = (SYSTEM.decode(), 1)
    other = b"\\x" + b"3509302f3430303030300966".hex().encode()
    started, _ = converse(host, [
        (b"SELECT current_setting('wal_level')", check()),
        (b"IDENTIFY_SYSTEM", identify(timeline=6)),
        (b"TIMELINE_HISTORY 6", rows((b"00000006.history", other))),
        (b"SELECT plugin, active_pid", slot_row()),
        (b"SELECT 1 FROM pg_publication", PUBLICATION_THERE)] + START)
    assert isinstance(started, Started) and started.rewind_to is None
    assert started.loss == ("the server is on timeline 6, whose history does not hold "
                            "timeline 1, the one read before")


@pytest.mark.parametrize(("answer", "permanent", "says"), [
    (check(130010), True, "needs PostgreSQL 14 or later"),
    (check(level=b"replica"), True, "wal_level is 'replica' on db.example:5432"),
    (check(level=b"replica", recovery=True), True, "restart the server; on a standby, on the "
                                                   "primary"),
    (check(150004, recovery=True), True, "a slot can be read on a standby from PostgreSQL 16"),
    (error("connection reset"), False, "checking the server failed: connection reset"),
])
def test_a_server_the_source_cannot_read_is_refused(answer: Answer, permanent: bool,
                                                    says: str) -> None:
    failed, sent = converse(Host(), [(b"SELECT current_setting('wal_level')", answer)])
    assert isinstance(failed, SetupError) and failed.permanent is permanent
    assert says in str(failed) and len(sent) == 1


def test_postgresql_19_reads_with_wal_level_replica() -> None:
    host = Host()
    script = first_start(190000)
    script[0] = (script[0][0], check(190000, level=b"replica", effective=b"replica"))
    started, _ = converse(host, script)
    assert isinstance(started, Started) and started.created


def test_failover_asked_of_a_server_that_cannot_is_refused() -> None:
    for host, version, says in ((Host(failover=True), 160004, "needs PostgreSQL 17"),
                                (Host(failover=True), 170004, "cannot be a failover slot")):
        answer = check(version, recovery=version == 170004)
        failed, _ = converse(host, [(b"SELECT current_setting('wal_level')", answer)])
        assert isinstance(failed, SetupError) and failed.permanent and says in str(failed)


@pytest.mark.parametrize(("answer", "permanent", "says"), [
    (slot_row(plugin=b"test_decoding"), True, "exists for another use (plugin "
                                              "'test_decoding')"),
    (slot_row(active=b"4242"), False, "in use by server process 4242"),
    (error("out of memory"), False, "looking for slot 'app' failed: out of memory"),
])
def test_a_slot_not_ours_to_read_now_is_refused(answer: Answer, permanent: bool,
                                                says: str) -> None:
    failed, _ = converse(Host(), found(answer))
    assert isinstance(failed, SetupError) and failed.permanent is permanent
    assert says in str(failed)


def test_a_failover_setting_that_differs_is_altered() -> None:
    host = Host(failover=False)
    started, sent = converse(host, found(slot_row(failover=b"t")) + [
        (b"SELECT to_regclass", NO_KEEP_TABLE),
        (b'ALTER_REPLICATION_SLOT "app" (FAILOVER false)', DONE),
        (b"SELECT 1 FROM pg_publication", PUBLICATION_THERE)] + START)
    assert isinstance(started, Started) and not host.slot_failover


def test_on_a_standby_the_slot_waits_for_the_publication_and_nudges_the_primary() -> None:
    host = Host()
    missing = Answer([[(None, b"f")]])
    started, sent = converse(host, [
        (b"SELECT current_setting('wal_level')", check(recovery=True)),
        (b"IDENTIFY_SYSTEM", identify()),
        (b"SELECT plugin, active_pid", NO_ROWS),
        (b"SELECT EXISTS (SELECT 1 FROM pg_publication", rows((b"f",))),
        (b"SELECT pg_sleep(0.1), EXISTS", missing),
        (b"SELECT pg_sleep(0.1), EXISTS", Answer([[(None, b"t")]])),
        (b'CREATE_REPLICATION_SLOT "app" LOGICAL pgoutput NOEXPORT_SNAPSHOT', CREATED)]
        + START)
    assert isinstance(started, Started) and started.created
    assert [c.nudge for c in sent] == [False] * 6 + [True, False, False]
    # A publication that never comes: the setup fails, to be tried again.
    polls = int(PUBLICATION_REPLAY / PUBLICATION_POLL)
    failed, sent = converse(Host(), [
        (b"SELECT current_setting('wal_level')", check(recovery=True)),
        (b"IDENTIFY_SYSTEM", identify()),
        (b"SELECT plugin, active_pid", NO_ROWS),
        (b"SELECT EXISTS", rows((b"f",)))]
        + [(b"SELECT pg_sleep", missing)] * polls)
    assert isinstance(failed, SetupError) and not failed.permanent
    assert "is not on the standby db.example:5432" in str(failed)


def test_a_publication_dropped_under_the_supervisor_is_made_again_after_a_grace() -> None:
    host = read_before(Host(tables=lambda: [16384]))
    script = found(slot_row()) + [(b"SELECT 1 FROM pg_publication", NO_ROWS)]
    failed, _ = converse(host, script)
    assert isinstance(failed, SetupError) and "made again after 5 s" in str(failed)
    assert host.publication_gone is not None
    host.publication_gone -= 10         # the grace has passed
    started, sent = converse(host, script + [(b"DO $pglistener$", DONE)] + START)
    assert isinstance(started, Started) and host.publication_gone is None
    assert b"16384" in sent[4].sql      # with the tables subscribed to
    # Made meanwhile by someone else: as good.
    host = Host()
    started, _ = converse(host, first_start()[:4] + [
        (b"DO $pglistener$", error('publication "app_pub" already exists'))] + first_start()[5:])
    assert isinstance(started, Started)


def test_a_change_that_could_not_be_decoded_is_passed_with_its_transaction() -> None:
    """The stream failed at a change from while the publication was gone: a copy of the
    slot decoded by test_decoding finds where its transaction, and the one that made the
    publication again, commit; the slot is advanced past both."""
    at = parse_lsn("0/4100100")
    host = read_before(Host())
    host.undecodable = ("app_pub", at)
    decoded = rows((b"0/4100100", b"901", b"table public.t: INSERT: id[integer]:1"),
                   (b"0/4100200", b"901", b"COMMIT 901"),
                   (b"0/4100300", b"902", b"COMMIT 902"))
    started, sent = converse(host, found(slot_row()) + [
        (b"SELECT 1 FROM pg_publication", PUBLICATION_THERE),
        (b"SELECT CASE WHEN pg_is_in_recovery()", rows((b"0/5000000", b"902"))),
        (b"SELECT pg_copy_logical_replication_slot('app', 'pglistener_skip_", DONE),
        (b"SELECT lsn::text, xid::text, data FROM pg_logical_slot_get_changes", decoded),
        (b"SELECT pg_drop_replication_slot('pglistener_skip_", DONE),
        (b"SELECT pg_replication_slot_advance('app', '0/4100300')", DONE)] + START)
    assert isinstance(started, Started) and host.undecodable is None
    assert started.loss == (f"a change at {format_lsn(at)} could not be decoded: publication "
                            f"'app_pub' did not exist as of it (dropped, and made again "
                            f"later?); the slot goes on from 0/4100300")
    assert host.slot_confirmed == parse_lsn("0/4100300")


def test_without_test_decoding_everything_up_to_now_is_passed() -> None:
    host = read_before(Host())
    host.undecodable = ("app_pub", parse_lsn("0/4100100"))
    started, _ = converse(host, found(slot_row()) + [
        (b"SELECT 1 FROM pg_publication", PUBLICATION_THERE),
        (b"SELECT CASE WHEN pg_is_in_recovery()", rows((b"0/5000000", None))),
        (b"SELECT pg_copy_logical_replication_slot", error("could not access file "
                                                            '"test_decoding"')),
        (b"SELECT pg_replication_slot_advance('app', '0/5000000')", DONE)] + START)
    assert isinstance(started, Started) and started.loss is not None
    assert "everything up to 0/5000000 is passed" in started.loss
    assert "could not access file" in started.loss


def test_a_transaction_not_found_in_the_copy_passes_everything_up_to_now() -> None:
    host = read_before(Host())
    host.undecodable = ("app_pub", parse_lsn("0/4100100"))
    started, _ = converse(host, found(slot_row()) + [
        (b"SELECT 1 FROM pg_publication", PUBLICATION_THERE),
        (b"SELECT CASE WHEN pg_is_in_recovery()", rows((b"0/5000000", None))),
        (b"SELECT pg_copy_logical_replication_slot", DONE),
        (b"SELECT lsn::text", rows((b"0/4000100", b"7", b"COMMIT 7"))),
        (b"SELECT lsn::text", NO_ROWS),
        (b"SELECT pg_drop_replication_slot", DONE),
        (b"SELECT pg_replication_slot_advance('app', '0/5000000')", DONE)] + START)
    assert isinstance(started, Started) and started.loss is not None
    assert "its transaction was not found, so everything up to 0/5000000" in started.loss


def test_a_start_that_does_not_stream_fails() -> None:
    script = first_start()
    script[-1] = (script[-1][0], DONE)
    failed, _ = converse(Host(), script)
    assert isinstance(failed, SetupError) and "did not start a stream" in str(failed)
    script[-1] = (script[-1][0], error("permission denied to start WAL sender"))
    failed, _ = converse(Host(), script)
    assert isinstance(failed, SetupError) and "the role needs the REPLICATION" in str(failed)


def test_drive_runs_a_conversation_on_a_queue_of_commands() -> None:
    """drive() sends each command once the one before is answered, and ends with what the
    conversation returns, or the error it raises; a command never answered (the connection
    went) leaves it where it stood."""
    queue: list[tuple[bytes, Callable[[list[list[tuple[bytes | None, ...]]], str | None],
                                      None]]] = []
    ended: list[object] = []

    def talk() -> object:
        first = yield Command(b"one")
        if first.error is not None:
            raise SetupError(first.error)
        second = yield Command(b"two", nudge=True)
        return (first.rows(), second.rows())

    nudged: list[bytes] = []
    drive(talk(), lambda sql, done: queue.append((sql, done)),
          lambda found, exc: ended.append((found, exc)), errors=(SetupError,),
          sent=lambda c: nudged.append(c.sql) if c.nudge else None)
    assert [q[0] for q in queue] == [b"one"] and ended == []
    queue.pop(0)[1]([[(b"1",)]], None)
    assert [q[0] for q in queue] == [b"two"] and nudged == [b"two"]
    queue.pop(0)[1]([], None)
    assert ended == [(([(b"1",)], []), None)]
    drive(talk(), lambda sql, done: done([], "gone"), lambda found, exc: ended.append(exc),
          errors=(SetupError,))
    assert isinstance(ended[-1], SetupError) and str(ended[-1]) == "gone"


# -- subscribe_changes()'s tables -----------------------------------------------------------

def table(oid: int | None, name: bytes = b"t", kind: bytes = b"r", published: bool = True,
          identity: bool = True, full: bool = False,
          key: bytes | None = None) -> tuple[bytes | None, ...]:
    """A row of find_query(): oid, schema, name, kind, in the publication, has a replica
    identity, it is FULL, its primary key's columns (hex, comma-separated)."""
    if oid is None:
        return (None,) * 8
    return (str(oid).encode(), b"public", name, kind, b"t" if published else b"f",
            b"t" if identity else b"f", b"t" if full else b"f", key)


def lookup(names: list[str], found: list[tuple[bytes | None, ...]],
           *more: tuple[bytes, Answer]) -> tuple[Found | TableError, list[Found], list[bytes]]:
    """find_tables() for `names`, its first answer `found` (with one domain over int4), then
    `more`: what it returned or raised, what it handed to learned(), the commands sent."""
    learned: list[Found] = []
    steps = find_tables("app_pub", names, learned.append)
    sent = [next(steps).sql]
    answers = [Answer([found, [(b"70001", b"23")]])] + [a for _, a in more]
    expected = [b"SELECT c.oid, n.nspname"] + [e for e, _ in more]
    assert sent[0].startswith(expected[0]) and b"WITH RECURSIVE d(oid, base)" in sent[0]
    for i, answer in enumerate(answers):
        try:
            command = steps.send(answer)
        except StopIteration as stop:
            assert i == len(answers) - 1, "returned before the script's end"
            return stop.value, learned, sent
        except TableError as exc:
            assert i == len(answers) - 1, "failed before the script's end"
            return exc, learned, sent
        assert command.sql.startswith(expected[i + 1]), (command.sql, expected[i + 1])
        sent.append(command.sql)
    pytest.fail("the lookup went on past the script")


def test_tables_in_the_publication_are_found_in_one_query() -> None:
    names = ["public.a", "public.b"]
    found, learned, sent = lookup(names, [table(16384, b"a"), table(16390, b"b")])
    assert found == Found([16384, 16390], {70001: 23}) and learned == [found]
    assert len(sent) == 1


def test_tables_the_publication_lacks_are_added_after_what_was_learned_is_handed_on() -> None:
    rows = [table(16384, b"a", published=False), table(16390, b"b", full=True,
                                                       key=b"6964,6b")]
    found, learned, sent = lookup(["public.a", "public.b"], rows,
                                  (b"DO $pglistener$BEGIN BEGIN CREATE PUBLICATION", Answer([])))
    assert isinstance(found, Found) and found.added == ['"public"."a"']
    assert found.key_columns == {16390: ["id", "k"]} and learned == [found]
    assert b'ADD TABLE "public"."a"' in sent[1] and b'"b"' not in sent[1]
    failed, _, _ = lookup(["public.a"], [table(16384, b"a", published=False)],
                          (b"DO $pglistener$", Answer([], "must be owner of table a")))
    assert isinstance(failed, TableError) and str(failed) == (
        "the publication 'app_pub' lacks \"public\".\"a\", and adding them failed: must be "
        "owner of table a (run as the tables' owner: ALTER PUBLICATION \"app_pub\" ADD TABLE "
        "\"public\".\"a\";)")


@pytest.mark.parametrize(("rows", "says", "learned"), [
    ([table(None), table(16390, b"b")], "no such table: public.a (a table that does not "
                                        "exist cannot be subscribed to: create it first)", 0),
    ([table(16384, b"a", kind=b"v"), table(16390, b"b")], "not a table: public.a", 0),
    ([table(16384, b"a", published=False, identity=False), table(16390, b"b")],
     "public.a has no replica identity (no primary key)", 1),
])
def test_a_table_that_cannot_be_subscribed_to_is_refused(
        rows: list[tuple[bytes | None, ...]], says: str, learned: int) -> None:
    failed, handed, sent = lookup(["public.a", "public.b"], rows)
    assert isinstance(failed, TableError) and str(failed).startswith(says)
    assert len(handed) == learned and len(sent) == 1    # nothing added


def test_a_lookup_the_server_fails_is_said() -> None:
    steps = find_tables("app_pub", ["public.a"], lambda found: None)
    next(steps)
    with pytest.raises(TableError, match="looking for the tables public.a failed: timeout"):
        steps.send(Answer([], "timeout"))


# -- whether a failover would keep the slot -------------------------------------------------

def verdict(answer: Answer | None = None, version: int = 170004, recovery: bool = False,
            failover: bool = True, sync_slots: str = "standby1", primary_here: bool = True,
            standbys: int = 0) -> tuple[Verdict | None, list[bytes]]:
    steps = judge("app", recovery, version, failover, sync_slots, primary_here, standbys)
    sent: list[bytes] = []
    try:
        sent.append(next(steps).sql)
        assert answer is not None, "asked the primary where it needed not"
        steps.send(answer)
    except StopIteration as stop:
        return stop.value, sent
    pytest.fail("the judgement went on past its one question")


def test_a_failover_judged_from_the_setup_alone() -> None:
    assert verdict(recovery=True) == (Verdict(None), [])
    ready, sent = verdict(version=160004)
    assert ready is not None and ready.ready is False and sent == []
    assert ready.reason is not None and ready.reason.startswith(
        "PostgreSQL 16 cannot keep a logical slot across a failover")
    ready, _ = verdict(failover=False)
    assert ready is not None and ready.ready is False and ready.reason is not None
    assert "is not a failover slot" in ready.reason
    ready, _ = verdict(sync_slots="")
    assert ready is not None and ready.ready is False and ready.reason is not None
    assert "synchronized_standby_slots is not set on the primary" in ready.reason
    assert verdict(primary_here=False) == (Verdict(None), [])


def test_a_failover_judged_by_the_standby_slots_on_the_primary() -> None:
    active = rows((b"standby1", b"physical", b"t"))
    ready, sent = verdict(active, sync_slots='standby1, "Standby2"')
    assert sent == [b"SELECT slot_name, slot_type, active FROM pg_replication_slots WHERE "
                    b"slot_name IN ('standby1', 'Standby2')"]
    assert ready is not None and ready.ready is False and ready.reason is not None
    assert "names Standby2, which is not a physical slot on the primary" in ready.reason
    ready, _ = verdict(rows((b"standby1", b"physical", b"f")))
    assert ready is not None and ready.reason is not None
    assert "the standby's slot standby1 (synchronized_standby_slots) is not in use" in \
        ready.reason
    ready, _ = verdict(rows((b"standby1", b"logical", b"t")))
    assert ready is not None and ready.ready is False and ready.reason is not None
    assert "names standby1, which is not a physical slot" in ready.reason
    # Set up on the primary: with no other server in the DSN, that is what can be judged.
    assert verdict(active)[0] == Verdict(True)
    assert verdict(active, standbys=2)[0] == Verdict(None, ask_standbys=True)
    assert verdict(error("canceled"))[0] is None      # judged again later
