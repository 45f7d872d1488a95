/* strmatch_diff.h — runs one pattern operation through the stock string functions and
 * through src/strmatch.c in the same lua_State and describes each outcome as one string, so
 * that a test or a fuzzer compares two strings and prints both when they differ. Shared by
 * tests/unit/test_strmatch.c and tests/fuzz/fuzz_strmatch.c (static functions only). */
#ifndef LUACALLOUT_STRMATCH_DIFF_H
#define LUACALLOUT_STRMATCH_DIFF_H

#include <string.h>

#include <lauxlib.h>
#include <lualib.h>

#include "strmatch.h"

/* The operations, as the driver below numbers them. */
enum diff_op {
    OP_FIND,
    OP_FIND_PLAIN,
    OP_MATCH,
    OP_GMATCH,
    OP_GSUB_STRING, /* replacement: the `rep` string */
    OP_GSUB_TABLE,  /* a table whose __index answers some keys, false or nil for others */
    OP_GSUB_FUNC,   /* a function of the captures */
    OP_GSUB_MAX,    /* the `rep` string with max n = init (init itself then absent) */
    OP_COUNT
};

/* driver(impl, op, s, p, init, rep) -> description. Each call site names its function
 * (`impl.find`), so argument errors read the same for both implementations. A description
 * lists every returned value with its type, "E:" and the message for an error; for gmatch,
 * one line per iteration (at most 200). */
static const char diff_driver[] =
    "local impl, op, s, p, init, rep = ...\n"
    "local function ser(...)\n"
    "  local t = {}\n"
    "  for i = 1, select('#', ...) do\n"
    "    local v = select(i, ...)\n"
    "    local ty = math.type(v) or type(v)\n"
    "    t[i] = ty .. ':' .. (ty == 'string' and string.format('%q', v) or tostring(v))\n"
    "  end\n"
    "  return table.concat(t, ',')\n"
    "end\n"
    "local function run(ok, ...)\n"
    "  if not ok then return 'E:' .. tostring((...)) end\n"
    "  return ser(...)\n"
    "end\n"
    "local tbl = setmetatable({}, {__index = function(_, k)\n"
    "  if math.type(k) == 'integer' then return k % 3 == 0 and k * 10 or nil end\n"
    "  if #k % 3 == 0 then return '<' .. k .. '>' elseif #k % 3 == 1 then return false end\n"
    "end})\n"
    "local function fn(...)\n"
    "  local n = select('#', ...)\n"
    "  if n % 2 == 0 then return nil end\n"
    "  return '[' .. n .. ':' .. ser(...) .. ']'\n"
    "end\n"
    "if op == 0 then return run(pcall(function() return impl.find(s, p, init) end))\n"
    "elseif op == 1 then return run(pcall(function() return impl.find(s, p, init, true) end))\n"
    "elseif op == 2 then return run(pcall(function() return impl.match(s, p, init) end))\n"
    "elseif op == 3 then\n"
    "  local ok, it = pcall(function() return impl.gmatch(s, p, init) end)\n"
    "  if not ok then return 'E:' .. tostring(it) end\n"
    "  local out = {}\n"
    "  for _ = 1, 200 do\n"
    "    local r = table.pack(pcall(it))\n"
    "    if not r[1] then out[#out + 1] = 'E:' .. tostring(r[2]) break end\n"
    "    if r.n == 2 and r[2] == nil then break end\n"
    "    out[#out + 1] = ser(table.unpack(r, 2, r.n))\n"
    "  end\n"
    "  return table.concat(out, '\\n')\n"
    "elseif op == 4 then return run(pcall(function() return impl.gsub(s, p, rep) end))\n"
    "elseif op == 5 then return run(pcall(function() return impl.gsub(s, p, tbl) end))\n"
    "elseif op == 6 then return run(pcall(function() return impl.gsub(s, p, fn) end))\n"
    "else return run(pcall(function() return impl.gsub(s, p, rep, init) end)) end\n";

/* Opens the libraries, keeps the stock functions in global STOCK, installs ours with
 * `expired`, keeps them in global OURS, and leaves the compiled driver in global DRIVER. */
static lua_State *diff_open(strmatch_expired_fn expired)
{
    lua_State *L = luaL_newstate();
    if (L == NULL)
        return NULL;
    luaL_openlibs(L);
    static const char *const names[] = {"find", "match", "gmatch", "gsub"};
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1)
            strmatch_open(L, expired);
        lua_getglobal(L, "string");
        lua_newtable(L);
        for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
            lua_getfield(L, -2, names[i]);
            lua_setfield(L, -2, names[i]);
        }
        lua_setglobal(L, pass == 0 ? "STOCK" : "OURS");
        lua_pop(L, 1);
    }
    if (luaL_loadbufferx(L, diff_driver, sizeof diff_driver - 1, "=driver", "t") != LUA_OK) {
        lua_close(L);
        return NULL;
    }
    lua_setglobal(L, "DRIVER");
    return L;
}

/* Pushes the description of op run by `impl` ("STOCK" or "OURS"); init only if has_init. */
static void diff_run(lua_State *L, const char *impl, int op, const char *s, size_t ls,
                     const char *p, size_t lp, int has_init, lua_Integer init,
                     const char *rep, size_t lrep)
{
    lua_getglobal(L, "DRIVER");
    lua_getglobal(L, impl);
    lua_pushinteger(L, op);
    lua_pushlstring(L, s, ls);
    lua_pushlstring(L, p, lp);
    if (has_init)
        lua_pushinteger(L, init);
    else
        lua_pushnil(L);
    lua_pushlstring(L, rep, lrep);
    if (lua_pcall(L, 6, 1, 0) != LUA_OK) {
        const char *msg = lua_tostring(L, -1);
        lua_pushfstring(L, "driver failed: %s", msg != NULL ? msg : "?");
        lua_remove(L, -2);
    }
}

#endif
