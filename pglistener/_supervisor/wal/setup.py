"""The WAL source's setup, one conversation with the replication connection (a generator:
conversation.py): check the server, find the slot and judge what it holds against what was
read before, make what is missing (the publication first, then the slot), pass a change
pgoutput cannot decode, and start the stream. No I/O: WalConnection drives it; tests drive
it with canned answers, every branch without a server.

What it reads and keeps across setups is its connection's (Host): what was read before
decides what a slot found now means. This supervisor has read the slot (has_read) and finds
it missing, invalidated, confirmed past what it was told, or on another cluster: the stream
cannot go on from where it stood, and Started.loss says why (every WAL subscription gets
Gap("slot")). A new timeline of the same cluster (a standby promoted, its slot synced or made
there) goes on, from the point where the histories part (Started.rewind_to).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Protocol

from ..._core.reader import format_lsn, parse_lsn
from ..conversation import Answer, Command, Conversation
from ..listen import WAL_POSITION
from . import tables as _tables
from .decoder import WalDispatcher

log = logging.getLogger("pglistener.supervisor")

#: Where a supervisor keeps, for the next one, what it has seen on each channel of its slot
#: (in the DSN's database, its search_path's first schema): so that a reader resuming with
#: after= across a supervisor restart gets a Gap only where its channels had something.
KEEP_TABLE = "pglistener_positions"

#: A publication found gone (dropped) is made again only after this long (seconds): a
#: migration that drops it and makes it again would fail if the supervisor made it between.
PUBLICATION_GRACE = 5.0

#: How often (seconds) a standby is asked whether the publication has reached it, and for
#: how long before the setup fails (and is tried again).
PUBLICATION_POLL = 0.1
PUBLICATION_REPLAY = 60.0


class SetupError(Exception):
    """The server cannot serve the slot as it is; `permanent` when retrying alone will not
    mend it (a setting to change), else it is retried (the slot in use elsewhere)."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def explain(cause: str) -> str:
    """A replication connection's failure, with what to do about it when we know (said
    once, however many times a failure passes through here)."""
    if "(the role needs the REPLICATION" in cause or "(set wal_level = logical" in cause:
        return cause
    if "must be superuser or replication role" in cause or \
            "permission denied to start WAL sender" in cause:
        return (f"{cause} (the role needs the REPLICATION attribute for the WAL source: "
                f"ALTER ROLE <role> REPLICATION; on managed services a role such as "
                f"rds_replication)")
    if "logical decoding requires" in cause and "wal_level" in cause:
        return f"{cause} (set wal_level = logical in postgresql.conf and restart the server)"
    return cause


#: What the server's invalidation_reason (pg_replication_slots, PostgreSQL 17+) means.
INVALIDATIONS = {
    "wal_removed": "it removed WAL the slot still needed (max_slot_wal_keep_size)",
    "idle_timeout": "the slot was unread for longer than idle_replication_slot_timeout",
    "rows_removed": "rows the slot still needed were removed (on a standby: "
                    "hot_standby_feedback off, or no physical slot on the primary)",
    "wal_level_insufficient": "wal_level fell below logical on the primary",
    "conflicting": "it conflicted with recovery on this standby (rows it needed were "
                   "removed, or wal_level fell below logical on the primary)",
}


def invalidation(reason: str | None) -> str:
    """Why the server invalidated a slot, naming its own reason where it gives one (none
    before PostgreSQL 16, where only max_slot_wal_keep_size invalidates a slot)."""
    if reason is None:
        return f"the server invalidated it: {INVALIDATIONS['wal_removed']}"
    meaning = INVALIDATIONS.get(reason)
    return (f"the server invalidated it ({reason})" +
            (f": {meaning}" if meaning is not None else ""))


@dataclass
class Started:
    """How a setup that started the stream found the slot."""

    start_lsn: int                  # the server's WAL position when the setup began
    loss: str | None = None         # why the stream cannot go on from where it stood
    rewind_to: int | None = None    # a new timeline: where its history left the one read
    created: bool = False           # the slot was made by this setup
    # What the supervisor before this one kept (KEEP_TABLE): per channel, since when it
    # watched it and its last message then ((commit, lsn) each; None: none).
    kept: dict[str, tuple[tuple[int, int], tuple[int, int] | None]] | None = None


