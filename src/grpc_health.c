/* grpc_health.c — see grpc_health.h.
 *
 * A health call: RECV_CLOSE_ON_SERVER at once, then initial metadata and the one request
 * message. Check answers in one batch (message and status, or NOT_FOUND). Watch answers at
 * once and again whenever the status it last sent is no longer the current one, one send
 * at a time, until the client cancels or the drain ends (status OK).
 *
 * A Watch is touched by two threads: its worker (completions) and the process's control
 * thread (the drain changes the status). One mutex guards every health call; health calls
 * are a few per second at most, never on the path of an ext_proc message. */
#include "grpc_health.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "grpc/health/v1/health.pb-c.h"
#include "log.h"
#include "tag.h"

#define STATUS(name) GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__##name

/* Open Watches a worker keeps (docs/operations.md, Health checks). A Watch costs ~12 KB and
 * lives as long as its client wants: without a cap, anyone who reaches the port could make
 * the worker hold any number. A health checker needs one per connection it checks on. */
#define MAX_WATCHES 100
#define STRINGIFY_(x) #x
#define STRINGIFY(x) STRINGIFY_(x)
/* At most one warning about refused Watches this often. */
#define REFUSED_LOG_MS 10000

/* The services a health check may name: the server, and the one service it serves. */
static const char *const known_services[] = {"", "envoy.service.ext_proc.v3.ExternalProcessor"};

struct health_call {
    struct tag recv_tag, send_tag, final_tag, close_tag;
    grpc_call *call;
    bool watch;
    bool has_vm;
    bool known;               /* the service asked about is one of ours */
    grpc_byte_buffer *recv;
    int cancelled;
    int batches;              /* started and not completed */
    int sent;                 /* Watch: the status last sent, -1 none */
    bool sending;             /* Watch: a message in flight */
    bool over;                /* the final status is out, or the call failed */
    uint8_t out[8];           /* the answer in flight (2 bytes at most) */
    struct health_call *prev, *next;   /* open Watches */
    bool listed;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static bool serving = true;
static bool ending;
static struct health_call *watches;
static _Atomic long live_calls;
static int open_watches;          /* Watch calls started and not yet freed (lock) */
static long refused_watches;      /* since the last warning (lock) */
static uint64_t refused_logged_ms;

long grpc_health_live_count(void) { return atomic_load(&live_calls); }

enum grpc_health_method grpc_health_method_of(const grpc_slice *method)
{
    if (grpc_slice_str_cmp(*method, "/grpc.health.v1.Health/Check") == 0)
        return GRPC_HEALTH_CHECK;
    if (grpc_slice_str_cmp(*method, "/grpc.health.v1.Health/Watch") == 0)
        return GRPC_HEALTH_WATCH;
    return GRPC_HEALTH_NONE;
}

/* What this call should say now (lock held). */
static int current_status(const struct health_call *hc)
{
    if (!hc->known)
        return STATUS(SERVICE_UNKNOWN);
    return serving && hc->has_vm ? STATUS(SERVING) : STATUS(NOT_SERVING);
}

static bool start(struct health_call *hc, const grpc_op *ops, size_t n, struct tag *tag)
{
    if (grpc_call_start_batch(hc->call, ops, n, tag, NULL) != GRPC_CALL_OK) {
        hc->over = true;
        grpc_call_cancel(hc->call, NULL);
        return false;
    }
    hc->batches++;
    return true;
}

/* One answer, protobuf-encoded into hc->out, as a byte buffer for a send op. */
static grpc_byte_buffer *answer(struct health_call *hc, int status)
{
    Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    resp.status = (Grpc__Health__V1__HealthCheckResponse__ServingStatus)status;
    size_t len = grpc__health__v1__health_check_response__pack(&resp, hc->out);
    grpc_slice slice = grpc_slice_from_copied_buffer((const char *)hc->out, len);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&slice, 1);
    grpc_slice_unref(slice);
    return bb;
}

static void final_status(struct health_call *hc, grpc_status_code code, const char *details,
                         grpc_byte_buffer *message)
{
    grpc_slice text = grpc_slice_from_static_string(details ? details : "");
    grpc_op ops[2];
    size_t n = 0;
    if (message) {
        ops[n] = (grpc_op){.op = GRPC_OP_SEND_MESSAGE};
        ops[n++].data.send_message.send_message = message;
    }
    ops[n] = (grpc_op){.op = GRPC_OP_SEND_STATUS_FROM_SERVER};
    ops[n].data.send_status_from_server.status = code;
    ops[n++].data.send_status_from_server.status_details = details ? &text : NULL;
    start(hc, ops, n, &hc->final_tag);
    hc->over = true;
    if (message)
        grpc_byte_buffer_destroy(message);   /* the batch holds its own reference */
}

