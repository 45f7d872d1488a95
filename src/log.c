/* log.c — timestamped records on stderr, text or JSON (logjson.c). A record is rendered
 * into one buffer of at most PIPE_BUF bytes and written with a single write(2), so records
 * from different threads and processes never interleave. */
#include "log.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "logjson.h"

static _Atomic int current_level = LOG_INFO;
static const char *const level_names[] = {"DEBUG", "INFO", "WARN", "ERROR"};
/* a record must be one atomic write into a pipe */
_Static_assert(LOG_RECORD_MAX <= PIPE_BUF, "LOG_RECORD_MAX exceeds PIPE_BUF");

static enum log_format current_format = LOG_FORMAT_TEXT;
static int worker_slot = -1;
static log_sink_fn *sink;
static void *sink_ud;

void log_set_sink(log_sink_fn *fn, void *ud)
{
    sink = fn;
    sink_ud = ud;
}

void log_set_level(enum log_level level) { current_level = (int)level; }

enum log_level log_get_level(void) { return (enum log_level)current_level; }

int log_parse_level(const char *name, enum log_level *out)
{
    static const struct { const char *name; enum log_level level; } names[] = {
        {"debug", LOG_DEBUG}, {"info", LOG_INFO}, {"warn", LOG_WARN},
        {"warning", LOG_WARN}, {"error", LOG_ERROR},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (strcasecmp(name, names[i].name) == 0) {
            *out = names[i].level;
            return 0;
        }
    }
    return -1;
}

int log_parse_format(const char *name, enum log_format *out)
{
    if (strcmp(name, "text") == 0)
        *out = LOG_FORMAT_TEXT;
    else if (strcmp(name, "json") == 0)
        *out = LOG_FORMAT_JSON;
    else
        return -1;
    return 0;
}

void log_set_format(enum log_format format) { current_format = format; }

enum log_format log_get_format(void) { return current_format; }

void log_set_worker(int slot) { worker_slot = slot; }

/* "2026-01-02T03:04:05.678Z": RFC 3339, UTC, milliseconds; 24 bytes and a NUL (the
 * buffer has room for what the compiler cannot prove out of range). */
#define TIME_MAX 64
static void put_time(char out[TIME_MAX], const struct timespec *ts)
{
    struct tm tm;
    gmtime_r(&ts->tv_sec, &tm);
    snprintf(out, TIME_MAX, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", (tm.tm_year + 1900) % 10000,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
             ts->tv_nsec / 1000000 % 1000);
}

/* Appends s[0..n) to buf[*len..cap), cut to fit. */
static void put(char *buf, size_t *len, size_t cap, const char *s, size_t n)
{
    if (n > cap - *len)
        n = cap - *len;
    memcpy(buf + *len, s, n);
    *len += n;
}

static size_t render_text(char *buf, enum log_level level, const struct timespec *ts,
                          const struct log_fields *f, const char *msg, size_t msg_len,
                          size_t *body)
{
    const size_t cap = LOG_RECORD_MAX - 1;   /* the newline */
    char t[TIME_MAX];
    put_time(t, ts);
    size_t len = (size_t)snprintf(buf, cap, "%s %-5s ", t, level_names[level]);
    *body = len;
    if (f && f->stream_id) {
        char id[40];
        int k = snprintf(id, sizeof id, "stream %" PRIu64 ": ", f->stream_id);
        put(buf, &len, cap, id, (size_t)k);
    }
    put(buf, &len, cap, msg, msg_len);
    if (f && f->extra_len) {
        put(buf, &len, cap, " {", 2);
        put(buf, &len, cap, f->extra, f->extra_len);
        put(buf, &len, cap, "}", 1);
    }
    if (f && f->traceback_len) {
        put(buf, &len, cap, "\n", 1);
        put(buf, &len, cap, f->traceback, f->traceback_len);
    }
    buf[len++] = '\n';
    return len;
}

/* Cloud Logging's names for our levels (LogSeverity) */
static const char *const severities[] = {"DEBUG", "INFO", "WARNING", "ERROR"};
static const char *const json_levels[] = {"debug", "info", "warn", "error"};

/* One member, whole or not at all. */
static bool member_str(struct logjson *j, const char *key, const char *s, size_t n, size_t max)
{
    struct logjson_mark m = logjson_mark(j);
    if (logjson_key(j, key, strlen(key)) && logjson_string(j, s, n, max))
        return true;
    logjson_rewind(j, m);
    return false;
}

