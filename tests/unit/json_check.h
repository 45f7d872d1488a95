/* json_check.h — a strict JSON reader for the tests of the log encoder (test_logjson.c,
 * tests/fuzz/fuzz_logjson.c), written apart from src/logjson.c so that the tests do not
 * trust what they test. RFC 8259: no raw control characters in strings, only the defined
 * escapes, valid UTF-8 (no overlongs, surrogates or code points past U+10FFFF), numbers
 * as the grammar has them, no duplicate keys, nothing after the value. Header-only
 * (static inline functions): each test includes it once. */
#ifndef LUACALLOUT_JSON_CHECK_H
#define LUACALLOUT_JSON_CHECK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

struct jc {
    const unsigned char *s;
    size_t n, i;
    int depth;
    bool dups_ok;   /* jc_parse_lax: repeated keys are the caller's business */
    /* the top-level object's members, as found: key and value spans */
    size_t nkeys;
    struct { size_t k, klen, v, vlen; } keys[64];
};

static inline size_t jc_utf8(const unsigned char *s, size_t n)
{
    if (s[0] < 0x80)
        return 1;
    size_t len;
    uint32_t cp, min;
    if (s[0] >= 0xc2 && s[0] <= 0xdf)
        len = 2, cp = s[0] & 0x1f, min = 0x80;
    else if ((s[0] & 0xf0) == 0xe0)
        len = 3, cp = s[0] & 0x0f, min = 0x800;
    else if (s[0] >= 0xf0 && s[0] <= 0xf4)
        len = 4, cp = s[0] & 0x07, min = 0x10000;
    else
        return 0;
    if (n < len)
        return 0;
    for (size_t k = 1; k < len; k++) {
        if ((s[k] & 0xc0) != 0x80)
            return 0;
        cp = cp << 6 | (s[k] & 0x3f);
    }
    return cp >= min && cp <= 0x10ffff && !(cp >= 0xd800 && cp <= 0xdfff) ? len : 0;
}

static inline void jc_ws(struct jc *p)
{
    while (p->i < p->n && strchr(" \t\r\n", p->s[p->i]) && p->s[p->i])
        p->i++;
}

static inline bool jc_hex4(struct jc *p, unsigned *v)
{
    *v = 0;
    for (int k = 0; k < 4; k++, p->i++) {
        if (p->i >= p->n)
            return false;
        unsigned char c = p->s[p->i];
        unsigned d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
                   : c >= 'A' && c <= 'F' ? c - 'A' + 10 : 16;
        if (d == 16)
            return false;
        *v = *v << 4 | d;
    }
    return true;
}

/* A string at p->i; decoded into out (up to cap bytes) when out is not NULL. */
static inline bool jc_string(struct jc *p, char *out, size_t cap, size_t *outlen)
{
    size_t o = 0;
#define JC_PUT(c) do { if (out && o < cap) out[o] = (char)(c); o++; } while (0)
    if (p->i >= p->n || p->s[p->i] != '"')
        return false;
    p->i++;
    for (;;) {
        if (p->i >= p->n)
            return false;
        unsigned char c = p->s[p->i];
        if (c == '"') {
            p->i++;
            break;
        }
        if (c < 0x20)
            return false;
        if (c == '\\') {
            if (++p->i >= p->n)
                return false;
            c = p->s[p->i++];
            const char *from = "\"\\/bfnrt", *to = "\"\\/\b\f\n\r\t";
            const char *at = c ? strchr(from, c) : NULL;
            if (at) {
                JC_PUT(to[at - from]);
            } else if (c == 'u') {
                unsigned cp;
                if (!jc_hex4(p, &cp))
                    return false;
                if (cp >= 0xd800 && cp <= 0xdbff) {
                    unsigned lo;
                    if (p->i + 2 > p->n || p->s[p->i] != '\\' || p->s[p->i + 1] != 'u')
                        return false;
                    p->i += 2;
                    if (!jc_hex4(p, &lo) || lo < 0xdc00 || lo > 0xdfff)
                        return false;
                    cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                } else if (cp >= 0xdc00 && cp <= 0xdfff) {
                    return false;
                }
                if (cp < 0x80) {
                    JC_PUT(cp);
                } else if (cp < 0x800) {
                    JC_PUT(0xc0 | cp >> 6); JC_PUT(0x80 | (cp & 0x3f));
                } else if (cp < 0x10000) {
                    JC_PUT(0xe0 | cp >> 12); JC_PUT(0x80 | (cp >> 6 & 0x3f));
                    JC_PUT(0x80 | (cp & 0x3f));
                } else {
                    JC_PUT(0xf0 | cp >> 18); JC_PUT(0x80 | (cp >> 12 & 0x3f));
                    JC_PUT(0x80 | (cp >> 6 & 0x3f)); JC_PUT(0x80 | (cp & 0x3f));
                }
            } else {
                return false;
            }
            continue;
        }
        size_t k = jc_utf8(p->s + p->i, p->n - p->i);
        if (k == 0)
            return false;
        for (size_t m = 0; m < k; m++)
            JC_PUT(p->s[p->i + m]);
        p->i += k;
    }
#undef JC_PUT
    if (outlen)
        *outlen = o;
    return true;
}

