/* stream.c — the state machine of one ExternalProcessor/Process call.
 *
 * At most one RECV_MESSAGE and one SEND_MESSAGE batch are in flight, plus the
 * RECV_CLOSE_ON_SERVER op started with the call. A request is handed to the script as soon
 * as it arrives and the next receive is posted right away; answers queue behind the send in
 * flight, so they leave strictly in request order. When the client half-closes (or the
 * script fails the stream), the status goes out after every queued answer. The stream is
 * freed when its last batch has completed, whichever way the call ended.
 *
 * Limits (docs/operations.md, Limits). Answers queued or in flight are counted per stream
 * and in total: past the per-stream bound the stream stops posting receives, so HTTP/2 flow
 * control holds the client back until its answers drain; past the total bound the stream
 * that would add more is cancelled with RESOURCE_EXHAUSTED. Each worker keeps a list of its
 * streams and sweeps it a few times per idle timeout: a stream with no message received or
 * answer delivered for that long is cancelled with DEADLINE_EXCEEDED. The per-message cost
 * is one stored timestamp (the worker's clock, read once per completion-queue event) and,
 * for the total, an addition to a worker-local delta that reaches the shared atomic only
 * once per QUEUED_FLUSH bytes. */
#include "stream.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/support/alloc.h>
#include <malloc.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "metrics.h"
#include "dispatch.h"
#include "generation.h"
#include "record.h"
#include "tag.h"
#include "vm.h"

struct pending_send {
    grpc_byte_buffer *payload;
    size_t len;
    struct pending_send *next;
};

struct stream {
    grpc_call *call;
    struct vm *vm;                /* the script VM this stream started on, to its end */
    struct dispatch_stream *script;
    uint64_t id;
    struct stream *vm_prev, *vm_next;   /* the streams of the same VM (vm->stream_list) */
    struct stream *prev, *next;   /* the worker's list of its streams */
    int64_t last_active_ms;       /* last message received or answer delivered */
    size_t queued;                /* bytes of answers queued or in flight */

    struct tag recv_tag, send_tag, status_tag, close_tag;
    grpc_byte_buffer *recv_payload;
    int close_cancelled;
    int batches;                  /* batches started and not yet completed */

    struct pending_send *queue_head, *queue_tail;
    bool sending;
    bool send_with_recv;          /* the send in flight rides in the receive batch */
    bool finishing;               /* status decided: no more receives */
    bool status_sent;
    bool metadata_sent;           /* initial metadata has left with an earlier batch */
    bool dead;                    /* call cancelled or a batch failed: send nothing more */
    bool recv_paused;             /* too many answers unread: no receive posted */
    bool aborted;                 /* cancelled by a limit (counted as an error) */
    bool had_big;                 /* a big message or answer (see TRIM_BIG_BYTES) */
    grpc_status_code status;
    grpc_slice status_details;
    struct record_capture *rec;   /* --record: this stream is sampled (record.h) */
};

static _Atomic uint64_t next_stream_id = 1;
static bool bench_echo;

void stream_set_bench_echo(bool on) { bench_echo = on; }
static _Atomic long live_streams;

long stream_live_count(void) { return atomic_load(&live_streams); }

static struct stream_limits limits;

void stream_set_limits(const struct stream_limits *l) { limits = *l; }

/* A message or answer at least this big may leave the allocator holding pages the process
 * no longer uses: the worker then trims, once it has seen no such message for TRIM_QUIET_MS
 * (and no worker trimmed in the last TRIM_QUIET_MS). malloc_trim walks every arena, so it
 * is kept off the path of ordinary traffic. */
#define TRIM_BIG_BYTES (256 * 1024)
#define TRIM_QUIET_MS 1000
/* The shared total of queued bytes is updated once a worker's own delta passes this: the
 * total is then exact within QUEUED_FLUSH bytes per worker, for one atomic per 64 KiB. */
#define QUEUED_FLUSH (64 * 1024)

/* See enqueue: an answer this small to a stream with nothing unread is never refused. */
#define SMALL_ANSWER_BYTES (64 * 1024)
static _Atomic long queued_total;     /* bytes, less the deltas workers have not flushed */
static _Atomic int64_t last_trim_ms;

