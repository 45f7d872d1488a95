/* pbconv.c — protobuf-c ext_proc messages <-> Lua values (the contract is docs/lua-api.md).
 *
 * Inbound, each header becomes a {name, value} pair in a table that shares one metatable
 * with C lookup methods. Outbound, the handler's return table is validated strictly
 * (unknown key, wrong type, bad combination: an error naming the key) and turned into a
 * ProcessingResponse whose structs live in the caller's arena and whose strings point into
 * the Lua strings themselves, so building a reply copies nothing but numbers. */
#include "pbconv.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>

#include "checks.h"
#include "pbstruct.h"

typedef Envoy__Config__Core__V3__HeaderValue HeaderValue;
typedef Envoy__Config__Core__V3__HeaderValueOption HeaderValueOption;
typedef Envoy__Config__Core__V3__HeaderMap HeaderMap;
typedef Envoy__Service__ExtProc__V3__HttpHeaders HttpHeaders;
typedef Envoy__Service__ExtProc__V3__HttpBody HttpBody;
typedef Envoy__Service__ExtProc__V3__HttpTrailers HttpTrailers;
typedef Envoy__Service__ExtProc__V3__HeadersResponse HeadersResponse;
typedef Envoy__Service__ExtProc__V3__BodyResponse BodyResponse;
typedef Envoy__Service__ExtProc__V3__TrailersResponse TrailersResponse;
typedef Envoy__Service__ExtProc__V3__CommonResponse CommonResponse;
typedef Envoy__Service__ExtProc__V3__HeaderMutation HeaderMutation;
typedef Envoy__Service__ExtProc__V3__BodyMutation BodyMutation;
typedef Envoy__Service__ExtProc__V3__ImmediateResponse ImmediateResponse;
typedef Envoy__Service__ExtProc__V3__GrpcStatus GrpcStatus;
typedef Envoy__Type__V3__HttpStatus HttpStatus;
typedef Envoy__Service__ExtProc__V3__StreamedBodyResponse StreamedBodyResponse;
typedef Envoy__Service__ExtProc__V3__StreamedImmediateResponse StreamedImmediateResponse;
typedef Envoy__Extensions__Filters__Http__ExtProc__V3__ProcessingMode ProcessingMode;

#define RESP(x) ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_##x
#define REQ(x) ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_##x
#define PROCESSING_MODE(x) \
    ENVOY__EXTENSIONS__FILTERS__HTTP__EXT_PROC__V3__PROCESSING_MODE__BODY_SEND_MODE__##x

/* ---- phases --------------------------------------------------------------------------- */

enum kind { KIND_HEADERS = 1, KIND_BODY = 2, KIND_TRAILERS = 4 };
#define KIND_ALL (KIND_HEADERS | KIND_BODY | KIND_TRAILERS)

static const struct {
    const char *name, *handler;
    enum kind kind;
} phases[PBCONV_PHASE_COUNT] = {
    [PBCONV_REQUEST_HEADERS] = {"request_headers", "on_request_headers", KIND_HEADERS},
    [PBCONV_RESPONSE_HEADERS] = {"response_headers", "on_response_headers", KIND_HEADERS},
    [PBCONV_REQUEST_BODY] = {"request_body", "on_request_body", KIND_BODY},
    [PBCONV_RESPONSE_BODY] = {"response_body", "on_response_body", KIND_BODY},
    [PBCONV_REQUEST_TRAILERS] = {"request_trailers", "on_request_trailers", KIND_TRAILERS},
    [PBCONV_RESPONSE_TRAILERS] = {"response_trailers", "on_response_trailers", KIND_TRAILERS},
};

const char *pbconv_phase_name(enum pbconv_phase phase) { return phases[phase].name; }

const char *pbconv_handler_name(enum pbconv_phase phase) { return phases[phase].handler; }

int pbconv_phase_of(const pbconv_request *req, enum pbconv_phase *phase)
{
    switch (req->request_case) {
    case REQ(REQUEST_HEADERS): *phase = PBCONV_REQUEST_HEADERS; return 0;
    case REQ(RESPONSE_HEADERS): *phase = PBCONV_RESPONSE_HEADERS; return 0;
    case REQ(REQUEST_BODY): *phase = PBCONV_REQUEST_BODY; return 0;
    case REQ(RESPONSE_BODY): *phase = PBCONV_RESPONSE_BODY; return 0;
    case REQ(REQUEST_TRAILERS): *phase = PBCONV_REQUEST_TRAILERS; return 0;
    case REQ(RESPONSE_TRAILERS): *phase = PBCONV_RESPONSE_TRAILERS; return 0;
    default: return -1;
    }
}

/* ---- inputs: the headers object ------------------------------------------------------- */

/* Its address is the registry key of the shared headers metatable (no string hashing). */
static const char headers_mt_key = 0;

static unsigned char lower(unsigned char c) { return c >= 'A' && c <= 'Z' ? c + ('a' - 'A') : c; }

static bool name_eq(const char *a, size_t an, const char *b, size_t bn)
{
    if (an != bn)
        return false;
    for (size_t i = 0; i < an; i++)
        if (lower((unsigned char)a[i]) != lower((unsigned char)b[i]))
            return false;
    return true;
}

/* The headers object is a read-only userdata holding one copy of the header bytes (names
 * lower-cased), so a message costs one allocation whatever its header count, and nothing
 * more unless the script looks: get/get_all/has scan the copy in C and push only what they
 * return; headers[i] builds its {name, value} pair on demand. */
struct headers {
    uint32_t n;
    int8_t end_of_stream;       /* -1: no such field (trailers) */
    uint32_t off[];             /* name i: [off[2i], off[2i+1]), value i: up to off[2i+2] */
    /* then the bytes */
};

static const char *headers_bytes(const struct headers *h)
{
    return (const char *)&h->off[2 * h->n + 1];
}

static struct headers *check_headers(lua_State *L)
{
    return luaL_checkudata(L, 1, "luacallout.headers");
}

/* Index of the next header after `from` named `name` (any case), or n. */
static uint32_t find_header(const struct headers *h, uint32_t from, const char *name,
                            size_t nlen)
{
    const char *b = headers_bytes(h);
    for (uint32_t i = from; i < h->n; i++)
        if (name_eq(b + h->off[2 * i], h->off[2 * i + 1] - h->off[2 * i], name, nlen))
            return i;
    return h->n;
}

static void push_value(lua_State *L, const struct headers *h, uint32_t i)
{
    lua_pushlstring(L, headers_bytes(h) + h->off[2 * i + 1], h->off[2 * i + 2] - h->off[2 * i + 1]);
}

/* headers:get(name) -> first value or nil */
static int headers_get(lua_State *L)
{
    const struct headers *h = check_headers(L);
    size_t nlen;
    const char *name = luaL_checklstring(L, 2, &nlen);
    uint32_t i = find_header(h, 0, name, nlen);
    if (i < h->n)
        push_value(L, h, i);
    else
        lua_pushnil(L);
    return 1;
}

/* headers:get_all(name) -> list of values, possibly empty */
static int headers_get_all(lua_State *L)
{
    const struct headers *h = check_headers(L);
    size_t nlen;
    const char *name = luaL_checklstring(L, 2, &nlen);
    lua_newtable(L);
    lua_Integer k = 0;
    for (uint32_t i = find_header(h, 0, name, nlen); i < h->n; i = find_header(h, i + 1, name, nlen)) {
        push_value(L, h, i);
        lua_rawseti(L, -2, ++k);
    }
    return 1;
}

/* headers:has(name [, value]) -> boolean; the value, when given, must match exactly */
static int headers_has(lua_State *L)
{
    const struct headers *h = check_headers(L);
    size_t nlen, vlen = 0;
    const char *name = luaL_checklstring(L, 2, &nlen);
    const char *want = lua_isnoneornil(L, 3) ? NULL : luaL_checklstring(L, 3, &vlen);
    const char *b = headers_bytes(h);
    for (uint32_t i = find_header(h, 0, name, nlen); i < h->n; i = find_header(h, i + 1, name, nlen)) {
        size_t len = h->off[2 * i + 2] - h->off[2 * i + 1];
        if (want == NULL || (len == vlen && memcmp(b + h->off[2 * i + 1], want, len) == 0)) {
            lua_pushboolean(L, 1);
            return 1;
        }
    }
    lua_pushboolean(L, 0);
    return 1;
}

/* headers[i] -> {name, value}; headers.end_of_stream; headers:method */
static int headers_index(lua_State *L)
{
    const struct headers *h = check_headers(L);
    if (lua_type(L, 2) == LUA_TNUMBER) {
        lua_Integer i = lua_tointeger(L, 2);
        if (i < 1 || (lua_Unsigned)i > h->n || !lua_isinteger(L, 2)) {
            lua_pushnil(L);
            return 1;
        }
        uint32_t k = (uint32_t)i - 1;
        lua_createtable(L, 2, 0);
        lua_pushlstring(L, headers_bytes(h) + h->off[2 * k], h->off[2 * k + 1] - h->off[2 * k]);
        lua_rawseti(L, -2, 1);
        push_value(L, h, k);
        lua_rawseti(L, -2, 2);
        return 1;
    }
    size_t len;
    const char *key = lua_tolstring(L, 2, &len);
    if (key != NULL && len == 13 && memcmp(key, "end_of_stream", 13) == 0) {
        if (h->end_of_stream < 0)
            lua_pushnil(L);
        else
            lua_pushboolean(L, h->end_of_stream);
        return 1;
    }
    lua_pushvalue(L, 2);
    lua_rawget(L, lua_upvalueindex(1));   /* the methods */
    return 1;
}

static int headers_len(lua_State *L)
{
    lua_pushinteger(L, check_headers(L)->n);
    return 1;
}

/* pairs(headers): the entries 1..n, then end_of_stream when the message has one. */
static int headers_next(lua_State *L)
{
    const struct headers *h = check_headers(L);
    lua_Integer i = lua_isnil(L, 2) ? 0 : lua_isinteger(L, 2) ? lua_tointeger(L, 2) : -1;
    if (i >= 0 && (lua_Unsigned)i < h->n) {
        lua_pushinteger(L, i + 1);
        lua_pushinteger(L, i + 1);
        lua_gettable(L, 1);
        return 2;
    }
    if (i >= 0 && h->end_of_stream >= 0) {
        lua_pushliteral(L, "end_of_stream");
        lua_pushboolean(L, h->end_of_stream);
        return 2;
    }
    lua_pushnil(L);
    return 1;
}

static int headers_pairs(lua_State *L)
{
    check_headers(L);
    lua_pushcfunction(L, headers_next);
    lua_pushvalue(L, 1);
    lua_pushnil(L);
    return 3;
}

static int headers_tostring(lua_State *L)
{
    lua_pushfstring(L, "headers (%d)", (int)check_headers(L)->n);
    return 1;
}

