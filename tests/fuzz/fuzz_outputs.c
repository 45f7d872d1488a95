/* fuzz_outputs.c — return tables built from fuzz bytes -> validation -> encoding, the path
 * every handler's answer takes (pbconv_to_responses for on_* handlers, pbreflect_from_lua
 * for process()). Whatever the converters accept must pack (pbwire) into bytes that pass
 * fuzzcheck_response: decodable by protobuf-c, canonical, UTF-8 in every string field.
 *
 *   byte 0    bits 0-2: phase (mod 6); bit 3: FULL_DUPLEX_STREAMED body chunk; bit 4: chunk's
 *             end_of_stream; bit 5: the table goes to pbreflect_from_lua (process())
 *   then      the program of a tiny interpreter that builds one Lua value (see value()):
 *             strings from the contract's vocabulary or raw (invalid UTF-8 included),
 *             numbers (huge, NaN, negative, fractional), booleans, callout.null, maps,
 *             lists, deep chains, references to tables built earlier (cycles), functions.
 * The vocabulary is docs/lua-api.md's keys and enum names plus every field and enum value
 * name of ProcessingResponse (collected from protobuf-c's descriptors at start-up). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "arena.h"
#include "fuzzcheck.h"
#include "pbconv.h"
#include "pbreflect.h"
#include "pbstruct.h"
#include "pbwire.h"

static const char *const contract_words[] = {
    /* return keys of on_* handlers */
    "add", "remove", "append_action", "clear_route_cache", "body", "clear_body", "status",
    "chunks", "end_of_stream", "immediate", "deny", "dynamic_metadata", "mode_override",
    "override_message_timeout",
    /* immediate = {...} */
    "headers", "details", "grpc_status",
    /* enum names the contract takes */
    "CONTINUE", "CONTINUE_AND_REPLACE", "APPEND_IF_EXISTS_OR_ADD", "ADD_IF_ABSENT",
    "OVERWRITE_IF_EXISTS_OR_ADD", "OVERWRITE_IF_EXISTS", "DEFAULT", "SEND", "SKIP", "NONE",
    "STREAMED", "BUFFERED", "BUFFERED_PARTIAL", "FULL_DUPLEX_STREAMED",
    "request_header_mode", "response_header_mode", "request_trailer_mode",
    "response_trailer_mode", "request_body_mode", "response_body_mode",
    /* header names, good and bad */
    ":path", ":authority", "x-a", "X-Upper", "", "bad name", "x\r\nsplit", "host",
};

static const char **words;
static size_t n_words, cap_words;

static void add_word(const char *w)
{
    for (size_t i = 0; i < n_words; i++)
        if (strcmp(words[i], w) == 0)
            return;
    if (n_words == cap_words) {
        cap_words = cap_words ? cap_words * 2 : 128;
        words = realloc(words, cap_words * sizeof *words);
        if (words == NULL)
            abort();
    }
    words[n_words++] = w;
}

/* Every field name and enum value name reachable from d (visited: a few dozen types). */
static void collect(const ProtobufCMessageDescriptor *d, int depth)
{
    if (depth > 12)
        return;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        add_word(f->name);
        if (f->type == PROTOBUF_C_TYPE_MESSAGE)
            collect(f->descriptor, depth + 1);
        else if (f->type == PROTOBUF_C_TYPE_ENUM) {
            const ProtobufCEnumDescriptor *e = f->descriptor;
            for (unsigned k = 0; k < e->n_values; k++)
                add_word(e->values[k].name);
        }
    }
}

struct prog {
    const uint8_t *p, *end;
    int tables;   /* tables built so far, kept in the registry list at index `made` */
};

static unsigned byte(struct prog *g)
{
    return g->p < g->end ? *g->p++ : 0;
}

static void push_raw_string(lua_State *L, struct prog *g)
{
    size_t n = byte(g);
    if (n > (size_t)(g->end - g->p))
        n = (size_t)(g->end - g->p);
    lua_pushlstring(L, (const char *)g->p, n);
    g->p += n;
}

