# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled core, readers' side: the items a reader sees (`Notification`, `Gap`), the
reading end of a ring (`RingReader`), and the stream core every way of reading is built on
(`Stream`, `BlockingStream`, `AsyncStream`).

Imported by worker processes; it does not link libpq. The producer side is dispatch.pyx; the
two share only the ring's layout (_ring.h, drawn there) and never call each other.
"""

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from cpython.pythread cimport (
    NOWAIT_LOCK, PY_LOCK_ACQUIRED, PY_LOCK_INTR, PyThread_acquire_lock, PyThread_allocate_lock,
    PyThread_free_lock, PyThread_release_lock, PyThread_type_lock,
)
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, strerror
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.stat cimport fstat, struct_stat
from posix.unistd cimport close, read, write

from pglistener._core._pgoutput cimport *
from pglistener._core._poll cimport (
    PGL_POLLRDHUP, POLLERR, POLLHUP, POLLIN, POLLNVAL, now_ns as _now_ns, poll, pollfd,
)
from pglistener._core._ring cimport *

import os as _os

from pglistener.errors import PGListenerError, SubscriptionClosed, SupervisorGone


cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    const int MSG_DONTWAIT
    const int MSG_NOSIGNAL


cdef extern from "_awaitable.h":
    int pgl_ready_init() except -1
    object pgl_ready_new(object value)


if pgl_ready_init() < 0:
    raise ImportError("pglistener._core.reader: cannot set up its awaitable type")


cdef extern from "pythread.h":
    # Not in Cython's cpython/pythread.pxd; public C API since Python 3.2.
    ctypedef long long PY_TIMEOUT_T
    int PyThread_acquire_lock_timed(PyThread_type_lock lock, PY_TIMEOUT_T microseconds,
                                    int intr_flag) nogil


cdef extern from "Python.h":
    # The two slots a Python subclass of a stream is given (compiled_iteration).
    ctypedef struct _AsyncSlots "PyAsyncMethods":
        void *am_anext
    ctypedef struct _TypeSlots "PyTypeObject":
        void *tp_iternext
        _AsyncSlots *tp_as_async
    void PyType_Modified(_TypeSlots *t)


cpdef enum WaitStatus:
    WAIT_READY = 0         # data may be there (a wake-up can be spurious: read and loop)
    WAIT_TIMEOUT = 1
    WAIT_PEER_GONE = 2     # the supervisor's end of the control socket is closed
    WAIT_INTERRUPTED = 3
    WAIT_FAILED = 4        # poll() itself failed (errno in the reader's wait_errno)


_GAP_REASONS = {PGL_GAP_RECONNECT: "reconnect", PGL_GAP_OVERFLOW: "overflow",
                PGL_GAP_RESTART: "restart", PGL_GAP_SLOT: "slot"}

MIN_CAPACITY = PGL_MIN_CAPACITY
MAX_CAPACITY = PGL_MAX_CAPACITY
HEADER_BYTES = PGL_HEADER_BYTES


# ----------------------------------------------------------------------------------------------
# Items a reader sees


@cython.freelist(256)
@cython.final
# Neither item type can be part of a reference cycle (they hold only str, int and None): no
# cyclic GC for them, and a freelist, since a reader makes one per item and drops it soon.
@cython.no_gc
@cython.freelist(64)
cdef class Notification:
    """One notification: `channel`, `payload` (both str) and the sender's backend `pid`.

    From the WAL source (a logical decoding message read from the slot), `lsn` is the
    message's own LSN (what emit() returned: the end of its WAL record) and `commit_lsn` its
    transaction's commit LSN (lsn - 1 when it was not transactional: it is sent as soon as
    it is decoded, before whatever commits next); `pid` is 0, the sender being unknown. Both
    are None for NOTIFY. The content is bytes: `payload` decodes it as UTF-8 with
    "surrogateescape", so `data` gives back exactly the bytes that were written, whatever
    they are. `position` is the pair
    (commit_lsn, lsn): it grows along the stream (`lsn` alone does not, with transactions
    that overlap), and `subscribe(..., after=)` takes it to resume exactly after this message.
    """

    cdef readonly str channel
    cdef readonly str payload
    cdef readonly int pid
    cdef readonly object lsn
    cdef readonly object commit_lsn
    cdef readonly object key        # a WAL message's key (emit(key=)), else None

    def __init__(self, str channel, str payload, int pid, lsn=None, commit_lsn=None,
                 key=None):
        self.channel = channel
        self.payload = payload
        self.pid = pid
        if (lsn is None) != (commit_lsn is None):
            raise ValueError("a WAL message has both lsn and commit_lsn; a notification neither")
        self.lsn = lsn
        self.commit_lsn = commit_lsn
        self.key = key

    @property
    def data(self):
        """The payload as bytes, exactly as they were sent."""
        return self.payload.encode("utf-8", "surrogateescape")

    @property
    def position(self):
        """(commit_lsn, lsn) of a WAL message, where it stands in the stream; None for
        NOTIFY."""
        return None if self.lsn is None else (self.commit_lsn, self.lsn)

    def __repr__(self):
        if self.lsn is None:
            return (f"Notification(channel={self.channel!r}, payload={self.payload!r}, "
                    f"pid={self.pid})")
        return (f"Notification(channel={self.channel!r}, payload={self.payload!r}, "
                f"lsn={format_lsn(self.lsn)}, commit_lsn={format_lsn(self.commit_lsn)})")

    def __eq__(self, other):
        if not isinstance(other, Notification):
            return NotImplemented
        cdef Notification o = <Notification>other
        return (self.channel == o.channel and self.payload == o.payload and self.pid == o.pid
                and self.lsn == o.lsn and self.commit_lsn == o.commit_lsn and self.key == o.key)

    def __hash__(self):
        return hash((self.channel, self.payload, self.pid, self.lsn))

    def __reduce__(self):
        return (Notification, (self.channel, self.payload, self.pid, self.lsn, self.commit_lsn,
                               self.key))


def format_lsn(lsn):
    """An LSN as PostgreSQL writes it: "16/B374D848"."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(str text):
    """An LSN from PostgreSQL's text form ("16/B374D848")."""
    hi, sep, lo = text.partition("/")
    if not sep:
        raise ValueError(f"an LSN looks like '16/B374D848', not {text!r}")
    return (int(hi, 16) << 32) | int(lo, 16)


