/* calloutlib.c — the native part of the `callout` module. lua/callout.lua holds the helpers
 * themselves; this file embeds it (scripts/embed-lua.cmake), registers it in package.preload
 * and hands it the few things Lua cannot do alone: the server log with the stream id, the
 * JSON null sentinel, and the marker that makes a deny_callout error recognisable from C. */
#include "calloutlib.h"

#include <inttypes.h>
#include <string.h>

#include <lauxlib.h>

#include "jwt.h"
#include "log.h"
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

/* native.log(level, msg), upvalue 1 = light userdata: const uint64_t *current_stream.
 * Outside a handler (stream 0, e.g. while the script loads) the line says "script:". */
static int native_log(lua_State *L)
{
    enum log_level level = check_level(L, 1);
    size_t len;
    const char *msg = luaL_checklstring(L, 2, &len);
    const uint64_t *stream = lua_touserdata(L, lua_upvalueindex(1));
    uint64_t id = stream != NULL ? *stream : 0;
    int n = len > 4000 ? 4000 : (int)len;  /* log lines are capped anyway; keeps %.*s in int */
    if (id != 0)
        log_msg(level, "stream %" PRIu64 ": %.*s", id, n, msg);
    else
        log_msg(level, "script: %.*s", n, msg);
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
 * argument. upvalue 1 = the current_stream light userdata. */
static int load_callout(lua_State *L)
{
    if (luaL_loadbufferx(L, luamod_callout, luamod_callout_len, "=callout", "t") != LUA_OK)
        return lua_error(L);
    lua_createtable(L, 0, 5);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_pushcclosure(L, native_log, 1);
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
    /* callout.jwt (src/jwt.c), also what require "callout.jwt" returns */
    luaL_requiref(L, "callout.jwt", jwt_open, 0);
    lua_setfield(L, -2, "jwt");
    return 1;
}

void calloutlib_open(lua_State *L, const uint64_t *current_stream)
{
    luaL_checkstack(L, 4, "calloutlib_open");
    push_deny_mt(L);
    lua_pop(L, 1);
    /* package.preload is the registry's _PRELOAD table: require finds it there */
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
    lua_pushlightuserdata(L, (void *)current_stream);
    lua_pushcclosure(L, load_callout, 1);
    lua_setfield(L, -2, "callout");
    lua_pop(L, 1);
    /* what `require "callout"` does, without depending on a global `require` (the
     * loader is a closure, which rules out luaL_requiref) */
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    if (lua_getfield(L, -1, "callout") == LUA_TNIL) {
        lua_pop(L, 1);
        lua_pushlightuserdata(L, (void *)current_stream);
        lua_pushcclosure(L, load_callout, 1);
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
