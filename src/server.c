/* server.c — the grpc_server, its listeners and its workers.
 *
 * Each worker is one thread with one completion queue and one Lua VM (its own load of the
 * script). Calls are requested on a worker's own queue with that queue bound to the call,
 * so every event of a stream is handled by the worker that accepted it: no locks around
 * Lua, no hand-off between threads. */
#include "server.h"

#include <dlfcn.h>
#include <errno.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/log.h>
#include <grpc/support/sync.h>
#include <grpc/support/time.h>
#include <malloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "generation.h"
#include "grpc_health.h"
#include "log.h"
#include "metrics.h"
#include "stream.h"
#include "tag.h"
#include "tls.h"
#include "tls_port.h"
#include "vm.h"

#define PROCESS_METHOD "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
/* Requests kept posted per worker: enough that a burst of new streams never waits for a
 * worker to re-post, few enough to cost nothing. */
#define REQUESTS_PER_WORKER 8
/* A handler running this long past its time budget is stuck in C code the budget cannot
 * interrupt: the watchdog reports it and liveness fails while it lasts. */
#define WATCHDOG_MARGIN_MS 1000
/* After the drain timeout and the cancellation of what was left, how long shutdown waits
 * for the workers before it gives up on them. */
#define ABANDON_AFTER_MS 2000
/* Request metadata of one call (HTTP/2 header list): Envoy sends a few hundred bytes plus
 * any initial_metadata its grpc_service sets; its own limit for HTTP requests is 60 KiB. */
#define MAX_METADATA_BYTES (64 * 1024)
/* Memory grpc's transport may use for all connections (buffers, messages being received). */
#define TRANSPORT_MEMORY_BYTES ((size_t)256 << 20)
/* A TLS or HTTP/2 handshake not done by then holds a connection for nothing. */
/* The end of the grace: a serving thread busy in a handler has not read the streams that
 * arrived meanwhile; grpc would cancel them unread once the server is shut down. So the
 * serving thread itself shuts the server down, once its queue has been quiet for
 * SHUTDOWN_SETTLE_MS (what the sockets held has been read and matched). The main thread waits for that (a handler's budget and a second), then does
 * it itself. */
enum { SHUTDOWN_NONE, SHUTDOWN_ASKED, SHUTDOWN_SENT };
#define SERVING_TICK_MS 50
#define SHUTDOWN_POLLS 64   /* events taken in at most before the GOAWAY */
#define SHUTDOWN_SETTLE_MS 20   /* ... until none has come for this long */
#define IDLE_CONNECTIONS_MS 200     /* drain: no call left; stop waiting for connections */
#define MIN_PING_INTERVAL_MS 10000   /* keepalive pings a client may send */
#define HANDSHAKE_TIMEOUT_MS 10000

struct worker;

struct call_request {
    struct tag tag;
    struct worker *worker;
    bool generic;                 /* a request for calls to unregistered methods */
    grpc_call *call;
    gpr_timespec deadline;
    grpc_metadata_array metadata;
    grpc_call_details details;    /* generic requests only */
};

struct worker {
    struct server *srv;
    pthread_t thread;
    bool running;
    grpc_completion_queue *cq;
    struct worker_vms vms;           /* the script VMs of this worker (generation.h) */
    struct vm_activity activity;     /* the handler running now, for the watchdog */
    uint64_t stuck_reported;         /* control thread: the call the watchdog last reported */
    struct call_request requests[REQUESTS_PER_WORKER + 1];
};

struct server {
    const char *script_path;
    pthread_mutex_t reload_lock;     /* one reload at a time */
    grpc_server *grpc;
    void *process_method;
    grpc_completion_queue *shutdown_cq;
    bool started;
    _Atomic bool stopping;
    _Atomic int shutdown_state;      /* SHUTDOWN_*: who sends the GOAWAY, and when */
    int nworkers;
    int first_worker;                /* the number the log gives workers[0] */
    struct worker *workers;
    struct tls_port *tls;            /* the TLS port's certificate (NULL without one) */
    uint64_t last_trim_check_ns;     /* control thread: trim_after_streams_end */
    int64_t last_active_streams;
};

