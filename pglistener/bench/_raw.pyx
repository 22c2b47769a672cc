# cython: language_level=3, boundscheck=False, wraparound=False
"""The benchmark's `raw` system: a C drain loop on one connection, no routing and no IPC.

It is the ceiling of one connection on this machine: what PQconsumeInput + PQnotifies can
take off the socket. It links libpq itself (the same one as ours) and makes its own
connections, so it needs no psycopg implementation in particular.
wal_drain() is the same for the WAL source: a replication connection and nothing else.
"""

from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc, strtoll
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from pglistener._core._libpq cimport *
from pglistener._core._poll cimport POLLIN, poll, pollfd


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline bint _wait(PGconn *conn, pollfd *fd, int64_t deadline) noexcept nogil:
    # Wait for the socket until the deadline, then read it; False: give up (the deadline
    # passed, or the connection failed).
    cdef int64_t now = _now_ns()
    if now >= deadline:
        return False
    poll(fd, 1, <int>((deadline - now) // 1000000) + 1)
    return PQconsumeInput(conn) != 0


cdef class Listener:
    """A LISTEN connection of its own, on libpq directly (blocking: it is the bench's):
    whatever psycopg implementation is installed, the C loop is the same."""

    cdef PGconn *conn

    def __cinit__(self, bytes conninfo, bytes listen):
        self.conn = PQconnectdb(conninfo)
        if PQstatus(self.conn) != CONNECTION_OK:
            raise RuntimeError(PQerrorMessage(self.conn).decode("utf-8", "replace"))
        cdef PGresult *res = PQexec(self.conn, listen)
        cdef int status = PQresultStatus(res)
        PQclear(res)
        if status != PGRES_COMMAND_OK:
            raise RuntimeError(PQerrorMessage(self.conn).decode("utf-8", "replace"))

    def __dealloc__(self):
        if self.conn != NULL:
            PQfinish(self.conn)

    @property
    def backend_pid(self):
        return PQbackendPID(self.conn)

    def drain(self, Py_ssize_t expect, int timeout_ms, bint latency=False):
        """Take notifications off the connection until `expect` arrived or timeout_ms
        passed.

        Returns (count, first_ns, end_ns, latencies_ns): CLOCK_MONOTONIC when the first and
        the last one arrived; with `latency`, each payload starts with its send time in
        CLOCK_MONOTONIC ns and latencies_ns lists arrival minus send, else it is None."""
        cdef PGconn *conn = self.conn
        cdef PGnotify *note
        cdef Py_ssize_t n = 0
        cdef int64_t *lat = NULL
        cdef int64_t first = 0, end = 0
        cdef int64_t deadline = _now_ns() + <int64_t>timeout_ms * 1000000
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
                    if not _wait(conn, &fd, deadline):
                        break
            lats = [lat[i] for i in range(n)] if lat != NULL else None
        finally:
            free(lat)
        return n, first, end, lats


cdef extern from "_wire.h" nogil:
    uint64_t pgl_be64(const char *p)
    void pgl_put_be64(char *p, uint64_t v)
    int64_t pgl_pg_now_us()


def wal_drain(bytes conninfo, bytes publication, Py_ssize_t expect, int timeout_ms,
              ready, bytes kind=b"M", walsender=None):
    """The WAL source's ceiling: a C loop on a replication connection of its own (libpq
    directly, conninfo with replication=database), a temporary pgoutput slot, counting the
    pgoutput messages of `kind` (b"M": logical decoding messages; b"I": inserted rows) and
    answering keepalives, until `expect` arrived or timeout_ms passed. ready() is called
    once the stream runs; walsender(pid), when given, just before it and again before the
    connection closes (the walsender's pid: its CPU over the drain, timed by the caller).

    Returns (count, first_ns, end_ns) in CLOCK_MONOTONIC."""
    cdef PGconn *conn = PQconnectdb(conninfo)
    cdef PGresult *res
    cdef char *buf
    cdef char reply[34]
    cdef int n
    cdef Py_ssize_t count = 0
    cdef int64_t first = 0, end = 0, deadline
    cdef uint64_t wal_end
    cdef pollfd fd
    cdef char want = kind[0]
    try:
        if PQstatus(conn) != CONNECTION_OK:
            raise RuntimeError(PQerrorMessage(conn).decode())
        for sql in (b"CREATE_REPLICATION_SLOT pglistener_bench_raw TEMPORARY LOGICAL pgoutput "
                    b"NOEXPORT_SNAPSHOT",
                    b"START_REPLICATION SLOT pglistener_bench_raw LOGICAL 0/0 (proto_version "
                    b"'1', publication_names '" + publication + b"', messages 'true')"):
            res = PQexec(conn, sql)
            status = PQresultStatus(res)
            PQclear(res)
            if status not in (PGRES_TUPLES_OK, PGRES_COMMAND_OK, PGRES_COPY_BOTH):
                raise RuntimeError(PQerrorMessage(conn).decode())
        if walsender is not None:
            walsender(PQbackendPID(conn))
        ready()
        deadline = _now_ns() + <int64_t>timeout_ms * 1000000
        with nogil:
            fd.fd = PQsocket(conn)
            fd.events = POLLIN
            while count < expect:
                n = PQgetCopyData(conn, &buf, 1)
                if n > 0:
                    if buf[0] == b'w' and n > 25 and buf[25] == want:
                        end = _now_ns()
                        if count == 0:
                            first = end
                        count += 1
                    elif buf[0] == b'k' and n >= 18 and buf[17]:
                        wal_end = pgl_be64(buf + 1)
                        reply[0] = b'r'
                        pgl_put_be64(reply + 1, wal_end)
                        pgl_put_be64(reply + 9, wal_end)
                        pgl_put_be64(reply + 17, wal_end)
                        pgl_put_be64(reply + 25, <uint64_t>pgl_pg_now_us())
                        reply[33] = 0
                        PQputCopyData(conn, reply, 34)
                        PQflush(conn)
                    PQfreemem(buf)
                    continue
                if n < 0:
                    break
                if not _wait(conn, &fd, deadline):
                    break
        if walsender is not None:
            walsender(PQbackendPID(conn))
    finally:
        PQfinish(conn)
    return count, first, end
