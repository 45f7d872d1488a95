/* worker.c — see worker.h. */
#include "worker.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include "config.h"
#include "control.h"
#include "generation.h"
#include "log.h"
#include "metrics.h"
#include "server.h"
#include "snapshot_pack.h"
#include "stream.h"
#include "tls.h"

/* After SIGTERM: how long calls in flight may go on before they are cancelled. */
#define SHUTDOWN_GRACE_MS 5000
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

/* A generation the supervisor sent after start-up: build it, and say how that went. */
static void adopt(struct server *srv, int ctl, const char *data, size_t len)
{
    char err[1024];
    struct snapshot *snap = snapshot_unpack(data, len);
    if (!snap) {
        snprintf(err, sizeof err, "the generation sent by the supervisor is malformed");
    } else if (server_adopt(srv, snap, err, sizeof err) == 0) {
        char gen[32];
        int n = snprintf(gen, sizeof gen, "%llu", (unsigned long long)snap->generation);
        snapshot_unref(snap);
        control_send(ctl, CONTROL_LOADED, gen, (size_t)n);
        return;
    }
    snapshot_unref(snap);
    control_send(ctl, CONTROL_FAILED, err, strlen(err));
}

int worker_run(const struct config *given)
{
    int slot, ctl, metrics_fd;
    if (sscanf(given->worker_of, "%d,%d,%d", &slot, &ctl, &metrics_fd) != 3 || slot < 0) {
        fprintf(stderr, "luacallout: --worker_of is for the supervisor's use only\n");
        return 2;
    }
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
    struct tls_identity id = {0};
    if (len) {
        id.cert_pem = strdup(identity);
        id.key_pem = strdup(identity + strlen(identity) + 1);
    }
    free(identity);
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
    struct server *srv = server_start(&cfg, id.cert_pem ? &id : NULL, snap, slot, processes,
                                      err, sizeof err);
    snapshot_unref(snap);   /* the VMs hold their own references */
    if (!srv) {
        fprintf(stderr, "luacallout: %s\n", err);
        tls_identity_free(&id);
        return 1;
    }
    atomic_store(&metrics->workers_serving, 1);
    control_send(ctl, CONTROL_READY, NULL, 0);

    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    int sfd = signalfd(-1, &stop, SFD_CLOEXEC);
    for (;;) {
        struct pollfd pfd[2] = {{.fd = ctl, .events = POLLIN}, {.fd = sfd, .events = POLLIN}};
        int r = poll(pfd, 2, TICK_MS);
        if (r < 0 && errno != EINTR)
            break;
        if (r > 0 && (pfd[1].revents & POLLIN))
            break;
        if (r > 0 && (pfd[0].revents & (POLLIN | POLLHUP | POLLERR))) {
            uint32_t type;
            char *data;
            int got = control_recv(ctl, &type, &data, &len, 10000);
            if (got != 1) {
                log_error("worker %d: the supervisor went away; stopping", slot);
                break;
            }
            if (type == CONTROL_GENERATION)
                adopt(srv, ctl, data, len);
            free(data);
        }
        server_tick(srv);
    }
    atomic_store(&metrics->workers_serving, 0);
    int stopped = server_stop(srv, SHUTDOWN_GRACE_MS);
    if (stopped == -1)
        _exit(3);
    if (stopped == -2)
        _exit(0);
    tls_identity_free(&id);
    if (sfd >= 0)
        close(sfd);
    return 0;
}