static void post_request(struct call_request *r)
{
    struct worker *w = r->worker;
    grpc_call_error err;
    grpc_metadata_array_init(&r->metadata);
    if (r->generic) {
        grpc_call_details_init(&r->details);
        err = grpc_server_request_call(w->srv->grpc, &r->call, &r->details, &r->metadata,
                                       w->cq, w->cq, &r->tag);
    } else {
        err = grpc_server_request_registered_call(w->srv->grpc, w->srv->process_method,
                                                  &r->call, &r->deadline, &r->metadata, NULL,
                                                  w->cq, w->cq, &r->tag);
    }
    if (err != GRPC_CALL_OK)
        log_error("cannot request a call (%d)", (int)err);
}

static void on_new_call(struct tag *tag, bool ok)
{
    struct call_request *r = container_of(tag, struct call_request, tag);
    struct worker *w = r->worker;
    if (ok) {
        if (r->generic) {
            enum grpc_health_method health = grpc_health_method_of(&r->details.method);
            if (health != GRPC_HEALTH_NONE)
                grpc_health_start(r->call, health, w->vms.current != NULL);
            else
                stream_reject_unknown(r->call, &r->details.method);
        } else {
            stream_start(r->call, generation_current(&w->vms));
        }
    }
    grpc_metadata_array_destroy(&r->metadata);
    if (r->generic)
        grpc_call_details_destroy(&r->details);
    r->call = NULL;
    /* A failed request means the server is shutting down: do not ask again. */
    if (ok && !atomic_load(&w->srv->stopping))
        post_request(r);
}

static void run_event(grpc_event ev)
{
    stream_worker_tick();
    if (ev.type == GRPC_OP_COMPLETE) {
        struct tag *t = ev.tag;
        t->done(t, ev.success != 0);
    }
}

/* Whoever moves shutdown_state from ASKED to SENT sends the GOAWAY, once. */
static bool shut_down(struct server *srv)
{
    int asked = SHUTDOWN_ASKED;
    if (!atomic_compare_exchange_strong(&srv->shutdown_state, &asked, SHUTDOWN_SENT))
        return false;
    grpc_server_shutdown_and_notify(srv->grpc, srv->shutdown_cq, srv);
    return true;
}

/* Serving thread, the grace over: take in what the sockets hold (a poll that does not
 * wait, until nothing more comes), then shut the server down. */
static void shut_down_here(struct worker *w)
{
    for (int i = 0; i < SHUTDOWN_POLLS; i++) {
        /* not a poll that does not wait: grpc reads a socket and matches the calls it
         * holds on its own threads too, a little later */
        grpc_event ev = grpc_completion_queue_next(
            w->cq, gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                gpr_time_from_millis(SHUTDOWN_SETTLE_MS, GPR_TIMESPAN)),
            NULL);
        if (ev.type != GRPC_OP_COMPLETE)
            break;
        run_event(ev);
    }
    shut_down(w->srv);
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    for (;;) {
        /* Wakes up for the stream layer's deadline (idle streams) and at least every
         * SERVING_TICK_MS: the end of a drain's grace is seen by a thread that went to
         * wait before it began, since nothing else can wake it */
        gpr_timespec deadline = stream_worker_deadline();
        gpr_timespec tick = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                         gpr_time_from_millis(SERVING_TICK_MS, GPR_TIMESPAN));
        if (gpr_time_cmp(tick, deadline) < 0)
            deadline = tick;
        grpc_event ev = grpc_completion_queue_next(w->cq, deadline, NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        run_event(ev);
        if (atomic_load(&w->srv->shutdown_state) == SHUTDOWN_ASKED)
            shut_down_here(w);
    }
    return NULL;
}

