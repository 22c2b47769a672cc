# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled core: the supervisor's dispatch loop and the readers' side of the rings.

Policy (LISTEN bookkeeping, reconnects, logging) stays in Python; this module only drains the
libpq socket, finds each channel's subscribers by hash, writes records into their rings, wakes
sleeping readers, and returns a status code. The ring's byte layout is drawn in _ring.h.
"""

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from cpython.pythread cimport (
    NOWAIT_LOCK, PY_LOCK_ACQUIRED, PY_LOCK_INTR, PyThread_acquire_lock, PyThread_allocate_lock,
    PyThread_free_lock, PyThread_release_lock, PyThread_type_lock,
)
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcmp, memcpy, strerror, strlen
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.stat cimport fstat, struct_stat
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport close, read, write

from pglistener._libpq cimport (
    PGL_BUILT_LIBPQ_VERSION, PGconn, PGnotify, PQconsumeInput, PQflush, PQfreemem, PQisBusy,
    PQlibVersion, PQnotifies, PQsocket,
)
from pglistener._poll cimport POLLERR, POLLHUP, POLLIN, POLLNVAL, POLLOUT, poll, pollfd
from pglistener._ring cimport *

import os as _os

from pglistener.errors import PGListenerError, SubscriptionClosed, SupervisorGone


cdef extern from *:
    # POLLRDHUP needs _GNU_SOURCE in <poll.h>; its value is fixed by the Linux ABI.
    """
    #define PGL_POLLRDHUP 0x2000
    """
    const short PGL_POLLRDHUP


cdef extern from "<sys/eventfd.h>" nogil:
    const int EFD_NONBLOCK
    const int EFD_CLOEXEC
    int eventfd(unsigned int initval, int flags)


cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    const int MSG_DONTWAIT
    const int MSG_NOSIGNAL


cdef extern from *:
    # An awaitable whose result is already there, in plain C: awaiting it gives `value` at
    # once. Through am_send (Python 3.10, 3.11) it returns the value with no exception at all;
    # through tp_iternext (3.12+) it sets StopIteration(value). Cython code raising
    # StopIteration would add a traceback entry (a frame) per item.
    """
    typedef struct {
        PyObject_HEAD
        PyObject *value;
    } pgl_ReadyObject;

    static void pgl_ready_dealloc(PyObject *self) {
        Py_XDECREF(((pgl_ReadyObject *)self)->value);
        PyObject_Free(self);
    }

    static PyObject *pgl_ready_self(PyObject *self) { Py_INCREF(self); return self; }

    static PyObject *pgl_ready_next(PyObject *self) {
        PyObject *value = ((pgl_ReadyObject *)self)->value, *exc;
        ((pgl_ReadyObject *)self)->value = NULL;
        if (value == NULL) {            /* awaited again: None, like a finished coroutine */
            PyErr_SetNone(PyExc_StopIteration);
            return NULL;
        }
        /* StopIteration(value) built here, so that a tuple value is not unpacked */
        exc = PyObject_CallOneArg(PyExc_StopIteration, value);
        Py_DECREF(value);
        if (exc != NULL) {
            PyErr_SetObject(PyExc_StopIteration, exc);
            Py_DECREF(exc);
        }
        return NULL;
    }

    static PyObject *pgl_ready_send(PyObject *self, PyObject *arg) {
        return pgl_ready_next(self);
    }

    static PyObject *pgl_ready_throw(PyObject *self, PyObject *args) {
        PyObject *typ, *val = NULL, *tb = NULL;
        Py_CLEAR(((pgl_ReadyObject *)self)->value);
        if (!PyArg_UnpackTuple(args, "throw", 1, 3, &typ, &val, &tb))
            return NULL;
        if (PyExceptionInstance_Check(typ))
            PyErr_SetObject((PyObject *)Py_TYPE(typ), typ);
        else if (val != NULL && val != Py_None)
            PyErr_SetObject(typ, val);
        else
            PyErr_SetNone(typ);
        return NULL;
    }

    static PyObject *pgl_ready_close(PyObject *self, PyObject *unused) {
        Py_CLEAR(((pgl_ReadyObject *)self)->value);
        Py_RETURN_NONE;
    }

    #if PY_VERSION_HEX >= 0x030A0000
    static PySendResult pgl_ready_am_send(PyObject *self, PyObject *arg, PyObject **result) {
        PyObject *value = ((pgl_ReadyObject *)self)->value;
        ((pgl_ReadyObject *)self)->value = NULL;
        if (value == NULL) {
            Py_INCREF(Py_None);
            value = Py_None;
        }
        *result = value;                /* the reference moves to the caller */
        return PYGEN_RETURN;
    }
    #endif

    static PyAsyncMethods pgl_ready_async = {
        pgl_ready_self,                 /* am_await */
        0, 0,                           /* am_aiter, am_anext */
    #if PY_VERSION_HEX >= 0x030A0000
        pgl_ready_am_send,
    #endif
    };

    static PyMethodDef pgl_ready_methods[] = {
        {"send", pgl_ready_send, METH_O, NULL},
        {"throw", pgl_ready_throw, METH_VARARGS, NULL},
        {"close", pgl_ready_close, METH_NOARGS, NULL},
        {NULL, NULL, 0, NULL},
    };

    static PyTypeObject pgl_ReadyType = {
        PyVarObject_HEAD_INIT(NULL, 0)
        "pglistener._dispatch.Ready",   /* tp_name */
        sizeof(pgl_ReadyObject),        /* tp_basicsize */
    };

    static int pgl_ready_init(void) {
        pgl_ReadyType.tp_dealloc = pgl_ready_dealloc;
        pgl_ReadyType.tp_as_async = &pgl_ready_async;
        pgl_ReadyType.tp_flags = Py_TPFLAGS_DEFAULT;
        pgl_ReadyType.tp_doc = "An awaitable whose result is already there.";
        pgl_ReadyType.tp_iter = pgl_ready_self;
        pgl_ReadyType.tp_iternext = pgl_ready_next;
        pgl_ReadyType.tp_methods = pgl_ready_methods;
        return PyType_Ready(&pgl_ReadyType);
    }

    static PyObject *pgl_ready_new(PyObject *value) {
        pgl_ReadyObject *self = PyObject_New(pgl_ReadyObject, &pgl_ReadyType);
        if (self == NULL)
            return NULL;
        Py_INCREF(value);
        self->value = value;
        return (PyObject *)self;
    }
    """
    int pgl_ready_init() except -1
    object pgl_ready_new(object value)


if pgl_ready_init() < 0:
    raise ImportError("pglistener._dispatch: cannot set up its awaitable type")


cdef extern from "pythread.h":
    # Not in Cython's cpython/pythread.pxd; public C API since Python 3.2.
    ctypedef long long PY_TIMEOUT_T
    int PyThread_acquire_lock_timed(PyThread_type_lock lock, PY_TIMEOUT_T microseconds,
                                    int intr_flag) nogil


# Status codes returned by Dispatcher.run() and RingReader.wait(); the Python side maps them.
cpdef enum RunStatus:
    RUN_TIMEOUT = 0        # the deadline passed: Python gets a turn (heartbeat, retries)
    RUN_CONTROL = 1        # the control fd is readable: a worker or the owner wants something
    RUN_CONN_BAD = 2       # PQconsumeInput failed or the socket is gone: reconnect
    RUN_INTERRUPTED = 3    # a signal arrived: let Python run its handlers
    RUN_RESULT = 4         # want_result: the query's next result is ready (PQgetResult won't block)

cpdef enum WaitStatus:
    WAIT_READY = 0         # data may be there (a wake-up can be spurious: read and loop)
    WAIT_TIMEOUT = 1
    WAIT_PEER_GONE = 2     # the supervisor's end of the control socket is closed
    WAIT_INTERRUPTED = 3
    WAIT_FAILED = 4        # poll() itself failed (errno in the reader's wait_errno)

_GAP_REASONS = {PGL_GAP_RECONNECT: "reconnect", PGL_GAP_OVERFLOW: "overflow",
                PGL_GAP_RESTART: "restart"}
_GAP_CODES = {"reconnect": PGL_GAP_RECONNECT, "restart": PGL_GAP_RESTART}  # mark_gap's

MIN_CAPACITY = 16 * 1024          # a 63-byte channel and a 7999-byte payload must fit
MAX_CAPACITY = 1024 * 1024 * 1024
HEADER_BYTES = PGL_HEADER_BYTES

def libpq_version():
    """Version of the libpq this module is linked to at run time (PQlibVersion())."""
    return PQlibVersion()


def built_libpq_version():
    """Version of the libpq headers this module was compiled against."""
    return PGL_BUILT_LIBPQ_VERSION


cdef inline uint64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec


# ----------------------------------------------------------------------------------------------
# Items a reader sees


@cython.freelist(256)
@cython.final
cdef class Notification:
    """One notification: `channel`, `payload` (both str) and the sender's backend `pid`."""

    cdef readonly str channel
    cdef readonly str payload
    cdef readonly int pid

    def __init__(self, str channel, str payload, int pid):
        self.channel = channel
        self.payload = payload
        self.pid = pid

    def __repr__(self):
        return f"Notification(channel={self.channel!r}, payload={self.payload!r}, pid={self.pid})"

    def __eq__(self, other):
        if not isinstance(other, Notification):
            return NotImplemented
        cdef Notification o = <Notification>other
        return self.channel == o.channel and self.payload == o.payload and self.pid == o.pid

    def __hash__(self):
        return hash((self.channel, self.payload, self.pid))

    def __reduce__(self):
        return (Notification, (self.channel, self.payload, self.pid))


