/* exchange_native.c — see exchange_native.h. */
#include "exchange_native.h"

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include <lauxlib.h>

#include "arena.h"
#include "pbreflect.h"
#include "wirecheck.h"

#include "envoy/service/ext_proc/v3/external_processor.pb-c.h"

#define ARENA_MT "callout.exchange.arena"

/* An arena lives in a userdata on the stack while it is used, so a Lua error (memory)
 * halfway leaves nothing behind: the collector frees it. */
static int arena_gc(lua_State *L)
{
    arena_destroy(luaL_checkudata(L, 1, ARENA_MT));
    return 0;
}

static struct arena *push_arena(lua_State *L)
{
    struct arena *a = lua_newuserdatauv(L, sizeof *a, 0);
    arena_init(a, 0);
    if (luaL_newmetatable(L, ARENA_MT)) {
        lua_pushcfunction(L, arena_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    return a;
}

/* encode_request(table) -> bytes. Strict as the server is with process(): an unknown field
 * or a wrong type raises, naming the path ("request.request_headers: unknown field
 * 'header'"). */
static int encode_request(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    struct arena *a = push_arena(L);
    ProtobufCMessage *m = NULL;
    char err[1024];
    if (pbreflect_from_lua(L, 1, &envoy__service__ext_proc__v3__processing_request__descriptor,
                           "request", a, &m, err, sizeof err) != 0)
        return luaL_error(L, "%s", err);
    size_t n = protobuf_c_message_get_packed_size(m);
    luaL_Buffer b;
    uint8_t *out = (uint8_t *)luaL_buffinitsize(L, &b, n);
    size_t packed = protobuf_c_message_pack(m, out);
    luaL_pushresultsize(&b, packed);
    arena_destroy(a);
    return 1;
}

static int decode(lua_State *L, const ProtobufCMessageDescriptor *desc)
{
    size_t len;
    const char *bytes = luaL_checklstring(L, 1, &len);
    bool sparse = lua_toboolean(L, 2);
    lua_settop(L, 1);
    /* bytes a client sent, recorded: bounded before protobuf-c recurses, as the server is */
    char why[256];
    struct wirecheck_result scan;
    if (wirecheck_depth((const uint8_t *)bytes, len, desc, NULL, &scan, why, sizeof why) != 0) {
        luaL_pushfail(L);
        lua_pushfstring(L, "%s: %s", desc->short_name, why);
        return 2;
    }
    struct arena *a = push_arena(L);
    ProtobufCAllocator alloc = arena_pb_allocator(a);
    ProtobufCMessage *m = protobuf_c_message_unpack(desc, &alloc, len, (const uint8_t *)bytes);
    if (m == NULL) {
        luaL_pushfail(L);
        lua_pushfstring(L, "malformed %s (%d bytes)", desc->short_name, (int)len);
        return 2;
    }
    if (sparse)
        pbreflect_push_sparse(L, m);
    else
        pbreflect_push(L, m);
    arena_destroy(a);
    return 1;
}

static int decode_request(lua_State *L)
{
    return decode(L, &envoy__service__ext_proc__v3__processing_request__descriptor);
}

static int decode_response(lua_State *L)
{
    return decode(L, &envoy__service__ext_proc__v3__processing_response__descriptor);
}

static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static int base64_encode(lua_State *L)
{
    size_t n;
    const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
    luaL_Buffer b;
    char *out = luaL_buffinitsize(L, &b, (n + 2) / 3 * 4);
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)s[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)s[i + 1] << 8;
        if (i + 2 < n)
            v |= s[i + 2];
        out[o++] = b64[v >> 18];
        out[o++] = b64[(v >> 12) & 63];
        out[o++] = i + 1 < n ? b64[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? b64[v & 63] : '=';
    }
    luaL_pushresultsize(&b, o);
    return 1;
}

static int sextet(unsigned char c)
{
    const char *p = c ? strchr(b64, c) : NULL;
    return p ? (int)(p - b64) : -1;
}

static int base64_decode(lua_State *L)
{
    size_t n;
    const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
    if (n % 4 != 0) {
        luaL_pushfail(L);
        lua_pushfstring(L, "base64 of %d characters: not a multiple of 4", (int)n);
        return 2;
    }
    luaL_Buffer b;
    char *out = luaL_buffinitsize(L, &b, n / 4 * 3);
    size_t o = 0;
    for (size_t i = 0; i < n; i += 4) {
        bool last = i + 4 == n;
        int pad = last ? (s[i + 3] == '=') + (s[i + 3] == '=' && s[i + 2] == '=') : 0;
        int v[4];
        for (int k = 0; k < 4 - pad; k++) {
            if ((v[k] = sextet(s[i + k])) < 0) {
                luaL_pushfail(L);
                lua_pushfstring(L, "invalid base64 character at offset %d", (int)(i + k));
                return 2;
            }
        }
        uint32_t x = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 |
                     (pad < 2 ? (uint32_t)v[2] << 6 : 0) | (pad < 1 ? (uint32_t)v[3] : 0);
        /* the bits a padded group leaves over must be zero, or two texts mean one value */
        if ((pad == 1 && (x & 0xff)) || (pad == 2 && (x & 0xffff))) {
            luaL_pushfail(L);
            lua_pushfstring(L, "invalid base64 padding at offset %d", (int)i);
            return 2;
        }
        out[o++] = (char)(x >> 16);
        if (pad < 2)
            out[o++] = (char)(x >> 8);
        if (pad < 1)
            out[o++] = (char)x;
    }
    luaL_pushresultsize(&b, o);
    return 1;
}

void exchange_native_register(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        {"encode_request", encode_request},
        {"decode_request", decode_request},
        {"decode_response", decode_response},
        {"base64_encode", base64_encode},
        {"base64_decode", base64_decode},
        {NULL, NULL},
    };
    luaL_setfuncs(L, funcs, 0);
}
