/* record.c — see record.h.
 *
 * A capture keeps the bytes of one stream in one buffer (requests and answers in the order
 * they came) and a span per message; what it holds, spans included, is bounded by
 * --record_max_stream_kb, so a stream of many tiny messages is bounded too. Captures wait
 * for the recorder in a queue bounded in bytes. The recorder is the only writer of the
 * file, opened O_APPEND: one write() per line, and a short write is cut off again
 * (ftruncate), so the file never holds half a line that would make it unreadable. */
#include "record.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "dispatch.h"
#include "exchange.h"
#include "generation.h"
#include "json.h"
#include "log.h"
#include "metrics.h"
#include "vm.h"

/* The recorder's queue, in bytes of captures. It converts more slowly than a worker serves
 * streams with large bodies (a 20 KB body: ~60% of the serving rate on a busy 2-core host),
 * so a burst piles up here: room for the burst, up to the file's share (queuing more than
 * the file may take buys nothing) but no more than QUEUE_MAX_BYTES, and never less than a
 * few stream caps. */
#define QUEUE_MIN_BYTES ((size_t)16 << 20)
#define QUEUE_MAX_BYTES ((size_t)64 << 20)
#define QUEUE_STREAMS 4          /* at least this many streams at their cap */
#define REDACT_MAX 64            /* names in --record_redact */

struct span {
    size_t at, len;
};

struct record_capture {
    struct record_capture *next;      /* in the queue */
    uint8_t *data;                    /* every message's bytes, in order */
    size_t used, cap;
    struct span *req, *resp;
    size_t *nresp;                    /* per request: answers after it */
    size_t nreq, capreq, capnresp, nresps, capresp;
    size_t cost;                      /* bytes held: data, spans; bounded by the cap */
    bool too_large;                   /* stopped copying: dropped at the end */
    int status;
    char *message;
    char *script;
    char sha256[65];
    uint64_t generation, stream;
    double time;
};

bool record_on;

static struct {
    struct record_config cfg;
    const char *redact[REDACT_MAX + 1];
    char *redact_buf;
    char path[4096];
    int fd;
    size_t written;                   /* bytes in the file (the recorder's own count) */
    size_t queue_max;
    /* the queue */
    pthread_mutex_t lock;
    pthread_cond_t wake, idle;
    struct record_capture *head, *tail;
    size_t queued;
    bool closing;                     /* record_stop: write what is queued, then end */
    bool abandon;                     /* record_stop's time is up: drop the rest */
    bool done;                        /* the recorder thread has ended */
    bool busy;                        /* the recorder is converting or writing a line */
    int slot;                         /* the worker, for the log */
    pthread_t thread;
    /* METRICS_RECORD_CAP_REACHED or _ERROR once recording stopped for good, else 0 */
    _Atomic int stopped;
    /* what became of this process's streams (the metrics are the server's sum, and die
     * with it): the exit's log says what was not written; `at_drain` is the count when
     * the drain began, to tell the shutdown's losses from the earlier ones */
    _Atomic uint64_t results[METRICS_RECORD_RESULTS];
    uint64_t at_drain[METRICS_RECORD_RESULTS];
    bool drain_marked;
} rec = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER,
         .idle = PTHREAD_COND_INITIALIZER, .fd = -1};

static const char *const result_names[METRICS_RECORD_RESULTS] = {
    "written", "sampled_out", "too_large", "queue_full", "cap_reached", "error", "shutdown",
};

static void count(enum metrics_record_result r)
{
    atomic_fetch_add_explicit(&metrics->record_streams[r], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&rec.results[r], 1, memory_order_relaxed);
}

static void capture_free(struct record_capture *c)
{
    free(c->data);
    free(c->req);
    free(c->resp);
    free(c->nresp);
    free(c->message);
    free(c->script);
    free(c);
}

/* ---- the serving thread's side ------------------------------------------------------------ */

/* A per-thread xorshift64*: a draw per stream must not take a lock (random() does). */
static double draw(void)
{
    static _Thread_local uint64_t x;
    if (!x) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        x = ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)ts.tv_sec ^ ((uint64_t)getpid() << 40) ^
            (uint64_t)(uintptr_t)&x;
        x |= 1;
    }
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    return (double)((x * 0x2545F4914F6CDD1DULL) >> 11) / 9007199254740992.0;   /* [0, 1) */
}

