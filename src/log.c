/* log.c — timestamped lines on stderr. A line is formatted into one buffer and written
 * with a single write(2), so lines from different threads never interleave. */
#include "log.h"

#include <stdarg.h>
#include <stdatomic.h>
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

void log_msg(enum log_level level, const char *fmt, ...)
{
    if ((int)level < current_level)
        return;
    char line[4096];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(line, sizeof line, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %-5s ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                     tm.tm_sec, ts.tv_nsec / 1000000, level_names[level]);
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
    if (len > sizeof line - 2)
        len = sizeof line - 2;
    if (sink != NULL) {
        sink(sink_ud, level, line + n, len - (size_t)n);
        return;
    }
    line[len++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, len);
    (void)w;
}