@cython.final
cdef class Gap:
    """The place in a stream where notifications may be missing.

    `reason` is "reconnect" (the connection was lost: what was sent meanwhile is gone, `missed`
    is None), "overflow" (this reader's ring was full: `missed` is the exact count) or
    "restart" (the first item of a pool worker that was restarted: what was sent while no one
    read for it is gone, `missed` is None).
    """

    cdef readonly str reason
    cdef readonly object missed

    def __init__(self, str reason, missed=None):
        if reason not in _GAP_CODES and reason != "overflow":
            raise ValueError(
                f"Gap reason must be 'reconnect', 'overflow' or 'restart', not {reason!r}")
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
# Producer side: lives in the supervisor process, written only by the dispatch loop.


cdef struct Producer:
    pgl_ring_header *hdr
    unsigned char *data
    uint64_t cap
    uint64_t mask
    uint64_t tail              # our copy of hdr.tail: we are its only writer
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
    pgl_store_release(&p.hdr.tail, p.tail)
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
    pgl_store_release(&p.hdr.tail, p.tail)
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
        if capacity < MIN_CAPACITY or capacity > MAX_CAPACITY or capacity & (capacity - 1):
            raise ValueError(
                f"ring capacity must be a power of two between {MIN_CAPACITY} and "
                f"{MAX_CAPACITY} bytes, not {capacity}")
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

    def run(self, size_t pgconn_ptr, int control_fd, int timeout_ms, bint want_result=False):
        """Drain the connection into the rings until something needs Python; see RUN_*.

        With want_result (a query was sent), also flush it out and return RUN_RESULT once its
        next result is ready; notifications that arrive meanwhile are routed as usual. A
        negative control_fd is not watched."""
        cdef int status
        with nogil:
            status = self._run(<PGconn *>pgconn_ptr, control_fd, timeout_ms, want_result)
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