struct record_capture *record_begin_sampled(const struct vm *vm, uint64_t stream)
{
    if (rec.cfg.sample < 1 && draw() >= rec.cfg.sample) {
        count(METRICS_RECORD_SAMPLED_OUT);
        return NULL;
    }
    int stopped = atomic_load_explicit(&rec.stopped, memory_order_relaxed);
    if (stopped) {
        count((enum metrics_record_result)stopped);
        return NULL;
    }
    struct record_capture *c = calloc(1, sizeof *c);
    const struct snapshot *snap = vm->snap;
    if (c && snap->path && !(c->script = strdup(snap->path))) {
        free(c);
        c = NULL;
    }
    if (!c) {
        count(METRICS_RECORD_ERROR);
        return NULL;
    }
    memcpy(c->sha256, snap->sha256, sizeof c->sha256);
    c->generation = snap->generation;
    c->stream = stream;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    c->time = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
    return c;
}

/* Drops what the capture holds: it is over its cap (or out of memory) and is only counted
 * at its end. */
static void give_up(struct record_capture *c)
{
    free(c->data);
    free(c->req);
    free(c->resp);
    free(c->nresp);
    c->data = NULL;
    c->req = c->resp = NULL;
    c->nresp = NULL;
    c->too_large = true;
}

/* Room for `need` elements in *p (doubling): false when out of memory. One per element
 * type, so that no pointer is written through a void **. */
#define DEFINE_GROW(name, T)                                                               \
    static bool name(T **p, size_t *cap, size_t need)                                      \
    {                                                                                      \
        if (need <= *cap)                                                                  \
            return true;                                                                   \
        size_t n = *cap ? *cap : 8;                                                        \
        while (n < need)                                                                   \
            n *= 2;                                                                        \
        T *q = realloc(*p, n * sizeof **p);                                                \
        if (!q)                                                                            \
            return false;                                                                  \
        *p = q;                                                                            \
        *cap = n;                                                                          \
        return true;                                                                       \
    }
DEFINE_GROW(grow_bytes, uint8_t)
DEFINE_GROW(grow_spans, struct span)
DEFINE_GROW(grow_counts, size_t)

void record_message(struct record_capture *c, const uint8_t *req, size_t len,
                    const struct dispatch_reply *reply)
{
    if (c->too_large)
        return;
    size_t answers = reply->outcome == DISPATCH_RESPOND ? reply->count : 0;
    size_t bytes = len + (answers ? reply->len : 0);
    size_t cost = bytes + (1 + answers) * sizeof(struct span) + sizeof(size_t);
    if (c->cost + cost > rec.cfg.max_stream_bytes) {
        give_up(c);
        return;
    }
    if (!grow_bytes(&c->data, &c->cap, c->used + bytes + 1) ||
        !grow_spans(&c->req, &c->capreq, c->nreq + 1) ||
        !grow_counts(&c->nresp, &c->capnresp, c->nreq + 1) ||
        !grow_spans(&c->resp, &c->capresp, c->nresps + answers)) {
        give_up(c);   /* counted as too large: the one thing that grew was this stream */
        return;
    }
    c->cost += cost;
    memcpy(c->data + c->used, req, len);
    c->req[c->nreq] = (struct span){c->used, len};
    c->used += len;
    c->nresp[c->nreq++] = answers;
    for (size_t i = 0, at = 0; i < answers; at += reply->lens[i], i++) {
        memcpy(c->data + c->used, reply->data + at, reply->lens[i]);
        c->resp[c->nresps++] = (struct span){c->used, reply->lens[i]};
        c->used += reply->lens[i];
    }
}

void record_end(struct record_capture *c, int code, const char *message, size_t message_len)
{
    if (c->too_large) {
        count(METRICS_RECORD_TOO_LARGE);
        capture_free(c);
        return;
    }
    c->status = code;
    if (message_len && !(c->message = strndup(message, message_len))) {
        count(METRICS_RECORD_ERROR);
        capture_free(c);
        return;
    }
    size_t cost = c->cost + sizeof *c + message_len;
    enum metrics_record_result dropped = METRICS_RECORD_RESULTS;
    size_t queued = 0;
    pthread_mutex_lock(&rec.lock);
    if (rec.closing || rec.done)
        dropped = METRICS_RECORD_SHUTDOWN;   /* a stream that outlived the worker's exit */
    else if (rec.queued + cost > rec.queue_max)
        dropped = METRICS_RECORD_QUEUE_FULL;
    if (dropped == METRICS_RECORD_RESULTS) {
        c->cost = cost;
        if (rec.tail)
            rec.tail->next = c;
        else
            rec.head = c;
        rec.tail = c;
        rec.queued += cost;
        pthread_cond_signal(&rec.wake);
    }
    queued = rec.queued;
    pthread_mutex_unlock(&rec.lock);
    if (dropped != METRICS_RECORD_RESULTS) {
        /* said now and again at the exit: the count alone dies with the process */
        if (dropped == METRICS_RECORD_QUEUE_FULL)
            log_warn_limited("record: the recorder is behind (%zu of %zu KiB queued): stream "
                             "%llu not recorded (queue_full)", queued >> 10,
                             rec.queue_max >> 10, (unsigned long long)c->stream);
        count(dropped);
        capture_free(c);
    }
}

