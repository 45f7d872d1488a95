/* test_logjson.c — the log record encoder (src/logjson.c) and renderer (log_render in
 * src/log.c): escapes, UTF-8 repair, records that stay one valid JSON object on one line
 * within LOG_RECORD_MAX however long or hostile their parts, the fields and their
 * Cloud Logging names, and the text format as it was. Output is read back with an
 * independent strict reader (json_check.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "logjson.h"

#include "check.h"
#include "json_check.h"

static const struct timespec when = {.tv_sec = 1767323045, .tv_nsec = 678999999};

/* escape(s) as a C string */
static const char *esc(const char *s, size_t n)
{
    static char out[256];
    size_t w;
    CHECK(logjson_escape(out, sizeof out - 1, s, n, &w) == n);
    out[w] = '\0';
    return out;
}

static void test_escape(void)
{
    CHECK(strcmp(esc("plain", 5), "plain") == 0);
    CHECK(strcmp(esc("a\"b\\c", 5), "a\\\"b\\\\c") == 0);
    CHECK(strcmp(esc("\n\t\r", 3), "\\n\\t\\r") == 0);
    CHECK(strcmp(esc("\x01\x1f\x7f", 3), "\\u0001\\u001f\\u007f") == 0);
    CHECK(strcmp(esc("a\0b", 3), "a\\u0000b") == 0);
    /* valid UTF-8 passes as is: 2, 3 and 4 byte forms */
    CHECK(strcmp(esc("\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", 9), "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80") == 0);
    /* each byte of a bad sequence becomes U+FFFD: a lone continuation, an overlong '/',
     * a surrogate, past U+10FFFF, a sequence cut by the end, 0xff */
    CHECK(strcmp(esc("\x80", 1), "\xef\xbf\xbd") == 0);
    CHECK(strcmp(esc("\xc0\xaf", 2), "\xef\xbf\xbd\xef\xbf\xbd") == 0);
    CHECK(strcmp(esc("\xed\xa0\x80", 3), "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd") == 0);
    CHECK(strcmp(esc("\xf4\x90\x80\x80", 4),
                 "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd") == 0);
    CHECK(strcmp(esc("x\xe2\x82", 3), "x\xef\xbf\xbd\xef\xbf\xbd") == 0);
    CHECK(strcmp(esc("\xff", 1), "\xef\xbf\xbd") == 0);

    /* a short buffer takes whole escapes and characters only */
    char out[8];
    size_t w;
    CHECK(logjson_escape(out, 5, "ab\ncd", 5, &w) == 4 && w == 5 && memcmp(out, "ab\\nc", 5) == 0);
    CHECK(logjson_escape(out, 3, "a\x01", 2, &w) == 1 && w == 1);
    CHECK(logjson_escape(out, 3, "a\xe2\x82\xac", 4, &w) == 1 && w == 1);
}

/* renders and parses a JSON record; returns its length */
static size_t json_record(char *buf, struct jc *p, enum log_level level,
                          const struct log_fields *f, const char *msg, size_t len)
{
    size_t body;
    size_t n = log_render(buf, LOG_FORMAT_JSON, level, &when, 3, f, msg, len, &body);
    CHECK(n <= LOG_RECORD_MAX);
    CHECK(n > 0 && buf[n - 1] == '\n');
    CHECK(memchr(buf, '\n', n - 1) == NULL);   /* one line */
    CHECK(jc_parse(p, buf, n - 1));
    return n;
}

