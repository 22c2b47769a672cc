# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled core, producer side: the supervisor's dispatch loop, its route table and the
rings' writing end.

Policy (LISTEN bookkeeping, reconnects, logging) stays in Python; this module only drains the
libpq socket, finds each channel's subscribers by hash, writes records into their rings, wakes
sleeping readers, and returns a status code. Linked to libpq and imported only by the
supervisor process; the readers' side is _reader.pyx. The ring's byte layout is drawn in
_ring.h.
"""

cimport cython
from libc.errno cimport EINTR, errno
from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcmp, memcpy, strlen
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.unistd cimport close, getpid, read, write

from pglistener._libpq cimport *
from pglistener._poll cimport PGL_POLLRDHUP, POLLIN, POLLOUT, now_ns as _now_ns, poll, pollfd
from pglistener._ring cimport *


cdef extern from "<sys/eventfd.h>" nogil:
    const int EFD_NONBLOCK
    const int EFD_CLOEXEC
    int eventfd(unsigned int initval, int flags)


cpdef enum RunStatus:
    RUN_TIMEOUT = 0        # the deadline passed: Python gets a turn (heartbeat, retries)
    RUN_CONTROL = 1        # the control fd is readable: a worker or the owner wants something
    RUN_CONN_BAD = 2       # PQconsumeInput failed or the socket is gone: reconnect
    RUN_INTERRUPTED = 3    # a signal arrived: let Python run its handlers
    RUN_RESULT = 4         # want_result: the query's next result is ready (PQgetResult won't block)


_GAP_CODES = {"reconnect": PGL_GAP_RECONNECT, "restart": PGL_GAP_RESTART}  # mark_gap's

HEADER_BYTES = PGL_HEADER_BYTES

def libpq_version():
    """Version of the libpq this module is linked to at run time (PQlibVersion())."""
    return PQlibVersion()


def built_libpq_version():
    """Version of the libpq headers this module was compiled against."""
    return PGL_BUILT_LIBPQ_VERSION



# ----------------------------------------------------------------------------------------------
# The connection: ours, on libpq, never psycopg's.


cpdef enum ConnectPoll:
    CONNECT_FAILED = PGRES_POLLING_FAILED
    CONNECT_READING = PGRES_POLLING_READING    # wait until the socket is readable, poll again
    CONNECT_WRITING = PGRES_POLLING_WRITING    # wait until the socket is writable, poll again
    CONNECT_OK = PGRES_POLLING_OK


@cython.final
cdef class PGConnection:
    """One libpq connection owned by this module. It connects without blocking: start()
    gives a connection whose connect_poll() the caller's loop drives (PQconnectPoll: wait for
    the socket as told, poll again); then queries are sent with send_query() and their results
    taken with get_result() once Dispatcher.run() says one is ready. It never blocks: the
    socket is non-blocking from the start, and set so for sending once connected.

    The conninfo should name host addresses (hostaddr), resolved beforehand: libpq resolves a
    host name inside PQconnectPoll, blocking. A fork child never closes its parent's
    connection."""

    cdef PGconn *conn
    cdef int owner_pid

    def __cinit__(self):
        self.conn = NULL
        self.owner_pid = getpid()

    def __dealloc__(self):
        if self.conn != NULL and getpid() == self.owner_pid:
            PQfinish(self.conn)
        self.conn = NULL

    @staticmethod
    def start(bytes conninfo):
        """A connection being made to `conninfo`: drive it with connect_poll(). A conninfo
        that libpq cannot parse gives a connection whose first connect_poll() fails, with
        the reason in error_message."""
        cdef PGConnection self = PGConnection.__new__(PGConnection)
        self.conn = PQconnectStart(conninfo)
        if self.conn == NULL:
            raise MemoryError("libpq could not allocate a connection")
        return self

    def connect_poll(self):
        """One step of connecting (PQconnectPoll): a ConnectPoll code. READING or WRITING:
        wait until fileno() is readable or writable, then call again (the descriptor may
        change between calls); OK: connected; FAILED: see error_message."""
        if self.conn == NULL:
            return CONNECT_FAILED
        if PQstatus(self.conn) == CONNECTION_BAD:
            return CONNECT_FAILED
        cdef int status
        with nogil:
            status = PQconnectPoll(self.conn)
        if status == PGRES_POLLING_OK and PQsetnonblocking(self.conn, 1) != 0:
            return CONNECT_FAILED
        return status

    def fileno(self):
        """The connection's socket; -1 when there is none (yet, or any more)."""
        return -1 if self.conn == NULL else PQsocket(self.conn)

    @property
    def error_message(self):
        """libpq's last error on this connection, as one line."""
        if self.conn == NULL:
            return "the connection is closed"
        return " ".join(PQerrorMessage(self.conn).decode("utf-8", "replace").split())

    @property
    def backend_pid(self):
        return 0 if self.conn == NULL else PQbackendPID(self.conn)

    @property
    def server_version(self):
        return 0 if self.conn == NULL else PQserverVersion(self.conn)

    def send_query(self, bytes query):
        """Send `query` (one or more statements, as one simple query) without waiting; the
        part that does not fit the socket now is flushed by Dispatcher.run(want_result=True).
        False when it could not be sent (the connection is bad: see error_message)."""
        if self.conn == NULL:
            return False
        return PQsendQuery(self.conn, query) == 1

    def get_result(self):
        """The next result of the query in flight, once Dispatcher.run() returned RUN_RESULT
        (it does not block then): None after the last one, else (ok, rows, error): ok False
        for an error result, whose text is `error`; rows, of a result with rows, as tuples
        of bytes (None for NULL)."""
        if self.conn == NULL:
            return None
        cdef PGresult *res = PQgetResult(self.conn)
        cdef int status, i, j, ntuples, nfields
        cdef list rows = []
        if res == NULL:
            return None
        try:
            status = PQresultStatus(res)
            if status == PGRES_FATAL_ERROR or status == PGRES_BAD_RESPONSE:
                return (False, rows, " ".join(
                    PQresultErrorMessage(res).decode("utf-8", "replace").split()))
            if status == PGRES_TUPLES_OK:
                ntuples = PQntuples(res)
                nfields = PQnfields(res)
                for i in range(ntuples):
                    rows.append(tuple(
                        None if PQgetisnull(res, i, j)
                        else PQgetvalue(res, i, j)[:PQgetlength(res, i, j)]
                        for j in range(nfields)))
            return (True, rows, None)
        finally:
            PQclear(res)

    def close(self):
        """Close the connection (PQfinish); idempotent."""
        if self.conn != NULL:
            if getpid() == self.owner_pid:
                PQfinish(self.conn)
            self.conn = NULL

    @property
    def closed(self):
        return self.conn == NULL


