/* script.c — one Lua VM running the user's script; see script.h.
 *
 * Every Lua call goes through docall() (lua.c's pattern): a protected call with a message
 * handler that appends a traceback. The handler also records where the error message ends
 * and the traceback begins, so the gRPC status carries "file:line: msg" while the log gets
 * the whole traceback. script_handle runs its whole Lua part (building the inputs, the
 * handler, the conversion of its result) inside one such call, so no Lua API call that
 * can raise runs unprotected. */
#include "script.h"

#include <assert.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/status.h>
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "arena.h"
#include "log.h"
#include "pbconv.h"

/* Longest gRPC status message we send; longer Lua errors are cut. */
#define MESSAGE_MAX 2048

struct script {
    lua_State *L;
    struct arena arena;   /* the decoded request and the response structs of one call */
    uint8_t *out;         /* packed response, reused across calls */
    size_t out_cap;
    size_t errmsg_len;    /* set by msghandler: length of the message before the traceback */
    char message[MESSAGE_MAX];
};

struct script_stream {
    struct script *s;
    uint64_t id;
    int ctx_ref;  /* the ctx table, in the registry */
};

/* The script a lua_State belongs to lives in the state's extra space, so the message
 * handler can reach it without an upvalue (pushing a closure would allocate per call). */
static struct script *script_of(lua_State *L) { return *(struct script **)lua_getextraspace(L); }

/* Turns any error object into "where: message" + traceback; records the length of the
 * first part in script_of(L)->errmsg_len. */
static int msghandler(lua_State *L)
{
    const char *msg = lua_tostring(L, 1);
    if (msg == NULL) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) {
            msg = lua_tostring(L, -1);
        } else {
            /* error({...}): no message to read, so say what it is and, when a Lua function
             * raised it, where (level 1 is usually the C function `error` itself) */
            const char *where = "";
            for (int level = 1; level <= 2; level++) {
                luaL_where(L, level);
                if (lua_rawlen(L, -1) > 0) {
                    where = lua_tostring(L, -1);
                    break;
                }
                lua_pop(L, 1);
            }
            msg = lua_pushfstring(L, "%s(error object is a %s value)", where,
                                  luaL_typename(L, 1));
        }
    }
    script_of(L)->errmsg_len = strlen(msg);
    luaL_traceback(L, L, msg, 1);
    return 1;
}

/* The one protected entry point for calling Lua.
 * stack before: ... f a1..an   after: ... r1..rn (LUA_OK) or ... err (string) */
static int docall(lua_State *L, int narg, int nres)
{
    int base = lua_gettop(L) - narg;
    script_of(L)->errmsg_len = SIZE_MAX;
    lua_pushcfunction(L, msghandler);
    lua_insert(L, base);
    int status = lua_pcall(L, narg, nres, base);
    lua_remove(L, base);
    return status;
}

/* The error at the top of the stack after a failed docall, split in two: *msg_len is the
 * length of the part for a status message (without the traceback). */
static const char *docall_error(lua_State *L, size_t *msg_len)
{
    size_t len;
    const char *e = lua_tolstring(L, -1, &len);
    if (e == NULL) {
        e = "(error object is not a string)";
        len = strlen(e);
    }
    size_t first = script_of(L)->errmsg_len;
    *msg_len = first <= len ? first : len;  /* no handler ran (memory error): all of it */
    return e;
}

static void copy_message(char *dst, const char *src, size_t len)
{
    if (len > MESSAGE_MAX - 1)
        len = MESSAGE_MAX - 1;
    memcpy(dst, src, len);
    dst[len] = '\0';
}

/* Opens the libraries scripts may use. One by one rather than luaL_openlibs, so the
 * sandbox can be narrowed later by deleting lines. Runs under docall. */
static int open_state(lua_State *L)
{
    static const luaL_Reg libs[] = {
        {LUA_GNAME, luaopen_base},         {LUA_LOADLIBNAME, luaopen_package},
        {LUA_COLIBNAME, luaopen_coroutine}, {LUA_TABLIBNAME, luaopen_table},
        {LUA_IOLIBNAME, luaopen_io},       {LUA_OSLIBNAME, luaopen_os},
        {LUA_STRLIBNAME, luaopen_string},  {LUA_MATHLIBNAME, luaopen_math},
        {LUA_UTF8LIBNAME, luaopen_utf8},   {NULL, NULL},
    };
    for (const luaL_Reg *lib = libs; lib->func != NULL; lib++) {
        luaL_requiref(L, lib->name, lib->func, 1);
        lua_pop(L, 1);
    }
    pbconv_open(L);
    return 0;
}

