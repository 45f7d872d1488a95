/* dispatch.c — one message through the script; see dispatch.h.
 *
 * dispatch_handle runs its whole Lua part (building the inputs, the handler, the
 * conversion of its result) inside one vm_call, so no Lua API call that can raise runs
 * unprotected and all of it counts against the time budget. Before any of that, the bytes
 * are decoded by pbwire (the common messages) or, after a bounded nesting scan, by
 * protobuf-c, and checked against the limits on what one message and one stream may carry. */
#include "dispatch.h"

#include <assert.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <grpc/status.h>
#include <lauxlib.h>
#include <lua.h>

#include "arena.h"
#include "checks.h"
#include "log.h"
#include "metrics.h"
#include "pbconv.h"
#include "pbreflect.h"
#include "pbwire.h"
#include "vm.h"
#include "wirecheck.h"

/* A packed-answer buffer grown past this for one large answer is given back afterwards. */
#define OUT_KEEP_BYTES ((size_t)64 << 10)
/* After a message this large, a full collection gives its strings back at once, instead of
 * whenever the VM next allocates (an idle VM would hold them). Its cost, proportional to the
 * heap, is small next to the message's. */
#define COLLECT_AFTER_BYTES ((size_t)1 << 20)

struct dispatch_stream {
    struct vm *vm;
    uint64_t id;
    int ctx_ref;           /* the ctx table, in the registry */
    size_t ctx_bytes;      /* attributes + metadata received so far (wire bytes) */
    bool have_config;      /* a protocol_config arrived: the body modes below are known */
    bool full_duplex[2];   /* request, response body in FULL_DUPLEX_STREAMED or GRPC mode */
    bool grpc[2];          /* request, response body in GRPC mode */
    bool drained;          /* request_drain was sent: later streamed chunks are echoed */
    bool local_reply;      /* a streamed immediate response began and has not ended */
    bool observing;        /* the value of ctx.observability_mode */
    /* Routing on the body (docs/streaming.md): the body modes of protocol_config (-1:
     * unknown), and a headers response held until the body handler has spoken. A headers
     * response's mode_override does not change them: Envoy ignores it unless
     * allow_mode_override is set (false by default) and always with
     * send_body_without_waiting_for_header_response, and in STREAMED it strips
     * content-length at headers time, so the configured mode is the one that decides. */
    int body_mode[2];      /* request, response BodySendMode */
    int override_mode[2];  /* the body modes a mode_override this stream sent asked for, -1 none */
    bool send_body_early;  /* send_body_without_waiting_for_header_response */
    /* per direction (request, response): its headers response while held, packed
     * (malloc; NULL: none). Both can be held at once (FULL_DUPLEX_STREAMED both ways: the
     * upstream answers while the request body still streams); only a body or trailers
     * message of the same direction releases one. */
    uint8_t *held[2];
    size_t held_len[2];
    /* a headers response was held on this stream: from then on ctx.headers_held is set on
     * every message (a script's own write to it must not last); other streams leave the
     * field alone */
    bool ever_held;
    bool obs_wait[2];      /* in observability mode, the headers handler asked wait_for_body */
    unsigned chunks[2];    /* body chunks received, per direction */
    unsigned went[2];      /* the chunk whose answer carried the held headers (0: none) */
};

/* The direction of a phase: 0 request, 1 response (the index of held[] and body_mode[]). */
static int dir_of(enum pbconv_phase phase)
{
    return phase == PBCONV_RESPONSE_HEADERS || phase == PBCONV_RESPONSE_BODY ||
           phase == PBCONV_RESPONSE_TRAILERS;
}

/* Registry key (by address) of the metatable shared by every ctx of a VM. */
static const char ctx_mt_key = 0;

/* ctx.state, ctx.attributes and ctx.metadata are made the first time a script (or
 * pbconv_update_ctx) asks for them: most streams never touch some of them, and a stream's
 * first message then costs one table instead of four. */
static int ctx_index(lua_State *L)
{
    size_t len;
    const char *key = lua_tolstring(L, 2, &len);
    if (key == NULL || !((len == 5 && memcmp(key, "state", 5) == 0) ||
                         (len == 10 && memcmp(key, "attributes", 10) == 0) ||
                         (len == 8 && memcmp(key, "metadata", 8) == 0))) {
        lua_pushnil(L);
        return 1;
    }
    lua_newtable(L);
    lua_pushvalue(L, 2);
    lua_pushvalue(L, -2);
    lua_rawset(L, 1);
    return 1;
}


/* Creates the stream's ctx on its first message (and the VM's ctx metatable on its first
 * stream). Runs under the message's vm_call. stack: ... -> ... (ref in st->ctx_ref) */
static void new_ctx(lua_State *L, struct dispatch_stream *st)
{
    lua_createtable(L, 0, 8);
    lua_pushinteger(L, (lua_Integer)st->id);
    lua_setfield(L, -2, "stream_id");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "observability_mode");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "headers_held");
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &ctx_mt_key) == LUA_TNIL) {
        lua_pop(L, 1);
        lua_createtable(L, 0, 2);
        lua_pushcfunction(L, ctx_index);
        lua_setfield(L, -2, "__index");
        lua_pushliteral(L, "luacallout.ctx");
        lua_setfield(L, -2, "__name");
        lua_pushliteral(L, "locked");   /* getmetatable(ctx) must not hand out the shared one */
        lua_setfield(L, -2, "__metatable");
        lua_pushvalue(L, -1);
        lua_rawsetp(L, LUA_REGISTRYINDEX, &ctx_mt_key);
    }
    lua_setmetatable(L, -2);
    st->ctx_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

