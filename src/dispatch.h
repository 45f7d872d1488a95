/* dispatch.h — one message through the script: decode a ProcessingRequest, call the
 * handler for its phase (or process()), validate and encode what it returned. Nothing here
 * knows about gRPC calls: bytes of a ProcessingRequest go in, bytes of ProcessingResponses
 * (or a gRPC status) come out. Runs on the thread that owns the VM. */
#ifndef LUACALLOUT_DISPATCH_H
#define LUACALLOUT_DISPATCH_H

#include <stddef.h>
#include <stdint.h>

struct vm;
struct dispatch_stream;

/* Per-stream Lua state: ctx.state and friends live from open to close. `id` appears in
 * log lines of this stream. */
struct dispatch_stream *dispatch_stream_open(struct vm *vm, uint64_t id);
void dispatch_stream_close(struct dispatch_stream *st);

enum dispatch_outcome {
    DISPATCH_RESPOND,      /* send the reply's messages, in order */
    DISPATCH_NO_RESPONSE,  /* nothing to send (observability mode, a held body chunk or
                            * headers response) */
    DISPATCH_FAIL,         /* end the stream with reply.status / reply.message */
};

struct dispatch_reply {
    enum dispatch_outcome outcome;
    /* DISPATCH_RESPOND: `count` packed ProcessingResponse messages back to back in data
     * (`len` bytes in all; lens[i] each). One request usually gets one answer; a
     * FULL_DUPLEX_STREAMED body chunk may get several. Valid until the next dispatch_handle
     * on the same VM. */
    const uint8_t *data;
    size_t len;
    size_t count;
    const size_t *lens;
    int status;           /* a grpc_status_code when outcome == DISPATCH_FAIL */
    const char *message;  /* NUL-terminated; valid until the next dispatch_handle */
};

/* Decodes one ProcessingRequest (bounded: nesting, header count, ctx bytes), updates ctx
 * from it, calls the script's process() or else its handler for the phase, validates and
 * encodes what it returned. Never raises: every failure becomes DISPATCH_FAIL —
 * INVALID_ARGUMENT for an undecodable or too deeply nested message, RESOURCE_EXHAUSTED for
 * one over a limit (headers, ctx) or a handler out of memory, DEADLINE_EXCEEDED for one out
 * of time, INTERNAL for a Lua error or a bad return value, PERMISSION_DENIED for `deny` —
 * logged with the stream id. */
void dispatch_handle(struct dispatch_stream *st, const uint8_t *msg, size_t len,
                     struct dispatch_reply *reply);

#endif