@cython.final
@cython.no_gc
cdef class Gap:
    """The place in a stream where notifications may be missing.

    `reason` is one of:
    - "reconnect": the connection was lost; what was sent meanwhile is gone (`missed` None);
    - "overflow": this reader's ring was full; `missed` is the exact count (None only when a
      consumer group's dead member had items written over before they could be handed here);
    - "restart": the first item of a pool worker that was restarted; what was sent while no
      one read for it is gone (`missed` None);
    - "slot" (WAL source): the server dropped WAL the replication slot still needed, so the
      slot was made again; what was sent before is gone (`missed` None).
    """

    cdef readonly str reason
    cdef readonly object missed

    def __init__(self, str reason, missed=None):
        if reason not in _GAP_REASONS.values():
            raise ValueError(
                f"Gap reason must be 'reconnect', 'overflow', 'restart' or 'slot', not "
                f"{reason!r}")
        self.reason = reason
        self.missed = missed

    def __repr__(self):
        return f"Gap(reason={self.reason!r}, missed={self.missed!r})"

    def __eq__(self, other):
        if not isinstance(other, Gap):
            return NotImplemented
        cdef Gap o = <Gap>other
        return self.reason == o.reason and self.missed == o.missed

    def __hash__(self):
        return hash((self.reason, self.missed))

    def __reduce__(self):
        return (Gap, (self.reason, self.missed))


# ----------------------------------------------------------------------------------------------
# Row changes: the supervisor routes pgoutput's bytes; a reader decodes them when asked.


@cython.final
cdef class _Unchanged:
    """The value of a TOASTed column that an update did not change: pgoutput does not send
    it, so it is not known here (never mistake it for NULL)."""

    def __repr__(self):
        return "pglistener.UNCHANGED"

    def __reduce__(self):
        return "UNCHANGED"

    def __bool__(self):
        return False


UNCHANGED = _Unchanged()

_OPS = {b"I"[0]: "insert", b"U"[0]: "update", b"D"[0]: "delete", b"T"[0]: "truncate"}


@cython.final
cdef class Table:
    """A table as pgoutput described it (its Relation message): what the changes after it
    are decoded by. `name` is schema-qualified; `columns`, `type_oids` (a domain's column
    by its base type, as a SELECT names it) and `key` (True for each column of the replica
    identity) are in the table's order; `replica_identity` is
    "default", "nothing", "full" or "index"."""

    cdef readonly str name
    cdef readonly tuple columns
    cdef readonly tuple type_oids
    cdef readonly tuple key
    cdef readonly str replica_identity
    cdef readonly unsigned int relid
    cdef readonly bytes description    # the Relation message from its relid on
    cdef object _loader                # psycopg's Transformer for the columns' types
    cdef set _undecodable              # columns whose text did not load (said once)

    def __init__(self, bytes description not None):
        cdef pgl_relation r
        cdef pgl_columns cols
        cdef pgl_column c
        if pgl_relation_read(description, len(description), &r) < 0:
            raise ValueError("not a Relation message")
        self.description = description
        self._undecodable = set()
        self.relid = r.relid
        self.name = (PyUnicode_DecodeUTF8(r.nspname, r.nsplen, "surrogateescape") + "."
                     + PyUnicode_DecodeUTF8(r.relname, r.rellen, "surrogateescape"))
        self.replica_identity = {b"d"[0]: "default", b"n"[0]: "nothing", b"f"[0]: "full",
                                 b"i"[0]: "index"}.get(<unsigned char>r.identity,
                                                       chr(<unsigned char>r.identity))
        columns, oids, key = [], [], []
        cols = pgl_relation_columns(&r)
        while pgl_column_next(&cols, &c) == 1:
            key.append(bool(c.flags & 1))
            columns.append(PyUnicode_DecodeUTF8(c.name, c.name_len, "surrogateescape"))
            oids.append(c.type_oid)
        self.columns = tuple(columns)
        self.type_oids = tuple(oids)
        self.key = tuple(key)

    cdef object loader(self):
        if self._loader is None:
            from psycopg.adapt import Transformer
            from psycopg.pq import Format
            loader = Transformer()
            loader.set_loader_types(list(self.type_oids), Format.TEXT)
            self._loader = loader
        return self._loader

    def __repr__(self):
        return f"<Table {self.name} ({', '.join(self.columns)})>"

    def __reduce__(self):
        return (Table, (self.description,))


cdef list _tuple_data(const char *at, const char *end, int ncols):
    # pgoutput's TupleData at `at`: each column's text (bytes), None (NULL) or UNCHANGED.
    cdef pgl_tuple t
    cdef pgl_datum d
    cdef list texts = []
    cdef int rc
    if pgl_tuple_open(at, end, &t) < 0:
        raise ValueError("truncated tuple data")
    while True:
        rc = pgl_tuple_next(&t, &d)
        if rc == 0:
            break
        if rc < 0:
            if t.at < t.end and t.at[0] not in b"nutb":
                raise ValueError(f"unknown tuple data kind {<unsigned char>t.at[0]!r}")
            raise ValueError("truncated tuple data")
        if d.kind == b'n':
            texts.append(None)
        elif d.kind == b'u':
            texts.append(UNCHANGED)
        else:
            texts.append(PyBytes_FromStringAndSize(d.value, d.len))
    if t.count != ncols:
        raise ValueError(f"{t.count} columns where the table has {ncols}")
    return texts


cdef list _each(Table table, list texts):
    # Each column by its own loader, when the row's did not load: one that cannot load its
    # text (a timestamp 'infinity', a value its loader refuses) gives that text, as a str,
    # and is said in the log once per table and column; the others load as they would.
    from psycopg.pq import Format
    cdef object loader = table.loader()
    cdef list values = []
    cdef Py_ssize_t i
    for i in range(len(texts)):
        t = texts[i]
        if t is None or t is UNCHANGED:
            values.append(None)
            continue
        try:
            values.append(loader.get_loader(table.type_oids[i], Format.TEXT).load(t))
        except Exception as exc:
            text = t.decode("utf-8", "surrogateescape")
            values.append(text)
            if table.columns[i] not in table._undecodable:
                table._undecodable.add(table.columns[i])
                import logging
                logging.getLogger("pglistener").warning(
                    "column %s of %s (type oid %d) did not load from %r: %s: it comes as its "
                    "text (register a loader for the type on psycopg.adapters to change that)",
                    table.columns[i], table.name, table.type_oids[i], text[:80], exc)
    return values


cdef dict _row(Table table, list texts, bint key_only):
    # Column name -> Python value, by psycopg's loaders.
    cdef Py_ssize_t i, n = len(texts)
    cdef bint unchanged = UNCHANGED in texts
    cdef tuple columns = table.columns
    cdef dict out = {}
    try:
        values = table.loader().load_sequence(
            [None if t is UNCHANGED else t for t in texts] if unchanged else texts)
    except Exception:
        values = _each(table, texts)
    if not key_only and not unchanged:
        for i in range(n):
            out[columns[i]] = values[i]
        return out
    for i in range(n):
        if key_only and not table.key[i]:
            continue
        out[columns[i]] = UNCHANGED if texts[i] is UNCHANGED else values[i]
    return out