struct dispatch_stream *dispatch_stream_open(struct vm *vm, uint64_t id)
{
    struct dispatch_stream *st = malloc(sizeof *st);
    if (st == NULL)
        return NULL;
    st->vm = vm;
    st->id = id;
    st->ctx_bytes = 0;
    st->ctx_ref = LUA_NOREF;
    st->have_config = false;
    st->full_duplex[0] = st->full_duplex[1] = false;
    st->grpc[0] = st->grpc[1] = false;
    st->drained = false;
    st->local_reply = false;
    st->observing = false;
    st->body_mode[0] = st->body_mode[1] = -1;
    st->override_mode[0] = st->override_mode[1] = -1;
    st->send_body_early = false;
    st->held[0] = st->held[1] = NULL;
    st->held_len[0] = st->held_len[1] = 0;
    st->ever_held = false;
    st->obs_wait[0] = st->obs_wait[1] = false;
    st->chunks[0] = st->chunks[1] = 0;
    st->went[0] = st->went[1] = 0;
    return st;
}

/* Forgets the held headers response of direction d: it went, an immediate response or a
 * failure replaces it, or the stream ended with nothing left to answer. */
static void drop_held(struct dispatch_stream *st, int d)
{
    free(st->held[d]);
    st->held[d] = NULL;
    st->held_len[d] = 0;
}

void dispatch_stream_close(struct dispatch_stream *st)
{
    if (st == NULL)
        return;
    drop_held(st, 0);
    drop_held(st, 1);
    luaL_unref(st->vm->L, LUA_REGISTRYINDEX, st->ctx_ref);
    free(st);
}

/* What run_handler needs and what it found out. */
struct call {
    struct dispatch_stream *st;
    const pbconv_request *req;
    enum pbconv_phase phase;
    const char *handler;       /* the global that ran, for log lines */
    pbconv_response *resps;    /* the messages to send (arena) */
    size_t n;
    struct pbconv_result res;
    enum pbconv_status status;
    char err[1152];  /* PBCONV_BAD: "file:line: on_x returned a bad table: ..." */
    char script[256];/* PBCONV_BAD: the handler's file and the line it is defined at */
    int line;
    bool hold;       /* a headers answer to hold for the body (wait_for_body) */
};

#define BODY_MODE(x) ENVOY__EXTENSIONS__FILTERS__HTTP__EXT_PROC__V3__PROCESSING_MODE__BODY_SEND_MODE__##x

/* wait_for_body from a headers handler: 1 hold the answer (Envoy sends body chunks before
 * it has the headers answer: STREAMED with send_body_without_waiting_for_header_response,
 * FULL_DUPLEX_STREAMED, GRPC), 0 answer now (BUFFERED and BUFFERED_PARTIAL hold the
 * headers in Envoy, so the body answer's header changes still apply; or no body comes),
 * -1 refused with why in err: Envoy would wait for this answer before sending a body. */
static int hold_check(const struct dispatch_stream *st, const pbconv_request *req,
                      enum pbconv_phase phase, char *err, size_t errlen)
{
    int dir = phase == PBCONV_RESPONSE_HEADERS;
    const char *field = dir ? "response_body_mode" : "request_body_mode";
    const Envoy__Service__ExtProc__V3__HttpHeaders *h =
        dir ? req->response_headers : req->request_headers;
    if (h != NULL && h->end_of_stream)
        return 0;
    if (st->full_duplex[dir])
        return 1;
    int mode = st->body_mode[dir];
    if (mode == BODY_MODE(STREAMED) && st->send_body_early)
        return 1;
    if (mode == BODY_MODE(BUFFERED) || mode == BODY_MODE(BUFFERED_PARTIAL))
        return 0;
    int at = snprintf(err, errlen, "%s returned a bad table: ", pbconv_handler_name(phase));
    if (at < 0 || (size_t)at >= errlen)
        return -1;
    err += at;
    errlen -= (size_t)at;
    if (!st->have_config)
        snprintf(err, errlen, "'wait_for_body': Envoy sent no protocol_config, so the %s is "
                 "unknown and Envoy may wait for this answer before it sends the body (an "
                 "Envoy that sends protocol_config is needed)", field);
    else if (mode == BODY_MODE(STREAMED))
        snprintf(err, errlen, "'wait_for_body' in %s STREAMED needs "
                 "send_body_without_waiting_for_header_response: true in Envoy's ext_proc "
                 "config (without it Envoy sends no chunk before this answer); or use "
                 "BUFFERED or FULL_DUPLEX_STREAMED", field);
    else
        snprintf(err, errlen, "'wait_for_body' in %s %s: Envoy sends no body in this mode; "
                 "configure processing_mode.%s BUFFERED, FULL_DUPLEX_STREAMED, or STREAMED "
                 "with send_body_without_waiting_for_header_response", field,
                 mode == BODY_MODE(NONE) ? "NONE" : "(unknown)", field);
    return -1;
}

_Static_assert(PBCONV_PHASE_COUNT == METRICS_PHASE_UNKNOWN, "metrics.c names pbconv's phases");

/* What a process() response does, for metrics: as pbconv decides for a handler's table. */
static enum pbconv_answer raw_answer(const pbconv_response *r)
{
    const Envoy__Service__ExtProc__V3__CommonResponse *cr = NULL;
    switch (r->response_case) {
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_IMMEDIATE_RESPONSE:
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_STREAMED_IMMEDIATE_RESPONSE:
        return PBCONV_ANSWER_IMMEDIATE;
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_REQUEST_HEADERS:
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_RESPONSE_HEADERS:
        cr = r->request_headers ? r->request_headers->response : NULL;   /* same union */
        break;
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_REQUEST_BODY:
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_RESPONSE_BODY:
        cr = r->request_body ? r->request_body->response : NULL;
        break;
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_REQUEST_TRAILERS:
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_RESPONSE_TRAILERS:
        if (r->request_trailers && r->request_trailers->header_mutation)
            return PBCONV_ANSWER_MUTATE;
        break;
    default:
        break;
    }
    bool changes = r->dynamic_metadata || r->mode_override || r->override_message_timeout ||
                   r->request_drain ||
                   (cr && (cr->status || cr->header_mutation || cr->body_mutation ||
                           cr->trailers || cr->clear_route_cache));
    return changes ? PBCONV_ANSWER_MUTATE : PBCONV_ANSWER_CONTINUE;
}