# ----------------------------------------------------------------------------------------------
# Consumer side: lives in a worker process, one reader per subscription.


@cython.final
cdef class RingReader:
    """The reading end of one subscription's ring: records in, items out, nothing else (the
    Stream around it adds threads, closing and the supervisor)."""

    cdef pgl_ring_header *hdr
    cdef unsigned char *data
    cdef uint64_t cap
    cdef uint64_t mask
    cdef uint64_t head
    cdef uint64_t tail_cache
    cdef size_t map_bytes
    cdef int efd
    cdef int ctrl_fd
    cdef int wake_fd              # the supervisor's wake eventfd, ours to close (-1: none)
    cdef str last_channel         # channels repeat: decode each name once
    cdef char last_raw[64]
    cdef uint16_t last_len
    cdef readonly int wait_errno      # what made poll() fail, with WAIT_FAILED

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
        self.head = pgl_load_acquire(&self.hdr.head)
        self.tail_cache = self.head
        self.efd = efd
        self.ctrl_fd = ctrl_fd
        self.wake_fd = wake_fd
        self.last_len = 0xffff

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

    cdef inline void _publish(self) noexcept nogil:
        # Hand the bytes consumed so far back to the producer, and wake it if it waits for
        # room (see _ring.h; the fence orders our head store before the flag's load).
        cdef uint64_t one = 1
        pgl_store_release(&self.hdr.head, self.head)
        pgl_full_fence()
        if (pgl_load_u32(&self.hdr.producer_waiting)
                and pgl_exchange_u32(&self.hdr.producer_waiting, 0) and self.wake_fd >= 0):
            write(self.wake_fd, &one, 8)

    @property
    def capacity(self):
        return self.cap

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
        cdef uint32_t plen
        cdef uint64_t missed
        cdef Notification note
        cdef Gap gap
        while self._available():
            rec = self.data + (self.head & self.mask)
            length = pgl_rec_length(rec)
            kind = pgl_rec_type(rec)
            if not self._sound(length):
                raise PGListenerError(f"corrupt ring record (length {length})")
            if kind == PGL_REC_NOTIFY:
                clen = pgl_rec_channel_len(rec)
                plen = pgl_rec_payload_len(rec)
                if PGL_RECORD_HEADER + clen + plen > length:
                    raise PGListenerError(f"corrupt ring record (length {length})")
                note = Notification.__new__(Notification)
                note.channel = self._channel(pgl_rec_channel(rec), clen)
                note.payload = PyUnicode_DecodeUTF8(pgl_rec_payload(rec), plen, "surrogateescape")
                note.pid = pgl_rec_pid(rec)
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

    cdef inline bint _sound(self, uint32_t length) noexcept nogil:
        # Only the supervisor writes here, but a length like this would loop for ever (0) or
        # read past what was published: checked before it is trusted, as Agrona does.
        return length >= 8 and not (length & 7) and length <= self.tail_cache - self.head

    cdef str _channel(self, const char *raw, uint16_t clen):
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
                rec = self.data + (self.head & self.mask)
                length = pgl_rec_length(rec)
                if not self._sound(length):
                    corrupt = True
                    break
                kind = pgl_rec_type(rec)
                if kind == PGL_REC_NOTIFY:
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
        cdef pollfd fds[2]
        cdef uint64_t buf
        cdef uint64_t spin_end
        cdef int rc
        if self._available():
            return WAIT_READY
        if spin_us > 0:
            spin_end = _now_ns() + <uint64_t>spin_us * 1000ULL
            while _now_ns() < spin_end:
                for _ in range(64):
                    pgl_cpu_relax()
                if self._available():
                    return WAIT_READY
        if not self._announce_sleep():
            return WAIT_READY
        fds[0].fd = self.efd
        fds[0].events = POLLIN
        fds[0].revents = 0
        fds[1].fd = self.ctrl_fd
        fds[1].events = PGL_POLLRDHUP
        fds[1].revents = 0
        rc = poll(fds, 2, timeout_ms)
        pgl_store_u32(&self.hdr.sleeping, 0)
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

#: How long a blocking reader polls its ring before it sleeps on the eventfd (microseconds):
#: a notification that comes within this window skips the wake-up syscall pair. Measured side
#: by side (latency and live scenarios; 0, 20, 50 and 100 us): no longer spin beat 20 us
#: beyond the machine's noise, and a spin costs CPU at every wait.
cdef int _spin_us = 20

#: How many items a stream takes off its ring at once, to hand out without the lock.
cdef Py_ssize_t _BATCH = 128

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
            self._reader._publish()
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
        self._ring_into(batch, _BATCH)
        if not batch:
            return _empty
        self.held = batch
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

    cdef int _ring_into(self, list out, Py_ssize_t max_items) except -1:
        # With the lock: append items off the ring until `out` holds max_items or the ring
        # is empty.
        cdef object item
        while len(out) < max_items:
            item = self._next_item()
            if item is _empty:
                break
            out.append(item)
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
        self.closed = True
        self.held = []              # taken but never handed out: dropped with the stream
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