static bool member_int(struct logjson *j, const char *key, long long v)
{
    struct logjson_mark m = logjson_mark(j);
    if (logjson_key(j, key, strlen(key)) && logjson_int(j, v))
        return true;
    logjson_rewind(j, m);
    return false;
}

static size_t render_json(char *buf, enum log_level level, const struct timespec *ts,
                          int worker, const struct log_fields *f, const char *msg,
                          size_t msg_len, size_t *body)
{
    static const struct log_fields none;
    if (f == NULL)
        f = &none;
    struct logjson j;
    logjson_init(&j, buf, LOG_RECORD_MAX - 1);   /* the newline */
    char t[TIME_MAX];
    put_time(t, ts);
    logjson_open(&j, '{');
    *body = j.len;
    /* the small fields first (bounded: together far less than a record) */
    member_str(&j, "ts", t, strlen(t), SIZE_MAX);
    member_str(&j, "level", json_levels[level], strlen(json_levels[level]), 16);
    member_str(&j, "severity", severities[level], strlen(severities[level]), 16);
    if (worker >= 0)
        member_int(&j, "worker", worker);
    if (f->stream_id)
        member_int(&j, "stream_id", (long long)f->stream_id);
    if (f->phase)
        member_str(&j, "phase", f->phase, strlen(f->phase), 64);
    if (f->script)
        member_str(&j, "script", f->script, strlen(f->script), 512);
    if (f->line > 0)
        member_int(&j, "line", f->line);
    /* What is left is shared: the extra fields whole if they take at most half of it,
     * else they are dropped (cut JSON would not be JSON); the message, twice (msg and
     * Cloud Logging's message), at most a quarter each when a traceback follows; the
     * traceback, the rest. */
    size_t left = j.cap - j.len - (size_t)j.depth;
    size_t extra = f->extra_len && f->extra_len + 1 <= left / 2 ? f->extra_len + 1 : 0;
    size_t share = left > extra + 64 ? (left - extra - 64) / (f->traceback_len ? 4 : 2) : 0;
    struct logjson_mark m = logjson_mark(&j);
    if (logjson_key(&j, "msg", 3)) {
        size_t at = j.len;
        if (logjson_string(&j, msg, msg_len, share)) {
            size_t n = j.len - at;
            struct logjson_mark m2 = logjson_mark(&j);
            if (!(logjson_key(&j, "message", 7) && logjson_raw(&j, buf + at, n)))
                logjson_rewind(&j, m2);
        } else {
            logjson_rewind(&j, m);
        }
    }
    if (extra) {
        logjson_members(&j, f->extra, f->extra_len);
    } else if (f->extra_len) {
        m = logjson_mark(&j);
        if (!(logjson_key(&j, "fields_dropped", 14) && logjson_bool(&j, true)))
            logjson_rewind(&j, m);
    }
    if (f->traceback_len)
        member_str(&j, "traceback", f->traceback, f->traceback_len, SIZE_MAX);
    logjson_close(&j);
    buf[j.len++] = '\n';
    return j.len;
}

size_t log_render(char *buf, enum log_format format, enum log_level level,
                  const struct timespec *ts, int worker, const struct log_fields *f,
                  const char *msg, size_t msg_len, size_t *body)
{
    if ((unsigned)level > LOG_ERROR)
        level = LOG_ERROR;
    if (format == LOG_FORMAT_JSON)
        return render_json(buf, level, ts, worker, f, msg, msg_len, body);
    return render_text(buf, level, ts, f, msg, msg_len, body);
}

/* Renders the record of msg[0..len) and writes it at once. */
static void emit_bytes(enum log_level level, const struct log_fields *f, const char *msg,
                       size_t len)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    char line[LOG_RECORD_MAX];
    size_t body;
    if (sink != NULL) {   /* the busted module reads the text form */
        size_t n = render_text(line, level, &ts, f, msg, len, &body);
        sink(sink_ud, level, line + body, n - 1 - body);
        return;
    }
    size_t n = log_render(line, current_format, level, &ts, worker_slot, f, msg, len, &body);
    /* one write: a pipe takes up to PIPE_BUF bytes whole, so no other process's record
     * lands inside this one; a signal before anything is written only delays it */
    while (write(STDERR_FILENO, line, n) < 0 && errno == EINTR) {
    }
}

