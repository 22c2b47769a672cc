"""pgoutput's messages by bytes, without a server (h11's rule: bytes in, records and items
out, no I/O): hand-made Relation, Insert, Update, Delete and Truncate messages fed to the
supervisor's decoder, routed into rings and decoded by the reader, as one codec
(_core/_pgoutput.h) reads them on both sides; malformed and truncated ones refused where
they are read; the keys a keyed group routes by, also when a leaving member's records are
handed over."""

from __future__ import annotations

import pytest
from fix_rings import Rings

from pglistener import UNCHANGED, Change, Notification
from pglistener._core.reader import MIN_CAPACITY, Table

# Version-sensitive (see scripts/test): run on every supported Python.
pytestmark = pytest.mark.every_python

INT4, TEXT = 23, 25
RELID = 16384


# -- the messages, as the walsender sends them (the docs' "Logical Replication Message
# Formats"), each in its XLogData ---------------------------------------------------------------

def xlog(body: bytes, start: int = 0) -> bytes:
    """XLogData: 'w', start LSN, end LSN, send time, then one pgoutput message."""
    return b"w" + start.to_bytes(8, "big") + bytes(8) + bytes(8) + body


def begin(commit: int, xid: int = 7) -> bytes:
    return xlog(b"B" + commit.to_bytes(8, "big") + bytes(8) + xid.to_bytes(4, "big"))


def commit(commit: int, end: int) -> bytes:
    return xlog(b"C" + bytes(1) + commit.to_bytes(8, "big") + end.to_bytes(8, "big")
                + bytes(8))


def message(lsn: int, prefix: bytes, content: bytes) -> bytes:
    return xlog(b"M\x01" + lsn.to_bytes(8, "big") + prefix + b"\0"
                + len(content).to_bytes(4, "big") + content)


Column = tuple[int, str, int]      # flags (1: part of the key), name, type oid


def relation(columns: list[Column], relid: int = RELID, name: str = "t",
             identity: bytes = b"d") -> bytes:
    body = (b"R" + relid.to_bytes(4, "big") + b"public\0" + name.encode() + b"\0" + identity
            + len(columns).to_bytes(2, "big"))
    for flags, col, oid in columns:
        body += bytes([flags]) + col.encode() + b"\0" + oid.to_bytes(4, "big") + b"\xff" * 4
    return body


def tuple_data(values: list[object]) -> bytes:
    """None: NULL ('n'); UNCHANGED: an unchanged TOASTed value ('u'); bytes: text ('t')."""
    out = len(values).to_bytes(2, "big")
    for v in values:
        if v is None:
            out += b"n"
        elif v is UNCHANGED:
            out += b"u"
        else:
            assert isinstance(v, bytes)
            out += b"t" + len(v).to_bytes(4, "big") + v
    return out


def insert(new: list[object], relid: int = RELID) -> bytes:
    return b"I" + relid.to_bytes(4, "big") + b"N" + tuple_data(new)


def update(new: list[object], old: list[object] | None = None, kind: bytes = b"K",
           relid: int = RELID) -> bytes:
    before = b"" if old is None else kind + tuple_data(old)
    return b"U" + relid.to_bytes(4, "big") + before + b"N" + tuple_data(new)


def delete(old: list[object], kind: bytes = b"K", relid: int = RELID) -> bytes:
    return b"D" + relid.to_bytes(4, "big") + kind + tuple_data(old)


def truncate(relids: list[int], options: int = 0) -> bytes:
    return (b"T" + len(relids).to_bytes(4, "big") + bytes([options])
            + b"".join(r.to_bytes(4, "big") for r in relids))


def route(op: bytes, relid: int = RELID) -> bytes:
    """A change's route key: "\\0", the op letter, the table's oid in decimal."""
    return b"\0" + op + str(relid).encode()


COLUMNS: list[Column] = [(1, "id", INT4), (0, "name", TEXT), (0, "note", TEXT)]


@pytest.fixture
def rings() -> Rings:
    r = Rings(3)
    yield r
    r.close()


def fed(rings: Rings, *messages: bytes) -> None:
    assert [rings.d.feed(m) for m in messages] == ["done"] * len(messages)


