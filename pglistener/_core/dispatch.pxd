# The dispatch core's C-level interface, for the sources' decoders (notify/decoder.pyx,
# wal/decoder.pyx): a source is a Dispatcher subclass that overrides drain(), and hands each
# record it decodes to route(). The core knows no protocol.
from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t

from pglistener._core._libpq cimport PGconn, PGresult
from pglistener._core._ring cimport pgl_ring_header


cdef struct Notices:
    # What the server said on a connection beside its results (NoticeResponse: WARNING,
    # NOTICE, INFO), counted by libpq's notice receiver (on_notice) as the connection is read.
    uint64_t count             # every notice
    uint64_t skips             # WARNINGs 55000: PostgreSQL 18+'s "skipped loading publication"
    char severity[16]          # the last one's severity (not translated)
    char text[512]             # ... and its message


# libpq's notice receiver, arg a Notices box: PGConnection's own, or a decoder's
# (PQsetNoticeReceiver). Without one libpq prints each notice to the process's stderr.
cdef void on_notice(void *arg, const PGresult *res) noexcept nogil


cdef class PGConnection:
    cdef PGconn *conn
    cdef int owner_pid
    cdef readonly bint copy_both   # a result said COPY BOTH: the replication stream runs
    cdef Notices notices           # what the server said beside the results (notice_count)


cdef enum:
    KEY_BUCKETS = 1024         # a keyed group's keys, hashed into this many buckets


cdef struct KeyMap:
    # A keyed consumer group (key=True): which member each bucket of keys goes to, shared
    # by the group's entries on every route, so that one key's records go to one member
    # whatever channel or kind they come by. A bucket keeps its member while it lives.
    Producer *owner[1024]
    int refs                   # members that point here
    # A member that joined takes buckets from the others (rebalance()): a bucket moves to
    # moving[b] once its owner has consumed its last record there, which ends at
    # last_pos[b] in the owner's ring; until then it stays, so each key's order holds.
    Producer *moving[1024]
    uint64_t last_pos[1024]


cdef struct Producer:
    # One ring's writing end: lives in the supervisor process, written only by the loop.
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
    bint holding               # the held record waits for room here
    uint64_t delivered
    uint64_t missed_total
    int efd
    bint dirty                 # published since the last wake pass: in Dispatcher.dirty
    size_t map_bytes
    # Positioned records only (a slot's). Where this ring stands in the stream: the position
    # (commit LSN, LSN) of the last record it was given (a group's members share it); one at
    # or before it again (a replay from the slot after a reconnect) is not written twice.
    uint64_t at_commit
    uint64_t at_lsn
    uint64_t seek_lsn          # after= an LSN: nothing until the record at this LSN has gone
    # The transactions written here and not consumed yet, oldest first, as pairs (ring
    # position after their last record here, commit LSN): what the slot may not pass.
    uint64_t *pend
    size_t pend_first
    size_t pend_n
    size_t pend_cap            # pairs, a power of two
    KeyMap *keys               # its keyed group's map (NULL: not keyed)
    # A group member's after=: what stands at or before (done_commit, done_lsn) it has
    # handled, and goes to another member (or to none); 0: none.
    uint64_t done_commit
    uint64_t done_lsn


cdef struct Position:
    # Where a positioned record (a WAL message) stands in the stream.
    uint64_t lsn               # its own (the end of its WAL record, as the server gives it)
    uint64_t commit            # its transaction's commit LSN; lsn - 1 if not transactional
    uint64_t hold              # how far the slot may be confirmed while it is not consumed
    uint32_t flags             # PGL_WAL_TRANSACTIONAL, PGL_WAL_CHANGE
    uint64_t key               # the hash of its key (a row's replica identity); 0: none
    uint16_t route_len         # routed by the channel's first route_len bytes (0: all of
                               # it): a keyed message's channel is "channel\x1fkey"


cdef struct Entry:
    # One receiver of a channel's records: a subscription (size 1), or a consumer group,
    # whose members share the stream: each record goes to one of them.
    Producer **members
    int size
    unsigned turn              # a group's next member in turn, for ties


cdef struct Route:
    uint64_t hash
    int state                  # PGL_ROUTE_EMPTY, _LIVE or _DELETED
    int n                      # entries
    uint16_t clen
    char name[64]
    Entry *entries             # one allocation: the entries, then their members
    bint blocking              # some member waits for room (overflow="block"): fits() asks
    uint64_t last_commit       # positioned: the newest record seen on the channel (a route
    uint64_t last_lsn          # kept with no entries still counts them: see set_route(keep=))


cdef class Dispatcher:
    cdef Route *table
    cdef size_t table_size         # a power of two
    cdef size_t table_used         # live + deleted slots
    cdef Route *last               # the route found last: a backlog is mostly one channel
    cdef Producer **rings
    cdef size_t n_rings
    cdef Producer **dirty
    cdef size_t n_dirty
    cdef bint gaps_pending         # some ring holds a gap that did not fit yet
    cdef readonly int wake_fd
    cdef dict by_id                # ring id -> address of its Producer
    cdef dict keymaps              # keyed group token -> address of its KeyMap
    cdef readonly uint64_t received
    cdef readonly uint64_t unrouted
    # overflow="block": the record waiting for room in a blocking ring, taken off the
    # connection (libpq's memory: PQfreemem) but given to nobody yet; while it waits, the
    # source's drain() reads no more.
    cdef void *held
    cdef uint64_t held_since           # when the current hold began (ns), 0 if none
    cdef uint64_t held_total_ns        # finished holds, in all
    cdef public double block_timeout   # seconds a blocking ring may hold the connection
    cdef readonly uint64_t block_expiries
    # A source whose server keeps what waits (a slot) holds for as long as it takes.
    cdef bint hold_forever
    # The stream's position: the last positioned record it brought (new rings start there).
    cdef readonly uint64_t at_commit
    cdef readonly uint64_t at_lsn
    # The source has bytes for its connection that the socket did not take yet (feedback):
    # run() flushes them.
    cdef bint unsent
    # A stream under load (records again within 4 lingers of the last): run() lets it
    # gather for linger_ns before reading it again, rather than waking for each record
    # (0: never; see _run()).
    cdef public uint64_t linger_ns
    cdef uint64_t last_data_ns         # when a read last brought records

    cdef bint route(self, const char *chan, size_t clen, const char *payload, size_t plen,
                    int32_t pid, Position *w, bint expired) noexcept nogil
    cdef void hold(self, void *record) noexcept nogil
    cdef void end_hold(self, uint64_t now) noexcept nogil
    cdef uint64_t hold_end(self) noexcept nogil
    cdef uint64_t oldest_unconsumed(self, uint64_t bound) noexcept nogil
    cdef void wake(self) noexcept nogil
    cdef void flush_gaps(self) noexcept nogil
    cdef bint fits(self, Route *r, uint32_t n, Position *w) noexcept nogil
    cdef Route *find(self, uint64_t h, const char *name, size_t clen) noexcept nogil
    cdef Route *slot_for_insert(self, uint64_t h) noexcept nogil
    cdef rehash(self)
    # The source's part, overridden by each: take what the connection has read (its
    # `streaming`: in COPY BOTH) and route it; -1 when the stream failed or ended.
    cdef int drain(self, PGconn *conn, bint streaming) noexcept nogil
    # ... and the key a record in a ring is routed by in a keyed group (0: none), for the
    # records a group's leaving member hands over: the core knows no message's layout.
    cdef uint64_t record_key(self, const unsigned char *rec) noexcept nogil