void pbconv_open(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"get", headers_get}, {"get_all", headers_get_all}, {"has", headers_has}, {NULL, NULL}};
    static const luaL_Reg meta[] = {{"__len", headers_len}, {"__pairs", headers_pairs},
                                    {"__tostring", headers_tostring}, {NULL, NULL}};
    luaL_newmetatable(L, "luacallout.headers");
    luaL_setfuncs(L, meta, 0);
    luaL_newlib(L, methods);
    lua_pushcclosure(L, headers_index, 1);
    lua_setfield(L, -2, "__index");
    lua_pushliteral(L, "read-only");
    lua_setfield(L, -2, "__metatable");
    lua_rawsetp(L, LUA_REGISTRYINDEX, &headers_mt_key);
}

void pbconv_push_headers(lua_State *L, const HeaderMap *map, int end_of_stream)
{
    size_t n = map != NULL ? map->n_headers : 0;
    if (n > UINT32_MAX / 2 - 1)
        luaL_error(L, "too many headers");
    /* one pass to size the copy, one to fill it */
    size_t bytes = 0;
    for (size_t i = 0; i < n; i++) {
        const HeaderValue *hv = map->headers[i];
        bytes += hv->key != NULL ? strlen(hv->key) : 0;
        /* raw_value is what current Envoys send; value is the pre-raw_value field */
        bytes += hv->raw_value.len > 0 ? hv->raw_value.len
                 : hv->value != NULL   ? strlen(hv->value) : 0;
    }
    if (bytes > UINT32_MAX)
        luaL_error(L, "headers too large");
    size_t head = sizeof(struct headers) + (2 * n + 1) * sizeof(uint32_t);
    struct headers *h = lua_newuserdatauv(L, head + bytes, 0);
    h->n = (uint32_t)n;
    h->end_of_stream = (int8_t)(end_of_stream < 0 ? -1 : end_of_stream != 0);
    char *b = (char *)h + head;
    uint32_t at = 0;
    for (size_t i = 0; i < n; i++) {
        const HeaderValue *hv = map->headers[i];
        const char *key = hv->key != NULL ? hv->key : "";
        h->off[2 * i] = at;
        for (; *key; key++)
            b[at++] = (char)lower((unsigned char)*key);   /* Envoy sends lower case already */
        h->off[2 * i + 1] = at;
        const char *v = hv->raw_value.len > 0 ? (const char *)hv->raw_value.data : hv->value;
        size_t vlen = hv->raw_value.len > 0 ? hv->raw_value.len : v != NULL ? strlen(v) : 0;
        if (vlen)
            memcpy(b + at, v, vlen);
        at += (uint32_t)vlen;
    }
    h->off[2 * n] = at;
    lua_rawgetp(L, LUA_REGISTRYINDEX, &headers_mt_key);
    lua_setmetatable(L, -2);
}

void pbconv_push_body(lua_State *L, const HttpBody *body)
{
    lua_createtable(L, 0, 2);
    if (body != NULL && body->body.len > 0)
        lua_pushlstring(L, (const char *)body->body.data, body->body.len);
    else
        lua_pushliteral(L, "");
    lua_setfield(L, -2, "body");
    lua_pushboolean(L, body != NULL && body->end_of_stream);
    lua_setfield(L, -2, "end_of_stream");
    /* GRPC body mode's flags, only when set: nil reads as false, and the body of every
     * other mode is not made to carry two fields it never uses */
    if (body != NULL && body->end_of_stream_without_message) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "end_of_stream_without_message");
    }
    if (body != NULL && body->grpc_message_compressed) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "grpc_message_compressed");
    }
}

void pbconv_push_input(lua_State *L, const pbconv_request *req, enum pbconv_phase phase)
{
    const HttpHeaders *h = NULL;
    const HttpTrailers *t = NULL;
    switch (phase) {
    case PBCONV_REQUEST_HEADERS:
    case PBCONV_RESPONSE_HEADERS:
        h = phase == PBCONV_REQUEST_HEADERS ? req->request_headers : req->response_headers;
        pbconv_push_headers(L, h != NULL ? h->headers : NULL, h != NULL && h->end_of_stream);
        break;
    case PBCONV_REQUEST_BODY:
        pbconv_push_body(L, req->request_body);
        break;
    case PBCONV_RESPONSE_BODY:
        pbconv_push_body(L, req->response_body);
        break;
    case PBCONV_REQUEST_TRAILERS:
    case PBCONV_RESPONSE_TRAILERS:
        t = phase == PBCONV_REQUEST_TRAILERS ? req->request_trailers : req->response_trailers;
        pbconv_push_headers(L, t != NULL ? t->trailers : NULL, -1);
        break;
    default:
        lua_pushnil(L);
        break;
    }
}


/* ---- inputs: what ctx learns from each message ---------------------------------------- */

/* Merges the Struct `st` into tbl[key] key by key (a later message's value for a key wins),
 * or stores it as tbl[key] when that is not a table yet.
 * stack before/after: unchanged (tbl is an absolute index). */
static void merge_namespace(lua_State *L, int tbl, const char *key,
                            const Google__Protobuf__Struct *st)
{
    luaL_checkstack(L, 4, "merging ctx tables");
    lua_pushstring(L, key);
    if (lua_rawget(L, tbl) != LUA_TTABLE) {
        lua_pop(L, 1);
        lua_pushstring(L, key);
        pbstruct_push(L, st);
        lua_rawset(L, tbl);
        return;
    }
    size_t n = st != NULL ? st->n_fields : 0;
    for (size_t i = 0; i < n; i++) {
        const Google__Protobuf__Struct__FieldsEntry *fe = st->fields[i];
        lua_pushstring(L, fe->key != NULL ? fe->key : "");
        pbstruct_push_value(L, fe->value);
        lua_rawset(L, -3);
    }
    lua_pop(L, 1);
}

/* Pushes ctx[name] when it is a table, else makes a new empty one ctx[name] and pushes
 * that (a script may have replaced or cleared it). stack: ... -> ... table */
static void ctx_table(lua_State *L, int ctx, const char *name)
{
    lua_pushstring(L, name);
    if (lua_rawget(L, ctx) == LUA_TTABLE)
        return;
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushstring(L, name);
    lua_pushvalue(L, -2);
    lua_rawset(L, ctx);
}

static void push_body_mode(lua_State *L, int mode)
{
    const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value(
        &envoy__extensions__filters__http__ext_proc__v3__processing_mode__body_send_mode__descriptor,
        mode);
    if (v != NULL)
        lua_pushstring(L, v->name);
    else
        lua_pushinteger(L, mode);  /* a mode newer than our protos */
}

void pbconv_update_ctx(lua_State *L, int ctx, const pbconv_request *req)
{
    const Envoy__Config__Core__V3__Metadata *md = req->metadata_context;
    if (req->n_attributes == 0 && (md == NULL || md->n_filter_metadata == 0) &&
        req->protocol_config == NULL)
        return;  /* the common case: nothing to build */
    ctx = lua_absindex(L, ctx);
    luaL_checkstack(L, 8, "updating ctx");
    if (req->n_attributes > 0) {
        ctx_table(L, ctx, "attributes");
        int t = lua_gettop(L);
        for (size_t i = 0; i < req->n_attributes; i++)
            merge_namespace(L, t, req->attributes[i]->key != NULL ? req->attributes[i]->key : "",
                            req->attributes[i]->value);
        lua_pop(L, 1);
    }
    if (md != NULL && md->n_filter_metadata > 0) {
        ctx_table(L, ctx, "metadata");
        int t = lua_gettop(L);
        for (size_t i = 0; i < md->n_filter_metadata; i++)
            merge_namespace(L, t, md->filter_metadata[i]->key != NULL ? md->filter_metadata[i]->key : "",
                            md->filter_metadata[i]->value);
        lua_pop(L, 1);
    }
    if (req->protocol_config != NULL) {
        lua_pushliteral(L, "protocol_config");
        if (lua_rawget(L, ctx) == LUA_TNIL) {
            const Envoy__Service__ExtProc__V3__ProtocolConfiguration *pc = req->protocol_config;
            lua_createtable(L, 0, 3);
            push_body_mode(L, pc->request_body_mode);
            lua_setfield(L, -2, "request_body_mode");
            push_body_mode(L, pc->response_body_mode);
            lua_setfield(L, -2, "response_body_mode");
            lua_pushboolean(L, pc->send_body_without_waiting_for_header_response);
            lua_setfield(L, -2, "send_body_without_waiting_for_header_response");
            lua_pushliteral(L, "protocol_config");
            lua_pushvalue(L, -2);
            lua_rawset(L, ctx);
            lua_pop(L, 1);
        }
        lua_pop(L, 1);
    }
}

bool pbconv_full_duplex(const Envoy__Service__ExtProc__V3__ProtocolConfiguration *pc,
                        enum pbconv_phase phase)
{
    if (pc == NULL || (phase != PBCONV_REQUEST_BODY && phase != PBCONV_RESPONSE_BODY))
        return false;
    int mode = phase == PBCONV_REQUEST_BODY ? (int)pc->request_body_mode : (int)pc->response_body_mode;
    return mode == PROCESSING_MODE(FULL_DUPLEX_STREAMED) || mode == PROCESSING_MODE(GRPC);
}

bool pbconv_grpc_mode(const Envoy__Service__ExtProc__V3__ProtocolConfiguration *pc,
                      enum pbconv_phase phase)
{
    if (pc == NULL || (phase != PBCONV_REQUEST_BODY && phase != PBCONV_RESPONSE_BODY))
        return false;
    int mode = phase == PBCONV_REQUEST_BODY ? (int)pc->request_body_mode : (int)pc->response_body_mode;
    return mode == PROCESSING_MODE(GRPC);
}

/* ---- outputs: the response ------------------------------------------------------------ */

/* Sets resp's oneof to the phase's own response type. cr (headers and body phases) and
 * thm (trailers phases) may be NULL: an empty submessage still says "continue". */
static int set_phase(pbconv_response *resp, enum pbconv_phase phase, CommonResponse *cr,
                     HeaderMutation *thm, struct arena *a)
{
    switch (phases[phase].kind) {
    case KIND_HEADERS: {
        HeadersResponse *h = arena_alloc(a, sizeof *h);
        if (h == NULL)
            return -1;
        envoy__service__ext_proc__v3__headers_response__init(h);
        h->response = cr;
        if (phase == PBCONV_REQUEST_HEADERS) {
            resp->response_case = RESP(REQUEST_HEADERS);
            resp->request_headers = h;
        } else {
            resp->response_case = RESP(RESPONSE_HEADERS);
            resp->response_headers = h;
        }
        return 0;
    }
    case KIND_BODY: {
        BodyResponse *b = arena_alloc(a, sizeof *b);
        if (b == NULL)
            return -1;
        envoy__service__ext_proc__v3__body_response__init(b);
        b->response = cr;
        if (phase == PBCONV_REQUEST_BODY) {
            resp->response_case = RESP(REQUEST_BODY);
            resp->request_body = b;
        } else {
            resp->response_case = RESP(RESPONSE_BODY);
            resp->response_body = b;
        }
        return 0;
    }
    case KIND_TRAILERS: {
        TrailersResponse *t = arena_alloc(a, sizeof *t);
        if (t == NULL)
            return -1;
        envoy__service__ext_proc__v3__trailers_response__init(t);
        t->header_mutation = thm;
        if (phase == PBCONV_REQUEST_TRAILERS) {
            resp->response_case = RESP(REQUEST_TRAILERS);
            resp->request_trailers = t;
        } else {
            resp->response_case = RESP(RESPONSE_TRAILERS);
            resp->response_trailers = t;
        }
        return 0;
    }
    }
    return -1;
}

