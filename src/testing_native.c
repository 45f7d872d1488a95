/* testing_native.c — `callout.native`, the test-only Lua C module behind callout.testing
 * (lua/callout/testing.lua), in the spirit of Lua's ltests.c. It runs a script through
 * exactly what the server runs — generation_load, dispatch_stream_open, dispatch_handle
 * on bytes of a ProcessingRequest — and exposes the whole-message converters (pbreflect.h)
 * so a spec can build request bytes from a table and read response bytes back as a table.
 *
 * It is loaded by the stock lua5.4 interpreter (busted), which provides the Lua API: the
 * module must not link liblua, or two copies of Lua would share one process. Each loaded
 * script is its own VM, separate from the interpreter's state, exactly as in a worker.
 *
 *   native.load(path)               -> script | nil, "file:line: msg"
 *   native.stream(script)           -> stream (ids 1, 2, ... per script)
 *   native.handle(stream, bytes)    -> "respond", {bytes...} | "none" | "fail", status, msg
 *   native.logs()                   -> the server log lines of the last load/handle call
 *   native.encode_request, decode_request, decode_response, base64_encode, base64_decode
 *                                   -> exchange_native.h (shared with the binary)
 *   native.http_status(name)        -> the number of an envoy.type.v3.StatusCode name
 *   native.null                     -> callout.null of decoded Struct values
 * script:close(), stream:close() (also __close/__gc) free them early. */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "log.h"
#include "exchange_native.h"
#include "pbstruct.h"
#include "dispatch.h"
#include "generation.h"
#include "json.h"
#include "vm.h"

#include "envoy/service/ext_proc/v3/external_processor.pb-c.h"
#include "envoy/type/v3/http_status.pb-c.h"

#define SCRIPT_MT "callout.native.script"
#define STREAM_MT "callout.native.stream"
#define LOGS_MT "callout.native.logs"
#define LOGS_SENTINEL "callout.native.logs sentinel"

/* ---- log lines ---------------------------------------------------------------------------
 * The server logs to stderr; under busted that would scatter warnings of expected denials
 * through the report. The lines of one call are collected here instead and handed to Lua
 * by native.logs(). Records: level (1 byte), length (size_t), bytes. */

static struct {
    char *buf;
    size_t len, cap;
} logs;

static void log_sink(void *ud, enum log_level level, const char *msg, size_t len)
{
    (void)ud;
    size_t need = logs.len + 1 + sizeof len + len;
    if (need > logs.cap) {
        size_t cap = logs.cap ? logs.cap * 2 : 1024;
        while (cap < need)
            cap *= 2;
        char *p = realloc(logs.buf, cap);
        if (p == NULL)
            return;  /* a lost log line is not worth failing a test for */
        logs.buf = p;
        logs.cap = cap;
    }
    logs.buf[logs.len++] = (char)level;
    memcpy(logs.buf + logs.len, &len, sizeof len);
    logs.len += sizeof len;
    memcpy(logs.buf + logs.len, msg, len);
    logs.len += len;
}

/* __gc of a sentinel the module anchors in the registry: it runs when the interpreter's
 * state closes, before the module is unloaded (objects are finalized in reverse order of
 * creation, and the package library's handle of this module is older). */
static int logs_gc(lua_State *L)
{
    (void)L;
    log_set_sink(NULL, NULL);
    free(logs.buf);
    logs.buf = NULL;
    logs.len = logs.cap = 0;
    return 0;
}

/* native.logs() -> { "WARN stream 1: ...", ... } */
static int native_logs(lua_State *L)
{
    static const char *const names[] = {"DEBUG", "INFO", "WARN", "ERROR"};
    lua_newtable(L);
    lua_Integer i = 0;
    for (size_t at = 0; at < logs.len;) {
        unsigned level = (unsigned char)logs.buf[at++];
        size_t len;
        memcpy(&len, logs.buf + at, sizeof len);
        at += sizeof len;
        luaL_Buffer b;
        luaL_buffinit(L, &b);
        luaL_addstring(&b, level < 4 ? names[level] : "?");
        luaL_addchar(&b, ' ');
        luaL_addlstring(&b, logs.buf + at, len);
        luaL_pushresult(&b);
        lua_rawseti(L, -2, ++i);
        at += len;
    }
    return 1;
}

