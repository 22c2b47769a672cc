# The ring's C side: layout, atomics and hash live in _ring.h (the byte layout is drawn there).
from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t


cdef extern from "_ring.h" nogil:
    const uint32_t PGL_RING_MAGIC
    const uint32_t PGL_RING_VERSION
    const uint32_t PGL_HEADER_BYTES
    const uint32_t PGL_MIN_CAPACITY
    const uint32_t PGL_MAX_CAPACITY
    const uint32_t PGL_RECORD_HEADER
    const uint32_t PGL_WAL_HEADER
    const uint32_t PGL_WAL_TRANSACTIONAL
    const uint32_t PGL_WAL_CHANGE
    const uint16_t PGL_REC_NOTIFY
    const uint16_t PGL_REC_GAP
    const uint16_t PGL_REC_PAD
    const uint16_t PGL_REC_WAL
    const uint16_t PGL_GAP_RECONNECT
    const uint16_t PGL_GAP_OVERFLOW
    const uint16_t PGL_GAP_RESTART
    const uint16_t PGL_GAP_SLOT
    const uint64_t PGL_MISSED_UNKNOWN
    const int PGL_ROUTE_EMPTY
    const int PGL_ROUTE_LIVE
    const int PGL_ROUTE_DELETED

    ctypedef struct pgl_ring_header:
        uint32_t magic
        uint32_t version
        uint64_t capacity
        uint64_t tail
        uint64_t head
        uint64_t consumed
        uint32_t sleeping
        uint32_t producer_waiting

    uint64_t pgl_load_acquire(const uint64_t *p)
    void pgl_store_release(uint64_t *p, uint64_t v)
    uint32_t pgl_load_u32(const uint32_t *p)
    void pgl_store_u32(uint32_t *p, uint32_t v)
    uint32_t pgl_exchange_u32(uint32_t *p, uint32_t v)
    void pgl_full_fence()
    void pgl_cpu_relax()
    uint32_t pgl_align8(uint32_t n)

    unsigned char *pgl_rec_at(unsigned char *data, uint64_t mask, uint64_t pos, uint64_t end,
                              uint32_t *length)
    ctypedef struct pgl_walk:
        uint64_t pos
        uint64_t end
    pgl_walk pgl_walk_from(unsigned char *data, uint64_t mask, uint64_t pos, uint64_t end)
    unsigned char *pgl_walk_next(pgl_walk *w)

    uint32_t pgl_rec_length(const unsigned char *rec)
    uint16_t pgl_rec_type(const unsigned char *rec)
    uint16_t pgl_rec_channel_len(const unsigned char *rec)
    int32_t pgl_rec_pid(const unsigned char *rec)
    uint32_t pgl_rec_payload_len(const unsigned char *rec)
    const char *pgl_rec_channel(const unsigned char *rec)
    const char *pgl_rec_payload(const unsigned char *rec)
    uint32_t pgl_rec_flags(const unsigned char *rec)
    uint64_t pgl_rec_lsn(const unsigned char *rec)
    uint64_t pgl_rec_commit(const unsigned char *rec)
    const char *pgl_wal_channel(const unsigned char *rec)
    const char *pgl_wal_payload(const unsigned char *rec)
    uint16_t pgl_rec_gap_reason(const unsigned char *rec)
    uint64_t pgl_rec_missed(const unsigned char *rec)
    void pgl_rec_head(unsigned char *rec, uint32_t length, uint16_t type)
    void pgl_rec_write_notify(unsigned char *rec, uint32_t length, const char *chan,
                              uint16_t clen, const char *payload, uint32_t plen, int32_t pid)
    void pgl_rec_write_wal(unsigned char *rec, uint32_t length, const char *chan,
                           uint16_t clen, const char *payload, uint32_t plen,
                           uint32_t flags, uint64_t lsn, uint64_t commit)
    void pgl_rec_write_gap(unsigned char *rec, uint16_t reason, uint64_t missed)
    uint64_t pgl_hash(const char *s, size_t n)
