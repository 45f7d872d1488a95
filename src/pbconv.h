/* pbconv.h — protobuf-c ext_proc messages <-> Lua values, as docs/lua-api.md describes.
 * No gRPC here and no knowledge of scripts or streams: the server (script.c) and the
 * test module for busted specs drive the same conversions.
 *
 * Functions that push Lua values may raise Lua errors (memory); call them under a
 * protected call. */
#ifndef LUACALLOUT_PBCONV_H
#define LUACALLOUT_PBCONV_H

#include <stdbool.h>
#include <stddef.h>

#include <lua.h>

#include "envoy/service/ext_proc/v3/external_processor.pb-c.h"

#include "arena.h"

typedef Envoy__Service__ExtProc__V3__ProcessingRequest pbconv_request;
typedef Envoy__Service__ExtProc__V3__ProcessingResponse pbconv_response;

enum pbconv_phase {
    PBCONV_REQUEST_HEADERS,
    PBCONV_RESPONSE_HEADERS,
    PBCONV_REQUEST_BODY,
    PBCONV_RESPONSE_BODY,
    PBCONV_REQUEST_TRAILERS,
    PBCONV_RESPONSE_TRAILERS,
    PBCONV_PHASE_COUNT
};

/* "request_headers", ... — the value of ctx.phase. */
const char *pbconv_phase_name(enum pbconv_phase phase);
/* "on_request_headers", ... — the global the script defines for that phase. */
const char *pbconv_handler_name(enum pbconv_phase phase);
/* The phase a request carries; -1 when its oneof is not set. */
int pbconv_phase_of(const pbconv_request *req, enum pbconv_phase *phase);

/* Registers what the pushed objects need (the headers metatable) in L's registry.
 * Call once per lua_State before pushing anything. May raise. */
void pbconv_open(lua_State *L);

/* Pushes the handler's first argument for req's phase: a headers object for headers and
 * trailers phases, a body object for body phases. May raise.
 * stack before: ...   after: ... object */
void pbconv_push_input(lua_State *L, const pbconv_request *req, enum pbconv_phase phase);

/* Pushes a headers object for `map` (NULL = no headers). end_of_stream < 0 leaves the
 * field out (trailers have none). May raise. stack: ... -> ... headers */
void pbconv_push_headers(lua_State *L, const Envoy__Config__Core__V3__HeaderMap *map,
                         int end_of_stream);

/* Pushes {body = <bytes>, end_of_stream = <bool>}; body NULL = empty. May raise.
 * stack: ... -> ... body */
void pbconv_push_body(lua_State *L, const Envoy__Service__ExtProc__V3__HttpBody *body);

/* Merges what req carries besides its phase into the ctx table at index ctx:
 * `attributes` and `metadata_context.filter_metadata` key by key into ctx.attributes[ns]
 * and ctx.metadata[ns] (both tables must exist), and protocol_config into
 * ctx.protocol_config when that is still nil. Builds nothing when req carries none of
 * them (the common case). May raise. stack before/after: unchanged. */
void pbconv_update_ctx(lua_State *L, int ctx, const pbconv_request *req);

/* Whether body chunks of `phase` travel in FULL_DUPLEX_STREAMED or GRPC mode (GRPC is
 * FULL_DUPLEX_STREAMED with one gRPC message per chunk) according to the protocol_config
 * of a request (false for other phases or without a protocol_config). */
bool pbconv_full_duplex(const Envoy__Service__ExtProc__V3__ProtocolConfiguration *pc,
                        enum pbconv_phase phase);
/* Whether body chunks of `phase` travel in GRPC mode (a subset of pbconv_full_duplex). */
bool pbconv_grpc_mode(const Envoy__Service__ExtProc__V3__ProtocolConfiguration *pc,
                      enum pbconv_phase phase);

/* Makes *resp the "continue unchanged" answer for the phase: its oneof set to an empty
 * message of the phase's type (Envoy rejects a ProcessingResponse with nothing set).
 * 0, or -1 when the arena is out of memory. */
int pbconv_empty_response(pbconv_response *resp, enum pbconv_phase phase, struct arena *a);

enum pbconv_status {
    PBCONV_OK,     /* *resp is ready to pack */
    PBCONV_DENY,   /* the handler asked to fail the stream: see deny_message */
    PBCONV_BAD,    /* the value breaks the contract: see err */
    PBCONV_NOMEM,  /* the arena ran out of memory */
};