static inline bool jc_digits(struct jc *p)
{
    size_t at = p->i;
    while (p->i < p->n && p->s[p->i] >= '0' && p->s[p->i] <= '9')
        p->i++;
    return p->i > at;
}

static inline bool jc_number(struct jc *p)
{
    if (p->i < p->n && p->s[p->i] == '-')
        p->i++;
    if (p->i < p->n && p->s[p->i] == '0')
        p->i++;
    else if (!jc_digits(p))
        return false;
    if (p->i < p->n && p->s[p->i] == '.') {
        p->i++;
        if (!jc_digits(p))
            return false;
    }
    if (p->i < p->n && (p->s[p->i] == 'e' || p->s[p->i] == 'E')) {
        p->i++;
        if (p->i < p->n && (p->s[p->i] == '+' || p->s[p->i] == '-'))
            p->i++;
        if (!jc_digits(p))
            return false;
    }
    return true;
}

static inline bool jc_word(struct jc *p, const char *w)
{
    size_t k = strlen(w);
    if (p->n - p->i < k || memcmp(p->s + p->i, w, k) != 0)
        return false;
    p->i += k;
    return true;
}

static inline bool jc_value(struct jc *p);

static inline bool jc_container(struct jc *p, bool object)
{
    if (++p->depth > 64)
        return false;
    bool top = object && p->depth == 1;
    p->i++;
    jc_ws(p);
    if (p->i < p->n && p->s[p->i] == (object ? '}' : ']')) {
        p->i++;
        p->depth--;
        return true;
    }
    for (;;) {
        jc_ws(p);
        if (object) {
            size_t k = p->i;
            if (!jc_string(p, NULL, 0, NULL))
                return false;
            size_t klen = p->i - k;
            if (top && !p->dups_ok) {
                for (size_t m = 0; m < p->nkeys; m++) {
                    if (p->keys[m].klen == klen && memcmp(p->s + p->keys[m].k, p->s + k, klen) == 0)
                        return false;   /* a duplicate key */
                }
                if (p->nkeys == sizeof p->keys / sizeof p->keys[0])
                    return false;
                p->keys[p->nkeys].k = k;
                p->keys[p->nkeys].klen = klen;
            }
            jc_ws(p);
            if (p->i >= p->n || p->s[p->i] != ':')
                return false;
            p->i++;
            jc_ws(p);
            size_t v = p->i;
            if (!jc_value(p))
                return false;
            if (top && !p->dups_ok) {
                p->keys[p->nkeys].v = v;
                p->keys[p->nkeys].vlen = p->i - v;
                p->nkeys++;
            }
        } else if (!jc_value(p)) {
            return false;
        }
        jc_ws(p);
        if (p->i >= p->n)
            return false;
        if (p->s[p->i] == ',') {
            p->i++;
            continue;
        }
        if (p->s[p->i] != (object ? '}' : ']'))
            return false;
        p->i++;
        p->depth--;
        return true;
    }
}

static inline bool jc_value(struct jc *p)
{
    jc_ws(p);
    if (p->i >= p->n)
        return false;
    switch (p->s[p->i]) {
    case '{': return jc_container(p, true);
    case '[': return jc_container(p, false);
    case '"': return jc_string(p, NULL, 0, NULL);
    case 't': return jc_word(p, "true");
    case 'f': return jc_word(p, "false");
    case 'n': return jc_word(p, "null");
    default: return jc_number(p);
    }
}

/* Whether s[0..n) is exactly one JSON value (surrounding whitespace allowed); with an
 * object, p->keys lists its members afterwards. */
static inline bool jc_parse(struct jc *p, const char *s, size_t n)
{
    memset(p, 0, sizeof *p);
    p->s = (const unsigned char *)s;
    p->n = n;
    if (!jc_value(p))
        return false;
    jc_ws(p);
    return p->i == p->n;
}

/* The same, accepting repeated keys (and recording no members). */
static inline bool jc_parse_lax(struct jc *p, const char *s, size_t n)
{
    memset(p, 0, sizeof *p);
    p->s = (const unsigned char *)s;
    p->n = n;
    p->dups_ok = true;
    if (!jc_value(p))
        return false;
    jc_ws(p);
    return p->i == p->n;
}

/* The raw value of the top-level member `key` (NULL if absent); *len its length. */
static inline const char *jc_member(const struct jc *p, const char *key, size_t *len)
{
    size_t klen = strlen(key);
    for (size_t m = 0; m < p->nkeys; m++) {
        if (p->keys[m].klen == klen + 2 && memcmp(p->s + p->keys[m].k + 1, key, klen) == 0) {
            *len = p->keys[m].vlen;
            return (const char *)p->s + p->keys[m].v;
        }
    }
    return NULL;
}

/* The decoded string value of `key` into out (NUL-terminated, cut to cap - 1); false when
 * absent or not a string. */
static inline bool jc_member_string(const struct jc *p, const char *key, char *out, size_t cap,
                             size_t *outlen)
{
    size_t len;
    const char *v = jc_member(p, key, &len);
    if (v == NULL || v[0] != '"')
        return false;
    struct jc q = {.s = (const unsigned char *)v, .n = len};
    size_t o;
    if (!jc_string(&q, out, cap - 1, &o))
        return false;
    out[o < cap - 1 ? o : cap - 1] = '\0';
    if (outlen)
        *outlen = o;
    return true;
}

#endif
