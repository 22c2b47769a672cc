# The ring's C side: layout, atomics and hash live in _ring.h (the byte layout is drawn there).
from libc.stdint cimport uint16_t, uint32_t, uint64_t


cdef extern from "_ring.h" nogil:
    const uint32_t PGL_RING_MAGIC
    const uint32_t PGL_RING_VERSION
    const uint32_t PGL_HEADER_BYTES
    const uint32_t PGL_RECORD_HEADER
    const uint16_t PGL_REC_NOTIFY
    const uint16_t PGL_REC_GAP
    const uint16_t PGL_REC_PAD
    const uint16_t PGL_GAP_RECONNECT
    const uint16_t PGL_GAP_OVERFLOW
    const uint16_t PGL_GAP_RESTART
    const uint64_t PGL_MISSED_UNKNOWN

    ctypedef struct pgl_ring_header:
        uint32_t magic
        uint32_t version
        uint64_t capacity
        uint64_t tail
        uint64_t head
        uint32_t sleeping

    uint64_t pgl_load_acquire(const uint64_t *p)
    void pgl_store_release(uint64_t *p, uint64_t v)
    uint32_t pgl_load_u32(const uint32_t *p)
    void pgl_store_u32(uint32_t *p, uint32_t v)
    uint32_t pgl_exchange_u32(uint32_t *p, uint32_t v)
    void pgl_full_fence()
    void pgl_cpu_relax()
    uint32_t pgl_align8(uint32_t n)
    uint64_t pgl_hash(const char *s, size_t n)