/* ---- the recorder thread ------------------------------------------------------------------ */

/* Recording ends for good (the share is written, or the file failed): said once. */
static void stop_recording(enum metrics_record_result why)
{
    atomic_store(&rec.stopped, (int)why);
}

/* Appends one line (text[0..len) and a newline in text[len], which must be writable). */
static bool append(char *text, size_t len)
{
    text[len] = '\n';
    ssize_t n = write(rec.fd, text, len + 1);
    if (n == (ssize_t)(len + 1)) {
        rec.written += len + 1;
        atomic_fetch_add_explicit(&metrics->record_bytes_total, len + 1, memory_order_relaxed);
        return true;
    }
    int e = n < 0 ? errno : ENOSPC;
    if (n > 0 && ftruncate(rec.fd, (off_t)rec.written) != 0)
        log_error("record: %s: cannot cut off a half-written line: %s", rec.path,
                  strerror(errno));
    log_error("record: %s: %s; recording stopped", rec.path, strerror(e));
    stop_recording(METRICS_RECORD_ERROR);
    return false;
}

static void write_capture(struct exchange *x, struct record_capture *c)
{
    int stopped = atomic_load(&rec.stopped);
    if (stopped) {
        count((enum metrics_record_result)stopped);
        return;
    }
    const uint8_t **req = malloc((c->nreq + 1) * sizeof *req);
    size_t *req_lens = malloc((c->nreq + 1) * sizeof *req_lens);
    const uint8_t **resp = malloc((c->nresps + 1) * sizeof *resp);
    size_t *resp_lens = malloc((c->nresps + 1) * sizeof *resp_lens);
    char *line = NULL;
    size_t len = 0;
    char err[512] = "out of memory";
    if (req && req_lens && resp && resp_lens) {
        for (size_t i = 0; i < c->nreq; i++) {
            req[i] = c->data + c->req[i].at;
            req_lens[i] = c->req[i].len;
        }
        for (size_t i = 0; i < c->nresps; i++) {
            resp[i] = c->data + c->resp[i].at;
            resp_lens[i] = c->resp[i].len;
        }
        struct exchange_capture xc = {
            .nreq = c->nreq, .req = req, .req_lens = req_lens, .nresp = c->nresp,
            .resp = resp, .resp_lens = resp_lens, .status = c->status,
            .message = c->message ? c->message : "", .script = c->script,
            .sha256 = c->sha256, .generation = c->generation, .stream = c->stream,
            .time = c->time,
        };
        line = exchange_record_line(x, &xc, rec.redact, &len, err, sizeof err);
    }
    free(req);
    free(req_lens);
    free(resp);
    free(resp_lens);
    if (!line) {
        log_warn_limited("record: stream %llu not recorded: %s", (unsigned long long)c->stream,
                         err);
        count(METRICS_RECORD_ERROR);
        return;
    }
    if (len + 1 > LJSON_MAX_BYTES) {
        /* callout.json reads no longer document: replay could not read the file */
        count(METRICS_RECORD_TOO_LARGE);
    } else if (rec.written + len + 1 > rec.cfg.max_bytes) {
        log_warn("record: %s reached its %.1f MiB share of --record_max_mb %d (%d worker "
                 "process%s); recording stopped", rec.path,
                 (double)rec.cfg.max_bytes / (1 << 20), rec.cfg.total_mb, rec.cfg.processes,
                 rec.cfg.processes == 1 ? "" : "es");
        stop_recording(METRICS_RECORD_CAP_REACHED);
        count(METRICS_RECORD_CAP_REACHED);
    } else {
        /* the exchange's text has room for its NUL: the newline goes there */
        count(append(line, len) ? METRICS_RECORD_WRITTEN : METRICS_RECORD_ERROR);
    }
    free(line);
}

