/* script.h — one Lua VM running the user's script, and the per-message entry point the
 * gRPC side calls. A script is used by exactly one thread (its worker); nothing here is
 * thread-safe and nothing here knows about gRPC calls: bytes of a ProcessingRequest go in,
 * bytes of a ProcessingResponse (or a gRPC status) come out. */
#ifndef LUACALLOUT_SCRIPT_H
#define LUACALLOUT_SCRIPT_H

#include <stddef.h>
#include <stdint.h>

struct script;
struct script_stream;

/* Limits every script VM of the process runs under; set once at start-up, before the first
 * script_open. The defaults (script_limits_default) are those of the command line. */
struct script_limits {
    int timeout_ms;          /* per handler call (and for the top level), 0 = none */
    size_t memory_bytes;     /* per VM, 0 = none */
    int unsafe_stdlib;       /* 1: the whole standard library, debug and binary chunks too */
    size_t max_headers;      /* header entries in one message (a longer list: INVALID_ARGUMENT) */
    size_t max_ctx_bytes;    /* attributes + metadata merged into one stream's ctx */
};
extern const struct script_limits script_limits_default;
void script_set_limits(const struct script_limits *limits);

/* Creates a VM, puts the script's folder first on package.path, loads `path` in text mode
 * with chunk name "@path", runs its top level under a protected call. NULL on failure with
 * "file:line: msg" in err. */
struct script *script_open(const char *path, char *err, size_t errlen);
void script_close(struct script *s);

/* The handler globals the script defines (process, on_request_headers, ...), in that
 * order; returns how many were written to names (at most max). */
size_t script_handlers(struct script *s, const char **names, size_t max);

/* 1, once, after a handler call was stopped by a budget (time or memory): the VM may hold
 * half-updated tables, so new streams should start on a fresh one. Clears the flag, so a
 * caller that cannot build a fresh VM does not try again at every stream. */
int script_take_taint(struct script *s);

/* Per-stream Lua state: ctx.state and friends live from open to close. `id` appears in
 * log lines of this stream. */
struct script_stream *script_stream_open(struct script *s, uint64_t id);
void script_stream_close(struct script_stream *st);

enum script_outcome {
    SCRIPT_RESPOND,      /* send the reply's messages, in order */
    SCRIPT_NO_RESPONSE,  /* nothing to send (observability mode, a held body chunk) */
    SCRIPT_FAIL,         /* end the stream with reply.status / reply.message */
};

struct script_reply {
    enum script_outcome outcome;
    /* SCRIPT_RESPOND: `count` packed ProcessingResponse messages back to back in data
     * (`len` bytes in all; lens[i] each). One request usually gets one answer; a
     * FULL_DUPLEX_STREAMED body chunk may get several. Valid until the next script_handle. */
    const uint8_t *data;
    size_t len;
    size_t count;
    const size_t *lens;
    int status;           /* a grpc_status_code when outcome == SCRIPT_FAIL */
    const char *message;  /* NUL-terminated; valid until the next script_handle */
};

/* Decodes one ProcessingRequest, updates ctx from it, calls the script's process() or
 * else its handler for the phase, validates and encodes what it returned (several messages
 * for a FULL_DUPLEX_STREAMED body chunk, none when it holds the chunk or in observability
 * mode). Never raises: every failure becomes SCRIPT_FAIL (INVALID_ARGUMENT for an
 * undecodable message, INTERNAL for a Lua error or a bad return value, PERMISSION_DENIED
 * for `deny` or callout.deny_callout), logged with the stream id. */
void script_handle(struct script_stream *st, const uint8_t *msg, size_t len,
                   struct script_reply *reply);

#endif
