/*
 * The shared-memory ring: one single-producer/single-consumer ring per subscription.
 * The supervisor's dispatch loop is the only producer, the subscription's reader the only
 * consumer, so the data path has no lock at all.
 *
 * Byte layout of one ring segment (an unnamed memfd, sealed against resizing, passed to the
 * reader over the control socket; nothing exists in the file system):
 *
 *   offset  size  field
 *   0       4     magic "PGLR" (0x524c4750 little endian)
 *   4       4     layout version (3)
 *   8       8     capacity: bytes in the data area, a power of two >= 16 KiB
 *   64      8     tail: total bytes ever published by the producer   (own cache line)
 *   128     8     head: total bytes ever consumed by the reader      (own cache line)
 *   136     8     consumed: the reader is done with every record before this position: it
 *                 handed each out and was asked for the next (head runs ahead of it by the
 *                 items a reader holds in its batch). Only the WAL source looks at it, to
 *                 know how far the slot may be confirmed.
 *   192     4     sleeping: 1 while the reader is (about to be) blocked in poll()
 *   196     4     producer_waiting: 1 while the producer waits for room (a gap to write)
 *   256     ...   data area, `capacity` bytes
 *
 * head and tail only grow; a position maps to data[pos & (capacity - 1)]. The producer
 * publishes records by storing tail with release ordering after writing them; the reader loads
 * tail with acquire ordering, reads, then stores head with release ordering so that the
 * producer may reuse the space. Free space is capacity - (tail - head).
 *
 * Records start 8-byte aligned; `length` is the whole record rounded up to 8 bytes:
 *
 *   0   4  length
 *   4   2  type: 1 notification, 2 gap, 3 padding, 4 WAL message
 *   6   2  notification: channel length in bytes | gap: reason (1 reconnect, 2 overflow,
 *                                                       3 restart, 4 slot)
 *   8   4  notification: sender backend pid      | gap: 8 bytes missed count,
 *   12  4  notification: payload length in bytes |      UINT64_MAX when unknown
 *   16  .. notification: channel bytes, then payload bytes (no terminators)
 *
 * A WAL message (type 4; a logical decoding message read from a replication slot) has a
 * 32-byte header: the notification's fields, `flags` (bit 0: transactional) where the pid
 * is, then its own LSN and its transaction's commit LSN (its own LSN when not
 * transactional), then the channel (the message prefix) and the content, bytes as written:
 *
 *   16  8  LSN
 *   24  8  commit LSN
 *   32  .. channel bytes, then content bytes
 *
 * A row change (a WAL record with flags bit 1 set; from the slot's publication) has the
 * same header. Its channel is the route key "\0" + op letter (I, U, D, T) + the table's oid
 * in decimal, which no message prefix can be (a prefix has no NUL); its content is
 *
 *   0   4  relation version: grows each time the table's Relation message comes (the
 *          reader decodes a Relation once per version)
 *   4   4  the transaction's xid
 *   8   4  relation length r
 *   12  8  key hash: of the row's replica identity columns (0: none), for keyed groups
 *   20  r  pgoutput's Relation message, from its relid on (namespace, name, columns)
 *   ..     pgoutput's change message, whole (I, U, D: the tuple data; T: its options)
 *
 * A record never wraps: when it does not fit before the end of the data area the producer
 * writes a padding record over the rest and starts the record at offset 0.
 *
 * Waking a sleeping reader (the io_uring SQ_NEED_WAKEUP pattern):
 *   reader:   sleeping = 1; full fence; if tail == head: poll(eventfd)    else: don't sleep
 *   producer: store tail;   full fence; if sleeping: exchange(sleeping, 0) and write(eventfd)
 * The two full fences forbid the store->load reordering that would let both sides miss each
 * other's store, so a wake-up is never lost. A spurious one costs one extra loop.
 *
 * Waking the producer is the mirror image, so that a ring holding back a gap costs the
 * supervisor no timer: a reader that never reads costs it nothing at all.
 *   producer: producer_waiting = 1; full fence; if room now: write the gap   else: wait
 *   reader:   store head;             full fence; if producer_waiting: exchange(it, 0) and
 *             write(the supervisor's wake eventfd, one for all rings)
 */
#ifndef PGL_RING_H
#define PGL_RING_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>

#define PGL_RING_MAGIC 0x524c4750u
#define PGL_RING_VERSION 3u
#define PGL_HEADER_BYTES 256u
/* A ring's capacity: a power of two that fits a 63-byte channel and a 7999-byte payload. */
#define PGL_MIN_CAPACITY (16u * 1024u)
#define PGL_MAX_CAPACITY (1024u * 1024u * 1024u)
#define PGL_RECORD_HEADER 16u
#define PGL_WAL_HEADER 32u