static void *recorder_main(void *arg)
{
    struct exchange *x = arg;
    pthread_mutex_lock(&rec.lock);
    for (;;) {
        while (!rec.head && !rec.closing)
            pthread_cond_wait(&rec.wake, &rec.lock);
        struct record_capture *c = rec.head;
        if (!c || rec.abandon)
            break;
        rec.head = c->next;
        if (!rec.head)
            rec.tail = NULL;
        rec.queued -= c->cost;
        rec.busy = true;
        pthread_mutex_unlock(&rec.lock);
        write_capture(x, c);
        capture_free(c);
        pthread_mutex_lock(&rec.lock);
        rec.busy = false;
    }
    /* what is left was abandoned by record_stop */
    for (struct record_capture *c = rec.head, *next; c; c = next) {
        next = c->next;
        count(METRICS_RECORD_SHUTDOWN);
        capture_free(c);
    }
    rec.head = rec.tail = NULL;
    rec.queued = 0;
    rec.done = true;
    pthread_cond_broadcast(&rec.idle);
    pthread_mutex_unlock(&rec.lock);
    exchange_free(x);
    return NULL;
}

/* ---- start and stop ----------------------------------------------------------------------- */

/* Creates dir and its missing parents, 0700. 0, or -1 with errno. */
static int make_dirs(const char *dir)
{
    struct stat st;
    if (stat(dir, &st) == 0)
        return S_ISDIR(st.st_mode) ? 0 : (errno = ENOTDIR, -1);
    if (errno != ENOENT)
        return -1;
    char path[4096];
    if (snprintf(path, sizeof path, "%s", dir) >= (int)sizeof path)
        return errno = ENAMETOOLONG, -1;
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(path, 0700) != 0 && errno != EEXIST)
            return -1;
        *p = '/';
    }
    return mkdir(path, 0700) != 0 && errno != EEXIST ? -1 : 0;
}

int record_check_dir(const char *dir, char *err, size_t errlen)
{
    if (make_dirs(dir) != 0) {
        snprintf(err, errlen, "--record %s: %s", dir, strerror(errno));
        return -1;
    }
    /* a file made and removed again: what the workers will do, permissions, read-only
     * mounts and quotas included */
    char probe[4200];
    snprintf(probe, sizeof probe, "%s/.luacallout-probe-%ld", dir, (long)getpid());
    int fd = open(probe, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        snprintf(err, errlen, "--record %s: cannot create a file in it: %s", dir,
                 strerror(errno));
        return -1;
    }
    close(fd);
    unlink(probe);
    return 0;
}

/* --record_redact's names, split in place into rec.redact. */
static int parse_redact(const char *list, char *err, size_t errlen)
{
    rec.redact_buf = strdup(list ? list : "");
    if (!rec.redact_buf) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    size_t n = 0;
    for (char *save = NULL, *name = strtok_r(rec.redact_buf, ",", &save); name;
         name = strtok_r(NULL, ",", &save)) {
        while (*name == ' ')
            name++;
        for (char *end = name + strlen(name); end > name && end[-1] == ' ';)
            *--end = '\0';
        if (!*name)
            continue;
        if (n == REDACT_MAX) {
            snprintf(err, errlen, "--record_redact names more than %d headers", REDACT_MAX);
            return -1;
        }
        rec.redact[n++] = name;
    }
    rec.redact[n] = NULL;
    return 0;
}

int record_start(const struct record_config *cfg, int slot, char *err, size_t errlen)
{
    rec.cfg = *cfg;
    rec.slot = slot;
    rec.queue_max = cfg->max_bytes < QUEUE_MAX_BYTES ? cfg->max_bytes : QUEUE_MAX_BYTES;
    if (rec.queue_max < QUEUE_MIN_BYTES)
        rec.queue_max = QUEUE_MIN_BYTES;
    if (rec.queue_max < cfg->max_stream_bytes * QUEUE_STREAMS)
        rec.queue_max = cfg->max_stream_bytes * QUEUE_STREAMS;
    if (parse_redact(cfg->redact, err, errlen) != 0)
        return -1;
    if (make_dirs(cfg->dir) != 0) {
        snprintf(err, errlen, "%s: %s", cfg->dir, strerror(errno));
        return -1;
    }
    char when[32];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(when, sizeof when, "%Y%m%dT%H%M%S", &tm);
    if (snprintf(rec.path, sizeof rec.path, "%s/luacallout-%s-%ld.jsonl", cfg->dir, when,
                 (long)getpid()) >= (int)sizeof rec.path) {
        snprintf(err, errlen, "%s: path too long", cfg->dir);
        return -1;
    }
    rec.fd = open(rec.path, O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0600);
    if (rec.fd < 0) {
        snprintf(err, errlen, "%s: %s", rec.path, strerror(errno));
        return -1;
    }
    struct exchange *x = exchange_new(err, errlen);
    if (!x) {
        close(rec.fd);
        unlink(rec.path);
        rec.fd = -1;
        return -1;
    }
    int e = pthread_create(&rec.thread, NULL, recorder_main, x);
    if (e != 0) {
        exchange_free(x);
        close(rec.fd);
        unlink(rec.path);
        rec.fd = -1;
        snprintf(err, errlen, "no thread for the recorder: %s", strerror(e));
        return -1;
    }
    /* A file size limit (RLIMIT_FSIZE) makes the write fail with EFBIG, which stops the
     * recording, instead of killing the process: serving must not depend on the record. */
    signal(SIGXFSZ, SIG_IGN);
    record_on = true;
    log_info("record: worker %d records streams into %s (sample %g, at most %zu KiB a "
             "stream, %.1f MiB in this file)", slot, rec.path, cfg->sample, cfg->max_stream_bytes >> 10,
             (double)cfg->max_bytes / (1 << 20));
    return 0;
}

