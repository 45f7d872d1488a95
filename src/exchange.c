/* exchange.c — see exchange.h. */
#include "exchange.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lauxlib.h>
#include <lualib.h>

#include "exchange_native.h"
#include "json.h"

/* generated from lua/callout/exchange.lua */
extern const char luamod_exchange[];
extern const size_t luamod_exchange_len;

/* A request file is read whole; larger than this is not a hand-written or recorded file. */
#define EXCHANGE_MAX_FILE ((size_t)256 << 20)

struct exchange {
    lua_State *L;
    int module;        /* registry reference of callout.exchange */
    int encode;        /* and of callout.json's encode */
};

static int open_native(lua_State *L)
{
    lua_newtable(L);
    exchange_native_register(L);
    luaL_requiref(L, "callout.json", ljson_open, 0);
    lua_setfield(L, -2, "json");
    return 1;
}

static int open_exchange(lua_State *L)
{
    if (luaL_loadbufferx(L, luamod_exchange, luamod_exchange_len, "=callout.exchange", "t") !=
        LUA_OK)
        return lua_error(L);
    lua_call(L, 0, 1);
    return 1;
}

/* Builds the state inside a protected call: every allocation may raise. */
static int setup(lua_State *L)
{
    static const luaL_Reg libs[] = {
        {LUA_GNAME, luaopen_base},     {LUA_LOADLIBNAME, luaopen_package},
        {LUA_TABLIBNAME, luaopen_table}, {LUA_STRLIBNAME, luaopen_string},
        {LUA_MATHLIBNAME, luaopen_math}, {LUA_UTF8LIBNAME, luaopen_utf8},
        {NULL, NULL},
    };
    for (const luaL_Reg *l = libs; l->func; l++) {
        luaL_requiref(L, l->name, l->func, 1);
        lua_pop(L, 1);
    }
    luaL_requiref(L, "callout.json", ljson_open, 0);
    lua_pop(L, 1);
    luaL_requiref(L, "callout.native", open_native, 0);
    lua_pop(L, 1);
    luaL_requiref(L, "callout.exchange", open_exchange, 0);
    return 1;
}

static int traceback(lua_State *L)
{
    const char *msg = lua_tostring(L, 1);
    lua_pushstring(L, msg ? msg : "(error object is not a string)");
    return 1;
}

struct exchange *exchange_new(char *err, size_t errlen)
{
    struct exchange *x = calloc(1, sizeof *x);
    lua_State *L = x ? luaL_newstate() : NULL;
    if (!L) {
        free(x);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    x->L = L;
    lua_pushcfunction(L, traceback);
    lua_pushcfunction(L, setup);
    if (lua_pcall(L, 0, 1, 1) != LUA_OK) {
        snprintf(err, errlen, "callout.exchange: %s", lua_tostring(L, -1));
        exchange_free(x);
        return NULL;
    }
    x->module = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    lua_getfield(L, -1, "callout.json");
    lua_getfield(L, -1, "encode");
    x->encode = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_settop(L, 0);
    return x;
}

void exchange_free(struct exchange *x)
{
    if (!x)
        return;
    if (x->L)
        lua_close(x->L);
    free(x);
}

/* Calls the function below its nargs arguments (the message handler at 1), then json.encode
 * on its result; the text malloc'd. NULL with err on failure. */
static char *call_encode(struct exchange *x, int nargs, size_t *outlen, char *err, size_t errlen)
{
    lua_State *L = x->L;
    if (lua_pcall(L, nargs, 1, 1) != LUA_OK) {
        snprintf(err, errlen, "%s", lua_tostring(L, -1));
        lua_settop(L, 0);
        return NULL;
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, x->encode);
    lua_insert(L, -2);
    if (lua_pcall(L, 1, 1, 1) != LUA_OK) {
        snprintf(err, errlen, "%s", lua_tostring(L, -1));
        lua_settop(L, 0);
        return NULL;
    }
    size_t n;
    const char *s = lua_tolstring(L, -1, &n);
    char *out = malloc(n + 1);
    if (out) {
        memcpy(out, s, n + 1);
        *outlen = n;
    } else {
        snprintf(err, errlen, "out of memory");
    }
    lua_settop(L, 0);
    return out;
}

/* (fn, bytes pointer, length): fn(the bytes as a string), inside the protected call. */
static int call_with_bytes(lua_State *L)
{
    const char *p = lua_touserdata(L, 2);
    size_t n = (size_t)lua_tointeger(L, 3);
    lua_settop(L, 1);
    lua_pushlstring(L, p, n);
    lua_call(L, 1, 1);
    return 1;
}

char *exchange_response_line(struct exchange *x, const uint8_t *msg, size_t len, size_t *outlen,
                             char *err, size_t errlen)
{
    lua_State *L = x->L;
    lua_settop(L, 0);
    lua_pushcfunction(L, traceback);
    lua_pushcfunction(L, call_with_bytes);
    lua_rawgeti(L, LUA_REGISTRYINDEX, x->module);
    lua_getfield(L, -1, "response_json");
    lua_remove(L, -2);
    lua_pushlightuserdata(L, (void *)msg);
    lua_pushinteger(L, (lua_Integer)len);
    return call_encode(x, 3, outlen, err, errlen);
}

static int status_value(lua_State *L)
{
    int stream = (int)lua_tointeger(L, 4);
    lua_settop(L, 3);
    lua_call(L, 2, 1);     /* exchange.status(code, message) */
    lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    lua_getfield(L, -1, "callout.json");
    lua_getfield(L, -1, "object");
    lua_call(L, 0, 1);
    if (stream > 0) {
        lua_pushinteger(L, stream);
        lua_setfield(L, -2, "stream");
    }
    lua_pushvalue(L, -4);
    lua_setfield(L, -2, "status");
    return 1;
}

char *exchange_status_line(struct exchange *x, int code, const char *message, int stream,
                           size_t *outlen)
{
    char err[256];
    lua_State *L = x->L;
    lua_settop(L, 0);
    lua_pushcfunction(L, traceback);
    lua_pushcfunction(L, status_value);
    lua_rawgeti(L, LUA_REGISTRYINDEX, x->module);
    lua_getfield(L, -1, "status");
    lua_remove(L, -2);
    lua_pushinteger(L, code);
    lua_pushstring(L, message ? message : "");
    lua_pushinteger(L, stream);
    return call_encode(x, 4, outlen, err, sizeof err);
}

/* ---- request files ------------------------------------------------------------------------ */

static char *read_all(const char *path, size_t *len, char *err, size_t errlen)
{
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    for (size_t got; buf && (got = fread(buf + n, 1, cap - n, f)) > 0;) {
        n += got;
        if (n == cap) {
            char *p = cap >= EXCHANGE_MAX_FILE ? NULL : realloc(buf, cap * 2);
            if (!p) {
                free(buf);
                buf = NULL;
                snprintf(err, errlen, "%s: larger than %zu MiB", path, EXCHANGE_MAX_FILE >> 20);
            }
            buf = p;
            cap *= 2;
        }
    }
    if (buf && ferror(f)) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        free(buf);
        buf = NULL;
    } else if (!buf && !err[0]) {
        snprintf(err, errlen, "out of memory");
    }
    if (f != stdin)
        fclose(f);
    *len = n;
    return buf;
}