static int add_port(struct server *srv, const char *what, const char *address,
                    grpc_server_credentials *creds, char *err, size_t errlen)
{
    int port = grpc_server_add_http2_port(srv->grpc, address, creds);
    grpc_server_credentials_release(creds);
    if (port == 0) {
        /* the supervisor has bound this address already (supervisor.c, hold_port), with
         * a reason when it could not; failing here is a race with another program */
        snprintf(err, errlen, "cannot listen on %s (%s)", address, what);
        return -1;
    }
    log_debug("%s listening on %s (port %d)", what, address, port);
    return 0;
}

static gpr_timespec after_ms(int64_t ms)
{
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(ms, GPR_TIMESPAN));
}

/* Frees whatever server_start built, in the reverse order; safe on a partial server.
 * Streams open get timeout_ms to end; gRPC health Watches end when the last stream has
 * (or at the timeout), so a health checker hears NOT_SERVING until the server is gone.
 * -1 when streams did not end within ABANDON_AFTER_MS of their cancellation (a worker is
 * stuck in a handler): then nothing is freed, and the caller should exit. */
static int teardown(struct server *srv, int timeout_ms)
{
    atomic_store(&srv->stopping, true);
    if (srv->grpc) {
        /* no new calls from now on: GOAWAY on every connection, sent by a serving thread
         * once it has taken in what arrived during the grace (shut_down_here) */
        bool serving = false;
        for (int i = 0; i < srv->nworkers; i++)
            serving |= srv->workers[i].running;
        atomic_store(&srv->shutdown_state, SHUTDOWN_ASKED);
        /* the drain timeout counts from now, the hand-over included */
        gpr_timespec timeout = after_ms(timeout_ms);
        int budget = vm_get_limits()->timeout_ms;
        gpr_timespec handoff = after_ms((budget > 0 ? budget : 1000) + 1000 + SERVING_TICK_MS);
        if (gpr_time_cmp(handoff, timeout) > 0)
            handoff = timeout;
        while (serving && atomic_load(&srv->shutdown_state) == SHUTDOWN_ASKED &&
               gpr_time_cmp(gpr_now(GPR_CLOCK_MONOTONIC), handoff) < 0)
            gpr_sleep_until(after_ms(2));
        if (shut_down(srv) && serving)
            log_warn("drain: the serving thread did not come back from its handler within "
                     "its budget; sending the GOAWAY without it (streams it has not read "
                     "yet are cancelled)");
        bool watches_ended = false, only_idle = false;
        gpr_timespec calls_ended = gpr_inf_future(GPR_CLOCK_MONOTONIC);
        grpc_event ev;
        for (;;) {
            if (!watches_ended && stream_live_count() == 0) {
                grpc_health_end_watches();
                watches_ended = true;
            }
            /* grpc's notification also waits for every connection to close, and a client
             * that does not read (an idle grpc-python channel does not) never sees the
             * GOAWAY: once no call is left for IDLE_CONNECTIONS_MS, nothing is lost by
             * leaving such connections to the exit */
            if (watches_ended && stream_live_count() + grpc_health_live_count() == 0) {
                if (gpr_time_cmp(calls_ended, gpr_inf_future(GPR_CLOCK_MONOTONIC)) == 0)
                    calls_ended = after_ms(IDLE_CONNECTIONS_MS);
                else if (gpr_time_cmp(gpr_now(GPR_CLOCK_MONOTONIC), calls_ended) >= 0) {
                    only_idle = true;
                    break;
                }
            } else {
                calls_ended = gpr_inf_future(GPR_CLOCK_MONOTONIC);   /* calls came back */
            }
            /* in slices, to see the last stream end while Watches hold the server open */
            gpr_timespec slice = after_ms(watches_ended ? 100 : 10);
            if (gpr_time_cmp(slice, timeout) > 0)
                slice = timeout;
            ev = grpc_completion_queue_next(srv->shutdown_cq, slice, NULL);
            if (ev.type != GRPC_QUEUE_TIMEOUT ||
                gpr_time_cmp(gpr_now(GPR_CLOCK_MONOTONIC), timeout) >= 0)
                break;
        }
        if (only_idle) {
            log_info("drain: every call has ended; the connections still open (clients "
                     "that did not read the GOAWAY) close with the process");
            return -2;
        }
        if (ev.type == GRPC_QUEUE_TIMEOUT) {
            long open = stream_live_count();
            if (open > 0)
                log_warn("drain: cancelling the %ld stream%s still open after %d ms "
                         "(--drain_timeout_ms)", open, open == 1 ? "" : "s", timeout_ms);
            grpc_health_end_watches();
            grpc_server_cancel_all_calls(srv->grpc);
        }
        /* Cancelled calls still deliver their last events, and a stream may answer one
         * with a final batch: keep every queue open until the last stream is freed. A
         * worker stuck in a handler never gets there: give up on it after a while. */
        gpr_timespec deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                             gpr_time_from_millis(ABANDON_AFTER_MS,
                                                                  GPR_TIMESPAN));
        bool notified = ev.type != GRPC_QUEUE_TIMEOUT ||
                        grpc_completion_queue_next(srv->shutdown_cq, deadline, NULL).type ==
                            GRPC_OP_COMPLETE;
        while (stream_live_count() + grpc_health_live_count() > 0 &&
               gpr_time_cmp(gpr_now(GPR_CLOCK_MONOTONIC), deadline) < 0)
            gpr_sleep_until(gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                         gpr_time_from_millis(5, GPR_TIMESPAN)));
        if (!notified || stream_live_count() + grpc_health_live_count() > 0) {
            int stuck = server_stuck_workers(srv, NULL);
            if (stuck)
                log_error("shutdown: %ld streams did not end within %d ms of their "
                          "cancellation: %d worker%s stuck in a handler; abandoning them",
                          stream_live_count(), ABANDON_AFTER_MS, stuck, stuck == 1 ? " is" : "s are");
            else
                log_warn("shutdown: %ld streams did not end within %d ms of their "
                         "cancellation (their clients stopped reading, so the transport "
                         "cannot end them); abandoning them", stream_live_count(),
                         ABANDON_AFTER_MS);
            return stuck ? -1 : -2;
        }
        grpc_server_destroy(srv->grpc);
    }
    for (int i = 0; i < srv->nworkers; i++) {
        struct worker *w = &srv->workers[i];
        if (!w->cq)
            continue;
        grpc_completion_queue_shutdown(w->cq);
        if (w->running)
            pthread_join(w->thread, NULL);
        else
            worker_main(w);   /* never started: drain the queue here */
        grpc_completion_queue_destroy(w->cq);
    }
    for (int i = 0; srv->workers && i < srv->nworkers; i++)
        generation_free_all(&srv->workers[i].vms);
    if (srv->shutdown_cq) {
        grpc_completion_queue_shutdown(srv->shutdown_cq);
        while (grpc_completion_queue_next(srv->shutdown_cq, gpr_inf_future(GPR_CLOCK_MONOTONIC),
                                          NULL).type != GRPC_QUEUE_SHUTDOWN)
            ;
        grpc_completion_queue_destroy(srv->shutdown_cq);
    }
    free(srv->workers);
    pthread_mutex_destroy(&srv->reload_lock);
    struct tls_port *tls = srv->tls;
    free(srv);
    grpc_shutdown();
    tls_port_free(tls);   /* last: grpc's certificate fetcher may use it until then */
    return 0;
}