void record_drain_began(void)
{
    for (int r = 0; r < METRICS_RECORD_RESULTS; r++)
        rec.at_drain[r] = atomic_load(&rec.results[r]);
    rec.drain_marked = true;
}

/* "queue_full: 3, shutdown: 2" for the drops in results[] - base[]; their total. */
static uint64_t list_drops(const uint64_t *results, const uint64_t *base, char *out,
                           size_t outlen)
{
    uint64_t total = 0;
    size_t at = 0;
    out[0] = '\0';
    for (int r = 0; r < METRICS_RECORD_RESULTS; r++) {
        uint64_t n = results[r] - (base ? base[r] : 0);
        if (r == METRICS_RECORD_WRITTEN || r == METRICS_RECORD_SAMPLED_OUT || !n)
            continue;   /* not losses: the line is there, or the sample said no */
        total += n;
        int w = snprintf(out + at, outlen - at, "%s%s: %llu", at ? ", " : "", result_names[r],
                         (unsigned long long)n);
        if (w > 0 && (size_t)w < outlen - at)
            at += (size_t)w;
    }
    return total;
}

/* The exit's account: what the drain lost, then the worker's whole life if it lost any. */
static void log_losses(bool writing)
{
    uint64_t now[METRICS_RECORD_RESULTS];
    for (int r = 0; r < METRICS_RECORD_RESULTS; r++)
        now[r] = atomic_load(&rec.results[r]);
    char why[256];
    uint64_t lost = list_drops(now, rec.at_drain, why, sizeof why);
    if (lost || writing)
        log_warn("record: worker %d: %llu stream%s not recorded at shutdown (%s)%s", rec.slot,
                 (unsigned long long)lost, lost == 1 ? "" : "s", lost ? why : "none queued",
                 writing ? "; the line being written when the exit came may be missing too"
                         : "");
    lost = list_drops(now, NULL, why, sizeof why);
    if (lost)
        log_warn("record: worker %d: %llu of %llu finished streams not recorded in its life "
                 "(%s); %llu written to %s, %llu sampled out", rec.slot,
                 (unsigned long long)lost,
                 (unsigned long long)(lost + now[METRICS_RECORD_WRITTEN] +
                                      now[METRICS_RECORD_SAMPLED_OUT]),
                 why, (unsigned long long)now[METRICS_RECORD_WRITTEN], rec.path,
                 (unsigned long long)now[METRICS_RECORD_SAMPLED_OUT]);
}

void record_stop(int timeout_ms)
{
    if (rec.fd < 0)
        return;
    if (!rec.drain_marked)
        record_drain_began();   /* stopped without a drain (the supervisor went away) */
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&rec.lock);
    rec.closing = true;
    pthread_cond_signal(&rec.wake);
    while (!rec.done && pthread_cond_timedwait(&rec.idle, &rec.lock, &deadline) != ETIMEDOUT)
        ;
    bool done = rec.done, writing = false;
    size_t left = 0;
    if (!done) {
        /* the line being written is finished (if the exit waits for it), the rest is
         * dropped here and counted now, while the count can still reach the log */
        rec.abandon = true;
        writing = rec.busy;
        for (struct record_capture *c = rec.head, *next; c; c = next) {
            next = c->next;
            count(METRICS_RECORD_SHUTDOWN);
            capture_free(c);
            left++;
        }
        rec.head = rec.tail = NULL;
        rec.queued = 0;
    }
    pthread_mutex_unlock(&rec.lock);
    if (done) {
        pthread_join(rec.thread, NULL);
        close(rec.fd);
        rec.fd = -1;
    } else {
        log_warn("record: %s: the recorder did not finish within %d ms of the exit; the %zu "
                 "stream%s still queued are not recorded", rec.path, timeout_ms, left,
                 left == 1 ? "" : "s");
    }
    log_losses(writing);
}
