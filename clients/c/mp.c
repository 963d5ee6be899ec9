/* mp.c - see mp.h. Big-endian everywhere, as MessagePack is. */
#include "mp.h"

#include <stdlib.h>
#include <string.h>

void mp_raw(mp_buf *b, const void *p, size_t n)
{
    if (b->failed)
        return;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n)
            cap *= 2;
        uint8_t *d = realloc(b->data, cap);
        if (!d) {
            b->failed = 1;
            return;
        }
        b->data = d;
        b->cap = cap;
    }
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
}

/* A type byte followed by v in `width` big-endian bytes (width 0: the byte only). */
static void put_be(mp_buf *b, uint8_t type, uint64_t v, int width)
{
    uint8_t t[9];
    t[0] = type;
    for (int k = 0; k < width; k++)
        t[1 + k] = (uint8_t)(v >> (8 * (width - 1 - k)));
    mp_raw(b, t, 1 + (size_t)width);
}

/* The smallest of the 8/16/32-bit forms whose types are t8, t8+1, t8+2. */
static void put_len(mp_buf *b, uint8_t t8, uint64_t n)
{
    if (n <= 0xff)
        put_be(b, t8, n, 1);
    else if (n <= 0xffff)
        put_be(b, (uint8_t)(t8 + 1), n, 2);
    else
        put_be(b, (uint8_t)(t8 + 2), n, 4);
}

void mp_map(mp_buf *b, uint32_t n)
{
    if (n < 16)
        put_be(b, (uint8_t)(0x80 | n), 0, 0);
    else if (n <= 0xffff)
        put_be(b, 0xde, n, 2);
    else
        put_be(b, 0xdf, n, 4);
}

void mp_str(mp_buf *b, const char *s)
{
    size_t n = strlen(s);
    if (n < 32)
        put_be(b, (uint8_t)(0xa0 | n), 0, 0);
    else
        put_len(b, 0xd9, n);
    mp_raw(b, s, n);
}

void mp_bin(mp_buf *b, const void *p, size_t n)
{
    if ((uint64_t)n > 0xffffffffu) {    /* no bin format holds it */
        b->failed = 1;
        return;
    }
    put_len(b, 0xc4, n);
    mp_raw(b, p, n);
}

void mp_uint(mp_buf *b, uint64_t v)
{
    if (v < 128)
        put_be(b, (uint8_t)v, 0, 0);
    else if (v <= 0xff)
        put_be(b, 0xcc, v, 1);
    else if (v <= 0xffff)
        put_be(b, 0xcd, v, 2);
    else if (v <= 0xffffffffu)
        put_be(b, 0xce, v, 4);
    else
        put_be(b, 0xcf, v, 8);
}

void mp_float(mp_buf *b, double v)
{
    uint64_t bits;
    memcpy(&bits, &v, 8);
    put_be(b, 0xcb, bits, 8);
}

void mp_free(mp_buf *b)
{
    free(b->data);
    memset(b, 0, sizeof *b);
}

/* ---- decoding ---- */

/* The formats 0xc0-0xdf: the type and the width of the big-endian number
 * that follows the type byte (a value, or a length or count). Zero-filled
 * entries (0xc1, ext) are not in the protocol: malformed. */
static const struct { uint8_t type, width, ok; } FMT[32] = {
    {MP_NIL, 0, 1}, {0, 0, 0}, {MP_BOOL, 0, 1}, {MP_BOOL, 0, 1},
    {MP_BIN, 1, 1}, {MP_BIN, 2, 1}, {MP_BIN, 4, 1}, {0, 0, 0}, {0, 0, 0}, {0, 0, 0},
    {MP_FLOAT, 4, 1}, {MP_FLOAT, 8, 1},
    {MP_INT, 1, 1}, {MP_INT, 2, 1}, {MP_INT, 4, 1}, {MP_INT, 8, 1},     /* uint */
    {MP_INT, 1, 1}, {MP_INT, 2, 1}, {MP_INT, 4, 1}, {MP_INT, 8, 1},     /* int */
    {0, 0, 0}, {0, 0, 0}, {0, 0, 0}, {0, 0, 0}, {0, 0, 0},
    {MP_STR, 1, 1}, {MP_STR, 2, 1}, {MP_STR, 4, 1},
    {MP_ARRAY, 2, 1}, {MP_ARRAY, 4, 1}, {MP_MAP, 2, 1}, {MP_MAP, 4, 1},
};

static void set_int(mp_obj *o, int64_t s)
{
    o->type = MP_INT;
    o->neg = s < 0;
    o->i = s;
    o->u = (uint64_t)s;
}

int mp_next(mp_cur *c, mp_obj *o)
{
    memset(o, 0, sizeof *o);
    if (c->p >= c->end)
        return -1;
    uint8_t t = *c->p++;
    uint64_t v = 0;
    if (t <= 0x7f || t >= 0xe0) {       /* positive / negative fixint */
        set_int(o, (int8_t)t);
        o->u = t <= 0x7f ? t : o->u;
        return 0;
    }
    if (t <= 0xbf) {                    /* fixmap, fixarray, fixstr */
        o->type = t <= 0x8f ? MP_MAP : t <= 0x9f ? MP_ARRAY : MP_STR;
        v = t & (t <= 0x9f ? 0x0f : 0x1f);
    } else {
        int w = FMT[t - 0xc0].width;
        if (!FMT[t - 0xc0].ok || c->end - c->p < w)
            return -1;
        o->type = (enum mp_type)FMT[t - 0xc0].type;
        for (int k = 0; k < w; k++)
            v = v << 8 | *c->p++;
        if (t == 0xc2 || t == 0xc3) {
            o->u = t == 0xc3;
        } else if (t == 0xca) {         /* float 32: a broker may send one (§3) */
            float f;
            uint32_t v32 = (uint32_t)v;
            memcpy(&f, &v32, 4);
            o->f = f;
        } else if (t == 0xcb) {
            memcpy(&o->f, &v, 8);
        } else if (t >= 0xd0 && t <= 0xd3) {    /* sign-extend from w bytes */
            set_int(o, (int64_t)(v << (64 - 8 * w)) >> (64 - 8 * w));
        } else if (o->type == MP_INT) {
            o->u = v;
            o->i = (int64_t)v;
        }
    }
    if (o->type == MP_STR || o->type == MP_BIN) {
        if ((uint64_t)(c->end - c->p) < v)
            return -1;
        o->ptr = c->p;
        c->p += v;
    }
    o->len = (uint32_t)v;
    return 0;
}

int mp_skip(mp_cur *c, const mp_obj *o, int depth)
{
    if (o->type != MP_ARRAY && o->type != MP_MAP)
        return 0;                       /* mp_next already consumed it */
    if (depth > 64)                     /* nesting that deep is not ours: refuse */
        return -1;
    uint64_t n = (uint64_t)o->len * (o->type == MP_MAP ? 2 : 1);
    for (uint64_t k = 0; k < n; k++) {
        mp_obj inner;
        if (mp_next(c, &inner) || mp_skip(c, &inner, depth + 1))
            return -1;
    }
    return 0;
}

int mp_number(const mp_obj *o, double *out)
{
    if (o->type == MP_FLOAT)
        *out = o->f;
    else if (o->type == MP_INT)
        *out = o->neg ? (double)o->i : (double)o->u;
    else
        return -1;
    return 0;
}

int mp_is(const mp_obj *o, const char *s)
{
    size_t n = strlen(s);
    return o->type == MP_STR && o->len == n && memcmp(o->ptr, s, n) == 0;
}