struct script *script_open(const char *path, char *err, size_t errlen)
{
    struct script *s = calloc(1, sizeof *s);
    if (s == NULL) {
        snprintf(err, errlen, "%s: out of memory", path);
        return NULL;
    }
    arena_init(&s->arena, 0);
    s->L = luaL_newstate();
    if (s->L == NULL) {
        snprintf(err, errlen, "%s: cannot create a Lua state: out of memory", path);
        free(s);
        return NULL;
    }
    lua_State *L = s->L;
    *(struct script **)lua_getextraspace(L) = s;

    lua_pushcfunction(L, open_state);
    int status = docall(L, 0, 0);
    if (status == LUA_OK) {
        /* text only: crafted bytecode can crash the VM */
        status = luaL_loadfilex(L, path, "t");
        if (status == LUA_OK)
            status = docall(L, 0, 0);
        else
            script_of(L)->errmsg_len = SIZE_MAX;  /* a load error has no traceback part */
    }
    if (status != LUA_OK) {
        size_t len;
        const char *e = docall_error(L, &len);
        snprintf(err, errlen, "%.*s", (int)len, e);
        log_debug("loading %s: %s", path, e);
        script_close(s);
        return NULL;
    }
    assert(lua_gettop(L) == 0);
    return s;
}

void script_close(struct script *s)
{
    if (s == NULL)
        return;
    lua_close(s->L);
    arena_destroy(&s->arena);
    free(s->out);
    free(s);
}

/* Builds a ctx table and anchors it in the registry. Runs under docall.
 * stack before: id   after: ref */
static int new_ctx(lua_State *L)
{
    lua_Integer id = lua_tointeger(L, 1);
    lua_createtable(L, 0, 3);
    lua_newtable(L);
    lua_setfield(L, -2, "state");
    lua_pushinteger(L, id);
    lua_setfield(L, -2, "stream_id");
    lua_pushinteger(L, luaL_ref(L, LUA_REGISTRYINDEX));
    return 1;
}

struct script_stream *script_stream_open(struct script *s, uint64_t id)
{
    struct script_stream *st = malloc(sizeof *st);
    if (st == NULL)
        return NULL;
    lua_State *L = s->L;
    lua_pushcfunction(L, new_ctx);
    lua_pushinteger(L, (lua_Integer)id);
    if (docall(L, 1, 1) != LUA_OK) {
        log_error("stream %" PRIu64 ": cannot create its Lua context: %s", id,
                  lua_tostring(L, -1));
        lua_pop(L, 1);
        free(st);
        return NULL;
    }
    st->s = s;
    st->id = id;
    st->ctx_ref = (int)lua_tointeger(L, -1);
    lua_pop(L, 1);
    return st;
}

void script_stream_close(struct script_stream *st)
{
    if (st == NULL)
        return;
    luaL_unref(st->s->L, LUA_REGISTRYINDEX, st->ctx_ref);
    free(st);
}

/* What run_handler needs and what it found out. */
struct call {
    struct script_stream *st;
    const pbconv_request *req;
    enum pbconv_phase phase;
    pbconv_response *resp;
    struct pbconv_result res;
    enum pbconv_status status;
    char err[1152];  /* PBCONV_BAD: "file:line: on_x returned a bad table: ..." */
};

/* The protected part of script_handle: calls the phase's handler and converts its result
 * into c->resp. The result is returned so it stays on the stack, anchoring the strings
 * c->resp points to, until the response has been packed.
 * stack before: lightuserdata(call)   after: result (nil when there is no handler) */
static int run_handler(lua_State *L)
{
    struct call *c = lua_touserdata(L, 1);
    struct arena *a = &c->st->s->arena;
    lua_settop(L, 0);
    /* raw lookup: a "strict" metatable on _G must not turn a missing handler into an error */
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
    lua_pushstring(L, pbconv_handler_name(c->phase));
    if (lua_rawget(L, 1) != LUA_TFUNCTION) {
        c->status = pbconv_empty_response(c->resp, c->phase, a) == 0 ? PBCONV_OK : PBCONV_NOMEM;
        lua_pushnil(L);
        return 1;
    }
    lua_replace(L, 1);   /* handler */
    lua_pushvalue(L, 1); /* handler handler: the copy names the handler in errors */
    pbconv_push_input(L, c->req, c->phase);
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->st->ctx_ref);
    lua_pushliteral(L, "phase");
    lua_pushstring(L, pbconv_phase_name(c->phase));
    lua_rawset(L, -3);
    lua_call(L, 2, 1);   /* handler result */

    char detail[1024];
    c->status = pbconv_to_response(L, 2, c->phase, a, c->resp, &c->res, detail, sizeof detail);
    if (c->status == PBCONV_BAD) {
        lua_Debug ar;
        lua_pushvalue(L, 1);
        lua_getinfo(L, ">S", &ar);
        snprintf(c->err, sizeof c->err, "%s:%d: %s", ar.short_src, ar.linedefined, detail);
    }
    return 1;
}