/* What a worker thread knows about its own streams. Thread-local: every event of a stream
 * is handled by the worker that accepted it, so none of this is shared. */
struct worker_streams {
    struct stream *head;
    int64_t now_ms;           /* the worker's clock, refreshed by stream_worker_tick */
    int64_t next_sweep_ms;
    long queued_delta;        /* not yet added to queued_total */
    bool big_seen;            /* a big message since this worker last trimmed */
    int64_t last_big_ms;
};
static _Thread_local struct worker_streams here;

static int64_t coarse_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void account_queued(struct stream *s, long delta)
{
    s->queued = (size_t)((long)s->queued + delta);
    here.queued_delta += delta;
    if (here.queued_delta > QUEUED_FLUSH || here.queued_delta < -QUEUED_FLUSH) {
        atomic_fetch_add_explicit(&queued_total, here.queued_delta, memory_order_relaxed);
        here.queued_delta = 0;
    }
}

/* Called when a big buffer is made and again when it is freed (the pages are free only
 * then): the trim comes TRIM_QUIET_MS after the last of either. */
static void note_big(void)
{
    here.big_seen = true;
    here.last_big_ms = here.now_ms;
}

static void note_size(struct stream *s, size_t len)
{
    if (len >= TRIM_BIG_BYTES) {
        s->had_big = true;
        note_big();
    }
}

static void stream_free(struct stream *s)
{
    while (s->queue_head) {
        struct pending_send *p = s->queue_head;
        s->queue_head = p->next;
        account_queued(s, -(long)p->len);
        grpc_byte_buffer_destroy(p->payload);
        free(p);
    }
    if (s->prev)
        s->prev->next = s->next;
    else
        here.head = s->next;
    if (s->next)
        s->next->prev = s->prev;
    if (s->recv_payload)
        grpc_byte_buffer_destroy(s->recv_payload);
    if (s->script)
        dispatch_stream_close(s->script);
    if (s->vm_prev)
        s->vm_prev->vm_next = s->vm_next;
    else
        s->vm->stream_list = s->vm_next;
    if (s->vm_next)
        s->vm_next->vm_prev = s->vm_prev;
    generation_release(s->vm);
    /* a cancelled call (by the client, a deadline, the transport) never delivered the
     * status we may have sent; one we cancelled ourselves carries ours */
    int code = s->aborted ? (int)s->status
             : s->close_cancelled || !s->status_sent ? GRPC_STATUS_CANCELLED : (int)s->status;
    metrics_stream_ended(code);
    if (s->rec) {   /* the status the client saw, with its message when it was ours */
        bool ours = code == (int)s->status;
        record_end(s->rec, code, (const char *)GRPC_SLICE_START_PTR(s->status_details),
                   ours ? GRPC_SLICE_LENGTH(s->status_details) : 0);
    }
    grpc_slice_unref(s->status_details);
    if ((s->status_sent && s->status != GRPC_STATUS_OK) || s->aborted)
        metrics_inc(&metrics->stream_errors_total);
    grpc_call_unref(s->call);
    if (s->had_big)
        note_big();   /* grpc frees the call's buffers now too */
    free(s);
    atomic_fetch_sub(&live_streams, 1);
    metrics_gauge_add(&metrics->streams_active, -1);
}

/* Every completion ends here: a stream lives exactly as long as its batches. */
static void batch_done(struct stream *s)
{
    if (--s->batches == 0)
        stream_free(s);
}

static bool start_batch(struct stream *s, const grpc_op *ops, size_t n, struct tag *tag)
{
    grpc_call_error err = grpc_call_start_batch(s->call, ops, n, tag, NULL);
    if (err != GRPC_CALL_OK) {
        log_with(LOG_ERROR, &(struct log_fields){.stream_id = s->id},
                 "grpc_call_start_batch failed (%d)", (int)err);
        s->dead = true;
        return false;
    }
    s->batches++;
    return true;
}