cdef dict _raw_row(Table table, list texts, bint key_only):
    cdef int i
    out = {}
    for i in range(len(texts)):
        if key_only and not table.key[i]:
            continue
        t = texts[i]
        out[table.columns[i]] = t.decode("utf-8", "surrogateescape") if type(t) is bytes else t
    return out


@cython.final
cdef class RawRows:
    """A change's columns as pgoutput sent them: `new` and `old`, each a mapping of column
    name to its text (str), None for NULL, UNCHANGED for an unchanged TOASTed value; None
    where the change has no such row."""

    cdef readonly object new
    cdef readonly object old

    def __repr__(self):
        return f"RawRows(new={self.new!r}, old={self.old!r})"


@cython.final
@cython.freelist(64)
cdef class Change:
    """One row change of a table in the slot's publication (subscribe_changes).

    `op`: "insert", "update", "delete" or "truncate". `table`: its schema-qualified name.
    `new`: the row after (insert, update), `old`: the replica identity's columns before
    (update, delete: the whole row under REPLICA IDENTITY FULL; for an update, only when the
    key changed or the identity is FULL), each a dict of column name to Python value (by
    psycopg's loaders for the column's type), or None where pgoutput sends none. A TOASTed
    column that an update did not change is pglistener.UNCHANGED. `raw` gives the columns'
    text as sent. Decoded when first asked for.

    `lsn` is where the change stands in its transaction (its WAL record's start; the rows of
    one multi-row insert count up from it), `commit_lsn` its transaction's commit LSN, `xid`
    its transaction's id; `position` (commit_lsn, lsn) grows along the stream, and
    subscribe_changes(..., after=change) resumes exactly after it.
    """

    cdef readonly str op
    cdef readonly object lsn
    cdef readonly object commit_lsn
    cdef readonly unsigned int xid
    cdef readonly Table relation       # the table as described when the change was made
    cdef readonly bytes message        # pgoutput's change message, as sent
    cdef object _new
    cdef object _old
    cdef RawRows _raw
    cdef bint _decoded
    cdef list _new_texts          # each column as sent, once parsed (raw is made from them)
    cdef list _old_texts
    cdef bint _key_only           # old holds the replica identity's columns only

    def __init__(self, Table relation not None, bytes message not None, lsn, commit_lsn,
                 unsigned int xid=0):
        if not message or message[0] not in _OPS:
            raise ValueError("not a pgoutput change message (I, U, D or T)")
        self.relation = relation
        self.message = message
        self.op = _OPS[message[0]]
        self.lsn = lsn
        self.commit_lsn = commit_lsn
        self.xid = xid

    @property
    def table(self):
        return self.relation.name

    @property
    def position(self):
        """(commit_lsn, lsn): where this change stands in the stream."""
        return (self.commit_lsn, self.lsn)

    @property
    def new(self):
        self._decode()
        return self._new

    @property
    def old(self):
        self._decode()
        return self._old

    @property
    def raw(self):
        cdef RawRows raw
        self._decode()
        if self._raw is None:
            raw = RawRows.__new__(RawRows)
            if self._new_texts is not None:
                raw.new = _raw_row(self.relation, self._new_texts, False)
            if self._old_texts is not None:
                raw.old = _raw_row(self.relation, self._old_texts, self._key_only)
            self._raw = raw
        return self._raw

    cdef int _decode(self) except -1:
        cdef bytes m = self.message
        cdef pgl_change change
        cdef int ncols = len(self.relation.columns)
        if self._decoded:
            return 0
        if self.op != "truncate":
            if pgl_change_read(m, len(m), &change) < 0:
                raise ValueError("truncated change message")
            if change.old != NULL:
                self._key_only = change.old_kind == b'K'
                self._old_texts = _tuple_data(change.old, change.end, ncols)
            if change.new_ != NULL:
                self._new_texts = _tuple_data(change.new_, change.end, ncols)
        if self._new_texts is not None:
            self._new = _row(self.relation, self._new_texts, False)
        if self._old_texts is not None:
            self._old = _row(self.relation, self._old_texts, self._key_only)
        self._decoded = True
        return 0

    def __repr__(self):
        return (f"Change(op={self.op!r}, table={self.table!r}, lsn={format_lsn(self.lsn)}, "
                f"commit_lsn={format_lsn(self.commit_lsn)})")

    def __eq__(self, other):
        if not isinstance(other, Change):
            return NotImplemented
        cdef Change o = <Change>other
        return (self.message == o.message and self.lsn == o.lsn
                and self.commit_lsn == o.commit_lsn
                and self.relation.description == o.relation.description)

    def __hash__(self):
        return hash((self.message, self.lsn, self.commit_lsn))

    def __reduce__(self):
        return (Change, (self.relation, self.message, self.lsn, self.commit_lsn, self.xid))


# ----------------------------------------------------------------------------------------------
# The reading end of a ring: lives in a worker process, one per subscription.


cdef enum:
    PUBLISH_BYTES = 2048        # as the producer publishes its tail (dispatch.pyx)