# ----------------------------------------------------------------------------------------------
# Producer side: lives in the supervisor process, written only by the dispatch loop.


cdef struct Producer:
    pgl_ring_header *hdr
    unsigned char *data
    uint64_t cap
    uint64_t mask
    uint64_t tail              # our copy of hdr.tail: we are its only writer
    uint64_t published         # what hdr.tail says: published in batches (_publish)
    uint64_t head_cache        # last head we loaded; refreshed only when the ring looks full
    uint16_t gap_reason        # a gap waiting for room, 0 if none
    uint64_t gap_missed        # its count (PGL_MISSED_UNKNOWN for reconnects)
    bint unknown_gap_last      # the last record published is a gap of unknown count
    bint block                 # overflow="block": wait for room rather than miss
    bint block_expired         # held past block_timeout: misses (as "gap") until its gap
                               # is written
    uint64_t held_ns           # time this ring held the connection, in all
    bint holding               # the held notification waits for room here
    uint64_t delivered
    uint64_t missed_total
    int efd
    bint dirty                 # published since the last wake pass: in Dispatcher.dirty
    size_t map_bytes


cdef inline uint64_t _span(Producer *p, uint64_t pos, uint32_t n) noexcept nogil:
    # Bytes a record of n bytes takes at pos, counting the padding when it would wrap.
    cdef uint64_t to_end = p.cap - (pos & p.mask)
    return n if n <= to_end else to_end + n


cdef inline bint _room(Producer *p, uint64_t need) noexcept nogil:
    if p.tail + need - p.head_cache <= p.cap:
        return True
    p.head_cache = pgl_load_acquire(&p.hdr.head)
    return p.tail + need - p.head_cache <= p.cap