static void test_record_fields(void)
{
    char buf[LOG_RECORD_MAX + 1];
    struct jc p;
    static const char tb[] = "stack traceback:\n\t/srv/s.lua:3: in function 'on_request_headers'\n\t[C]: in ?";
    struct log_fields f = {.stream_id = 12, .phase = "request_body", .script = "/srv/s.lua",
                           .line = 3, .traceback = tb, .traceback_len = sizeof tb - 1,
                           .extra = "\"a\":1,\"b\":{\"c\":[true]}", .extra_len = 22};
    const char msg[] = "on_request_body failed: /srv/s.lua:3: boom \"quoted\"";
    json_record(buf, &p, LOG_WARN, &f, msg, sizeof msg - 1);
    char v[512];
    CHECK(jc_member_string(&p, "ts", v, sizeof v, NULL) && strcmp(v, "2026-01-02T03:04:05.678Z") == 0);
    CHECK(jc_member_string(&p, "level", v, sizeof v, NULL) && strcmp(v, "warn") == 0);
    CHECK(jc_member_string(&p, "severity", v, sizeof v, NULL) && strcmp(v, "WARNING") == 0);
    CHECK(jc_member_string(&p, "msg", v, sizeof v, NULL) && strcmp(v, msg) == 0);
    CHECK(jc_member_string(&p, "message", v, sizeof v, NULL) && strcmp(v, msg) == 0);
    CHECK(jc_member_string(&p, "phase", v, sizeof v, NULL) && strcmp(v, "request_body") == 0);
    CHECK(jc_member_string(&p, "script", v, sizeof v, NULL) && strcmp(v, "/srv/s.lua") == 0);
    CHECK(jc_member_string(&p, "traceback", v, sizeof v, NULL) && strcmp(v, tb) == 0);
    size_t len;
    const char *raw = jc_member(&p, "stream_id", &len);
    CHECK(raw && len == 2 && memcmp(raw, "12", 2) == 0);
    raw = jc_member(&p, "line", &len);
    CHECK(raw && len == 1 && raw[0] == '3');
    raw = jc_member(&p, "worker", &len);
    CHECK(raw && len == 1 && raw[0] == '3');
    raw = jc_member(&p, "b", &len);
    CHECK(raw && len == 12 && memcmp(raw, "{\"c\":[true]}", 12) == 0);
    CHECK(p.nkeys == 13);

    /* a record about nothing in particular: only ts, level, severity, worker, msg, message */
    json_record(buf, &p, LOG_ERROR, NULL, "x", 1);
    CHECK(p.nkeys == 6);
    CHECK(jc_member_string(&p, "severity", v, sizeof v, NULL) && strcmp(v, "ERROR") == 0);
    size_t body;
    size_t n = log_render(buf, LOG_FORMAT_JSON, LOG_DEBUG, &when, -1, NULL, "", 0, &body);
    buf[n] = '\0';
    CHECK(body == 1);
    CHECK(strcmp(buf, "{\"ts\":\"2026-01-02T03:04:05.678Z\",\"level\":\"debug\","
                      "\"severity\":\"DEBUG\",\"msg\":\"\",\"message\":\"\"}\n") == 0);
    n = log_render(buf, LOG_FORMAT_JSON, LOG_INFO, &when, -1, NULL, "i", 1, &body);
    buf[n] = '\0';
    CHECK(strstr(buf, "\"level\":\"info\",\"severity\":\"INFO\"") != NULL);
}

/* The reference repair of the test, byte by byte, as the encoder documents it. */
static size_t repair(const char *s, size_t n, char *out)
{
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        size_t k = jc_utf8((const unsigned char *)s + i, n - i);
        if (k == 0) {
            memcpy(out + o, "\xef\xbf\xbd", 3);
            o += 3;
            i++;
        } else {
            memcpy(out + o, s + i, k);
            o += k;
            i += k;
        }
    }
    return o;
}

/* A long message, a long traceback and fields too big: the record stays within
 * LOG_RECORD_MAX, one valid line, the message a marked prefix of the message. */
static void test_record_limits(void)
{
    enum { N = 20000 };
    char *msg = malloc(N), *tb = malloc(N), *want = malloc(3 * N), *extra = malloc(N);
    char *v = malloc(3 * N);
    CHECK(msg && tb && want && extra && v);
    for (size_t i = 0; i < N; i++) {
        msg[i] = "ab\"\\\n\x01\xc3\xa9\xff\xe2\x82\xac"[i % 12];
        tb[i] = "\n\t[C]: in ?"[i % 11];
    }
    size_t wn = repair(msg, N, want);
    size_t k = 0;
    extra[k++] = '"', extra[k++] = 'x', extra[k++] = '"', extra[k++] = ':', extra[k++] = '"';
    while (k < 3000)
        extra[k++] = 'y';
    extra[k++] = '"';
    char buf[LOG_RECORD_MAX];
    struct jc p;
    struct log_fields f = {.stream_id = 1, .traceback = tb, .traceback_len = N,
                           .extra = extra, .extra_len = k};
    size_t n = json_record(buf, &p, LOG_ERROR, &f, msg, N);
    CHECK(n > LOG_RECORD_MAX - 64);   /* it did use the room */
    size_t vlen;
    CHECK(jc_member_string(&p, "msg", v, 3 * N, &vlen));
    CHECK(vlen > 3 + 500 && vlen < wn);
    CHECK(memcmp(v + vlen - 3, "...", 3) == 0 && memcmp(v, want, vlen - 3) == 0);
    size_t len;
    const char *raw = jc_member(&p, "fields_dropped", &len);
    CHECK(raw && len == 4 && memcmp(raw, "true", 4) == 0);
    CHECK(jc_member(&p, "x", &len) == NULL);
    CHECK(jc_member_string(&p, "traceback", v, 3 * N, &vlen));
    CHECK(vlen > 1000 && memcmp(v + vlen - 3, "...", 3) == 0 && memcmp(v, tb, vlen - 3) == 0);

    /* no traceback: the message gets about half the record (twice: msg and message) */
    n = json_record(buf, &p, LOG_ERROR, NULL, msg, N);
    CHECK(n > LOG_RECORD_MAX - 64);
    CHECK(jc_member_string(&p, "msg", v, 3 * N, &vlen) && vlen > 1100);   /* 22 bytes escaped per 14 */
    /* fields that fit are kept */
    f.extra_len = 200;
    memcpy(extra + 199, "\"", 1);
    n = json_record(buf, &p, LOG_ERROR, &f, msg, N);
    CHECK(jc_member(&p, "x", &len) != NULL && len == 196);
    free(msg), free(tb), free(want), free(extra), free(v);
}