static void pop_sent(struct stream *s)
{
    struct pending_send *p = s->queue_head;
    s->queue_head = p->next;
    if (!s->queue_head)
        s->queue_tail = NULL;
    account_queued(s, -(long)p->len);
    if (p->len >= TRIM_BIG_BYTES)
        note_big();
    grpc_byte_buffer_destroy(p->payload);
    free(p);
    s->sending = false;
}

/* Ends the stream now, whatever it has queued: for a client that is not reading, a status
 * queued behind its answers would never leave. grpc fails the batches in flight, which
 * frees the stream as usual. */
static void abort_stream(struct stream *s, grpc_status_code status, const char *message)
{
    if (s->dead)
        return;
    grpc_call_cancel_with_status(s->call, status, message, NULL);
    s->dead = true;
    s->aborted = true;
    s->finishing = true;
    s->status = status;
    grpc_slice_unref(s->status_details);   /* for the record of the stream (--record) */
    s->status_details = grpc_slice_from_copied_string(message);
}

/* Initial metadata leaves with the stream's first send (answer or status), not at its
 * start: a separate HEADERS frame would cost the transport a write of its own, one more
 * syscall per stream; no client needs the headers before the first answer. Adds the op to
 * ops[*n] when it is still due. */
static void add_initial_metadata(struct stream *s, grpc_op *ops, size_t *n)
{
    if (s->metadata_sent)
        return;
    ops[*n] = (grpc_op){.op = GRPC_OP_SEND_INITIAL_METADATA};
    (*n)++;
    s->metadata_sent = true;
}

/* Posts the next receive. When exactly one answer waits and nothing is being sent, the
 * answer rides in the same batch: the common one-answer-per-message exchange then costs
 * one batch and one completion per message instead of two. The send still leaves at once;
 * only its completion waits for the next message, and nothing else is queued behind it. */
static void post_recv(struct stream *s)
{
    grpc_op ops[3] = {{.op = GRPC_OP_RECV_MESSAGE}};
    ops[0].data.recv_message.recv_message = &s->recv_payload;
    size_t n = 1;
    bool piggyback = !s->sending && !s->dead && s->queue_head && !s->queue_head->next;
    if (piggyback) {
        add_initial_metadata(s, ops, &n);
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = s->queue_head->payload;
        n++;
    }
    if (start_batch(s, ops, n, &s->recv_tag) && piggyback) {
        s->sending = true;
        s->send_with_recv = true;
    }
}

/* Posts the next receive unless this stream's unread answers are over the limit: then the
 * client is held back by flow control until on_send sees them drain. */
static void want_recv(struct stream *s)
{
    if (limits.max_queued_bytes && s->queued > limits.max_queued_bytes) {
        s->recv_paused = true;
        return;
    }
    post_recv(s);
}

/* Starts the next send: the oldest queued answer, else the final status once decided. */
static void pump(struct stream *s)
{
    if (s->sending || s->dead || s->status_sent)
        return;
    grpc_op ops[2];
    size_t n = 0;
    if (s->queue_head) {
        add_initial_metadata(s, ops, &n);
        ops[n] = (grpc_op){.op = GRPC_OP_SEND_MESSAGE};
        ops[n].data.send_message.send_message = s->queue_head->payload;
        if (start_batch(s, ops, n + 1, &s->send_tag))
            s->sending = true;
        return;
    }
    if (s->finishing) {
        add_initial_metadata(s, ops, &n);
        ops[n] = (grpc_op){.op = GRPC_OP_SEND_STATUS_FROM_SERVER};
        ops[n].data.send_status_from_server.status = s->status;
        ops[n].data.send_status_from_server.status_details =
            s->status == GRPC_STATUS_OK ? NULL : &s->status_details;
        if (start_batch(s, ops, n + 1, &s->status_tag))
            s->status_sent = true;
    }
}

static void finish(struct stream *s, grpc_status_code status, const char *message)
{
    s->finishing = true;
    s->status = status;
    if (message) {
        grpc_slice_unref(s->status_details);
        s->status_details = grpc_slice_from_copied_string(message);
    }
    pump(s);
}

/* Queues an answer; the caller decides when to send (post_recv may carry it). Returns
 * false when the stream has been ended instead (the total of unread answers is over its
 * limit, or no memory). */
