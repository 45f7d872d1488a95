/* metrics.c — the counters and their Prometheus rendering. */
#include "metrics.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

struct metrics metrics;

static pthread_mutex_t script_lock = PTHREAD_MUTEX_INITIALIZER;
static char script_sha256[65];
static char script_path[512];

void metrics_set_script(const char *sha256, const char *path, uint64_t generation)
{
    (void)generation;
    pthread_mutex_lock(&script_lock);
    snprintf(script_sha256, sizeof script_sha256, "%s", sha256);
    /* a label value: backslash, quote and newline escaped as the text format wants */
    size_t at = 0;
    for (const char *p = path; *p && at + 3 < sizeof script_path; p++) {
        if (*p == '\\' || *p == '"' || *p == '\n') {
            script_path[at++] = '\\';
            script_path[at++] = *p == '\n' ? 'n' : *p;
        } else {
            script_path[at++] = *p;
        }
    }
    script_path[at] = '\0';
    pthread_mutex_unlock(&script_lock);
}

size_t metrics_render(char *buf, size_t len)
{
    static const struct {
        const char *name, *type, *help;
        size_t offset;
        int is_signed;
    } rows[] = {
#define ROW(field, type, help) {"luacallout_" #field, type, help, offsetof(struct metrics, field), 0}
        ROW(streams_total, "counter", "Process streams started."),
        {"luacallout_streams_active", "gauge", "Process streams open now.",
         offsetof(struct metrics, streams_active), 1},
        ROW(messages_total, "counter", "ProcessingRequest messages handled."),
        ROW(stream_errors_total, "counter", "Streams ended with a non-OK gRPC status."),
        ROW(reloads_total, "counter", "Successful script reloads."),
        ROW(reload_failures_total, "counter", "Script reloads that failed (old script kept)."),
        ROW(script_generation, "gauge", "Generation of the script serving new streams."),
        ROW(script_loaded_unix_ms, "gauge", "When the current script generation was loaded."),
        ROW(script_load_us, "gauge", "Microseconds the current generation took to load."),
        ROW(watchdog_stuck_total, "counter",
            "Handler calls the watchdog found stuck past their time budget."),
#undef ROW
    };
    size_t used = 0;
    for (size_t i = 0; i < sizeof rows / sizeof rows[0] && used < len; i++) {
        const char *field = (const char *)&metrics + rows[i].offset;
        char value[32];
        if (rows[i].is_signed)
            snprintf(value, sizeof value, "%" PRId64, atomic_load((_Atomic int64_t *)field));
        else
            snprintf(value, sizeof value, "%" PRIu64, atomic_load((_Atomic uint64_t *)field));
        int n = snprintf(buf + used, len - used, "# HELP %s %s\n# TYPE %s %s\n%s %s\n",
                         rows[i].name, rows[i].help, rows[i].name, rows[i].type, rows[i].name,
                         value);
        if (n < 0)
            break;
        used += (size_t)n;
    }
    if (used < len) {
        pthread_mutex_lock(&script_lock);
        int n = snprintf(buf + used, len - used,
                         "# HELP luacallout_script_info The script serving new streams; the "
                         "value is its generation.\n# TYPE luacallout_script_info gauge\n"
                         "luacallout_script_info{sha256=\"%s\",path=\"%s\"} %" PRIu64 "\n",
                         script_sha256, script_path, atomic_load(&metrics.script_generation));
        pthread_mutex_unlock(&script_lock);
        if (n > 0)
            used += (size_t)n;
    }
    return used < len ? used : len;
}
