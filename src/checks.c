/* checks.c — see checks.h. */
#include "checks.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>

/* ---- strings and headers ---------------------------------------------------------------- */

size_t checks_utf8_seq(const char *str, size_t n)
{
    const unsigned char *s = (const unsigned char *)str;
    unsigned char b = s[0];
    size_t len;
    uint32_t cp, min;
    if (b < 0x80)
        return 1;
    if ((b & 0xe0) == 0xc0)
        len = 2, cp = b & 0x1f, min = 0x80;
    else if ((b & 0xf0) == 0xe0)
        len = 3, cp = b & 0x0f, min = 0x800;
    else if ((b & 0xf8) == 0xf0)
        len = 4, cp = b & 0x07, min = 0x10000;
    else
        return 0;
    if (n < len)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return len;
}

bool checks_utf8_valid(const char *str, size_t len)
{
    for (size_t i = 0, n; i < len; i += n)
        if ((n = checks_utf8_seq(str + i, len - i)) == 0)
            return false;
    return true;
}

const char *checks_proto_string(const char *s, size_t len)
{
    if (memchr(s, '\0', len) != NULL)
        return "contains a NUL byte";
    if (!checks_utf8_valid(s, len))
        return "is not valid UTF-8";
    return NULL;
}

/* RFC 9110 tchar: the bytes Envoy's header-name check lets through. */
static bool is_tchar(unsigned char c)
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
        return true;
    return c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

enum checks_name checks_header_name(const char *s, size_t len, size_t *at)
{
    *at = 0;
    if (len == 0)
        return CHECKS_NAME_EMPTY;
    if (memchr(s, '\0', len) != NULL)
        return CHECKS_NAME_NUL;
    if (!checks_utf8_valid(s, len))
        return CHECKS_NAME_UTF8;
    /* a pseudo-header (":path") follows HTTP/2's rule: lower case after the colon */
    bool pseudo = s[0] == ':';
    if (pseudo && len == 1)
        return CHECKS_NAME_CHAR;
    for (size_t i = pseudo ? 1 : 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!is_tchar(c) || (pseudo && c >= 'A' && c <= 'Z')) {
            *at = i;
            return CHECKS_NAME_CHAR;
        }
    }
    return CHECKS_NAME_OK;
}

void checks_header_name_why(const char *s, size_t len, size_t at, char *buf, size_t size)
{
    if (len == 1 && s[0] == ':') {
        snprintf(buf, size, "is ':' alone (a pseudo-header needs a name after the colon)");
        return;
    }
    char ch[8];
    checks_quote(s + at, 1, ch, sizeof ch);
    if (s[0] == ':' && s[at] >= 'A' && s[at] <= 'Z')
        snprintf(buf, size, "has %s at byte %zu (a pseudo-header name is lower case)", ch, at + 1);
    else
        snprintf(buf, size, "has %s at byte %zu (a header name is letters, digits and "
                 "!#$%%&'*+-.^_`|~ only; Envoy refuses the whole mutation otherwise)", ch, at + 1);
}

void checks_quote(const char *s, size_t len, char *buf, size_t size)
{
    if (size == 0)
        return;
    size_t at = 0, n = len > 64 ? 64 : len;
    buf[at++] = '\'';
    for (size_t i = 0; i < n && at + 5 < size; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c < 0x7f && c != '\\') {
            buf[at++] = (char)c;
        } else {
            snprintf(buf + at, size - at, "\\x%02x", c);
            at += 4;
        }
    }
    if (len > n && at + 4 < size) {
        memcpy(buf + at, "...", 3);
        at += 3;
    }
    if (at + 1 < size)
        buf[at++] = '\'';
    buf[at] = '\0';
}

/* ---- numbers ------------------------------------------------------------------------------ */

/* exact: as many digits as read back the same double (messages); else tostring()'s 14. */
static int format_number(lua_State *L, int idx, char *buf, size_t size, bool exact)
{
    if (lua_isinteger(L, idx))
        return snprintf(buf, size, "%lld", (long long)lua_tointeger(L, idx));
    double v = (double)lua_tonumber(L, idx);
    if (!isfinite(v)) {
        snprintf(buf, size, "%s", isnan(v) ? "NaN" : v > 0 ? "inf" : "-inf");
        return -1;
    }
    if (v == floor(v) && v >= -9223372036854775808.0 && v < 9223372036854775808.0)
        return snprintf(buf, size, "%lld", (long long)v);
    int n = snprintf(buf, size, "%.14g", v);
    if (exact && strtod(buf, NULL) != v)
        n = snprintf(buf, size, "%.17g", v);
    return n;
}

int checks_format_number(lua_State *L, int idx, char *buf, size_t size)
{
    return format_number(L, idx, buf, size, false);
}

