/* stream.h — one Process call: the per-call state machine that feeds request messages to
 * the worker's script and sends its answers back in order. */
#ifndef LUACALLOUT_STREAM_H
#define LUACALLOUT_STREAM_H

#include <grpc/grpc.h>
#include <stdbool.h>

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

/* Answers a call to any other method with UNIMPLEMENTED; takes ownership of `call`. */
void stream_reject_unknown(grpc_call *call, const grpc_slice *method);

#endif
