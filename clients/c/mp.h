/* mp.h - the MessagePack subset the brokerq protocol uses (docs/protocol.md §3).
 *
 * Encoding writes into a growable buffer; decoding walks a byte range one
 * object at a time, so a reply map is read key by key and unknown values
 * are skipped whatever their type. */
#ifndef MP_H
#define MP_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint8_t *data;
    size_t len, cap;
    int failed;                 /* out of memory: the buffer is unusable */
} mp_buf;

void mp_raw(mp_buf *b, const void *p, size_t n);
void mp_map(mp_buf *b, uint32_t n);
void mp_str(mp_buf *b, const char *s);
void mp_bin(mp_buf *b, const void *p, size_t n);
void mp_uint(mp_buf *b, uint64_t v);
void mp_float(mp_buf *b, double v);
void mp_free(mp_buf *b);

enum mp_type { MP_NIL, MP_BOOL, MP_INT, MP_FLOAT, MP_STR, MP_BIN, MP_ARRAY, MP_MAP };

typedef struct {
    enum mp_type type;
    int neg;                    /* MP_INT: 1 if the value is below 0 (see i), else see u */
    uint64_t u;                 /* MP_INT (neg == 0), MP_BOOL */
    int64_t i;                  /* MP_INT (neg == 1) */
    double f;                   /* MP_FLOAT (float 32 widened) */
    const uint8_t *ptr;         /* MP_STR, MP_BIN: the bytes */
    uint32_t len;               /* their length; MP_ARRAY, MP_MAP: the entry count */
} mp_obj;

typedef struct {
    const uint8_t *p, *end;
} mp_cur;

/* Read the next object's head (and a str's or bin's bytes); 0, or -1 if
 * malformed or not in the protocol (ext types). */
int mp_next(mp_cur *c, mp_obj *o);
/* Skip the rest of an object whose head is o (the entries of a map or array). */
int mp_skip(mp_cur *c, const mp_obj *o, int depth);
/* A numeric object as a double (the spec's "float" accepts any int); -1 if not numeric. */
int mp_number(const mp_obj *o, double *out);
/* 1 if o is the str s. */
int mp_is(const mp_obj *o, const char *s);

#endif
