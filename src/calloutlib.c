/* calloutlib.c — the native part of the `callout` module. lua/callout.lua holds the helpers
 * themselves; this file embeds it (scripts/embed-lua.cmake), registers it in package.preload
 * and hands it the few things Lua cannot do alone: the server log with the stream id (and
 * fields, encoded here with logjson), the
 * JSON null sentinel, and the marker that makes a deny_callout error recognisable from C. */
#include "calloutlib.h"

#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>

#include "json.h"
#include "jwt.h"
#include "log.h"
#include "logjson.h"
#include "pbstruct.h"

/* generated from lua/callout.lua */
extern const char luamod_callout[];
extern const size_t luamod_callout_len;

/* The address of this variable is the registry key of the deny marker's metatable: no
 * string key a script could forge or collide with. */
static const char deny_mt_key = 0;

static const char default_deny[] = "Callout DENIED.";

/* Pushes the level name at idx as a log level; raises on an unknown name. */
static enum log_level check_level(lua_State *L, int idx)
{
    enum log_level level;
    if (log_parse_level(luaL_checkstring(L, idx), &level) != 0)
        luaL_argerror(L, idx, "unknown log level (debug, info, warn, error)");
    return level;
}

/* Names of the server's own fields in a JSON record: a script's fields may not reuse
 * them (a second "msg" in one object is not something every JSON reader handles alike). */
static const char *const reserved[] = {"ts", "level", "severity", "msg", "message", "worker",
                                       "stream_id", "phase", "script", "line", "traceback",
                                       "fields_dropped", NULL};

/* How many table entries one log call's fields may have in all (the encoding runs in C,
 * outside the instruction budget, so it is bounded here as well as by the buffer). */
#define FIELDS_MAX_ENTRIES 256
#define FIELDS_MAX_DEPTH 8

struct fields_enc {
    struct logjson j;
    int entries;
    const char *err;   /* a script mistake: the log call raises it */
};

static void encode_value(lua_State *L, int idx, struct fields_enc *e, int depth);

/* The table at idx as a JSON object, or as an array when its keys are exactly 1..n. */
static void encode_table(lua_State *L, int idx, struct fields_enc *e, int depth)
{
    idx = lua_absindex(L, idx);
    if (depth >= FIELDS_MAX_DEPTH) {
        logjson_string(&e->j, "(nested too deep)", 17, SIZE_MAX);
        return;
    }
    luaL_checkstack(L, 4, "encoding log fields");
    lua_Integer n = (lua_Integer)lua_rawlen(L, idx), count = 0;
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        count++;
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TNUMBER || !lua_isinteger(L, -1) ||
            lua_tointeger(L, -1) < 1 || lua_tointeger(L, -1) > n) {
            lua_pop(L, 1);
            count = -1;
            break;
        }
    }
    bool array = n > 0 && count == n;
    if (!logjson_open(&e->j, array ? '[' : '{'))
        return;
    if (array) {
        for (lua_Integer i = 1; i <= n && !e->j.full && !e->err; i++) {
            lua_rawgeti(L, idx, i);
            encode_value(L, -1, e, depth + 1);
            lua_pop(L, 1);
        }
    } else {
        lua_pushnil(L);
        while (lua_next(L, idx) != 0) {
            /* read the key without lua_tolstring, which would turn a number key into a
             * string in place and break lua_next */
            char num[32];
            const char *key;
            size_t klen;
            if (lua_type(L, -2) == LUA_TSTRING) {
                key = lua_tolstring(L, -2, &klen);
            } else if (lua_isinteger(L, -2)) {
                klen = (size_t)snprintf(num, sizeof num, "%lld", (long long)lua_tointeger(L, -2));
                key = num;
            } else {
                e->err = "field names must be strings";
                lua_pop(L, 2);
                break;
            }
            if (depth == 0) {
                for (const char *const *r = reserved; *r; r++) {
                    if (strlen(*r) == klen && memcmp(*r, key, klen) == 0) {
                        e->err = "a field may not be called ts, level, severity, msg, "
                                 "message, worker, stream_id, phase, script, line, "
                                 "traceback or fields_dropped: the server writes those";
                        break;
                    }
                }
            }
            struct logjson_mark m = logjson_mark(&e->j);
            if (!e->err && logjson_key(&e->j, key, klen))
                encode_value(L, -1, e, depth + 1);
            if (e->j.full)
                logjson_rewind(&e->j, m);
            lua_pop(L, 1);
            if (e->err || e->j.full) {
                lua_pop(L, 1);   /* the key: lua_next is not called again */
                break;
            }
        }
    }
    logjson_close(&e->j);
}

