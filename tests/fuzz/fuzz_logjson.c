/* fuzz_logjson.c — libFuzzer target for the log encoder: src/logjson.c and log_render.
 * Checked with the independent strict reader of tests/unit/json_check.h.
 *
 * Byte 0, bit 0 picks the mode.
 * 0, a record: byte 1 = level (bits 0-1), text format (bit 2), a stream id (bit 3), a
 *    phase (bit 4), a script (bit 5), a traceback (bit 6), a line (bit 7); bytes 2 and 3
 *    the lengths of the traceback and the script; the rest is the message. A JSON record
 *    must be one line of at most LOG_RECORD_MAX bytes holding one object without
 *    duplicate keys, whose msg, message, script and traceback decode to the repaired
 *    input (invalid UTF-8 bytes as U+FFFD), whole or cut and ending in "...". A text
 *    record must be at most LOG_RECORD_MAX bytes ending in a newline.
 * 1, a writer program: byte 1 = the buffer size - 1; then one op per byte (low 3 bits:
 *    open object, open array, close, key, string, integer, number, bool/null; the high
 *    bits and the next bytes are its operands). Whatever it writes, closed, must be
 *    valid JSON within the buffer.
 *
 * cmake -S . -B build-fuzz -DFUZZ=ON -DSANITIZE=ON -DCMAKE_C_COMPILER=clang
 * cmake --build build-fuzz --target fuzz_logjson
 * build-fuzz/fuzz_logjson CORPUS_DIR   (a copy of tests/fuzz/corpus/fuzz_logjson) */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "logjson.h"

#include "../unit/json_check.h"

static void fail(const char *what, const char *buf, size_t n)
{
    fprintf(stderr, "fuzz_logjson: %s: %.*s\n", what, (int)n, buf);
    abort();
}

/* s repaired as the encoder promises, into out (3 bytes per input byte at most) */
static size_t repair(const uint8_t *s, size_t n, char *out)
{
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        size_t k = jc_utf8(s + i, n - i);
        if (k == 0) {
            memcpy(out + o, "\xef\xbf\xbd", 3), o += 3, i++;
        } else {
            memcpy(out + o, s + i, k), o += k, i += k;
        }
    }
    return o;
}

/* The member `key` must decode to want[0..wn), or to a prefix of it followed by "...". */
static void check_member(const struct jc *p, const char *key, const uint8_t *in, size_t n,
                         const char *buf, size_t len)
{
    static char want[3 * 65536], got[LOG_RECORD_MAX];
    if (n > sizeof want / 3)
        return;
    size_t wn = repair(in, n, want), gn;
    if (!jc_member_string(p, key, got, sizeof got, &gn))
        return;   /* left out when nothing fitted: allowed */
    if (gn == wn && memcmp(got, want, wn) == 0)
        return;
    if (gn >= 3 && gn - 3 < wn && memcmp(got + gn - 3, "...", 3) == 0 &&
        memcmp(got, want, gn - 3) == 0)
        return;
    fail(key, buf, len);
}

static void record(const uint8_t *data, size_t size)
{
    if (size < 4)
        return;
    uint8_t f = data[1];
    size_t rest = size - 4;
    size_t tl = data[2] * 64u <= rest ? data[2] * 64u : rest;
    size_t sl = data[3] <= rest - tl ? data[3] : rest - tl;
    const uint8_t *tb = data + 4, *script = tb + tl, *msg = script + sl;
    size_t ml = rest - tl - sl;
    char sbuf[256];
    memcpy(sbuf, script, sl);
    sbuf[sl] = '\0';   /* a C string field: cut at a NUL of the input */
    struct log_fields lf = {
        .stream_id = f & 8 ? (uint64_t)size * 0x9e3779b97f4a7c15u : 0,
        .phase = f & 16 ? "response_trailers" : NULL,
        .script = f & 32 ? sbuf : NULL,
        .line = f & 128 ? (int)size : 0,
        .traceback = f & 64 ? (const char *)tb : NULL,
        .traceback_len = f & 64 ? tl : 0,
    };
    struct timespec ts = {.tv_sec = (time_t)data[1] << 24, .tv_nsec = 999999999};
    char buf[LOG_RECORD_MAX];
    size_t body;
    enum log_format fmt = f & 4 ? LOG_FORMAT_TEXT : LOG_FORMAT_JSON;
    size_t n = log_render(buf, fmt, (enum log_level)(f & 3), &ts, (int)(size % 3) - 1, &lf,
                          (const char *)msg, ml, &body);
    if (n == 0 || n > LOG_RECORD_MAX || buf[n - 1] != '\n' || body > n)
        fail("record bounds", buf, n);
    if (fmt == LOG_FORMAT_TEXT)
        return;
    if (memchr(buf, '\n', n - 1) != NULL)
        fail("a second line", buf, n);
    struct jc p;
    if (!jc_parse(&p, buf, n - 1) || buf[0] != '{')
        fail("not one JSON object", buf, n);
    size_t len;
    if (!jc_member(&p, "ts", &len) || !jc_member(&p, "level", &len) ||
        !jc_member(&p, "severity", &len))
        fail("a required field is missing", buf, n);
    check_member(&p, "msg", msg, ml, buf, n);
    check_member(&p, "message", msg, ml, buf, n);
    if (lf.traceback)
        check_member(&p, "traceback", tb, tl, buf, n);
    if (lf.script)
        check_member(&p, "script", (const uint8_t *)sbuf, strlen(sbuf), buf, n);
}

static void program(const uint8_t *data, size_t size)
{
    if (size < 2)
        return;
    static char text[] = "k\"\\\n\x01\xc3\xa9\xff\xe2\x82\xac wide enough for a key or two";
    char buf[257];
    size_t cap = (size_t)data[1] + 1;
    struct logjson j;
    logjson_init(&j, buf, cap);
    bool started = false;
    for (size_t i = 2; i < size; i++) {
        uint8_t op = data[i] & 7, arg = data[i] >> 3;   /* arg 0..31 */
        if (started && j.depth == 0)
            break;   /* one top-level value */
        switch (op) {
        case 0: logjson_open(&j, '{'); break;
        case 1: logjson_open(&j, '['); break;
        case 2: logjson_close(&j); break;
        case 3: logjson_key(&j, text + arg % 8, arg); break;
        case 4: logjson_string(&j, text + arg % 8, arg, i + 1 < size ? data[++i] : SIZE_MAX);
                break;
        case 5: logjson_int(&j, (long long)arg * -123456789012345LL); break;
        case 6: {
            double d = 0;
            if (i + 8 < size) {
                memcpy(&d, data + i + 1, 8);
                i += 8;
            }
            logjson_number(&j, d);
            break;
        }
        default: arg & 1 ? logjson_null(&j) : logjson_bool(&j, arg & 2); break;
        }
        started = started || j.len > 0;
        if (j.len + (size_t)j.depth > cap)
            fail("no room left to close", buf, j.len);
    }
    while (j.depth > 0)
        logjson_close(&j);
    if (j.len > cap)
        fail("past the buffer", buf, j.len);
    struct jc p;
    if (j.len > 0 && !jc_parse_lax(&p, buf, j.len))   /* the writer does not police keys */
        fail("not JSON", buf, j.len);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    if (data[0] & 1)
        program(data, size);
    else
        record(data, size);
    return 0;
}