@cython.final
cdef class RingReader:
    """The reading end of one subscription's ring: records in, items out, nothing else (the
    Stream around it adds threads, closing and the supervisor)."""

    cdef pgl_ring_header *hdr
    cdef unsigned char *data
    cdef uint64_t cap
    cdef uint64_t mask
    cdef uint64_t head
    cdef uint64_t published       # what hdr.head says: published every PUBLISH_BYTES
    cdef uint64_t tail_cache
    cdef size_t map_bytes
    cdef int efd
    cdef int ctrl_fd
    cdef int wake_fd              # the supervisor's wake eventfd, ours to close (-1: none)
    cdef str last_channel         # channels repeat: decode each name once
    cdef char last_raw[64]
    cdef uint16_t last_len
    cdef readonly int wait_errno      # what made poll() fail, with WAIT_FAILED
    cdef dict tables              # relation version -> Table (row changes)
    cdef uint32_t last_version
    cdef Table last_table
    cdef uint64_t spin_ns         # how long _wait() spins now: adapts (see there)

    def __cinit__(self, int memfd, int efd, int ctrl_fd, int wake_fd=-1):
        """Map the ring in memfd (the descriptor stays the caller's). efd: the eventfd the
        producer wakes us with; ctrl_fd: the control socket, watched for the supervisor's
        hang-up; wake_fd: the eventfd we wake the producer with, which this reader takes
        and closes once it is made."""
        cdef struct_stat st
        self.wake_fd = -1
        if fstat(memfd, &st) != 0:
            raise OSError(errno, "fstat of a ring failed")
        if st.st_size < PGL_HEADER_BYTES + MIN_CAPACITY:
            raise ValueError("not a pglistener ring: too small")
        cdef void *mem = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0)
        if mem == MAP_FAILED:
            raise OSError(errno, "mmap of a ring failed")
        self.hdr = <pgl_ring_header *>mem
        self.map_bytes = st.st_size
        if (pgl_load_u32(&self.hdr.magic) != PGL_RING_MAGIC
                or self.hdr.version != PGL_RING_VERSION
                or self.hdr.capacity + PGL_HEADER_BYTES != <uint64_t>st.st_size
                or self.hdr.capacity & (self.hdr.capacity - 1)):
            munmap(mem, self.map_bytes)
            self.hdr = NULL
            raise ValueError("not a pglistener ring (bad magic, version or size)")
        self.data = <unsigned char *>mem + PGL_HEADER_BYTES
        self.cap = self.hdr.capacity
        self.mask = self.cap - 1
        self.head = self.published = pgl_load_acquire(&self.hdr.head)
        self.tail_cache = self.head
        self.efd = efd
        self.ctrl_fd = ctrl_fd
        self.wake_fd = wake_fd
        self.last_len = 0xffff
        self.spin_ns = <uint64_t>_spin_us * 1000ULL

    def __dealloc__(self):
        self._unmap()

    def close(self):
        """Unmap the ring. The caller guarantees no other thread is inside this reader."""
        self._unmap()

    cdef void _unmap(self) noexcept:
        if self.hdr != NULL:
            munmap(self.hdr, self.map_bytes)
            self.hdr = NULL
        if self.wake_fd >= 0:
            close(self.wake_fd)
            self.wake_fd = -1

    cdef inline void _publish_some(self) noexcept nogil:
        # Within a batch, head goes back to the producer every PUBLISH_BYTES, not per item:
        # each publication is a full fence, and moves head's cache line to the producer's
        # core. The batch's end publishes the rest (_publish).
        if self.head - self.published >= PUBLISH_BYTES:
            self._publish()

    cdef inline void _publish(self) noexcept nogil:
        # Hand the bytes consumed so far back to the producer, and wake it if it waits for
        # room (see _ring.h; the fence orders our head store before the flag's load).
        cdef uint64_t one = 1
        self.published = self.head
        pgl_store_release(&self.hdr.head, self.head)
        pgl_full_fence()
        if (pgl_load_u32(&self.hdr.producer_waiting)
                and pgl_exchange_u32(&self.hdr.producer_waiting, 0) and self.wake_fd >= 0):
            write(self.wake_fd, &one, 8)

    @property
    def capacity(self):
        return self.cap

    cdef inline void _mark_consumed(self) noexcept nogil:
        # Every item taken so far was handed out and the next is asked for: the producer may
        # count them consumed (see _ring.h).
        pgl_store_release(&self.hdr.consumed, self.head)

    def mark_consumed(self):
        """Say that every item taken so far is done with (the streams do this when asked
        for the next item with none held)."""
        self._check_open()
        self._mark_consumed()

    cdef inline bint _available(self) noexcept nogil:
        if self.head != self.tail_cache:
            return True
        self.tail_cache = pgl_load_acquire(&self.hdr.tail)
        return self.head != self.tail_cache

    cdef object _take(self):
        # The next item, or None when the ring is empty. Does not publish head.
        cdef unsigned char *rec
        cdef uint32_t length
        cdef uint16_t kind, clen
        cdef uint32_t plen, body
        cdef uint64_t missed
        cdef Notification note
        cdef Gap gap
        cdef Change change
        cdef const char *sep
        cdef uint16_t klen, clen_name
        while self._available():
            rec = pgl_rec_at(self.data, self.mask, self.head, self.tail_cache, &length)
            if rec == NULL:
                raise PGListenerError(f"corrupt ring record (length {length})")
            kind = pgl_rec_type(rec)
            if kind == PGL_REC_NOTIFY or kind == PGL_REC_WAL:
                # The same fields; a WAL message's header is longer, with its positions.
                body = PGL_RECORD_HEADER if kind == PGL_REC_NOTIFY else PGL_WAL_HEADER
                clen = pgl_rec_channel_len(rec)
                plen = pgl_rec_payload_len(rec)
                if body + clen + plen > length:
                    raise PGListenerError(f"corrupt ring record (length {length})")
                if kind == PGL_REC_WAL and pgl_rec_flags(rec) & PGL_WAL_CHANGE:
                    change = self._change(<const char *>rec + body + clen, plen)
                    change.lsn = pgl_rec_lsn(rec)
                    change.commit_lsn = pgl_rec_commit(rec)
                    self.head += length
                    return change
                note = Notification.__new__(Notification)
                sep = NULL
                if kind == PGL_REC_WAL:
                    sep = pgl_channel_sep(<const char *>rec + body, clen)
                if sep != NULL:         # a keyed message: "channel\x1fkey"
                    klen = <uint16_t>(sep - (<const char *>rec + body))
                    note.key = PyUnicode_DecodeUTF8(sep + 1, clen - klen - 1,
                                                    "surrogateescape")
                    clen_name = klen
                else:
                    clen_name = clen
                note.channel = self._channel(<const char *>rec + body, clen_name)
                note.payload = PyUnicode_DecodeUTF8(<const char *>rec + body + clen, plen,
                                                    "surrogateescape")
                if kind == PGL_REC_NOTIFY:
                    note.pid = pgl_rec_pid(rec)
                else:
                    note.pid = 0
                    note.lsn = pgl_rec_lsn(rec)
                    note.commit_lsn = pgl_rec_commit(rec)
                self.head += length
                return note
            if kind == PGL_REC_GAP:
                missed = pgl_rec_missed(rec)
                gap = Gap.__new__(Gap)
                gap.reason = _GAP_REASONS[pgl_rec_gap_reason(rec)]
                gap.missed = None if missed == PGL_MISSED_UNKNOWN else missed
                self.head += length
                return gap
            self.head += length    # padding
        return None

    cdef Change _change(self, const char *content, uint32_t n):
        # A row change's record content (_pgoutput.h's prefix): its table (decoded once per
        # Relation message) and its message, decoded when asked for.
        cdef pgl_change_prefix prefix
        cdef const char *message
        cdef Change change
        if pgl_change_prefix_read(content, n, &prefix) < 0:
            raise PGListenerError("corrupt row change record")
        message = content + PGL_CHANGE_PREFIX + prefix.rlen
        if self.last_table is None or prefix.version != self.last_version:
            if self.tables is None:
                self.tables = {}
            table = self.tables.get(prefix.version)
            if table is None:
                table = Table(PyBytes_FromStringAndSize(content + PGL_CHANGE_PREFIX,
                                                        prefix.rlen))
                if len(self.tables) >= 1024:
                    self.tables.clear()
                self.tables[prefix.version] = table
            self.last_table = <Table>table
            self.last_version = prefix.version
        change = Change.__new__(Change)
        change.relation = self.last_table
        change.message = PyBytes_FromStringAndSize(message, content + n - message)
        change.op = _OPS[<unsigned char>message[0]]
        change.xid = prefix.xid
        return change

    cdef str _channel(self, const char *raw, uint16_t clen):
        if clen > sizeof(self.last_raw):     # no route has such a name: not cached
            return PyUnicode_DecodeUTF8(raw, clen, "surrogateescape")
        if clen != self.last_len or memcmp(raw, self.last_raw, clen) != 0:
            self.last_channel = PyUnicode_DecodeUTF8(raw, clen, "surrogateescape")
            memcpy(self.last_raw, raw, clen)
            self.last_len = clen
        return self.last_channel

    cdef inline int _check_open(self) except -1:
        if self.hdr == NULL:
            raise ValueError("this ring is closed")
        return 0

    def get_nowait(self):
        """The next Notification or Gap, or None when the ring is empty."""
        self._check_open()
        item = self._take()
        self._publish()
        return item

    def get_many(self, Py_ssize_t max_items):
        """Up to max_items items in order (an empty list when the ring is empty)."""
        cdef list out = []
        cdef object item
        self._check_open()
        while len(out) < max_items:
            item = self._take()
            if item is None:
                break
            out.append(item)
        self._publish()
        return out

    def discard(self, Py_ssize_t max_items):
        """Consume up to max_items records without building objects: (notifications, missed
        counted by gaps). For measuring the supervisor's own dispatch rate."""
        cdef Py_ssize_t n = 0
        cdef uint64_t missed = 0, m
        cdef unsigned char *rec
        cdef uint16_t kind
        cdef uint32_t length
        cdef bint corrupt = False
        self._check_open()
        with nogil:
            while n < max_items and self._available():
                rec = pgl_rec_at(self.data, self.mask, self.head, self.tail_cache, &length)
                if rec == NULL:
                    corrupt = True
                    break
                kind = pgl_rec_type(rec)
                if kind == PGL_REC_NOTIFY or kind == PGL_REC_WAL:
                    n += 1
                elif kind == PGL_REC_GAP:
                    m = pgl_rec_missed(rec)
                    if m != PGL_MISSED_UNKNOWN:
                        missed += m
                self.head += length
            self._publish()
        if corrupt:
            raise PGListenerError(f"corrupt ring record (length {length})")
        return n, missed

    def prepare_sleep(self):
        """For an event loop that watches the eventfd itself: ask to be woken. False when
        data is already there (then do not sleep); after True, sleep until the eventfd is
        readable, then call end_sleep()."""
        self._check_open()
        return self._announce_sleep()

    cdef bint _announce_sleep(self) noexcept nogil:
        # Raise the sleeping flag unless data is there; True when the flag stays up.
        if self._available():
            return False
        pgl_store_u32(&self.hdr.sleeping, 1)
        pgl_full_fence()    # our `sleeping` store before the load of tail (see _ring.h)
        if self._available():
            pgl_store_u32(&self.hdr.sleeping, 0)
            return False
        return True

    def end_sleep(self):
        """Awake again: stop asking for wake-ups, and reset the eventfd's counter."""
        cdef uint64_t buf
        if self.hdr != NULL:        # closed: the eventfd may be closed too
            pgl_store_u32(&self.hdr.sleeping, 0)
            read(self.efd, &buf, 8)     # non-blocking: nothing to reset is fine

    def wait(self, int timeout_ms, int spin_us=0):
        """Block until the ring may have data, the timeout passes, or the supervisor is gone.
        Returns a WAIT_* code; timeout_ms < 0 waits without limit."""
        cdef int status
        self._check_open()
        with nogil:
            status = self._wait(timeout_ms, spin_us)
        return status

    cdef int _wait(self, int timeout_ms, int spin_us) noexcept nogil:
        # Spin up to spin_ns, then sleep on the eventfd. A spin that finds nothing costs its
        # whole length and the sleep after it: where records come further apart than the
        # spin, each spin halves the next (down to none); a sleep woken within spin_us
        # (a longer spin would have caught it) doubles it again, up to spin_us.
        cdef pollfd fds[2]
        cdef uint64_t buf
        cdef uint64_t spin_end, slept_at, most = <uint64_t>spin_us * 1000ULL
        cdef int rc
        if self._available():
            return WAIT_READY
        if self.spin_ns > most:
            self.spin_ns = most
        if self.spin_ns > 0:
            spin_end = _now_ns() + self.spin_ns
            while _now_ns() < spin_end:
                for _ in range(64):
                    pgl_cpu_relax()
                if self._available():
                    return WAIT_READY
            self.spin_ns //= 2
        if not self._announce_sleep():
            return WAIT_READY
        fds[0].fd = self.efd
        fds[0].events = POLLIN
        fds[0].revents = 0
        fds[1].fd = self.ctrl_fd
        fds[1].events = PGL_POLLRDHUP
        fds[1].revents = 0
        slept_at = _now_ns() if most > 0 else 0
        rc = poll(fds, 2, timeout_ms)
        pgl_store_u32(&self.hdr.sleeping, 0)
        if most > 0 and rc > 0 and _now_ns() - slept_at < most:
            self.spin_ns = most if self.spin_ns * 2 > most else (
                self.spin_ns * 2 if self.spin_ns > 0 else 1000)
        if fds[0].revents & POLLIN:
            read(self.efd, &buf, 8)     # reset the counter; the eventfd is non-blocking
        if rc < 0:
            if errno == EINTR:
                return WAIT_INTERRUPTED
            # Not the supervisor's doing (ENOMEM, EINVAL...): say so, do not end the stream.
            self.wait_errno = errno
            return WAIT_FAILED
        if fds[1].revents & (PGL_POLLRDHUP | POLLHUP | POLLERR | POLLNVAL):
            return WAIT_PEER_GONE
        if rc == 0:
            return WAIT_TIMEOUT
        return WAIT_READY