int checks_describe_number(lua_State *L, int idx, char *buf, size_t size)
{
    return format_number(L, idx, buf, size, true);
}

enum checks_int checks_integer(lua_State *L, int idx, int64_t lo, int64_t hi, int64_t *out)
{
    if (lua_type(L, idx) != LUA_TNUMBER)  /* also keeps lua_tointegerx off strings */
        return CHECKS_INT_NOT_NUMBER;
    int isint;
    lua_Integer v = lua_tointegerx(L, idx, &isint);
    if (!isint) {
        double d = (double)lua_tonumber(L, idx);
        /* an integral float past the range of lua_Integer is out of range, not a fraction */
        return isfinite(d) && d == floor(d) ? CHECKS_INT_OUT_OF_RANGE : CHECKS_INT_NOT_INTEGRAL;
    }
    if (v < lo || v > hi)
        return CHECKS_INT_OUT_OF_RANGE;
    *out = (int64_t)v;
    return CHECKS_INT_OK;
}

enum checks_int checks_uint64(lua_State *L, int idx, uint64_t *out)
{
    if (lua_type(L, idx) != LUA_TNUMBER)
        return CHECKS_INT_NOT_NUMBER;
    if (lua_isinteger(L, idx)) {
        lua_Integer v = lua_tointeger(L, idx);
        if (v < 0)
            return CHECKS_INT_OUT_OF_RANGE;
        *out = (uint64_t)v;
        return CHECKS_INT_OK;
    }
    double d = (double)lua_tonumber(L, idx);
    if (!isfinite(d) || d != floor(d))
        return CHECKS_INT_NOT_INTEGRAL;
    if (d < 0 || d >= 18446744073709551616.0)
        return CHECKS_INT_OUT_OF_RANGE;
    *out = (uint64_t)d;
    return CHECKS_INT_OK;
}

void checks_integer_message(lua_State *L, int idx, enum checks_int r, const char *type,
                            const char *range, const char *got, char *buf, size_t size)
{
    char num[48];
    if (r != CHECKS_INT_NOT_NUMBER)
        checks_describe_number(L, idx, num, sizeof num);
    switch (r) {
    case CHECKS_INT_NOT_NUMBER:
        snprintf(buf, size, "expected an integer (%s), got %s", type, got);
        break;
    case CHECKS_INT_NOT_INTEGRAL:
        snprintf(buf, size, "expected an integer (%s), got %s", type, num);
        break;
    case CHECKS_INT_OUT_OF_RANGE:
        snprintf(buf, size, "%s is out of range for %s (%s)", num, type, range);
        break;
    case CHECKS_INT_OK:
        snprintf(buf, size, "ok");
        break;
    }
}

/* ---- enums -------------------------------------------------------------------------------- */

const ProtobufCEnumValue *checks_enum_by_name(const ProtobufCEnumDescriptor *d, const char *s,
                                              size_t len)
{
    if (strlen(s) != len)  /* a NUL inside: no name matches */
        return NULL;
    return protobuf_c_enum_descriptor_get_value_by_name(d, s);
}

void checks_enum_names(const ProtobufCEnumDescriptor *d, char *buf, size_t size)
{
    size_t at = 0;
    if (size > 0)
        buf[0] = '\0';
    for (unsigned i = 0; i < d->n_values && at < size; i++) {
        int n = snprintf(buf + at, size - at, "%s%s",
                         i == 0 ? "" : i + 1 == d->n_values ? " or " : ", ", d->values[i].name);
        if (n < 0)
            break;
        at += (size_t)n;
    }
}

/* ---- tables ------------------------------------------------------------------------------- */

void checks_table_shape(lua_State *L, int idx, struct checks_shape *s)
{
    idx = lua_absindex(L, idx);
    memset(s, 0, sizeof *s);
    s->other = LUA_TNONE;
    bool positive = true;
    lua_Integer max = 0;
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        lua_pop(L, 1);
        s->n++;
        int t = lua_type(L, -1);
        if (t == LUA_TSTRING) {
            s->strings++;
            positive = false;
        } else if (t == LUA_TNUMBER && lua_isinteger(L, -1)) {
            s->integers++;
            lua_Integer k = lua_tointeger(L, -1);
            if (k < 1)
                positive = false;
            else if (k > max)
                max = k;
        } else {
            if (s->other == LUA_TNONE)
                s->other = t;
            positive = false;
        }
    }
    /* n distinct integer keys in 1..n are exactly 1..n */
    s->seq = positive && (lua_Unsigned)max == s->n;
}

