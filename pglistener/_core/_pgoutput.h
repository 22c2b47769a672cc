/*
 * pgoutput's messages, read without the GIL: the one reader of each, used by the
 * supervisor's decoder (_supervisor/wal/decoder.pyx) and the worker's reader (reader.pyx).
 * The layouts are the PostgreSQL docs' "Logical Replication Message Formats" (proto.c
 * writes them), big-endian. Every reader checks each length against the message's end: a
 * message too short for what it says is refused (-1), never read past.
 *
 * Beside them, the two layouts pglistener makes of them: a row change's record content
 * (its prefix; _ring.h draws the whole record) and a keyed message's channel (emit(key=)).
 * The dispatch core reads neither: decoders hand it the keys it routes by.
 */
#ifndef PGL_PGOUTPUT_H
#define PGL_PGOUTPUT_H

#include <stdint.h>
#include <string.h>

#include "_wire.h"
#include "_ring.h"

/* -- Relation -------------------------------------------------------------------------------
 * A table's description, from its relid on (the 'R' is not kept):
 *   [0] relid  [4] namespace\0  name\0  then the replica identity (1 byte: d, n, f, i),
 *   the column count (2), and per column: flags (1: part of the key)  name\0  type oid (4)
 *   typmod (4)
 */
typedef struct {
    uint32_t relid;
    const char *nspname;
    size_t nsplen;
    const char *relname;
    size_t rellen;
    char identity;
    uint16_t ncols;
    const char *cols;           /* the first column */
    const char *end;            /* the message's end */
} pgl_relation;

typedef struct {
    unsigned char flags;
    const char *name;
    size_t name_len;
    const char *type_at;        /* where its type oid is (a domain's is rewritten there) */
    uint32_t type_oid;
    int32_t typmod;
} pgl_column;

/* The columns one after another: pgl_column_next() until it gives 0. */
typedef struct {
    const char *at;
    const char *end;
    uint16_t left;
} pgl_columns;

static inline pgl_columns pgl_relation_columns(const pgl_relation *r) {
    pgl_columns it = {r->cols, r->end, r->ncols};
    return it;
}

/* The next column: 1, 0 when none is left, -1 when the message ends inside it. */
static inline int pgl_column_next(pgl_columns *it, pgl_column *c) {
    const char *nul;
    if (it->left == 0)
        return 0;
    if (it->at >= it->end)
        return -1;
    c->flags = (unsigned char)it->at[0];
    c->name = it->at + 1;
    nul = c->name < it->end ? (const char *)memchr(c->name, 0, it->end - c->name) : NULL;
    if (nul == NULL || it->end - (nul + 1) < 8)
        return -1;
    c->name_len = (size_t)(nul - c->name);
    c->type_at = nul + 1;
    c->type_oid = pgl_be32(nul + 1);
    c->typmod = (int32_t)pgl_be32(nul + 5);
    it->at = nul + 9;
    it->left--;
    return 1;
}

/* A Relation message from its relid on (len bytes): 0, every column readable; -1 not. */
static inline int pgl_relation_read(const char *body, size_t len, pgl_relation *r) {
    const char *end = body + len;
    const char *at;
    const char *nul;
    pgl_columns it;
    pgl_column c;
    int rc;
    if (len < 4)
        return -1;
    r->relid = pgl_be32(body);
    at = body + 4;
    nul = at < end ? (const char *)memchr(at, 0, end - at) : NULL;
    if (nul == NULL)
        return -1;
    r->nspname = at;
    r->nsplen = (size_t)(nul - at);
    at = nul + 1;
    nul = at < end ? (const char *)memchr(at, 0, end - at) : NULL;
    if (nul == NULL)
        return -1;
    r->relname = at;
    r->rellen = (size_t)(nul - at);
    at = nul + 1;
    if (end - at < 3)
        return -1;
    r->identity = at[0];
    r->ncols = (uint16_t)(((unsigned char)at[1] << 8) | (unsigned char)at[2]);
    r->cols = at + 3;
    r->end = end;
    it = pgl_relation_columns(r);
    while ((rc = pgl_column_next(&it, &c)) == 1)
        ;
    return rc;
}