static void fail(struct script *s, struct script_reply *reply, int status, const char *msg,
                 size_t len)
{
    copy_message(s->message, msg, len);
    reply->outcome = SCRIPT_FAIL;
    reply->status = status;
    reply->message = s->message;
}

/* Packs resp into s->out. 0, or -1 when the buffer cannot grow. */
static int pack(struct script *s, const pbconv_response *resp, struct script_reply *reply)
{
    size_t need = protobuf_c_message_get_packed_size(&resp->base);
    if (need > s->out_cap || s->out == NULL) {
        size_t cap = s->out_cap * 2;
        if (cap < need)
            cap = need;
        if (cap < 256)
            cap = 256;
        uint8_t *p = realloc(s->out, cap);
        if (p == NULL)
            return -1;
        s->out = p;
        s->out_cap = cap;
    }
    reply->outcome = SCRIPT_RESPOND;
    reply->data = s->out;
    reply->len = protobuf_c_message_pack(&resp->base, s->out);
    reply->count = 1;
    reply->lens = &reply->len;
    return 0;
}

void script_handle(struct script_stream *st, const uint8_t *msg, size_t len,
                   struct script_reply *reply)
{
    struct script *s = st->s;
    lua_State *L = s->L;
    int top = lua_gettop(L);
    memset(reply, 0, sizeof *reply);

    ProtobufCAllocator alloc = arena_pb_allocator(&s->arena);
    pbconv_request *req = envoy__service__ext_proc__v3__processing_request__unpack(&alloc, len, msg);
    enum pbconv_phase phase;
    if (req == NULL) {
        log_warn("stream %" PRIu64 ": malformed ProcessingRequest (%zu bytes)", st->id, len);
        static const char m[] = "malformed ProcessingRequest";
        fail(s, reply, GRPC_STATUS_INVALID_ARGUMENT, m, sizeof m - 1);
        goto done;
    }
    if (pbconv_phase_of(req, &phase) != 0) {
        log_warn("stream %" PRIu64 ": ProcessingRequest with no phase set", st->id);
        static const char m[] = "ProcessingRequest carries no headers, body or trailers";
        fail(s, reply, GRPC_STATUS_INVALID_ARGUMENT, m, sizeof m - 1);
        goto done;
    }

    pbconv_response resp;
    struct call c = {.st = st, .req = req, .phase = phase, .resp = &resp};
    lua_pushcfunction(L, run_handler);
    lua_pushlightuserdata(L, &c);
    int status = docall(L, 1, 1);
    bool observe = req->observability_mode;
    if (status != LUA_OK) {
        size_t mlen;
        const char *e = docall_error(L, &mlen);
        log_error("stream %" PRIu64 ": %s failed: %s", st->id, pbconv_handler_name(phase), e);
        if (!observe)
            fail(s, reply, GRPC_STATUS_INTERNAL, e, mlen);
    } else if (c.status == PBCONV_BAD) {
        log_error("stream %" PRIu64 ": %s", st->id, c.err);
        if (!observe)
            fail(s, reply, GRPC_STATUS_INTERNAL, c.err, strlen(c.err));
    } else if (c.status == PBCONV_NOMEM) {
        log_error("stream %" PRIu64 ": out of memory building the response", st->id);
        if (!observe)
            fail(s, reply, GRPC_STATUS_INTERNAL, "out of memory", strlen("out of memory"));
    } else if (observe) {
        /* Envoy does not wait for an answer in observability mode */
    } else if (c.status == PBCONV_DENY) {
        log_info("stream %" PRIu64 ": %s denied the request", st->id, pbconv_handler_name(phase));
        fail(s, reply, GRPC_STATUS_PERMISSION_DENIED, c.res.deny_message, c.res.deny_len);
    } else if (pack(s, &resp, reply) != 0) {
        log_error("stream %" PRIu64 ": out of memory packing the response", st->id);
        fail(s, reply, GRPC_STATUS_INTERNAL, "out of memory", strlen("out of memory"));
    }
    if (observe)
        reply->outcome = SCRIPT_NO_RESPONSE;
    lua_pop(L, 1);  /* the handler's result, or the error */

done:
    assert(lua_gettop(L) == top);
    (void)top;
    arena_reset(&s->arena);
}
