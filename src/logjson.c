/* logjson.c — the log record's JSON writer; see logjson.h. */
#include "logjson.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checks.h"

void logjson_init(struct logjson *j, char *buf, size_t cap)
{
    memset(j, 0, sizeof *j);
    j->buf = buf;
    j->cap = cap;
    j->first = true;
}

size_t logjson_escape(char *out, size_t cap, const char *str, size_t n, size_t *written)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0, o = 0;
    while (i < n) {
        unsigned char c = s[i];
        char e[6];
        const char *src = e;
        size_t in = 1, k;
        if (c == '"' || c == '\\') {
            e[0] = '\\', e[1] = (char)c, k = 2;
        } else if (c == '\n') {
            e[0] = '\\', e[1] = 'n', k = 2;
        } else if (c == '\t') {
            e[0] = '\\', e[1] = 't', k = 2;
        } else if (c == '\r') {
            e[0] = '\\', e[1] = 'r', k = 2;
        } else if (c < 0x20 || c == 0x7f) {
            /* DEL is legal JSON, but a terminal showing the line would act on it */
            memcpy(e, "\\u00", 4);
            e[4] = hex[c >> 4], e[5] = hex[c & 15], k = 6;
        } else if (c < 0x80) {
            src = (const char *)s + i, k = 1;
        } else if ((in = checks_utf8_seq((const char *)s + i, n - i)) > 0) {
            src = (const char *)s + i, k = in;
        } else {
            src = "\xef\xbf\xbd", k = 3, in = 1;  /* U+FFFD for the one bad byte */
        }
        if (cap - o < k)
            break;
        memcpy(out + o, src, k);
        o += k;
        i += in;
    }
    *written = o;
    return i;
}

/* Whether k more bytes fit, keeping room to close what will then be open (extra_depth:
 * what the element itself opens). */
static bool fits(struct logjson *j, size_t k, int extra_depth)
{
    if (j->len + k + (size_t)(j->depth + extra_depth) > j->cap) {
        j->full = true;
        return false;
    }
    return true;
}

/* Whether a value may come now: in an object only after its key (a key that did not fit
 * takes its value out with it). */
static bool value_ok(struct logjson *j)
{
    bool in_object = j->depth > 0 && !((j->arrays >> (j->depth - 1)) & 1);
    if (in_object && !j->after_key) {
        j->full = true;
        return false;
    }
    return true;
}

/* The comma an element needs before it: none first in a container or after a key. */
static size_t sep_len(const struct logjson *j) { return j->first || j->after_key ? 0 : 1; }

static void put_sep(struct logjson *j)
{
    if (sep_len(j))
        j->buf[j->len++] = ',';
    j->first = false;
    j->after_key = false;
}

bool logjson_open(struct logjson *j, char bracket)
{
    if (!value_ok(j) || j->depth >= LOGJSON_MAX_DEPTH || !fits(j, sep_len(j) + 1, 1))
        return false;
    put_sep(j);
    j->buf[j->len++] = bracket == '[' ? '[' : '{';
    if (bracket == '[')
        j->arrays |= (uint32_t)1 << j->depth;
    else
        j->arrays &= ~((uint32_t)1 << j->depth);
    j->depth++;
    j->first = true;
    return true;
}

void logjson_close(struct logjson *j)
{
    if (j->depth == 0)
        return;
    if (j->after_key) {   /* a key whose value never came: take it back */
        j->len = j->key_at;
        j->after_key = false;
    }
    j->depth--;
    j->buf[j->len++] = (j->arrays >> j->depth) & 1 ? ']' : '}';
    j->first = false;
}

/* Writes `"` + escaped s + `"` when all of it fits in max content bytes and the room
 * left; with cut, as much as fits followed by "...". */
static bool put_string(struct logjson *j, const char *s, size_t n, size_t max, bool cut)
{
    /* !cut: a key, checked by logjson_key */
    static const char more[] = "...";
    size_t head = sep_len(j) + 1;
    if ((cut && !value_ok(j)) || !fits(j, head + 1 + (cut ? sizeof more - 1 : 0), 0))
        return false;
    size_t room = j->cap - j->len - (size_t)j->depth - head - 1;   /* for the content */
    if (room > max)
        room = max;
    struct logjson_mark m = logjson_mark(j);
    put_sep(j);
    j->buf[j->len++] = '"';
    size_t w;
    if (logjson_escape(j->buf + j->len, room, s, n, &w) < n) {
        if (!cut) {
            logjson_rewind(j, m);
            j->full = true;
            return false;
        }
        /* again with room for the marker: the escaper stops at a whole element */
        logjson_escape(j->buf + j->len, room >= sizeof more - 1 ? room - (sizeof more - 1) : 0,
                       s, n, &w);
        memcpy(j->buf + j->len + w, more, sizeof more - 1);
        w += sizeof more - 1;
    }
    j->len += w;
    j->buf[j->len++] = '"';
    return true;
}

bool logjson_key(struct logjson *j, const char *key, size_t n)
{
    size_t at = j->len;
    bool in_object = j->depth > 0 && !((j->arrays >> (j->depth - 1)) & 1);
    if (!in_object || j->after_key) {
        j->full = true;
        return false;
    }
    struct logjson_mark m = logjson_mark(j);
    if (!fits(j, sep_len(j) + 3, 0) || !put_string(j, key, n, SIZE_MAX, false))
        return false;
    if (!fits(j, 1, 0)) {
        logjson_rewind(j, m);
        return false;
    }
    j->buf[j->len++] = ':';
    j->key_at = at;
    j->after_key = true;
    return true;
}

bool logjson_string(struct logjson *j, const char *s, size_t n, size_t max)
{
    return put_string(j, s, n, max, true);
}

static bool put_raw(struct logjson *j, const char *s, size_t n)
{
    if (!fits(j, sep_len(j) + n, 0))
        return false;
    put_sep(j);
    memcpy(j->buf + j->len, s, n);
    j->len += n;
    return true;
}

bool logjson_raw(struct logjson *j, const char *s, size_t n)
{
    return value_ok(j) && put_raw(j, s, n);
}

bool logjson_members(struct logjson *j, const char *s, size_t n)
{
    bool in_object = j->depth > 0 && !((j->arrays >> (j->depth - 1)) & 1);
    if (!in_object || j->after_key) {
        j->full = true;
        return false;
    }
    return put_raw(j, s, n);
}

bool logjson_int(struct logjson *j, long long v)
{
    char t[24];
    int k = snprintf(t, sizeof t, "%lld", v);
    return logjson_raw(j, t, (size_t)k);
}

bool logjson_number(struct logjson *j, double v)
{
    if (!isfinite(v))
        return logjson_null(j);
    char t[32];
    /* the shortest %.*g that reads back as v; "%g" never writes a JSON-invalid form for a
     * finite value in the C locale (the server never calls setlocale) */
    int k = 0;
    for (int prec = 15; prec <= 17; prec++) {
        k = snprintf(t, sizeof t, "%.*g", prec, v);
        if (strtod(t, NULL) == v)
            break;
    }
    return logjson_raw(j, t, (size_t)k);
}

bool logjson_bool(struct logjson *j, bool v)
{
    return v ? logjson_raw(j, "true", 4) : logjson_raw(j, "false", 5);
}

bool logjson_null(struct logjson *j) { return logjson_raw(j, "null", 4); }