/* -- TupleData ------------------------------------------------------------------------------
 *   [0] column count (2), then per column a kind: 'n' NULL, 'u' an unchanged TOASTed value,
 *   't' text or 'b' binary, the last two followed by a length (4) and the value.
 */
typedef struct {
    const char *at;             /* the next column; once all are read, the tuple's end */
    const char *end;            /* the message's end */
    uint16_t count;
    uint16_t left;
    uint16_t index;             /* the column pgl_tuple_next() gave last */
} pgl_tuple;

typedef struct {
    char kind;                  /* 'n', 'u', 't' or 'b' */
    const char *value;          /* 't', 'b': the value's bytes */
    uint32_t len;
} pgl_datum;

/* The tuple at `at`: 0, -1 when its count is cut short. */
static inline int pgl_tuple_open(const char *at, const char *end, pgl_tuple *t) {
    if (at > end || end - at < 2)
        return -1;
    t->count = t->left = (uint16_t)(((unsigned char)at[0] << 8) | (unsigned char)at[1]);
    t->at = at + 2;
    t->end = end;
    t->index = UINT16_MAX;
    return 0;
}

/* The next column: 1, 0 when none is left (t->at is then the tuple's end), -1 when the
 * message ends inside it or its kind is none of the four. */
static inline int pgl_tuple_next(pgl_tuple *t, pgl_datum *d) {
    uint32_t len;
    if (t->left == 0)
        return 0;
    if (t->at >= t->end)
        return -1;
    d->kind = t->at[0];
    d->value = NULL;
    d->len = 0;
    if (d->kind == 't' || d->kind == 'b') {
        if (t->end - (t->at + 1) < 4)
            return -1;
        len = pgl_be32(t->at + 1);
        if ((uint64_t)(t->end - (t->at + 5)) < len)
            return -1;
        d->value = t->at + 5;
        d->len = len;
        t->at += 5 + (size_t)len;
    } else if (d->kind == 'n' || d->kind == 'u') {
        t->at += 1;
    } else {
        return -1;
    }
    t->left--;
    t->index++;
    return 1;
}

/* Where the tuple at `at` ends; NULL when it cannot be read to its end. */
static inline const char *pgl_tuple_skip(const char *at, const char *end) {
    pgl_tuple t;
    pgl_datum d;
    int rc;
    if (pgl_tuple_open(at, end, &t) < 0)
        return NULL;
    while ((rc = pgl_tuple_next(&t, &d)) == 1)
        ;
    return rc == 0 ? t.at : NULL;
}

/* -- Insert, Update, Delete -----------------------------------------------------------------
 *   'I' [1] relid  [5] 'N' new tuple
 *   'U' [1] relid  [5] ('K' old key | 'O' old row, when sent)  'N' new tuple
 *   'D' [1] relid  [5] 'K' old key | 'O' old row
 * pgl_change_read() finds its tuples (the old one is read to its end to find the new one;
 * the last one is not read): each NULL when not sent.
 */
typedef struct {
    char op;
    uint32_t relid;
    char old_kind;              /* 'K', 'O', or 0: none */
    const char *old;            /* a tuple, for pgl_tuple_open() */
    const char *new_;
    const char *end;
} pgl_change;

static inline int pgl_change_read(const char *body, size_t len, pgl_change *c) {
    const char *end = body + len;
    const char *at;
    if (len < 6 || (body[0] != 'I' && body[0] != 'U' && body[0] != 'D'))
        return -1;
    c->op = body[0];
    c->relid = pgl_be32(body + 1);
    c->old_kind = 0;
    c->old = c->new_ = NULL;
    c->end = end;
    at = body + 5;
    if (at[0] == 'K' || at[0] == 'O') {
        if (c->op == 'I')
            return -1;
        c->old_kind = at[0];
        c->old = at + 1;
        if (c->op == 'D')
            return 0;
        at = pgl_tuple_skip(at + 1, end);
        if (at == NULL || at >= end)
            return -1;
    }
    if (at[0] != 'N' || c->op == 'D')
        return -1;
    c->new_ = at + 1;
    return 0;
}