static void push_number(lua_State *L, struct prog *g)
{
    static const double special[] = {0.0, -0.0, 0.5, -1.0, 0.001, 0.0009, 1e300, -1e300,
                                     315576000000.0, 315576000000.5, 9007199254740993.0,
                                     2147483648.0, 1e-300, 199.0, 200.5, 599.0};
    unsigned k = byte(g);
    switch (k % 4) {
    case 0:
        lua_pushnumber(L, k / 4 < 16 ? special[k / 4] : (k & 8 ? NAN : (k & 16 ? -INFINITY : INFINITY)));
        break;
    case 1: {
        static const lua_Integer ints[] = {0, 1, -1, 2, 16, 17, 100, 199, 200, 403, 599, 600,
                                           2147483647, -2147483648LL, (lua_Integer)1 << 32,
                                           INT64_MIN};
        lua_pushinteger(L, ints[(k / 4) % 16]);
        break;
    }
    case 2: {
        uint64_t bits = 0;
        for (int i = 0; i < 8; i++)
            bits = bits << 8 | byte(g);
        double d;
        memcpy(&d, &bits, sizeof d);
        lua_pushnumber(L, d);
        break;
    }
    default: {
        uint64_t v = 0;
        for (int i = 0; i < 8; i++)
            v = v << 8 | byte(g);
        lua_pushinteger(L, (lua_Integer)v);
        break;
    }
    }
}

static int a_function(lua_State *L)
{
    (void)L;
    return 0;
}

static void push_value(lua_State *L, struct prog *g, int depth);

/* A key: mostly words (so tables look like what the converters expect), else any value. */
static void push_key(lua_State *L, struct prog *g, int depth)
{
    unsigned k = byte(g);
    if (k < 192)
        lua_pushstring(L, words[k % n_words]);
    else if (k < 224)
        push_raw_string(L, g);
    else if (k < 248)
        lua_pushinteger(L, (lua_Integer)(k - 224) % 6);  /* 0..5: list slots and holes */
    else
        push_value(L, g, depth + 1);
}

/* Keeps the table on top in the registry list of tables built, for later references. */
static void remember(lua_State *L, struct prog *g)
{
    lua_rawgetp(L, LUA_REGISTRYINDEX, &g->tables);
    lua_pushvalue(L, -2);
    lua_rawseti(L, -2, ++g->tables);
    lua_pop(L, 1);
}

/* stack: ... -> ... value (never nil) */
static void push_value(lua_State *L, struct prog *g, int depth)
{
    luaL_checkstack(L, 8, "fuzz value");
    unsigned op = byte(g);
    if (depth > 8 && op % 16 >= 8)
        op = 0;   /* the program's own nesting stays shallow; op 11 builds deep chains */
    switch (op % 16) {
    case 0: case 1: case 2:
        lua_pushstring(L, words[byte(g) % n_words]);
        break;
    case 3:
        push_raw_string(L, g);
        break;
    case 4: case 5:
        push_number(L, g);
        break;
    case 6:
        lua_pushboolean(L, op & 16);
        break;
    case 7:
        pbstruct_push_null(L);
        break;
    case 8: case 9: {   /* a map */
        unsigned n = byte(g) % 8;
        lua_createtable(L, 0, (int)n);
        remember(L, g);
        for (unsigned i = 0; i < n; i++) {
            push_key(L, g, depth);
            push_value(L, g, depth + 1);
            lua_rawset(L, -3);
        }
        break;
    }
    case 10: {   /* a list */
        unsigned n = byte(g) % 8;
        lua_createtable(L, (int)n, 0);
        remember(L, g);
        for (unsigned i = 1; i <= n; i++) {
            push_value(L, g, depth + 1);
            lua_rawseti(L, -2, i);
        }
        break;
    }
    case 11: {   /* a chain n deep: {k = {k = ... leaf}} or {{...}} */
        unsigned n = byte(g) * 2;
        int list = op & 16;
        const char *k = words[byte(g) % n_words];
        push_value(L, g, 99);
        for (unsigned i = 0; i < n; i++) {
            lua_createtable(L, 1, 1);
            lua_insert(L, -2);
            if (list)
                lua_rawseti(L, -2, 1);
            else
                lua_setfield(L, -2, k);
        }
        break;
    }
    case 12:   /* a table built earlier: shared, or a cycle when it is an ancestor */
        if (g->tables > 0) {
            lua_rawgetp(L, LUA_REGISTRYINDEX, &g->tables);
            lua_rawgeti(L, -1, 1 + (int)(byte(g) % (unsigned)g->tables));
            lua_remove(L, -2);
        } else {
            lua_newtable(L);
        }
        break;
    case 13:
        lua_pushcfunction(L, a_function);
        break;
    default:   /* a string made of words, so contract names with a twist appear */
        lua_pushfstring(L, "%s%s", words[byte(g) % n_words], words[byte(g) % n_words]);
        break;
    }
}

static lua_State *L;
static struct arena arena;
static uint8_t *out;
static size_t out_cap;