/* What a PBCONV_OK answer does (for metrics): nothing, a change, or answer the client. */
enum pbconv_answer { PBCONV_ANSWER_CONTINUE, PBCONV_ANSWER_MUTATE, PBCONV_ANSWER_IMMEDIATE };

struct pbconv_result {
    /* PBCONV_DENY: the message, pointing into a Lua string or static text. */
    const char *deny_message;
    size_t deny_len;
    enum pbconv_answer answer;   /* PBCONV_OK */
    /* A headers phase returned wait_for_body = true (the caller decides whether it can
     * hold the answer; docs/streaming.md, Routing on the body). */
    bool wait_for_body;
    /* in->headers_held: the body handler's add/remove/append_action and clear_route_cache,
     * taken out of its body answer for the held headers response (NULL / false: none). */
    Envoy__Service__ExtProc__V3__HeaderMutation *held_mutation;
    bool held_clear_route_cache;
    /* PBCONV_OK: the answer sets request_drain (Envoy half-closes; later body chunks of
     * the stream are to be echoed unchanged) */
    bool request_drain;
    /* PBCONV_OK: a streamed immediate response is open after this answer */
    bool local_reply_open;
};

/* What a response answers. For a body chunk in FULL_DUPLEX_STREAMED mode, full_duplex is
 * set and chunk/chunk_len/end_of_stream describe the incoming chunk: the answer is then a
 * sequence of streamed body responses (see docs/streaming.md). */
struct pbconv_in {
    enum pbconv_phase phase;
    bool full_duplex;
    const uint8_t *chunk;
    size_t chunk_len;
    bool end_of_stream;   /* of the chunk; of the headers in PBCONV_REQUEST_HEADERS */
    /* A body phase whose headers response is still held: header changes go to res. */
    bool headers_held;
    /* A body phase whose direction held its headers response (wait_for_body) and sent it
     * with the answer to chunk headers_went (1-based; 0: not sent yet, or never held):
     * header changes in this body answer would reach no headers response, and Envoy
     * ignores them in a streamed body response, so they are an error. */
    unsigned headers_went;
    /* A body answer that replaces or clears the body also sets content-length (BUFFERED,
     * BUFFERED_PARTIAL at end of stream), unless its add/remove name content-length. */
    bool length_follows_body;
    /* GRPC body mode (full_duplex is set too): the chunk is one gRPC message, with the
     * chunk's two flags */
    bool grpc;
    bool chunk_compressed;
    bool chunk_eos_without_message;
    /* the stream's request body mode, when a protocol_config told it (streamed
     * immediate responses need NONE or FULL_DUPLEX_STREAMED) */
    bool body_mode_known;
    int request_body_mode;
    /* a streamed immediate response began on this stream and has not ended: request body
     * chunks and trailers answer it (docs/lua-api.md) */
    bool local_reply_open;
};

/* Validates the handler's return value at idx (nil or a table) for in->phase and builds
 * the messages to send: *out is an arena array of *n ProcessingResponses (*n is 1 except
 * in FULL_DUPLEX_STREAMED mode, where it may be 0 or several). Same contract as
 * pbconv_to_response otherwise. */
enum pbconv_status pbconv_to_responses(lua_State *L, int idx, const struct pbconv_in *in,
                                       struct arena *a, pbconv_response **out, size_t *n,
                                       struct pbconv_result *res, char *err, size_t errlen);

/* Validates the handler's return value at stack index idx (nil or a table) for `phase`
 * and builds the ProcessingResponse in *resp (which it initialises) from arena memory.
 *
 * Strings and bytes in *resp point straight into Lua strings reachable from the value at
 * idx: keep that value on the stack, untouched, until *resp has been packed.
 * On PBCONV_BAD, err holds e.g. "on_request_headers returned a bad table: unknown key
 * 'ad'" (no source location: the caller knows the handler). Does not call Lua code and
 * leaves the stack as it found it; may raise only if the Lua stack cannot grow. */
enum pbconv_status pbconv_to_response(lua_State *L, int idx, enum pbconv_phase phase,
                                      struct arena *a, pbconv_response *resp,
                                      struct pbconv_result *res, char *err, size_t errlen);

#endif
