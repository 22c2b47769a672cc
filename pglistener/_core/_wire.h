/*
 * The streaming replication protocol's integers: big-endian, at any alignment (the
 * PostgreSQL docs, "Streaming Replication Protocol" and "Logical Replication Message
 * Formats"; the layouts are drawn where wal/decoder.pyx reads them).
 */
#ifndef PGL_WIRE_H
#define PGL_WIRE_H

#include <stdint.h>
#include <string.h>
#include <sys/time.h>

static inline uint64_t pgl_be64(const char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return __builtin_bswap64(v);
}

static inline uint32_t pgl_be32(const char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return __builtin_bswap32(v);
}

static inline void pgl_put_be64(char *p, uint64_t v) {
    v = __builtin_bswap64(v);
    memcpy(p, &v, 8);
}

static inline void pgl_put_be32(char *p, uint32_t v) {
    v = __builtin_bswap32(v);
    memcpy(p, &v, 4);
}

/* Microseconds since 2000-01-01 00:00 UTC, PostgreSQL's timestamp epoch. */
static inline int64_t pgl_pg_now_us(void) {
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return ((int64_t)tv.tv_sec - 946684800LL) * 1000000LL + tv.tv_usec;
}

#endif