def switch_point(history: str, timeline: int) -> int | None:
    """Where the timeline history file `history` says `timeline` ended (the first switch
    at or after it), None when it does not name it (lines: parent TLI, switch LSN, why)."""
    points = []
    for line in history.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].isdigit() and int(fields[0]) >= timeline:
            try:
                points.append(parse_lsn(fields[1]))
            except ValueError:
                continue
    return min(points) if points else None


class Host(Protocol):
    """What the setup reads of its connection, and keeps there for the next setup."""

    slot: str
    publication: str
    safe_target: str                # the server, as said in messages
    failover: bool | None           # Supervisor(failover=): None is "where the server can"
    dispatcher: WalDispatcher       # what it told the server (confirmed); domains' types
    tables: Callable[[], list[int]]     # the oids of the tables subscribed to
    # Found by each setup, for the connection's user:
    recovery: bool                  # the server is a standby
    server_version: int
    sync_slots: str                 # the primary's synchronized_standby_slots
    slot_failover: bool             # the slot is a failover slot
    slot_confirmed: int             # its confirmed_flush_lsn as the setup found or moved it
    # Kept for as long as the process lives:
    has_read: bool                  # the slot was read: missing now, it is a loss
    system: tuple[str, int] | None  # the cluster and timeline read
    publication_gone: float | None  # found missing since (monotonic)
    undecodable: tuple[str, int] | None     # (publication, LSN) of a change that failed


def wants_failover(host: Host) -> bool:
    """Whether a slot made now is a failover slot: asked for, or by default where the
    server can (PostgreSQL 17+, on a primary)."""
    if host.failover is not None:
        return host.failover
    return host.server_version >= 170000 and not host.recovery


#: The first question: the server's settings and where its WAL stands.
CHECK = (f"SELECT current_setting('wal_level'), pg_is_in_recovery(), "
         f"current_setting('server_version_num'), {WAL_POSITION}, "
         f"current_setting('synchronized_standby_slots', true), "
         f"current_setting('effective_wal_level', true)").encode()