int pbconv_empty_response(pbconv_response *resp, enum pbconv_phase phase, struct arena *a)
{
    envoy__service__ext_proc__v3__processing_response__init(resp);
    return set_phase(resp, phase, NULL, NULL, a);
}

/* State of one conversion; errors are written to err and reported by returning -1. */
struct conv {
    lua_State *L;
    struct arena *a;
    enum pbconv_phase phase;
    const struct pbconv_in *in;
    struct checks_err e;   /* "on_x returned a bad table: " and the message */
    bool nomem;
    struct pbconv_result *res;
    Google__Protobuf__BoolValue *append_true;  /* shared by every APPEND_IF_EXISTS_OR_ADD entry */
};

#define bad(c, ...) checks_fail(&(c)->e, __VA_ARGS__)

static int nomem(struct conv *c)
{
    c->nomem = true;
    snprintf(c->e.buf, c->e.size, "out of memory");
    return -1;
}

/* Moves the value of each known key of the table at t into stack slot slot+i (i = its
 * index in names; the caller has reserved the slots, filled with nil). Any other key is
 * an error. stack before/after: unchanged apart from the slots. */
static int scan_keys(struct conv *c, int t, const char *const *names, int n, int slot,
                     const char *prefix)
{
    lua_State *L = c->L;
    lua_pushnil(L);
    while (lua_next(L, t) != 0) {
        int i = n;
        if (lua_type(L, -2) == LUA_TSTRING) {
            size_t klen;
            const char *k = lua_tolstring(L, -2, &klen);
            for (i = 0; i < n; i++)
                if (strlen(names[i]) == klen && memcmp(names[i], k, klen) == 0)
                    break;
        }
        if (i == n) {
            char kb[128], hint[160];
            checks_describe_key(L, -2, prefix, kb, sizeof kb);
            struct checks_near near;
            checks_near_init_lua(&near, L, -2);
            for (int j = 0; j < n; j++)
                checks_near_offer(&near, names[j]);
            checks_did_you_mean(checks_near_best(&near), prefix, hint, sizeof hint);
            return bad(c, "unknown key %s%s", kb, hint);
        }
        lua_replace(L, slot + i);
    }
    return 0;
}

/* Checks a header name at idx and points *out at it: a name Envoy's ext_proc would refuse
 * fails its whole mutation, so it is refused here, naming the entry. `what` names the key. */
static int header_name(struct conv *c, int idx, const char *what, size_t entry, char **out)
{
    lua_State *L = c->L;
    if (lua_type(L, idx) != LUA_TSTRING)
        return bad(c, "'%s' entry %zu: the name is a %s, expected a string", what, entry,
                   luaL_typename(L, idx));
    size_t len, at;
    const char *name = lua_tolstring(L, idx, &len);
    char q[300], why[200];
    switch (checks_header_name(name, len, &at)) {
    case CHECKS_NAME_OK:
        *out = (char *)name;
        return 0;
    case CHECKS_NAME_EMPTY:
        return bad(c, "'%s' entry %zu: empty header name", what, entry);
    case CHECKS_NAME_NUL:
        /* protobuf-c strings end at the first NUL: such a name would reach Envoy cut short */
        return bad(c, "'%s': header name '%s' contains a NUL byte", what, name);
    case CHECKS_NAME_UTF8:
        checks_quote(name, len, q, sizeof q);
        return bad(c, "'%s' entry %zu: header name %s is not valid UTF-8", what, entry, q);
    case CHECKS_NAME_CHAR:
        break;
    }
    checks_quote(name, len, q, sizeof q);
    checks_header_name_why(name, len, at, why, sizeof why);
    return bad(c, "'%s' entry %zu: header name %s %s", what, entry, q, why);
}

/* Fills hv from the name at name_idx and the value at val_idx (string or number).
 * The value goes in raw_value only: that is the field Envoy's ext_proc reads. */
static int header_value(struct conv *c, HeaderValue *hv, int name_idx, int val_idx,
                        const char *what, size_t entry)
{
    lua_State *L = c->L;
    if (header_name(c, name_idx, what, entry, &hv->key) != 0)
        return -1;
    switch (lua_type(L, val_idx)) {
    case LUA_TSTRING: {
        size_t len;
        const char *v = lua_tolstring(L, val_idx, &len);
        hv->raw_value.data = (uint8_t *)v;
        hv->raw_value.len = len;
        return 0;
    }
    case LUA_TNUMBER: {
        /* no lua_tolstring here: the converted string would not be anchored anywhere */
        char buf[48];
        int n = checks_format_number(L, val_idx, buf, sizeof buf);
        if (n < 0)
            return bad(c, "'%s': value of '%s' is not a finite number", what, hv->key);
        uint8_t *p = arena_alloc(c->a, (size_t)n);
        if (p == NULL)
            return nomem(c);
        memcpy(p, buf, (size_t)n);
        hv->raw_value.data = p;
        hv->raw_value.len = (size_t)n;
        return 0;
    }
    default:
        return bad(c, "'%s': value of '%s' is a %s, expected a string or number", what,
                   hv->key, luaL_typename(L, val_idx));
    }
}

static int cmp_option_key(const void *a, const void *b)
{
    const HeaderValueOption *x = *(const HeaderValueOption *const *)a;
    const HeaderValueOption *y = *(const HeaderValueOption *const *)b;
    return strcmp(x->header->key, y->header->key);
}

/* Reads the `add` forms at idx: a list of {name, value} pairs (order kept) or a
 * name = value map (sorted by name so the wire bytes do not depend on table order).
 * stack before/after: unchanged on success. */

/* Reads the string at idx as a value name of enum d. `what` names the key for errors.
 * Numbers are refused: the contract speaks names. */
static int read_enum(struct conv *c, int idx, const char *what, const ProtobufCEnumDescriptor *d,
                     int *out)
{
    lua_State *L = c->L;
    if (lua_type(L, idx) != LUA_TSTRING)
        return bad(c, "'%s' must be a string, got %s", what, luaL_typename(L, idx));
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    const ProtobufCEnumValue *v = checks_enum_by_name(d, s, len);
    if (v == NULL) {
        char names[256], q[300];
        checks_enum_names(d, names, sizeof names);
        checks_quote(s, len, q, sizeof q);
        return bad(c, "bad value for '%s': %s (expected %s)", what, q, names);
    }
    *out = v->value;
    return 0;
}

#define APPEND_ACTION(x) ENVOY__CONFIG__CORE__V3__HEADER_VALUE_OPTION__HEADER_APPEND_ACTION__##x

/* Sets an entry's append action. Stock Envoy's ext_proc reads only the deprecated `append`
 * flag (envoy issue 36982), so APPEND_IF_EXISTS_OR_ADD also sets append = true. */
static int set_append_action(struct conv *c, HeaderValueOption *o, int action)
{
    o->append_action = (Envoy__Config__Core__V3__HeaderValueOption__HeaderAppendAction)action;
    if (action != APPEND_ACTION(APPEND_IF_EXISTS_OR_ADD))
        return 0;
    if (c->append_true == NULL) {
        c->append_true = arena_alloc(c->a, sizeof *c->append_true);
        if (c->append_true == NULL)
            return nomem(c);
        google__protobuf__bool_value__init(c->append_true);
        c->append_true->value = 1;
    }
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    o->append = c->append_true;
#pragma GCC diagnostic pop
    return 0;
}

/* Checks that the pair at idx has no keys besides 1, 2 and append_action.
 * stack before/after: unchanged on success. */
static int check_pair_keys(struct conv *c, int idx, const char *what, size_t entry)
{
    lua_State *L = c->L;
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        lua_pop(L, 1);
        if (lua_isinteger(L, -1)) {
            lua_Integer k = lua_tointeger(L, -1);
            if (k == 1 || k == 2)
                continue;
        } else if (lua_type(L, -1) == LUA_TSTRING) {
            size_t len;
            const char *k = lua_tolstring(L, -1, &len);
            if (len == 13 && memcmp(k, "append_action", 13) == 0)
                continue;
        }
        char kb[128], hint[160];
        checks_describe_key(L, -1, "", kb, sizeof kb);
        struct checks_near near;
        checks_near_init_lua(&near, L, -1);
        checks_near_offer(&near, "append_action");
        checks_did_you_mean(checks_near_best(&near), "", hint, sizeof hint);
        return bad(c, "'%s' entry %zu has an unknown key %s%s (a pair takes {name, value, "
                      "append_action = ...})", what, entry, kb, hint);
    }
    return 0;
}

/* Reads the `add` forms at idx: a list of {name, value} pairs (order kept), each with an
 * optional append_action, or a name = value map (sorted by name so the wire bytes do not
 * depend on table order). `action` (-1: none) applies to every entry without its own.
 * stack before/after: unchanged on success. */