/* (module, text, len, name): streams = exchange.streams(text, name); each ->
 * exchange.stream_bytes(stream, name).
 * Leaves a list of lists of bytes, with the line of each stream at [i].line. */
static int read_streams(lua_State *L)
{
    const char *text = lua_touserdata(L, 2);
    size_t len = (size_t)lua_tointeger(L, 3);
    const char *name = lua_touserdata(L, 4);
    lua_settop(L, 1);
    lua_pushlstring(L, text, len);
    lua_pushstring(L, name);
    lua_getfield(L, 1, "streams");
    lua_pushvalue(L, 2);
    lua_pushvalue(L, 3);
    lua_call(L, 2, 1);
    int streams = lua_gettop(L);
    lua_newtable(L);
    lua_Integer n = luaL_len(L, streams);
    for (lua_Integer i = 1; i <= n; i++) {
        lua_getfield(L, 1, "stream_bytes");
        lua_geti(L, streams, i);
        lua_pushvalue(L, 3);
        lua_call(L, 2, 1);
        lua_geti(L, streams, i);
        lua_getfield(L, -1, "line");
        lua_setfield(L, -3, "line");
        lua_pop(L, 1);
        lua_seti(L, -2, i);
    }
    return 1;
}

void exchange_msgs_free(struct exchange_msgs *streams, size_t n)
{
    for (size_t i = 0; streams && i < n; i++) {
        for (size_t j = 0; j < streams[i].count; j++)
            free(streams[i].data[j]);
        free(streams[i].data);
        free(streams[i].lens);
    }
    free(streams);
}

int exchange_read_file(struct exchange *x, const char *path, struct exchange_msgs **out,
                       size_t *nout, char *err, size_t errlen)
{
    err[0] = '\0';
    size_t len;
    char *text = read_all(path, &len, err, errlen);
    if (!text)
        return -1;
    int rc = exchange_read_text(x, text, len, strcmp(path, "-") == 0 ? "stdin" : path, out, nout,
                                err, errlen);
    free(text);
    return rc;
}

