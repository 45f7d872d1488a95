/* metrics.c — the counters and their Prometheus rendering (text format 0.0.4).
 *
 * Every family has its # HELP and # TYPE; labelled families list every label value, zeros
 * included, so that rate() and alerts see a series before its first event. Units are
 * seconds and bytes. The process_* families cover the whole server: the supervisor reads
 * /proc for itself and for each worker whose pid is in its slot. */
#include "metrics.h"

#include <dirent.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "checks.h"

#ifndef LUACALLOUT_VERSION
#define LUACALLOUT_VERSION "0.0.0"
#endif

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
    atomic_store(&metrics->pid, (int64_t)getpid());   /* for the supervisor's process_* */
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
    /* the streams it had open ended with it: they count as failed, with the status their
     * clients see when the connection drops (the slot has no writer left) */
    struct metrics *m = &slots[slot + 1];
    uint64_t open_streams = (uint64_t)atomic_exchange(&m->streams_active, 0);
    atomic_fetch_add(&m->stream_errors_total, open_streams);
    atomic_fetch_add(&m->streams_ended[14 /* UNAVAILABLE */], open_streams);
    atomic_store(&m->heartbeat_ms, 0);
    atomic_store(&m->stuck_since_ms, 0);
    atomic_store(&m->building_since_ms, 0);
    atomic_store(&m->workers_serving, 0);
    atomic_store(&m->workers_stuck, 0);
    atomic_store(&m->pid, 0);
    atomic_store(&m->lua_memory_bytes, 0);
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

/* ---- the per-message and per-stream hooks (serving thread) ----------------------------- */

/* Upper bounds of the handler duration buckets: 50 µs (a small handler) to 1 s (past any
 * sensible budget). */
static const uint64_t bucket_ns[METRICS_BUCKETS] = {
    50000, 100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000, 25000000, 50000000,
    100000000, 250000000, 500000000, 1000000000,
};
static const char *const bucket_le[METRICS_BUCKETS] = {
    "5e-05", "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025",
    "0.05", "0.1", "0.25", "0.5", "1",
};

void metrics_message(int phase, enum metrics_outcome outcome, uint64_t call_ns, bool timed)
{
    struct metrics *m = metrics;
    metrics_inc(&m->messages[phase]);
    metrics_inc(&m->outcomes[phase][outcome]);
    if (!timed)
        return;
    int b = 0;
    while (b < METRICS_BUCKETS && call_ns > bucket_ns[b])   /* le is inclusive */
        b++;
    metrics_inc(&m->handler_buckets[phase][b]);
    metrics_add(&m->handler_ns[phase], call_ns);
}

void metrics_stream_ended(int code)
{
    if (code < 0 || code >= METRICS_CODES)
        code = 2;   /* UNKNOWN */
    metrics_inc(&metrics->streams_ended[code]);
}

/* ---- identity -------------------------------------------------------------------------- */

static pthread_mutex_t script_lock = PTHREAD_MUTEX_INITIALIZER;
static char script_sha256[65];
static char script_path[512];
static uint64_t script_gen;

void metrics_set_script(const char *sha256, const char *path, uint64_t generation)
{
    pthread_mutex_lock(&script_lock);
    snprintf(script_sha256, sizeof script_sha256, "%s", sha256);
    script_gen = generation;
    /* a label value: backslash, quote and newline escaped as the text format wants, and
     * UTF-8 as it requires (a byte that starts no sequence becomes U+FFFD) */
    size_t at = 0, n = strlen(path);
    for (size_t i = 0, k; i < n && at + 4 < sizeof script_path; i += k) {
        k = checks_utf8_seq(path + i, n - i);
        if (path[i] == '\\' || path[i] == '"' || path[i] == '\n') {
            script_path[at++] = '\\';
            script_path[at++] = path[i] == '\n' ? 'n' : path[i];
        } else if (k == 0) {
            memcpy(script_path + at, "\xef\xbf\xbd", 3);
            at += 3;
            k = 1;
        } else if (at + k + 1 < sizeof script_path) {
            memcpy(script_path + at, path + i, k);
            at += k;
        } else {
            break;
        }
    }
    script_path[at] = '\0';
    pthread_mutex_unlock(&script_lock);
}

/* ---- rendering ------------------------------------------------------------------------- */

struct out {
    char *buf;
    size_t len, used;
};