static int read_header_set(struct conv *c, int idx, const char *what, int action,
                           HeaderValueOption ***out, size_t *n_out)
{
    lua_State *L = c->L;
    struct checks_shape sh;
    *out = NULL;
    *n_out = 0;
    checks_table_shape(L, idx, &sh);
    if (sh.other != LUA_TNONE)
        return bad(c, "'%s' has a key of type %s; expected a list of {name, value} "
                      "pairs or a map of name = value", what, lua_typename(L, sh.other));
    size_t nint = sh.integers, n = sh.n;
    if (nint > 0 && sh.strings > 0)
        return bad(c, "'%s' mixes {name, value} pairs with name = value entries", what);
    if (n == 0)
        return 0;
    if (nint > 0 && !sh.seq)
        return bad(c, "'%s' is not a list: its keys are not 1..n", what);

    HeaderValueOption **ptrs = arena_alloc(c->a, n * sizeof *ptrs);
    HeaderValueOption *opts = arena_alloc(c->a, n * sizeof *opts);
    HeaderValue *hvs = arena_alloc(c->a, n * sizeof *hvs);
    if (ptrs == NULL || opts == NULL || hvs == NULL)
        return nomem(c);
    for (size_t i = 0; i < n; i++) {
        envoy__config__core__v3__header_value__init(&hvs[i]);
        envoy__config__core__v3__header_value_option__init(&opts[i]);
        opts[i].header = &hvs[i];
        ptrs[i] = &opts[i];
    }

    if (nint > 0) {
        for (size_t i = 0; i < n; i++) {
            /* stack: ... pair name value */
            if (lua_rawgeti(L, idx, (lua_Integer)i + 1) != LUA_TTABLE)
                return bad(c, "'%s' entry %zu is a %s, expected a {name, value} pair", what,
                           i + 1, luaL_typename(L, -1));
            int pair = lua_gettop(L);
            if (lua_rawlen(L, pair) != 2)
                return bad(c, "'%s' entry %zu is not a {name, value} pair", what, i + 1);
            if (check_pair_keys(c, pair, what, i + 1) != 0)
                return -1;
            lua_rawgeti(L, pair, 1);
            lua_rawgeti(L, pair, 2);
            if (header_value(c, &hvs[i], -2, -1, what, i + 1) != 0)
                return -1;
            lua_pop(L, 2);
            int own = action;
            lua_pushliteral(L, "append_action");
            if (lua_rawget(L, pair) != LUA_TNIL) {
                char key[96];
                snprintf(key, sizeof key, "%s[%zu].append_action", what, i + 1);
                if (read_enum(c, -1, key,
                              &envoy__config__core__v3__header_value_option__header_append_action__descriptor,
                              &own) != 0)
                    return -1;
            }
            lua_pop(L, 2);
            if (own >= 0 && set_append_action(c, &opts[i], own) != 0)
                return -1;
        }
    } else {
        size_t i = 0;
        lua_pushnil(L);
        while (i < n && lua_next(L, idx) != 0) {
            /* stack: ... name value */
            if (header_value(c, &hvs[i], -2, -1, what, i + 1) != 0)
                return -1;
            lua_pop(L, 1);
            if (action >= 0 && set_append_action(c, &opts[i], action) != 0)
                return -1;
            i++;
        }
        if (i == n)
            lua_pop(L, 1);  /* the key of an unfinished traversal (cannot happen) */
        qsort(ptrs, n, sizeof *ptrs, cmp_option_key);
    }
    *out = ptrs;
    *n_out = n;
    return 0;
}

/* Reads `remove`: a list of header names. stack before/after: unchanged on success. */
static int read_names(struct conv *c, int idx, const char *what, char ***out, size_t *n_out)
{
    lua_State *L = c->L;
    struct checks_shape sh;
    *out = NULL;
    *n_out = 0;
    checks_table_shape(L, idx, &sh);
    if (!sh.seq)
        return bad(c, "'%s' must be a list of header names", what);
    size_t count = sh.n;
    if (count == 0)
        return 0;
    char **names = arena_alloc(c->a, count * sizeof *names);
    if (names == NULL)
        return nomem(c);
    for (size_t i = 0; i < count; i++) {
        lua_rawgeti(L, idx, (lua_Integer)i + 1);
        if (header_name(c, -1, what, i + 1, &names[i]) != 0)
            return -1;
        lua_pop(L, 1);
    }
    *out = names;
    *n_out = count;
    return 0;
}

/* The append action in slot idx (0 or nil: none) -> *action (-1 = none). */
static int list_action(struct conv *c, int idx, const char *what, int *action)
{
    *action = -1;
    if (idx == 0 || lua_isnil(c->L, idx))
        return 0;
    return read_enum(c, idx, what,
                     &envoy__config__core__v3__header_value_option__header_append_action__descriptor,
                     action);
}

/* A HeaderMutation from the `add`/`remove` values in slots add/remove (0 = absent), with
 * the whole-list append action in slot action (0 = absent); *out stays NULL when both
 * lists are empty, so no empty message is sent. */
static int header_mutation(struct conv *c, int add, const char *add_what, int action,
                           const char *action_what, int remove, HeaderMutation **out)
{
    HeaderValueOption **set = NULL;
    char **rm = NULL;
    size_t nset = 0, nrm = 0;
    int act;
    *out = NULL;
    if (list_action(c, action, action_what, &act) != 0)
        return -1;
    if (add != 0 && read_header_set(c, add, add_what, act, &set, &nset) != 0)
        return -1;
    if (remove != 0 && read_names(c, remove, "remove", &rm, &nrm) != 0)
        return -1;
    if (nset == 0 && nrm == 0)
        return 0;
    HeaderMutation *hm = arena_alloc(c->a, sizeof *hm);
    if (hm == NULL)
        return nomem(c);
    envoy__service__ext_proc__v3__header_mutation__init(hm);
    hm->n_set_headers = nset;
    hm->set_headers = set;
    hm->n_remove_headers = nrm;
    hm->remove_headers = rm;
    *out = hm;
    return 0;
}

/* An integral number in [min, max] at idx, for `immediate.status` and friends. */
static int read_integer(struct conv *c, int idx, const char *what, lua_Integer min,
                        lua_Integer max, const char *expected, lua_Integer *out)
{
    lua_State *L = c->L;
    int64_t v;
    enum checks_int r = checks_integer(L, idx, min, max, &v);
    if (r == CHECKS_INT_NOT_NUMBER)
        return bad(c, "'%s' must be a number, got %s", what, luaL_typename(L, idx));
    if (r != CHECKS_INT_OK) {
        char num[48];
        checks_describe_number(L, idx, num, sizeof num);
        return bad(c, "bad value for '%s': %s (expected %s)", what, num, expected);
    }
    *out = (lua_Integer)v;
    return 0;
}

enum { I_STATUS, I_HEADERS, I_APPEND_ACTION, I_BODY, I_DETAILS, I_GRPC_STATUS, I_STREAM,
       I_CHUNKS, I_TRAILERS, I_END_OF_STREAM, I_COUNT };
static const char *const imm_keys[I_COUNT] = {"status", "headers", "append_action", "body",
                                              "details", "grpc_status", "stream", "chunks",
                                              "trailers", "end_of_stream"};
static const int imm_types[I_COUNT] = {LUA_TNUMBER, LUA_TTABLE, LUA_TSTRING, LUA_TSTRING,
                                       LUA_TSTRING, LUA_TNUMBER, LUA_TBOOLEAN, LUA_TTABLE,
                                       LUA_TTABLE, LUA_TBOOLEAN};

static int streamed_immediate(struct conv *c, int slot, pbconv_response **out, size_t *n);

/* `immediate = {...}` at t -> resp.immediate_response, or (stream = true, chunks or
 * trailers) a streamed_immediate_response sequence in *out / *n.
 * stack before: ...   after: ... + I_COUNT slots (the caller restores the top). */
static int immediate(struct conv *c, int t, pbconv_response *resp, pbconv_response **out,
                     size_t *n)
{
    lua_State *L = c->L;
    int slot = lua_gettop(L) + 1;
    lua_settop(L, slot + I_COUNT - 1);
    if (scan_keys(c, t, imm_keys, I_COUNT, slot, "immediate.") != 0)
        return -1;
    for (int i = 0; i < I_COUNT; i++) {
        int ty = lua_type(L, slot + i);
        if (ty != LUA_TNIL && ty != imm_types[i])
            return bad(c, "'immediate.%s' must be a %s, got %s", imm_keys[i],
                       lua_typename(L, imm_types[i]), lua_typename(L, ty));
    }
    if (lua_toboolean(L, slot + I_STREAM) || !lua_isnil(L, slot + I_CHUNKS) ||
        !lua_isnil(L, slot + I_TRAILERS) || !lua_isnil(L, slot + I_END_OF_STREAM) ||
        c->in->local_reply_open)
        return streamed_immediate(c, slot, out, n);
    ImmediateResponse *ir = arena_alloc(c->a, sizeof *ir);
    HttpStatus *hs = arena_alloc(c->a, sizeof *hs);
    if (ir == NULL || hs == NULL)
        return nomem(c);
    envoy__service__ext_proc__v3__immediate_response__init(ir);
    envoy__type__v3__http_status__init(hs);
    lua_Integer code = 200;
    /* Envoy turns a status under 200 into 200 without a word: refuse it instead */
    if (!lua_isnil(L, slot + I_STATUS) &&
        read_integer(c, slot + I_STATUS, "immediate.status", 200, 599,
                     "an HTTP status 200-599", &code) != 0)
        return -1;
    /* StatusCode is an enum in the proto, but any int32 is valid on the wire */
    hs->code = (Envoy__Type__V3__StatusCode)code;
    ir->status = hs;
    if (header_mutation(c, lua_isnil(L, slot + I_HEADERS) ? 0 : slot + I_HEADERS,
                        "immediate.headers", slot + I_APPEND_ACTION, "immediate.append_action",
                        0, &ir->headers) != 0)
        return -1;
    if (!lua_isnil(L, slot + I_BODY)) {
        size_t len;
        const char *b = lua_tolstring(L, slot + I_BODY, &len);
        ir->body.data = (uint8_t *)b;
        ir->body.len = len;
    }
    if (!lua_isnil(L, slot + I_DETAILS)) {
        size_t len;
        const char *d = lua_tolstring(L, slot + I_DETAILS, &len);
        const char *why = checks_proto_string(d, len);
        if (why != NULL)
            return bad(c, "'immediate.details' %s", why);
        ir->details = (char *)d;
    }
    if (!lua_isnil(L, slot + I_GRPC_STATUS)) {
        lua_Integer g;
        if (read_integer(c, slot + I_GRPC_STATUS, "immediate.grpc_status", 0, 16,
                         "a gRPC status code 0-16", &g) != 0)
            return -1;
        GrpcStatus *gs = arena_alloc(c->a, sizeof *gs);
        if (gs == NULL)
            return nomem(c);
        envoy__service__ext_proc__v3__grpc_status__init(gs);
        gs->status = (uint32_t)g;
        ir->grpc_status = gs;
    }
    resp->response_case = RESP(IMMEDIATE_RESPONSE);
    resp->immediate_response = ir;
    return 0;
}

/* A ProcessingResponse carrying one piece of a streamed local response. */
static StreamedImmediateResponse *new_piece(struct conv *c, pbconv_response *resp)
{
    StreamedImmediateResponse *sir = arena_alloc(c->a, sizeof *sir);
    if (sir == NULL)
        return NULL;
    envoy__service__ext_proc__v3__streamed_immediate_response__init(sir);
    envoy__service__ext_proc__v3__processing_response__init(resp);
    resp->response_case = RESP(STREAMED_IMMEDIATE_RESPONSE);
    resp->streamed_immediate_response = sir;
    return sir;
}

/* The header set at idx (immediate.headers / immediate.trailers forms) as a HeaderMap;
 * `status` >= 0 puts ":status" first (Envoy requires it in headers_response). */
