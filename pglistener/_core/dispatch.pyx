# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The dispatch core: the supervisor's connections (PGConnection), its route tables and
rings' writing end (Dispatcher), and the one loop that polls them all (run()).

It knows no protocol. A source is a Dispatcher subclass in a module of its own
(notify/decoder.pyx: LISTEN/NOTIFY; wal/decoder.pyx: a logical slot's stream) whose drain()
decodes what its connection read and hands each record (channel, payload, position, key) to
route(), and whose record_key() reads a record's key again when a group's leaving member
hands it over: this module finds the channel's subscribers by hash, writes the record into
their rings (holding it while a blocking ring has no room), hands a departed group member's
records to the others, and wakes sleeping readers. Policy (LISTEN bookkeeping, reconnects,
logging) stays in Python. Linked to libpq and imported only by the supervisor process; the
readers' side is reader.pyx. The ring's byte layout is drawn in _ring.h.
"""

cimport cython
from cpython.ref cimport PyObject
from libc.errno cimport EINTR, errno
from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t, UINT64_MAX
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.stdio cimport snprintf
from libc.string cimport memcmp, memcpy, strcmp
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.time cimport timespec
from posix.unistd cimport close, getpid, read, write

from pglistener._core._libpq cimport *
from pglistener._core._poll cimport (
    PGL_POLLRDHUP, POLLIN, POLLOUT, now_ns as _now_ns, poll, pollfd, ppoll,
)
from pglistener._core._ring cimport *


cdef extern from "<sys/eventfd.h>" nogil:
    const int EFD_NONBLOCK
    const int EFD_CLOEXEC
    int eventfd(unsigned int initval, int flags)


cpdef enum RunStatus:
    # What run() returns, with the index of the source it concerns (RESULT, CONN_BAD).
    RUN_TIMEOUT = 0        # the deadline passed: Python gets a turn (heartbeat, retries)
    RUN_CONTROL = 1        # the control fd is readable: a worker or the owner wants something
    RUN_CONN_BAD = 2       # a source's connection failed or its stream ended: reconnect it
    RUN_INTERRUPTED = 3    # a signal arrived: let Python run its handlers
    RUN_RESULT = 4         # want_result: the query's next result is ready (PQgetResult won't block)
    RUN_WATCH = 7          # one of the watched descriptors (a connection being made) is ready

cdef enum:
    MAX_SOURCES = 4        # sources one run() polls (each: its connection, its wake eventfd)
    MAX_WATCH = 4          # descriptors of connections being made that one run() watches


_GAP_CODES = {"reconnect": PGL_GAP_RECONNECT, "restart": PGL_GAP_RESTART,
              "slot": PGL_GAP_SLOT}  # mark_gap's

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


cdef void on_notice(void *arg, const PGresult *res) noexcept nogil:
    cdef Notices *box = <Notices *>arg
    cdef const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE)
    cdef const char *severity = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED)
    cdef const char *text = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY)
    box.count += 1
    # pgoutput's "skipped loading publication": a WARNING object_not_in_prerequisite_state,
    # the one a walsender sends while it streams (by code: the text may be translated).
    if state != NULL and strcmp(state, "55000") == 0 and severity != NULL and \
            strcmp(severity, "WARNING") == 0:
        box.skips += 1
    if severity == NULL:
        severity = ""
    if text == NULL:
        text = ""
    snprintf(box.severity, sizeof(box.severity), "%s", severity)
    snprintf(box.text, sizeof(box.text), "%s", text)


@cython.final
cdef class PGConnection:
    """One libpq connection owned by this module. It connects without blocking: start()
    gives a connection whose connect_poll() the caller's loop drives (PQconnectPoll: wait for
    the socket as told, poll again); then queries are sent with send_query() and their results
    taken with get_result() once run() says one is ready. It never blocks: the
    socket is non-blocking from the start, and set so for sending once connected.

    The conninfo should name host addresses (hostaddr), resolved beforehand: libpq resolves a
    host name inside PQconnectPoll, blocking. A fork child never closes its parent's
    connection."""

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
        PQsetNoticeReceiver(self.conn, on_notice, &self.notices)
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
    def notice_count(self):
        """How many notices the server sent on this connection (WARNING, NOTICE, ...),
        kept here instead of libpq's printing them to stderr; last_notice is the last."""
        return self.notices.count

    @property
    def last_notice(self):
        """The last notice: (severity, message), as the server sent them."""
        return (self.notices.severity.decode("ascii", "replace"),
                self.notices.text.decode("utf-8", "replace"))

    @property
    def server_version(self):
        return 0 if self.conn == NULL else PQserverVersion(self.conn)

    def send_query(self, bytes query):
        """Send `query` (one or more statements, as one simple query) without waiting; the
        part that does not fit the socket now is flushed by run() (its want_result).
        False when it could not be sent (the connection is bad: see error_message)."""
        if self.conn == NULL:
            return False
        return PQsendQuery(self.conn, query) == 1

    def consume(self):
        """For a connection run() does not read (a probe): send what is queued and
        take what the socket has, without blocking. None when the connection failed, else
        whether a result is ready (get_result() does not block then)."""
        if self.conn == NULL or PQflush(self.conn) < 0 or PQconsumeInput(self.conn) != 1:
            return None
        return not PQisBusy(self.conn)

    def get_result(self):
        """The next result of the query in flight, once run() returned RUN_RESULT
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
            if status == PGRES_COPY_BOTH:
                self.copy_both = True       # no more results: the stream is read by run()
                return (True, rows, None)
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
# A ring's writing end (Producer, in dispatch.pxd): in the supervisor process, written only
# by the dispatch loop.


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
#: end (Dispatcher.wake): a store per record would pull the tail's cache line away from a
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


cdef bint _push(Producer *p, const char *chan, uint32_t clen, const char *payload,
               uint32_t plen, int32_t pid, Position *w) noexcept nogil:
    # Writes one notification, or a WAL message when w is not NULL (after a pending gap);
    # False if it was missed.
    cdef uint32_t n = _record_bytes(clen, plen, w)
    if not _room(p, _need(p, n)):
        _count_missed(p)
        return False
    if p.gap_reason != 0:
        _emit_gap(p)        # the gap first, at the place where the loss happened
    if w == NULL:
        pgl_rec_write_notify(_claim(p, n), n, chan, <uint16_t>clen, payload, plen, pid)
    else:
        pgl_rec_write_wal(_claim(p, n), n, chan, <uint16_t>clen, payload, plen, w.flags,
                          w.lsn, w.commit)
        _pend(p, w.hold)
    p.unknown_gap_last = False
    p.delivered += 1
    if p.tail - p.published >= PUBLISH_BYTES:
        _publish(p)
    return True


cdef inline uint32_t _record_bytes(uint32_t clen, uint32_t plen, Position *w) noexcept nogil:
    return pgl_align8((PGL_RECORD_HEADER if w == NULL else PGL_WAL_HEADER) + clen + plen)


cdef inline bint _after(uint64_t commit, uint64_t lsn, uint64_t at_commit,
                        uint64_t at_lsn) noexcept nogil:
    # Whether position (commit, lsn) comes after (at_commit, at_lsn) in the stream: commit
    # order, and within a transaction the order of writing.
    return commit > at_commit or (commit == at_commit and lsn > at_lsn)


cdef void _pend(Producer *p, uint64_t commit) noexcept nogil:
    # The record just written ends where p.tail is: its transaction is not consumed until
    # the reader is done with it, and the slot may not be confirmed past `commit` until then.
    cdef size_t last, cap
    cdef uint64_t *grown
    if p.pend_n:
        last = (p.pend_first + p.pend_n - 1) & (p.pend_cap - 1)
        if p.pend[2 * last + 1] == commit:
            p.pend[2 * last] = p.tail
            return
    if p.pend_n == p.pend_cap:
        cap = 64 if p.pend_cap == 0 else p.pend_cap * 2
        grown = <uint64_t *>malloc(cap * 2 * sizeof(uint64_t))
        if grown == NULL:
            return      # out of memory: not remembered, so the slot may be confirmed past it
        for last in range(p.pend_n):
            grown[2 * last] = p.pend[2 * ((p.pend_first + last) & (p.pend_cap - 1))]
            grown[2 * last + 1] = p.pend[2 * ((p.pend_first + last) & (p.pend_cap - 1)) + 1]
        free(p.pend)
        p.pend = grown
        p.pend_cap = cap
        p.pend_first = 0
    last = (p.pend_first + p.pend_n) & (p.pend_cap - 1)
    p.pend[2 * last] = p.tail
    p.pend[2 * last + 1] = commit
    p.pend_n += 1


cdef inline uint64_t _unconsumed_from(Producer *p, bint *lost) noexcept nogil:
    # Where the records its reader has not consumed begin: its `consumed` position, unless
    # the ring has been written over since (a batch taken long ago), then its head (*lost).
    cdef uint64_t pos = pgl_load_acquire(&p.hdr.consumed)
    lost[0] = pos + p.cap < p.tail
    return pgl_load_acquire(&p.hdr.head) if lost[0] else pos


cdef uint64_t _oldest_pending(Producer *p) noexcept nogil:
    # The commit LSN of the oldest transaction this ring's reader is not done with; 0: none.
    cdef uint64_t consumed = pgl_load_acquire(&p.hdr.consumed)
    while p.pend_n and p.pend[2 * p.pend_first] <= consumed:
        p.pend_first = (p.pend_first + 1) & (p.pend_cap - 1)
        p.pend_n -= 1
    return p.pend[2 * p.pend_first + 1] if p.pend_n else 0


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
        if not room and p.block and not p.block_expired and n <= p.cap:
            continue            # it waits for room (a record larger than the ring never fits)
        lag = p.tail - p.head_cache
        if best == NULL or (room and not best_room) or (room == best_room and lag < best_lag):
            best, best_lag, best_room, best_i = p, lag, room, i
    if best != NULL and take_turn:
        e.turn = <unsigned>(best_i + 1)
    return best


cdef inline bint _handled(Producer *p, Position *w) noexcept nogil:
    # Whether a group member's after= (done_*) says it had this record; past it, the
    # member has no more after= to heed.
    if _after(w.commit, w.lsn, p.done_commit, p.done_lsn):
        p.done_commit = p.done_lsn = 0
        return False
    return True


cdef Producer *_unhandled(Entry *e, Position *w) noexcept nogil:
    # A member of the group that has not had this record (by its after=), the least lagging;
    # NULL when every member had it.
    cdef Producer *best = NULL
    cdef Producer *p
    cdef int j
    for j in range(e.size):
        p = e.members[j]
        if p.done_commit != 0 and _handled(p, w):
            continue
        if best == NULL or p.tail - p.head_cache < best.tail - best.head_cache:
            best = p
    return best


cdef inline Producer *_member(Entry *e, uint32_t n, Position *w, bint take) noexcept nogil:
    # The member of a group a record goes to (see _choose and _keyed).
    if e.members[0].keys != NULL:
        return _keyed(e, n, w, take)
    return _choose(e, n, take)


cdef inline size_t _bucket(uint64_t key) noexcept nogil:
    return <size_t>((key ^ (key >> 29) ^ (key >> 47)) & (KEY_BUCKETS - 1))


cdef Producer *_keyed(Entry *e, uint32_t n, Position *w, bint assign) noexcept nogil:
    # The member of a keyed group a record goes to: its key's, while that member lives; a
    # key new to the group goes as _choose() says, and stays there (with `assign`). NULL
    # when the member must wait for room (or, unassigned, every one must).
    cdef KeyMap *keys = e.members[0].keys
    cdef Producer *p
    cdef size_t b
    if w == NULL or w.key == 0:
        return _choose(e, n, assign)
    b = _bucket(w.key)
    p = keys.owner[b]
    if p != NULL and keys.moving[b] != NULL and \
            pgl_load_acquire(&p.hdr.consumed) >= keys.last_pos[b]:
        # Its owner has handled all it had of the bucket: it may go to the member taking it,
        # when that one has room for this record (a blocking ring waits on the owner).
        if _room(keys.moving[b], _need(keys.moving[b], n)):
            p = keys.moving[b]
            if assign:
                keys.owner[b] = p
                keys.moving[b] = NULL
            return p
    if p == NULL:
        p = _choose(e, n, assign)
        if assign:
            keys.owner[b] = p
        return p
    if (not _room(p, _need(p, n)) and p.block and not p.block_expired and n <= p.cap):
        return NULL
    return p


cdef inline bint _wants(Entry *e, Position *w) noexcept nogil:
    # Whether an entry is to get this WAL message: one it has not had (positions only grow
    # along the stream; a replay from the slot sends again what came before), past the
    # message an after= LSN resumes from.
    cdef Producer *first = e.members[0]
    return first.seek_lsn == 0 and _after(w.commit, w.lsn, first.at_commit, first.at_lsn)


cdef bint _advance(Entry *e, Position *w) noexcept nogil:
    # The entry's position moves to this WAL message; True when it is to write it (as
    # _wants says, and the seek of an after= LSN ends at its message, which is not written).
    cdef Producer *first = e.members[0]
    cdef bint seeking = first.seek_lsn != 0
    cdef int j
    if not _after(w.commit, w.lsn, first.at_commit, first.at_lsn):
        return False
    for j in range(e.size):
        e.members[j].at_commit = w.commit
        e.members[j].at_lsn = w.lsn
        if seeking and w.lsn == first.seek_lsn:
            e.members[j].seek_lsn = 0
    return not seeking


cdef inline void _mark(Dispatcher d, Producer *p) noexcept nogil:
    # The ring was written: the wake pass publishes its tail and wakes its reader (once per
    # batch, whatever it took). Inline: it runs for every record.
    if not p.dirty:
        p.dirty = True
        d.dirty[d.n_dirty] = p
        d.n_dirty += 1


cdef class Dispatcher:
    """One source's routing table and rings (a source is a subclass: NotifyDispatcher,
    WalDispatcher), and what run() does for it.

    Python adds and removes rings and sets, per channel, which rings get its records; run()
    then drains the source's connection without the GIL until the control fd wants
    attention, a connection breaks, or the timeout passes. Fields: dispatch.pxd.
    """

    def __cinit__(self, *args, **kwargs):
        self.table_size = 64
        self.table = <Route *>calloc(self.table_size, sizeof(Route))
        self.rings = NULL
        self.dirty = NULL
        self.by_id = {}
        self.wake_fd = -1
        self.block_timeout = 60.0
        if self.table == NULL:
            raise MemoryError()
        # The eventfd readers write when they free room we wait for (a duplicate goes to
        # each reader with its ring: RingReader's wake_fd).
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
        for address in (self.keymaps or {}).values():
            free(<KeyMap *><size_t>address)
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
        p.hdr.consumed = 0
        p.hdr.sleeping = 0
        p.at_commit = self.at_commit       # WAL: what is new from here on
        p.at_lsn = self.at_lsn
        pgl_store_u32(&p.hdr.magic, PGL_RING_MAGIC)
        self.rings[self.n_rings] = p
        self.n_rings += 1
        self.by_id[ring_id] = <size_t>p

    def set_keyed(self, ring_id, token):
        """The ring is a member of a keyed consumer group (`token` names the group): each key
        goes to one member while that member lives (route(), handover())."""
        cdef Producer *p = <Producer *><size_t>self.by_id[ring_id]
        cdef KeyMap *keys
        if self.keymaps is None:
            self.keymaps = {}
        if p.keys != NULL:
            return
        address = self.keymaps.get(token)
        if address is None:
            keys = <KeyMap *>calloc(1, sizeof(KeyMap))
            if keys == NULL:
                raise MemoryError()
            self.keymaps[token] = <size_t>keys
        else:
            keys = <KeyMap *><size_t>address
        keys.refs += 1
        p.keys = keys

    def rebalance(self, ring_id):
        """A member joined its keyed group: it takes a fair share of the buckets of keys the
        others hold (the group's held buckets over its members), from the richest first.
        Each moves once its owner has consumed what it had of it (route()): what the old
        member took is handled before the new one gets the key. Returns how many move."""
        cdef Producer *p = <Producer *><size_t>self.by_id[ring_id]
        cdef KeyMap *keys = p.keys
        cdef size_t b
        cdef Py_ssize_t mine = 0, held = 0, share
        cdef Producer *rich
        if keys == NULL or keys.refs < 2:
            return 0
        counts = {}
        for b in range(KEY_BUCKETS):
            q = keys.moving[b] if keys.moving[b] != NULL else keys.owner[b]
            if q != NULL:
                held += 1
                counts[<size_t>q] = counts.get(<size_t>q, 0) + 1
        mine = counts.pop(<size_t>p, 0)
        share = held // keys.refs
        moved = 0
        while mine < share and counts:
            address = max(counts, key=counts.get)
            if counts[address] <= share:
                break
            rich = <Producer *><size_t>address
            for b in range(KEY_BUCKETS):
                if (keys.moving[b] if keys.moving[b] != NULL else keys.owner[b]) == rich:
                    keys.moving[b] = p      # (a move still pending goes here instead)
                    break
            counts[address] -= 1
            mine += 1
            moved += 1
        return moved

    def remove_ring(self, ring_id):
        """Drop a ring from every route, unmap it and close its eventfd."""
        cdef Producer *p = <Producer *><size_t>self.by_id.pop(ring_id)
        cdef size_t i
        cdef int j, k
        cdef Route *r
        cdef Entry *e
        _unkey(self.keymaps, p)
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

    def unread(self, ring_id, bint unconsumed=False):
        """Notifications written into a ring and not taken by its reader yet (what a reader
        holds in its batch is taken); with `unconsumed`, not consumed yet (what it holds in
        its batch counts too, as handover() hands it over)."""
        cdef Producer *p = <Producer *><size_t>self.by_id[ring_id]
        cdef bint lost
        cdef uint64_t pos = (_unconsumed_from(p, &lost) if unconsumed
                             else pgl_load_acquire(&p.hdr.head))
        cdef pgl_walk walk = pgl_walk_from(p.data, p.mask, pos, p.tail)
        cdef unsigned char *rec = pgl_walk_next(&walk)
        cdef uint16_t kind
        cdef uint64_t count = 0
        while rec != NULL:
            kind = pgl_rec_type(rec)
            if kind == PGL_REC_NOTIFY or kind == PGL_REC_WAL:
                count += 1
            rec = pgl_walk_next(&walk)
        return count

    def handover(self, ring_id, targets):
        """A consumer group's member left (or died): what its reader had not consumed (from
        its `consumed` position on: at least once) goes to the other members `targets`
        (ring ids), each record to the one with room and the least unread data, in order.
        WAL messages keep holding the slot in their new ring. Gaps in it are carried over.
        Returns (moved, missed): missed when no target had room."""
        cdef Producer *p = <Producer *><size_t>self.by_id[ring_id]
        cdef list found = [self.by_id[t] for t in targets]
        cdef Py_ssize_t k, nt = len(found)
        cdef pgl_walk walk
        cdef uint64_t end
        cdef unsigned char *rec
        cdef uint16_t kind
        cdef Position w
        cdef Position *wp
        cdef Producer *q
        cdef Producer *best
        cdef uint64_t moved = 0, missed = 0, lag, best_lag
        cdef size_t pend = 0
        cdef const char *chan
        cdef const char *payload
        cdef bint lost
        cdef KeyMap *keys = p.keys
        cdef uint64_t key
        cdef size_t b
        if nt == 0:
            return (0, 0)
        if keys != NULL:        # its keys go to the others, each with its records
            for b in range(KEY_BUCKETS):
                if keys.moving[b] == p:
                    keys.moving[b] = NULL
                if keys.owner[b] == p:
                    keys.owner[b] = keys.moving[b]  # to the one taking it, if one was
                    keys.moving[b] = NULL
        # Written over since it was taken: from what the ring still holds, with a gap of
        # unknown count first.
        walk = pgl_walk_from(p.data, p.mask, _unconsumed_from(p, &lost), p.tail)
        while True:
            rec = pgl_walk_next(&walk)
            if rec == NULL:
                break
            kind = pgl_rec_type(rec)
            end = walk.pos
            best = NULL
            best_lag = 0
            key = self.record_key(rec) if keys != NULL and kind == PGL_REC_WAL else 0
            if key != 0 and keys.owner[_bucket(key)] != NULL:
                best = keys.owner[_bucket(key)]
            for k in range(nt if best == NULL else 0):
                q = <Producer *><size_t>found[k]
                q.head_cache = pgl_load_acquire(&q.hdr.head)
                lag = q.tail - q.head_cache
                if best == NULL or lag < best_lag:
                    best, best_lag = q, lag
            if key != 0:
                keys.owner[_bucket(key)] = best
            if lost:
                best.gap_reason = PGL_GAP_OVERFLOW
                best.gap_missed = PGL_MISSED_UNKNOWN
                self.gaps_pending = True
                lost = False
            if kind == PGL_REC_GAP:
                if best.gap_reason == 0 or pgl_rec_gap_reason(rec) != PGL_GAP_OVERFLOW:
                    best.gap_reason = pgl_rec_gap_reason(rec)
                    best.gap_missed = pgl_rec_missed(rec)
                elif best.gap_reason == PGL_GAP_OVERFLOW:
                    best.gap_missed += pgl_rec_missed(rec)
                self.gaps_pending = True
            elif kind == PGL_REC_NOTIFY or kind == PGL_REC_WAL:
                wp = NULL
                if kind == PGL_REC_WAL:
                    w.lsn = pgl_rec_lsn(rec)
                    w.commit = pgl_rec_commit(rec)
                    w.flags = pgl_rec_flags(rec)
                    # Its hold, from the pending queue of the ring it leaves.
                    while pend < p.pend_n and p.pend[2 * ((p.pend_first + pend) & (p.pend_cap - 1))] < end:
                        pend += 1
                    w.hold = (p.pend[2 * ((p.pend_first + pend) & (p.pend_cap - 1)) + 1]
                              if pend < p.pend_n else w.commit)
                    w.key = key
                    w.route_len = 0
                    wp = &w
                    chan = pgl_wal_channel(rec)
                    payload = pgl_wal_payload(rec)
                else:
                    chan = pgl_rec_channel(rec)
                    payload = pgl_rec_payload(rec)
                if _push(best, chan, pgl_rec_channel_len(rec), payload,
                         pgl_rec_payload_len(rec), pgl_rec_pid(rec) if wp == NULL else 0, wp):
                    moved += 1
                    _mark(self, best)
                    if key != 0:
                        keys.last_pos[_bucket(key)] = best.tail
                else:
                    missed += 1
                    self.gaps_pending = True
        pgl_store_release(&p.hdr.consumed, p.tail)     # it has nothing left to hold
        _oldest_pending(p)
        with nogil:
            self.flush_gaps()
            self.wake()
        return (moved, missed)

    def reader_closed(self, ring_id, bint taken_is_consumed=True):
        """The ring's reader closed its subscription (rather than died). Its reader marked
        consumed what it handed out (what it took and held stays for handover()); with
        `taken_is_consumed` what it took counts too, and only what it never took is left."""
        cdef Producer *p = <Producer *><size_t>self.by_id[ring_id]
        cdef uint64_t head = pgl_load_acquire(&p.hdr.head)
        if taken_is_consumed and pgl_load_acquire(&p.hdr.consumed) < head:
            pgl_store_release(&p.hdr.consumed, head)
        _oldest_pending(p)

    def oldest_pending(self, ring_id):
        """The commit LSN the slot may not pass for this ring's sake (0: none)."""
        return _oldest_pending(<Producer *><size_t>self.by_id[ring_id])

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
            self.flush_gaps()
            self.wake()

    # -- routes -----------------------------------------------------------------------------

    def set_route(self, bytes channel, entries, bint keep=False):
        """Notifications on `channel` (UTF-8 bytes, 1..63 of them) go to these entries, in
        this order: each a ring id (every notification), or a list of ring ids (a consumer
        group: each notification to one of them). An empty list removes the route; with
        `keep`, the channel stays watched (route_position() goes on), going nowhere."""
        cdef Py_ssize_t clen = len(channel)
        if clen < 1 or clen > 63:
            raise ValueError("a channel is 1 to 63 bytes")
        cdef list groups = [[self.by_id[i] for i in (e if isinstance(e, (list, tuple)) else (e,))]
                            for e in entries]
        if any(not g for g in groups):
            raise ValueError("a consumer group has at least one member")
        cdef Py_ssize_t total = sum(len(g) for g in groups), k, j
        cdef uint64_t h = pgl_hash(channel, clen)
        cdef Route *r = self.find(h, channel, clen)
        cdef Entry *block = NULL
        cdef Producer **members
        cdef bint blocking = False
        self.last = NULL        # found again by route(): it may move or go
        if r == NULL and groups and (self.table_used + 1) * 2 > self.table_size:
            self.rehash()      # before anything is allocated: a MemoryError leaks nothing
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
                    blocking = blocking or members[j].block
                members += len(groups[k])
        if r != NULL:
            free(r.entries)
            r.entries = block
            r.n = len(groups)
            r.blocking = blocking
            if not groups and not keep:
                r.state = PGL_ROUTE_DELETED
            return
        if not groups:
            return
        r = self.slot_for_insert(h)
        r.hash = h
        r.last_commit = r.last_lsn = 0
        r.state = PGL_ROUTE_LIVE
        r.n = len(groups)
        r.entries = block
        r.blocking = blocking
        r.clen = <uint16_t>clen
        memcpy(r.name, <const char *>channel, clen)
        self.table_used += 1

    cdef Route *find(self, uint64_t h, const char *name, size_t clen) noexcept nogil:
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

    cdef Route *slot_for_insert(self, uint64_t h) noexcept nogil:
        cdef size_t mask = self.table_size - 1
        cdef size_t i = h & mask
        while self.table[i].state == PGL_ROUTE_LIVE:
            i = (i + 1) & mask
        if self.table[i].state == PGL_ROUTE_DELETED:
            self.table_used -= 1       # reusing a deleted slot; the caller counts it again
        return &self.table[i]

    cdef rehash(self):
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
        self.last = NULL
        self.table = table
        self.table_size = size
        self.table_used = 0
        cdef Route *r
        for i in range(old_size):
            if old[i].state == PGL_ROUTE_LIVE:
                r = self.slot_for_insert(old[i].hash)
                r[0] = old[i]
                self.table_used += 1
            elif old[i].state == PGL_ROUTE_DELETED:
                free(old[i].entries)
        free(old)

    # -- the loop ---------------------------------------------------------------------------

    cdef bint route(self, const char *chan, size_t clen, const char *payload, size_t plen,
                     int32_t pid, Position *w, bint expired) noexcept nogil:
        # Writes one notification (a WAL message when w is not NULL) into every entry of its
        # channel (one member of a group). False, having written it nowhere, when a blocking
        # ring (or every member of a blocking group) has no room for it yet, unless the hold
        # has `expired`: then those rings may miss it (an overflow gap counts it) and the
        # others get it. An entry that has had a WAL message already (a replay) is skipped.
        cdef Route *r = self.last
        cdef uint32_t n
        cdef int i, j
        cdef Entry *e
        cdef Producer *p
        cdef size_t rlen = w.route_len if w != NULL and w.route_len else clen
        if r == NULL or r.clen != rlen or memcmp(r.name, chan, rlen) != 0:
            r = self.find(pgl_hash(chan, rlen), chan, rlen) if rlen < 64 else NULL
            self.last = r
        if w != NULL and _after(w.commit, w.lsn, self.at_commit, self.at_lsn):
            self.at_commit = w.commit
            self.at_lsn = w.lsn
        if r == NULL:
            self.unrouted += 1
            return True
        if w != NULL and _after(w.commit, w.lsn, r.last_commit, r.last_lsn):
            r.last_commit = w.commit
            r.last_lsn = w.lsn
        if r.n == 0:
            self.unrouted += 1
            return True
        n = _record_bytes(<uint32_t>clen, <uint32_t>plen, w)
        if r.blocking and not self.fits(r, n, w):
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
            if w != NULL and not _advance(e, w):
                continue
            # (A keyed group of one still takes its keys: they stay with it when more join.)
            p = e.members[0] if e.size == 1 and e.members[0].keys == NULL else \
                _member(e, n, w, True)
            if p == NULL:
                p = _choose(e, n, True)     # cannot be, past fits(): never write to NULL
            if w != NULL and p.done_commit != 0 and _handled(p, w):
                p = _unhandled(e, w)        # a group member's after= says it had this one
                if p == NULL:
                    continue
            if _push(p, chan, <uint32_t>clen, payload, <uint32_t>plen, pid, w):
                _mark(self, p)
                if p.keys != NULL and w != NULL and w.key != 0:
                    p.keys.last_pos[_bucket(w.key)] = p.tail
            elif p.gap_reason != 0:
                self.gaps_pending = True
        return True

    cdef bint fits(self, Route *r, uint32_t n, Position *w) noexcept nogil:
        # Whether every entry can take a record of n bytes now: a blocking ring with room, a
        # group with a member that has room or may miss. Rings that cannot are marked
        # `holding` and asked to wake us when they make room; then looked at once more, so
        # that room made meanwhile is not missed (see _ring.h).
        cdef bint fits = True
        cdef int i, j
        cdef Entry *e
        for i in range(r.n):
            e = &r.entries[i]
            if e.size == 1 and (not e.members[0].block or e.members[0].block_expired
                                or n > e.members[0].cap):
                continue        # a ring that never waits (the usual case): nothing to ask
            if w != NULL and not _wants(e, w):
                continue        # it has this one already
            if _member(e, n, w, False) != NULL:
                continue
            for j in range(e.size):
                pgl_store_u32(&e.members[j].hdr.producer_waiting, 1)
            pgl_full_fence()
            if _member(e, n, w, False) != NULL:
                for j in range(e.size):
                    pgl_store_u32(&e.members[j].hdr.producer_waiting, 0)
                continue
            for j in range(e.size):
                e.members[j].holding = True
            fits = False
        return fits

    cdef uint64_t hold_end(self) noexcept nogil:
        # When the current hold passes block_timeout (ns); never for a source whose server
        # keeps what waits (a slot), so that a blocking reader loses nothing however long it
        # takes.
        if self.hold_forever:
            return UINT64_MAX
        return self.held_since + <uint64_t>(self.block_timeout * 1e9)

    cdef void hold(self, void *record) noexcept nogil:
        # route() said no room: the source keeps `record` (libpq's memory) and reads no more
        # until route() takes it.
        self.held = record
        self.held_since = _now_ns()

    cdef void end_hold(self, uint64_t now) noexcept nogil:
        # The held record went out (or was dropped): count the time it held the connection,
        # to the source and to each ring that held it.
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

    cdef int drain(self, PGconn *conn, bint streaming) noexcept nogil:
        return 0        # a source that reads nothing (each source overrides this)

    cdef uint64_t record_key(self, const unsigned char *rec) noexcept nogil:
        return 0        # a source without keys

    cdef uint64_t oldest_unconsumed(self, uint64_t bound) noexcept nogil:
        # The commit LSN of the oldest transaction some ring's reader is not done with, if
        # it is before `bound`; else `bound`.
        cdef uint64_t oldest
        cdef size_t i
        for i in range(self.n_rings):
            oldest = _oldest_pending(self.rings[i])
            if oldest and oldest < bound:
                bound = oldest
        return bound

    def set_position(self, ring_id, uint64_t commit, uint64_t lsn, uint64_t seek_lsn=0):
        """Where a WAL ring stands: it gets what comes after (commit, lsn) in the stream; with
        seek_lsn, nothing until the message at that LSN has gone by."""
        cdef Producer *p = <Producer *><size_t>self.by_id[ring_id]
        p.at_commit = commit
        p.at_lsn = lsn
        p.seek_lsn = seek_lsn

    def set_handled(self, ring_id, uint64_t commit, uint64_t lsn):
        """A group member's after=: what stands at or before (commit, lsn) in the stream it
        has handled; its group's records there go to another member, or to none."""
        cdef Producer *p = <Producer *><size_t>self.by_id[ring_id]
        p.done_commit = commit
        p.done_lsn = lsn

    def set_stream_position(self, uint64_t commit, uint64_t lsn):
        """Where the stream stands, as far as new rings are concerned: a ring added from now
        on gets what comes after (commit, lsn), unless set_position() says otherwise."""
        if _after(commit, lsn, self.at_commit, self.at_lsn):
            self.at_commit = commit
            self.at_lsn = lsn

    def trim_before(self, ring_id, uint64_t commit):
        """For a ring whose reader does not have it yet: drop the WAL messages at its start
        whose transactions committed before `commit`, and take none from now on; what it
        gets begins with what commits at or after `commit`. The number dropped."""
        cdef Producer *p = <Producer *><size_t>self.by_id[ring_id]
        cdef uint64_t pos = p.hdr.head
        cdef unsigned char *rec
        cdef uint32_t length
        cdef uint16_t kind
        cdef uint64_t dropped = 0
        while True:
            rec = pgl_rec_at(p.data, p.mask, pos, p.tail, &length)
            if rec == NULL:
                break
            kind = pgl_rec_type(rec)
            if kind == PGL_REC_WAL and pgl_rec_commit(rec) < commit:
                dropped += 1
            elif kind != PGL_REC_PAD:
                break
            pos += length
        pgl_store_release(&p.hdr.head, pos)
        pgl_store_release(&p.hdr.consumed, pos)
        p.head_cache = pos
        p.delivered -= dropped
        _oldest_pending(p)
        if _after(commit, 0, p.at_commit, p.at_lsn):
            p.at_commit = commit
            p.at_lsn = 0
        return dropped

    def route_position(self, bytes channel):
        """(commit LSN, LSN) of the newest WAL message seen on `channel` since its route was
        made, (0, 0) before any; None when it has no route (kept ones included)."""
        cdef Py_ssize_t clen = len(channel)
        cdef Route *r = self.find(pgl_hash(channel, clen), channel, clen) if 0 < clen < 64 else NULL
        if r == NULL:
            return None
        return (r.last_commit, r.last_lsn)

    def reset_positions(self, uint64_t commit=0):
        """The stream cannot go on from where it stood (a slot made again, a new server's
        history): every position past `commit` (all of them with 0) is forgotten, so that
        what the slot sends from now on is new to every ring (the source forgets its own
        positions too: WalDispatcher)."""
        cdef size_t i
        cdef Producer *p
        cdef Route *r
        for i in range(self.n_rings):
            p = self.rings[i]
            if p.at_commit >= commit:
                p.at_commit, p.at_lsn = commit, 0
                p.seek_lsn = 0
        for i in range(self.table_size):
            r = &self.table[i]
            if r.state == PGL_ROUTE_LIVE and r.last_commit >= commit:
                r.last_commit, r.last_lsn = commit, 0
        if self.at_commit >= commit:
            self.at_commit, self.at_lsn = commit, 0

    def position(self, ring_id):
        """(commit LSN, LSN) of the last WAL message a ring was given (or passed by)."""
        cdef Producer *p = <Producer *><size_t>self.by_id[ring_id]
        return (p.at_commit, p.at_lsn)

    cdef void wake(self) noexcept nogil:
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

    cdef void flush_gaps(self) noexcept nogil:
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
            _mark(self, p)
        self.gaps_pending = pending

    def dispatch(self, bytes channel, bytes payload, int pid):
        """Route one notification given from Python (tests; run() does this for the socket).
        False, having written it nowhere, when a blocking ring has no room for it."""
        self.received += 1
        cdef bint done = self.route(channel, len(channel), payload, len(payload), pid, NULL,
                                     False)
        with nogil:
            self.wake()
        return done

    def drop_held(self):
        """The connection is gone: the notification held for room goes with it (the
        reconnect gap covers it, as everything else the outage took)."""
        if self.held != NULL:
            self.end_hold(_now_ns())

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
            self.flush_gaps()
            self.wake()