#define BODY_MODE(x) ENVOY__EXTENSIONS__FILTERS__HTTP__EXT_PROC__V3__PROCESSING_MODE__BODY_SEND_MODE__##x

/* A process() response's streamed_immediate_response and request_drain, where Envoy
 * accepts them: a local response starts (headers_response, with ":status") in answer to
 * request headers, in NONE or FULL_DUPLEX_STREAMED request body mode, and goes on
 * (body_response, trailers_response) in answer to request body chunks and trailers until
 * a piece ends it; request_drain only in FULL_DUPLEX_STREAMED / GRPC body phases.
 * 1: not a streamed immediate response (check the rest), 0: fine, -1: refused (err). */
static int check_raw_streamed(struct dispatch_stream *st, const pbconv_response *resp,
                              enum pbconv_phase phase, char *err, size_t errlen)
{
    bool body = phase == PBCONV_REQUEST_BODY || phase == PBCONV_RESPONSE_BODY;
    if (resp->request_drain && !(body && st->full_duplex[phase == PBCONV_RESPONSE_BODY])) {
        snprintf(err, errlen, "response.request_drain is allowed only in body phases in "
                 "FULL_DUPLEX_STREAMED or GRPC mode, not in %s", pbconv_phase_name(phase));
        return -1;
    }
    if (resp->response_case !=
        ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_STREAMED_IMMEDIATE_RESPONSE) {
        if (st->local_reply && (phase == PBCONV_REQUEST_BODY || phase == PBCONV_REQUEST_TRAILERS) &&
            resp->response_case !=
                ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_IMMEDIATE_RESPONSE) {
            /* Envoy resets the client's stream on any other answer once local headers went out */
            snprintf(err, errlen, "a streamed local response is open on this stream: answer %s "
                     "with response.streamed_immediate_response (body_response or "
                     "trailers_response)", pbconv_phase_name(phase));
            return -1;
        }
        return 1;
    }
    const Envoy__Service__ExtProc__V3__StreamedImmediateResponse *sir =
        resp->streamed_immediate_response;
    int piece = sir != NULL ? (int)sir->response_case : 0;
    bool ends = false;
    if (piece == ENVOY__SERVICE__EXT_PROC__V3__STREAMED_IMMEDIATE_RESPONSE__RESPONSE_HEADERS_RESPONSE) {
        if (phase != PBCONV_REQUEST_HEADERS || st->local_reply) {
            snprintf(err, errlen, "response.streamed_immediate_response.headers_response starts a "
                     "local response: only in answer to request_headers, not %s",
                     pbconv_phase_name(phase));
            return -1;
        }
        if (st->have_config && st->body_mode[0] != BODY_MODE(NONE) &&
            st->body_mode[0] != BODY_MODE(FULL_DUPLEX_STREAMED)) {
            snprintf(err, errlen, "response.streamed_immediate_response needs request_body_mode "
                     "NONE or FULL_DUPLEX_STREAMED (Envoy supports no other)");
            return -1;
        }
        const Envoy__Config__Core__V3__HeaderMap *m =
            sir->headers_response ? sir->headers_response->headers : NULL;
        bool status = false;
        for (size_t i = 0; m != NULL && i < m->n_headers && !status; i++)
            status = m->headers[i]->key != NULL && strcmp(m->headers[i]->key, ":status") == 0;
        if (!status) {
            snprintf(err, errlen, "response.streamed_immediate_response.headers_response.headers "
                     "must carry ':status'");
            return -1;
        }
        ends = sir->headers_response->end_of_stream;
    } else if (piece == ENVOY__SERVICE__EXT_PROC__V3__STREAMED_IMMEDIATE_RESPONSE__RESPONSE_BODY_RESPONSE ||
               piece == ENVOY__SERVICE__EXT_PROC__V3__STREAMED_IMMEDIATE_RESPONSE__RESPONSE_TRAILERS_RESPONSE) {
        if (!st->local_reply ||
            (phase != PBCONV_REQUEST_BODY && phase != PBCONV_REQUEST_TRAILERS)) {
            snprintf(err, errlen, "response.streamed_immediate_response.%s continues a local "
                     "response that process() started with headers_response in answer to "
                     "request_headers; here none is open (%s)",
                     piece == 2 ? "body_response" : "trailers_response", pbconv_phase_name(phase));
            return -1;
        }
        ends = piece == 3 || (sir->body_response && sir->body_response->end_of_stream);
    } else {
        snprintf(err, errlen, "response.streamed_immediate_response: none of its 'response' "
                 "oneof is set");
        return -1;
    }
    st->local_reply = !ends;
    return 0;
}

/* Whether a process() response answers a message of `phase`: its own type, or an
 * immediate response (Envoy accepts one in every phase). */
static int check_raw_response(struct dispatch_stream *st, const pbconv_response *resp,
                              enum pbconv_phase phase, char *err, size_t errlen)
{
    int streamed = check_raw_streamed(st, resp, phase, err, errlen);
    if (streamed <= 0)
        return streamed;
    static const int own[PBCONV_PHASE_COUNT] = {
        [PBCONV_REQUEST_HEADERS] = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_REQUEST_HEADERS,
        [PBCONV_RESPONSE_HEADERS] = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_RESPONSE_HEADERS,
        [PBCONV_REQUEST_BODY] = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_REQUEST_BODY,
        [PBCONV_RESPONSE_BODY] = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_RESPONSE_BODY,
        [PBCONV_REQUEST_TRAILERS] = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_REQUEST_TRAILERS,
        [PBCONV_RESPONSE_TRAILERS] = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_RESPONSE_TRAILERS,
    };
    int set = (int)resp->response_case;
    if (set == own[phase] ||
        set == ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_IMMEDIATE_RESPONSE)
        return 0;
    const char *name = pbconv_phase_name(phase);
    if (set == ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE__NOT_SET) {
        snprintf(err, errlen, "response: none of the 'response' oneof is set (a %s message "
                 "needs response.%s or response.immediate_response)", name, name);
        return -1;
    }
    const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field(
        &envoy__service__ext_proc__v3__processing_response__descriptor, (unsigned)set);
    snprintf(err, errlen, "response.%s does not answer a %s message (expected response.%s "
             "or response.immediate_response)", f != NULL ? f->name : "?", name, name);
    return -1;
}