static void put(struct out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(struct out *o, const char *fmt, ...)
{
    if (o->used >= o->len)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(o->buf + o->used, o->len - o->used, fmt, ap);
    va_end(ap);
    if (n > 0)
        o->used += (size_t)n;
}

static void family(struct out *o, const char *name, const char *type, const char *help)
{
    put(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static uint64_t sum_u(size_t offset) { return (uint64_t)metrics_sum(offset); }

#define AT(field) offsetof(struct metrics, field)
#define AT_I(field, i) (offsetof(struct metrics, field) + (size_t)(i) * sizeof(uint64_t))

static const char *const phase_names[METRICS_PHASES] = {
    "request_headers", "response_headers", "request_body", "response_body",
    "request_trailers", "response_trailers", "unknown",
};
static const char *const outcome_names[METRICS_OUTCOMES] = {
    "continue", "mutate", "immediate", "deny", "lua_error", "bad_return", "timeout",
    "memory", "watchdog", "refused",
};
static const char *const code_names[METRICS_CODES] = {
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
};

static void render_scalars(struct out *o)
{
    static const struct {
        const char *name, *type, *help;
        size_t offset;
        int is_signed;
    } rows[] = {
        {"luacallout_streams_total", "counter", "Process streams started.", AT(streams_total), 0},
        {"luacallout_streams_active", "gauge", "Process streams open now.", AT(streams_active), 1},
        {"luacallout_stream_errors_total", "counter",
         "Streams ended with a non-OK gRPC status (by code: luacallout_streams_ended_total).",
         AT(stream_errors_total), 0},
        {"luacallout_reloads_total", "counter", "Successful script reloads.", AT(reloads_total), 0},
        {"luacallout_reload_failures_total", "counter",
         "Script reloads that failed (old script kept).", AT(reload_failures_total), 0},
        {"luacallout_script_generation", "gauge",
         "Generation of the script serving new streams (1 = loaded at start-up).",
         AT(script_generation), 0},
        {"luacallout_vm_rebuilds_total", "counter",
         "Fresh Lua VMs swapped in after a handler was stopped by a budget (time, memory).",
         AT(vm_rebuilds_total), 0},
        {"luacallout_watchdog_stuck_total", "counter",
         "Handler calls the watchdog found stuck past their time budget.",
         AT(watchdog_stuck_total), 0},
        {"luacallout_workers_serving", "gauge", "Worker processes serving streams.",
         AT(workers_serving), 1},
        {"luacallout_workers_stuck", "gauge",
         "Worker processes stuck in one handler call past its budget (the watchdog).",
         AT(workers_stuck), 1},
        {"luacallout_worker_restarts_total", "counter",
         "Worker processes that ended unexpectedly and were started again.",
         AT(worker_restarts_total), 0},
        {"luacallout_reload_in_progress", "gauge",
         "1 while the workers take a new generation (both may serve new streams then).",
         AT(reload_in_progress), 1},
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        family(o, rows[i].name, rows[i].type, rows[i].help);
        int64_t v = metrics_sum(rows[i].offset);
        if (rows[i].is_signed)
            put(o, "%s %" PRId64 "\n", rows[i].name, v);
        else
            put(o, "%s %" PRIu64 "\n", rows[i].name, (uint64_t)v);
    }
    uint64_t loaded_ms = sum_u(AT(script_loaded_unix_ms)), load_us = sum_u(AT(script_load_us));
    family(o, "luacallout_script_load_timestamp_seconds", "gauge",
           "When the current script generation was loaded (Unix time).");
    put(o, "luacallout_script_load_timestamp_seconds %" PRIu64 ".%03u\n", loaded_ms / 1000,
        (unsigned)(loaded_ms % 1000));
    family(o, "luacallout_script_load_duration_seconds", "gauge",
           "How long the current generation took to load (all workers).");
    put(o, "luacallout_script_load_duration_seconds %" PRIu64 ".%06u\n", load_us / 1000000,
        (unsigned)(load_us % 1000000));
}

static void render_traffic(struct out *o)
{
    family(o, "luacallout_streams_ended_total", "counter",
           "Process streams ended, by the gRPC status they ended with (CANCELLED: the "
           "client or the transport ended the call first).");
    for (int c = 0; c < METRICS_CODES; c++)
        put(o, "luacallout_streams_ended_total{code=\"%s\"} %" PRIu64 "\n", code_names[c],
            sum_u(AT_I(streams_ended, c)));

    family(o, "luacallout_messages_total", "counter",
           "ProcessingRequest messages received, by phase (unknown: refused before its "
           "phase was read).");
    for (int p = 0; p < METRICS_PHASES; p++) {
        uint64_t n = sum_u(AT_I(messages, p));
        if (p == METRICS_PHASE_UNKNOWN)
            n += sum_u(AT(messages_total));   /* --bench_echo: answered unread */
        put(o, "luacallout_messages_total{phase=\"%s\"} %" PRIu64 "\n", phase_names[p], n);
    }

    family(o, "luacallout_outcomes_total", "counter",
           "What became of each message, by phase: continue, mutate, immediate, deny (the "
           "script's decisions); lua_error, bad_return (script bugs); timeout, memory "
           "(budgets); refused (before any handler); watchdog (found stuck, counted again "
           "when it ends).");
    for (int p = 0; p < METRICS_PHASES; p++)
        for (int k = 0; k < METRICS_OUTCOMES; k++) {
            if ((p == METRICS_PHASE_UNKNOWN) != (k == METRICS_REFUSED))
                continue;   /* only refusals lack a phase, and only they */
            size_t at = AT(outcomes) + ((size_t)p * METRICS_OUTCOMES + (size_t)k) *
                                           sizeof(uint64_t);
            put(o, "luacallout_outcomes_total{phase=\"%s\",outcome=\"%s\"} %" PRIu64 "\n",
                phase_names[p], outcome_names[k], sum_u(at));
        }

    family(o, "luacallout_handler_duration_seconds", "histogram",
           "Time of the protected call of one message: inputs, handler, conversion of its "
           "answer.");
    for (int p = 0; p < METRICS_PHASE_UNKNOWN; p++) {
        uint64_t cumulative = 0;
        for (int b = 0; b <= METRICS_BUCKETS; b++) {
            size_t at = AT(handler_buckets) + ((size_t)p * (METRICS_BUCKETS + 1) + (size_t)b) *
                                                  sizeof(uint64_t);
            cumulative += sum_u(at);
            put(o, "luacallout_handler_duration_seconds_bucket{phase=\"%s\",le=\"%s\"} %" PRIu64
                "\n", phase_names[p], b < METRICS_BUCKETS ? bucket_le[b] : "+Inf", cumulative);
        }
        uint64_t ns = sum_u(AT_I(handler_ns, p));
        put(o, "luacallout_handler_duration_seconds_sum{phase=\"%s\"} %" PRIu64 ".%09u\n",
            phase_names[p], ns / 1000000000u, (unsigned)(ns % 1000000000u));
        put(o, "luacallout_handler_duration_seconds_count{phase=\"%s\"} %" PRIu64 "\n",
            phase_names[p], cumulative);
    }

    family(o, "luacallout_lua_memory_bytes", "gauge",
           "Bytes held by the Lua VM that handled the worker's last message, after it "
           "(compare with --script_memory_mb).");
    int workers = slots ? nslots - 1 : 1;
    for (int w = 0; w < workers; w++) {
        struct metrics *m = slots ? &slots[w + 1] : metrics;
        put(o, "luacallout_lua_memory_bytes{worker=\"%d\"} %" PRIu64 "\n", w,
            (uint64_t)atomic_load(&m->lua_memory_bytes));
    }
}

static const char *const record_result_names[METRICS_RECORD_RESULTS] = {
    "written", "sampled_out", "too_large", "queue_full", "cap_reached", "error", "shutdown",
};

/* --record (docs/operations.md, Recording traffic); zeros without it. */
static void render_record(struct out *o)
{
    family(o, "luacallout_record_streams_total", "counter",
           "--record: what became of each finished stream: written; sampled_out "
           "(--record_sample); too_large (--record_max_stream_kb); queue_full (the recorder "
           "was behind); cap_reached (--record_max_mb); error; shutdown (left at exit).");
    for (int r = 0; r < METRICS_RECORD_RESULTS; r++)
        put(o, "luacallout_record_streams_total{result=\"%s\"} %" PRIu64 "\n",
            record_result_names[r], sum_u(AT_I(record_streams, r)));
    family(o, "luacallout_record_bytes_total", "counter",
           "--record: bytes of record lines written, all files together.");
    put(o, "luacallout_record_bytes_total %" PRIu64 "\n", sum_u(AT(record_bytes_total)));
}

/* ---- process_* ------------------------------------------------------------------------- */

struct proc {
    uint64_t cpu_ticks;     /* utime + stime (+ cutime + cstime for the supervisor) */
    uint64_t rss_pages;
    uint64_t start_ticks;   /* after boot */
    long fds;
};

/* /proc/<pid>/stat and fd of one process; -1 when it is gone. */
static int read_proc(const char *pid, bool self, struct proc *p)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%s/stat", pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *after = strrchr(buf, ')');   /* the command name may hold anything */
    unsigned long ut, st;
    long cut, cst, rss;
    unsigned long long start;
    if (!after || sscanf(after + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu %ld "
                         "%ld %*d %*d %*d %*d %llu %*u %ld", &ut, &st, &cut, &cst, &start,
                         &rss) != 6)
        return -1;
    p->cpu_ticks = ut + st + (self ? (uint64_t)cut + (uint64_t)cst : 0);
    p->rss_pages = rss > 0 ? (uint64_t)rss : 0;
    p->start_ticks = start;
    p->fds = 0;
    snprintf(path, sizeof path, "/proc/%s/fd", pid);
    DIR *d = opendir(path);
    if (d) {
        for (struct dirent *e; (e = readdir(d));)
            p->fds += e->d_name[0] != '.';
        closedir(d);
        if (self)
            p->fds--;   /* the directory being read */
    }
    return 0;
}

static uint64_t boot_time(void)
{
    static uint64_t btime;
    if (btime)
        return btime;
    FILE *f = fopen("/proc/stat", "re");
    if (!f)
        return 0;
    char line[256];
    unsigned long long v;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "btime %llu", &v) == 1)
            btime = v;
    fclose(f);
    return btime;
}

