/* log.c — timestamped lines on stderr. A line is formatted into one buffer and written
 * with a single write(2), so lines from different threads never interleave. */
#include "log.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static _Atomic int current_level = LOG_INFO;
static const char *const level_names[] = {"DEBUG", "INFO", "WARN", "ERROR"};
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

/* Formats one line (with an optional suffix after the message) and writes it at once. */
static void log_line(enum log_level level, const char *suffix, const char *fmt, va_list ap)
{
    char line[4096];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(line, sizeof line, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %-5s ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                     tm.tm_sec, ts.tv_nsec / 1000000, level_names[level]);
    int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
    if (len > sizeof line - 2)
        len = sizeof line - 2;
    if (suffix) {
        size_t k = strlen(suffix);
        if (k > sizeof line - 2 - len)
            k = sizeof line - 2 - len;
        memcpy(line + len, suffix, k);
        len += k;
    }
    if (sink != NULL) {
        sink(sink_ud, level, line + n, len - (size_t)n);
        return;
    }
    line[len++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, len);
    (void)w;
}

void log_msg(enum log_level level, const char *fmt, ...)
{
    if ((int)level < current_level)
        return;
    va_list ap;
    va_start(ap, fmt);
    log_line(level, NULL, fmt, ap);
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
void log_limited(struct log_limiter *lim, enum log_level level, const char *fmt, ...)
{
    if ((int)level < current_level)
        return;
    unsigned long seen = atomic_fetch_add_explicit(&lim->seen, 1, memory_order_relaxed) + 1;
    const char *suffix = NULL;
    char note[128];
    if (seen == LOG_LIMIT_BURST) {
        atomic_store_explicit(&lim->last_ms, coarse_ms(), memory_order_relaxed);
        snprintf(note, sizeof note, " (more lines like this: at most one per %d s)",
                 LOG_LIMIT_INTERVAL_MS / 1000);
        suffix = note;
    } else if (seen > LOG_LIMIT_BURST) {
        int64_t now = coarse_ms();
        int64_t last = atomic_load_explicit(&lim->last_ms, memory_order_relaxed);
        /* last_ms is 0 only until the thread that wrote the burst's last line stores it */
        if (last == 0 || now - last < LOG_LIMIT_INTERVAL_MS ||
            !atomic_compare_exchange_strong_explicit(&lim->last_ms, &last, now,
                                                     memory_order_relaxed,
                                                     memory_order_relaxed)) {
            atomic_fetch_add_explicit(&lim->suppressed, 1, memory_order_relaxed);
            return;
        }
        unsigned long k = atomic_exchange_explicit(&lim->suppressed, 0, memory_order_relaxed);
        if (k > 0) {
            snprintf(note, sizeof note, " (and %lu more like this in the last %d s)", k,
                     LOG_LIMIT_INTERVAL_MS / 1000);
            suffix = note;
        }
    }
    va_list ap;
    va_start(ap, fmt);
    log_line(level, suffix, fmt, ap);
    va_end(ap);
}