# ----------------------------------------------------------------------------------------------
# The loop: every source's connection and readers, the workers' control fd, connections being
# made, in one poll().


cdef struct Polled:
    PyObject *disp             # the source's Dispatcher (borrowed: `sources` holds it)
    PGconn *conn               # its connection, NULL while there is none
    bint streaming             # the connection is in COPY BOTH
    bint want_result           # a query is in flight: RUN_RESULT once its result is ready
    bint unsent                # the query's bytes are not all out yet
    int fd                     # its fds[] slot
    bint linger                # under load: gather for the dispatcher's linger_ns, then read


def run(tuple sources, int control_fd, int timeout_ms, tuple watch=()):
    """Drain every source's connection into its rings until something needs Python:
    (RunStatus, the index in `sources` of the one it concerns, else -1).

    sources: up to four (dispatcher, connection or None, want_result) triples. Each
    source's drain() decodes what its connection read; with want_result (a query was
    sent), run() also flushes the query out and returns RUN_RESULT once its next result is
    ready (records that arrive meanwhile are routed as usual). watch: up to four
    (fd, writable) pairs to wait on as well (connections being made): RUN_WATCH. A negative
    control_fd is not watched."""
    cdef Polled polled[MAX_SOURCES]
    cdef pollfd fds[1 + 2 * MAX_SOURCES + MAX_WATCH]
    cdef int status, i, which = -1
    cdef int n = len(sources), nwatch = len(watch)
    cdef Dispatcher d
    cdef PGConnection conn
    if n > MAX_SOURCES or nwatch > MAX_WATCH:
        raise ValueError(f"at most {MAX_SOURCES} sources and {MAX_WATCH} descriptors to watch")
    for i in range(n):
        d, conn, want = sources[i]
        polled[i].disp = <PyObject *>d
        polled[i].conn = NULL if conn is None else conn.conn
        polled[i].streaming = polled[i].conn != NULL and conn.copy_both
        polled[i].want_result = polled[i].conn != NULL and want
        polled[i].unsent = False
        polled[i].fd = 1 + 2 * i
        polled[i].linger = False
    for i in range(nwatch):
        fds[1 + 2 * n + i].fd = watch[i][0]
        fds[1 + 2 * n + i].events = POLLOUT if watch[i][1] else POLLIN
    with nogil:
        status = _run(polled, n, control_fd, timeout_ms, fds, nwatch, &which)
    return (status, which)