/* One field value: strings (escaped, made UTF-8), numbers, booleans, callout.null, tables;
 * anything else as its type name. */
static void encode_value(lua_State *L, int idx, struct fields_enc *e, int depth)
{
    if (++e->entries > FIELDS_MAX_ENTRIES) {
        e->j.full = true;
        return;
    }
    size_t len;
    const char *str;
    switch (lua_type(L, idx)) {
    case LUA_TSTRING:
        str = lua_tolstring(L, idx, &len);
        logjson_string(&e->j, str, len, SIZE_MAX);
        break;
    case LUA_TNUMBER:
        if (lua_isinteger(L, idx))
            logjson_int(&e->j, (long long)lua_tointeger(L, idx));
        else
            logjson_number(&e->j, (double)lua_tonumber(L, idx));
        break;
    case LUA_TBOOLEAN:
        logjson_bool(&e->j, lua_toboolean(L, idx));
        break;
    case LUA_TTABLE:
        encode_table(L, idx, e, depth);
        break;
    default:
        if (pbstruct_is_null(L, idx)) {
            logjson_null(&e->j);
        } else {
            str = luaL_typename(L, idx);
            logjson_string(&e->j, str, strlen(str), SIZE_MAX);
        }
        break;
    }
}

/* native.log(level, msg [, fields]) -> nil, or the reason the fields were refused.
 * upvalue 1 = light userdata: const uint64_t *current_stream, upvalue 2: const char *const
 * *current_phase. Outside a handler (stream 0, e.g. while the script loads) the text line
 * says "script:". fields (a table) become members of the JSON record (text: {...} after
 * the message). */
static int native_log(lua_State *L)
{
    enum log_level level = check_level(L, 1);
    size_t len;
    const char *msg = luaL_checklstring(L, 2, &len);
    const uint64_t *stream = lua_touserdata(L, lua_upvalueindex(1));
    const char *const *phase = lua_touserdata(L, lua_upvalueindex(2));
    struct log_fields lf = {.stream_id = stream != NULL ? *stream : 0};
    if (lf.stream_id != 0 && phase != NULL)
        lf.phase = *phase;
    /* half a record at most: the message and the server's fields keep the rest */
    char buf[LOG_RECORD_MAX / 2];
    if (lua_type(L, 3) == LUA_TTABLE) {
        struct fields_enc e = {.entries = 0};
        logjson_init(&e.j, buf, sizeof buf);
        encode_table(L, 3, &e, 0);
        if (e.err) {
            lua_pushstring(L, e.err);
            return 1;
        }
        if (e.j.full || e.j.buf[0] != '{') {
            static const char dropped[] = "\"fields_dropped\":true";
            lf.extra = dropped;
            lf.extra_len = sizeof dropped - 1;
        } else if (e.j.len > 2) {   /* the members, without the braces */
            lf.extra = buf + 1;
            lf.extra_len = e.j.len - 2;
        }
    } else if (!lua_isnoneornil(L, 3)) {
        return luaL_typeerror(L, 3, "table or nil");
    }
    /* the bytes as they are (a NUL does not end them); records are capped anyway */
    if (len > LOG_RECORD_MAX)
        len = LOG_RECORD_MAX;
    if (lf.stream_id != 0) {
        log_bytes(level, &lf, msg, len);
    } else {
        char line[LOG_RECORD_MAX + 8];
        memcpy(line, "script: ", 8);
        memcpy(line + 8, msg, len);
        log_bytes(level, &lf, line, len + 8);
    }
    return 0;
}

/* native.enabled(level) -> whether a line of that level would be written */
static int native_enabled(lua_State *L)
{
    lua_pushboolean(L, check_level(L, 1) >= log_get_level());
    return 1;
}

/* native.api(f) -> a C function that calls f with its arguments and returns its results.
 * Every callout.* function is exposed through one, so that `return callout.f(...)`, the
 * usual way to use them, still has a caller line to blame for an argument error: a Lua
 * tail call replaces the caller's frame, but a C function in tail position is called
 * normally and the caller's frame stays on the stack. */