/* The tuple a change is keyed by: the new row's (insert, update), else the old key's. */
static inline const char *pgl_change_key_tuple(const pgl_change *c) {
    return c->new_ != NULL ? c->new_ : c->old;
}

/* -- Truncate -------------------------------------------------------------------------------
 *   'T' [1] relation count (4)  [5] options (1: cascade, 2: restart identity)  [6] the relids
 */
/* Its relation count, in *count (left as it was when the message is refused). */
static inline int pgl_truncate_read(const char *body, size_t len, uint32_t *count) {
    uint32_t n;
    if (len < 6 || body[0] != 'T')
        return -1;
    n = pgl_be32(body + 1);
    if ((uint64_t)(len - 6) / 4 < n)
        return -1;
    *count = n;
    return 0;
}

static inline uint32_t pgl_truncate_relid(const char *body, uint32_t i) {
    return pgl_be32(body + 6 + 4 * (size_t)i);
}

/* -- pglistener's own layouts ---------------------------------------------------------------
 * A row change's record content starts with this prefix (_ring.h), host byte order:
 *   [0] relation version (4)  [4] xid (4)  [8] relation length r (4)  [12] key hash (8)
 *   [20] the Relation message from its relid on (r bytes), then the change message
 */
#define PGL_CHANGE_PREFIX 20

typedef struct {
    uint32_t version;
    uint32_t xid;
    uint32_t rlen;
    uint64_t key;
} pgl_change_prefix;

static inline void pgl_change_prefix_put(char *p, const pgl_change_prefix *x) {
    memcpy(p, &x->version, 4);
    memcpy(p + 4, &x->xid, 4);
    memcpy(p + 8, &x->rlen, 4);
    memcpy(p + 12, &x->key, 8);
}

/* The prefix of a record's content (n bytes): 0, or -1 when the content is too short for
 * it, its Relation and a change's first byte. */
static inline int pgl_change_prefix_read(const char *p, size_t n, pgl_change_prefix *x) {
    if (n < PGL_CHANGE_PREFIX)
        return -1;
    memcpy(&x->version, p, 4);
    memcpy(&x->xid, p + 4, 4);
    memcpy(&x->rlen, p + 8, 4);
    memcpy(&x->key, p + 12, 8);
    if ((uint64_t)(n - PGL_CHANGE_PREFIX) <= x->rlen)
        return -1;
    return 0;
}

/* A keyed message's channel, "channel\x1fkey" (emit(key=)): where its \x1f is, NULL for a
 * channel without a key. */
static inline const char *pgl_channel_sep(const char *chan, size_t len) {
    return len ? (const char *)memchr(chan, 0x1f, len) : NULL;
}

/* Its key's hash (never 0) and, in *route_len, how much of it is the channel it is routed
 * by (64, no route's length, when that is too long for one). 0 and all of it for a channel
 * without a key. */
static inline uint64_t pgl_channel_key(const char *chan, size_t len, size_t *route_len) {
    const char *sep = pgl_channel_sep(chan, len);
    uint64_t key;
    if (sep == NULL) {
        *route_len = len;
        return 0;
    }
    *route_len = (size_t)(sep - chan) < 64 ? (size_t)(sep - chan) : 64;
    key = pgl_hash(sep + 1, len - (size_t)(sep - chan) - 1);
    return key != 0 ? key : 1;
}

/* The key a WAL record is routed by in a keyed group: a row change's (its prefix), a keyed
 * message's; 0 for one without. */
static inline uint64_t pgl_wal_record_key(const unsigned char *rec) {
    pgl_change_prefix x;
    size_t route_len;
    if (pgl_rec_flags(rec) & PGL_WAL_CHANGE) {
        if (pgl_rec_payload_len(rec) < PGL_CHANGE_PREFIX)
            return 0;
        memcpy(&x.key, pgl_wal_payload(rec) + 12, 8);
        return x.key;
    }
    return pgl_channel_key(pgl_wal_channel(rec), pgl_rec_channel_len(rec), &route_len);
}

#endif
