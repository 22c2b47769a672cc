# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The logical slot's source: the pgoutput stream's decoder, on the dispatch core
(_dispatch.pyx).

drain() takes the replication stream's COPY BOTH data (PQgetCopyData) and decodes it:
keepalives (answered when asked), a transaction's Begin and Commit (where the stream stands,
and how far the slot may be confirmed), and each logical decoding message, routed by its
prefix as a positioned record (its LSN, its transaction's commit LSN). It also writes the
feedback that tells the server how far the slot may be confirmed. feed() takes the same bytes
from Python, without a connection (tests).
"""

from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport malloc
from libc.string cimport memchr, memcpy

from pglistener._dispatch cimport Dispatcher, PGConnection, Position
from pglistener._libpq cimport (PGconn, PQflush, PQfreemem, PQgetCopyData, PQputCopyData)
from pglistener._poll cimport now_ns as _now_ns
from pglistener._ring cimport PGL_WAL_TRANSACTIONAL


cdef extern from "_wire.h" nogil:
    uint64_t pgl_be64(const char *p)
    uint32_t pgl_be32(const char *p)
    void pgl_put_be64(char *p, uint64_t v)
    int64_t pgl_pg_now_us()


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

    def __cinit__(self, *args, **kwargs):
        self.hold_forever = True

    # The replication stream is COPY BOTH data (docs: "Streaming Replication Protocol";
    # pg_recvlogical.c reads it the same way). From the server, big-endian:
    #   'w' XLogData:  [1] start LSN  [9] end LSN  [17] send time  [25] one pgoutput message
    #   'k' keepalive: [1] end LSN  [9] send time  [17] reply requested (1 byte)
    # pgoutput messages (proto.c, protocol version 1), of which we read three:
    #   'B' begin:   [1] commit LSN  [9] commit time  [17] xid
    #   'C' commit:  [1] flags  [2] commit LSN  [10] end LSN  [18] commit time
    #   'M' message: [1] flags (1: transactional)  [2] LSN  [10] prefix, NUL-terminated,
    #                then a 4-byte length and the content
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

    cdef bint _offer_held(self) noexcept nogil:
        # The held message again, if there is one: False while it still has no room.
        cdef uint64_t now
        if self.held == NULL:
            return True
        now = _now_ns()
        if not self.route(self.held_chan, self.held_clen, self.held_payload, self.held_plen,
                          0, &self.held_wal, False):
            return False
        self.end_hold(now)
        self._after_message(&self.held_wal)
        return True

    cdef int _wal_message(self, PGconn *conn, char *buf, int n) noexcept nogil:
        # One message of the stream: 0 done, 1 held (a blocking ring has no room), -1 not
        # one we can read (the stream is broken: reconnect). conn NULL: fed from Python, a
        # keepalive's request for an answer goes unanswered.
        cdef const char *body
        cdef const char *nul
        cdef size_t blen, clen
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
        self.received += 1
        cdef bint done = self.route(channel, len(channel), payload, len(payload), 0, &w, False)
        if done and commit + 1 > self.last_end:
            self.last_end = commit + 1
        with nogil:
            self.wake()
        return done