def test_a_transactions_changes_come_out_as_they_went_in(rings: Rings) -> None:
    d = rings.d
    for op in b"IUDT":
        d.set_route(route(bytes([op])), [1])
    fed(rings, begin(0x900, xid=41), xlog(relation(COLUMNS)),
        xlog(insert([b"1", b"one", None]), start=0x100),
        xlog(insert([b"2", b"two", b"x"]), start=0x100),       # one multi-row insert
        xlog(update([b"3", b"two", UNCHANGED], old=[b"2", None, None]), start=0x180),
        xlog(update([b"1", b"uno", None]), start=0x1a0),
        xlog(delete([b"3", b"two", b"x"], kind=b"O"), start=0x1c0),
        xlog(truncate([RELID, 99999], options=1), start=0x1e0),   # 99999: not described
        commit(0x900, 0x920))
    assert d.changes == 6 and d.confirmable() == 0x900      # not consumed yet: its commit
    items = rings.take(1)
    assert d.confirmable() == 0x920
    assert all(isinstance(c, Change) for c in items)
    assert [(c.op, c.table, c.xid, c.commit_lsn) for c in items] == [
        (op, "public.t", 41, 0x900)
        for op in ("insert", "insert", "update", "update", "delete", "truncate")]
    # The rows of one multi-row insert share their record's LSN: each stands after the last.
    assert [c.lsn for c in items] == [0x100, 0x101, 0x180, 0x1a0, 0x1c0, 0x1e0]
    ins1, ins2, upd_key, upd, dele, trunc = items
    assert ins1.new == {"id": 1, "name": "one", "note": None} and ins1.old is None
    assert ins2.raw.new == {"id": "2", "name": "two", "note": "x"}
    assert upd_key.new == {"id": 3, "name": "two", "note": UNCHANGED}
    assert upd_key.old == {"id": 2}         # the old key: its key's columns alone
    assert upd.old is None and upd.new["name"] == "uno"
    assert dele.old == {"id": 3, "name": "two", "note": "x"} and dele.new is None
    assert trunc.message == b"T\x01" and trunc.new is None and trunc.old is None
    table = ins1.relation
    assert (table.name, table.columns, table.type_oids, table.key, table.replica_identity,
            table.relid) == ("public.t", ("id", "name", "note"), (INT4, TEXT, TEXT),
                             (True, False, False), "default", RELID)


def test_a_domains_column_is_described_by_its_base_type(rings: Rings) -> None:
    """pgoutput names a column's declared type; a SELECT names the base type of a domain, and
    psycopg loads by that: the decoder rewrites it in the Relation it hands on."""
    d = rings.d
    d.set_route(route(b"I"), [1])
    fed(rings, begin(0x500), xlog(relation([(1, "id", INT4), (0, "dom", 70001)])),
        xlog(insert([b"1", b"7"])))
    d.set_base_types({70001: INT4, 70002: TEXT})
    fed(rings, xlog(relation([(1, "id", INT4), (0, "dom", 70001)])), xlog(insert([b"2", b"8"])),
        commit(0x500, 0x520))
    before, after = rings.take(1)
    assert before.relation.type_oids == (INT4, 70001) and before.new["dom"] == "7"
    assert after.relation.type_oids == (INT4, INT4) and after.new == {"id": 2, "dom": 8}


def test_a_relation_cut_anywhere_is_refused_on_both_sides(rings: Rings) -> None:
    """Every proper prefix of a Relation message says more than it has: the decoder refuses
    it (the stream is then read again from the slot), and so does the reader's Table."""
    whole = relation(COLUMNS)
    assert Table(whole[1:]).columns == ("id", "name", "note")
    for k in range(len(whole)):
        assert rings.d.feed(xlog(whole[:k])) == "bad", k
        if k > 0:
            with pytest.raises(ValueError, match="not a Relation message"):
                Table(whole[1:k])
    assert rings.d.feed(xlog(whole + b"more")) == "done"     # what follows is not read


def test_a_change_cut_anywhere_is_routed_and_refused_where_it_is_decoded(rings: Rings) -> None:
    """A change with its relid is routed as it came (the reader decodes it only when asked,
    and a stream must not stall on it); what it cannot be read as raises there, not past its
    end. Too short for a relid, the decoder refuses it."""
    d = rings.d
    d.set_route(route(b"I"), [1])
    d.set_route(route(b"U"), [1])
    fed(rings, begin(0x700), xlog(relation(COLUMNS)))
    whole = update([b"1", b"one", b"x"], old=[b"9", None, None])
    for k in range(1, len(whole)):
        expected = "bad" if k < 6 else "done"
        assert d.feed(xlog(whole[:k])) == expected, k
    cut = rings.take(1)
    assert len(cut) == len(whole) - 6
    for change in cut:
        with pytest.raises(ValueError, match="truncated"):
            change.new      # noqa: B018 - decoding is the test
    fed(rings, xlog(insert([b"1", b"one"])),                 # two columns of three
        xlog(b"I" + RELID.to_bytes(4, "big") + b"N\x00\x03x"),   # a kind of none
        xlog(b"I" + RELID.to_bytes(4, "big") + b"K" + tuple_data([b"1", None, None])))
    short, unknown, old_in_insert = rings.take(1)
    with pytest.raises(ValueError, match="2 columns where the table has 3"):
        short.new       # noqa: B018
    with pytest.raises(ValueError, match="unknown tuple data kind 120"):
        unknown.new     # noqa: B018
    with pytest.raises(ValueError, match="truncated change message"):
        old_in_insert.new   # noqa: B018
    # Nothing of it moved what is readable.
    fed(rings, xlog(insert([b"5", b"five", None])), commit(0x700, 0x720))
    assert [c.new["id"] for c in rings.take(1)] == [5]


