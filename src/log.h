/* log.h — the server log: one line per event on stderr, safe from any thread. */
#ifndef LUACALLOUT_LOG_H
#define LUACALLOUT_LOG_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR };

void log_set_level(enum log_level level);
enum log_level log_get_level(void);
/* Accepts debug|info|warn|warning|error (any case); 0 on success, -1 on an unknown name. */
int log_parse_level(const char *name, enum log_level *out);
void log_msg(enum log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

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

#define log_limited_at(level, ...)                                                         \
    do {                                                                                   \
        static struct log_limiter log_limiter_;                                            \
        log_limited(&log_limiter_, (level), __VA_ARGS__);                                  \
    } while (0)
#define log_warn_limited(...) log_limited_at(LOG_WARN, __VA_ARGS__)
#define log_error_limited(...) log_limited_at(LOG_ERROR, __VA_ARGS__)

#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARN, __VA_ARGS__)
#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)

#endif