/* Whether a body of `mode` arrives whole here (BUFFERED, or BUFFERED_PARTIAL at its end):
 * Envoy then keeps content-length and refuses a replaced body of another length. */
static bool buffered_whole(int mode, bool end_of_stream)
{
    return mode == BODY_MODE(BUFFERED) || (mode == BODY_MODE(BUFFERED_PARTIAL) && end_of_stream);
}

/* The protected part of dispatch_handle: updates ctx, calls process() or the phase's
 * handler, and converts its result into c->resps. The result is returned so it stays on
 * the stack, anchoring the strings c->resps point to, until the responses are packed.
 * stack before: lightuserdata(call)   after: result (nil when there is no handler) */
static int run_handler(lua_State *L)
{
    struct call *c = lua_touserdata(L, 1);
    struct dispatch_stream *st = c->st;
    struct arena *a = &st->vm->arena;
    const pbconv_request *req = c->req;
    lua_settop(L, 0);

    if (st->ctx_ref == LUA_NOREF)
        new_ctx(L, st);
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->ctx_ref);  /* 1: ctx */
    pbconv_update_ctx(L, 1, req);
    struct vm *s = st->vm;
    lua_pushliteral(L, "phase");
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->phase_key[c->phase]);
    lua_rawset(L, 1);
    if ((bool)req->observability_mode != st->observing) {
        st->observing = req->observability_mode;
        lua_pushliteral(L, "observability_mode");
        lua_pushboolean(L, st->observing);
        lua_rawset(L, 1);
    }

    /* true only in the handlers of the direction whose headers response is held */
    bool held_here = st->held[dir_of(c->phase)] != NULL;
    if (st->ever_held) {
        lua_pushliteral(L, "headers_held");
        lua_pushboolean(L, held_here);
        lua_rawset(L, 1);
    }

    struct pbconv_in in = {.phase = c->phase};
    if (c->phase == PBCONV_REQUEST_BODY || c->phase == PBCONV_RESPONSE_BODY) {
        const Envoy__Service__ExtProc__V3__HttpBody *b =
            c->phase == PBCONV_REQUEST_BODY ? req->request_body : req->response_body;
        int dir = c->phase == PBCONV_RESPONSE_BODY;
        in.full_duplex = st->full_duplex[dir];
        in.grpc = st->grpc[dir];
        if (b != NULL) {
            in.chunk = b->body.data;
            in.chunk_len = b->body.len;
            in.end_of_stream = b->end_of_stream;
            in.chunk_compressed = b->grpc_message_compressed;
            in.chunk_eos_without_message = b->end_of_stream_without_message;
        }
        /* in observability mode nothing is held or sent: the body handler's header
         * changes for the headers response are taken (and dropped) as if it were */
        in.headers_held = held_here || (st->observing && st->obs_wait[dir]);
        in.headers_went = st->went[dir];
        in.length_follows_body = vm_get_limits()->content_length_follows_body && !in.full_duplex &&
                                 (buffered_whole(st->body_mode[dir], in.end_of_stream) ||
                                  buffered_whole(st->override_mode[dir], in.end_of_stream));
    }
    if (c->phase == PBCONV_REQUEST_HEADERS && req->request_headers != NULL)
        in.end_of_stream = req->request_headers->end_of_stream;   /* no body follows */
    in.body_mode_known = st->have_config;
    in.request_body_mode = st->body_mode[0];
    in.local_reply_open = st->local_reply;
    /* after request_drain, Envoy half-closes; the chunks already on their way are echoed
     * unchanged, without the handler (Envoy's comment on the field) */
    bool echo = in.full_duplex && st->drained;

    /* raw lookups: a "strict" metatable on _G must not turn a missing handler into an error */
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);  /* 2: _G */
    bool raw = true;
    c->handler = "process";
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->process_key);
    if (echo || lua_rawget(L, 2) != LUA_TFUNCTION) {
        lua_pop(L, 1);
        raw = false;
        c->handler = pbconv_handler_name(c->phase);
        lua_rawgeti(L, LUA_REGISTRYINDEX, s->handler_key[c->phase]);
        if (echo || lua_rawget(L, 2) != LUA_TFUNCTION) {
            lua_settop(L, 0);
            lua_pushnil(L);
            c->status = pbconv_to_responses(L, 1, &in, a, &c->resps, &c->n, &c->res, c->err,
                                            sizeof c->err);
            return 1;
        }
    }
    lua_replace(L, 2);    /* ctx handler: the handler stays to name itself in errors */
    lua_pushvalue(L, 2);
    if (raw)
        pbreflect_push(L, &req->base);
    else
        pbconv_push_input(L, req, c->phase);
    lua_pushvalue(L, 1);
    lua_call(L, 2, 1);    /* ctx handler result */

    char detail[1024];
    if (raw && !lua_isnil(L, 3)) {
        ProtobufCMessage *m = NULL;
        char sub[960];
        if (pbreflect_from_lua(L, 3, &envoy__service__ext_proc__v3__processing_response__descriptor,
                               "response", a, &m, sub, sizeof sub) != 0 ||
            check_raw_response(st, (pbconv_response *)m, c->phase, sub, sizeof sub) != 0) {
            c->status = PBCONV_BAD;
            snprintf(detail, sizeof detail, "process returned a bad response: %s", sub);
        } else {
            c->status = PBCONV_OK;
            c->resps = (pbconv_response *)m;
            c->n = 1;
            c->res.answer = raw_answer(c->resps);
            c->res.request_drain = c->resps->request_drain;
            c->res.local_reply_open = st->local_reply;   /* as check_raw_streamed left it */
        }
    } else {
        c->status = pbconv_to_responses(L, 3, &in, a, &c->resps, &c->n, &c->res, detail,
                                        sizeof detail);
        if (c->status == PBCONV_OK && c->res.wait_for_body && !req->observability_mode) {
            int h = hold_check(st, req, c->phase, detail, sizeof detail);
            if (h < 0)
                c->status = PBCONV_BAD;
            c->hold = h > 0;
        }
    }
    if (c->status == PBCONV_BAD) {
        lua_Debug ar;
        lua_pushvalue(L, 2);
        lua_getinfo(L, ">S", &ar);
        checks_bad_table_message(c->err, sizeof c->err, ar.short_src, ar.linedefined,
                                 c->handler, detail);
        snprintf(c->script, sizeof c->script, "%s",
                 ar.source[0] == '@' || ar.source[0] == '=' ? ar.source + 1 : ar.short_src);
        c->line = ar.linedefined;
    }
    lua_replace(L, 1);
    lua_settop(L, 1);
    return 1;
}