static bool enqueue(struct stream *s, const uint8_t *data, size_t len)
{
    /* A small answer to a stream that has nothing unread goes out whatever the total: the
     * clients that read their answers are not the ones that filled it, and what such answers
     * add is bounded by SMALL_ANSWER_BYTES per stream. */
    bool innocent = s->queued == 0 && len <= SMALL_ANSWER_BYTES;
    if (limits.max_queued_total_bytes && !innocent &&
        atomic_load_explicit(&queued_total, memory_order_relaxed) + here.queued_delta +
                (long)len > (long)limits.max_queued_total_bytes) {
        char msg[160];
        snprintf(msg, sizeof msg, "answers not read by clients exceed this worker's share "
                 "(%zu MB) of --max_queued_total_mb %d", limits.max_queued_total_bytes >> 20,
                 limits.total_mb);
        log_limited_fields_at(LOG_WARN, (&(struct log_fields){.stream_id = s->id}),
                              "%s (this worker's streams together): ending it", msg);
        abort_stream(s, GRPC_STATUS_RESOURCE_EXHAUSTED, msg);
        return false;
    }
    struct pending_send *p = malloc(sizeof *p);
    if (!p) {
        finish(s, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        return false;
    }
    grpc_slice slice = grpc_slice_from_copied_buffer((const char *)data, len);
    p->payload = grpc_raw_byte_buffer_create(&slice, 1);
    grpc_slice_unref(slice);
    p->len = len;
    p->next = NULL;
    if (s->queue_tail)
        s->queue_tail->next = p;
    else
        s->queue_head = p;
    s->queue_tail = p;
    account_queued(s, (long)len);
    note_size(s, len);
    return true;
}

/* Hands one received message to the script. The payload is read in place when it is one
 * uncompressed slice (the common case); otherwise it is flattened once. */
static void handle_message(struct stream *s, grpc_byte_buffer *payload)
{
    if (bench_echo) {
        /* The benchmark's baseline: the same transport and stream machine, no decoding and
         * no Lua; the answer is a fixed ProcessingResponse{request_headers: {}}. */
        static const uint8_t fixed[] = {0x0a, 0x00};
        metrics_inc(&metrics->messages_total);
        if (!enqueue(s, fixed, sizeof fixed))
            return;
        want_recv(s);
        pump(s);
        return;
    }
    grpc_slice flat;
    const grpc_slice_buffer *slices = &payload->data.raw.slice_buffer;
    if (payload->type == GRPC_BB_RAW && payload->data.raw.compression == GRPC_COMPRESS_NONE &&
        slices->count == 1) {
        flat = grpc_slice_ref(slices->slices[0]);   /* the usual case: no copy */
    } else {
        grpc_byte_buffer_reader reader;
        if (!grpc_byte_buffer_reader_init(&reader, payload)) {
            finish(s, GRPC_STATUS_INTERNAL, "cannot read the request message");
            return;
        }
        flat = grpc_byte_buffer_reader_readall(&reader);
        grpc_byte_buffer_reader_destroy(&reader);
    }

    note_size(s, GRPC_SLICE_LENGTH(flat));   /* dispatch_handle counts the message */
    struct dispatch_reply reply;
    dispatch_handle(s->script, GRPC_SLICE_START_PTR(flat), GRPC_SLICE_LENGTH(flat), &reply);
    if (s->rec)
        record_message(s->rec, GRPC_SLICE_START_PTR(flat), GRPC_SLICE_LENGTH(flat), &reply);
    grpc_slice_unref(flat);

    switch (reply.outcome) {
    case DISPATCH_RESPOND:
        for (size_t i = 0, at = 0; i < reply.count; at += reply.lens[i], i++)
            if (!enqueue(s, reply.data + at, reply.lens[i]))
                return;
        break;
    case DISPATCH_NO_RESPONSE:
        break;
    case DISPATCH_FAIL:
        finish(s, (grpc_status_code)reply.status, reply.message);
        return;
    }
    if (!s->finishing)
        want_recv(s);
    pump(s);
}

static void on_recv(struct tag *tag, bool ok)
{
    struct stream *s = container_of(tag, struct stream, recv_tag);
    grpc_byte_buffer *payload = s->recv_payload;
    s->recv_payload = NULL;
    if (s->send_with_recv) {
        s->send_with_recv = false;
        pop_sent(s);
    }
    if (!ok) {
        s->dead = true;            /* the call is over (cancelled or torn down) */
    } else if (!payload) {
        if (!s->finishing)
            finish(s, GRPC_STATUS_OK, NULL);   /* client half-close: all answered */
    } else if (!s->dead && !s->finishing) {
        s->last_active_ms = here.now_ms;
        handle_message(s, payload);
        /* the handler's own time is not the client's idleness: the stream is waiting for
         * us, and the idle sweep that runs next must not end it */
        s->last_active_ms = coarse_ms();
    }
    if (payload)
        grpc_byte_buffer_destroy(payload);
    batch_done(s);
}

static void on_send(struct tag *tag, bool ok)
{
    struct stream *s = container_of(tag, struct stream, send_tag);
    pop_sent(s);
    if (!ok)
        s->dead = true;
    else
        s->last_active_ms = here.now_ms;
    if (s->recv_paused && !s->dead && !s->finishing &&
        s->queued <= limits.max_queued_bytes) {
        s->recv_paused = false;
        post_recv(s);
    }
    pump(s);
    batch_done(s);
}

static void on_status(struct tag *tag, bool ok)
{
    (void)ok;
    struct stream *s = container_of(tag, struct stream, status_tag);
    batch_done(s);
}

static void on_close(struct tag *tag, bool ok)
{
    (void)ok;
    struct stream *s = container_of(tag, struct stream, close_tag);
    if (s->close_cancelled) {
        s->dead = true;
        log_with(LOG_DEBUG, &(struct log_fields){.stream_id = s->id}, "cancelled by the client");
    }
    batch_done(s);
}

void stream_start(grpc_call *call, struct vm *vm)
{
    struct stream *s = calloc(1, sizeof *s);
    if (!s) {
        grpc_call_cancel_with_status(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory",
                                     NULL);
        grpc_call_unref(call);
        return;
    }
    atomic_fetch_add(&live_streams, 1);
    metrics_inc(&metrics->streams_total);
    metrics_gauge_add(&metrics->streams_active, 1);
    s->call = call;
    s->vm = vm;
    generation_acquire(vm);
    s->vm_next = vm->stream_list;
    if (s->vm_next)
        s->vm_next->vm_prev = s;
    vm->stream_list = s;
    s->id = atomic_fetch_add(&next_stream_id, 1);
    s->script = dispatch_stream_open(vm, s->id);
    s->rec = record_begin(vm, s->id);
    s->status_details = grpc_empty_slice();
    s->recv_tag.done = on_recv;
    s->send_tag.done = on_send;
    s->status_tag.done = on_status;
    s->close_tag.done = on_close;
    s->batches = 1;   /* held until the end of this function */
    s->last_active_ms = here.now_ms;
    s->next = here.head;
    if (here.head)
        here.head->prev = s;
    here.head = s;

    grpc_op close_op = {.op = GRPC_OP_RECV_CLOSE_ON_SERVER};
    close_op.data.recv_close_on_server.cancelled = &s->close_cancelled;
    start_batch(s, &close_op, 1, &s->close_tag);

    if (!s->script) {
        finish(s, GRPC_STATUS_RESOURCE_EXHAUSTED, "cannot create the stream's Lua state");
    } else {
        grpc_op op = {.op = GRPC_OP_RECV_MESSAGE};
        op.data.recv_message.recv_message = &s->recv_payload;
        start_batch(s, &op, 1, &s->recv_tag);
    }
    batch_done(s);
}

void stream_evict(struct vm *vm)
{
    for (struct stream *s = vm->stream_list; s; s = s->vm_next)
        grpc_call_cancel_with_status(s->call, GRPC_STATUS_UNAVAILABLE,
                                     "the script generation this stream started on had to be "
                                     "closed (too many older generations still in use)",
                                     NULL);
}

/* --- the worker's clock: idle streams, memory given back ------------------------------- */

/* Often enough that a stream ends within a quarter of the timeout after it expires, rarely
 * enough that a worker with thousands of streams spends nothing on it. */
static int sweep_interval_ms(void)
{
    int ms = limits.idle_timeout_ms / 4;
    if (ms <= 0 || ms > TRIM_QUIET_MS)
        ms = TRIM_QUIET_MS;
    return ms < 10 ? 10 : ms;
}

gpr_timespec stream_worker_deadline(void)
{
    bool idle_due = limits.idle_timeout_ms > 0 && here.head;
    if (!idle_due && !here.big_seen)
        return gpr_inf_future(GPR_CLOCK_MONOTONIC);
    int64_t wait = here.next_sweep_ms - coarse_ms();
    if (wait < 1)
        wait = 1;
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(wait, GPR_TIMESPAN));
}