struct vm **server_build(struct server *srv, struct snapshot *snap, char *err, size_t errlen)
{
    struct vm **vms = calloc((size_t)srv->nworkers, sizeof *vms);
    if (!vms) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    if (generation_build(snap, vms, srv->nworkers, err, errlen) != 0) {
        free(vms);
        return NULL;
    }
    return vms;
}

void server_hand_over(struct server *srv, struct vm **vms)
{
    pthread_mutex_lock(&srv->reload_lock);
    /* a generation a worker never adopted (two reloads between its calls) has had no
     * stream, so it can be freed from here */
    for (int i = 0; i < srv->nworkers; i++)
        vm_close(atomic_exchange(&srv->workers[i].vms.pending, vms[i]));
    free(vms);
    pthread_mutex_unlock(&srv->reload_lock);
}

int server_set_identity(struct server *srv, const struct tls_identity *id)
{
    return srv->tls ? tls_port_set(srv->tls, id) : 0;
}

void server_discard(struct server *srv, struct vm **vms)
{
    for (int i = 0; vms && i < srv->nworkers; i++)
        vm_close(vms[i]);
    free(vms);
}

/* Debian 12's abseil is built without NDEBUG, so every absl::Mutex grpc takes (several per
 * message) runs its deadlock detector: a graph of lock order, updated on each Lock. That
 * cost 13% of a worker's CPU per 4-message stream here (55.5 -> 48.4 us). It is a
 * debugging aid; production builds of abseil turn it off, and so do we, through the C++
 * function absl::SetMutexDeadlockDetectionMode(OnDeadlockCycle::kIgnore), looked up at run
 * time under the mangled names abseil builds use so that another abseil just skips it. */