#define PGL_REC_NOTIFY 1u
#define PGL_REC_GAP 2u
#define PGL_REC_PAD 3u
#define PGL_REC_WAL 4u

#define PGL_GAP_RECONNECT 1u
#define PGL_GAP_OVERFLOW 2u
#define PGL_GAP_RESTART 3u
#define PGL_GAP_SLOT 4u
#define PGL_MISSED_UNKNOWN UINT64_MAX

/* A slot of the dispatcher's open-addressing channel table. */
#define PGL_ROUTE_EMPTY 0
#define PGL_ROUTE_LIVE 1
#define PGL_ROUTE_DELETED 2   /* a tombstone: lookups go past it, inserts may reuse it */

typedef struct {
    uint32_t magic;
    uint32_t version;
    uint64_t capacity;
    char _pad0[48];
    uint64_t tail;
    char _pad1[56];
    uint64_t head;
    uint64_t consumed;
    char _pad2[48];
    uint32_t sleeping;
    uint32_t producer_waiting;
    char _pad3[56];
} pgl_ring_header;

_Static_assert(sizeof(pgl_ring_header) == PGL_HEADER_BYTES, "ring header is 256 bytes");
_Static_assert(offsetof(pgl_ring_header, tail) == 64, "tail on its own cache line");
_Static_assert(offsetof(pgl_ring_header, head) == 128, "head on its own cache line");
_Static_assert(offsetof(pgl_ring_header, consumed) == 136, "consumed beside head");
_Static_assert(offsetof(pgl_ring_header, sleeping) == 192, "sleeping on its own cache line");
_Static_assert(offsetof(pgl_ring_header, producer_waiting) == 196, "beside sleeping");