static void render_process(struct out *o)
{
    struct proc self, sum = {0};
    if (read_proc("self", true, &self) != 0)
        return;
    sum = self;
    for (int i = 1; slots && i < nslots; i++) {
        int64_t pid = atomic_load(&slots[i].pid);
        char name[24];
        struct proc w;
        snprintf(name, sizeof name, "%" PRId64, pid);
        if (pid > 0 && read_proc(name, false, &w) == 0) {
            sum.cpu_ticks += w.cpu_ticks;
            sum.rss_pages += w.rss_pages;
            sum.fds += w.fds;
        }
    }
    long tick = sysconf(_SC_CLK_TCK), page = sysconf(_SC_PAGESIZE);
    if (tick <= 0)
        tick = 100;
    family(o, "process_cpu_seconds_total", "counter",
           "User and system CPU time of the server: the sum over the supervisor and its "
           "worker processes (ended workers included).");
    put(o, "process_cpu_seconds_total %.2f\n", (double)sum.cpu_ticks / (double)tick);
    family(o, "process_resident_memory_bytes", "gauge",
           "Resident memory of the server: the sum over the supervisor and its worker "
           "processes.");
    put(o, "process_resident_memory_bytes %" PRIu64 "\n", sum.rss_pages * (uint64_t)page);
    family(o, "process_open_fds", "gauge",
           "Open file descriptors: the sum over the supervisor and its worker processes.");
    put(o, "process_open_fds %ld\n", sum.fds);
    family(o, "process_start_time_seconds", "gauge",
           "When the server (its supervisor process) started, Unix time.");
    put(o, "process_start_time_seconds %.2f\n",
        (double)boot_time() + (double)self.start_ticks / (double)tick);
}

size_t metrics_render(char *buf, size_t len)
{
    struct out o = {buf, len, 0};
    family(&o, "luacallout_build_info", "gauge", "The server's version; the value is 1.");
    put(&o, "luacallout_build_info{version=\"%s\"} 1\n", LUACALLOUT_VERSION);
    pthread_mutex_lock(&script_lock);
    family(&o, "luacallout_script_info", "gauge",
           "The script serving new streams: its SHA-256, path and generation; the value is 1.");
    put(&o, "luacallout_script_info{sha256=\"%s\",path=\"%s\",generation=\"%" PRIu64 "\"} 1\n",
        script_sha256, script_path, script_gen);
    pthread_mutex_unlock(&script_lock);
    render_scalars(&o);
    render_traffic(&o);
    render_record(&o);
    render_process(&o);
    return o.used < len ? o.used : len;
}
