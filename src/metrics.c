/* metrics.c — the counters and their Prometheus rendering. */
#include "metrics.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static struct metrics own;
struct metrics *metrics = &own;
/* The shared mapping: [0] the supervisor's, [1 + i] worker i's. */
static struct metrics *slots;
static int nslots;

int metrics_share(int nworkers)
{
    int fd = memfd_create("luacallout-metrics", MFD_CLOEXEC);
    size_t size = (size_t)(nworkers + 1) * sizeof(struct metrics);
    if (fd < 0 || ftruncate(fd, (off_t)size) != 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    void *map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        close(fd);
        return -1;
    }
    slots = map;          /* zero-filled: every counter starts at 0 */
    nslots = nworkers + 1;
    metrics = &slots[0];
    return fd;
}

int metrics_attach(int fd, int slot)
{
    size_t size = (size_t)(slot + 2) * sizeof(struct metrics);
    void *map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED)
        return -1;
    metrics = &((struct metrics *)map)[slot + 1];
    return 0;
}

struct metrics *metrics_slot(int slot)
{
    return slots && slot + 1 < nslots ? &slots[slot + 1] : NULL;
}

void metrics_worker_gone(int slot)
{
    if (!slots || slot + 1 >= nslots)
        return;
    /* the streams it had open ended with it: they count as failed */
    atomic_fetch_add(&slots[slot + 1].stream_errors_total,
                     (uint64_t)atomic_exchange(&slots[slot + 1].streams_active, 0));
    atomic_store(&slots[slot + 1].heartbeat_ms, 0);
    atomic_store(&slots[slot + 1].stuck_since_ms, 0);
    atomic_store(&slots[slot + 1].building_since_ms, 0);
    atomic_store(&slots[slot + 1].workers_serving, 0);
    atomic_store(&slots[slot + 1].workers_stuck, 0);
}

int64_t metrics_sum(size_t offset)
{
    if (!slots)
        return atomic_load((_Atomic int64_t *)((char *)metrics + offset));
    int64_t sum = 0;
    for (int i = 0; i < nslots; i++)
        sum += atomic_load((_Atomic int64_t *)((char *)&slots[i] + offset));
    return sum;
}

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
        {"luacallout_workers_serving", "gauge", "Worker processes serving streams.",
         offsetof(struct metrics, workers_serving), 1},
        {"luacallout_workers_stuck", "gauge",
         "Worker processes stuck in one handler call past its budget (the watchdog).",
         offsetof(struct metrics, workers_stuck), 1},
        ROW(worker_restarts_total, "counter",
            "Worker processes that ended unexpectedly and were started again."),
        {"luacallout_reload_in_progress", "gauge",
         "1 while the workers take a new generation (both may serve new streams then).",
         offsetof(struct metrics, reload_in_progress), 1},
#undef ROW
    };
    size_t used = 0;
    for (size_t i = 0; i < sizeof rows / sizeof rows[0] && used < len; i++) {
        char value[32];
        int64_t sum = metrics_sum(rows[i].offset);
        if (rows[i].is_signed)
            snprintf(value, sizeof value, "%" PRId64, sum);
        else
            snprintf(value, sizeof value, "%" PRIu64, (uint64_t)sum);
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
                         script_sha256, script_path, atomic_load(&metrics->script_generation));
        pthread_mutex_unlock(&script_lock);
        if (n > 0)
            used += (size_t)n;
    }
    return used < len ? used : len;
}