static void sweep_idle(void)
{
    char msg[64];
    snprintf(msg, sizeof msg, "no message for %d ms", limits.idle_timeout_ms);
    for (struct stream *s = here.head; s; s = s->next) {
        if (!s->dead && here.now_ms - s->last_active_ms >= limits.idle_timeout_ms) {
            log_with(LOG_DEBUG, &(struct log_fields){.stream_id = s->id}, "%s, ending it", msg);
            abort_stream(s, GRPC_STATUS_DEADLINE_EXCEEDED, msg);
        }
    }
}

/* After big messages the allocator keeps the pages it got for them (free chunks inside
 * the heaps, per-thread arenas): once this worker has seen none for a while, give them
 * back, at most once per TRIM_QUIET_MS for the whole process. */
static void maybe_trim(void)
{
    if (!here.big_seen || here.now_ms - here.last_big_ms < TRIM_QUIET_MS)
        return;
    int64_t last = atomic_load_explicit(&last_trim_ms, memory_order_relaxed);
    if (here.now_ms - last < TRIM_QUIET_MS ||
        !atomic_compare_exchange_strong(&last_trim_ms, &last, here.now_ms))
        return;   /* another worker trimmed lately; try again at the next sweep */
    here.big_seen = false;
    malloc_trim(0);
}