static int header_map(struct conv *c, int idx, const char *what, lua_Integer status,
                      HeaderMap **out)
{
    HeaderValueOption **set = NULL;
    size_t nset = 0;
    if (!lua_isnil(c->L, idx) && read_header_set(c, idx, what, -1, &set, &nset) != 0)
        return -1;
    size_t extra = status >= 0 ? 1 : 0;
    HeaderMap *map = arena_alloc(c->a, sizeof *map);
    HeaderValue **hvs = arena_alloc(c->a, (nset + extra) * sizeof *hvs);
    if (map == NULL || hvs == NULL)
        return nomem(c);
    envoy__config__core__v3__header_map__init(map);
    if (status >= 0) {
        HeaderValue *st = arena_alloc(c->a, sizeof *st);
        char *digits = arena_alloc(c->a, 4);
        if (st == NULL || digits == NULL)
            return nomem(c);
        envoy__config__core__v3__header_value__init(st);
        snprintf(digits, 4, "%03d", (int)status);
        st->key = ":status";
        st->raw_value.data = (uint8_t *)digits;
        st->raw_value.len = 3;
        hvs[0] = st;
    }
    for (size_t i = 0; i < nset; i++) {
        const char *k = set[i]->header->key;
        if (status >= 0 && strcmp(k, ":status") == 0)
            return bad(c, "'%s' names ':status'; set it with immediate.status", what);
        if (status < 0 && k[0] == ':')   /* HTTP/2 forbids pseudo-headers in trailers */
            return bad(c, "'%s' names the pseudo-header '%.64s' (trailers cannot carry one)",
                       what, k);
        hvs[extra + i] = set[i]->header;
    }
    map->n_headers = nset + extra;
    map->headers = hvs;
    *out = map;
    return 0;
}

/* The body and trailers pieces of a streamed local response from the immediate slots at
 * slot (slot 0: none, a handler's nil): `body` (one chunk) or `chunks`, then `trailers`;
 * end_of_stream (`eos`) on the last body piece unless trailers follow (they end it). With
 * nothing to send and eos, one empty body piece ends it. Fills resps from index `first`;
 * *count is how many pieces (resps may be NULL to count only). */
static int local_pieces(struct conv *c, int slot, bool eos, pbconv_response *resps,
                        size_t first, size_t *count)
{
    lua_State *L = c->L;
    int chunks = slot ? slot + I_CHUNKS : 0;
    bool has_body = slot && !lua_isnil(L, slot + I_BODY);
    bool trailers = slot && !lua_isnil(L, slot + I_TRAILERS);
    size_t nchunks = has_body ? 1 : 0;
    if (chunks && !lua_isnil(L, chunks)) {
        struct checks_shape sh;
        checks_table_shape(L, chunks, &sh);
        if (!sh.seq)
            return bad(c, "'immediate.chunks' must be a list of strings");
        nchunks = sh.n;
        for (size_t i = 1; i <= nchunks; i++) {
            int ty = lua_rawgeti(L, chunks, (lua_Integer)i);
            lua_pop(L, 1);
            if (ty != LUA_TSTRING)
                return bad(c, "'immediate.chunks' entry %zu is a %s, expected a string", i,
                           lua_typename(L, ty));
        }
    } else {
        chunks = 0;
    }
    bool closing = nchunks == 0 && !trailers && eos;   /* one empty piece ends it */
    *count = nchunks + (trailers ? 1 : 0) + (closing ? 1 : 0);
    if (resps == NULL)
        return 0;
    for (size_t i = 0; i < nchunks + (closing ? 1 : 0); i++) {
        StreamedImmediateResponse *sir = new_piece(c, &resps[first + i]);
        StreamedBodyResponse *sb = arena_alloc(c->a, sizeof *sb);
        if (sir == NULL || sb == NULL)
            return nomem(c);
        envoy__service__ext_proc__v3__streamed_body_response__init(sb);
        size_t len = 0;
        const char *data = "";
        if (closing) {
            /* nothing to say: the empty ending piece */
        } else if (chunks == 0) {
            data = lua_tolstring(L, slot + I_BODY, &len);
        } else {
            lua_rawgeti(L, chunks, (lua_Integer)i + 1);
            data = lua_tolstring(L, -1, &len);   /* anchored by chunks */
            lua_pop(L, 1);
        }
        sb->body.data = (uint8_t *)data;
        sb->body.len = len;
        sb->end_of_stream = closing || (i + 1 == nchunks && !trailers && eos);
        sir->response_case = ENVOY__SERVICE__EXT_PROC__V3__STREAMED_IMMEDIATE_RESPONSE__RESPONSE_BODY_RESPONSE;
        sir->body_response = sb;
    }
    if (trailers) {
        StreamedImmediateResponse *sir = new_piece(c, &resps[first + *count - 1]);
        if (sir == NULL)
            return nomem(c);
        if (header_map(c, slot + I_TRAILERS, "immediate.trailers", -1, &sir->trailers_response) != 0)
            return -1;
        sir->response_case = ENVOY__SERVICE__EXT_PROC__V3__STREAMED_IMMEDIATE_RESPONSE__RESPONSE_TRAILERS_RESPONSE;
    }
    return 0;
}

/* Whether the request has ended with this message (its last body chunk, or trailers):
 * Envoy sends nothing more to answer, so an open local response must end now. */
static bool request_ends(const struct conv *c)
{
    return c->phase == PBCONV_REQUEST_TRAILERS ||
           (c->phase == PBCONV_REQUEST_BODY && c->in->end_of_stream);
}

/* The next pieces of an open local response, in answer to a request body chunk or
 * trailers (slot 0: the handler returned nil, which sends nothing until the request ends,
 * then ends the response). */
static int local_continue(struct conv *c, int slot, pbconv_response **out, size_t *n,
                          struct pbconv_result *res)
{
    lua_State *L = c->L;
    if (c->phase != PBCONV_REQUEST_BODY && c->phase != PBCONV_REQUEST_TRAILERS)
        return bad(c, "a streamed local response is open; %s cannot answer it",
                   phases[c->phase].handler);
    if (slot) {
        static const int once[] = {I_STATUS, I_HEADERS, I_APPEND_ACTION, I_DETAILS, I_GRPC_STATUS};
        for (size_t i = 0; i < sizeof once / sizeof once[0]; i++)
            if (!lua_isnil(L, slot + once[i]))
                return bad(c, "'immediate.%s': the streamed local response's headers went out "
                              "already (continue it with body, chunks, trailers, end_of_stream)",
                           imm_keys[once[i]]);
        if (!lua_isnil(L, slot + I_BODY) && !lua_isnil(L, slot + I_CHUNKS))
            return bad(c, "'immediate.body' and 'immediate.chunks' cannot be combined");
    }
    bool eos = request_ends(c);
    if (slot && !lua_isnil(L, slot + I_END_OF_STREAM)) {
        bool want = lua_toboolean(L, slot + I_END_OF_STREAM);
        if (!want && eos)
            return bad(c, "'immediate.end_of_stream' is false, but the request ends here and "
                          "Envoy sends nothing more to answer: the local response must end");
        eos = want;
    }
    if (slot && !lua_isnil(L, slot + I_TRAILERS))
        eos = true;
    size_t count;
    if (local_pieces(c, slot, eos, NULL, 0, &count) != 0)
        return -1;
    pbconv_response *resps = count ? arena_alloc(c->a, count * sizeof *resps) : NULL;
    if (count && resps == NULL)
        return nomem(c);
    if (local_pieces(c, slot, eos, resps, 0, &count) != 0)
        return -1;
    *out = resps;
    *n = count;
    res->answer = PBCONV_ANSWER_IMMEDIATE;
    res->local_reply_open = !eos;
    return 0;
}

/* A streamed immediate response (docs/lua-api.md): headers_response (with ":status"),
 * then local_pieces; end_of_stream on the last piece unless immediate.end_of_stream =
 * false keeps it open for the body handlers (FULL_DUPLEX_STREAMED only). Starts only in
 * on_request_headers, in NONE or FULL_DUPLEX_STREAMED request body mode (Envoy's comment
 * on the field). */
static int streamed_immediate(struct conv *c, int slot, pbconv_response **out, size_t *n)
{
    lua_State *L = c->L;
    if (c->in->local_reply_open)
        return local_continue(c, slot, out, n, c->res);
    if (c->phase != PBCONV_REQUEST_HEADERS)
        return bad(c, "a streamed 'immediate' (stream, chunks or trailers) is allowed only in "
                      "on_request_headers (Envoy starts a streamed local response only in "
                      "answer to request headers)");
    const struct pbconv_in *in = c->in;
    if (in->body_mode_known &&
        in->request_body_mode != PROCESSING_MODE(NONE) &&
        in->request_body_mode != PROCESSING_MODE(FULL_DUPLEX_STREAMED)) {
        const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value(
            &envoy__extensions__filters__http__ext_proc__v3__processing_mode__body_send_mode__descriptor,
            in->request_body_mode);
        return bad(c, "a streamed 'immediate' needs request_body_mode NONE or "
                      "FULL_DUPLEX_STREAMED (Envoy supports no other), and this stream's is %s",
                   v != NULL ? v->name : "unknown");
    }
    static const int not_streamed[] = {I_APPEND_ACTION, I_DETAILS, I_GRPC_STATUS};
    for (size_t i = 0; i < sizeof not_streamed / sizeof not_streamed[0]; i++)
        if (!lua_isnil(L, slot + not_streamed[i]))
            return bad(c, "'immediate.%s' cannot be combined with a streamed 'immediate' "
                          "(stream, chunks or trailers)", imm_keys[not_streamed[i]]);
    if (!lua_isnil(L, slot + I_BODY) && !lua_isnil(L, slot + I_CHUNKS))
        return bad(c, "'immediate.body' and 'immediate.chunks' cannot be combined");
    bool trailers = !lua_isnil(L, slot + I_TRAILERS);
    bool eos = true;
    if (!lua_isnil(L, slot + I_END_OF_STREAM) && !lua_toboolean(L, slot + I_END_OF_STREAM)) {
        if (trailers)
            return bad(c, "'immediate.end_of_stream' is false, but 'immediate.trailers' end "
                          "the local response");
        if (!in->body_mode_known || in->request_body_mode != PROCESSING_MODE(FULL_DUPLEX_STREAMED))
            return bad(c, "'immediate.end_of_stream' = false keeps the local response open for "
                          "on_request_body, which needs request_body_mode FULL_DUPLEX_STREAMED "
                          "(Envoy sends no body to answer otherwise)");
        if (in->end_of_stream)
            return bad(c, "'immediate.end_of_stream' = false keeps the local response open for "
                          "on_request_body, but these request headers end the request "
                          "(end_of_stream): no body comes to answer, so the local response "
                          "must end here");
        eos = false;
    }
    lua_Integer code = 200;
    if (!lua_isnil(L, slot + I_STATUS) &&
        read_integer(c, slot + I_STATUS, "immediate.status", 200, 599,
                     "an HTTP status 200-599", &code) != 0)
        return -1;
    size_t pieces;
    /* counting, without the closing empty piece: headers_response can end it itself */
    if (local_pieces(c, slot, false, NULL, 0, &pieces) != 0)
        return -1;
    size_t total = 1 + pieces;
    pbconv_response *resps = arena_alloc(c->a, total * sizeof *resps);
    if (resps == NULL)
        return nomem(c);
    StreamedImmediateResponse *sir = new_piece(c, &resps[0]);
    HttpHeaders *hh = arena_alloc(c->a, sizeof *hh);
    if (sir == NULL || hh == NULL)
        return nomem(c);
    envoy__service__ext_proc__v3__http_headers__init(hh);
    if (header_map(c, slot + I_HEADERS, "immediate.headers", code, &hh->headers) != 0)
        return -1;
    hh->end_of_stream = pieces == 0 && eos;
    sir->response_case = ENVOY__SERVICE__EXT_PROC__V3__STREAMED_IMMEDIATE_RESPONSE__RESPONSE_HEADERS_RESPONSE;
    sir->headers_response = hh;
    if (pieces > 0 && local_pieces(c, slot, eos, resps, 1, &pieces) != 0)
        return -1;
    *out = resps;
    *n = total;
    c->res->local_reply_open = !eos;
    return 0;
}

