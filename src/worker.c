/* worker.c — see worker.h. */
#include "worker.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "control.h"
#include "generation.h"
#include "grpc_health.h"
#include "log.h"
#include "metrics.h"
#include "record.h"
#include "server.h"
#include "snapshot_pack.h"
#include "stream.h"
#include "tls.h"

/* After the last stream: how long the recorder may take to write what is queued, at
 * least; it may take what is left of the supervisor's patience (the drain timeout and its
 * 5 s margin after STOP, supervisor.c) less RECORD_EXIT_MS for the rest of the exit. */
#define RECORD_DRAIN_MS 2000
#define RECORD_STOP_MARGIN_MS 5000
#define RECORD_EXIT_MS 1000
/* How often the main thread runs the watchdog and builds spare VMs. */
#define TICK_MS 100
/* The first records arrive right after exec; a supervisor that sends nothing is broken. */
#define FIRST_RECORD_MS 30000

/* The next record, which must be of type `want`: its bytes, or NULL (logged). */
static char *expect_record(int ctl, uint32_t want, size_t *len)
{
    uint32_t type;
    char *data;
    int r = control_recv(ctl, &type, &data, len, FIRST_RECORD_MS);
    if (r != 1) {
        log_error("worker: no %s from the supervisor (%s)",
                  want == CONTROL_IDENTITY ? "identity" : "generation",
                  r == 0 ? "it closed the control socket" : strerror(errno));
        return NULL;
    }
    if (type != want) {
        log_error("worker: unexpected control record %u", type);
        free(data);
        return NULL;
    }
    return data;
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* A reload is two records: GENERATION (build it, say LOADED or FAILED), then COMMIT (serve
 * it, say SERVING) or ABORT (another worker could not build it: drop it). A certificate
 * reload is one record, IDENTITY, taken at once and not answered. */
/* Sends an answer tagged with the reload attempt it answers (control.h). */
static void answer(int ctl, uint32_t type, uint64_t attempt, const char *text)
{
    char buf[1200];
    int n = snprintf(buf, sizeof buf, "%llu %s", (unsigned long long)attempt, text ? text : "");
    control_send(ctl, type, buf, n < (int)sizeof buf ? (size_t)n : sizeof buf - 1);
}

static void follow(struct server *srv, int ctl, uint32_t type, const char *data, size_t len,
                   struct vm ***prepared, uint64_t *prepared_attempt)
{
    char err[1024];
    if (type == CONTROL_GENERATION && len >= 8) {
        uint64_t attempt = 0;
        for (int i = 0; i < 8; i++)
            attempt |= (uint64_t)(unsigned char)data[i] << (8 * i);
        server_discard(srv, *prepared);
        *prepared = NULL;
        struct snapshot *snap = snapshot_unpack(data + 8, len - 8);
        if (!snap)
            snprintf(err, sizeof err, "the generation sent by the supervisor is malformed");
        else
            *prepared = server_build(srv, snap, err, sizeof err);
        snapshot_unref(snap);
        *prepared_attempt = attempt;
        answer(ctl, *prepared ? CONTROL_LOADED : CONTROL_FAILED, attempt, *prepared ? NULL : err);
    } else if (type == CONTROL_IDENTITY) {
        /* a reloaded certificate: the next handshakes use it, open connections keep theirs */
        struct tls_identity id;
        if (tls_identity_unpack(&id, data, len) != 0 || server_set_identity(srv, &id) != 0)
            log_error("worker: cannot take the new TLS identity; the old one keeps serving");
        tls_identity_free(&id);
    } else if (type == CONTROL_COMMIT || type == CONTROL_ABORT) {
        uint64_t attempt = strtoull(data, NULL, 10);
        if (!*prepared || attempt != *prepared_attempt)
            return;   /* not the build it is about */
        if (type == CONTROL_COMMIT) {
            server_hand_over(srv, *prepared);
            answer(ctl, CONTROL_SERVING, attempt, NULL);
        } else {
            server_discard(srv, *prepared);
        }
        *prepared = NULL;
    }
}

/* Waits for the supervisor to close the drain pipe's write end (supervisor.c, drain) and
 * turns gRPC health NOT_SERVING then, on a thread of its own: the main thread may be busy
 * for seconds building a reload's VMs before it reads CONTROL_DRAIN, and a health checker
 * must hear the drain at once. A supervisor that dies closes it too. */
static void *drain_main(void *arg)
{
    int fd = (int)(intptr_t)arg;
    for (;;) {
        char byte;
        ssize_t n = read(fd, &byte, 1);
        if (n == 0 || (n < 0 && errno != EINTR))
            break;
    }
    grpc_health_set_serving(false);
    return NULL;
}

static void watch_drain(int fd)
{
    pthread_t t;
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    if (pthread_create(&t, NULL, drain_main, (void *)(intptr_t)fd) == 0)
        pthread_detach(t);
    else
        log_warn("worker: no thread for the drain pipe; gRPC health follows the drain only "
                 "once the main thread reads it");
}

/* The descriptor exists and is of the kind the supervisor passes (a socket, a memfd). */
static bool fd_is(int fd, mode_t kind)
{
    struct stat st;
    return fd > 2 && fstat(fd, &st) == 0 && (st.st_mode & S_IFMT) == kind;
}

int worker_run(const struct config *given)
{
    int slot, ctl, metrics_fd, drain_fd;
    if (sscanf(given->worker_of, "%d,%d,%d,%d", &slot, &ctl, &metrics_fd, &drain_fd) != 4 ||
        slot < 0 || slot >= 64 || !fd_is(ctl, S_IFSOCK) || !fd_is(metrics_fd, S_IFREG) ||
        !fd_is(drain_fd, S_IFIFO)) {
        fprintf(stderr, "luacallout: --worker_of is for the supervisor's use only\n");
        return 2;
    }
    log_set_worker(slot);   /* every JSON record of this process names its worker */
    /* inherited across exec on purpose; a script's child (--unsafe_stdlib) must not get it */
    fcntl(ctl, F_SETFD, FD_CLOEXEC);
    watch_drain(drain_fd);
    /* A supervisor killed outright takes its workers with it: nobody else would stop them,
     * and they would hold the ports. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    char name[16];   /* what ps and top show: exec of /proc/self/exe would say "exe" */
    snprintf(name, sizeof name, "luacallout:w%d", slot);
    prctl(PR_SET_NAME, name);
    if (metrics_attach(metrics_fd, slot) != 0) {
        log_error("worker %d: cannot map the metrics: %s", slot, strerror(errno));
        return 1;
    }
    struct config cfg = *given;
    int processes = cfg.threads;
    cfg.threads = 1;

    size_t len;
    char *identity = expect_record(ctl, CONTROL_IDENTITY, &len);
    if (!identity)
        return 1;
    struct tls_identity id;
    int unpacked = tls_identity_unpack(&id, identity, len);
    free(identity);
    if (unpacked != 0) {
        log_error("worker %d: the TLS identity sent by the supervisor is malformed", slot);
        return 1;
    }
    char *packed = expect_record(ctl, CONTROL_GENERATION, &len);
    if (!packed)
        return 1;
    struct snapshot *snap = snapshot_unpack(packed, len);
    free(packed);
    if (!snap) {
        log_error("worker %d: the generation sent by the supervisor is malformed", slot);
        return 1;
    }

    stream_set_bench_echo(cfg.bench_echo);
    struct stream_limits stream_limits = {
        .max_queued_bytes = (size_t)cfg.max_queued_kb << 10,
        /* the server-wide total, shared evenly by the worker processes */
        .max_queued_total_bytes = ((size_t)cfg.max_queued_total_mb << 20) / (size_t)processes,
        .idle_timeout_ms = cfg.stream_idle_timeout_ms,
        .total_mb = cfg.max_queued_total_mb,
        .processes = processes,
    };
    stream_set_limits(&stream_limits);

    char err[1024];
    if (cfg.record_dir) {
        /* the server-wide total, shared evenly by the worker processes too */
        struct record_config rc = {
            .dir = cfg.record_dir, .sample = cfg.record_sample,
            .max_stream_bytes = (size_t)cfg.record_max_stream_kb << 10,
            .max_bytes = ((size_t)cfg.record_max_mb << 20) / (size_t)processes,
            .total_mb = cfg.record_max_mb, .processes = processes,
            .redact = cfg.record_redact,
        };
        /* serving goes on without it: a worker restarted after DIR went away still serves */
        if (record_start(&rc, slot, err, sizeof err) != 0)
            log_error("record: %s; worker %d records nothing", err, slot);
    }
    /* the first VMs run the top level: the supervisor must not take that for a hang */
    atomic_store(&metrics->building_since_ms, now_ms());
    struct server *srv = server_start(&cfg, id.cert_pem ? &id : NULL, snap, slot, processes,
                                      err, sizeof err);
    snapshot_unref(snap);   /* the VMs hold their own references */
    if (!srv) {
        answer(ctl, CONTROL_FAILED, 0, err);   /* the supervisor says why */
        tls_identity_free(&id);
        return 1;
    }
    atomic_store(&metrics->building_since_ms, 0);
    atomic_store(&metrics->workers_serving, 1);
    answer(ctl, CONTROL_READY, 0, NULL);

    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    int sfd = signalfd(-1, &stop, SFD_CLOEXEC);
    struct vm **prepared = NULL;
    uint64_t prepared_attempt = 0;
    /* The drain is the supervisor's to time (supervisor.c, drain): DRAIN, then STOP. A
     * SIGTERM of our own (a service manager signalling the whole group) only drains: the
     * supervisor, which has it too, says when to stop. */
    bool draining = false;
    for (;;) {
        atomic_store(&metrics->heartbeat_ms, now_ms());
        struct pollfd pfd[2] = {{.fd = ctl, .events = POLLIN}, {.fd = sfd, .events = POLLIN}};
        int r = poll(pfd, 2, TICK_MS);
        if (r < 0 && errno != EINTR)
            break;
        bool drain = false;
        if (r > 0 && (pfd[1].revents & POLLIN)) {
            struct signalfd_siginfo si;
            if (read(sfd, &si, sizeof si) != (ssize_t)sizeof si)
                break;
            drain = true;
        }
        if (r > 0 && (pfd[0].revents & (POLLIN | POLLHUP | POLLERR))) {
            uint32_t type;
            char *data;
            int got = control_recv(ctl, &type, &data, &len, 10000);
            if (got != 1) {
                log_error("worker %d: the supervisor went away; stopping", slot);
                break;
            }
            if (type == CONTROL_STOP) {
                free(data);
                break;
            }
            drain |= type == CONTROL_DRAIN;
            atomic_store(&metrics->building_since_ms, now_ms());
            follow(srv, ctl, type, data, len, &prepared, &prepared_attempt);
            atomic_store(&metrics->building_since_ms, 0);
            free(data);
        }
        if (drain && !draining) {
            draining = true;
            server_drain(srv);
            record_drain_began();
            log_debug("worker %d: draining: gRPC health NOT_SERVING", slot);
        }
        atomic_store(&metrics->building_since_ms, now_ms());   /* a spare may be built */
        server_tick(srv);
        atomic_store(&metrics->building_since_ms, 0);
    }
    atomic_store(&metrics->workers_serving, 0);
    uint64_t stop_at = now_ms();
    server_discard(srv, prepared);
    int stopped = server_stop(srv, cfg.drain_timeout_ms);
    /* the streams that ended during the drain too: a burst can leave tens of MB queued */
    uint64_t kill_at = stop_at + (uint64_t)cfg.drain_timeout_ms + RECORD_STOP_MARGIN_MS -
                       RECORD_EXIT_MS, now = now_ms();
    record_stop(kill_at > now + RECORD_DRAIN_MS ? (int)(kill_at - now) : RECORD_DRAIN_MS);
    if (stopped == -1)
        _exit(3);
    if (stopped == -2)
        _exit(0);
    tls_identity_free(&id);
    if (sfd >= 0)
        close(sfd);
    return 0;
}
