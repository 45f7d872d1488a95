/* stream.h — one Process call: the per-call state machine that feeds request messages to
 * the worker's script and sends its answers back in order. */
#ifndef LUACALLOUT_STREAM_H
#define LUACALLOUT_STREAM_H

#include <grpc/grpc.h>
#include <grpc/support/time.h>
#include <stdbool.h>
#include <stddef.h>

struct vm;

/* Takes ownership of `call`, which was requested on the calling worker's completion queue;
 * every later event of the call arrives on that queue and is handled by the same worker.
 * The stream runs on `vm` (the worker's current script VM) until it ends. */
void stream_start(grpc_call *call, struct vm *vm);

/* Ends every stream running on vm with UNAVAILABLE (worker thread): the VM must go. Each
 * is freed, and the VM released, as its call's last events arrive. */
void stream_evict(struct vm *vm);

/* Streams started and not yet freed, across all workers. A stream may still start
 * batches until it is freed, so its worker's queue must stay open until this is 0. */
long stream_live_count(void);

/* --bench_echo: answer every message with a fixed response, bypassing decoding and Lua
 * (the baseline of scripts/bench). Set before the server starts. */
void stream_set_bench_echo(bool on);

/* What one client may make the server hold (docs/operations.md, Limits). Set once before
 * the server starts; 0 means no limit. */
struct stream_limits {
    size_t max_queued_bytes;        /* answers queued or in flight on one stream: above
                                     * this the stream stops receiving until they drain */
    size_t max_queued_total_bytes;  /* the same over this process's streams: a stream that
                                     * would add more fails with RESOURCE_EXHAUSTED */
    int total_mb, processes;        /* the server-wide setting it is a share of (messages) */
    int idle_timeout_ms;            /* a stream with no message for this long ends with
                                     * DEADLINE_EXCEEDED */
};
void stream_set_limits(const struct stream_limits *limits);

/* The worker loop's side of the limits, called only from worker threads: each worker keeps
 * the list of its own streams (thread-local, no locks). Wait for the next event until
 * stream_worker_deadline(); call stream_worker_tick() after every return of the wait,
 * before handling the event: it refreshes the worker's clock (one coarse clock read) and,
 * when due, ends idle streams and gives freed memory back to the system. */
gpr_timespec stream_worker_deadline(void);
void stream_worker_tick(void);

/* Answers a call to any other method with UNIMPLEMENTED; takes ownership of `call`. */
void stream_reject_unknown(grpc_call *call, const grpc_slice *method);

#endif
