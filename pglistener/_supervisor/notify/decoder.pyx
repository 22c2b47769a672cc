# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The LISTEN/NOTIFY source: its decoder, on the dispatch core (dispatch.pyx).

libpq parses the notifications off the socket (PQconsumeInput, in the core's run()); drain()
takes each (PQnotifies) and routes it by channel, with the sender's pid and no position. A
notification that a blocking ring has no room for is held, and nothing more is taken until it
goes (or block_timeout passes: then the rings without room miss it, as an overflow Gap says).
"""

from libc.stdint cimport uint64_t
from libc.string cimport strlen

from pglistener._core.dispatch cimport Dispatcher
from pglistener._core._libpq cimport PGconn, PGnotify, PQfreemem, PQnotifies
from pglistener._core._poll cimport now_ns as _now_ns


cdef class NotifyDispatcher(Dispatcher):
    """The NOTIFY source's routes and rings; run() drains its LISTEN connection."""

    cdef int drain(self, PGconn *conn, bint streaming) noexcept nogil:
        cdef PGnotify *note
        cdef uint64_t now
        while True:
            note = <PGnotify *>self.held
            if note == NULL:
                note = PQnotifies(conn)
                if note == NULL:
                    return 0
                self.received += 1
                if not self.route(note.relname, strlen(note.relname), note.extra,
                                  strlen(note.extra), note.be_pid, NULL, False):
                    self.hold(note)         # nothing more off the connection until then
                    return 0
                PQfreemem(note)
            else:
                now = _now_ns()
                if not self.route(note.relname, strlen(note.relname), note.extra,
                                  strlen(note.extra), note.be_pid, NULL,
                                  now >= self.hold_end()):
                    return 0
                self.end_hold(now)