static inline uint64_t pgl_load_acquire(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void pgl_store_release(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline uint32_t pgl_load_u32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void pgl_store_u32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t pgl_exchange_u32(uint32_t *p, uint32_t v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
static inline void pgl_full_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void pgl_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline uint32_t pgl_align8(uint32_t n) { return (n + 7u) & ~7u; }

/* The record descriptor: each field of a record (drawn above) is read and written here and
 * nowhere else (after Agrona's RecordDescriptor). Records start 8-byte aligned, so every
 * field is naturally aligned. */
#define PGL_REC_LENGTH_AT 0u
#define PGL_REC_TYPE_AT 4u
#define PGL_REC_CHANNEL_LEN_AT 6u   /* notification */
#define PGL_REC_GAP_REASON_AT 6u    /* gap */
#define PGL_REC_PID_AT 8u           /* notification */
#define PGL_REC_PAYLOAD_LEN_AT 12u  /* notification */
#define PGL_REC_MISSED_AT 8u        /* gap */
#define PGL_REC_FLAGS_AT 8u         /* WAL message */
#define PGL_REC_LSN_AT 16u          /* WAL message */
#define PGL_REC_COMMIT_AT 24u       /* WAL message */
#define PGL_WAL_TRANSACTIONAL 1u
#define PGL_WAL_CHANGE 2u           /* a row change (see below), not a message */

static inline uint32_t pgl_rec_length(const unsigned char *rec) { return *(const uint32_t *)(rec + PGL_REC_LENGTH_AT); }
static inline uint16_t pgl_rec_type(const unsigned char *rec) { return *(const uint16_t *)(rec + PGL_REC_TYPE_AT); }
static inline uint16_t pgl_rec_channel_len(const unsigned char *rec) { return *(const uint16_t *)(rec + PGL_REC_CHANNEL_LEN_AT); }
static inline int32_t pgl_rec_pid(const unsigned char *rec) { return *(const int32_t *)(rec + PGL_REC_PID_AT); }
static inline uint32_t pgl_rec_payload_len(const unsigned char *rec) { return *(const uint32_t *)(rec + PGL_REC_PAYLOAD_LEN_AT); }
static inline const char *pgl_rec_channel(const unsigned char *rec) { return (const char *)rec + PGL_RECORD_HEADER; }
static inline const char *pgl_rec_payload(const unsigned char *rec) { return (const char *)rec + PGL_RECORD_HEADER + pgl_rec_channel_len(rec); }
static inline uint16_t pgl_rec_gap_reason(const unsigned char *rec) { return *(const uint16_t *)(rec + PGL_REC_GAP_REASON_AT); }
static inline uint64_t pgl_rec_missed(const unsigned char *rec) { return *(const uint64_t *)(rec + PGL_REC_MISSED_AT); }

static inline uint32_t pgl_rec_flags(const unsigned char *rec) { return *(const uint32_t *)(rec + PGL_REC_FLAGS_AT); }
static inline uint64_t pgl_rec_lsn(const unsigned char *rec) { return *(const uint64_t *)(rec + PGL_REC_LSN_AT); }
static inline uint64_t pgl_rec_commit(const unsigned char *rec) { return *(const uint64_t *)(rec + PGL_REC_COMMIT_AT); }
static inline const char *pgl_wal_channel(const unsigned char *rec) { return (const char *)rec + PGL_WAL_HEADER; }
static inline const char *pgl_wal_payload(const unsigned char *rec) { return (const char *)rec + PGL_WAL_HEADER + pgl_rec_channel_len(rec); }

/* Walking the records: the one way every walk of a ring reads them (the reader taking
 * them; the supervisor counting what a reader has not read, handing a group member's records
 * over, trimming a resumed ring's start). A record's length is checked before it is trusted,
 * as Agrona does: at least a length and a type (8 bytes), 8-byte aligned, and not past `end`,
 * the tail as the walker knows it, so that a walk never loops for ever nor reads what was not
 * published. */

/* The record at `pos`, its length in *length; NULL at `end` (*length 0) and at a length that
 * cannot be one. */
static inline unsigned char *pgl_rec_at(unsigned char *data, uint64_t mask, uint64_t pos,
                                        uint64_t end, uint32_t *length) {
    unsigned char *rec;
    if (pos >= end) {
        *length = 0;
        return NULL;
    }
    rec = data + (pos & mask);
    *length = pgl_rec_length(rec);
    if (*length < 8u || (*length & 7u) || *length > end - pos)
        return NULL;
    return rec;
}

/* A walk from `pos` to `end`: pgl_walk_next() gives each record in turn and moves past it. */
typedef struct {
    unsigned char *data;
    uint64_t mask;
    uint64_t pos;           /* where the next record starts */
    uint64_t end;
} pgl_walk;

static inline pgl_walk pgl_walk_from(unsigned char *data, uint64_t mask, uint64_t pos,
                                     uint64_t end) {
    pgl_walk w = {data, mask, pos, end};
    return w;
}

/* The next record, the walk moved past it; NULL at the end, or at a record that cannot be
 * one (the walk stays at it). */
static inline unsigned char *pgl_walk_next(pgl_walk *w) {
    uint32_t length;
    unsigned char *rec = pgl_rec_at(w->data, w->mask, w->pos, w->end, &length);
    if (rec != NULL)
        w->pos += length;
    return rec;
}

static inline void pgl_rec_head(unsigned char *rec, uint32_t length, uint16_t type) {
    *(uint32_t *)(rec + PGL_REC_LENGTH_AT) = length;
    *(uint16_t *)(rec + PGL_REC_TYPE_AT) = type;
}

/* A notification record of `length` bytes (already rounded up). */
static inline void pgl_rec_write_notify(unsigned char *rec, uint32_t length, const char *chan,
                                        uint16_t clen, const char *payload, uint32_t plen,
                                        int32_t pid) {
    pgl_rec_head(rec, length, PGL_REC_NOTIFY);
    *(uint16_t *)(rec + PGL_REC_CHANNEL_LEN_AT) = clen;
    *(int32_t *)(rec + PGL_REC_PID_AT) = pid;
    *(uint32_t *)(rec + PGL_REC_PAYLOAD_LEN_AT) = plen;
    memcpy(rec + PGL_RECORD_HEADER, chan, clen);
    memcpy(rec + PGL_RECORD_HEADER + clen, payload, plen);
}

/* A WAL message record of `length` bytes (already rounded up). */
static inline void pgl_rec_write_wal(unsigned char *rec, uint32_t length, const char *chan,
                                     uint16_t clen, const char *payload, uint32_t plen,
                                     uint32_t flags, uint64_t lsn, uint64_t commit) {
    pgl_rec_head(rec, length, PGL_REC_WAL);
    *(uint16_t *)(rec + PGL_REC_CHANNEL_LEN_AT) = clen;
    *(uint32_t *)(rec + PGL_REC_FLAGS_AT) = flags;
    *(uint32_t *)(rec + PGL_REC_PAYLOAD_LEN_AT) = plen;
    *(uint64_t *)(rec + PGL_REC_LSN_AT) = lsn;
    *(uint64_t *)(rec + PGL_REC_COMMIT_AT) = commit;
    memcpy(rec + PGL_WAL_HEADER, chan, clen);
    memcpy(rec + PGL_WAL_HEADER + clen, payload, plen);
}

static inline void pgl_rec_write_gap(unsigned char *rec, uint16_t reason, uint64_t missed) {
    pgl_rec_head(rec, PGL_RECORD_HEADER, PGL_REC_GAP);
    *(uint16_t *)(rec + PGL_REC_GAP_REASON_AT) = reason;
    *(uint64_t *)(rec + PGL_REC_MISSED_AT) = missed;
}

/* 64-bit FNV-1a: channel names are at most 63 bytes, so this is cheap and good enough. */
static inline uint64_t pgl_hash(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) { h ^= (unsigned char)s[i]; h *= 1099511628211ULL; }
    return h;
}

#endif