def setup(host: Host) -> Conversation[Started]:
    """Check the server, create the slot and the publication if missing, and start the
    stream: returns how it found the slot once the stream runs; raises SetupError when it
    cannot."""
    slot = host.slot
    outcome = Started(start_lsn=0)
    answer = yield Command(CHECK)
    if answer.error is not None:
        raise SetupError(f"checking the server failed: {answer.error}")
    level, recovery, version, position, sync_slots, effective = (
        _text(v) for v in answer.results[0][0])
    outcome.start_lsn = parse_lsn(position) if position else 0
    host.recovery = recovery == "t"
    host.server_version = int(version or 0)
    _check_server(host, level, effective)
    host.sync_slots = sync_slots or ""

    yield from _identify(host, outcome)

    answer = yield Command(_slot_query(host))
    if answer.error is not None:
        raise SetupError(f"looking for slot {slot!r} failed: {answer.error}")
    rows = answer.results[0] if answer.results else []
    if rows:
        plugin, active, status, confirmed, same_db, failover, synced, invalidated = (
            _text(v) for v in rows[0])
        _check_slot(host, plugin, same_db, synced, active)
        if status == "lost" or invalidated is not None:
            outcome.loss = invalidation(invalidated)
            answer = yield Command(f'DROP_REPLICATION_SLOT "{slot}"'.encode())
            if answer.error is not None:
                raise SetupError(f"dropping the invalidated slot failed: {answer.error}")
            rows = []
    if not rows:
        if host.has_read and outcome.loss is None:
            outcome.loss = ("it is gone (dropped, or this server is a new primary that did "
                            "not have it)")
        if outcome.loss is None:
            log.info("creating replication slot %r (pgoutput) on %s", slot, host.safe_target)
        # The publication first: pgoutput reads it as of each change it decodes, and a
        # change from before the publication existed fails the stream for good
        # ("publication ... does not exist"), whatever table it is on.
        yield from _publication(host)
        yield from _make_slot(host, outcome)
    else:
        at = parse_lsn(confirmed) if confirmed else 0
        told = max(host.dispatcher.confirmed, host.slot_confirmed)
        if host.has_read and outcome.loss is None and outcome.rewind_to is None \
                and at > told:
            outcome.loss = (f"it is confirmed at {format_lsn(at)}, past the "
                            f"{format_lsn(told)} this supervisor reported (made again, or "
                            f"advanced, by someone else)")
        host.slot_confirmed = at
        host.slot_failover = failover == "t"
        if not host.has_read:
            # First read by this process: what the one before kept, if it did.
            outcome.kept = yield from _kept(host)
        yield from _failover(host)
        yield from _publication(host)
        yield from _pass_undecodable(host, outcome)

    answer = yield Command(_tables.DOMAINS_QUERY)
    if answer.error is not None:
        raise SetupError(f"reading the domains' base types failed: {answer.error}")
    host.dispatcher.set_base_types(_tables.base_types(answer.rows()))
    answer = yield Command(f"START_REPLICATION SLOT \"{slot}\" LOGICAL 0/0 (proto_version "
                           f"'1', publication_names '\"{host.publication}\"', messages "
                           f"'true')".encode())
    if answer.error is not None:
        raise SetupError(explain(f"starting to read slot {slot!r} failed: {answer.error}"))
    if not answer.copy_both:
        raise SetupError("START_REPLICATION did not start a stream")
    host.has_read = True
    if outcome.loss is not None:
        log.error("replication slot %r on %s: %s. What it held, and what was written "
                  "meanwhile, cannot be read from it: %severy WAL subscription gets "
                  "Gap('slot')", slot, host.safe_target, outcome.loss,
                  "made again; " if outcome.created else "")
    return outcome


def _check_server(host: Host, level: str | None, effective: str | None) -> None:
    """Refuse a server the WAL source cannot read as it is set up (permanent: a setting to
    change, or another server to read)."""
    version = f"{host.server_version // 10000}.{host.server_version % 10000}"
    if host.server_version < 140000:
        raise SetupError(f"the WAL source needs PostgreSQL 14 or later (messages in "
                         f"pgoutput); the server is {version}", True)
    # PostgreSQL 19 decodes with wal_level = replica: making the first logical slot turns
    # logical decoding on (effective_wal_level becomes logical).
    if (effective or level) != "logical" and \
            not (host.server_version >= 190000 and level == "replica"):
        where = "; on a standby, on the primary" if host.recovery else ""
        need = ("wal_level = replica or logical" if host.server_version >= 190000
                else "wal_level = logical")
        raise SetupError(f"wal_level is {level!r} on {host.safe_target}: the WAL source "
                         f"needs {need} (set it in postgresql.conf and restart the "
                         f"server{where})", True)
    if host.recovery and host.server_version < 160000:
        raise SetupError(f"{host.safe_target} is a standby running PostgreSQL {version}: a "
                         f"slot can be read on a standby from PostgreSQL 16 on; read it on "
                         f"the primary (leave out slot_dsn=)", True)
    if host.failover is True and host.server_version < 170000:
        raise SetupError(f"Supervisor(failover=True) needs PostgreSQL 17 or later, whose "
                         f"slots can be synchronised to a standby; the server is {version}: "
                         f"pass failover=False, or leave it unset", True)
    if host.failover is True and host.recovery:
        raise SetupError(f"Supervisor(failover=True): a slot read on a standby "
                         f"({host.safe_target}) cannot be a failover slot; read it on the "
                         f"primary, or pass failover=False (a standby's own slot survives "
                         f"its promotion)", True)