cdef inline void _drain_last(Polled *p) noexcept nogil:
    # A failed connection's last records: what it had read before it failed still goes out.
    (<Dispatcher>p.disp).drain(p.conn, p.streaming)
    (<Dispatcher>p.disp).wake()


cdef void _drain_all(Polled *polled, int n) noexcept nogil:
    # Before Python gets a turn: what the connections hold goes out now (a failure is seen
    # by the next run(), whose first drain fails again).
    cdef int i
    for i in range(n):
        if polled[i].conn != NULL:
            (<Dispatcher>polled[i].disp).drain(polled[i].conn, polled[i].streaming)
        (<Dispatcher>polled[i].disp).wake()


cdef inline bint _under_load(Dispatcher d) noexcept nogil:
    # A read just brought records: whether the one before did too, within 4 of d's
    # lingers (0: it never lingers), with nothing held.
    cdef uint64_t now
    cdef bint busy
    if d.linger_ns == 0:
        return False
    now = _now_ns()
    busy = now - d.last_data_ns < 4 * d.linger_ns and d.held == NULL
    d.last_data_ns = now
    return busy


cdef int _run(Polled *polled, int n, int control_fd, int timeout_ms, pollfd *fds, int nwatch,
              int *which) noexcept nogil:
    cdef int rc, wait_ms, i, w
    cdef uint64_t counter
    cdef uint64_t deadline = _now_ns() + <uint64_t>timeout_ms * 1000000ULL
    cdef uint64_t now, wake_at, end, before, linger
    cdef bint expired
    cdef Polled *p
    cdef timespec ts
    for i in range(n):
        if polled[i].conn != NULL and PQsocket(polled[i].conn) < 0:
            which[0] = i
            return RUN_CONN_BAD
    while True:
        linger = 0
        for i in range(n):
            p = &polled[i]
            before = (<Dispatcher>p.disp).received
            if p.conn != NULL and (<Dispatcher>p.disp).drain(p.conn, p.streaming) < 0:
                (<Dispatcher>p.disp).wake()
                which[0] = i
                return RUN_CONN_BAD
            # A stream whose records come again within 4 lingers is under load: rather than
            # wake for each transaction the server sends alone, let it gather for a linger
            # (each record waits at most that long), so that one read, one route pass and
            # one wake-up of its readers serve many. A lone record is read at once.
            p.linger = (p.streaming and (<Dispatcher>p.disp).received != before
                        and _under_load(<Dispatcher>p.disp))
            if p.linger and (linger == 0 or (<Dispatcher>p.disp).linger_ns < linger):
                linger = (<Dispatcher>p.disp).linger_ns
            (<Dispatcher>p.disp).flush_gaps()
            (<Dispatcher>p.disp).wake()
            if p.conn != NULL and (<Dispatcher>p.disp).unsent:
                rc = PQflush(p.conn)
                if rc < 0:
                    which[0] = i
                    return RUN_CONN_BAD
                (<Dispatcher>p.disp).unsent = rc == 1
            if p.want_result:
                rc = PQflush(p.conn)
                if rc < 0:
                    which[0] = i
                    return RUN_CONN_BAD
                p.unsent = rc == 1
                if not PQisBusy(p.conn):
                    which[0] = i
                    return RUN_RESULT
        now = _now_ns()
        if now >= deadline:
            return RUN_TIMEOUT
        wake_at = deadline
        expired = False
        for i in range(n):
            if (<Dispatcher>polled[i].disp).held != NULL:
                end = (<Dispatcher>polled[i].disp).hold_end()
                if now >= end:
                    expired = True      # its drain() lets the held record go
                elif end < wake_at:
                    wake_at = end
        if expired:
            continue
        if linger and wake_at - now > linger:
            wake_at = now + linger
        wait_ms = <int>((wake_at - now + 999999) // 1000000)
        fds[0].fd = control_fd
        fds[0].events = POLLIN
        fds[0].revents = 0
        for i in range(n):
            p = &polled[i]
            # A lingering connection is not watched (the wait is the linger's); read after.
            fds[p.fd].fd = PQsocket(p.conn) if p.conn != NULL and not p.linger else -1
            # While a record is held, nothing more is read: the kernel's buffer fills, then
            # the server's queue holds the rest. The server closing its end is still seen at
            # once (POLLRDHUP), and one that vanished by our unanswered heartbeat
            # (tcp_user_timeout, or a reset from its host: POLLERR).
            fds[p.fd].events = ((POLLOUT if p.unsent or (<Dispatcher>p.disp).unsent else 0)
                                | (PGL_POLLRDHUP if (<Dispatcher>p.disp).held != NULL
                                   else POLLIN))
            fds[p.fd].revents = 0
            # Its readers' room, while a gap or a held record waits for it.
            fds[p.fd + 1].fd = ((<Dispatcher>p.disp).wake_fd
                                if (<Dispatcher>p.disp).gaps_pending
                                or (<Dispatcher>p.disp).held != NULL else -1)
            fds[p.fd + 1].events = POLLIN
            fds[p.fd + 1].revents = 0
        w = 1 + 2 * n
        for i in range(nwatch):
            fds[w + i].revents = 0
        if linger:
            ts.tv_sec = <long>((wake_at - now) // 1000000000ULL)
            ts.tv_nsec = <long>((wake_at - now) % 1000000000ULL)
            rc = ppoll(fds, w + nwatch, &ts, NULL)
        else:
            rc = poll(fds, w + nwatch, wait_ms)
        if rc < 0:
            if errno == EINTR:
                return RUN_INTERRUPTED
            which[0] = 0
            return RUN_CONN_BAD
        for i in range(n):
            p = &polled[i]
            if ((p.linger or fds[p.fd].revents & ~POLLOUT)
                    and PQconsumeInput(p.conn) == 0):
                _drain_last(p)
                which[0] = i
                return RUN_CONN_BAD
            if fds[p.fd + 1].revents:
                read((<Dispatcher>p.disp).wake_fd, &counter, 8)    # a reader made room
        for i in range(nwatch):
            if fds[w + i].revents:
                _drain_all(polled, n)
                return RUN_WATCH
        if fds[0].revents:
            _drain_all(polled, n)
            return RUN_CONTROL


cdef void _remove_ptr(Producer **arr, size_t *n, Producer *p) noexcept nogil:
    cdef size_t i
    for i in range(n[0]):
        if arr[i] == p:
            arr[i] = arr[n[0] - 1]
            n[0] -= 1
            return


cdef void _unkey(dict keymaps, Producer *p):
    # p leaves its keyed group: its keys are nobody's (handover() gives them out first).
    cdef KeyMap *keys = p.keys
    cdef size_t b
    if keys == NULL:
        return
    for b in range(KEY_BUCKETS):
        if keys.owner[b] == p:
            keys.owner[b] = NULL
        if keys.moving[b] == p:
            keys.moving[b] = NULL
    p.keys = NULL
    keys.refs -= 1
    if keys.refs == 0:
        for token, address in list(keymaps.items()):
            if address == <size_t>keys:
                del keymaps[token]
        free(keys)


cdef void _free_producer(Producer *p) noexcept nogil:
    free(p.pend)
    munmap(p.hdr, p.map_bytes)
    close(p.efd)
    free(p)