/* A Watch's next step (lock held): the current status when it differs from the last one
 * sent, or OK once the drain is over. */
static void pump(struct health_call *hc)
{
    if (hc->over || hc->sending)
        return;
    if (ending && hc->sent >= 0) {
        final_status(hc, GRPC_STATUS_OK, NULL, NULL);
        return;
    }
    int status = current_status(hc);
    if (status == hc->sent)
        return;
    grpc_op op = {.op = GRPC_OP_SEND_MESSAGE};
    op.data.send_message.send_message = answer(hc, status);
    if (start(hc, &op, 1, &hc->send_tag)) {
        hc->sending = true;
        hc->sent = status;
    }
    grpc_byte_buffer_destroy(op.data.send_message.send_message);
}

/* A completion of hc is done (lock held): true when it was the last one, and the caller
 * must free hc after unlocking. */
static bool batch_done(struct health_call *hc)
{
    if (--hc->batches > 0)
        return false;
    if (hc->listed) {
        if (hc->prev)
            hc->prev->next = hc->next;
        else
            watches = hc->next;
        if (hc->next)
            hc->next->prev = hc->prev;
    }
    return true;
}

static void call_free(struct health_call *hc)
{
    if (hc->watch) {
        pthread_mutex_lock(&lock);
        open_watches--;
        pthread_mutex_unlock(&lock);
    }
    if (hc->recv)
        grpc_byte_buffer_destroy(hc->recv);
    grpc_call_unref(hc->call);
    free(hc);
    atomic_fetch_sub(&live_calls, 1);
}

/* The service named by a received HealthCheckRequest: 1 known, 0 unknown, -1 malformed. */
static int parse(grpc_byte_buffer *payload)
{
    grpc_byte_buffer_reader reader;
    if (!grpc_byte_buffer_reader_init(&reader, payload))
        return -1;
    grpc_slice flat = grpc_byte_buffer_reader_readall(&reader);
    grpc_byte_buffer_reader_destroy(&reader);
    Grpc__Health__V1__HealthCheckRequest *req = grpc__health__v1__health_check_request__unpack(
        NULL, GRPC_SLICE_LENGTH(flat), GRPC_SLICE_START_PTR(flat));
    grpc_slice_unref(flat);
    if (!req)
        return -1;
    int known = 0;
    for (size_t i = 0; i < sizeof known_services / sizeof known_services[0]; i++)
        known |= strcmp(req->service, known_services[i]) == 0;
    grpc__health__v1__health_check_request__free_unpacked(req, NULL);
    return known;
}

static void on_recv(struct tag *tag, bool ok)
{
    struct health_call *hc = container_of(tag, struct health_call, recv_tag);
    pthread_mutex_lock(&lock);
    int known = ok && hc->recv ? parse(hc->recv) : -1;
    if (!ok || hc->over) {
        hc->over = true;
    } else if (known < 0) {
        final_status(hc, GRPC_STATUS_INVALID_ARGUMENT, hc->recv
                     ? "malformed grpc.health.v1.HealthCheckRequest"
                     : "no grpc.health.v1.HealthCheckRequest", NULL);
    } else if (!hc->watch) {
        hc->known = known;
        if (known)
            final_status(hc, GRPC_STATUS_OK, NULL, answer(hc, current_status(hc)));
        else
            final_status(hc, GRPC_STATUS_NOT_FOUND, "unknown service", NULL);
    } else {
        hc->known = known;   /* an unknown one gets SERVICE_UNKNOWN and stays open */
        hc->next = watches;
        if (watches)
            watches->prev = hc;
        watches = hc;
        hc->listed = true;
        pump(hc);
    }
    bool last = batch_done(hc);
    pthread_mutex_unlock(&lock);
    if (last)
        call_free(hc);
}