cdef inline unsigned char *_claim(Producer *p, uint32_t n) noexcept nogil:
    # Room was checked. Pads to the end when the record would wrap; advances our tail copy.
    cdef uint64_t off = p.tail & p.mask
    cdef uint64_t to_end = p.cap - off
    cdef unsigned char *rec
    if n > to_end:
        pgl_rec_head(p.data + off, <uint32_t>to_end, PGL_REC_PAD)
        p.tail += to_end
        off = 0
    rec = p.data + off
    p.tail += n
    return rec


#: Records are published (hdr.tail stored) every this many bytes within a batch, and at its
#: end (Dispatcher._wake): a store per record would pull the tail's cache line away from a
#: reader on another core for every notification. Small enough that a reader is never kept
#: waiting for long, nor a 16 KiB ring kept full of what it cannot see yet.
cdef enum:
    PUBLISH_BYTES = 2048


cdef inline void _publish(Producer *p) noexcept nogil:
    pgl_store_release(&p.hdr.tail, p.tail)
    p.published = p.tail


cdef inline void _emit_gap(Producer *p) noexcept nogil:
    pgl_rec_write_gap(_claim(p, PGL_RECORD_HEADER), p.gap_reason, p.gap_missed)
    p.unknown_gap_last = p.gap_missed == PGL_MISSED_UNKNOWN
    p.gap_reason = 0
    p.gap_missed = 0
    p.block_expired = False     # its loss is said: a blocking ring blocks again from here


cdef inline void _count_missed(Producer *p) noexcept nogil:
    p.missed_total += 1
    if p.gap_reason == 0:
        p.gap_reason = PGL_GAP_OVERFLOW
        p.gap_missed = 1
    elif p.gap_reason == PGL_GAP_OVERFLOW:
        p.gap_missed += 1
    # a pending reconnect gap already says "unknown": it absorbs the count


cdef bint _push_notify(Producer *p, const char *chan, uint32_t clen,
                       const char *payload, uint32_t plen, int32_t pid) noexcept nogil:
    # Writes and publishes one notification (after a pending gap); False if it was missed.
    cdef uint32_t n = pgl_align8(PGL_RECORD_HEADER + clen + plen)
    if not _room(p, _need(p, n)):
        _count_missed(p)
        return False
    if p.gap_reason != 0:
        _emit_gap(p)        # the gap first, at the place where the loss happened
    pgl_rec_write_notify(_claim(p, n), n, chan, <uint16_t>clen, payload, plen, pid)
    p.unknown_gap_last = False
    p.delivered += 1
    if p.tail - p.published >= PUBLISH_BYTES:
        _publish(p)
    return True



cdef inline uint64_t _need(Producer *p, uint32_t n) noexcept nogil:
    # Bytes a record of n bytes takes now, with a pending gap before it.
    cdef uint64_t need = 0
    if p.gap_reason != 0:
        need = _span(p, p.tail, PGL_RECORD_HEADER)
    return need + _span(p, p.tail + need, n)


cdef bint _flush_gap(Producer *p) noexcept nogil:
    # Writes and publishes a pending gap if there is room now; True if it did.
    if p.gap_reason == 0 or not _room(p, _span(p, p.tail, PGL_RECORD_HEADER)):
        return False
    _emit_gap(p)
    _publish(p)
    return True


cdef struct Entry:
    # One receiver of a channel's notifications: a subscription (size 1), or a consumer
    # group, whose members share the stream: each notification goes to one of them.
    Producer **members
    int size
    unsigned turn              # a group's next member in turn, for ties


cdef Producer *_choose(Entry *e, uint32_t n, bint take_turn) noexcept nogil:
    # The member of an entry a record of n bytes goes to: among those with room, the one
    # with the least unread data, ties in turn; if none has room, one that may miss (policy
    # "gap", or blocking past block_timeout), least unread first; NULL when every one must
    # wait for room. take_turn: the choice is used, so the next tie starts after it.
    cdef Producer *best = NULL
    cdef Producer *p
    cdef uint64_t lag, best_lag = 0
    cdef bint room, best_room = False
    cdef int k, i, best_i = 0
    for k in range(e.size):
        i = <int>((e.turn + <unsigned>k) % <unsigned>e.size)
        p = e.members[i]
        if e.size > 1:
            p.head_cache = pgl_load_acquire(&p.hdr.head)    # its unread data, now
        room = _room(p, _need(p, n))
        if not room and p.block and not p.block_expired:
            continue
        lag = p.tail - p.head_cache
        if best == NULL or (room and not best_room) or (room == best_room and lag < best_lag):
            best, best_lag, best_room, best_i = p, lag, room, i
    if best != NULL and take_turn:
        e.turn = <unsigned>(best_i + 1)
    return best