/* "[3]", "[1.5]", "[true]" or "of type function" for a key that is not a string. */
static void describe_other_key(lua_State *L, int idx, char *buf, size_t size)
{
    char num[48];
    switch (lua_type(L, idx)) {
    case LUA_TNUMBER:
        checks_describe_number(L, idx, num, sizeof num);
        snprintf(buf, size, "[%s]", num);
        break;
    case LUA_TBOOLEAN:
        snprintf(buf, size, "[%s]", lua_toboolean(L, idx) ? "true" : "false");
        break;
    default:
        snprintf(buf, size, "of type %s", luaL_typename(L, idx));
        break;
    }
}

void checks_describe_key(lua_State *L, int idx, const char *prefix, char *buf, size_t size)
{
    if (lua_type(L, idx) == LUA_TSTRING) {
        size_t len;
        const char *k = lua_tolstring(L, idx, &len);
        char q[300];
        checks_quote(k, len, q, sizeof q);
        snprintf(buf, size, "'%s%s", prefix, q + 1);
        return;
    }
    char d[64];
    describe_other_key(L, idx, d, sizeof d);
    size_t plen = strlen(prefix);
    if (plen > 0 && prefix[plen - 1] == '.')
        plen--;
    snprintf(buf, size, "%s%s%.*s", d, plen ? " in " : "", (int)plen, prefix);
}

/* ---- the error path and the one way to fail ----------------------------------------------- */

size_t checks_path_push(struct checks_path *p, const char *fmt, ...)
{
    size_t old = p->len;
    if (p->len < sizeof p->buf - 1) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(p->buf + p->len, sizeof p->buf - p->len, fmt, ap);
        va_end(ap);
        if (n > 0)
            p->len += (size_t)n < sizeof p->buf - p->len ? (size_t)n : sizeof p->buf - 1 - p->len;
    }
    return old;
}

void checks_path_restore(struct checks_path *p, size_t old)
{
    p->len = old;
    p->buf[old] = '\0';
}

static bool is_identifier(const char *s, size_t len)
{
    if (len == 0 || (s[0] >= '0' && s[0] <= '9'))
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (!(ch == '_' || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
              (ch >= '0' && ch <= '9')))
            return false;
    }
    return true;
}

size_t checks_path_push_key(struct checks_path *p, const char *key, size_t len)
{
    if (is_identifier(key, len))
        return checks_path_push(p, "%s%.*s", p->len ? "." : "", (int)(len > 64 ? 64 : len), key);
    char buf[68];
    size_t n = len > 64 ? 64 : len;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)key[i];
        buf[i] = (ch < 0x20 || ch == 0x7f || ch == '"') ? '?' : (char)ch;
    }
    buf[n] = '\0';
    return checks_path_push(p, "[\"%s%s\"]", buf, len > 64 ? "..." : "");
}

size_t checks_path_push_lua_key(struct checks_path *p, lua_State *L, int idx)
{
    int t = lua_type(L, idx);
    if (t == LUA_TSTRING) {
        size_t len;
        const char *k = lua_tolstring(L, idx, &len);
        return checks_path_push_key(p, k, len);
    }
    if (t == LUA_TNUMBER || t == LUA_TBOOLEAN) {
        char d[64];
        describe_other_key(L, idx, d, sizeof d);
        return checks_path_push(p, "%s", d);
    }
    return checks_path_push(p, "[%s]", luaL_typename(L, idx));
}

void checks_err_init(struct checks_err *e, char *buf, size_t size, const char *path)
{
    e->buf = buf;
    e->size = size;
    e->lead_name = e->lead_text = NULL;
    e->path.len = 0;
    e->path.buf[0] = '\0';
    if (path != NULL && path[0] != '\0')
        checks_path_push(&e->path, "%s", path);
    if (size > 0)
        buf[0] = '\0';
}

int checks_vfail(struct checks_err *e, const char *fmt, va_list ap)
{
    int n = snprintf(e->buf, e->size, "%s%s%s%s", e->lead_name ? e->lead_name : "",
                     e->lead_text ? e->lead_text : "", e->path.buf, e->path.len ? ": " : "");
    if (n >= 0 && (size_t)n < e->size)
        vsnprintf(e->buf + n, e->size - (size_t)n, fmt, ap);
    return -1;
}

int checks_fail(struct checks_err *e, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    checks_vfail(e, fmt, ap);
    va_end(ap);
    return -1;
}

/* ---- errors that teach -------------------------------------------------------------------- */

#define NEAR_MAX 64   /* longer keys get no suggestion */

static unsigned char fold(char c)
{
    return c >= 'A' && c <= 'Z' ? (unsigned char)(c + ('a' - 'A')) : (unsigned char)c;
}

/* Edit distance without regard to case, counting a swap of neighbours as one edit
 * (optimal string alignment): "stauts" is one edit from "status". */