static void test_text(void)
{
    char buf[LOG_RECORD_MAX];
    size_t body;
    static const char tb[] = "stack traceback:\n\t[C]: in ?";
    struct log_fields f = {.stream_id = 9, .phase = "request_headers", .script = "s.lua",
                           .line = 2, .traceback = tb, .traceback_len = sizeof tb - 1};
    size_t n = log_render(buf, LOG_FORMAT_TEXT, LOG_ERROR, &when, 1, &f, "on_x failed: s.lua:2: e",
                          23, &body);
    static const char want[] = "2026-01-02T03:04:05.678Z ERROR stream 9: on_x failed: s.lua:2: e\n"
                               "stack traceback:\n\t[C]: in ?\n";
    CHECK(n == sizeof want - 1 && memcmp(buf, want, n) == 0);
    CHECK(body == 31);
    n = log_render(buf, LOG_FORMAT_TEXT, LOG_INFO, &when, -1, NULL, "plain", 5, &body);
    CHECK(n == 37 && memcmp(buf, "2026-01-02T03:04:05.678Z INFO  plain\n", n) == 0);
    f = (struct log_fields){.stream_id = 4, .extra = "\"k\":\"v\"", .extra_len = 7};
    n = log_render(buf, LOG_FORMAT_TEXT, LOG_WARN, &when, -1, &f, "m", 1, &body);
    CHECK(memcmp(buf + body, "stream 4: m {\"k\":\"v\"}\n", n - body) == 0);
    /* a long message is cut, still one record ending in a newline */
    static char big[3 * LOG_RECORD_MAX];
    memset(big, 'z', sizeof big);
    n = log_render(buf, LOG_FORMAT_TEXT, LOG_WARN, &when, -1, NULL, big, sizeof big, &body);
    CHECK(n == LOG_RECORD_MAX && buf[n - 1] == '\n');
}

static void test_writer(void)
{
    char buf[64];
    struct logjson j;
    struct jc p;
    /* nested containers in a small buffer: whatever fits, closed */
    for (size_t cap = 1; cap < 40; cap++) {
        logjson_init(&j, buf, cap);
        logjson_open(&j, '{');
        logjson_key(&j, "a", 1);
        logjson_open(&j, '[');
        logjson_int(&j, 1234567);
        logjson_string(&j, "hello world", 11, SIZE_MAX);
        logjson_open(&j, '{');
        logjson_key(&j, "k", 1);
        logjson_number(&j, 0.1);
        while (j.depth > 0)
            logjson_close(&j);
        CHECK(j.len <= cap);
        if (j.len > 0)
            CHECK(jc_parse(&p, buf, j.len));
    }
    CHECK(strncmp(buf, "{\"a\":[1234567,\"hello world\",{\"k\":0.1}]}", j.len) == 0);
    /* a key whose value never came is taken back at the close */
    logjson_init(&j, buf, sizeof buf);
    logjson_open(&j, '{');
    logjson_key(&j, "a", 1);
    logjson_bool(&j, false);
    logjson_key(&j, "dangling", 8);
    logjson_close(&j);
    CHECK(j.len == 11 && memcmp(buf, "{\"a\":false}", 11) == 0);
    /* numbers JSON cannot hold */
    logjson_init(&j, buf, sizeof buf);
    logjson_open(&j, '[');
    logjson_number(&j, 0.0 / 0.0);
    logjson_number(&j, 1e300 * 1e300);
    logjson_number(&j, -2.5e-7);
    logjson_null(&j);
    logjson_close(&j);
    buf[j.len] = '\0';
    CHECK(strcmp(buf, "[null,null,-2.5e-07,null]") == 0);
    CHECK(jc_parse(&p, buf, j.len));
    /* deep: room for the closes first (32 opens fill 64 bytes with their closes), then
     * the depth limit */
    for (size_t cap = 64; cap <= 128; cap += 64) {
        char deep[128];
        logjson_init(&j, deep, cap);
        int opened = 0;
        while (logjson_open(&j, '['))
            opened++;
        CHECK(opened == (cap == 64 ? 32 : LOGJSON_MAX_DEPTH));
        while (j.depth)
            logjson_close(&j);
        CHECK(jc_parse(&p, deep, j.len));
    }
}

int main(void)
{
    test_escape();
    test_record_fields();
    test_record_limits();
    test_text();
    test_writer();
    printf("%d passed, 0 failed\n", passed);
    return 0;
}
