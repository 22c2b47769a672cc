# pgoutput's messages and pglistener's change record prefix: the readers live in _pgoutput.h
# (the layouts are drawn there), used by the supervisor's decoder and the worker's reader.
from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t


cdef extern from "_pgoutput.h" nogil:
    ctypedef struct pgl_relation:
        uint32_t relid
        const char *nspname
        size_t nsplen
        const char *relname
        size_t rellen
        char identity
        uint16_t ncols
        const char *cols
        const char *end

    ctypedef struct pgl_column:
        unsigned char flags
        const char *name
        size_t name_len
        const char *type_at
        uint32_t type_oid
        int32_t typmod

    ctypedef struct pgl_columns:
        const char *at
        const char *end
        uint16_t left

    int pgl_relation_read(const char *body, size_t len, pgl_relation *r)
    pgl_columns pgl_relation_columns(const pgl_relation *r)
    int pgl_column_next(pgl_columns *it, pgl_column *c)

    ctypedef struct pgl_tuple:
        const char *at
        const char *end
        uint16_t count
        uint16_t left
        uint16_t index

    ctypedef struct pgl_datum:
        char kind
        const char *value
        uint32_t len

    int pgl_tuple_open(const char *at, const char *end, pgl_tuple *t)
    int pgl_tuple_next(pgl_tuple *t, pgl_datum *d)
    const char *pgl_tuple_skip(const char *at, const char *end)

    ctypedef struct pgl_change:
        char op
        uint32_t relid
        char old_kind
        const char *old
        const char *new_
        const char *end

    int pgl_change_read(const char *body, size_t len, pgl_change *c)
    const char *pgl_change_key_tuple(const pgl_change *c)

    int pgl_truncate_read(const char *body, size_t len, uint32_t *count)
    uint32_t pgl_truncate_relid(const char *body, uint32_t i)

    const size_t PGL_CHANGE_PREFIX

    ctypedef struct pgl_change_prefix:
        uint32_t version
        uint32_t xid
        uint32_t rlen
        uint64_t key

    void pgl_change_prefix_put(char *p, const pgl_change_prefix *x)
    int pgl_change_prefix_read(const char *p, size_t n, pgl_change_prefix *x)
    const char *pgl_channel_sep(const char *chan, size_t len)
    uint64_t pgl_channel_key(const char *chan, size_t len, size_t *route_len)
    uint64_t pgl_wal_record_key(const unsigned char *rec)