def _identify(host: Host, outcome: Started) -> Generator[Command, Answer, None]:
    """Which cluster and timeline the server is: another cluster, or an older timeline,
    than what was read is a loss; a newer one goes on from where its history left ours."""
    answer = yield Command(b"IDENTIFY_SYSTEM")
    if answer.error is not None:
        raise SetupError(f"IDENTIFY_SYSTEM failed: {answer.error}")
    system = str(_text(answer.results[0][0][0]))
    timeline = int(_text(answer.results[0][0][1]) or 0)
    before, host.system = host.system, (system, timeline)
    if before is None or not host.has_read or before == host.system:
        return
    if before[0] != system:
        outcome.loss = (f"the server is another cluster (system identifier {system}, was "
                        f"{before[0]})")
    elif before[1] > timeline:
        outcome.loss = (f"the server is on timeline {timeline}, older than the {before[1]} "
                        f"read before (another server of the cluster)")
    else:
        # A standby was promoted: where its history left the one we read, from
        # TIMELINE_HISTORY of the timeline we are on now.
        answer = yield Command(f"TIMELINE_HISTORY {timeline}".encode())
        if answer.error is not None:
            raise SetupError(f"TIMELINE_HISTORY failed: {answer.error}")
        raw = (answer.results[0][0][1] or b"").decode()
        content = bytes.fromhex(raw[2:]).decode() if raw.startswith("\\x") else raw
        outcome.rewind_to = switch_point(content, before[1])
        if outcome.rewind_to is None:
            outcome.loss = (f"the server is on timeline {timeline}, whose history does not "
                            f"hold timeline {before[1]}, the one read before")


def _slot_query(host: Host) -> bytes:
    extra = (", failover, synced, invalidation_reason" if host.server_version >= 170000
             else ", NULL, NULL, CASE WHEN conflicting THEN 'conflicting' END"
             if host.server_version >= 160000 else ", NULL, NULL, NULL")
    return (f"SELECT plugin, active_pid, wal_status, confirmed_flush_lsn, "
            f"database = current_database(){extra} FROM pg_replication_slots "
            f"WHERE slot_name = '{host.slot}'").encode()


def _check_slot(host: Host, plugin: str | None, same_db: str | None, synced: str | None,
                active: str | None) -> None:
    """Refuse a slot found that is not ours to read, or not now."""
    slot = host.slot
    if plugin != "pgoutput" or same_db != "t":
        raise SetupError(f"replication slot {slot!r} exists for another use (plugin "
                         f"{plugin!r}{'' if same_db == 't' else ', another database'}): name "
                         f"another slot, or drop it (python -m pglistener slot drop {slot})",
                         True)
    if synced == "t" and host.recovery:
        raise SetupError(f"replication slot {slot!r} on {host.safe_target} is synchronised "
                         f"from the primary (a failover slot): it can be read only once this "
                         f"standby is promoted; read it on the primary")
    if active is not None:
        raise SetupError(f"replication slot {slot!r} is in use by server process {active} "
                         f"(another supervisor?): a slot is read by one supervisor at a "
                         f"time; retrying")


def _kept(host: Host) -> Generator[Command, Answer,
                                   dict[str, tuple[tuple[int, int], tuple[int, int] | None]]
                                   | None]:
    """What the supervisor before this one kept of the slot's channels (KEEP_TABLE), if it
    did: None when there is no such table or it cannot be read."""
    answer = yield Command(f"SELECT to_regclass('{KEEP_TABLE}') IS NOT NULL".encode())
    if answer.error is not None or not answer.results or answer.results[0][0][0] != b"t":
        return None
    answer = yield Command(f"SELECT encode(channel, 'hex'), since_commit, since_lsn, "
                           f"last_commit, last_lsn FROM {KEEP_TABLE} WHERE slot = "
                           f"'{host.slot}'".encode())
    if answer.error is not None or not answer.results:
        return None
    kept = {}
    for channel, s_commit, s_lsn, l_commit, l_lsn in answer.results[0]:
        name = bytes.fromhex((channel or b"").decode()).decode("utf-8", "replace")
        last = None if l_commit is None else (int(l_commit), int(l_lsn or 0))
        kept[name] = ((int(s_commit or 0), int(s_lsn or 0)), last)
    return kept