static int distance(const char *a, size_t an, const char *b, size_t bn)
{
    int rows[3][NEAR_MAX + 1];
    int *prev2 = rows[0], *prev = rows[1], *cur = rows[2];
    for (size_t j = 0; j <= bn; j++)
        prev[j] = (int)j;
    for (size_t i = 1; i <= an; i++) {
        cur[0] = (int)i;
        for (size_t j = 1; j <= bn; j++) {
            int cost = fold(a[i - 1]) != fold(b[j - 1]);
            int v = prev[j - 1] + cost;
            if (prev[j] + 1 < v)
                v = prev[j] + 1;
            if (cur[j - 1] + 1 < v)
                v = cur[j - 1] + 1;
            if (i > 1 && j > 1 && fold(a[i - 1]) == fold(b[j - 2]) &&
                fold(a[i - 2]) == fold(b[j - 1]) && prev2[j - 2] + 1 < v)
                v = prev2[j - 2] + 1;
            cur[j] = v;
        }
        int *t = prev2;
        prev2 = prev;
        prev = cur;
        cur = t;
    }
    return prev[bn];
}

static bool prefix_of(const char *a, size_t an, const char *b)
{
    for (size_t i = 0; i < an; i++)
        if (b[i] == '\0' || fold(a[i]) != fold(b[i]))
            return false;
    return true;
}

void checks_near_init(struct checks_near *s, const char *key, size_t len)
{
    s->key = key;
    s->len = len;
    s->prefixes = true;
    s->best_score = 1000;
    s->best = NULL;
    s->tie = false;
}

void checks_near_init_lua(struct checks_near *s, lua_State *L, int idx)
{
    size_t len = 0;
    const char *k = lua_type(L, idx) == LUA_TSTRING ? lua_tolstring(L, idx, &len) : "";
    checks_near_init(s, k, len);
}

/* How close name is to the key: 0 differs in case only, 1-2 edits, 3 a prefix; -1 not close. */
static int score(const struct checks_near *s, const char *name)
{
    size_t nlen = strlen(name);
    if (s->len == 0 || s->len > NEAR_MAX || nlen > NEAR_MAX)
        return -1;
    if (nlen == s->len && memcmp(name, s->key, nlen) == 0)
        return -1;   /* the key itself is known: nothing to suggest */
    int max = s->prefixes ? (s->len <= 4 ? 1 : 2) : (s->len < 9 ? 1 : 2);
    size_t diff = nlen > s->len ? nlen - s->len : s->len - nlen;
    if (diff <= (size_t)max) {
        int d = distance(s->key, s->len, name, nlen);
        if (d <= max)
            return d;
    }
    if (s->prefixes && (s->len < nlen ? s->len : nlen) >= 3 &&
        (s->len < nlen ? prefix_of(s->key, s->len, name) : prefix_of(name, nlen, s->key)))
        return 3;
    return -1;
}

void checks_near_offer(struct checks_near *s, const char *name)
{
    int sc = score(s, name);
    if (sc < 0 || sc > s->best_score)
        return;
    if (sc == s->best_score) {
        if (s->best != NULL && strcmp(s->best, name) != 0)
            s->tie = true;
        return;
    }
    s->best_score = sc;
    s->best = name;
    s->tie = false;
}

const char *checks_near_best(const struct checks_near *s)
{
    return s->tie ? NULL : s->best;
}

void checks_did_you_mean(const char *best, const char *prefix, char *buf, size_t size)
{
    if (best == NULL)
        snprintf(buf, size, "%s", "");
    else
        snprintf(buf, size, " (did you mean '%s%s'?)", prefix, best);
}

const char *checks_misspelled_handler(const char *global_name)
{
    static const char *const handlers[] = {
        "on_request_headers", "on_response_headers", "on_request_body", "on_response_body",
        "on_request_trailers", "on_response_trailers", "process"};
    size_t n = sizeof handlers / sizeof handlers[0];
    for (size_t i = 0; i < n; i++)
        if (strcmp(global_name, handlers[i]) == 0)
            return NULL;
    struct checks_near s;
    checks_near_init(&s, global_name, strlen(global_name));
    s.prefixes = false;
    for (size_t i = 0; i < n; i++)
        checks_near_offer(&s, handlers[i]);
    return checks_near_best(&s);
}

void checks_bad_table_message(char *buf, size_t size, const char *src, int line,
                              const char *handler, const char *detail)
{
    size_t hl = strlen(handler);
    if (strncmp(detail, handler, hl) == 0 && detail[hl] == ' ')
        snprintf(buf, size, "%s:%d: %s (defined here)%s", src, line, handler, detail + hl);
    else
        snprintf(buf, size, "%s:%d: %s (defined here): %s", src, line, handler, detail);
}