static void pack_and_check(const ProtobufCMessage *m, const char *what)
{
    for (;;) {
        uint8_t *first = pbwire_pack_backward(m, out, out + out_cap);
        if (first != NULL) {
            fuzzcheck_response(first, (size_t)(out + out_cap - first), what);
            return;
        }
        out_cap *= 2;
        free(out);
        out = malloc(out_cap);
        if (out == NULL)
            abort();
    }
}

struct run {
    const uint8_t *data;
    size_t size;
};

/* Under lua_pcall: the converters may raise (Lua stack, memory). */
static int run(lua_State *L)
{
    struct run *r = lua_touserdata(L, 1);
    lua_settop(L, 0);
    unsigned flags = r->data[0];
    struct prog g = {r->data + 1, r->data + r->size, 0};
    lua_newtable(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &g.tables);
    push_value(L, &g, 0);    /* 1: the handler's return value */

    char err[1024];
    err[0] = '\0';
    if (flags & 32) {
        ProtobufCMessage *m = NULL;
        if (pbreflect_from_lua(L, 1, &envoy__service__ext_proc__v3__processing_response__descriptor,
                               "response", &arena, &m, err, sizeof err) == 0)
            pack_and_check(m, "pbreflect_from_lua");
        else if (err[0] == '\0')
            fuzzcheck_fail("pbreflect_from_lua failed without saying why");
        return 0;
    }
    struct pbconv_in in = {.phase = (enum pbconv_phase)((flags & 7) % PBCONV_PHASE_COUNT)};
    if ((in.phase == PBCONV_REQUEST_BODY || in.phase == PBCONV_RESPONSE_BODY) && (flags & 8)) {
        in.full_duplex = true;
        in.chunk = r->data;
        in.chunk_len = r->size;
        in.end_of_stream = flags & 16;
        /* GRPC body mode, the chunk's two flags from its first byte */
        in.grpc = flags & 64;
        in.chunk_compressed = in.grpc && r->size > 1 && (r->data[1] & 1);
        in.chunk_eos_without_message = in.grpc && r->size > 1 && (r->data[1] & 2);
    }
    /* an open streamed immediate response, or (headers) a known request body mode */
    in.local_reply_open = (flags & 128) && (flags & 8);
    in.body_mode_known = flags & 128;
    in.request_body_mode = 4;   /* FULL_DUPLEX_STREAMED */
    pbconv_response *resps = NULL;
    size_t n = 0;
    struct pbconv_result res = {0};
    enum pbconv_status st = pbconv_to_responses(L, 1, &in, &arena, &resps, &n, &res, err,
                                                sizeof err);
    switch (st) {
    case PBCONV_OK:
        if (!in.full_duplex && !in.local_reply_open && n != 1 &&
            !(n > 1 && resps[0].response_case ==
                           ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_STREAMED_IMMEDIATE_RESPONSE))
            fuzzcheck_fail("%zu responses for a message that is not a streamed chunk", n);
        for (size_t i = 0; i < n; i++)
            pack_and_check(&resps[i].base, "pbconv_to_responses");
        break;
    case PBCONV_DENY:
        if (res.deny_message == NULL)
            fuzzcheck_fail("PBCONV_DENY without a message");
        break;
    case PBCONV_BAD:
        if (err[0] == '\0')
            fuzzcheck_fail("PBCONV_BAD without a message");
        break;
    case PBCONV_NOMEM:
        break;
    default:
        fuzzcheck_fail("pbconv status %d", (int)st);
    }
    return 0;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    fuzzcheck_quiet_logs();
    for (size_t i = 0; i < sizeof contract_words / sizeof *contract_words; i++)
        add_word(contract_words[i]);
    collect(&envoy__service__ext_proc__v3__processing_response__descriptor, 0);
    arena_init(&arena, 0);
    out_cap = 4096;
    out = malloc(out_cap);
    if (out == NULL)
        abort();
    return 0;
}

static int open_pbconv(lua_State *L)
{
    pbconv_open(L);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    /* a fresh state per input: what one input leaves allocated is a leak libFuzzer sees */
    L = luaL_newstate();
    if (L == NULL)
        abort();
    lua_pushcfunction(L, open_pbconv);
    if (lua_pcall(L, 0, 0, 0) != LUA_OK)
        fuzzcheck_fail("pbconv_open: %s", lua_tostring(L, -1));
    struct run r = {data, size};
    lua_pushcfunction(L, run);
    lua_pushlightuserdata(L, &r);
    if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
        /* a raise from the converters is allowed (it is a protected call in the server),
         * but only with a message */
        if (lua_type(L, -1) != LUA_TSTRING)
            fuzzcheck_fail("converter raised a non-string error");
    }
    lua_close(L);
    arena_reset(&arena);
    return 0;
}
