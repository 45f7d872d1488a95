/* fuzz_json.c — libFuzzer target for callout.json (src/json.c): decode arbitrary bytes;
 * when they decode, the encoding must decode again and encode to the same bytes (the
 * canonical form is a fixed point), and neither step may leave the Lua stack unbalanced.
 * A decode that fails must fail with "callout.json: ... at line L, column C".
 *
 * cmake -S . -B build-fuzz -DFUZZ=ON -DCMAKE_C_COMPILER=clang
 * cmake --build build-fuzz --target fuzz_json
 * build-fuzz/fuzz_json CORPUS_DIR   (a copy of tests/fuzz/corpus/fuzz_json) */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "json.h"

static lua_State *L;
static int decode_ref, encode_ref;

static void fail(const char *what, const char *s, size_t n)
{
    fprintf(stderr, "fuzz_json: %s: %.*s\n", what, (int)(n > 400 ? 400 : n), s);
    abort();
}

/* f(arg at top) under pcall; leaves one result or the error; returns the status. */
static int call(int ref)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
    lua_insert(L, -2);
    return lua_pcall(L, 1, 1, 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (L == NULL) {
        L = luaL_newstate();
        luaL_openlibs(L);
        ljson_open(L);
        lua_getfield(L, -1, "decode");
        decode_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        lua_getfield(L, -1, "encode");
        encode_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        lua_pop(L, 1);
    }
    int top = lua_gettop(L);
    lua_pushlstring(L, (const char *)data, size);
    if (call(decode_ref) != LUA_OK) {
        const char *err = lua_tostring(L, -1);
        if (err == NULL || strncmp(err, "callout.json: ", 14) != 0 || strstr(err, " at line ") == NULL)
            fail("a decode error without its form", err ? err : "(not a string)", err ? strlen(err) : 14);
        lua_settop(L, top);
        return 0;
    }
    if (call(encode_ref) != LUA_OK)
        fail("a decoded value does not encode", lua_tostring(L, -1), lua_rawlen(L, -1));
    size_t n1;
    const char *e1 = lua_tolstring(L, -1, &n1);
    lua_pushvalue(L, -1);
    if (call(decode_ref) != LUA_OK)
        fail("an encoding does not decode", lua_tostring(L, -1), lua_rawlen(L, -1));
    if (call(encode_ref) != LUA_OK)
        fail("a re-decoded value does not encode", lua_tostring(L, -1), lua_rawlen(L, -1));
    size_t n2;
    const char *e2 = lua_tolstring(L, -1, &n2);
    if (n1 != n2 || memcmp(e1, e2, n1) != 0)
        fail("two encodings differ", e1, n1);
    lua_settop(L, top);
    if (lua_gettop(L) != 0)
        fail("the stack grew", "", 0);
    lua_gc(L, LUA_GCSTEP, 0);
    return 0;
}