/* ---- scripts and streams ------------------------------------------------------------------
 * A stream holds its script in its user value, so the script outlives its streams whatever
 * the collector does; `streams` also keeps an explicitly closed script's VM open until its
 * last stream is closed, so no finalizer order can free a VM under a stream. */

struct lscript {
    struct vm *s;      /* NULL before the load succeeded and once freed */
    int streams;       /* open streams on s */
    bool closed;       /* close() or __gc ran: free s when streams reaches 0 */
    uint64_t next_id;
};

struct lstream {
    struct lscript *owner;  /* NULL once closed */
    struct dispatch_stream *st;
};

static void lscript_release(struct lscript *ls)
{
    if (ls->closed && ls->streams == 0 && ls->s != NULL) {
        vm_close(ls->s);
        ls->s = NULL;
    }
}

static struct lscript *check_script(lua_State *L, int idx)
{
    struct lscript *ls = luaL_checkudata(L, idx, SCRIPT_MT);
    luaL_argcheck(L, !ls->closed && ls->s != NULL, idx, "the script is closed");
    return ls;
}

/* native.load(path) -> script | nil, "file:line: msg" */
static int native_load(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    /* the userdata first, so __gc is safe whatever happens next */
    struct lscript *ls = lua_newuserdatauv(L, sizeof *ls, 0);
    memset(ls, 0, sizeof *ls);
    luaL_setmetatable(L, SCRIPT_MT);
    logs.len = 0;
    char err[1024];
    if (generation_load(path, 1, &ls->s, 1, err, sizeof err) != 0) {
        ls->s = NULL;
        ls->closed = true;
        luaL_pushfail(L);
        lua_pushstring(L, err);
        return 2;
    }
    return 1;
}

static int script_gc(lua_State *L)
{
    struct lscript *ls = luaL_checkudata(L, 1, SCRIPT_MT);
    ls->closed = true;
    lscript_release(ls);
    return 0;
}

static int script_tostring(lua_State *L)
{
    struct lscript *ls = luaL_checkudata(L, 1, SCRIPT_MT);
    lua_pushfstring(L, ls->closed ? "callout script (closed)" : "callout script (%p)", ls->s);
    return 1;
}

/* native.stream(script) -> stream */
static int native_stream(lua_State *L)
{
    struct lscript *ls = check_script(L, 1);
    struct lstream *ss = lua_newuserdatauv(L, sizeof *ss, 1);
    ss->owner = NULL;
    ss->st = NULL;
    luaL_setmetatable(L, STREAM_MT);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1);
    ss->st = dispatch_stream_open(ls->s, ls->next_id + 1);
    if (ss->st == NULL)
        return luaL_error(L, "cannot open a stream: out of memory");
    ls->next_id++;
    ls->streams++;
    ss->owner = ls;
    return 1;
}

static int stream_gc(lua_State *L)
{
    struct lstream *ss = luaL_checkudata(L, 1, STREAM_MT);
    if (ss->owner != NULL) {
        struct lscript *ls = ss->owner;
        dispatch_stream_close(ss->st);
        ss->st = NULL;
        ss->owner = NULL;
        ls->streams--;
        lscript_release(ls);
    }
    return 0;
}

static int stream_tostring(lua_State *L)
{
    struct lstream *ss = luaL_checkudata(L, 1, STREAM_MT);
    lua_pushstring(L, ss->owner == NULL ? "callout stream (closed)" : "callout stream");
    return 1;
}