static void absl_deadlock_detection_off(void)
{
    static const char *const names[] = {
        "_ZN4absl7debian329SetMutexDeadlockDetectionModeENS0_15OnDeadlockCycleE",
        "_ZN4absl12lts_2022062329SetMutexDeadlockDetectionModeENS0_15OnDeadlockCycleE",
        "_ZN4absl29SetMutexDeadlockDetectionModeENS_15OnDeadlockCycleE",
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        void *sym = dlsym(RTLD_DEFAULT, names[i]);
        if (sym) {
            void (*set_mode)(int);
            memcpy(&set_mode, &sym, sizeof set_mode);
            set_mode(0);   /* OnDeadlockCycle::kIgnore */
            log_debug("abseil's mutex deadlock detection turned off (%s)", names[i]);
            return;
        }
    }
}

/* grpc's own log lines go through ours at debug level: its errors for conditions we
 * report ourselves (a port in use, a client that went away) would only confuse. */
static void grpc_log_to_ours(gpr_log_func_args *args)
{
    log_debug("grpc: %s:%d: %s", args->file, args->line, args->message);
}

struct server *server_start(const struct config *cfg, const struct tls_identity *id,
                            struct snapshot *snap, int slot, int processes, char *err,
                            size_t errlen)
{
    gpr_set_log_function(grpc_log_to_ours);
    gpr_set_log_verbosity(log_get_level() == LOG_DEBUG ? GPR_LOG_SEVERITY_DEBUG
                                                       : GPR_LOG_SEVERITY_ERROR);
    absl_deadlock_detection_off();
    grpc_init();
    struct server *srv = calloc(1, sizeof *srv);
    if (!srv) {
        snprintf(err, errlen, "out of memory");
        grpc_shutdown();
        return NULL;
    }
    srv->nworkers = cfg->threads;
    srv->first_worker = slot * cfg->threads;
    srv->workers = calloc((size_t)srv->nworkers, sizeof *srv->workers);
    if (!srv->workers) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }

    srv->script_path = cfg->script_path;
    pthread_mutex_init(&srv->reload_lock, NULL);
    struct vm **vms = calloc((size_t)srv->nworkers, sizeof *vms);
    if (!vms || generation_build(snap, vms, srv->nworkers, err, errlen) != 0) {
        if (!vms)
            snprintf(err, errlen, "out of memory");
        free(vms);
        goto fail;
    }
    for (int i = 0; i < srv->nworkers; i++) {
        struct worker *w = &srv->workers[i];
        w->srv = srv;
        w->vms.activity = &w->activity;
        w->vms.evict = stream_evict;
        generation_init(&w->vms, vms[i]);
        generation_fill_spare(&w->vms);   /* built ahead, so a rebuild never runs on a worker */
    }
    free(vms);

    /* What one connection may make grpc buffer (docs/operations.md, Limits). A limit of 0
     * on the command line means none: grpc's "unlimited" is -1 for sizes, and no setting
     * at all for the stream count. */
    grpc_resource_quota *quota = grpc_resource_quota_create("luacallout");
    grpc_resource_quota_resize(quota, TRANSPORT_MEMORY_BYTES / (size_t)processes);
    grpc_arg args[] = {
        /* Every worker process listens on the same ports; the kernel spreads connections
         * over them. (The supervisor holds each port, so another server cannot join.) */
        {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_ALLOW_REUSEPORT, .value.integer = 1},
        /* A longer message fails with RESOURCE_EXHAUSTED before it reaches the script. */
        {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
         .value.integer = cfg->max_message_kb ? cfg->max_message_kb * 1024 : -1},
        /* No BDP probing: grpc would otherwise grow every stream's HTTP/2 window (up to
         * megabytes) to fit the link, and a stream we have stopped reading (its client does
         * not read our answers) could still push that much into our buffers. A posted read
         * opens the window for the whole message it awaits, so large bodies still flow. */
        {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_HTTP2_BDP_PROBE, .value.integer = 0},
        /* grpc's default (16 KiB) stated: the largest frame a client may send us. */
        {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_HTTP2_MAX_FRAME_SIZE, .value.integer = 16384},
        {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_METADATA_SIZE,
         .value.integer = MAX_METADATA_BYTES},
        /* Keepalive pings, with or without streams open, at most one per 10 s: Envoy's
         * connection_keepalive (and load balancers' idea of it) then works between
         * requests, where grpc's defaults (5 min with streams, 2 h without, as TCP's
         * keepalive) closed the connection. Past that rate a ping is an offence; the
         * third closes the connection (GOAWAY ENHANCE_YOUR_CALM), so PING ACKs cannot
         * pile up for a client that does not read. */
        {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_HTTP2_MAX_PING_STRIKES, .value.integer = 2},
        {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
         .value.integer = MIN_PING_INTERVAL_MS},
        {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS,
         .value.integer = 1},
        {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_SERVER_HANDSHAKE_TIMEOUT_MS,
         .value.integer = HANDSHAKE_TIMEOUT_MS},
        /* The memory grpc's transport may use, all connections together: past it grpc
         * stops reading from sockets and shrinks windows (memory pressure), so partly
         * received messages cannot add up without bound. */
        {.type = GRPC_ARG_POINTER, .key = GRPC_ARG_RESOURCE_QUOTA,
         .value.pointer = {.p = quota, .vtable = grpc_resource_quota_arg_vtable()}},
        /* Last, so that it can be left out: SETTINGS_MAX_CONCURRENT_STREAMS. */
        {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_CONCURRENT_STREAMS,
         .value.integer = cfg->max_streams_per_connection},
    };
    size_t nargs = sizeof args / sizeof args[0] - (cfg->max_streams_per_connection ? 0 : 1);
    grpc_channel_args channel_args = {.num_args = nargs, .args = args};
    srv->grpc = grpc_server_create(&channel_args, NULL);
    grpc_resource_quota_unref(quota);   /* the server holds its own reference */
    srv->process_method = grpc_server_register_method(srv->grpc, PROCESS_METHOD, NULL,
                                                      GRPC_SRM_PAYLOAD_NONE, 0);
    srv->shutdown_cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(srv->grpc, srv->shutdown_cq, NULL);
    for (int i = 0; i < srv->nworkers; i++) {
        srv->workers[i].cq = grpc_completion_queue_create_for_next(NULL);
        grpc_server_register_completion_queue(srv->grpc, srv->workers[i].cq, NULL);
    }

    if (!cfg->disable_plaintext &&
        add_port(srv, "plaintext gRPC", cfg->plaintext_address,
                 grpc_insecure_server_credentials_create(), err, errlen) != 0)
        goto fail;
    if (!cfg->disable_tls) {
        /* swappable (server_set_identity): a reload reaches the next handshake */
        srv->tls = tls_port_new(id);
        grpc_server_credentials *creds = srv->tls ? tls_port_credentials(srv->tls) : NULL;
        if (!creds) {
            snprintf(err, errlen, "cannot create TLS credentials from the certificate");
            goto fail;
        }
        if (add_port(srv, "TLS gRPC", cfg->secure_address, creds, err, errlen) != 0)
            goto fail;
    }

    grpc_server_start(srv->grpc);
    srv->started = true;
    for (int i = 0; i < srv->nworkers; i++) {
        struct worker *w = &srv->workers[i];
        for (int k = 0; k <= REQUESTS_PER_WORKER; k++) {
            struct call_request *r = &w->requests[k];
            r->tag.done = on_new_call;
            r->worker = w;
            r->generic = k == REQUESTS_PER_WORKER;
            post_request(r);
        }
        if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
            snprintf(err, errlen, "cannot start worker thread: %s", strerror(errno));
            goto fail;
        }
        w->running = true;
    }
    return srv;