void stream_worker_tick(void)
{
    here.now_ms = coarse_ms();
    if (here.now_ms < here.next_sweep_ms)
        return;
    here.next_sweep_ms = here.now_ms + sweep_interval_ms();
    if (limits.idle_timeout_ms > 0)
        sweep_idle();
    maybe_trim();
}

/* --- calls to any other method ------------------------------------------------------------ */

struct rejected_call {
    struct tag tag;
    grpc_call *call;
    int cancelled;
};

static void on_rejected(struct tag *tag, bool ok)
{
    (void)ok;
    struct rejected_call *r = container_of(tag, struct rejected_call, tag);
    grpc_call_unref(r->call);
    free(r);
}

void stream_reject_unknown(grpc_call *call, const grpc_slice *method)
{
    struct rejected_call *r = calloc(1, sizeof *r);
    if (!r) {
        grpc_call_cancel(call, NULL);
        grpc_call_unref(call);
        return;
    }
    r->tag.done = on_rejected;
    r->call = call;
    char *name = grpc_slice_to_c_string(*method);
    log_warn_limited("rejecting a call to unknown method %s", name);
    gpr_free(name);
    grpc_slice details = grpc_slice_from_static_string(
        "luacallout serves only envoy.service.ext_proc.v3.ExternalProcessor/Process");
    grpc_op ops[3] = {{.op = GRPC_OP_SEND_INITIAL_METADATA},
                      {.op = GRPC_OP_SEND_STATUS_FROM_SERVER},
                      {.op = GRPC_OP_RECV_CLOSE_ON_SERVER}};
    ops[1].data.send_status_from_server.status = GRPC_STATUS_UNIMPLEMENTED;
    ops[1].data.send_status_from_server.status_details = &details;
    ops[2].data.recv_close_on_server.cancelled = &r->cancelled;
    if (grpc_call_start_batch(call, ops, 3, &r->tag, NULL) != GRPC_CALL_OK)
        on_rejected(&r->tag, false);
}