static void on_send(struct tag *tag, bool ok)
{
    struct health_call *hc = container_of(tag, struct health_call, send_tag);
    pthread_mutex_lock(&lock);
    hc->sending = false;
    if (!ok)
        hc->over = true;   /* the call is gone */
    pump(hc);
    bool last = batch_done(hc);
    pthread_mutex_unlock(&lock);
    if (last)
        call_free(hc);
}

static void on_final_or_close(struct health_call *hc, bool closed)
{
    pthread_mutex_lock(&lock);
    if (closed && hc->cancelled)
        hc->over = true;   /* the client went away: send nothing more */
    bool last = batch_done(hc);
    pthread_mutex_unlock(&lock);
    if (last)
        call_free(hc);
}

static void on_final(struct tag *tag, bool ok)
{
    (void)ok;
    on_final_or_close(container_of(tag, struct health_call, final_tag), false);
}

static void on_close(struct tag *tag, bool ok)
{
    (void)ok;
    on_final_or_close(container_of(tag, struct health_call, close_tag), true);
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* A Watch over MAX_WATCHES: refused at once, and said (at most every REFUSED_LOG_MS). */
static bool watch_refused(void)
{
    pthread_mutex_lock(&lock);
    bool refused = open_watches >= MAX_WATCHES;
    long n = 0;
    if (refused) {
        refused_watches++;
        uint64_t now = now_ms();
        if (!refused_logged_ms || now - refused_logged_ms >= REFUSED_LOG_MS) {
            n = refused_watches;
            refused_watches = 0;
            refused_logged_ms = now;
        }
    } else {
        open_watches++;
    }
    pthread_mutex_unlock(&lock);
    if (n)
        log_warn("gRPC health: refusing Watch calls (RESOURCE_EXHAUSTED): this worker keeps "
                 "at most %d open; %ld refused since the last such warning", MAX_WATCHES, n);
    return refused;
}

void grpc_health_start(grpc_call *call, enum grpc_health_method method, bool has_vm)
{
    if (method == GRPC_HEALTH_WATCH && watch_refused()) {
        grpc_call_cancel_with_status(call, GRPC_STATUS_RESOURCE_EXHAUSTED,
                                     "too many open grpc.health.v1.Health/Watch calls on "
                                     "this worker (" STRINGIFY(MAX_WATCHES) " at most)", NULL);
        grpc_call_unref(call);
        return;
    }
    struct health_call *hc = calloc(1, sizeof *hc);
    if (!hc) {
        if (method == GRPC_HEALTH_WATCH) {
            pthread_mutex_lock(&lock);
            open_watches--;
            pthread_mutex_unlock(&lock);
        }
        grpc_call_cancel_with_status(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory",
                                     NULL);
        grpc_call_unref(call);
        return;
    }
    atomic_fetch_add(&live_calls, 1);
    hc->call = call;
    hc->watch = method == GRPC_HEALTH_WATCH;
    hc->has_vm = has_vm;
    hc->sent = -1;
    hc->recv_tag.done = on_recv;
    hc->send_tag.done = on_send;
    hc->final_tag.done = on_final;
    hc->close_tag.done = on_close;
    pthread_mutex_lock(&lock);
    hc->batches = 1;   /* held until the end of this function */
    grpc_op close_op = {.op = GRPC_OP_RECV_CLOSE_ON_SERVER};
    close_op.data.recv_close_on_server.cancelled = &hc->cancelled;
    start(hc, &close_op, 1, &hc->close_tag);
    grpc_op ops[2] = {{.op = GRPC_OP_SEND_INITIAL_METADATA}, {.op = GRPC_OP_RECV_MESSAGE}};
    ops[1].data.recv_message.recv_message = &hc->recv;
    start(hc, ops, 2, &hc->recv_tag);
    bool last = batch_done(hc);
    pthread_mutex_unlock(&lock);
    if (last)
        call_free(hc);
}

void grpc_health_set_serving(bool now_serving)
{
    pthread_mutex_lock(&lock);
    serving = now_serving;
    for (struct health_call *hc = watches; hc; hc = hc->next)
        pump(hc);
    pthread_mutex_unlock(&lock);
}

void grpc_health_end_watches(void)
{
    pthread_mutex_lock(&lock);
    ending = true;
    int n = 0;
    for (struct health_call *hc = watches; hc; hc = hc->next, n++)
        pump(hc);
    pthread_mutex_unlock(&lock);
    if (n)
        log_debug("gRPC health: ending %d Watch call%s", n, n == 1 ? "" : "s");
}