int exchange_read_text(struct exchange *x, const char *text, size_t len, const char *name,
                       struct exchange_msgs **out, size_t *nout, char *err, size_t errlen)
{
    lua_State *L = x->L;
    lua_settop(L, 0);
    lua_pushcfunction(L, traceback);
    lua_pushcfunction(L, read_streams);
    lua_rawgeti(L, LUA_REGISTRYINDEX, x->module);
    lua_pushlightuserdata(L, (void *)text);   /* made a string inside the protected call */
    lua_pushinteger(L, (lua_Integer)len);
    lua_pushlightuserdata(L, (void *)name);
    if (lua_pcall(L, 4, 1, 1) != LUA_OK) {
        snprintf(err, errlen, "%s", lua_tostring(L, -1));
        lua_settop(L, 0);
        return -1;
    }
    size_t n = (size_t)luaL_len(L, -1);
    struct exchange_msgs *s = calloc(n ? n : 1, sizeof *s);
    int ok = s != NULL;
    for (size_t i = 0; ok && i < n; i++) {
        lua_geti(L, -1, (lua_Integer)i + 1);
        lua_getfield(L, -1, "line");
        s[i].line = (int)lua_tointeger(L, -1);
        lua_pop(L, 1);
        size_t m = (size_t)luaL_len(L, -1);
        s[i].data = calloc(m ? m : 1, sizeof *s[i].data);
        s[i].lens = calloc(m ? m : 1, sizeof *s[i].lens);
        ok = s[i].data && s[i].lens;
        for (size_t j = 0; ok && j < m; j++) {
            lua_geti(L, -1, (lua_Integer)j + 1);
            size_t bl;
            const char *b = lua_tolstring(L, -1, &bl);
            if ((s[i].data[j] = malloc(bl ? bl : 1)) == NULL) {
                ok = 0;
            } else {
                memcpy(s[i].data[j], b, bl);
                s[i].lens[j] = bl;
                s[i].count++;
            }
            lua_pop(L, 1);
        }
        lua_pop(L, 1);
    }
    lua_settop(L, 0);
    if (!ok) {
        exchange_msgs_free(s, n);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    *out = s;
    *nout = n;
    return 0;
}

/* ---- record lines ------------------------------------------------------------------------- */

static void push_bytes_list(lua_State *L, const uint8_t *const *data, const size_t *lens,
                            size_t from, size_t n)
{
    lua_createtable(L, (int)n, 0);
    for (size_t i = 0; i < n; i++) {
        lua_pushlstring(L, (const char *)data[from + i], lens[from + i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
}

struct record_args {
    const struct exchange_capture *c;
    const char *const *redact;
};

/* exchange.record(r, redact) with r built from the capture (args in a light userdata). */
static int record_value(lua_State *L)
{
    const struct record_args *a = lua_touserdata(L, 2);
    const struct exchange_capture *c = a->c;
    lua_settop(L, 1);
    lua_getfield(L, 1, "record");
    lua_createtable(L, 0, 10);
    push_bytes_list(L, c->req, c->req_lens, 0, c->nreq);
    lua_setfield(L, -2, "requests");
    lua_createtable(L, (int)c->nreq, 0);
    for (size_t i = 0, at = 0; i < c->nreq; at += c->nresp[i], i++) {
        push_bytes_list(L, c->resp, c->resp_lens, at, c->nresp[i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    lua_setfield(L, -2, "responses");
    lua_pushinteger(L, c->status);
    lua_setfield(L, -2, "status");
    lua_pushstring(L, c->message ? c->message : "");
    lua_setfield(L, -2, "message");
    char when[40];
    time_t secs = (time_t)c->time;
    struct tm tm;
    gmtime_r(&secs, &tm);
    size_t w = strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(when + w, sizeof when - w, ".%03dZ", (int)((c->time - (double)secs) * 1000) % 1000);
    lua_pushstring(L, when);
    lua_setfield(L, -2, "time");
    if (c->script) {
        lua_pushstring(L, c->script);
        lua_setfield(L, -2, "script");
    }
    if (c->sha256) {
        lua_pushstring(L, c->sha256);
        lua_setfield(L, -2, "sha256");
    }
    lua_pushinteger(L, (lua_Integer)c->generation);
    lua_setfield(L, -2, "generation");
    lua_pushinteger(L, (lua_Integer)c->stream);
    lua_setfield(L, -2, "stream");
    lua_newtable(L);
    for (const char *const *r = a->redact; r && *r; r++) {
        lua_pushstring(L, *r);
        lua_getfield(L, -1, "lower");   /* the string's own method */
        lua_insert(L, -2);
        lua_call(L, 1, 1);
        lua_pushboolean(L, 1);
        lua_rawset(L, -3);
    }
    lua_call(L, 2, 1);
    return 1;
}

char *exchange_record_line(struct exchange *x, const struct exchange_capture *c,
                           const char *const *redact, size_t *outlen, char *err, size_t errlen)
{
    struct record_args a = {c, redact};
    lua_State *L = x->L;
    lua_settop(L, 0);
    lua_pushcfunction(L, traceback);
    lua_pushcfunction(L, record_value);
    lua_rawgeti(L, LUA_REGISTRYINDEX, x->module);
    lua_pushlightuserdata(L, &a);
    return call_encode(x, 2, outlen, err, errlen);
}