/* `mode_override = { field = "NAME", ... }` at t: every ProcessingMode field by its
 * enum value name, found through the descriptor so a proto update needs no code here. */
static int mode_override(struct conv *c, int t, ProcessingMode **out)
{
    lua_State *L = c->L;
    const ProtobufCMessageDescriptor *d =
        &envoy__extensions__filters__http__ext_proc__v3__processing_mode__descriptor;
    ProcessingMode *pm = arena_alloc(c->a, sizeof *pm);
    if (pm == NULL)
        return nomem(c);
    envoy__extensions__filters__http__ext_proc__v3__processing_mode__init(pm);
    lua_pushnil(L);
    while (lua_next(L, t) != 0) {
        /* stack: ... key value */
        const ProtobufCFieldDescriptor *f = NULL;
        if (lua_type(L, -2) == LUA_TSTRING) {
            size_t len;
            const char *k = lua_tolstring(L, -2, &len);
            if (strlen(k) == len)
                f = protobuf_c_message_descriptor_get_field_by_name(d, k);
        }
        if (f == NULL || f->type != PROTOBUF_C_TYPE_ENUM) {
            char kb[128], hint[160];
            checks_describe_key(L, -2, "mode_override.", kb, sizeof kb);
            struct checks_near near;
            checks_near_init_lua(&near, L, -2);
            for (unsigned i = 0; i < d->n_fields; i++)
                if (d->fields[i].type == PROTOBUF_C_TYPE_ENUM)
                    checks_near_offer(&near, d->fields[i].name);
            checks_did_you_mean(checks_near_best(&near), "mode_override.", hint, sizeof hint);
            return bad(c, "unknown key %s%s", kb, hint);
        }
        char what[96];
        snprintf(what, sizeof what, "mode_override.%s", f->name);
        int v;
        if (read_enum(c, -1, what, f->descriptor, &v) != 0)
            return -1;
        *(int *)((char *)pm + f->offset) = v;
        lua_pop(L, 1);
    }
    *out = pm;
    return 0;
}

/* `override_message_timeout` at idx: seconds (>= 1 ms, at most Duration's range). */
static int message_timeout(struct conv *c, int idx, Google__Protobuf__Duration **out)
{
    lua_State *L = c->L;
    double v = (double)lua_tonumber(L, idx);
    if (!(v >= 0.001 && v <= 315576000000.0)) {
        char num[48];
        checks_describe_number(L, idx, num, sizeof num);
        return bad(c, "bad value for 'override_message_timeout': %s (expected a number of "
                      "seconds from 0.001 to 315576000000)", num);
    }
    Google__Protobuf__Duration *d = arena_alloc(c->a, sizeof *d);
    if (d == NULL)
        return nomem(c);
    google__protobuf__duration__init(d);
    double whole = floor(v);
    long long nanos = llround((v - whole) * 1e9);
    d->seconds = (int64_t)whole;
    if (nanos >= 1000000000) {
        d->seconds++;
        nanos -= 1000000000;
    }
    d->nanos = (int32_t)nanos;
    *out = d;
    return 0;
}

/* Kinds of answer: the phase kinds, plus a body chunk in FULL_DUPLEX_STREAMED mode. */
#define KIND_STREAM 8
#define KIND_ANY (KIND_ALL | KIND_STREAM)
#define MUTATION 1  /* flag: cannot be combined with `immediate` */

enum { K_ADD, K_REMOVE, K_APPEND_ACTION, K_CLEAR_ROUTE_CACHE, K_BODY, K_CLEAR_BODY, K_STATUS,
       K_CHUNKS, K_END_OF_STREAM, K_IMMEDIATE, K_DENY, K_DYNAMIC_METADATA, K_MODE_OVERRIDE,
       K_OVERRIDE_MESSAGE_TIMEOUT, K_WAIT_FOR_BODY, K_REQUEST_DRAIN, K_COUNT };
static const struct {
    const char *name;
    int type;       /* LUA_TNONE: checked by hand */
    unsigned kinds; /* answer kinds that accept the key */
    unsigned flags;
} top[K_COUNT] = {
    [K_ADD] = {"add", LUA_TTABLE, KIND_ALL, MUTATION},
    [K_REMOVE] = {"remove", LUA_TTABLE, KIND_ALL, MUTATION},
    [K_APPEND_ACTION] = {"append_action", LUA_TSTRING, KIND_ALL, MUTATION},
    [K_CLEAR_ROUTE_CACHE] = {"clear_route_cache", LUA_TBOOLEAN,
                             KIND_HEADERS | KIND_BODY | KIND_STREAM, MUTATION},
    [K_BODY] = {"body", LUA_TSTRING, KIND_HEADERS | KIND_BODY | KIND_STREAM, MUTATION},
    [K_CLEAR_BODY] = {"clear_body", LUA_TBOOLEAN, KIND_BODY, MUTATION},
    [K_STATUS] = {"status", LUA_TSTRING, KIND_HEADERS | KIND_BODY, MUTATION},
    [K_CHUNKS] = {"chunks", LUA_TTABLE, KIND_STREAM, MUTATION},
    [K_END_OF_STREAM] = {"end_of_stream", LUA_TBOOLEAN, KIND_STREAM, MUTATION},
    [K_IMMEDIATE] = {"immediate", LUA_TTABLE, KIND_ANY, 0},
    [K_DENY] = {"deny", LUA_TNONE, KIND_ANY, 0},
    [K_DYNAMIC_METADATA] = {"dynamic_metadata", LUA_TTABLE, KIND_ANY, 0},
    [K_MODE_OVERRIDE] = {"mode_override", LUA_TTABLE, KIND_ANY, 0},
    [K_OVERRIDE_MESSAGE_TIMEOUT] = {"override_message_timeout", LUA_TNUMBER, KIND_ANY, 0},
    [K_WAIT_FOR_BODY] = {"wait_for_body", LUA_TBOOLEAN, KIND_HEADERS, MUTATION},
    [K_REQUEST_DRAIN] = {"request_drain", LUA_TBOOLEAN, KIND_STREAM, MUTATION},
};

/* What one streamed chunk carries: its bytes and GRPC body mode's two flags. */
struct chunk {
    const uint8_t *data;
    size_t len;
    bool compressed, no_message;
};

/* One streamed body response: {request_body|response_body: {response: {body_mutation:
 * {streamed_response: {body, end_of_stream, ...flags}}}}}. */
static int streamed(struct conv *c, pbconv_response *resp, const struct chunk *ch, bool eos)
{
    CommonResponse *cr = arena_alloc(c->a, sizeof *cr);
    BodyMutation *bm = arena_alloc(c->a, sizeof *bm);
    StreamedBodyResponse *sr = arena_alloc(c->a, sizeof *sr);
    if (cr == NULL || bm == NULL || sr == NULL)
        return nomem(c);
    envoy__service__ext_proc__v3__common_response__init(cr);
    envoy__service__ext_proc__v3__body_mutation__init(bm);
    envoy__service__ext_proc__v3__streamed_body_response__init(sr);
    sr->body.data = (uint8_t *)ch->data;
    sr->body.len = ch->len;
    sr->end_of_stream = eos;
    sr->grpc_message_compressed = ch->compressed;
    sr->end_of_stream_without_message = ch->no_message;
    bm->mutation_case = ENVOY__SERVICE__EXT_PROC__V3__BODY_MUTATION__MUTATION_STREAMED_RESPONSE;
    bm->streamed_response = sr;
    cr->body_mutation = bm;
    envoy__service__ext_proc__v3__processing_response__init(resp);
    return set_phase(resp, c->phase, cr, NULL, c->a) == 0 ? 0 : nomem(c);
}

/* `chunks` entry i at the top of the stack: a string, or (GRPC body mode's flags) a table
 * { body = "...", grpc_message_compressed = bool, end_of_stream_without_message = bool }.
 * The bytes stay anchored by the chunks table. stack: unchanged. */
static int chunk_entry(struct conv *c, size_t i, struct chunk *ch)
{
    lua_State *L = c->L;
    int e = lua_gettop(L);
    memset(ch, 0, sizeof *ch);
    if (lua_type(L, e) == LUA_TSTRING) {
        ch->data = (const uint8_t *)lua_tolstring(L, e, &ch->len);
        return 0;
    }
    if (lua_type(L, e) != LUA_TTABLE)
        return bad(c, "'chunks' entry %zu is a %s, expected a string or a table { body = ... }",
                   i, luaL_typename(L, e));
    static const char *const names[] = {"body", "grpc_message_compressed",
                                        "end_of_stream_without_message"};
    static const int types[] = {LUA_TSTRING, LUA_TBOOLEAN, LUA_TBOOLEAN};
    char prefix[40];
    snprintf(prefix, sizeof prefix, "chunks[%zu].", i);
    lua_settop(L, e + 3);
    if (scan_keys(c, e, names, 3, e + 1, prefix) != 0)
        return -1;
    for (int k = 0; k < 3; k++) {
        int ty = lua_type(L, e + 1 + k);
        if (ty != LUA_TNIL && ty != types[k])
            return bad(c, "'chunks[%zu].%s' must be a %s, got %s", i, names[k],
                       lua_typename(L, types[k]), lua_typename(L, ty));
    }
    if (!lua_isnil(L, e + 1))
        ch->data = (const uint8_t *)lua_tolstring(L, e + 1, &ch->len);
    ch->compressed = lua_toboolean(L, e + 2);
    ch->no_message = lua_toboolean(L, e + 3);
    lua_settop(L, e);
    if ((ch->compressed || ch->no_message) && !c->in->grpc)
        return bad(c, "'chunks[%zu].%s' is for GRPC body mode only (this body is in "
                      "FULL_DUPLEX_STREAMED mode)", i, ch->compressed ? names[1] : names[2]);
    if (ch->no_message && ch->len > 0)
        return bad(c, "'chunks[%zu].end_of_stream_without_message' needs an empty body (it "
                      "ends the stream with no message at all)", i);
    return 0;
}

/* The answer to a FULL_DUPLEX_STREAMED body chunk (docs/streaming.md): `body` (one chunk),
 * `chunks` (a list, possibly empty) or neither (the incoming chunk, unchanged); then
 * `end_of_stream` for the last one. An ending body always ends: with nothing to emit, one
 * empty chunk carries end_of_stream. */