def _failover(host: Host) -> Generator[Command, Answer, None]:
    """A slot found whose failover setting is not the one asked for: altered (17+, on a
    primary)."""
    if host.failover is None or host.server_version < 170000 or host.recovery \
            or host.slot_failover == host.failover:
        return
    want = "true" if host.failover else "false"
    answer = yield Command(f'ALTER_REPLICATION_SLOT "{host.slot}" (FAILOVER {want})'.encode())
    if answer.error is not None:
        raise SetupError(f"making slot {host.slot!r} a failover slot failed: {answer.error}")
    host.slot_failover = host.failover


def _make_slot(host: Host, outcome: Started) -> Generator[Command, Answer, None]:
    host.slot_failover = wants_failover(host)
    options = "(SNAPSHOT 'nothing', FAILOVER)" if host.slot_failover else "NOEXPORT_SNAPSHOT"
    # A standby's slot waits for the primary's snapshot: the driver nudges the primary.
    answer = yield Command(f'CREATE_REPLICATION_SLOT "{host.slot}" LOGICAL pgoutput '
                           f'{options}'.encode(), nudge=host.recovery)
    if answer.error is not None:
        raise SetupError(explain(f"creating slot {host.slot!r} failed: {answer.error}"),
                         "wal_level" in answer.error)
    point = _text(answer.results[0][0][1]) if answer.results and answer.results[0] else None
    host.slot_confirmed = parse_lsn(point) if point else outcome.start_lsn
    outcome.created = True


def _publication(host: Host) -> Generator[Command, Answer, None]:
    """The publication, there (on a standby: once it has replayed it from the primary), or
    made (again) here."""
    pub = host.publication
    if host.recovery:
        # A standby has what its primary has, once it has replayed it: a slot made before
        # the publication arrives would fail at the changes between.
        exists = f"EXISTS (SELECT 1 FROM pg_publication WHERE pubname = '{pub}')"
        answer = yield Command(f"SELECT {exists}".encode())
        waited = 0
        while True:
            if answer.error is not None:
                raise SetupError(f"looking for publication {pub!r} failed: {answer.error}")
            if answer.results and answer.results[-1] and answer.results[-1][0][-1] == b"t":
                return
            if waited == 0:
                log.info("waiting for publication %r to reach the standby %s", pub,
                         host.safe_target)
            if waited * PUBLICATION_POLL >= PUBLICATION_REPLAY:
                raise SetupError(f"publication {pub!r} is not on the standby "
                                 f"{host.safe_target} (it is made on the primary, and "
                                 f"replicates: is the standby replaying?)")
            waited += 1
            answer = yield Command(f"SELECT pg_sleep({PUBLICATION_POLL}), {exists}".encode())
    answer = yield Command(f"SELECT 1 FROM pg_publication WHERE pubname = '{pub}'".encode())
    if answer.error is not None:
        raise SetupError(f"looking for publication {pub!r} failed: {answer.error}")
    if answer.results and answer.results[0]:
        host.publication_gone = None
        return
    # Missing: made, or made again (dropped under this supervisor) with the tables whose
    # changes are subscribed to; not at once, as a migration that drops it and makes it
    # again would then fail to.
    tables = host.tables()
    if host.has_read:
        now = time.monotonic()
        if host.publication_gone is None:
            host.publication_gone = now
        if now - host.publication_gone < PUBLICATION_GRACE:
            raise SetupError(f"publication {pub!r} is gone from {host.safe_target} (dropped?): "
                             f"it is made again after {PUBLICATION_GRACE:g} s unless it comes "
                             f"back")
        host.publication_gone = None
        log.warning("publication %r is gone from %s (dropped?): making it again%s", pub,
                    host.safe_target,
                    f" with the {len(tables)} tables subscribed to" if tables else "")
    answer = yield Command(_tables.remake_query(pub, tables))
    if answer.error is not None and "already exists" not in answer.error:
        raise SetupError(f"creating publication {pub!r} failed: {answer.error} (CREATE "
                         f"PUBLICATION {pub}; as its owner)")


