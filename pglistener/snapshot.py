"""A table's current state, then every change after it exactly once.

    sub = worker.subscribe_changes("orders")           # 1. the stream first
    with conn.transaction():                           # 2. then the snapshot
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        snap = Snapshot.of(conn)
        rows = conn.execute("SELECT * FROM orders").fetchall()
    for change in sub:                                 # 3. what the snapshot did not see
        if isinstance(change, Change) and snap.sees(change):
            continue
        ...

The stream begins with what commits once subscribe_changes() returns, so every transaction
the snapshot does not see is in it (it commits after the snapshot was taken, so after the
stream began); the transactions that committed between the two are in both, and `sees()`
tells them apart by their xid, as PostgreSQL's own visibility rule does (what Netflix's
DBLog and Debezium's incremental snapshots do with watermarks). No position is guessed:
commit order and snapshot visibility differ (a transaction may commit before another and
become visible after it), which is why a WAL position taken in the snapshot's transaction
cannot say alone which side a change is on.
"""

from __future__ import annotations

from typing import Any

from ._core.reader import Change

__all__ = ["Snapshot"]


def _precedes(a: int, b: int) -> bool:
    """PostgreSQL's TransactionIdPrecedes for normal 32-bit xids (modulo 2**32)."""
    return ((a - b) & 0xFFFFFFFF) >= 0x80000000


class Snapshot:
    """What one transaction's snapshot sees: xmin, xmax and the xids in progress (as
    pg_current_snapshot() gives them, 64-bit; changes carry 32-bit xids)."""

    __slots__ = ("_xip32", "xip", "xmax", "xmin")

    def __init__(self, xmin: int, xmax: int,
                 xip: frozenset[int] | set[int] = frozenset()) -> None:
        self.xmin = xmin
        self.xmax = xmax
        self.xip = frozenset(xip)
        self._xip32 = frozenset(x & 0xFFFFFFFF for x in self.xip)

    @classmethod
    def of(cls, conn: Any) -> Snapshot:
        """The snapshot of `conn`'s transaction (a psycopg connection, or a cursor; in a
        REPEATABLE READ transaction, so that the rows read there are read with it)."""
        row = conn.execute("SELECT pg_current_snapshot()::text").fetchone()
        return cls.parse(row[0])

    @classmethod
    async def of_async(cls, conn: Any) -> Snapshot:
        """of() for a psycopg AsyncConnection (or AsyncCursor)."""
        cur = await conn.execute("SELECT pg_current_snapshot()::text")
        row = await cur.fetchone()
        return cls.parse(row[0])

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        """From pg_snapshot's text form, "xmin:xmax:xip,xip,...". """
        try:
            xmin, xmax, xip = text.split(":")
            return cls(int(xmin), int(xmax), {int(x) for x in xip.split(",") if x})
        except ValueError:
            raise ValueError(f"not a pg_snapshot: {text!r}") from None

    def sees(self, change: Change) -> bool:
        """Whether this snapshot sees what `change`'s transaction did (its rows were read
        with the snapshot: skip it)."""
        xid = change.xid
        if _precedes(xid, self.xmin & 0xFFFFFFFF):
            return True
        if not _precedes(xid, self.xmax & 0xFFFFFFFF):
            return False
        return xid not in self._xip32

    def __repr__(self) -> str:
        return f"Snapshot({self.xmin}:{self.xmax}:{','.join(map(str, sorted(self.xip)))})"