static int stream_answer(struct conv *c, int slot, const bool *on, const bool *present,
                         pbconv_response **out, size_t *n_out)
{
    lua_State *L = c->L;
    const struct pbconv_in *in = c->in;
    if (on[K_BODY] && present[K_CHUNKS])
        return bad(c, "'body' and 'chunks' cannot be combined");
    bool eos = in->end_of_stream;
    if (present[K_END_OF_STREAM]) {
        eos = lua_toboolean(L, slot + K_END_OF_STREAM);
        if (in->end_of_stream && !eos)
            return bad(c, "bad value for 'end_of_stream': false, but this is the last chunk "
                          "of the body (a body must end)");
    }
    size_t n = 1;
    int chunks = slot + K_CHUNKS;
    if (present[K_CHUNKS]) {
        struct checks_shape sh;
        checks_table_shape(L, chunks, &sh);
        if (!sh.seq)
            return bad(c, "'chunks' must be a list of strings or { body = ... } tables");
        n = sh.n;
    }
    size_t total = n == 0 && eos ? 1 : n;
    *n_out = total;
    if (total == 0)
        return 0;
    pbconv_response *resps = arena_alloc(c->a, total * sizeof *resps);
    if (resps == NULL)
        return nomem(c);
    *out = resps;
    for (size_t i = 0; i < total; i++) {
        struct chunk ch = {0};
        if (n == 0) {
            /* the closing empty chunk: in GRPC mode no message, not an empty one */
            ch.no_message = in->grpc;
        } else if (present[K_CHUNKS]) {
            lua_rawgeti(L, chunks, (lua_Integer)i + 1);
            int rc = chunk_entry(c, i + 1, &ch);
            lua_pop(L, 1);
            if (rc != 0)
                return -1;
            if (ch.no_message && (i + 1 != total || !eos))
                return bad(c, "'chunks[%zu].end_of_stream_without_message' is allowed only on "
                              "the last chunk of an answer that ends the body", i + 1);
        } else if (on[K_BODY]) {
            ch.data = (const uint8_t *)lua_tolstring(L, slot + K_BODY, &ch.len);
        } else {
            /* unchanged: the incoming chunk, with its flags */
            ch.data = in->chunk;
            ch.len = in->chunk_len;
            ch.compressed = in->grpc && in->chunk_compressed;
            ch.no_message = in->grpc && in->chunk_eos_without_message && eos;
        }
        if (ch.data == NULL)
            ch.data = (const uint8_t *)"";  /* never a NULL pointer, even with length 0 */
        if (streamed(c, &resps[i], &ch, i + 1 == total ? eos : false) != 0)
            return -1;
    }
    if (on[K_CLEAR_ROUTE_CACHE]) {
        CommonResponse *cr = c->phase == PBCONV_REQUEST_BODY ? resps[0].request_body->response
                                                             : resps[0].response_body->response;
        cr->clear_route_cache = 1;
    }
    return 0;
}

static bool names_content_length(const char *name)
{
    return name_eq(name, strlen(name), "content-length", 14);
}

/* A buffered body replaced by the string at body (0: cleared) keeps Envoy's content-length
 * unless told otherwise, and since Envoy 1.29 a body that does not match it is refused
 * (envoyproxy/envoy#28515): set it to the new length in *hm, unless the script's own add
 * or remove names content-length (its choice wins). */
static int length_follows(struct conv *c, int body, HeaderMutation **hm)
{
    HeaderMutation *m = *hm;
    for (size_t i = 0; m != NULL && i < m->n_set_headers; i++)
        if (names_content_length(m->set_headers[i]->header->key))
            return 0;
    for (size_t i = 0; m != NULL && i < m->n_remove_headers; i++)
        if (names_content_length(m->remove_headers[i]))
            return 0;
    size_t len = 0;
    if (body != 0)
        lua_tolstring(c->L, body, &len);
    char digits[24];
    int nd = snprintf(digits, sizeof digits, "%zu", len);
    size_t nset = m != NULL ? m->n_set_headers : 0;
    HeaderValueOption **set = arena_alloc(c->a, (nset + 1) * sizeof *set);
    HeaderValueOption *o = arena_alloc(c->a, sizeof *o);
    HeaderValue *hv = arena_alloc(c->a, sizeof *hv);
    uint8_t *v = arena_alloc(c->a, (size_t)nd);
    if (m == NULL && (m = arena_alloc(c->a, sizeof *m)) != NULL)
        envoy__service__ext_proc__v3__header_mutation__init(m);
    if (set == NULL || o == NULL || hv == NULL || v == NULL || m == NULL)
        return nomem(c);
    memcpy(v, digits, (size_t)nd);
    envoy__config__core__v3__header_value__init(hv);
    hv->key = (char *)"content-length";
    hv->raw_value.data = v;
    hv->raw_value.len = (size_t)nd;
    envoy__config__core__v3__header_value_option__init(o);
    o->header = hv;
    /* replace the length, never add a second one: `append` left unset is an overwrite for an
     * Envoy that reads only that flag; append_action says it to one that reads the action
     * (whose default, APPEND_IF_EXISTS_OR_ADD, would send two content-length headers) */
    o->append_action = APPEND_ACTION(OVERWRITE_IF_EXISTS_OR_ADD);
    if (nset > 0)
        memcpy(set, m->set_headers, nset * sizeof *set);
    set[nset] = o;
    m->set_headers = set;
    m->n_set_headers = nset + 1;
    *hm = m;
    return 0;
}

/* The answer of a headers, body (not full duplex) or trailers phase: one response. */
static int phase_answer(struct conv *c, int slot, const bool *on, pbconv_response *resp)
{
    lua_State *L = c->L;
    enum kind kind = phases[c->phase].kind;
    Envoy__Service__ExtProc__V3__CommonResponse__ResponseStatus status =
        ENVOY__SERVICE__EXT_PROC__V3__COMMON_RESPONSE__RESPONSE_STATUS__CONTINUE;
    if (on[K_STATUS]) {
        const char *s = lua_tostring(L, slot + K_STATUS);
        if (strcmp(s, "CONTINUE_AND_REPLACE") == 0)
            status = ENVOY__SERVICE__EXT_PROC__V3__COMMON_RESPONSE__RESPONSE_STATUS__CONTINUE_AND_REPLACE;
        else if (strcmp(s, "CONTINUE") != 0)
            return bad(c, "bad value for 'status': '%.64s' (expected \"CONTINUE\" or "
                          "\"CONTINUE_AND_REPLACE\")", s);
    }
    if (on[K_BODY] && on[K_CLEAR_BODY])
        return bad(c, "'body' and 'clear_body' cannot be combined");
    if (kind == KIND_HEADERS && on[K_BODY] &&
        status != ENVOY__SERVICE__EXT_PROC__V3__COMMON_RESPONSE__RESPONSE_STATUS__CONTINUE_AND_REPLACE)
        return bad(c, "'body' in a headers response needs status = \"CONTINUE_AND_REPLACE\"");

    HeaderMutation *hm;
    if (header_mutation(c, on[K_ADD] ? slot + K_ADD : 0, "add",
                        on[K_APPEND_ACTION] ? slot + K_APPEND_ACTION : 0, "append_action",
                        on[K_REMOVE] ? slot + K_REMOVE : 0, &hm) != 0)
        return -1;
    if (kind == KIND_BODY && c->in->length_follows_body && (on[K_BODY] || on[K_CLEAR_BODY]) &&
        length_follows(c, on[K_BODY] ? slot + K_BODY : 0, &hm) != 0)
        return -1;

    CommonResponse *cr = NULL;
    if (kind != KIND_TRAILERS &&
        (hm != NULL || on[K_CLEAR_ROUTE_CACHE] || on[K_BODY] || on[K_CLEAR_BODY] ||
         status != ENVOY__SERVICE__EXT_PROC__V3__COMMON_RESPONSE__RESPONSE_STATUS__CONTINUE)) {
        cr = arena_alloc(c->a, sizeof *cr);
        if (cr == NULL)
            return nomem(c);
        envoy__service__ext_proc__v3__common_response__init(cr);
        cr->status = status;
        cr->header_mutation = hm;
        cr->clear_route_cache = on[K_CLEAR_ROUTE_CACHE];
        if (on[K_BODY] || on[K_CLEAR_BODY]) {
            BodyMutation *bm = arena_alloc(c->a, sizeof *bm);
            if (bm == NULL)
                return nomem(c);
            envoy__service__ext_proc__v3__body_mutation__init(bm);
            if (on[K_BODY]) {
                size_t len;
                const char *b = lua_tolstring(L, slot + K_BODY, &len);
                bm->mutation_case = ENVOY__SERVICE__EXT_PROC__V3__BODY_MUTATION__MUTATION_BODY;
                bm->body.data = (uint8_t *)b;
                bm->body.len = len;
            } else {
                bm->mutation_case = ENVOY__SERVICE__EXT_PROC__V3__BODY_MUTATION__MUTATION_CLEAR_BODY;
                bm->clear_body = 1;
            }
            cr->body_mutation = bm;
        }
    }
    if (set_phase(resp, c->phase, cr, kind == KIND_TRAILERS ? hm : NULL, c->a) != 0)
        return nomem(c);
    return 0;
}

/* Whether key k, which the answer's kind does not take, is taken anyway because the
 * headers response is held: a full duplex body handler's header changes then go there
 * (or, once it went, too_late says why they cannot). */
static bool held_header_key(const struct conv *c, int k)
{
    return (c->in->headers_held || c->in->headers_went) &&
           (k == K_ADD || k == K_REMOVE || k == K_APPEND_ACTION);
}

/* A body answer's header changes after the held headers response went with an earlier
 * chunk's answer: Envoy applies a body response's header changes only in BUFFERED and
 * BUFFERED_PARTIAL, so here they would be lost. The error says where the headers went and
 * how to hold them longer. 0: none asked for. */
static int too_late(struct conv *c, const bool *on)
{
    static const int keys[] = {K_ADD, K_REMOVE, K_APPEND_ACTION, K_CLEAR_ROUTE_CACHE};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        if (!on[keys[i]])
            continue;
        const char *dir = c->phase == PBCONV_REQUEST_BODY ? "request" : "response";
        if (c->in->full_duplex)
            return bad(c, "'%s': the %s headers response (held by wait_for_body) already went "
                          "with chunk %u's answer, and Envoy applies no header changes of a "
                          "streamed body response; to hold it longer, return chunks = {} "
                          "(keeping the chunks in ctx.state) until you have decided, then "
                          "send them with the changes", top[keys[i]].name, dir,
                       c->in->headers_went);
        return bad(c, "'%s': the %s headers response (held by wait_for_body) already went "
                      "with chunk %u's answer, and Envoy applies no header changes of a "
                      "STREAMED body response; in STREAMED every chunk is answered, so decide "
                      "on the first chunk (or use FULL_DUPLEX_STREAMED, where chunks = {} "
                      "holds longer, or BUFFERED)", top[keys[i]].name, dir, c->in->headers_went);
    }
    return 0;
}