def _pass_undecodable(host: Host, outcome: Started) -> Generator[Command, Answer, None]:
    """The stream failed at a change pgoutput could not decode: the publication did not
    exist as of it (PostgreSQL 15-17; 18 on skips such a change itself, and says so in a
    WARNING, which the decoder turns into a Gap). Read every time from before it, it fails
    every time: the slot must pass its transaction. Where it ends is found on a temporary
    copy of the slot decoded by test_decoding (which reads no publication), from that change
    on: the commit of the change's transaction, and of the one that made the publication
    again when that came later (what committed between could not be decoded either).
    Without test_decoding on the server, the slot passes everything up to now."""
    if host.undecodable is None:
        return
    slot, pub = host.slot, host.publication
    temporary = f"pglistener_skip_{os.getpid()}"
    gone, at = host.undecodable
    host.undecodable = None
    answer = yield Command(f"SELECT {WAL_POSITION}, (SELECT xmin::text FROM pg_publication "
                           f"WHERE pubname = '{pub}')".encode())
    if answer.error is not None:
        raise SetupError(f"reading the WAL position failed: {answer.error}")
    position, made = (_text(v) for v in answer.results[0][0])
    now = parse_lsn(position) if position else 0
    why = (f"a change at {format_lsn(at)} could not be decoded: publication {gone!r} did not "
           f"exist as of it (dropped, and made again later?)")
    answer = yield Command(f"SELECT pg_copy_logical_replication_slot('{slot}', '{temporary}', "
                           f"true, 'test_decoding')".encode())
    if answer.error is not None:
        yield from _advance(host, outcome, now,
                            f"{why}; everything up to {format_lsn(now)} is passed (the copy "
                            f"of the slot decoded by test_decoding, which finds where its "
                            f"transaction ends, could not be made: {answer.error})")
        return
    xid: str | None = None
    end: int | None = None
    made_end: int | None = None
    while xid is None or end is None or (made is not None and made_end is None):
        answer = yield Command(f"SELECT lsn::text, xid::text, data FROM "
                               f"pg_logical_slot_get_changes('{temporary}', "
                               f"'{format_lsn(now)}', 10000, 'include-xids', '1', "
                               f"'skip-empty-xacts', '0')".encode())
        if answer.error is not None:
            raise SetupError(f"decoding a copy of slot {slot!r} failed: {answer.error}")
        rows = answer.results[0] if answer.results else []
        for lsn, row_xid, data in ((_text(a), _text(b), _text(c)) for a, b, c in rows):
            if xid is None and lsn and parse_lsn(lsn) == at:
                xid = row_xid
            if data is not None and lsn and data.startswith("COMMIT "):
                if row_xid == xid and end is None:
                    end = parse_lsn(lsn)
                if row_xid == made and made_end is None:
                    made_end = parse_lsn(lsn)
        if not rows:        # decoded up to `now`: what was not found is not there
            if xid is None:
                why = (f"{why}; its transaction was not found, so everything up to "
                       f"{format_lsn(now)} is passed")
                target = now
            else:
                target = max(end or now, made_end or 0)
            break
    else:
        assert end is not None
        target = max(end, made_end or 0)
    answer = yield Command(f"SELECT pg_drop_replication_slot('{temporary}')".encode())
    if answer.error is not None:
        raise SetupError(f"dropping the temporary slot {temporary!r} failed: {answer.error}")
    yield from _advance(host, outcome, target, why)


def _advance(host: Host, outcome: Started, target: int,
             why: str) -> Generator[Command, Answer, None]:
    answer = yield Command(f"SELECT pg_replication_slot_advance('{host.slot}', "
                           f"'{format_lsn(target)}')".encode())
    if answer.error is not None:
        raise SetupError(f"moving slot {host.slot!r} past what could not be decoded failed: "
                         f"{answer.error}")
    if outcome.loss is None:
        outcome.loss = f"{why}; the slot goes on from {format_lsn(target)}"
    host.slot_confirmed = max(host.slot_confirmed, target)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()
