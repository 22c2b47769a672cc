# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The logical slot's source: the pgoutput stream's decoder, on the dispatch core
(dispatch.pyx).

drain() takes the replication stream's COPY BOTH data (PQgetCopyData) and decodes it:
keepalives (answered when asked), a transaction's Begin and Commit (where the stream stands,
and how far the slot may be confirmed), each logical decoding message, routed by its
prefix as a positioned record (its LSN, its transaction's commit LSN), and each row change
of the publication's tables (Insert, Update, Delete, Truncate), routed by table and kind as
the bytes pgoutput sent beside the table's Relation message: readers decode them (_ring.h
draws the record). It also writes the feedback that tells the server how far the slot may be
confirmed. feed() takes the same bytes from Python, without a connection (tests).
"""

from libc.stdint cimport UINT32_MAX, int64_t, uint16_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memchr, memcpy

from pglistener._core.dispatch cimport (Dispatcher, Notices, PGConnection, Position,
                                        Producer, on_notice)
from pglistener._core._libpq cimport (PGconn, PQflush, PQfreemem, PQgetCopyData,
                                PQputCopyData, PQsetNoticeReceiver)
from pglistener._core._poll cimport now_ns as _now_ns
from pglistener._core._pgoutput cimport *
from pglistener._core._ring cimport (PGL_GAP_SLOT, PGL_MISSED_UNKNOWN, PGL_WAL_CHANGE,
                               PGL_WAL_TRANSACTIONAL)


cdef extern from "_wire.h" nogil:
    uint64_t pgl_be64(const char *p)
    uint32_t pgl_be32(const char *p)
    void pgl_put_be64(char *p, uint64_t v)
    void pgl_put_be32(char *p, uint32_t v)
    int64_t pgl_pg_now_us()


cdef struct Relation:
    # What pgoutput last said of one table (its Relation message), for the changes after it.
    uint32_t relid             # 0: a free slot
    uint32_t version           # the dispatcher's count of Relation messages when it came
    char key[16]               # the route key of a change: "\0", the op letter, the oid
    uint16_t klen
    char *body                 # the message from its relid on (malloc)
    uint32_t blen
    unsigned char *key_cols    # per column, 1 when it is part of the replica identity
    uint16_t ncols


cdef enum:
    MAX_KEYED_CHANNEL = 1088   # a channel (63), \x1f and a key of at most 1024 bytes


cdef class WalDispatcher(Dispatcher):
    """The WAL source's routes and rings; run() drains its replication connection once it
    streams. A hold never expires: the slot keeps what waits."""

    cdef bint in_txn                   # between a transaction's Begin and its Commit
    cdef uint64_t txn_commit           # ... whose commit LSN (Begin says it first)
    cdef readonly uint64_t last_end    # end LSN of the last commit (or message) seen
    cdef readonly uint64_t server_end  # how far the server has decoded (its keepalives)
    cdef readonly uint64_t copy_messages   # what came on the stream: its signs of life
    cdef public uint64_t confirmed     # what feedback reports as flushed (Python decides)
    cdef Position held_wal             # the held message's position, channel and content
    cdef const char *held_chan
    cdef size_t held_clen
    cdef const char *held_payload
    cdef size_t held_plen
    cdef uint32_t txn_xid              # the transaction's xid (Begin)
    cdef uint64_t txn_last             # the last change's position in it (its `lsn`)
    # Tables: the Relation messages, by relid (open addressing, a power of two in size).
    cdef Relation *rels
    cdef size_t rels_size
    cdef size_t rels_used
    cdef uint32_t rel_versions
    # A domain's base type, by the domain's oid: (oid, base) pairs sorted by oid. pgoutput
    # names a column's declared type, a SELECT's result its base type, which psycopg loads.
    cdef uint32_t *bases
    cdef size_t n_bases
    # Tables with REPLICA IDENTITY FULL and a primary key: a keyed group routes their rows
    # by the primary key's columns, not by every column (whose values change). Per table,
    # by relid: its key columns' names, each NUL-terminated, one after another.
    cdef dict key_names
    cdef bint has_key_names
    # A change's record content is put together here (_ring.h: its prefix, the Relation and
    # the change message), and stays while it is held.
    cdef char *scratch
    cdef size_t scratch_size
    # A Truncate names several tables, one record each: while one is held, the next to route.
    cdef const char *trunc_body
    cdef uint32_t trunc_n
    cdef uint32_t trunc_next
    cdef readonly uint64_t changes     # row changes taken off the stream
    cdef Notices notices               # what the walsender said beside the stream
    cdef uint64_t skips_seen           # notices.skips that have their Gap

    def __cinit__(self, *args, **kwargs):
        self.hold_forever = True
        self.rels_size = 16
        self.rels = <Relation *>calloc(self.rels_size, sizeof(Relation))
        if self.rels == NULL:
            raise MemoryError()

    def __dealloc__(self):
        cdef size_t i
        if self.rels != NULL:
            for i in range(self.rels_size):
                free(self.rels[i].body)
                free(self.rels[i].key_cols)
            free(self.rels)
            self.rels = NULL
        free(self.scratch)
        self.scratch = NULL
        free(self.bases)
        self.bases = NULL

    # The replication stream is COPY BOTH data (docs: "Streaming Replication Protocol";
    # pg_recvlogical.c reads it the same way). From the server, big-endian:
    #   'w' XLogData:  [1] start LSN  [9] end LSN  [17] send time  [25] one pgoutput message
    #   'k' keepalive: [1] end LSN  [9] send time  [17] reply requested (1 byte)
    # pgoutput messages (proto.c, protocol version 1), read here:
    #   'B' begin:   [1] commit LSN  [9] commit time  [17] xid
    #   'C' commit:  [1] flags  [2] commit LSN  [10] end LSN  [18] commit time
    #   'M' message: [1] flags (1: transactional)  [2] LSN  [10] prefix, NUL-terminated,
    #                then a 4-byte length and the content
    # and by the codec both sides share (_core/_pgoutput.h, where they are drawn): 'R'
    # relation, 'I' insert, 'U' update, 'D' delete, 'T' truncate.
    # A change's LSN (the XLogData's start) is its WAL record's start: the rows of one
    # multi-row insert share it, so a change stands at max(its LSN, the one before + 1).
    # A transactional message is sent with its transaction, at commit, in commit order; one
    # that is not is sent alone, as soon as it is decoded.

    cdef int drain(self, PGconn *conn, bint streaming) noexcept nogil:
        # Route what the stream holds now; -1 when it failed or ended (then reconnect).
        cdef char *buf
        cdef int n, rc
        if not streaming:
            return 0            # the replication commands' results come first (run())
        while True:
            if not self._offer_held():
                return 0
            n = PQgetCopyData(conn, &buf, 1)
            if self.notices.skips != self.skips_seen:
                # Said before what comes next: pgoutput skipped a change (its publication
                # did not exist as of it), so every stream gets its Gap here.
                self.skips_seen = self.notices.skips
                self._gap_everywhere()
            if n == 0:
                return 0
            if n < 0:
                return -1           # -1: the server ended the stream; -2: an error
            self.copy_messages += 1
            rc = self._wal_message(conn, buf, n)
            if rc == 1:
                self.hold(buf)      # nothing more off the stream until it fits
                return 0
            PQfreemem(buf)
            if rc < 0:
                return -1

    cdef uint64_t record_key(self, const unsigned char *rec) noexcept nogil:
        # A row change's key (its record's prefix), a keyed message's (its channel).
        return pgl_wal_record_key(rec)

    cdef void _gap_everywhere(self) noexcept nogil:
        # Gap("slot") on every ring, before anything routed from now on (as mark_gap()).
        cdef size_t i
        cdef Producer *p
        for i in range(self.n_rings):
            p = self.rings[i]
            if p.gap_reason == 0 and p.unknown_gap_last:
                continue
            p.gap_reason = PGL_GAP_SLOT
            p.gap_missed = PGL_MISSED_UNKNOWN
        self.gaps_pending = True
        self.flush_gaps()

    def watch_notices(self, PGConnection conn):
        """What the walsender says beside the stream on `conn` is counted here (libpq
        prints it to stderr otherwise): notices, and skipped publications, each of which
        gives every ring a Gap("slot") at its place in the stream."""
        if conn.conn != NULL:
            PQsetNoticeReceiver(conn.conn, on_notice, &self.notices)

    @property
    def notice_count(self):
        return self.notices.count

    @property
    def publication_skips(self):
        return self.notices.skips

    @property
    def last_notice(self):
        return self.notices.text.decode("utf-8", "replace")

    cdef bint _offer_held(self) noexcept nogil:
        # The held message again, if there is one: False while it still has no room.
        cdef uint64_t now
        if self.held == NULL:
            return True
        now = _now_ns()
        if not self.route(self.held_chan, self.held_clen, self.held_payload, self.held_plen,
                          0, &self.held_wal, False):
            return False
        if self.trunc_n and self._truncate() == 1:
            return False        # held again, at a later table of the Truncate
        self.end_hold(now)
        self._after_message(&self.held_wal)
        return True

    cdef int _wal_message(self, PGconn *conn, char *buf, int n) noexcept nogil:
        # One message of the stream: 0 done, 1 held (a blocking ring has no room), -1 not
        # one we can read (the stream is broken: reconnect). conn NULL: fed from Python, a
        # keepalive's request for an answer goes unanswered.
        cdef const char *body
        cdef const char *nul
        cdef size_t blen, clen, route_len
        cdef uint32_t plen
        cdef uint64_t end
        if buf[0] == b'k':
            if n < 18:
                return -1
            end = pgl_be64(buf + 1)
            if not self.in_txn and end > self.server_end:
                self.server_end = end
            if buf[17]:
                # Asked to answer. The answer says how far we have read and no flushed
                # position: a walsender that stops at the server's shutdown waits for the
                # client to have flushed everything it sent, or written when no flushed
                # position is given, and what readers hold must not keep the server up;
                # the slot only moves with a flushed position (our feedback, apart).
                if conn != NULL and self._status(conn, end, 0, False) < 0:
                    return -1
            return 0
        if buf[0] != b'w' or n < 26:
            return -1
        body = buf + 25
        blen = <size_t>(n - 25)
        if body[0] == b'B':
            if blen < 21:
                return -1
            self.in_txn = True
            self.txn_commit = pgl_be64(body + 1)
            self.txn_xid = pgl_be32(body + 17)
            self.txn_last = 0
        elif body[0] == b'I' or body[0] == b'U' or body[0] == b'D':
            return self._change(pgl_be64(buf + 1), body, blen)
        elif body[0] == b'T':
            if pgl_truncate_read(body, blen, &self.trunc_n) < 0:
                return -1
            self.trunc_body = body
            self.trunc_next = 0
            self._position_change(pgl_be64(buf + 1))
            return self._truncate()
        elif body[0] == b'R':
            return self._relation(body, blen)
        elif body[0] == b'C':
            if blen < 26:
                return -1
            self.in_txn = False
            end = pgl_be64(body + 10)
            if end > self.last_end:
                self.last_end = end
            if end > self.server_end:
                self.server_end = end
        elif body[0] == b'M':
            if blen < 15:
                return -1
            self.held_wal.flags = PGL_WAL_TRANSACTIONAL if body[1] & 1 else 0
            self.held_wal.lsn = pgl_be64(body + 2)
            if self.held_wal.flags and self.in_txn:
                # Sent at commit: a slot confirmed up to the commit record's start sends the
                # whole transaction again.
                self.held_wal.commit = self.held_wal.hold = self.txn_commit
            else:
                # Sent as decoded. Its LSN is its record's end (the next record may be a
                # commit that starts there): it stands at lsn - 1 in the stream, and the
                # slot sends it again only if confirmed no further than what came before.
                self.held_wal.commit = self.held_wal.lsn - 1
                self.held_wal.hold = (self.server_end if self.server_end > self.last_end
                                      else self.last_end)
            nul = <const char *>memchr(body + 10, 0, blen - 10)
            if nul == NULL or <size_t>(nul - body) + 5 > blen:
                return -1
            clen = <size_t>(nul - (body + 10))
            plen = pgl_be32(nul + 1)
            if <size_t>(nul - body) + 5 + plen > blen:
                return -1
            # A keyed message (emit(key=)): "channel\x1fkey", routed by the channel.
            self.held_wal.key = pgl_channel_key(body + 10, clen, &route_len)
            self.held_wal.route_len = 0
            if self.held_wal.key != 0:
                self.held_wal.route_len = <uint16_t>route_len
                if clen > MAX_KEYED_CHANNEL:
                    clen = route_len     # a key this long is not written
            self.held_chan = body + 10
            self.held_clen = clen
            self.held_payload = nul + 5
            self.held_plen = plen
            self.received += 1
            if not self.route(self.held_chan, clen, self.held_payload, plen, 0,
                               &self.held_wal, False):
                return 1
            self._after_message(&self.held_wal)
        return 0

    # -- row changes ----------------------------------------------------------------------

    cdef Relation *_find_rel(self, uint32_t relid, bint insert) noexcept nogil:
        # The table's slot; with `insert`, a free one when it has none (NULL: out of memory).
        cdef size_t mask = self.rels_size - 1
        cdef size_t i = (<size_t>relid * 2654435761u) & mask
        while self.rels[i].relid != 0:
            if self.rels[i].relid == relid:
                return &self.rels[i]
            i = (i + 1) & mask
        if not insert:
            return NULL
        if (self.rels_used + 1) * 2 > self.rels_size:
            if not self._grow_rels():
                return NULL
            return self._find_rel(relid, True)
        self.rels_used += 1
        self.rels[i].relid = relid
        return &self.rels[i]

    cdef bint _grow_rels(self) noexcept nogil:
        cdef Relation *old = self.rels
        cdef size_t old_size = self.rels_size, i, j, mask
        self.rels = <Relation *>calloc(old_size * 2, sizeof(Relation))
        if self.rels == NULL:
            self.rels = old
            return False
        self.rels_size = old_size * 2
        mask = self.rels_size - 1
        for i in range(old_size):
            if old[i].relid != 0:
                j = (<size_t>old[i].relid * 2654435761u) & mask
                while self.rels[j].relid != 0:
                    j = (j + 1) & mask
                self.rels[j] = old[i]
        free(old)
        return True

    cdef uint32_t _base(self, uint32_t oid) noexcept nogil:
        # A domain's base type (set_base_types); any other type as it is.
        cdef size_t lo = 0, hi = self.n_bases, mid
        while lo < hi:
            mid = (lo + hi) // 2
            if self.bases[2 * mid] < oid:
                lo = mid + 1
            else:
                hi = mid
        if lo < self.n_bases and self.bases[2 * lo] == oid:
            return self.bases[2 * lo + 1]
        return oid

    def set_key_columns(self, unsigned int relid, list names):
        """A table with REPLICA IDENTITY FULL and a primary key (`names`, its columns, as
        str): a keyed group routes its rows by these columns (a row's every column is its
        replica identity then, and an update changes them). From its next Relation message
        on, and at once if it has come."""
        cdef Relation *rel
        if self.key_names is None:
            self.key_names = {}
        self.has_key_names = True
        self.key_names[relid] = frozenset(n.encode() for n in names)
        rel = self._find_rel(relid, False)
        if rel != NULL and rel.body != NULL:
            self._key_by(rel)

    cdef void _key_by(self, Relation *rel):
        # Mark as the key the columns named in key_names, when the table's replica identity
        # is FULL.
        cdef pgl_relation r
        cdef pgl_columns cols
        cdef pgl_column c
        cdef uint16_t i = 0
        wanted = self.key_names.get(rel.relid)
        if pgl_relation_read(rel.body, rel.blen, &r) < 0 or r.identity != b'f':
            return
        cols = pgl_relation_columns(&r)
        while i < rel.ncols and pgl_column_next(&cols, &c) == 1:
            rel.key_cols[i] = c.name[:c.name_len] in wanted
            i += 1

    def set_base_types(self, dict bases):
        """Domains by their base types ({domain oid: base oid}): the Relation messages from
        now on name the base type of each such column, so that readers load it as a SELECT
        would."""
        cdef list pairs = sorted(bases.items())
        cdef Py_ssize_t i, n = len(pairs)
        cdef uint32_t *made = <uint32_t *>malloc((2 * n + 1) * sizeof(uint32_t))
        if made == NULL:
            raise MemoryError()
        for i in range(n):
            made[2 * i] = pairs[i][0]
            made[2 * i + 1] = pairs[i][1]
        free(self.bases)
        self.bases = made
        self.n_bases = len(pairs)

    cdef int _relation(self, const char *body, size_t blen) noexcept nogil:
        # A table's description, before its first change in this stream (and again when it
        # changes): kept, with each domain column's type given as its base type, and given
        # with every change after it; which columns are its replica identity, for the key a
        # keyed group routes by.
        cdef Relation *rel
        cdef pgl_relation r
        cdef pgl_columns cols
        cdef pgl_column c
        cdef char *copy
        cdef unsigned char *key_cols
        cdef uint16_t i = 0
        cdef uint32_t base
        if blen < 1 or pgl_relation_read(body + 1, blen - 1, &r) < 0:
            return -1
        key_cols = <unsigned char *>malloc(r.ncols + 1)
        copy = <char *>malloc(blen - 1)
        if key_cols == NULL or copy == NULL:
            free(key_cols)
            free(copy)
            return -1
        memcpy(copy, body + 1, blen - 1)
        cols = pgl_relation_columns(&r)
        while pgl_column_next(&cols, &c) == 1:
            key_cols[i] = c.flags & 1
            if self.n_bases:
                base = self._base(c.type_oid)
                if base != c.type_oid:      # the copy starts at body + 1
                    pgl_put_be32(copy + (c.type_at - (body + 1)), base)
            i += 1
        rel = self._find_rel(r.relid, True)
        if rel == NULL:
            free(copy)
            free(key_cols)
            return -1
        free(rel.body)
        free(rel.key_cols)
        rel.body = copy
        rel.blen = <uint32_t>(blen - 1)
        rel.key_cols = key_cols
        rel.ncols = r.ncols
        if self.has_key_names:
            with gil:
                if rel.relid in self.key_names:
                    self._key_by(rel)
        self.rel_versions += 1
        rel.version = self.rel_versions
        rel.klen = <uint16_t>snprintf(rel.key, sizeof(rel.key), "_?%u", rel.relid)
        rel.key[0] = 0
        return 0

    cdef uint64_t _change_key(self, Relation *rel, const char *body,
                              size_t blen) noexcept nogil:
        # The hash of a change's replica identity columns (the new row's for an insert or an
        # update, the old key's for a delete), 0 when it has none or cannot be read.
        # FNV-1a over each key column's length and text, seeded with the table's oid.
        cdef uint64_t h = 1469598103934665603ULL ^ rel.relid
        cdef pgl_change change
        cdef pgl_tuple t
        cdef pgl_datum d
        cdef uint32_t length, j
        cdef bint any_key = False
        cdef int rc
        if pgl_change_read(body, blen, &change) < 0 or \
                pgl_tuple_open(pgl_change_key_tuple(&change), change.end, &t) < 0:
            return 0
        while True:
            rc = pgl_tuple_next(&t, &d)
            if rc <= 0:
                break
            if t.index < rel.ncols and rel.key_cols[t.index]:
                any_key = True
                length = d.len if d.kind == b't' or d.kind == b'b' else UINT32_MAX
                for j in range(4):
                    h = (h ^ ((length >> (8 * j)) & 0xFF)) * 1099511628211ULL
                for j in range(d.len):
                    h = (h ^ <unsigned char>d.value[j]) * 1099511628211ULL
        if rc < 0 or not any_key:
            return 0
        return h if h != 0 else 1

    cdef inline void _position_change(self, uint64_t lsn) noexcept nogil:
        # Where the next change stands: in its transaction, at commit, after the one before.
        if lsn <= self.txn_last:
            lsn = self.txn_last + 1
        self.txn_last = lsn
        self.held_wal.lsn = lsn
        self.held_wal.commit = self.held_wal.hold = self.txn_commit
        self.held_wal.flags = PGL_WAL_TRANSACTIONAL | PGL_WAL_CHANGE

    cdef bint _compose(self, Relation *rel, char op, const char *change,
                       size_t clen) noexcept nogil:
        # The record's content for one change of `rel` (_ring.h), in scratch.
        cdef size_t need = PGL_CHANGE_PREFIX + rel.blen + clen
        cdef char *grown
        cdef pgl_change_prefix prefix
        if need > self.scratch_size:
            grown = <char *>realloc(self.scratch, need)
            if grown == NULL:
                return False
            self.scratch = grown
            self.scratch_size = need
        prefix.version = rel.version
        prefix.xid = self.txn_xid
        prefix.rlen = rel.blen
        prefix.key = self.held_wal.key
        pgl_change_prefix_put(self.scratch, &prefix)
        memcpy(self.scratch + PGL_CHANGE_PREFIX, rel.body, rel.blen)
        memcpy(self.scratch + PGL_CHANGE_PREFIX + rel.blen, change, clen)
        rel.key[1] = op
        self.held_chan = rel.key
        self.held_clen = rel.klen
        self.held_payload = self.scratch
        self.held_plen = need
        return True

    cdef int _change(self, uint64_t lsn, const char *body, size_t blen) noexcept nogil:
        # An Insert, Update or Delete: routed to the readers of that table and kind.
        cdef Relation *rel
        if blen < 6:
            return -1
        rel = self._find_rel(pgl_be32(body + 1), False)
        if rel == NULL:
            return -1           # pgoutput sends a table's Relation before its first change
        self.held_wal.key = self._change_key(rel, body, blen)
        self.held_wal.route_len = 0
        if not self._compose(rel, body[0], body, blen):
            return -1
        self._position_change(lsn)
        self.received += 1
        self.changes += 1
        if not self.route(self.held_chan, self.held_clen, self.held_payload, self.held_plen,
                          0, &self.held_wal, False):
            return 1
        return 0

    cdef int _truncate(self) noexcept nogil:
        # A Truncate's tables from trunc_next on, a record each (their positions one after
        # the other): 0 done, 1 held at one of them, -1 not readable.
        cdef Relation *rel
        cdef char opts[2]
        while self.trunc_next < self.trunc_n:
            rel = self._find_rel(pgl_truncate_relid(self.trunc_body, self.trunc_next), False)
            if self.trunc_next > 0:
                self._position_change(self.held_wal.lsn)
            self.trunc_next += 1
            if rel == NULL:
                continue
            opts[0] = b'T'
            opts[1] = self.trunc_body[5]
            self.held_wal.key = 0           # a table's truncate has no key: any member
            self.held_wal.route_len = 0
            if not self._compose(rel, b'T', opts, 2):
                self.trunc_n = 0
                return -1
            self.received += 1
            self.changes += 1
            if not self.route(self.held_chan, self.held_clen, self.held_payload,
                              self.held_plen, 0, &self.held_wal, False):
                return 1
        self.trunc_n = 0
        return 0

    cdef inline void _after_message(self, Position *w) noexcept nogil:
        if not w.flags:
            # Sent alone: a slot confirmed up to its LSN (its record's end) will not send it
            # again.
            if w.lsn > self.last_end:
                self.last_end = w.lsn

    cdef int _feedback(self, PGconn *conn, bint reply) noexcept nogil:
        # Our feedback: flushed is what the slot may confirm.
        cdef uint64_t written = self.server_end if self.server_end > self.confirmed else self.confirmed
        return self._status(conn, written, self.confirmed, reply)

    cdef int _status(self, PGconn *conn, uint64_t written, uint64_t flushed,
                     bint reply) noexcept nogil:
        # Standby status update 'r': written, flushed and applied LSNs (0: none), the time,
        # and whether we ask for a keepalive back.
        cdef char msg[34]
        cdef int rc
        msg[0] = b'r'
        pgl_put_be64(msg + 1, written)
        pgl_put_be64(msg + 9, flushed)
        pgl_put_be64(msg + 17, flushed)
        pgl_put_be64(msg + 25, <uint64_t>pgl_pg_now_us())
        msg[33] = 1 if reply else 0
        if PQputCopyData(conn, msg, 34) != 1:
            return -1
        rc = PQflush(conn)
        if rc < 0:
            return -1
        self.unsent = rc == 1
        return 0

    def send_feedback(self, PGConnection conn not None, bint reply=False):
        """Tell the server how far the slot may be confirmed (`confirmed`); with `reply`, ask
        for a keepalive back (a heartbeat). False when the connection failed."""
        if conn.conn == NULL:
            return False
        return self._feedback(conn.conn, reply) == 0

    def confirmable(self):
        """How far the slot may be confirmed now: the commit LSN of the oldest transaction
        some reader is not done with (the slot then sends it again after a reconnect), else
        of the transaction being read or held, else as far as the stream has gone."""
        cdef uint64_t bound = self.server_end if self.server_end > self.last_end else self.last_end
        if self.in_txn and self.txn_commit < bound:
            bound = self.txn_commit
        if self.held != NULL and self.held_wal.hold < bound:
            bound = self.held_wal.hold
        return self.oldest_unconsumed(bound)

    def stream_reset(self):
        """The replication connection is gone: what was being read goes with it (the slot
        sends it again, from where it was confirmed)."""
        self.in_txn = False
        self.trunc_n = 0
        if self.held != NULL:
            self.end_hold(_now_ns())

    def reset_positions(self, uint64_t commit=0):
        """The stream cannot go on from where it stood (a slot made again, a new server's
        history): every position past `commit` (all of them with 0) is forgotten, so that
        what the slot sends from now on is new to every ring; what was confirmed goes too."""
        Dispatcher.reset_positions(self, commit)
        if self.last_end > commit:
            self.last_end = commit
        if self.server_end > commit:
            self.server_end = commit
        if self.confirmed > commit:
            self.confirmed = commit
        self.in_txn = False

    def feed(self, bytes data):
        """Decode one message of the stream's COPY data (an XLogData 'w' or a keepalive 'k'),
        as drain() does, given from Python (tests). "done"; "held": a blocking ring has no
        room for a message, which is kept and offered again by the next feed() or run()
        (while it still has no room, `data` is not taken: feed it again); or "bad"."""
        cdef char *buf
        cdef int rc
        cdef Py_ssize_t n = len(data)
        if not self._offer_held():
            return "held"
        if n == 0:
            return "bad"
        buf = <char *>malloc(n)     # what PQfreemem() frees, as libpq's own buffers
        if buf == NULL:
            raise MemoryError()
        memcpy(buf, <const char *>data, n)
        self.copy_messages += 1
        rc = self._wal_message(NULL, buf, <int>n)
        with nogil:
            self.flush_gaps()
            self.wake()
        if rc == 1:
            self.hold(buf)
            return "held"
        PQfreemem(buf)
        return "done" if rc == 0 else "bad"

    def dispatch_wal(self, bytes channel, bytes payload, uint64_t lsn, uint64_t commit,
                     bint transactional=True):
        """Route one WAL message given from Python (tests; run() does this for the stream),
        as if its transaction ended at commit + 1 once it is routed. False, having written it
        nowhere, when a blocking ring has no room for it."""
        cdef Position w
        w.lsn = lsn
        w.commit = w.hold = commit
        w.flags = PGL_WAL_TRANSACTIONAL if transactional else 0
        w.key = 0
        w.route_len = 0
        self.received += 1
        cdef bint done = self.route(channel, len(channel), payload, len(payload), 0, &w, False)
        if done and commit + 1 > self.last_end:
            self.last_end = commit + 1
        with nogil:
            self.wake()
        return done