static int api_call(lua_State *L)
{
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    return lua_gettop(L);
}

static int native_api(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TFUNCTION);
    lua_settop(L, 1);
    lua_pushcclosure(L, api_call, 1);
    return 1;
}

/* __tostring of a deny object, for error handlers and scripts that print what they caught */
static int deny_tostring(lua_State *L)
{
    lua_rawgeti(L, 1, 1);
    lua_pushfstring(L, "callout.deny_callout: %s",
                    lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : default_deny);
    return 1;
}

/* Pushes the deny metatable, creating it on first use. stack: ... -> ... mt */
static void push_deny_mt(lua_State *L)
{
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &deny_mt_key) == LUA_TTABLE)
        return;
    lua_pop(L, 1);
    lua_createtable(L, 0, 2);
    lua_pushcfunction(L, deny_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushliteral(L, "callout.deny");
    lua_setfield(L, -2, "__name");
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &deny_mt_key);
}

/* package.preload.callout: runs the embedded callout.lua with the native table as its
 * argument. upvalues 1, 2 = the current_stream, current_phase light userdata. */
static int load_callout(lua_State *L)
{
    if (luaL_loadbufferx(L, luamod_callout, luamod_callout_len, "=callout", "t") != LUA_OK)
        return lua_error(L);
    lua_createtable(L, 0, 5);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_pushvalue(L, lua_upvalueindex(2));
    lua_pushcclosure(L, native_log, 2);
    lua_setfield(L, -2, "log");
    lua_pushcfunction(L, native_enabled);
    lua_setfield(L, -2, "enabled");
    lua_pushcfunction(L, native_api);
    lua_setfield(L, -2, "api");
    pbstruct_push_null(L);
    lua_setfield(L, -2, "null");
    push_deny_mt(L);
    lua_setfield(L, -2, "deny_mt");
    lua_call(L, 1, 1);
    /* callout.json (src/json.c), also what require "callout.json" returns */
    luaL_requiref(L, "callout.json", ljson_open, 0);
    lua_setfield(L, -2, "json");
    /* callout.jwt (src/jwt.c), also what require "callout.jwt" returns */
    luaL_requiref(L, "callout.jwt", jwt_open, 0);
    lua_setfield(L, -2, "jwt");
    return 1;
}

void calloutlib_open(lua_State *L, const uint64_t *current_stream,
                     const char *const *current_phase)
{
    luaL_checkstack(L, 4, "calloutlib_open");
    push_deny_mt(L);
    lua_pop(L, 1);
    /* package.preload is the registry's _PRELOAD table: require finds it there */
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
    lua_pushlightuserdata(L, (void *)current_stream);
    lua_pushlightuserdata(L, (void *)current_phase);
    lua_pushcclosure(L, load_callout, 2);
    lua_setfield(L, -2, "callout");
    lua_pop(L, 1);
    /* what `require "callout"` does, without depending on a global `require` (the
     * loader is a closure, which rules out luaL_requiref) */
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    if (lua_getfield(L, -1, "callout") == LUA_TNIL) {
        lua_pop(L, 1);
        lua_pushlightuserdata(L, (void *)current_stream);
        lua_pushlightuserdata(L, (void *)current_phase);
        lua_pushcclosure(L, load_callout, 2);
        lua_pushliteral(L, "callout");
        lua_call(L, 1, 1);
        lua_pushvalue(L, -1);
        lua_setfield(L, -3, "callout");
    }
    lua_setglobal(L, "callout");
    lua_pop(L, 1);
}

int calloutlib_is_deny(lua_State *L, int idx, const char **msg, size_t *len)
{
    idx = lua_absindex(L, idx);
    if (lua_type(L, idx) != LUA_TTABLE || !lua_checkstack(L, 2) || !lua_getmetatable(L, idx))
        return 0;
    lua_rawgetp(L, LUA_REGISTRYINDEX, &deny_mt_key);
    int is = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
    if (!is)
        return 0;
    /* The string stays alive while the error object holds it, i.e. while it is on the
     * stack (only deny_callout builds these tables, and nothing writes to them). */
    if (lua_rawgeti(L, idx, 1) == LUA_TSTRING) {
        *msg = lua_tolstring(L, -1, len);
    } else {
        *msg = default_deny;
        *len = sizeof default_deny - 1;
    }
    lua_pop(L, 1);
    return 1;
}