/* With the headers response held, a body handler's add/remove/append_action and
 * clear_route_cache belong to it (Envoy applies header mutations of a headers response;
 * a streamed body response's are ignored): they go to res and are turned off in `on`,
 * so the body answer is built without them. */
static int take_held_changes(struct conv *c, int slot, bool *on, struct pbconv_result *res)
{
    if (header_mutation(c, on[K_ADD] ? slot + K_ADD : 0, "add",
                        on[K_APPEND_ACTION] ? slot + K_APPEND_ACTION : 0, "append_action",
                        on[K_REMOVE] ? slot + K_REMOVE : 0, &res->held_mutation) != 0)
        return -1;
    res->held_clear_route_cache = on[K_CLEAR_ROUTE_CACHE];
    on[K_ADD] = on[K_REMOVE] = on[K_APPEND_ACTION] = on[K_CLEAR_ROUTE_CACHE] = false;
    return 0;
}

/* `request_drain = true`: on the last message of the answer, after which Envoy stops
 * sending body and half-closes; the caller echoes the rest (res->request_drain). */
static int request_drain(struct conv *c, pbconv_response *resps, size_t n,
                         struct pbconv_result *res)
{
    if (n == 0)
        return bad(c, "'request_drain' needs a message to travel with, and this answer "
                      "sends none (chunks = {} without end_of_stream)");
    resps[n - 1].request_drain = 1;
    res->request_drain = true;
    return 0;
}

/* The return table at t, its values moved to slots slot..slot+K_COUNT-1. */
static int convert(struct conv *c, int t, int slot, pbconv_response **out, size_t *n,
                   struct pbconv_result *res, bool *deny)
{
    lua_State *L = c->L;
    const char *names[K_COUNT];
    for (int k = 0; k < K_COUNT; k++)
        names[k] = top[k].name;
    if (scan_keys(c, t, names, K_COUNT, slot, "") != 0)
        return -1;

    unsigned kind = c->in->full_duplex ? KIND_STREAM : phases[c->phase].kind;
    bool on[K_COUNT];       /* present and not false: `clear_body = false` means "off" */
    bool present[K_COUNT];  /* present at all (`end_of_stream = false` means something) */
    for (int k = 0; k < K_COUNT; k++) {
        int ty = lua_type(L, slot + k);
        on[k] = present[k] = false;
        if (ty == LUA_TNIL)
            continue;
        if (!(top[k].kinds & kind) && !held_header_key(c, k)) {
            if (kind == KIND_STREAM)
                return bad(c, "'%s' is not allowed in %s in %s mode (see docs/streaming.md)",
                           top[k].name, phases[c->phase].name,
                           c->in->grpc ? "GRPC" : "FULL_DUPLEX_STREAMED");
            if (k == K_REQUEST_DRAIN)
                return bad(c, "'request_drain' is allowed only in body phases in "
                              "FULL_DUPLEX_STREAMED or GRPC mode (where Envoy defines it), "
                              "not in %s", phases[c->phase].name);
            if (top[k].kinds == KIND_STREAM)
                return bad(c, "'%s' is allowed only in body phases in FULL_DUPLEX_STREAMED "
                              "mode, not in %s", top[k].name, phases[c->phase].name);
            return bad(c, "'%s' is not allowed in %s", top[k].name, phases[c->phase].name);
        }
        if (k == K_DENY ? ty != LUA_TSTRING && ty != LUA_TBOOLEAN : ty != top[k].type)
            return bad(c, "'%s' must be %s%s, got %s", top[k].name, k == K_DENY ? "" : "a ",
                       k == K_DENY ? "a string or true" : lua_typename(L, top[k].type),
                       lua_typename(L, ty));
        present[k] = true;
        on[k] = ty != LUA_TBOOLEAN || lua_toboolean(L, slot + k);
    }

    if (on[K_DENY]) {
        for (int k = 0; k < K_COUNT; k++)
            if (k != K_DENY && on[k])
                return bad(c, "'deny' cannot be combined with '%s'", top[k].name);
        if (lua_type(L, slot + K_DENY) == LUA_TSTRING) {
            res->deny_message = lua_tolstring(L, slot + K_DENY, &res->deny_len);
        } else {
            res->deny_message = "Callout DENIED.";
            res->deny_len = strlen(res->deny_message);
        }
        *deny = true;
        return 0;
    }

    /* continue unless some key asks for something (a false boolean asks for nothing) */
    res->answer = on[K_IMMEDIATE] ? PBCONV_ANSWER_IMMEDIATE : PBCONV_ANSWER_CONTINUE;
    for (int k = 0; k < K_COUNT && res->answer == PBCONV_ANSWER_CONTINUE; k++)
        if (on[k] && k != K_WAIT_FOR_BODY)
            res->answer = PBCONV_ANSWER_MUTATE;
    res->wait_for_body = on[K_WAIT_FOR_BODY];

    pbconv_response *resps = NULL;
    if (!on[K_IMMEDIATE] && !c->in->headers_held && c->in->headers_went &&
        (kind == KIND_BODY || kind == KIND_STREAM) && too_late(c, on) != 0)
        return -1;
    if (!on[K_IMMEDIATE] && c->in->headers_held && (kind == KIND_BODY || kind == KIND_STREAM) &&
        take_held_changes(c, slot, on, res) != 0)
        return -1;
    if (c->in->local_reply_open && !on[K_IMMEDIATE]) {
        for (int k = 0; k < K_COUNT; k++)
            if ((top[k].flags & MUTATION) && present[k])
                return bad(c, "'%s': a streamed local response is open on this stream; "
                              "continue it with immediate = { body, chunks, trailers, "
                              "end_of_stream } or return nil", top[k].name);
        if (local_continue(c, 0, &resps, n, res) != 0)
            return -1;
    } else if (on[K_IMMEDIATE]) {
        for (int k = 0; k < K_COUNT; k++)
            if ((top[k].flags & MUTATION) && present[k] && (on[k] || k == K_END_OF_STREAM))
                return bad(c, "'immediate' cannot be combined with '%s'", top[k].name);
        resps = arena_alloc(c->a, sizeof *resps);
        if (resps == NULL)
            return nomem(c);
        envoy__service__ext_proc__v3__processing_response__init(resps);
        *n = 1;
        if (immediate(c, slot + K_IMMEDIATE, resps, &resps, n) != 0)
            return -1;
    } else if (kind == KIND_STREAM) {
        if (stream_answer(c, slot, on, present, &resps, n) != 0)
            return -1;
    } else {
        resps = arena_alloc(c->a, sizeof *resps);
        if (resps == NULL)
            return nomem(c);
        envoy__service__ext_proc__v3__processing_response__init(resps);
        if (phase_answer(c, slot, on, resps) != 0)
            return -1;
        *n = 1;
    }
    *out = resps;

    /* ProcessingResponse-level keys ride on the first message sent */
    static const int extras[] = {K_DYNAMIC_METADATA, K_MODE_OVERRIDE, K_OVERRIDE_MESSAGE_TIMEOUT};
    for (size_t i = 0; i < sizeof extras / sizeof extras[0]; i++)
        if (present[extras[i]] && *n == 0)
            return bad(c, "'%s' needs a message to travel with, and this answer sends none "
                          "(chunks = {} without end_of_stream)", top[extras[i]].name);
    if (present[K_DYNAMIC_METADATA]) {
        char sub[512];
        if (pbstruct_from_lua(L, slot + K_DYNAMIC_METADATA, "dynamic_metadata", c->a,
                              &resps[0].dynamic_metadata, sub, sizeof sub) != 0)
            return bad(c, "%s", sub);
    }
    if (present[K_MODE_OVERRIDE] &&
        mode_override(c, slot + K_MODE_OVERRIDE, &resps[0].mode_override) != 0)
        return -1;
    if (present[K_OVERRIDE_MESSAGE_TIMEOUT] &&
        message_timeout(c, slot + K_OVERRIDE_MESSAGE_TIMEOUT, &resps[0].override_message_timeout) != 0)
        return -1;
    if (on[K_REQUEST_DRAIN] && request_drain(c, resps, *n, res) != 0)
        return -1;
    return 0;
}

enum pbconv_status pbconv_to_responses(lua_State *L, int idx, const struct pbconv_in *in,
                                       struct arena *a, pbconv_response **out, size_t *n,
                                       struct pbconv_result *res, char *err, size_t errlen)
{
    idx = lua_absindex(L, idx);
    memset(res, 0, sizeof *res);
    *out = NULL;
    *n = 0;
    if (errlen > 0)
        err[0] = '\0';

    int type = lua_type(L, idx);
    if (type != LUA_TNIL && type != LUA_TTABLE) {
        snprintf(err, errlen, "%s returned a %s, expected a table or nil",
                 phases[in->phase].handler, lua_typename(L, type));
        return PBCONV_BAD;
    }
    /* the top-level slots, the immediate slots, and a few working values on top */
    luaL_checkstack(L, K_COUNT + I_COUNT + 8, "converting a handler result");
    int top = lua_gettop(L);
    struct conv c = {.L = L, .a = a, .phase = in->phase, .in = in, .res = res};
    checks_err_init(&c.e, err, errlen, NULL);
    c.e.lead_name = phases[in->phase].handler;
    c.e.lead_text = " returned a bad table: ";
    bool deny = false;
    int rc;
    if (type == LUA_TNIL) {
        /* nil is {}: every key absent (built without a table: the common case) */
        bool none[K_COUNT] = {false};
        if (in->local_reply_open) {
            rc = local_continue(&c, 0, out, n, res);
        } else if (in->full_duplex) {
            rc = stream_answer(&c, 0, none, none, out, n);
        } else {
            *out = arena_alloc(a, sizeof **out);
            rc = *out != NULL && pbconv_empty_response(*out, in->phase, a) == 0 ? 0 : nomem(&c);
            *n = 1;
        }
    } else {
        lua_settop(L, top + K_COUNT);
        rc = convert(&c, idx, top + 1, out, n, res, &deny);
    }
    lua_settop(L, top);
    if (rc != 0) {
        *out = NULL;
        *n = 0;
        return c.nomem ? PBCONV_NOMEM : PBCONV_BAD;
    }
    return deny ? PBCONV_DENY : PBCONV_OK;
}

enum pbconv_status pbconv_to_response(lua_State *L, int idx, enum pbconv_phase phase,
                                      struct arena *a, pbconv_response *resp,
                                      struct pbconv_result *res, char *err, size_t errlen)
{
    struct pbconv_in in = {.phase = phase};
    pbconv_response *out;
    size_t n;
    envoy__service__ext_proc__v3__processing_response__init(resp);
    enum pbconv_status st = pbconv_to_responses(L, idx, &in, a, &out, &n, res, err, errlen);
    if (st == PBCONV_OK && n == 1)
        *resp = out[0];
    return st;
}
