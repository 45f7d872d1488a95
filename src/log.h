/* log.h — the server log: one record per event on stderr, safe from any thread and from
 * any process sharing the stderr: each record is one write(2) of at most LOG_RECORD_MAX
 * bytes (PIPE_BUF, which a pipe writes whole), so records of the supervisor and its
 * workers never interleave within a line. Two formats (--log_format, docs/operations.md):
 * text, "2026-01-02T03:04:05.678Z INFO  message", and JSON, one object per line. */
#ifndef LUACALLOUT_LOG_H
#define LUACALLOUT_LOG_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR };

void log_set_level(enum log_level level);
enum log_level log_get_level(void);
/* Accepts debug|info|warn|warning|error (any case); 0 on success, -1 on an unknown name. */
int log_parse_level(const char *name, enum log_level *out);
void log_msg(enum log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

enum log_format { LOG_FORMAT_TEXT, LOG_FORMAT_JSON };
/* Set once at start-up, before other threads log. */
void log_set_format(enum log_format format);
enum log_format log_get_format(void);
/* Accepts text|json; 0 on success, -1 otherwise. */
int log_parse_format(const char *name, enum log_format *out);

/* Why the server cannot start (or go on): "luacallout: msg" on stderr in the text format,
 * an error record in JSON, so that a log pipeline reads the one line that says why. */
void log_fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* The worker slot this process serves, named by every JSON record ("worker"); -1 (the
 * default) in the supervisor. */
void log_set_worker(int slot);

/* What a record is about, beyond its message; every field is optional (0 / NULL: not
 * known, left out). The text format shows only the stream ("stream 12: ") and the
 * traceback (on the lines after the message, as Lua prints it); JSON has them all. */
struct log_fields {
    uint64_t stream_id;      /* the Process stream (ctx.stream_id) */
    const char *phase;       /* "request_headers", ... */
    const char *script;      /* the file a script error points at */
    int line;                /* and its line */
    const char *traceback;   /* Lua's "stack traceback:\n\t..." */
    size_t traceback_len;
    /* More members, already JSON without the braces: `"k":v,"k2":v2` (callout.log's
     * table of fields, encoded by logjson). Text shows them after the message as {...}. */
    const char *extra;
    size_t extra_len;
};
void log_with(enum log_level level, const struct log_fields *f, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* A message as it is, no format: msg[0..len) may hold any byte, NUL included (callout.log). */
void log_bytes(enum log_level level, const struct log_fields *f, const char *msg, size_t len);

/* Largest record written, newline included: PIPE_BUF on Linux. Longer messages are cut
 * (in JSON at a character boundary, ending in "..."), the traceback first. */
#define LOG_RECORD_MAX 4096

/* Renders one record into buf (at least LOG_RECORD_MAX bytes), newline included, and
 * returns its length; *body is where the text after the timestamp and level starts (what
 * a sink gets). msg need not be a C string nor UTF-8. Pure: for the tests and the fuzzer. */
size_t log_render(char *buf, enum log_format format, enum log_level level,
                  const struct timespec *ts, int worker, const struct log_fields *f,
                  const char *msg, size_t msg_len, size_t *body);

/* Sends lines to fn instead of stderr (NULL: back to stderr). fn gets the text after the
 * timestamp and level, without the newline. For the busted module (src/testing_native.c),
 * which collects each call's lines; set it before other threads log. */
typedef void log_sink_fn(void *ud, enum log_level level, const char *msg, size_t len);
void log_set_sink(log_sink_fn *fn, void *ud);

/* Repeated warnings a client can cause (an unknown method, a malformed message): the first
 * LOG_LIMIT_BURST lines of a call site are written, then at most one per
 * LOG_LIMIT_INTERVAL_MS, which says how many were left out ("... (and 995 more like this in
 * the last 10 s)"). One static limiter per call site; thread-safe and cheap when suppressed
 * (two relaxed atomics, no formatting). */
#define LOG_LIMIT_BURST 5
#define LOG_LIMIT_INTERVAL_MS 10000
struct log_limiter {
    _Atomic unsigned long seen;       /* calls so far */
    _Atomic int64_t last_ms;          /* when the last line past the burst was written */
    _Atomic unsigned long suppressed; /* calls left out since then */
};
void log_limited(struct log_limiter *lim, enum log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* The same with fields (f may be NULL). */
void log_limited_with(struct log_limiter *lim, enum log_level level,
                      const struct log_fields *f, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#define log_limited_at(level, ...)                                                         \
    do {                                                                                   \
        static struct log_limiter log_limiter_;                                            \
        log_limited(&log_limiter_, (level), __VA_ARGS__);                                  \
    } while (0)
#define log_limited_fields_at(level, fields, ...)                                          \
    do {                                                                                   \
        static struct log_limiter log_limiter_;                                            \
        log_limited_with(&log_limiter_, (level), (fields), __VA_ARGS__);                   \
    } while (0)
#define log_warn_limited(...) log_limited_at(LOG_WARN, __VA_ARGS__)
#define log_error_limited(...) log_limited_at(LOG_ERROR, __VA_ARGS__)

#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARN, __VA_ARGS__)
#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)

#endif