# ----------------------------------------------------------------------------------------------
# The stream core: what every subscription (sync, JSON, asyncio) is built on. It owns the ring
# mapping and the eventfd, knows whether it is closed and which process it belongs to, takes
# items off the ring, and tells the supervisor when it is dropped. The Python classes on top
# differ only in how they wait.

#: How long a blocking reader polls its ring at most before it sleeps on the eventfd
#: (microseconds): a notification that comes within this window skips the wake-up syscall
#: pair. Measured side by side (latency and live scenarios; 0, 20, 50 and 100 us): no longer
#: spin beat 20 us beyond the machine's noise. Each reader's spin adapts below it (_wait):
#: where records come further apart, a spin is only cost (wal-tx: 20 us spun in vain before
#: most of the reader's 26k sleeps per 100k messages).
cdef int _spin_us = 20

#: How many items a stream takes off its ring at once, to hand out without the lock.
cdef enum:
    _BATCH = 128

# What a stream's takes return when nothing is there (None is a JSON value); EMPTY to Python.
cdef object _empty = object()
EMPTY = _empty

# Bumped in a fork child: a stream made before the fork belongs to the parent.
cdef unsigned long _fork_generation = 0
# Set in a pool worker asked to stop: reading ends after the item in hand.
cdef bint _stopping = False