def test_a_change_of_a_table_not_described_breaks_the_stream(rings: Rings) -> None:
    """pgoutput sends a table's Relation before its first change in a stream: a change
    without one cannot be read, and the stream is read again from the slot."""
    assert rings.d.feed(begin(0x300)) == "done"
    assert rings.d.feed(xlog(insert([b"1"], relid=4242))) == "bad"
    assert rings.d.feed(xlog(truncate([1, 2])[:9])) == "bad"     # says 2, holds one


def keyed(rings: Rings, ring_ids: list[int]) -> None:
    for ring_id in ring_ids:
        rings.d.set_keyed(ring_id, "group")


def by_ring(rings: Rings, key: object) -> dict[int, list[object]]:
    """Each ring's items, by ring: the key of each (what `key` reads of it)."""
    return {ring_id: [key(i) for i in rings.take(ring_id)] for ring_id in (2, 3)}


def test_a_keyed_groups_changes_stay_with_one_member_across_a_handover(rings: Rings) -> None:
    """A change's key is its replica identity's columns (the new row's, a delete's old
    key's), carried in its record: the records a leaving member hands over go, key by key,
    to one of the others, in their order, and that key's later changes follow them."""
    d = rings.d
    d.set_route(route(b"I"), [[1]])
    keyed(rings, [1])
    fed(rings, begin(0x900), xlog(relation(COLUMNS)))
    rows = [b"1", b"1", b"2", b"1", b"2", b"2"]    # not in turn: lag alone would split them
    fed(rings, *(xlog(insert([k, b"v%d" % i, None])) for i, k in enumerate(rows)))
    d.set_route(route(b"I"), [[1, 2, 3]])
    d.set_route(route(b"D"), [[1, 2, 3]])
    keyed(rings, [2, 3])
    assert d.handover(1, [2, 3]) == (6, 0)
    fed(rings, xlog(delete([b"1", None, None])), xlog(delete([b"2", None, None])),
        commit(0x900, 0x920))

    def key(c: Change) -> tuple[str, str]:
        return (c.op, (c.new or c.old)["id"])

    got = by_ring(rings, key)
    one = [("insert", 1)] * 3 + [("delete", 1)]
    two = [("insert", 2)] * 3 + [("delete", 2)]
    assert got in ({2: one, 3: two}, {2: two, 3: one})


def test_a_keyed_groups_messages_stay_with_one_member_across_a_handover(rings: Rings) -> None:
    """A keyed message (emit(key=)) is routed by its channel and keyed by what follows the
    \\x1f in it, when it is routed and when it is handed over."""
    d = rings.d
    d.set_route(b"c", [[1]])
    keyed(rings, [1])
    fed(rings, begin(0x900), *(message(0x800 + i, b"c\x1f" + k, b"%d" % i)
                               for i, k in enumerate([b"a", b"a", b"b", b"b"])))
    d.set_route(b"c", [[1, 2, 3]])
    keyed(rings, [2, 3])
    assert d.handover(1, [2, 3]) == (4, 0)
    fed(rings, message(0x900 - 2, b"c\x1fa", b"4"), message(0x900 - 1, b"c\x1fb", b"5"),
        commit(0x900, 0x920))

    def key(n: Notification) -> tuple[object, str]:
        return (n.key, n.payload)

    got = by_ring(rings, key)
    a = [("a", "0"), ("a", "1"), ("a", "4")]
    b = [("b", "2"), ("b", "3"), ("b", "5")]
    assert got in ({2: a, 3: b}, {2: b, 3: a})


def test_a_refused_truncate_leaves_nothing_behind() -> None:
    """A Truncate too short for the tables it counts is refused whole: nothing of it is
    left to route when a held message is offered again."""
    r = Rings(1, capacity=MIN_CAPACITY, block=True)
    try:
        d = r.d
        d.set_route(b"c", [1])
        big = b"x" * (MIN_CAPACITY // 2)
        fed(r, begin(0x900), xlog(relation(COLUMNS)))
        assert d.feed(xlog(truncate([RELID, RELID + 1])[:-4])) == "bad"
        fed(r, message(0x810, b"c", big))
        assert d.feed(message(0x820, b"c", big)) == "held"
        assert [n.lsn for n in r.take(1)] == [0x810]
        fed(r, commit(0x900, 0x920))        # the held one goes, and only it
        assert [n.lsn for n in r.take(1)] == [0x820]
        assert d.changes == 0 and not d.holding
    finally:
        r.close()