/* native.handle(stream, request_bytes)
 *   -> "respond", { response_bytes, ... }  |  "none"  |  "fail", grpc_status, message */
static int native_handle(lua_State *L)
{
    struct lstream *ss = luaL_checkudata(L, 1, STREAM_MT);
    luaL_argcheck(L, ss->owner != NULL, 1, "the stream is closed");
    size_t len;
    const char *msg = luaL_checklstring(L, 2, &len);
    struct dispatch_reply reply;
    logs.len = 0;
    dispatch_handle(ss->st, (const uint8_t *)msg, len, &reply);
    /* reply points into the script's buffers until its next call: copy it out now */
    switch (reply.outcome) {
    case DISPATCH_RESPOND:
        lua_pushliteral(L, "respond");
        lua_createtable(L, reply.count > INT32_MAX ? 0 : (int)reply.count, 0);
        for (size_t i = 0, at = 0; i < reply.count; at += reply.lens[i], i++) {
            lua_pushlstring(L, (const char *)reply.data + at, reply.lens[i]);
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
        return 2;
    case DISPATCH_NO_RESPONSE:
        lua_pushliteral(L, "none");
        return 1;
    case DISPATCH_FAIL:
        lua_pushliteral(L, "fail");
        lua_pushinteger(L, reply.status);
        lua_pushstring(L, reply.message);
        return 3;
    }
    return luaL_error(L, "dispatch_handle returned an unknown outcome %d", (int)reply.outcome);
}

/* native.http_status("Forbidden") -> 403; decoded responses carry the enum's names */
static int native_http_status(lua_State *L)
{
    const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value_by_name(
        &envoy__type__v3__status_code__descriptor, luaL_checkstring(L, 1));
    if (v == NULL)
        luaL_pushfail(L);
    else
        lua_pushinteger(L, v->value);
    return 1;
}

/* ---- the module --------------------------------------------------------------------------- */

static void new_class(lua_State *L, const char *name, lua_CFunction gc, lua_CFunction tostring)
{
    luaL_newmetatable(L, name);
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__gc");
    if (tostring != NULL) {
        lua_pushcfunction(L, gc);
        lua_setfield(L, -2, "__close");
        lua_pushcfunction(L, tostring);
        lua_setfield(L, -2, "__tostring");
        lua_createtable(L, 0, 1);
        lua_pushcfunction(L, gc);
        lua_setfield(L, -2, "close");
        lua_setfield(L, -2, "__index");
    }
    lua_pop(L, 1);
}

int luaopen_callout_native(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        {"load", native_load},
        {"stream", native_stream},
        {"handle", native_handle},
        {"logs", native_logs},
        {"http_status", native_http_status},
        {NULL, NULL},
    };
    new_class(L, SCRIPT_MT, script_gc, script_tostring);
    new_class(L, STREAM_MT, stream_gc, stream_tostring);
    new_class(L, LOGS_MT, logs_gc, NULL);
    /* once per state: busted's insulation makes each spec file require the module again */
    if (lua_getfield(L, LUA_REGISTRYINDEX, LOGS_SENTINEL) == LUA_TNIL) {
        lua_newuserdatauv(L, 0, 0);
        luaL_setmetatable(L, LOGS_MT);
        lua_setfield(L, LUA_REGISTRYINDEX, LOGS_SENTINEL);
    }
    lua_pop(L, 1);
    /* every line reaches the collector, so a spec sees what a server at debug level logs */
    log_set_sink(log_sink, NULL);
    log_set_level(LOG_DEBUG);
    luaL_newlib(L, funcs);
    exchange_native_register(L);
    pbstruct_push_null(L);
    lua_setfield(L, -2, "null");
    /* callout.json itself, so that specs and tests/bench call the server's code directly
     * (scripts reach the same through require "callout.json") */
    ljson_open(L);
    lua_setfield(L, -2, "json");
    return 1;
}