/* "prefix" and a script's text as one log record: the text may hold NUL bytes, which a
 * printf format would stop at. */
static void log_script_text(enum log_level level, const struct log_fields *lf,
                            const char *handler, const char *what, const char *text,
                            size_t len)
{
    char buf[LOG_RECORD_MAX];
    int n = snprintf(buf, sizeof buf, "%s %s: ", handler, what);
    size_t at = n < 0 ? 0 : (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1;
    size_t room = sizeof buf - at;
    if (len > room)
        len = room;
    memcpy(buf + at, text, len);
    log_bytes(level, lf, buf, at + len);
}

/* The log fields of the script error vm_error returned (e, with the message's length
 * mlen): the traceback after the message, and the file and line it points at. */
static void error_fields(const struct vm *s, const char *e, size_t mlen, struct log_fields *lf)
{
    size_t len = strlen(e);
    if (mlen < len) {   /* "\nstack traceback:\n\t..." follows the message */
        lf->traceback = e + mlen + (e[mlen] == '\n');
        lf->traceback_len = len - mlen - (e[mlen] == '\n');
    }
    if (s->err_line > 0) {
        lf->script = s->err_script;
        lf->line = s->err_line;
    }
}

/* Ends the stream with status and msg. The message travels as a C string (grpc-message):
 * a NUL byte, which a script's deny or error text may hold, is written as "\0" so that
 * nothing after it is lost. */
static void fail(struct vm *s, struct dispatch_reply *reply, int status, const char *msg,
                 size_t len)
{
    size_t at = 0;
    for (size_t i = 0; i < len && at + 3 < VM_MESSAGE_MAX; i++) {
        if (msg[i] == '\0') {
            s->message[at++] = '\\';
            s->message[at++] = '0';
        } else {
            s->message[at++] = msg[i];
        }
    }
    s->message[at] = '\0';
    reply->outcome = DISPATCH_FAIL;
    reply->status = status;
    reply->message = s->message;
}

/* Packs the n responses back to back into s->out, the last one first (pbwire writes
 * backwards), growing the buffer and starting again when they do not fit. */
static int pack(struct vm *s, const pbconv_response *resps, size_t n,
                struct dispatch_reply *reply)
{
    if (n > s->lens_cap) {
        size_t cap = s->lens_cap * 2 > n ? s->lens_cap * 2 : n < 4 ? 4 : n;
        size_t *p = realloc(s->lens, cap * sizeof *p);
        if (p == NULL)
            return -1;
        s->lens = p;
        s->lens_cap = cap;
    }
    if (s->out == NULL && (s->out = malloc(256)) != NULL)
        s->out_cap = 256;
    if (s->out == NULL)
        return -1;
    for (;;) {
        uint8_t *end = s->out + s->out_cap, *at = end;
        size_t i = n;
        while (i > 0) {
            uint8_t *first = pbwire_pack_backward(&resps[i - 1].base, s->out, at);
            if (!first)
                break;
            s->lens[--i] = (size_t)(at - first);
            at = first;
        }
        if (i == 0) {
            reply->outcome = DISPATCH_RESPOND;
            reply->data = at;
            reply->len = (size_t)(end - at);
            reply->count = n;
            reply->lens = s->lens;
            return 0;
        }
        size_t cap = s->out_cap * 2;
        if (cap < s->out_cap)
            return -1;
        uint8_t *p = realloc(s->out, cap);
        if (p == NULL)
            return -1;
        s->out = p;
        s->out_cap = cap;
    }
}

/* The held headers response of direction d, unpacked into the arena. NULL when out of
 * memory. */
static pbconv_response *unpack_held(struct dispatch_stream *st, int d)
{
    ProtobufCAllocator alloc = arena_pb_allocator(&st->vm->arena);
    return envoy__service__ext_proc__v3__processing_response__unpack(&alloc, st->held_len[d],
                                                                      st->held[d]);
}

/* Keeps resp, packed, as the held headers response of direction d. -1 when out of memory. */
static int keep_held(struct dispatch_stream *st, const pbconv_response *resp, int d)
{
    struct dispatch_reply tmp;
    if (pack(st->vm, resp, 1, &tmp) != 0)
        return -1;
    uint8_t *p = malloc(tmp.len ? tmp.len : 1);
    if (p == NULL)
        return -1;
    memcpy(p, tmp.data, tmp.len);
    free(st->held[d]);
    st->held[d] = p;
    st->held_len[d] = tmp.len;
    return 0;
}

/* Whether the body handler's remove list names key (header names compare without case). */
static bool removed_later(const Envoy__Service__ExtProc__V3__HeaderMutation *add, const char *key)
{
    for (size_t i = 0; i < add->n_remove_headers; i++)
        if (strcasecmp(add->remove_headers[i], key) == 0)
            return true;
    return false;
}

/* Adds a body handler's header changes to the held headers response h: its set and remove
 * lists after the headers handler's, and clear_route_cache. Envoy applies all removes of
 * one HeaderMutation before all its sets, so a held set of a name the body handler removes
 * is dropped here (the remove stays, for the header Envoy has): the later word wins, as it
 * would in two responses. The body handler's own sets stay (remove then add replaces).
 * -1 when out of memory. */
static int merge_held(struct arena *a, pbconv_response *h, const struct pbconv_result *res)
{
    Envoy__Service__ExtProc__V3__HeadersResponse *hr = h->request_headers; /* same union */
    if (hr == NULL)
        return -1;
    Envoy__Service__ExtProc__V3__CommonResponse *cr = hr->response;
    if (cr == NULL) {
        if ((cr = arena_alloc(a, sizeof *cr)) == NULL)
            return -1;
        envoy__service__ext_proc__v3__common_response__init(cr);
        hr->response = cr;
    }
    if (res->held_clear_route_cache)
        cr->clear_route_cache = 1;
    Envoy__Service__ExtProc__V3__HeaderMutation *add = res->held_mutation, *hm = cr->header_mutation;
    if (add == NULL)
        return 0;
    if (hm == NULL) {
        cr->header_mutation = add;
        return 0;
    }
    size_t ns = hm->n_set_headers + add->n_set_headers, nr = hm->n_remove_headers + add->n_remove_headers;
    Envoy__Config__Core__V3__HeaderValueOption **set = arena_alloc(a, (ns ? ns : 1) * sizeof *set);
    char **rm = arena_alloc(a, (nr ? nr : 1) * sizeof *rm);
    if (set == NULL || rm == NULL)
        return -1;
    size_t kept = 0;
    for (size_t i = 0; i < hm->n_set_headers; i++) {
        const Envoy__Config__Core__V3__HeaderValue *hv = hm->set_headers[i]->header;
        if (hv == NULL || hv->key == NULL || !removed_later(add, hv->key))
            set[kept++] = hm->set_headers[i];
    }
    if (add->n_set_headers)
        memcpy(set + kept, add->set_headers, add->n_set_headers * sizeof *set);
    ns = kept + add->n_set_headers;
    if (hm->n_remove_headers)
        memcpy(rm, hm->remove_headers, hm->n_remove_headers * sizeof *rm);
    if (add->n_remove_headers)
        memcpy(rm + hm->n_remove_headers, add->remove_headers, add->n_remove_headers * sizeof *rm);
    hm->set_headers = set;
    hm->n_set_headers = ns;
    hm->remove_headers = rm;
    hm->n_remove_headers = nr;
    return 0;
}

/* Sends (or holds) a handler's answer. Held responses are kept per direction: a headers
 * answer to hold is kept (and one held before it in that direction, which a well-behaved
 * Envoy never leaves, is sent); while one is held, the same direction's body handler's
 * header changes join it, and the first answer of that direction that sends anything
 * sends it first, in the same reply. The other direction's answers are sent as they are.
 * An immediate response replaces both. -1 when out of memory. */
static int respond(struct dispatch_stream *st, struct call *c, struct dispatch_reply *reply)
{
    struct vm *s = st->vm;
    bool headers = c->phase == PBCONV_REQUEST_HEADERS || c->phase == PBCONV_RESPONSE_HEADERS;
    int d = dir_of(c->phase);
    /* A headers answer's mode_override: whether Envoy follows it depends on its
     * allow_mode_override, which the server cannot see (it never does with
     * send_body_without_waiting_for_header_response). For content-length the server takes
     * either mode as buffered: a length Envoy does not need is ignored, a missing one is a
     * local 500. */
    if (headers && c->n > 0 && c->resps[0].mode_override != NULL && !st->send_body_early &&
        c->res.answer != PBCONV_ANSWER_IMMEDIATE) {
        if (c->phase == PBCONV_REQUEST_HEADERS)
            st->override_mode[0] = (int)c->resps[0].mode_override->request_body_mode;
        st->override_mode[1] = (int)c->resps[0].mode_override->response_body_mode;
    }
    if (c->res.answer == PBCONV_ANSWER_IMMEDIATE) {
        drop_held(st, 0);
        drop_held(st, 1);
    }
    pbconv_response *held = NULL;
    if (st->held[d] != NULL) {
        if ((held = unpack_held(st, d)) == NULL)
            return -1;
        if (!headers && merge_held(&s->arena, held, &c->res) != 0)
            return -1;
    }
    if (c->hold) {
        if (keep_held(st, c->resps, d) != 0)
            return -1;
        st->ever_held = true;
        if (held != NULL)   /* the earlier one goes now */
            return pack(s, held, 1, reply);
        reply->outcome = DISPATCH_NO_RESPONSE;
        return 0;
    }
    if (c->n == 0) {   /* a FULL_DUPLEX_STREAMED chunk held back */
        if (held != NULL && (c->res.held_mutation != NULL || c->res.held_clear_route_cache) &&
            keep_held(st, held, d) != 0)
            return -1;
        reply->outcome = DISPATCH_NO_RESPONSE;
        return 0;
    }
    if (held == NULL)
        return pack(s, c->resps, c->n, reply);
    pbconv_response *all = arena_alloc(&s->arena, (c->n + 1) * sizeof *all);
    if (all == NULL)
        return -1;
    all[0] = *held;
    memcpy(all + 1, c->resps, c->n * sizeof *all);
    if (pack(s, all, c->n + 1, reply) != 0)
        return -1;
    drop_held(st, d);
    if (c->phase == PBCONV_REQUEST_BODY || c->phase == PBCONV_RESPONSE_BODY)
        st->went[d] = st->chunks[d] ? st->chunks[d] : 1;   /* later chunks: too late */
    return 0;
}

/* The number of headers or trailers a request carries (0 for a body). */
static size_t header_count(const pbconv_request *req)
{
    const Envoy__Config__Core__V3__HeaderMap *m = NULL;
    switch (req->request_case) {
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_REQUEST_HEADERS:
        m = req->request_headers->headers;
        break;
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_RESPONSE_HEADERS:
        m = req->response_headers->headers;
        break;
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_REQUEST_TRAILERS:
        m = req->request_trailers->trailers;
        break;
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_RESPONSE_TRAILERS:
        m = req->response_trailers->trailers;
        break;
    default:
        break;
    }
    return m ? m->n_headers : 0;
}

/* Decodes msg within the limits. NULL after fail() when it cannot or must not be. */
static pbconv_request *decode(struct dispatch_stream *st, const uint8_t *msg, size_t len,
                              struct dispatch_reply *reply)
{
    struct vm *s = st->vm;
    const struct vm_limits *lim = vm_get_limits();
    char m[VM_MESSAGE_MAX];
    /* the common messages (a phase, end_of_stream) need no recursion and no scan */
    pbconv_request *req = pbwire_unpack_request(msg, len, &s->arena);
    if (req == NULL) {   /* attributes, metadata, protocol_config ... or malformed */
        static const uint32_t ctx_fields[] = {8, 9, 0};  /* metadata_context, attributes */
        struct wirecheck_result scan;
        char where[600];
        if (wirecheck_depth(msg, len, &envoy__service__ext_proc__v3__processing_request__descriptor,
                            ctx_fields, &scan, where, sizeof where) != 0) {
            snprintf(m, sizeof m, "ProcessingRequest.%s", where);
            log_limited_fields_at(LOG_WARN, (&(struct log_fields){.stream_id = st->id}),
                                  "refused: %s", m);
            fail(s, reply, GRPC_STATUS_INVALID_ARGUMENT, m, strlen(m));
            return NULL;
        }
        if (lim->max_ctx_bytes && scan.ctx_bytes > lim->max_ctx_bytes - st->ctx_bytes) {
            snprintf(m, sizeof m, "attributes and metadata_context of this stream exceed "
                     "%zu KiB (--max_ctx_kb)", lim->max_ctx_bytes >> 10);
            log_limited_fields_at(LOG_WARN, (&(struct log_fields){.stream_id = st->id}),
                                  "refused: %s", m);
            fail(s, reply, GRPC_STATUS_RESOURCE_EXHAUSTED, m, strlen(m));
            return NULL;
        }
        st->ctx_bytes += scan.ctx_bytes;
        ProtobufCAllocator alloc = arena_pb_allocator(&s->arena);
        req = envoy__service__ext_proc__v3__processing_request__unpack(&alloc, len, msg);
        if (req == NULL) {
            log_limited_fields_at(LOG_WARN, (&(struct log_fields){.stream_id = st->id}),
                                  "malformed ProcessingRequest (%zu bytes)", len);
            static const char mal[] = "malformed ProcessingRequest";
            fail(s, reply, GRPC_STATUS_INVALID_ARGUMENT, mal, sizeof mal - 1);
            return NULL;
        }
    }
    size_t nh = header_count(req);
    if (lim->max_headers && nh > lim->max_headers) {
        snprintf(m, sizeof m, "the message carries %zu headers, more than %zu (--max_headers)",
                 nh, lim->max_headers);
        log_limited_fields_at(LOG_WARN, (&(struct log_fields){.stream_id = st->id}),
                              "refused: %s", m);
        fail(s, reply, GRPC_STATUS_RESOURCE_EXHAUSTED, m, strlen(m));
        return NULL;
    }
    return req;
}

void dispatch_handle(struct dispatch_stream *st, const uint8_t *msg, size_t len,
                     struct dispatch_reply *reply)
{
    struct vm *s = st->vm;
    lua_State *L = s->L;
    int top = lua_gettop(L);
    memset(reply, 0, sizeof *reply);
    if (s->out_cap > OUT_KEEP_BYTES) {   /* the last answer was large: give it back */
        free(s->out);
        s->out = NULL;
        s->out_cap = 0;
    }

    enum pbconv_phase phase;
    /* for metrics_message: refused before a handler ran, unless set below */
    int metrics_phase = METRICS_PHASE_UNKNOWN;
    enum metrics_outcome outcome = METRICS_REFUSED;
    bool ran = false;
    pbconv_request *req = decode(st, msg, len, reply);
    if (req == NULL)
        goto done;
    if (pbconv_phase_of(req, &phase) != 0) {
        log_limited_fields_at(LOG_WARN, (&(struct log_fields){.stream_id = st->id}),
                              "ProcessingRequest with no phase set");
        static const char m[] = "ProcessingRequest carries no headers, body or trailers";
        fail(s, reply, GRPC_STATUS_INVALID_ARGUMENT, m, sizeof m - 1);
        goto done;
    }
    /* Envoy sends protocol_config with the first message; the body modes never change on
     * a stream (mode_override cannot switch into or out of FULL_DUPLEX_STREAMED) */
    if (req->protocol_config != NULL && !st->have_config) {
        st->have_config = true;
        st->body_mode[0] = (int)req->protocol_config->request_body_mode;
        st->body_mode[1] = (int)req->protocol_config->response_body_mode;
        st->send_body_early = req->protocol_config->send_body_without_waiting_for_header_response;
        st->full_duplex[0] = pbconv_full_duplex(req->protocol_config, PBCONV_REQUEST_BODY);
        st->full_duplex[1] = pbconv_full_duplex(req->protocol_config, PBCONV_RESPONSE_BODY);
        st->grpc[0] = pbconv_grpc_mode(req->protocol_config, PBCONV_REQUEST_BODY);
        st->grpc[1] = pbconv_grpc_mode(req->protocol_config, PBCONV_RESPONSE_BODY);
    }

    if (phase == PBCONV_REQUEST_BODY || phase == PBCONV_RESPONSE_BODY)
        st->chunks[dir_of(phase)]++;
    struct call c = {.st = st, .req = req, .phase = phase, .handler = pbconv_handler_name(phase)};
    lua_pushcfunction(L, run_handler);
    lua_pushlightuserdata(L, &c);
    metrics_phase = (int)phase;
    if (s->activity)   /* for the watchdog's count, published by vm_call's store of since_ns */
        atomic_store_explicit(&s->activity->phase, (int)phase, memory_order_relaxed);
    s->current_phase = pbconv_phase_name(phase);   /* for callout.log */
    int status = vm_call(s, 1, 1, st->id, s->where[s->has_process ? PBCONV_PHASE_COUNT : phase]);
    s->current_phase = NULL;
    if (status == LUA_OK && c.status == PBCONV_OK) {
        if (c.res.request_drain)
            st->drained = true;
        st->local_reply = c.res.local_reply_open;
        if (c.res.wait_for_body && req->observability_mode)
            st->obs_wait[dir_of(phase)] = true;
    }
    bool observe = req->observability_mode;
    ran = true;
    /* what a handler's answer does; the failures below say otherwise */
    static const enum metrics_outcome answered[] = {
        [PBCONV_ANSWER_CONTINUE] = METRICS_CONTINUE,
        [PBCONV_ANSWER_MUTATE] = METRICS_MUTATE,
        [PBCONV_ANSWER_IMMEDIATE] = METRICS_IMMEDIATE,
    };
    outcome = c.status == PBCONV_DENY ? METRICS_DENY : answered[c.res.answer];
    struct log_fields lf = {.stream_id = st->id, .phase = pbconv_phase_name(phase)};
    if (status != LUA_OK && (s->timed_out || s->mem_exceeded)) {
        /* A budget stopped the handler: say which, and where (the hook's error carries the
         * script line it stopped at; a memory error has none, so name the handler's). */
        char m[VM_MESSAGE_MAX];
        size_t mlen;
        const char *e = vm_error(s, &mlen);
        int code = s->timed_out ? GRPC_STATUS_DEADLINE_EXCEEDED : GRPC_STATUS_RESOURCE_EXHAUSTED;
        outcome = s->timed_out ? METRICS_TIMEOUT : METRICS_MEMORY;
        if (s->timed_out)
            snprintf(m, sizeof m, "%.*s", (int)mlen, e);
        else
            snprintf(m, sizeof m, "%s exceeded the script memory limit (%zu MB)",
                     s->where[s->has_process ? PBCONV_PHASE_COUNT : phase],
                     vm_get_limits()->memory_bytes >> 20);
        if (s->timed_out)
            error_fields(s, e, mlen, &lf);
        log_script_text(LOG_ERROR, &lf, c.handler, "stopped", s->timed_out ? e : m,
                        s->timed_out ? mlen : strlen(m));
        if (!observe)
            fail(s, reply, code, m, strlen(m));
    } else if (status != LUA_OK) {
        size_t mlen;
        const char *e = vm_error(s, &mlen);
        outcome = s->denied ? METRICS_DENY : METRICS_LUA_ERROR;
        if (s->denied) {
            log_script_text(LOG_WARN, &lf, c.handler, "denied the request", e, mlen);
            if (!observe)
                fail(s, reply, GRPC_STATUS_PERMISSION_DENIED, e, mlen);
        } else {
            error_fields(s, e, mlen, &lf);
            log_script_text(LOG_ERROR, &lf, c.handler, "failed", e, mlen);
            if (!observe)
                fail(s, reply, GRPC_STATUS_INTERNAL, e, mlen);
        }
    } else if (c.status == PBCONV_BAD) {
        outcome = METRICS_BAD_RETURN;
        if (c.line > 0) {
            lf.script = c.script;
            lf.line = c.line;
        }
        log_with(LOG_ERROR, &lf, "%s", c.err);
        if (!observe)
            fail(s, reply, GRPC_STATUS_INTERNAL, c.err, strlen(c.err));
    } else if (c.status == PBCONV_NOMEM) {
        outcome = METRICS_MEMORY;
        log_with(LOG_ERROR, &lf, "out of memory building the response");
        if (!observe)
            fail(s, reply, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory", strlen("out of memory"));
    } else if (observe) {
        /* Envoy does not wait for an answer in observability mode */
    } else if (c.status == PBCONV_DENY) {
        log_script_text(LOG_WARN, &lf, c.handler, "denied the request", c.res.deny_message,
                        c.res.deny_len);
        fail(s, reply, GRPC_STATUS_PERMISSION_DENIED, c.res.deny_message, c.res.deny_len);
    } else if (respond(st, &c, reply) != 0) {
        outcome = METRICS_MEMORY;
        log_with(LOG_ERROR, &lf, "out of memory packing the response");
        fail(s, reply, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory", strlen("out of memory"));
    }
    if (observe)
        reply->outcome = DISPATCH_NO_RESPONSE;
    if (reply->outcome == DISPATCH_FAIL) {
        drop_held(st, 0);
        drop_held(st, 1);
    }
    lua_pop(L, 1);  /* the handler's result, or the error */

done:
    assert(lua_gettop(L) == top);
    (void)top;
    arena_reset(&s->arena);
    if (len >= COLLECT_AFTER_BYTES)
        lua_gc(L, LUA_GCCOLLECT);
    metrics_message(metrics_phase, outcome, s->call_ns, ran);
    atomic_store_explicit(&metrics->lua_memory_bytes, s->mem_used, memory_order_relaxed);
}