/* Formats the message (with an optional suffix) and writes its record. */
static void emit(enum log_level level, const struct log_fields *f, const char *suffix,
                 const char *fmt, va_list ap)
{
    char msg[LOG_RECORD_MAX];
    int m = vsnprintf(msg, sizeof msg, fmt, ap);
    size_t len = m < 0 ? 0 : (size_t)m < sizeof msg ? (size_t)m : sizeof msg - 1;
    if (suffix)
        put(msg, &len, sizeof msg, suffix, strlen(suffix));
    emit_bytes(level, f, msg, len);
}

void log_bytes(enum log_level level, const struct log_fields *f, const char *msg, size_t len)
{
    if ((int)level < current_level)
        return;
    emit_bytes(level, f, msg, len);
}

void log_fatal(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    if (log_get_format() == LOG_FORMAT_JSON) {
        emit(LOG_ERROR, NULL, NULL, fmt, ap);
    } else {
        char msg[LOG_RECORD_MAX];
        vsnprintf(msg, sizeof msg, fmt, ap);
        fprintf(stderr, "luacallout: %s\n", msg);
    }
    va_end(ap);
}

void log_msg(enum log_level level, const char *fmt, ...)
{
    if ((int)level < current_level)
        return;
    va_list ap;
    va_start(ap, fmt);
    emit(level, NULL, NULL, fmt, ap);
    va_end(ap);
}

void log_with(enum log_level level, const struct log_fields *f, const char *fmt, ...)
{
    if ((int)level < current_level)
        return;
    va_list ap;
    va_start(ap, fmt);
    emit(level, f, NULL, fmt, ap);
    va_end(ap);
}

static int64_t coarse_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Lock-free: a flood from every worker at once costs each call two atomic operations on
 * the limiter and no formatting. Of the threads that find the interval over, the one whose
 * compare-and-swap moves `last_ms` prints; the others count themselves as suppressed. Lines
 * suppressed at the end of a flood are not reported later (the fifth line says lines are
 * being limited, so a reader knows more may have happened). */
/* Whether a call of the limiter's site is written now; *suffix is the note to add. */
static bool limit_pass(struct log_limiter *lim, char *note, size_t note_len,
                       const char **suffix)
{
    unsigned long seen = atomic_fetch_add_explicit(&lim->seen, 1, memory_order_relaxed) + 1;
    *suffix = NULL;
    if (seen == LOG_LIMIT_BURST) {
        atomic_store_explicit(&lim->last_ms, coarse_ms(), memory_order_relaxed);
        snprintf(note, note_len, " (more lines like this: at most one per %d s)",
                 LOG_LIMIT_INTERVAL_MS / 1000);
        *suffix = note;
    } else if (seen > LOG_LIMIT_BURST) {
        int64_t now = coarse_ms();
        int64_t last = atomic_load_explicit(&lim->last_ms, memory_order_relaxed);
        /* last_ms is 0 only until the thread that wrote the burst's last line stores it */
        if (last == 0 || now - last < LOG_LIMIT_INTERVAL_MS ||
            !atomic_compare_exchange_strong_explicit(&lim->last_ms, &last, now,
                                                     memory_order_relaxed,
                                                     memory_order_relaxed)) {
            atomic_fetch_add_explicit(&lim->suppressed, 1, memory_order_relaxed);
            return false;
        }
        unsigned long k = atomic_exchange_explicit(&lim->suppressed, 0, memory_order_relaxed);
        if (k > 0) {
            snprintf(note, note_len, " (and %lu more like this in the last %d s)", k,
                     LOG_LIMIT_INTERVAL_MS / 1000);
            *suffix = note;
        }
    }
    return true;
}

static void limited(struct log_limiter *lim, enum log_level level, const struct log_fields *f,
                    const char *fmt, va_list ap)
{
    char note[128];
    const char *suffix;
    if ((int)level < current_level || !limit_pass(lim, note, sizeof note, &suffix))
        return;
    emit(level, f, suffix, fmt, ap);
}

void log_limited(struct log_limiter *lim, enum log_level level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    limited(lim, level, NULL, fmt, ap);
    va_end(ap);
}

void log_limited_with(struct log_limiter *lim, enum log_level level,
                      const struct log_fields *f, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    limited(lim, level, f, fmt, ap);
    va_end(ap);
}