def _forked() -> None:
    global _fork_generation
    _fork_generation += 1


_os.register_at_fork(after_in_child=_forked)


def request_stop():
    """From now on every stream of this process ends after the item in hand: iteration stops
    and get() raises SubscriptionClosed. Streams blocked in a wait must be woken (wake())."""
    global _stopping
    _stopping = True


@cython.no_gc_clear     # __dealloc__ needs `control` to tell the supervisor
cdef class Stream:
    """One subscription's ordered stream of Notification and Gap items: the part every way of
    reading shares. Thread-safe: the ring is read under a lock that each reader takes with its
    own timeout, so two threads get distinct items in order.

    A stream that is dropped without being closed is released all the same: its descriptors
    are closed and the supervisor is told (without waiting for it), whichever way the last
    reference goes (garbage collection, a loop left by break, a cancelled task)."""

    cdef RingReader _reader
    cdef PyThread_type_lock lock
    cdef int efd                   # ours: closed with the stream
    cdef int ctrl_fd               # the control socket's fd, owned by `control`
    cdef unsigned long generation
    cdef bint peer_gone
    cdef readonly bint closed
    cdef readonly long long sub_id
    cdef readonly tuple channels   # in the order given
    cdef readonly str channel      # the channels joined by ", " (for messages and logs)
    cdef object control            # keeps the control socket (and so ctrl_fd) open
    cdef bytes release_msg         # the unsubscribe record sent when dropped
    cdef object decode             # None, or payload -> value (JSON)
    cdef object on_undecodable     # called with a Notification that decode refused
    cdef bint with_channel         # decoded values go out as (channel, value) pairs
    cdef list held                 # items taken off the ring and not handed out yet, in order
    cdef Py_ssize_t held_pos       # the next of them to hand out
    cdef uint64_t held_ends[_BATCH]    # the ring position after each held item
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        self.efd = -1
        self.closed = True         # until __init__ has everything
        self.held = []
        self.lock = PyThread_allocate_lock()
        if self.lock == NULL:
            raise MemoryError()

    def __init__(self, RingReader reader not None, int efd, object control, long long sub_id,
                 tuple channels not None, bytes release_msg not None, decode=None,
                 on_undecodable=None):
        """Takes ownership of efd. `control` has `sock` (the control socket, whose hang-up
        means the supervisor is gone), `gone`, `request()` and `post(bytes)` (send when it
        can)."""
        if self.efd >= 0 or self._reader is not None:
            raise RuntimeError("a Stream is initialised once")
        self.channels = channels
        self.channel = ", ".join(channels)
        self.efd = efd
        self._reader = reader
        self.ctrl_fd = reader.ctrl_fd
        self.control = control
        self.sub_id = sub_id
        self.release_msg = release_msg
        self.decode = decode
        self.on_undecodable = on_undecodable
        # Decoded values from several channels would not say which one sent them.
        self.with_channel = decode is not None and len(channels) > 1
        self.generation = _fork_generation
        self.closed = False

    def __dealloc__(self):
        if not self.closed:
            self._close_here()
            if self.generation == _fork_generation:
                self._post_release_c()
        elif self.efd >= 0:
            close(self.efd)
        if self.lock != NULL:
            PyThread_free_lock(self.lock)

    def __repr__(self):
        return f"<{type(self).__name__} {self.channel!r} {'closed' if self.closed else 'open'}>"

    def __reduce__(self):
        raise TypeError(
            f"a {type(self).__name__} belongs to the process that made it and cannot be "
            f"pickled: pass the Worker to the other process and subscribe there")

    # -- state ------------------------------------------------------------------------------

    @property
    def ring(self):
        """The RingReader under this stream (for tools that read raw records)."""
        return self._reader

    @property
    def _control(self):
        """The process's control connection this stream came through."""
        return self.control

    cdef inline int _usable(self, bint iterating) except -1:
        # 1 when reading may go on; 0 (iterating) or SubscriptionClosed when it is over.
        if self.closed or _stopping:
            if iterating:
                return 0
            if self.closed:
                raise SubscriptionClosed(f"the subscription {self._name()} was closed")
            raise SubscriptionClosed("this worker process is stopping")
        if self.generation != _fork_generation:
            raise RuntimeError(
                "a subscription belongs to the process that made it: subscribe again in the "
                "child (pass the Worker, not the Subscription)")
        return 1

    cdef str _name(self):
        return repr(self.channel)

    cdef int _check_gone(self) except -1:
        # The ring is empty: if the supervisor is gone too, nothing more will come.
        if not self.peer_gone and self.control.gone:
            self.peer_gone = True
        if self.peer_gone:
            self.control.gone = True
            raise SupervisorGone("the supervisor process is gone")
        return 0

    # -- taking items -----------------------------------------------------------------------

    cdef object _next_item(self):
        # The next item to hand out, or _empty when the ring is empty: decodes, skips payloads
        # that do not decode, and publishes the consumed bytes. The caller holds the lock.
        cdef object item, value
        while True:
            item = self._reader._take()
            if item is None:
                self._reader._publish()
                return _empty
            if self.decode is not None and type(item) is Notification:
                try:
                    value = self.decode((<Notification>item).payload)
                except (ValueError, RecursionError):
                    self._reader._publish()
                    self.on_undecodable(item)
                    continue
                item = ((<Notification>item).channel, value) if self.with_channel else value
            self._reader._publish_some()
            return item

    cdef inline object _pop_held(self):
        # The next held item, or _empty. Needs no lock: nothing between the look and the step
        # can let another thread run (no Python code, no allocation), so under the GIL each
        # held item goes to one reader, in order.
        cdef object item
        if self.held_pos < len(self.held):
            item = self.held[self.held_pos]
            self.held_pos += 1
            return item
        return _empty

    cdef object _take_locked(self):
        # With the lock: the next held item (another thread may have refilled while this one
        # waited for the lock), else the first of a refill; _empty when the ring is empty.
        cdef object item = self._pop_held()
        return self._refill() if item is _empty else item

    cdef object _refill(self):
        # With the lock, once every held item is out: take up to _BATCH items off the ring in
        # one pass (their bytes go back to the producer as they are taken), keep them, and
        # hand out the first; _empty when the ring is empty.
        cdef list batch = []
        self._reader._mark_consumed()      # what was handed out is done with: more is asked
        self._ring_into(batch, _BATCH, self.held_ends)
        self.held = batch
        if not batch:
            return _empty
        self.held_pos = 1
        return batch[0]

    cdef int _acquire(self, uint64_t deadline) except -1:
        # Take the read lock, waiting at most until deadline (0: no limit); TimeoutError.
        cdef int got
        cdef uint64_t now
        cdef PY_TIMEOUT_T us
        if PyThread_acquire_lock(self.lock, NOWAIT_LOCK):
            return 0
        while True:
            us = -1
            if deadline:
                now = _now_ns()
                us = <PY_TIMEOUT_T>((deadline - now) // 1000) if deadline > now else 0
            with nogil:
                got = PyThread_acquire_lock_timed(self.lock, us, 1)
            if got == PY_LOCK_ACQUIRED:
                return 0
            if got == PY_LOCK_INTR:
                PyErr_CheckSignals()
                continue
            raise TimeoutError(f"nothing on {self._name()}: another thread is reading it")

    cdef object _get(self, double timeout, bint iterating):
        # The next item, waiting up to timeout seconds (< 0: no limit). When iterating, _empty
        # once the stream is closed or the process stops instead of SubscriptionClosed.
        cdef uint64_t deadline = 0
        cdef uint64_t now
        cdef int status, wait_ms
        cdef object item
        if not self._usable(iterating):
            return _empty
        item = self._pop_held()
        if item is not _empty:
            return item
        if timeout >= 0:
            deadline = _now_ns() + <uint64_t>(timeout * 1e9) + 1
        self._acquire(deadline)
        try:
            while True:
                if not self._usable(iterating):
                    return _empty
                item = self._take_locked()
                if item is not _empty:
                    return item
                self._check_gone()
                wait_ms = -1
                if deadline:
                    now = _now_ns()
                    if now >= deadline:
                        raise TimeoutError(f"nothing on {self._name()} within {timeout:g} s")
                    wait_ms = <int>((deadline - now + 999999) // 1000000)
                with nogil:
                    status = self._reader._wait(wait_ms, _spin_us)
                if status == WAIT_PEER_GONE:
                    self.peer_gone = True
                elif status == WAIT_FAILED:
                    err = self._reader.wait_errno
                    raise OSError(err, f"waiting on {self._name()} failed: "
                                       f"{(<bytes>strerror(err)).decode()}")
                elif status == WAIT_INTERRUPTED:
                    # Run signal handlers without the lock: one may close this stream. Take it
                    # back uninterrupted, so that the `finally` below always holds it.
                    PyThread_release_lock(self.lock)
                    try:
                        PyErr_CheckSignals()
                    finally:
                        with nogil:
                            PyThread_acquire_lock(self.lock, 1)
        finally:
            PyThread_release_lock(self.lock)

    cdef list _get_many(self, Py_ssize_t max_items, double timeout, bint iterating):
        cdef list out = []
        cdef object item = self._get(timeout, iterating)
        if item is _empty:
            return out
        out.append(item)
        if self._usable(True):
            self._take_into(out, max_items)
        return out

    cdef int _take_into(self, list out, Py_ssize_t max_items) except -1:
        # Append what is held, then what is in the ring now, until `out` holds max_items;
        # nothing from the ring if another thread is reading (it takes them in order).
        cdef object item
        while len(out) < max_items:
            item = self._pop_held()
            if item is _empty:
                break
            out.append(item)
        if len(out) >= max_items or not PyThread_acquire_lock(self.lock, NOWAIT_LOCK):
            return 0
        try:
            self._ring_into(out, max_items)
        finally:
            PyThread_release_lock(self.lock)
        return 0

    cdef int _ring_into(self, list out, Py_ssize_t max_items,
                        uint64_t *ends=NULL) except -1:
        # With the lock: append items off the ring until `out` holds max_items or the ring
        # is empty; with `ends`, the ring position after each one at its index in `out`.
        cdef object item
        while len(out) < max_items:
            item = self._next_item()
            if item is _empty:
                return 0            # published, the ring being empty
            if ends != NULL:
                ends[len(out)] = self._reader.head
            out.append(item)
        self._reader._publish()     # the batch's rest
        return 0

    def _take_ready(self):
        """The next item if one is there, else EMPTY, without waiting (for event loops):
        raises SubscriptionClosed, or SupervisorGone once it is gone and the ring is empty."""
        self._usable(False)
        return self._take_now()

    cdef object _take_now(self):
        # _take_ready() once the stream was found usable.
        cdef object item = self._pop_held()
        if item is not _empty:
            return item
        if not PyThread_acquire_lock(self.lock, NOWAIT_LOCK):
            return _empty       # another thread reads: not ready for this one
        try:
            item = self._take_locked()
            if item is _empty:
                self._check_gone()
            return item
        finally:
            PyThread_release_lock(self.lock)

    def _take_many(self, Py_ssize_t max_items):
        """Up to max_items items that are there now, without waiting."""
        cdef list out = []
        self._usable(False)
        self._take_into(out, max_items)
        return out

    # -- waking and closing -----------------------------------------------------------------

    def _wake(self):
        """Wake whoever waits on this stream (they look again); nothing if it is closed."""
        cdef uint64_t one = 1
        if not self.closed and self.generation == _fork_generation:
            write(self.efd, &one, 8)

    def _prepare_sleep(self):
        """For an event loop watching the eventfd (fileno()): True when it should wait for it,
        False when data is there already. After True, call _end_sleep() once woken."""
        self._usable(False)
        return self._reader._announce_sleep()

    def _end_sleep(self):
        if not self.closed:
            self._reader.end_sleep()

    def fileno(self):
        """The eventfd that becomes readable when items may be there (for event loops)."""
        self._usable(False)
        return self.efd

    def _close(self):
        """Stop reading here: wakes blocked readers, waits for them to leave the ring, unmaps
        it and closes the eventfd. True for the one call that did it (the caller then tells
        the supervisor); safe from any thread, any number of times."""
        cdef uint64_t one = 1
        if self.closed:
            return False
        self.closed = True
        if self.generation == _fork_generation:
            write(self.efd, &one, 8)          # a reader blocked in _wait() wakes and leaves
        with nogil:
            PyThread_acquire_lock(self.lock, 1)
        try:
            self._close_here()
        finally:
            PyThread_release_lock(self.lock)
        return True

    cdef void _close_here(self) noexcept:
        # What was handed out is consumed; what was taken and never handed out is not: the
        # supervisor gives it to a consumer group's other members. Not from a fork child:
        # the ring is its parent's.
        if self.generation == _fork_generation and self._reader.hdr != NULL:
            pgl_store_release(&self._reader.hdr.consumed,
                              self.held_ends[self.held_pos - 1]
                              if self.held_pos < len(self.held) else self._reader.head)
        self.closed = True
        self.held = []
        self._reader._unmap()
        if self.efd >= 0:
            close(self.efd)
            self.efd = -1

    def _release(self, bint wait):
        """Close here (_close()) and tell the supervisor to drop the subscription: with wait,
        return once it has (up to 10 s, then as without); without, post it and return at once
        (usable from a signal handler or a task being cancelled). False if already closed."""
        if not self._close():
            return False
        if self.generation != _fork_generation:
            return True
        if wait and not self.control.gone:
            try:
                self.control.request({"op": "unsubscribe", "sub": self.sub_id}, 10.0)
                self.release_msg = None
            except SupervisorGone:
                self.release_msg = None
            except TimeoutError:
                pass
        self._post_release_c()
        return True

    cdef void _post_release_c(self) noexcept:
        cdef bytes msg = self.release_msg
        if msg is None:
            return
        self.release_msg = None
        if send(self.ctrl_fd, <const char *>msg, len(msg), MSG_DONTWAIT | MSG_NOSIGNAL) >= 0:
            return
        if errno == EAGAIN:
            try:
                self.control.post(msg)   # the control connection sends it with its next one
            except Exception:
                pass
        # any other error: the supervisor is gone, and with it the subscription


cdef class BlockingStream(Stream):
    """A Stream read by blocking: iteration, get(), get_many() and the callback thread's
    loop."""

    def __iter__(self):
        return self

    def __next__(self):
        """Blocking iteration: ends after unsubscribe() (or a pool's stop); raises
        SupervisorGone once the supervisor is gone and everything it delivered was read."""
        cdef object item = self._get(-1.0, True)
        if item is _empty:
            raise StopIteration
        return item

    def get(self, timeout=None):
        """The next Notification or Gap, in order. Blocks (without spinning a core) up to
        `timeout` seconds, then raises TimeoutError; raises SupervisorGone once the supervisor
        is gone and everything it delivered has been read, SubscriptionClosed after
        unsubscribe()."""
        return self._get(-1.0 if timeout is None else _timeout(timeout), False)

    def get_many(self, Py_ssize_t max_items=1024, timeout=None):
        """Up to max_items items in order: waits like get() for the first, then takes what is
        already there without waiting."""
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        return self._get_many(max_items, -1.0 if timeout is None else _timeout(timeout), False)

    def _deliver(self, callback, on_gap, on_error, Py_ssize_t batch=256):
        """The callback thread's loop: hands each item to callback (Gap items to on_gap) in
        order, batch by batch; an exception from either goes to on_error(item) (called inside
        the except block) and the loop goes on. Returns once the stream is closed or the
        process stops; raises SupervisorGone."""
        cdef list items
        cdef object item
        while True:
            items = self._get_many(batch, -1.0, True)
            if not items:
                return
            for item in items:
                if self.closed:
                    return
                try:
                    if type(item) is Gap:
                        on_gap(item)
                    else:
                        callback(item)
                except Exception:
                    on_error(item)


cdef class AsyncStream(Stream):
    """A Stream read from an event loop. Its __anext__ is compiled: when an item is in the
    ring it returns an awaitable that is already done (no coroutine, future or task); only an
    empty ring goes through the subclass's `_anext_wait()` coroutine."""

    def __aiter__(self):
        return self

    def __anext__(self):
        cdef object item
        if not self._usable(True):
            return self._anext_wait()           # closed or stopping: StopAsyncIteration
        item = self._take_now()
        if item is _empty:
            return self._anext_wait()
        return pgl_ready_new(item)


cdef double _timeout(object timeout) except -1.0:
    cdef double t = timeout
    if t != t:
        raise ValueError("timeout must be a number of seconds, not NaN")
    return t if t > 0 else 0.0


def compiled_iteration(type cls):
    """Class decorator: a Python subclass of BlockingStream or AsyncStream (Subscription,
    AsyncSubscription and theirs) iterates by the compiled __next__ / __anext__ directly.

    CPython gives a heap subclass the generic slot, which looks the method up on the type and
    calls it for every item, because Cython makes them methods rather than slot wrappers:
    about 10 ns of a `for` reader's CPU per notification (RESULTS.md). A subclass that
    defines its own (or a class between it and the stream) keeps its own."""
    if not (_inherit_slot(cls, BlockingStream, "__next__")
            or _inherit_slot(cls, AsyncStream, "__anext__")):
        raise TypeError(f"{cls.__name__} is neither a BlockingStream nor an AsyncStream")
    return cls


def _iterates_compiled(type cls):
    """Whether cls's iteration slot is the compiled stream's (for the tests)."""
    cdef _TypeSlots *t = <_TypeSlots *><void *>cls
    if issubclass(cls, BlockingStream):
        return t.tp_iternext == (<_TypeSlots *><void *>BlockingStream).tp_iternext
    if issubclass(cls, AsyncStream):
        return (t.tp_as_async.am_anext
                == (<_TypeSlots *><void *>AsyncStream).tp_as_async.am_anext)
    return False


cdef bint _inherit_slot(type cls, type base, str name) except -1:
    """cls takes base's compiled slot for `name` (__next__ or __anext__), unless a class
    between them defines its own; False when cls is no subclass of base."""
    cdef _TypeSlots *t = <_TypeSlots *><void *>cls
    cdef _TypeSlots *b = <_TypeSlots *><void *>base
    if not issubclass(cls, base):
        return False
    for klass in cls.__mro__:
        if klass is base:
            break
        if name in klass.__dict__:
            return True
    if name == "__next__":
        t.tp_iternext = b.tp_iternext
    else:
        t.tp_as_async.am_anext = b.tp_as_async.am_anext
    PyType_Modified(t)
    return True