fail:
    teardown(srv, 0);
    return NULL;
}

void server_drain(struct server *srv)
{
    (void)srv;
    grpc_health_set_serving(false);
}

int server_stop(struct server *srv, int timeout_ms)
{
    return teardown(srv, timeout_ms);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int count_stuck(struct server *srv);

/* The call a worker has been running for longer than its budget plus the margin, or 0. */
static uint64_t stuck_since(struct worker *w, uint64_t now)
{
    int budget = vm_get_limits()->timeout_ms;
    uint64_t since = atomic_load_explicit(&w->activity.since_ns, memory_order_acquire);
    uint64_t limit = ((uint64_t)budget + WATCHDOG_MARGIN_MS) * 1000000u;
    return since && now > since && now - since > limit ? since : 0;
}

/* Once a second: when streams ended since the last look, gives the allocator's free pages
 * back. Streams a client abandoned half-received never pass a large message through the
 * workers (whose own trim waits for one), yet their buffers were large. */
static void trim_after_streams_end(struct server *srv, uint64_t now)
{
    if (now - srv->last_trim_check_ns < 1000000000u)
        return;
    srv->last_trim_check_ns = now;
    int64_t active = atomic_load(&metrics->streams_active);
    if (active < srv->last_active_streams)
        malloc_trim(0);
    srv->last_active_streams = active;
}

void server_tick(struct server *srv)
{
    uint64_t now = now_ns();
    trim_after_streams_end(srv, now);
    for (int i = 0; i < srv->nworkers; i++) {
        struct worker *w = &srv->workers[i];
        generation_fill_spare(&w->vms);
        uint64_t since = stuck_since(w, now);
        if (since && since != w->stuck_reported) {
            w->stuck_reported = since;
            atomic_fetch_add(&metrics->watchdog_stuck_total, 1);
            int phase = atomic_load_explicit(&w->activity.phase, memory_order_relaxed);
            if (phase >= 0 && phase < METRICS_PHASE_UNKNOWN)   /* this thread: only writer */
                metrics_inc(&metrics->outcomes[phase][METRICS_WATCHDOG]);
            const char *where = atomic_load_explicit(&w->activity.where, memory_order_relaxed);
            log_error("watchdog: worker %d has been in %s for %llu ms (stream %llu), past its "
                      "%d ms budget: C code the budget cannot interrupt; liveness fails "
                      "until it returns", srv->first_worker + i, where ? where : "a handler",
                      (unsigned long long)((now - since) / 1000000u),
                      (unsigned long long)atomic_load(&w->activity.stream),
                      vm_get_limits()->timeout_ms);
        } else if (!since && w->stuck_reported) {
            w->stuck_reported = 0;
            log_warn("watchdog: worker %d is serving again", srv->first_worker + i);
        }
    }
    atomic_store(&metrics->workers_stuck, count_stuck(srv));
    uint64_t oldest = 0;
    for (int i = 0; i < srv->nworkers; i++) {
        uint64_t since = stuck_since(&srv->workers[i], now);
        if (since && (!oldest || since < oldest))
            oldest = since;
    }
    atomic_store(&metrics->stuck_since_ms, oldest / 1000000u);
}

int server_stuck_workers(struct server *srv, int *nworkers)
{
    if (nworkers)
        *nworkers = srv->nworkers;
    return count_stuck(srv);
}

static int count_stuck(struct server *srv)
{
    uint64_t now = now_ns();
    int stuck = 0;
    for (int i = 0; i < srv->nworkers; i++)
        stuck += stuck_since(&srv->workers[i], now) != 0;
    return stuck;
}
