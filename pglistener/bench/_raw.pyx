# cython: language_level=3, boundscheck=False, wraparound=False
"""The benchmark's `raw` system: a C drain loop on one connection, no routing and no IPC.

It is the ceiling of one connection on this machine: what PQconsumeInput + PQnotifies can
take off the socket. It runs on the PGconn* of a psycopg connection (same libpq as ours).
"""

from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc, strtoll
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from pglistener._libpq cimport PGconn, PGnotify, PQconsumeInput, PQfreemem, PQnotifies, PQsocket
from pglistener._poll cimport POLLIN, poll, pollfd


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


def drain(size_t pgconn_ptr, Py_ssize_t expect, int timeout_ms, bint latency=False):
    """Take notifications off the connection until `expect` arrived or timeout_ms passed.

    Returns (count, first_ns, end_ns, latencies_ns): CLOCK_MONOTONIC when the first and the
    last one arrived; with `latency`, each payload starts with its send time in CLOCK_MONOTONIC ns
    and latencies_ns lists arrival minus send, else it is None."""
    cdef PGconn *conn = <PGconn *>pgconn_ptr
    cdef PGnotify *note
    cdef Py_ssize_t n = 0
    cdef int64_t *lat = NULL
    cdef int64_t now, first = 0, end = 0, deadline = _now_ns() + <int64_t>timeout_ms * 1000000
    cdef pollfd fd
    if latency:
        lat = <int64_t *>malloc(max(expect, 1) * sizeof(int64_t))
        if lat == NULL:
            raise MemoryError()
    try:
        with nogil:
            fd.fd = PQsocket(conn)
            fd.events = POLLIN
            while n < expect:
                note = PQnotifies(conn)
                if note != NULL:
                    end = _now_ns()
                    if n == 0:
                        first = end
                    if lat != NULL:
                        lat[n] = end - strtoll(note.extra, NULL, 10)
                    n += 1
                    PQfreemem(note)
                    continue
                now = _now_ns()
                if now >= deadline:
                    break
                poll(&fd, 1, <int>((deadline - now) // 1000000) + 1)
                if PQconsumeInput(conn) == 0:
                    break
        lats = [lat[i] for i in range(n)] if lat != NULL else None
    finally:
        free(lat)
    return n, first, end, lats