cdef struct Route:
    uint64_t hash
    int state                  # PGL_ROUTE_EMPTY, _LIVE or _DELETED
    int n                      # entries
    uint16_t clen
    char name[64]
    Entry *entries             # one allocation: the entries, then their members


cdef class Dispatcher:
    """The supervisor's routing table and rings, and the loop that fills them.

    Python adds and removes rings and sets, per channel, which rings get its notifications;
    run() then drains the connection without the GIL until the control fd wants attention, the
    connection breaks, or the timeout passes.
    """

    cdef Route *table
    cdef size_t table_size         # a power of two
    cdef size_t table_used         # live + deleted slots
    cdef Producer **rings
    cdef size_t n_rings
    cdef Producer **dirty
    cdef size_t n_dirty
    cdef bint gaps_pending         # some ring holds a gap that did not fit yet
    # The eventfd readers write when they free room we wait for (a duplicate goes to each
    # reader with its ring: RingReader's wake_fd).
    cdef readonly int wake_fd
    cdef dict by_id                # ring id -> address of its Producer
    cdef readonly uint64_t received
    cdef readonly uint64_t unrouted
    # overflow="block": the notification waiting for room in a blocking ring, taken off the
    # connection but given to nobody yet; while it waits, run() reads no more.
    cdef PGnotify *held
    cdef uint64_t held_since           # when the current hold began (ns), 0 if none
    cdef uint64_t held_total_ns        # finished holds, in all
    cdef public double block_timeout   # seconds a blocking ring may hold the connection
    cdef readonly uint64_t block_expiries

    def __cinit__(self):
        self.table_size = 64
        self.table = <Route *>calloc(self.table_size, sizeof(Route))
        self.rings = NULL
        self.dirty = NULL
        self.by_id = {}
        self.wake_fd = -1
        self.block_timeout = 60.0
        if self.table == NULL:
            raise MemoryError()
        self.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.wake_fd < 0:
            raise OSError(errno, "eventfd for the readers' wake-ups failed")

    def __dealloc__(self):
        cdef size_t i
        for i in range(self.table_size):
            free(self.table[i].entries)
        free(self.table)
        for i in range(self.n_rings):
            _free_producer(self.rings[i])
        free(self.rings)
        free(self.dirty)
        if self.wake_fd >= 0:
            close(self.wake_fd)
        if self.held != NULL:
            PQfreemem(self.held)

    # -- rings ------------------------------------------------------------------------------

    def add_ring(self, ring_id, int memfd, int efd, uint64_t capacity, bint block=False):
        """Map memfd (already sized to HEADER_BYTES + capacity), initialise its header and keep
        it under ring_id. The dispatcher takes ownership of efd; memfd stays the caller's.
        block: overflow="block", wait for room rather than miss (up to block_timeout)."""
        if (capacity < PGL_MIN_CAPACITY or capacity > PGL_MAX_CAPACITY
                or capacity & (capacity - 1)):
            raise ValueError(
                f"ring capacity must be a power of two between {PGL_MIN_CAPACITY} and "
                f"{PGL_MAX_CAPACITY} bytes, not {capacity}")
        if ring_id in self.by_id:
            raise KeyError(f"ring {ring_id!r} exists")
        cdef size_t size = PGL_HEADER_BYTES + capacity
        cdef void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0)
        if mem == MAP_FAILED:
            raise OSError(errno, "mmap of a ring failed")
        cdef Producer *p = <Producer *>calloc(1, sizeof(Producer))
        cdef Producer **grown = <Producer **>realloc(self.rings, (self.n_rings + 1) * sizeof(Producer *))
        cdef Producer **grown_dirty = NULL   # stays NULL when the first realloc fails
        if grown != NULL:
            self.rings = grown
            grown_dirty = <Producer **>realloc(self.dirty, (self.n_rings + 1) * sizeof(Producer *))
            if grown_dirty != NULL:
                self.dirty = grown_dirty
        if p == NULL or grown == NULL or grown_dirty == NULL:
            free(p)
            munmap(mem, size)
            raise MemoryError()
        p.hdr = <pgl_ring_header *>mem
        p.data = <unsigned char *>mem + PGL_HEADER_BYTES
        p.cap = capacity
        p.mask = capacity - 1
        p.efd = efd
        p.block = block
        p.map_bytes = size
        p.hdr.capacity = capacity
        p.hdr.version = PGL_RING_VERSION
        p.hdr.tail = 0
        p.hdr.head = 0
        p.hdr.sleeping = 0
        pgl_store_u32(&p.hdr.magic, PGL_RING_MAGIC)
        self.rings[self.n_rings] = p
        self.n_rings += 1
        self.by_id[ring_id] = <size_t>p

    def remove_ring(self, ring_id):
        """Drop a ring from every route, unmap it and close its eventfd."""
        cdef Producer *p = <Producer *><size_t>self.by_id.pop(ring_id)
        cdef size_t i
        cdef int j, k
        cdef Route *r
        cdef Entry *e
        for i in range(self.table_size):
            r = &self.table[i]
            if r.state != PGL_ROUTE_LIVE:
                continue
            k = 0
            while k < r.n:
                e = &r.entries[k]
                j = 0
                while j < e.size:
                    if e.members[j] == p:
                        e.members[j] = e.members[e.size - 1]
                        e.size -= 1
                    else:
                        j += 1
                if e.size == 0:
                    r.entries[k] = r.entries[r.n - 1]
                    r.n -= 1
                else:
                    k += 1
        _remove_ptr(self.rings, &self.n_rings, p)
        _remove_ptr(self.dirty, &self.n_dirty, p)
        _free_producer(p)

    def ring_stats(self, ring_id):
        """(delivered, missed, bytes in use, seconds it held the connection) for one ring."""
        cdef Producer *p = <Producer *><size_t>self.by_id[ring_id]
        cdef uint64_t held = p.held_ns
        if p.holding and self.held != NULL:
            held += _now_ns() - self.held_since
        return (p.delivered, p.missed_total, p.tail - pgl_load_acquire(&p.hdr.head), held / 1e9)

    def unread(self, ring_id):
        """Notifications written into a ring and not taken by its reader yet (what a reader
        holds in its batch is taken)."""
        cdef Producer *p = <Producer *><size_t>self.by_id[ring_id]
        cdef uint64_t pos = pgl_load_acquire(&p.hdr.head)
        cdef unsigned char *rec
        cdef uint32_t length
        cdef uint64_t count = 0
        while pos < p.tail:
            rec = p.data + (pos & p.mask)
            length = pgl_rec_length(rec)
            if length == 0:
                break           # we wrote them; never, but never loop either
            if pgl_rec_type(rec) == PGL_REC_NOTIFY:
                count += 1
            pos += length
        return count

    def mark_gap(self, ring_ids, str reason):
        """These rings get a Gap(reason), "reconnect" or "restart" (missed unknown), before
        anything received from now on; an overflow gap still waiting for room is folded
        into it. A ring whose last record is already a gap of unknown count gets no second
        one: that gap covers this loss too."""
        cdef uint16_t code = _GAP_CODES[reason]
        cdef Producer *p
        for ring_id in ring_ids:
            p = <Producer *><size_t>self.by_id[ring_id]
            if p.gap_reason == 0 and p.unknown_gap_last:
                continue
            p.gap_reason = code
            p.gap_missed = PGL_MISSED_UNKNOWN
        self.gaps_pending = True
        with nogil:
            self._flush_gaps()
            self._wake()

    # -- routes -----------------------------------------------------------------------------

    def set_route(self, bytes channel, entries):
        """Notifications on `channel` (UTF-8 bytes, 1..63 of them) go to these entries, in
        this order: each a ring id (every notification), or a list of ring ids (a consumer
        group: each notification to one of them). An empty list removes the route."""
        cdef Py_ssize_t clen = len(channel)
        if clen < 1 or clen > 63:
            raise ValueError("a channel is 1 to 63 bytes")
        cdef list groups = [[self.by_id[i] for i in (e if isinstance(e, (list, tuple)) else (e,))]
                            for e in entries]
        if any(not g for g in groups):
            raise ValueError("a consumer group has at least one member")
        cdef Py_ssize_t total = sum(len(g) for g in groups), k, j
        cdef uint64_t h = pgl_hash(channel, clen)
        cdef Route *r = self._find(h, channel, clen)
        cdef Entry *block = NULL
        cdef Producer **members
        if r == NULL and groups and (self.table_used + 1) * 2 > self.table_size:
            self._rehash()      # before anything is allocated: a MemoryError leaks nothing
        if groups:
            block = <Entry *>calloc(1, len(groups) * sizeof(Entry) + total * sizeof(Producer *))
            if block == NULL:
                raise MemoryError()
            members = <Producer **>(<char *>block + len(groups) * sizeof(Entry))
            for k in range(len(groups)):
                block[k].members = members
                block[k].size = len(groups[k])
                for j in range(len(groups[k])):
                    members[j] = <Producer *><size_t>groups[k][j]
                members += len(groups[k])
        if r != NULL:
            free(r.entries)
            r.entries = block
            r.n = len(groups)
            if not groups:
                r.state = PGL_ROUTE_DELETED
            return
        if not groups:
            return
        r = self._slot_for_insert(h)
        r.hash = h
        r.state = PGL_ROUTE_LIVE
        r.n = len(groups)
        r.entries = block
        r.clen = <uint16_t>clen
        memcpy(r.name, <const char *>channel, clen)
        self.table_used += 1

    cdef Route *_find(self, uint64_t h, const char *name, size_t clen) noexcept nogil:
        cdef size_t mask = self.table_size - 1
        cdef size_t i = h & mask
        cdef Route *r
        while True:
            r = &self.table[i]
            if r.state == PGL_ROUTE_EMPTY:
                return NULL
            if r.state == PGL_ROUTE_LIVE and r.hash == h and r.clen == clen and memcmp(r.name, name, clen) == 0:
                return r
            i = (i + 1) & mask

    cdef Route *_slot_for_insert(self, uint64_t h) noexcept nogil:
        cdef size_t mask = self.table_size - 1
        cdef size_t i = h & mask
        while self.table[i].state == PGL_ROUTE_LIVE:
            i = (i + 1) & mask
        if self.table[i].state == PGL_ROUTE_DELETED:
            self.table_used -= 1       # reusing a deleted slot; the caller counts it again
        return &self.table[i]

    cdef _rehash(self):
        cdef size_t old_size = self.table_size
        cdef Route *old = self.table
        cdef size_t live = 0, i
        for i in range(old_size):
            if old[i].state == PGL_ROUTE_LIVE:
                live += 1
        cdef size_t size = 64
        while (live + 1) * 4 > size:
            size *= 2
        cdef Route *table = <Route *>calloc(size, sizeof(Route))
        if table == NULL:
            raise MemoryError()
        self.table = table
        self.table_size = size
        self.table_used = 0
        cdef Route *r
        for i in range(old_size):
            if old[i].state == PGL_ROUTE_LIVE:
                r = self._slot_for_insert(old[i].hash)
                r[0] = old[i]
                self.table_used += 1
            elif old[i].state == PGL_ROUTE_DELETED:
                free(old[i].entries)
        free(old)

    # -- the loop ---------------------------------------------------------------------------

    cdef inline void _mark(self, Producer *p) noexcept nogil:
        if not p.dirty:
            p.dirty = True
            self.dirty[self.n_dirty] = p
            self.n_dirty += 1

    cdef bint _route(self, const char *chan, const char *payload, int32_t pid,
                     bint expired) noexcept nogil:
        # Writes one notification into every entry of its channel (one member of a group).
        # False, having written it nowhere, when a blocking ring (or every member of a
        # blocking group) has no room for it yet, unless the hold has `expired`: then those
        # rings may miss it (an overflow gap counts it) and the others get it.
        cdef size_t clen = strlen(chan)
        cdef size_t plen = strlen(payload)
        cdef Route *r = self._find(pgl_hash(chan, clen), chan, clen)
        cdef uint32_t n
        cdef int i, j
        cdef Entry *e
        cdef Producer *p
        if r == NULL:
            self.unrouted += 1
            return True
        n = pgl_align8(PGL_RECORD_HEADER + <uint32_t>clen + <uint32_t>plen)
        if not self._fits(r, n):
            if not expired:
                return False
            for i in range(r.n):
                for j in range(r.entries[i].size):
                    p = r.entries[i].members[j]
                    if p.holding:
                        p.block_expired = True
            self.block_expiries += 1
        for i in range(r.n):
            e = &r.entries[i]
            p = e.members[0] if e.size == 1 else _choose(e, n, True)
            if _push_notify(p, chan, <uint32_t>clen, payload, <uint32_t>plen, pid):
                self._mark(p)
            elif p.gap_reason != 0:
                self.gaps_pending = True
        return True

    cdef bint _fits(self, Route *r, uint32_t n) noexcept nogil:
        # Whether every entry can take a record of n bytes now: a blocking ring with room, a
        # group with a member that has room or may miss. Rings that cannot are marked
        # `holding` and asked to wake us when they make room; then looked at once more, so
        # that room made meanwhile is not missed (see _ring.h).
        cdef bint fits = True
        cdef int i, j
        cdef Entry *e
        for i in range(r.n):
            e = &r.entries[i]
            if e.size == 1 and (not e.members[0].block or e.members[0].block_expired):
                continue        # a ring that never waits (the usual case): nothing to ask
            if _choose(e, n, False) != NULL:
                continue
            for j in range(e.size):
                pgl_store_u32(&e.members[j].hdr.producer_waiting, 1)
            pgl_full_fence()
            if _choose(e, n, False) != NULL:
                for j in range(e.size):
                    pgl_store_u32(&e.members[j].hdr.producer_waiting, 0)
                continue
            for j in range(e.size):
                e.members[j].holding = True
            fits = False
        return fits

    cdef inline uint64_t _hold_end(self) noexcept nogil:
        # When the current hold passes block_timeout (ns).
        return self.held_since + <uint64_t>(self.block_timeout * 1e9)

    cdef void _end_hold(self, uint64_t now) noexcept nogil:
        # The held notification went out (or was dropped): count the time it held the
        # connection, to the supervisor and to each ring that held it.
        cdef uint64_t took = now - self.held_since
        cdef size_t i
        cdef Producer *p
        self.held_total_ns += took
        for i in range(self.n_rings):
            p = self.rings[i]
            if p.holding:
                p.held_ns += took
                p.holding = False
        PQfreemem(self.held)
        self.held = NULL
        self.held_since = 0

    cdef size_t _drain(self, PGconn *conn) noexcept nogil:
        cdef PGnotify *note
        cdef size_t n = 0
        cdef uint64_t now
        while True:
            note = self.held
            if note == NULL:
                note = PQnotifies(conn)
                if note == NULL:
                    return n
                self.received += 1
            now = _now_ns() if note == self.held else 0
            if not self._route(note.relname, note.extra, note.be_pid,
                               note == self.held and now >= self._hold_end()):
                if self.held == NULL:           # nothing more off the connection until then
                    self.held = note
                    self.held_since = _now_ns()
                return n
            if note == self.held:
                self._end_hold(now)
            else:
                PQfreemem(note)
            n += 1

    cdef void _wake(self) noexcept nogil:
        cdef size_t i
        cdef Producer *p
        cdef uint64_t one = 1
        if self.n_dirty == 0:
            return
        for i in range(self.n_dirty):
            p = self.dirty[i]
            if p.published != p.tail:
                _publish(p)             # the batch's rest
        pgl_full_fence()    # our tail stores before the loads of `sleeping` (see _ring.h)
        for i in range(self.n_dirty):
            p = self.dirty[i]
            p.dirty = False
            if pgl_load_u32(&p.hdr.sleeping) and pgl_exchange_u32(&p.hdr.sleeping, 0):
                write(p.efd, &one, 8)
        self.n_dirty = 0

    cdef void _flush_gaps(self) noexcept nogil:
        cdef size_t i
        cdef bint pending = False
        cdef Producer *p
        if not self.gaps_pending:
            return
        for i in range(self.n_rings):
            p = self.rings[i]
            if p.gap_reason == 0:
                continue
            if not _flush_gap(p):
                # Ask its reader to wake us when it frees room; then look once more, so that
                # room made before the flag went up is not missed (see _ring.h).
                pgl_store_u32(&p.hdr.producer_waiting, 1)
                pgl_full_fence()
                if not _flush_gap(p):
                    pending = True
                    continue
            pgl_store_u32(&p.hdr.producer_waiting, 0)
            self._mark(p)
        self.gaps_pending = pending

    def dispatch(self, bytes channel, bytes payload, int pid):
        """Route one notification given from Python (tests; run() does this for the socket).
        False, having written it nowhere, when a blocking ring has no room for it."""
        self.received += 1
        cdef bint done = self._route(channel, payload, pid, False)
        with nogil:
            self._wake()
        return done

    def drop_held(self):
        """The connection is gone: the notification held for room goes with it (the
        reconnect gap covers it, as everything else the outage took)."""
        if self.held != NULL:
            self._end_hold(_now_ns())

    @property
    def held_seconds(self):
        """Time blocking rings held the connection, in all, the current hold included."""
        cdef uint64_t ns = self.held_total_ns
        if self.held != NULL:
            ns += _now_ns() - self.held_since
        return ns / 1e9

    @property
    def holding(self):
        """A notification waits for room in a blocking ring: run() reads no more."""
        return self.held != NULL

    def flush(self):
        """Write the pending gaps that fit now and wake sleeping readers (run() does this on
        every turn)."""
        with nogil:
            self._flush_gaps()
            self._wake()

    def run(self, PGConnection conn not None, int control_fd, int timeout_ms,
            bint want_result=False):
        """Drain the connection into the rings until something needs Python; see RUN_*.

        With want_result (a query was sent), also flush it out and return RUN_RESULT once its
        next result is ready; notifications that arrive meanwhile are routed as usual. A
        negative control_fd is not watched."""
        cdef int status
        with nogil:
            status = self._run(conn.conn, control_fd, timeout_ms, want_result)
        return status

    cdef int _run(self, PGconn *conn, int control_fd, int timeout_ms,
                  bint want_result) noexcept nogil:
        cdef pollfd fds[3]
        cdef int sock = PQsocket(conn)
        cdef int rc, wait_ms, unsent = 0
        cdef uint64_t counter
        cdef uint64_t deadline = _now_ns() + <uint64_t>timeout_ms * 1000000ULL
        cdef uint64_t now, wake_at
        if sock < 0:
            return RUN_CONN_BAD
        while True:
            self._drain(conn)
            self._flush_gaps()
            self._wake()
            if want_result:
                unsent = PQflush(conn)
                if unsent < 0:
                    return RUN_CONN_BAD
                if not PQisBusy(conn):
                    return RUN_RESULT
            now = _now_ns()
            if now >= deadline:
                return RUN_TIMEOUT
            wake_at = deadline
            if self.held != NULL:
                if now >= self._hold_end():
                    continue            # _drain lets the held notification go
                wake_at = min(deadline, self._hold_end())
            wait_ms = <int>((wake_at - now + 999999) // 1000000)
            fds[0].fd = sock
            # While a notification is held, nothing more is read: the kernel's buffer fills,
            # then the server's queue holds the rest. The server closing its end is still
            # seen at once (POLLRDHUP), and one that vanished by our unanswered heartbeat
            # (tcp_user_timeout, or a reset from its host: POLLERR).
            fds[0].events = ((POLLOUT if unsent else 0)
                             | (PGL_POLLRDHUP if self.held != NULL else POLLIN))
            fds[0].revents = 0
            fds[1].fd = control_fd
            fds[1].events = POLLIN
            fds[1].revents = 0
            fds[2].fd = self.wake_fd if self.gaps_pending or self.held != NULL else -1
            fds[2].events = POLLIN
            fds[2].revents = 0
            rc = poll(fds, 3, wait_ms)
            if rc < 0:
                if errno == EINTR:
                    return RUN_INTERRUPTED
                return RUN_CONN_BAD
            if fds[0].revents & ~POLLOUT:
                if PQconsumeInput(conn) == 0:
                    self._drain(conn)
                    self._wake()
                    return RUN_CONN_BAD
            if fds[2].revents:
                read(self.wake_fd, &counter, 8)     # a reader made room: the loop looks
            if fds[1].revents:
                self._drain(conn)
                self._wake()
                return RUN_CONTROL


cdef void _remove_ptr(Producer **arr, size_t *n, Producer *p) noexcept nogil:
    cdef size_t i
    for i in range(n[0]):
        if arr[i] == p:
            arr[i] = arr[n[0] - 1]
            n[0] -= 1
            return


cdef void _free_producer(Producer *p) noexcept nogil:
    munmap(p.hdr, p.map_bytes)
    close(p.efd)
    free(p)


