/* json.c — `callout.json`, JSON for scripts that round-trips:
 *
 *   local json = require "callout.json"
 *   local body = json.decode(text)       -- objects keep their key order, [] and {} their kind
 *   body.model = "other"                 -- a new key goes last, obj.k = nil removes k
 *   return json.encode(body)             -- compact; a canonical document comes back byte for byte
 *
 * yajl parses (a JSON library from Debian, not a parser of ours): its callbacks build the
 * Lua values as it reads, with no tree in between; this file also writes Lua values back
 * as text. Decoded objects and arrays carry one of two shared metatables, the marker
 * json.kind reads and json.object / json.array set. An object's key order lives in a
 * weak-keyed side table (object -> order; an empty decoded object has none until its first
 * key); the object metatable's __newindex appends each new key there and its __pairs walks
 * it.
 *
 * Bounds: the C calls run outside the script's instruction budget, so they ask the host's
 * budget check (ljson_set_budget) every LJSON_CHECK_VALUES values or key comparisons and
 * every LJSON_CHECK_BYTES of a long string (keys sort in our own merge sort, not qsort,
 * which a raise must not longjmp out of), and their memory is
 * bounded by their input: decode refuses more than LJSON_MAX_BYTES of text and more than
 * LJSON_MAX_DEPTH levels of nesting, and everything it makes (the values and yajl's own
 * buffers) comes from the VM's allocator, so it counts against the VM's memory ceiling;
 * encode writes into a buffer taken from the same allocator and stops at the same depth (a
 * cycle is named as such). yajl's buffers and the output buffer are freed on every path, a
 * Lua memory error included. */
#include "json.h"
#include "checks.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <yajl/yajl_parse.h>

#include "pbstruct.h"

#define OBJECT_MT "callout.json.object"
#define ARRAY_MT "callout.json.array"
#define DEC_MT "callout.json.decoder"
#define BUF_MT "callout.json.buffer"

/* Registry key (by address) of the weak-keyed table object -> its key order. An order
 * table holds [i] = key for i = 1..n and [key] = i, the latest place of key: a key whose
 * [key] is not i at place i was removed and assigned again later. */
static const char order_key = 0;

/* Registry key (by address) of the host's budget check (ljson_set_budget). */
static const char budget_key = 0;

void ljson_set_budget(lua_State *L, lua_CFunction check)
{
    lua_pushcfunction(L, check);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &budget_key);
}

/* The host's budget check, or NULL. */
static lua_CFunction budget_of(lua_State *L)
{
    lua_rawgetp(L, LUA_REGISTRYINDEX, &budget_key);
    lua_CFunction check = lua_tocfunction(L, -1);
    lua_pop(L, 1);
    return check;
}

/* ------------------------------------------------------------------------------------ */
/* The markers and the key order                                                        */
/* ------------------------------------------------------------------------------------ */

static int object_next(lua_State *L);

/* pairs() of an object: its keys in order, then any key set around the order (rawset).
 * upvalue 1: the order side table. */
static int object_pairs(lua_State *L)
{
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_pushcclosure(L, object_next, 1);
    lua_pushvalue(L, 1);
    lua_pushnil(L);
    return 3;
}

/* Whether key k (at idx) sits at place i of order (at o): its live entry. */
static bool order_live(lua_State *L, int o, int k, lua_Integer i)
{
    lua_pushvalue(L, k);
    bool yes = lua_rawget(L, o) == LUA_TNUMBER && lua_tointeger(L, -1) == i;
    lua_pop(L, 1);
    return yes;
}

/* next() over an object in key order; upvalue 1: the order side table. */
static int object_next(lua_State *L)
{
    lua_settop(L, 2);
    lua_pushvalue(L, 1);
    lua_rawget(L, lua_upvalueindex(1));     /* 3: the object's order, or nil */
    bool ordered = lua_istable(L, 3);
    lua_Integer i = 0;
    bool rest = !ordered;
    if (ordered && !lua_isnil(L, 2)) {
        lua_pushvalue(L, 2);
        if (lua_rawget(L, 3) == LUA_TNUMBER)
            i = lua_tointeger(L, -1);
        else
            rest = true;                    /* already past the ordered keys */
        lua_pop(L, 1);
    }
    if (!rest) {
        lua_Integer n = (lua_Integer)lua_rawlen(L, 3);
        for (i++; i <= n; i++) {
            lua_rawgeti(L, 3, i);           /* 4: key */
            if (order_live(L, 3, 4, i)) {
                lua_pushvalue(L, 4);
                if (lua_rawget(L, 1) != LUA_TNIL)
                    return 2;
                lua_pop(L, 1);
            }
            lua_pop(L, 1);
        }
        lua_pushnil(L);
        lua_replace(L, 2);
    }
    lua_pushvalue(L, 2);
    while (lua_next(L, 1) != 0) {
        if (ordered && lua_type(L, -2) == LUA_TSTRING) {
            lua_pushvalue(L, -2);
            bool known = lua_rawget(L, 3) != LUA_TNIL;
            lua_pop(L, 1);
            if (known) {
                lua_pop(L, 1);
                continue;
            }
        }
        return 2;
    }
    lua_pushnil(L);
    return 1;
}

/* Drops the places of removed keys from order o (of n places) of object t (stack indices)
 * once they are more than the live ones, keeping the live ones' order: obj.k = nil leaves
 * k's place (no hook sees it), and a key assigned again gets a new one, so an object that
 * lives long (in ctx.state) and churns keys would hold every key it ever had. Run when an
 * append makes n a power of two from 64 on: each count is paid for by the appends since the
 * last one, or by the dead places it drops. */
static void order_compact(lua_State *L, int o, int t, lua_Integer n)
{
    luaL_checkstack(L, 4, "callout.json");
    lua_Integer live = 0;
    for (lua_Integer i = 1; i <= n; i++) {
        lua_rawgeti(L, o, i);
        if (order_live(L, o, lua_gettop(L), i)) {
            if (lua_rawget(L, t) != LUA_TNIL)
                live++;
        }
        lua_pop(L, 1);
    }
    if (n - live <= live)
        return;
    lua_Integer j = 0;
    for (lua_Integer i = 1; i <= n; i++) {
        lua_rawgeti(L, o, i);                   /* key; its earlier places were dead */
        int k = lua_gettop(L);
        if (order_live(L, o, k, i)) {
            lua_pushvalue(L, k);
            bool present = lua_rawget(L, t) != LUA_TNIL;
            lua_pop(L, 1);
            lua_pushvalue(L, k);
            if (present) {
                lua_pushvalue(L, k);
                lua_rawseti(L, o, ++j);         /* j <= i: a place already read */
                lua_pushinteger(L, j);
            } else {
                lua_pushnil(L);                 /* removed: forgotten */
            }
            lua_rawset(L, o);
        }
        lua_pop(L, 1);
    }
    for (lua_Integer i = j + 1; i <= n; i++) {
        lua_pushnil(L);
        lua_rawseti(L, o, i);
    }
}

/* Appends string key k to the order of object t (stack indices, as order_side, the side
 * table), creating the order on first use. */
static void order_append(lua_State *L, int order_side, int t, int k)
{
    lua_pushvalue(L, t);
    if (lua_rawget(L, order_side) != LUA_TTABLE) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_pushvalue(L, t);
        lua_pushvalue(L, -2);
        lua_rawset(L, order_side);
    }
    lua_Integer n = (lua_Integer)lua_rawlen(L, -1) + 1;
    lua_pushvalue(L, k);
    lua_rawseti(L, -2, n);
    lua_pushvalue(L, k);
    lua_pushinteger(L, n);
    lua_rawset(L, -3);
    if (n >= 64 && (n & (n - 1)) == 0)
        order_compact(L, lua_gettop(L), t, n);
    lua_pop(L, 1);
}

/* obj[k] = v for a key obj does not hold: store it, and a string key goes last in the
 * order. upvalue 1: the order side table. */
static int object_newindex(lua_State *L)
{
    lua_settop(L, 3);
    if (lua_isnil(L, 3))
        return 0;
    lua_pushvalue(L, 2);
    lua_pushvalue(L, 3);
    lua_rawset(L, 1);
    if (lua_type(L, 2) == LUA_TSTRING)
        order_append(L, lua_upvalueindex(1), 1, 2);
    return 0;
}

/* Pushes the order side table, the object and the array metatables, creating them on
 * first use (callout.jwt may decode before callout.json is opened). stack: +3 */
static void push_env(lua_State *L)
{
    luaL_checkstack(L, 6, "callout.json");
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &order_key) != LUA_TTABLE) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_createtable(L, 0, 1);
        lua_pushliteral(L, "k");
        lua_setfield(L, -2, "__mode");
        lua_setmetatable(L, -2);
        lua_pushvalue(L, -1);
        lua_rawsetp(L, LUA_REGISTRYINDEX, &order_key);
    }
    if (luaL_newmetatable(L, OBJECT_MT)) {
        lua_pushvalue(L, -2);
        lua_pushcclosure(L, object_pairs, 1);
        lua_setfield(L, -2, "__pairs");
        lua_pushvalue(L, -2);
        lua_pushcclosure(L, object_newindex, 1);
        lua_setfield(L, -2, "__newindex");
    }
    luaL_newmetatable(L, ARRAY_MT);
}

enum ljson_kind ljson_kind(lua_State *L, int idx)
{
    if (lua_type(L, idx) != LUA_TTABLE || !lua_getmetatable(L, idx))
        return LJSON_PLAIN;
    enum ljson_kind k = LJSON_PLAIN;
    luaL_checkstack(L, 2, "callout.json");
    luaL_getmetatable(L, OBJECT_MT);
    if (lua_rawequal(L, -1, -2))
        k = LJSON_OBJECT;
    lua_pop(L, 1);
    luaL_getmetatable(L, ARRAY_MT);
    if (lua_rawequal(L, -1, -2))
        k = LJSON_ARRAY;
    lua_pop(L, 2);
    return k;
}

/* Length of the well-formed UTF-8 sequence at s (of n bytes left), 0 if there is none:
 * what RFC 8259 allows, so no overlong forms, no surrogates and nothing past U+10FFFF. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    size_t k;
    unsigned char lo = 0x80, hi = 0xbf;
    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf)
        k = 2;
    else if (c >= 0xe0 && c <= 0xef) {
        k = 3;
        if (c == 0xe0) lo = 0xa0;
        if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        k = 4;
        if (c == 0xf0) lo = 0x90;
        if (c == 0xf4) hi = 0x8f;
    } else
        return 0;
    if (n < k || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t j = 2; j < k; j++)
        if (s[j] < 0x80 || s[j] > 0xbf)
            return 0;
    return k;
}

/* ------------------------------------------------------------------------------------ */
/* decode: yajl's events -> Lua                                                         */
/* ------------------------------------------------------------------------------------ */

/* yajl parses and calls back per token; the callbacks build the Lua values in place, on
 * the Lua stack: an open array is [arr], an open object [obj, order] and [obj, order, key]
 * once its key is read. No tree outside the VM: every value counts against its ceiling.
 *
 * A Lua error in a callback (memory, the stack) longjmps through yajl. yajl's own buffers
 * come from the VM's allocator through the functions below, which keep every block in a
 * list: the decoder, a to-be-closed userdata, frees what is left on every path, whatever
 * state the longjmp left yajl's handle in. */

union block {
    struct {
        union block *prev, *next;
        size_t size;
    } h;
    max_align_t align;
};

struct dec {
    lua_State *L;
    lua_Alloc alloc;
    void *ud;
    union block *blocks;                /* yajl's live allocations */
    yajl_handle h;
    const char *s;                      /* the document, s[0..n) */
    size_t n;
    bool final;                         /* in yajl_complete_parse: no token in s any more */
    bool duplicates;                    /* LJSON_DUPLICATES */
    lua_CFunction check;                /* the host's budget check, or NULL */
    unsigned values;                    /* values made, for the check */
    int order, object_mt, array_mt;     /* absolute stack indices */
    int depth;                          /* containers open */
    size_t at;                          /* a refusal of ours: its byte offset ... */
    char why[120];                      /* ... and its text ("" for none) */
    struct level {                      /* an open container */
        int slot;                       /* its table's stack index (its order's is next) */
        bool object;
        bool made;                      /* its table exists (else false in its slot) */
        int pending;                    /* members on the stack above it, not yet placed */
        lua_Integer count;              /* members placed */
    } level[LJSON_MAX_DEPTH + 1];
};

/* Members wait on the stack (a value, or a key and its value) until PENDING_MAX of them or
 * the container's end, then go into its table: most containers are small, and a table
 * made at its final size is never rehashed (that was a third of the decode). */
#define PENDING_MAX 32

static void block_link(struct dec *d, union block *b, size_t size)
{
    b->h.size = size;
    b->h.prev = NULL;
    b->h.next = d->blocks;
    if (d->blocks != NULL)
        d->blocks->h.prev = b;
    d->blocks = b;
}

static void block_unlink(struct dec *d, union block *b)
{
    if (b->h.prev != NULL)
        b->h.prev->h.next = b->h.next;
    else
        d->blocks = b->h.next;
    if (b->h.next != NULL)
        b->h.next->h.prev = b->h.prev;
}

/* After the VM's allocator refused n bytes: raises Lua's own memory error (LUA_ERRMEM, what
 * a script past its ceiling gets anywhere, RESOURCE_EXHAUSTED for the stream) rather than
 * an error string a script may take for another failure. A C function can raise that only
 * through an allocation of Lua's that fails: one of the same size, after which Lua collects
 * and tries again. Should that succeed, the collection made room: the block is freed again
 * and this returns, for the caller to try once more (and raise its own error if that fails
 * too). */
static void make_room(lua_State *L, size_t n)
{
    lua_newuserdatauv(L, n, 0);
    lua_pop(L, 1);
    lua_gc(L, LUA_GCCOLLECT);
}

/* Past the ceiling yajl gets no NULL (it does not check): the decode raises instead. */
static void *yajl_malloc_vm(void *ctx, size_t n)
{
    struct dec *d = ctx;
    if (n > SIZE_MAX - sizeof(union block))
        luaL_error(d->L, "callout.json: not enough memory");
    union block *b = d->alloc(d->ud, NULL, 0, sizeof *b + n);
    if (b == NULL) {
        make_room(d->L, sizeof *b + n);
        b = d->alloc(d->ud, NULL, 0, sizeof *b + n);
    }
    if (b == NULL)
        luaL_error(d->L, "callout.json: not enough memory");
    block_link(d, b, n);
    return b + 1;
}

static void yajl_free_vm(void *ctx, void *p)
{
    struct dec *d = ctx;
    if (p == NULL)
        return;
    union block *b = (union block *)p - 1;
    block_unlink(d, b);
    d->alloc(d->ud, b, sizeof *b + b->h.size, 0);
}

static void *yajl_realloc_vm(void *ctx, void *p, size_t n)
{
    struct dec *d = ctx;
    if (p == NULL)
        return yajl_malloc_vm(ctx, n);
    union block *b = (union block *)p - 1;
    if (n > SIZE_MAX - sizeof *b)
        luaL_error(d->L, "callout.json: not enough memory");
    block_unlink(d, b);
    union block *nb = d->alloc(d->ud, b, sizeof *b + b->h.size, sizeof *b + n);
    if (nb == NULL) {
        block_link(d, b, b->h.size);            /* make_room may raise */
        make_room(d->L, sizeof *b + n);
        block_unlink(d, b);
        nb = d->alloc(d->ud, b, sizeof *b + b->h.size, sizeof *b + n);
    }
    if (nb == NULL) {
        block_link(d, b, b->h.size);            /* still valid, freed by the close */
        luaL_error(d->L, "callout.json: not enough memory");
    }
    block_link(d, nb, n);
    return nb + 1;
}

/* The decoder as a to-be-closed value: whatever yajl still holds is freed on close. */
static int dec_close(lua_State *L)
{
    struct dec *d = luaL_checkudata(L, 1, DEC_MT);
    d->h = NULL;
    while (d->blocks != NULL)
        yajl_free_vm(d, d->blocks + 1);
    return 0;
}

/* Records a refusal at byte `at` and cancels the parse (a callback returns this). */
static int refuse(struct dec *d, size_t at, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(d->why, sizeof d->why, fmt, ap);
    va_end(ap);
    d->at = at < d->n ? at : d->n;
    return 0;
}

/* Offset in s just past the token yajl has read; at the end (complete_parse) the end. */
static size_t token_end(struct dec *d)
{
    return d->final ? d->n : yajl_get_bytes_consumed(d->h);
}

/* Places the pending members of the innermost container in its table, making the table
 * (and an object's order) first: at its final size when `last`. */
static void flush(struct dec *d, bool last)
{
    lua_State *L = d->L;
    struct level *l = &d->level[d->depth];
    int p = l->pending, t = l->slot, o = t + 1;
    if (!l->made) {
        int size = last ? p : 2 * PENDING_MAX;
        lua_createtable(L, l->object ? 0 : size, l->object ? size : 0);
        lua_replace(L, t);
        if (l->object && (p > 0 || !last)) {
            lua_createtable(L, size, size);
            lua_replace(L, o);
        }
        l->made = true;
    }
    if (!l->object) {
        for (int j = p; j >= 1; j--)
            lua_rawseti(L, t, l->count + j);    /* pops the top, the last one */
    } else {
        int first = lua_gettop(L) - 2 * p + 1;
        for (int j = 0; j < p; j++) {
            int k = first + 2 * j;
            lua_Integer i = l->count + j + 1;
            lua_pushvalue(L, k);
            lua_pushvalue(L, k + 1);
            lua_rawset(L, t);                   /* obj[key] = val */
            lua_pushvalue(L, k);
            lua_rawseti(L, o, i);               /* order[i] = key */
            lua_pushvalue(L, k);
            lua_pushinteger(L, i);
            lua_rawset(L, o);                   /* order[key] = i */
        }
        lua_settop(L, first - 1);
    }
    l->count += p;
    l->pending = 0;
}

/* Whether the key on top of the stack is already a member of the innermost object. */
static bool seen_key(struct dec *d)
{
    lua_State *L = d->L;
    struct level *l = &d->level[d->depth];
    if (l->made) {
        lua_pushvalue(L, -1);
        bool seen = lua_rawget(L, l->slot) != LUA_TNIL;
        lua_pop(L, 1);
        if (seen)
            return true;
    }
    int first = lua_gettop(L) - 2 * l->pending;
    for (int j = 0; j < l->pending; j++)
        if (lua_rawequal(L, first + 2 * j, -1))
            return true;
    return false;
}

/* A value on top of the stack goes into the open container (or is the document). */
static int put_member(struct dec *d)
{
    lua_State *L = d->L;
    if (d->check != NULL && ++d->values % LJSON_CHECK_VALUES == 0)
        d->check(L);                            /* may raise: the decoder's close frees */
    if (d->depth == 0)
        return 1;
    struct level *l = &d->level[d->depth];
    if (l->object && d->duplicates && l->made) {
        lua_pushvalue(L, -2);
        bool seen = lua_rawget(L, l->slot) != LUA_TNIL;
        lua_pop(L, 1);
        if (seen) {                             /* first place, last value */
            lua_rawset(L, l->slot);
            return 1;
        }
    }
    if (++l->pending == PENDING_MAX)
        flush(d, false);
    return 1;
}

/* The value of the 4 hex digits at p (yajl checked they are hex). */
static unsigned hex4(const unsigned char *p)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned c = p[i];
        v = v * 16 + (c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10);
    }
    return v;
}

/* What yajl lets through that RFC 8259 does not (yajl checks only the shape of UTF-8 and
 * turns a lone \ud800 into '?'): overlong forms, surrogates, code points past U+10FFFF,
 * unpaired \u surrogates. raw = the string's text between its quotes, at offset `off`. */
static int check_string(struct dec *d, const unsigned char *raw, size_t len, size_t off)
{
    size_t next = LJSON_CHECK_BYTES;
    for (size_t i = 0; i < len; i++) {
        if (i >= next) {        /* one string can be all of a 4 MiB document */
            if (d->check != NULL)
                d->check(d->L); /* may raise: the decoder's close frees */
            next = i + LJSON_CHECK_BYTES;
        }
        unsigned char c = raw[i];
        if (c >= 0x80) {
            size_t k = utf8_len(raw + i, len - i);
            if (k == 0)
                return refuse(d, off + i, "invalid UTF-8");
            i += k - 1;
        } else if (c == '\\') {
            if (raw[++i] != 'u')
                continue;
            unsigned u = hex4(raw + i + 1);
            if (u >= 0xdc00 && u <= 0xdfff)
                return refuse(d, off + i - 1, "invalid Unicode escape (a lone low surrogate)");
            if (u >= 0xd800 && u <= 0xdbff) {
                unsigned lo = 0;
                if (i + 10 < len && raw[i + 5] == '\\' && raw[i + 6] == 'u')
                    lo = hex4(raw + i + 7);
                if (lo < 0xdc00 || lo > 0xdfff)
                    return refuse(d, off + i - 1,
                                  "invalid Unicode escape (a high surrogate without its pair)");
                i += 6;
            }
            i += 4;
        }
    }
    return 1;
}

/* Checks the string yajl just read (p[0..len): the text itself when it has no escape,
 * else yajl's decoding of it, the text then found by scanning back from its end). */
static int check_token_string(struct dec *d, const unsigned char *p, size_t len)
{
    const unsigned char *s = (const unsigned char *)d->s;
    size_t close = yajl_get_bytes_consumed(d->h) - 1;   /* the closing quote */
    if ((uintptr_t)p >= (uintptr_t)s && (uintptr_t)p < (uintptr_t)(s + d->n)) {
        for (size_t i = 0; i < len; i++)
            if (p[i] >= 0x80)
                return check_string(d, p, len, (size_t)(p - s));
        return 1;
    }
    size_t open = close;
    for (;;) {                  /* the quote before which an even number of backslashes */
        open--;
        if (s[open] != '"')
            continue;
        size_t bs = 0;
        while (open - bs > 0 && s[open - bs - 1] == '\\')
            bs++;
        if (bs % 2 == 0)
            break;
    }
    return check_string(d, s + open + 1, close - open - 1, open + 1);
}

static int on_null(void *ctx)
{
    struct dec *d = ctx;
    pbstruct_push_null(d->L);
    return put_member(d);
}

static int on_boolean(void *ctx, int b)
{
    struct dec *d = ctx;
    lua_pushboolean(d->L, b);
    return put_member(d);
}

/* A number from its text (JSON's syntax, yajl checked it): an integer when it has no
 * fraction and no exponent, exact or refused; else a float (strtod, the C locale). */
static int on_number(void *ctx, const char *t, size_t len)
{
    struct dec *d = ctx;
    size_t end = token_end(d), at = end >= len ? end - len : 0;
    if (memchr(t, '.', len) == NULL && memchr(t, 'e', len) == NULL &&
        memchr(t, 'E', len) == NULL) {
        bool neg = t[0] == '-';
        uint64_t u = 0, lim = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
        for (size_t i = neg; i < len; i++) {
            unsigned dig = (unsigned)(t[i] - '0');
            if (u > (lim - dig) / 10)
                return refuse(d, at, neg ? "too big negative integer" : "too big integer");
            u = u * 10 + dig;
        }
        lua_pushinteger(d->L, neg ? (lua_Integer)(0 - u) : (lua_Integer)u);
        return put_member(d);
    }
    char tmp[64];
    const char *z = tmp;
    if (len < sizeof tmp) {
        memcpy(tmp, t, len);
        tmp[len] = '\0';
    } else {
        lua_pushlstring(d->L, t, len);          /* NUL-terminated; popped below */
        z = lua_tostring(d->L, -1);
    }
    double v = strtod(z, NULL);
    if (z != tmp)
        lua_pop(d->L, 1);
    if (isinf(v))
        return refuse(d, at, "real number overflow");
    lua_pushnumber(d->L, (lua_Number)v);
    return put_member(d);
}

static int on_string(void *ctx, const unsigned char *p, size_t len)
{
    struct dec *d = ctx;
    if (!check_token_string(d, p, len))
        return 0;
    lua_pushlstring(d->L, (const char *)p, len);
    return put_member(d);
}

static int on_key(void *ctx, const unsigned char *p, size_t len)
{
    struct dec *d = ctx;
    lua_State *L = d->L;
    if (!check_token_string(d, p, len))
        return 0;
    lua_pushlstring(L, (const char *)p, len);
    if (seen_key(d)) {
        if (!d->duplicates) {
            /* at most 40 bytes of the key, cut between characters: the message may be
             * JSON-encoded again (a script answering with it) and must stay UTF-8 */
            size_t shown = 0, n;
            while (shown < len && (n = checks_utf8_seq((const char *)p + shown, len - shown)) > 0 &&
                   shown + n <= 40)
                shown += n;
            return refuse(d, yajl_get_bytes_consumed(d->h) - 1,
                          "duplicate object key \"%.*s%s\"", (int)shown, p,
                          shown < len ? "..." : "");
        }
        /* its value replaces the first one's in the table (put_member), so the
         * first one goes there now */
        lua_pop(L, 1);
        flush(d, false);
        lua_pushlstring(L, (const char *)p, len);
    }
    return 1;
}

/* Opens a container, or refuses the one past LJSON_MAX_DEPTH where its bracket is. */
static int open_container(struct dec *d, bool object)
{
    if (d->depth >= LJSON_MAX_DEPTH)
        return refuse(d, yajl_get_bytes_consumed(d->h) - 1, "nested deeper than %d",
                      LJSON_MAX_DEPTH);
    luaL_checkstack(d->L, 2 * PENDING_MAX + 8, "callout.json: nested too deeply");
    struct level *l = &d->level[++d->depth];
    *l = (struct level){.slot = lua_gettop(d->L) + 1, .object = object};
    lua_pushboolean(d->L, 0);                   /* the table, made by flush */
    if (object)
        lua_pushboolean(d->L, 0);               /* its order */
    return 1;
}

static int on_start_map(void *ctx) { return open_container(ctx, true); }
static int on_start_array(void *ctx) { return open_container(ctx, false); }

static int on_end_map(void *ctx)
{
    struct dec *d = ctx;
    lua_State *L = d->L;
    flush(d, true);
    if (d->level[d->depth].count > 0) {
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, d->order);                /* side[obj] = order */
    } else {
        lua_pop(L, 1);                          /* {}: no order (encode needs none) */
    }
    lua_pushvalue(L, d->object_mt);
    lua_setmetatable(L, -2);
    d->depth--;
    return put_member(d);
}

static int on_end_array(void *ctx)
{
    struct dec *d = ctx;
    flush(d, true);
    lua_pushvalue(d->L, d->array_mt);
    lua_setmetatable(d->L, -2);
    d->depth--;
    return put_member(d);
}

static const yajl_callbacks callbacks = {
    .yajl_null = on_null,
    .yajl_boolean = on_boolean,
    .yajl_number = on_number,
    .yajl_string = on_string,
    .yajl_start_map = on_start_map,
    .yajl_map_key = on_key,
    .yajl_end_map = on_end_map,
    .yajl_start_array = on_start_array,
    .yajl_end_array = on_end_array,
};

/* Line and column (1-based, in bytes) of s[at]: only on the error paths, so the common path
 * scans nothing twice. */
static void position_of(const char *s, size_t at, int *line, int *col)
{
    int l = 1;
    size_t start = 0;
    for (size_t i = 0; i < at; i++)
        if (s[i] == '\n') {
            l++;
            start = i + 1;
        }
    *line = l;
    *col = (int)(at - start) + 1;
}

/* yajl's reason, in our words: "lexical error: invalid char in json text.\n" says
 * "invalid char in json text". */

/* Gives the userdata on top of the stack the metatable `name`, made once, whose __close and
 * __gc both run `closer`: state freed on every way out, a Lua error included. */
static void set_closer(lua_State *L, const char *name, lua_CFunction closer)
{
    if (luaL_newmetatable(L, name)) {
        lua_pushcfunction(L, closer);
        lua_setfield(L, -2, "__close");
        lua_pushcfunction(L, closer);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
}

static void yajl_reason(yajl_handle h, char *out, size_t outlen)
{
    unsigned char *e = yajl_get_error(h, 0, NULL, 0);
    const char *t = e != NULL ? (const char *)e : "invalid JSON";
    const char *colon = strstr(t, "error: ");
    if (colon != NULL)
        t = colon + 7;
    size_t len = strcspn(t, "\n");
    while (len > 0 && t[len - 1] == '.')
        len--;
    if (strncmp(t, "invalid bytes in UTF8 string", len) == 0)
        snprintf(out, outlen, "invalid UTF-8");
    else if (strncmp(t, "premature EOF", len) == 0)
        snprintf(out, outlen, "unexpected end of document");
    else
        snprintf(out, outlen, "%.*s", (int)len, t);
    if (e != NULL)
        yajl_free_error(h, e);
}

int ljson_decode(lua_State *L, const char *s, size_t n, unsigned flags, char *err,
                 size_t errlen)
{
    if ((flags & LJSON_SKIP_BOM) && n >= 3 && memcmp(s, "\xef\xbb\xbf", 3) == 0) {
        s += 3;
        n -= 3;
    }
    int line, col;
    if (n > LJSON_MAX_BYTES) {
        position_of(s, LJSON_MAX_BYTES, &line, &col);
        snprintf(err, errlen, "document longer than %u bytes at line %d, column %d",
                 LJSON_MAX_BYTES, line, col);
        return -1;
    }
    push_env(L);
    int base = lua_gettop(L) - 2;
    /* the decoder's state (2 KiB of it) in a userdata rather than on the C stack */
    struct dec *d = lua_newuserdatauv(L, sizeof *d, 0);
    memset(d, 0, offsetof(struct dec, level));
    set_closer(L, DEC_MT, dec_close);
    lua_toclose(L, -1);
    int slot = lua_gettop(L);
    d->L = L;
    d->alloc = lua_getallocf(L, &d->ud);
    d->s = s;
    d->n = n;
    d->duplicates = (flags & LJSON_DUPLICATES) != 0;
    d->check = budget_of(L);
    d->order = base;
    d->object_mt = base + 1;
    d->array_mt = base + 2;

    yajl_alloc_funcs afs = {yajl_malloc_vm, yajl_realloc_vm, yajl_free_vm, d};
    d->h = yajl_alloc(&callbacks, &afs, d);
    if (d->h == NULL)
        return luaL_error(L, "callout.json: not enough memory");
    yajl_config(d->h, yajl_allow_comments, 0);
    yajl_config(d->h, yajl_dont_validate_strings, 0);
    yajl_config(d->h, yajl_allow_trailing_garbage, 0);
    yajl_config(d->h, yajl_allow_multiple_values, 0);
    yajl_config(d->h, yajl_allow_partial_values, 0);
    /* stack: order object_mt array_mt dec [open containers] */
    yajl_status st = yajl_parse(d->h, (const unsigned char *)s, n);
    size_t at = yajl_get_bytes_consumed(d->h);
    at = at > 0 ? at - 1 : 0;                   /* the byte yajl stopped at */
    if (st == yajl_status_ok) {
        d->final = true;
        st = yajl_complete_parse(d->h);
        at = n;
    }
    int rc = 0;
    if (st == yajl_status_client_canceled) {
        position_of(s, d->at, &line, &col);
        snprintf(err, errlen, "%s at line %d, column %d", d->why, line, col);
        rc = -1;
    } else if (st != yajl_status_ok) {
        char why[120];
        yajl_reason(d->h, why, sizeof why);
        position_of(s, at, &line, &col);
        snprintf(err, errlen, "%s at line %d, column %d", why, line, col);
        rc = -1;
    }
    yajl_free(d->h);
    if (rc == 0) {
        lua_replace(L, base);                   /* the value, over the order side table */
        lua_closeslot(L, slot);
        lua_settop(L, base);
    } else {
        lua_closeslot(L, slot);
        lua_settop(L, base - 1);
    }
    return rc;
}
/* ------------------------------------------------------------------------------------ */
/* encode: Lua -> text                                                                  */
/* ------------------------------------------------------------------------------------ */

/* The output, grown with the VM's allocator (so it counts against the memory ceiling) and
 * to-be-closed, so a raise anywhere frees it. */
struct buf {
    char *p;
    size_t n, cap;
    lua_Alloc alloc;
    void *ud;
};

static int buf_close(lua_State *L)
{
    struct buf *b = luaL_checkudata(L, 1, BUF_MT);
    if (b->p != NULL)
        b->alloc(b->ud, b->p, b->cap, 0);
    b->p = NULL;
    b->cap = b->n = 0;
    return 0;
}

struct enc {
    lua_State *L;
    struct buf *b;
    int order, object_mt, array_mt;
    int depth;
    lua_CFunction check;                    /* the host's budget check, or NULL */
    unsigned values;                        /* values (and order places) walked, for it */
    const void *path[LJSON_MAX_DEPTH];      /* the tables being written, for cycles */
};

/* One more value walked: every LJSON_CHECK_VALUES, the host's budget check (which may
 * raise: the output buffer is to-be-closed). A table shared by many others is walked once
 * per place it appears (t = {t, t} twenty times over is a million values), so this, not
 * the input's size, bounds encode's time. */
static void tick(struct enc *e)
{
    if (e->check != NULL && ++e->values % LJSON_CHECK_VALUES == 0)
        e->check(e->L);
}

static void grow(struct enc *e, size_t more)
{
    struct buf *b = e->b;
    if (more <= b->cap - b->n)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->n < more) {
        if (cap > SIZE_MAX / 2)
            luaL_error(e->L, "callout.json: output too large");
        cap *= 2;
    }
    char *p = b->alloc(b->ud, b->p, b->cap, cap);
    if (p == NULL) {
        make_room(e->L, cap);
        p = b->alloc(b->ud, b->p, b->cap, cap);
    }
    if (p == NULL)
        luaL_error(e->L, "callout.json: not enough memory");
    b->p = p;
    b->cap = cap;
}

static void put(struct enc *e, const char *s, size_t n)
{
    grow(e, n);
    memcpy(e->b->p + e->b->n, s, n);
    e->b->n += n;
}

static void putc_(struct enc *e, char c)
{
    grow(e, 1);
    e->b->p[e->b->n++] = c;
}

/* A string, escaped the minimal way (JSON.stringify's): '"', '\\' and the control
 * characters; '/', U+2028 and every other character as they are. One string is one value
 * to tick() but can be megabytes, each control byte six out: the budget check runs every
 * LJSON_CHECK_BYTES of input too. */
static void put_string(struct enc *e, const char *str, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *s = (const unsigned char *)str;
    grow(e, len + 2);
    putc_(e, '"');
    size_t i = 0, next = LJSON_CHECK_BYTES;
    while (i < len) {
        if (i >= next) {
            if (e->check != NULL)
                e->check(e->L);
            next = i + LJSON_CHECK_BYTES;
        }
        size_t lim = len < next ? len : next;
        size_t run = i;
        while (i < lim && s[i] >= 0x20 && s[i] < 0x80 && s[i] != '"' && s[i] != '\\')
            i++;
        put(e, (const char *)s + run, i - run);
        if (i == lim)
            continue;
        unsigned char c = s[i];
        if (c >= 0x80) {
            size_t k = utf8_len(s + i, len - i);
            if (k == 0)
                luaL_error(e->L, "callout.json: invalid UTF-8 in a string at byte %d",
                           (int)i + 1);
            put(e, (const char *)s + i, k);
            i += k;
            continue;
        }
        char esc[6] = {'\\', 0};
        size_t en = 2;
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        default:
            memcpy(esc, "\\u00", 4);
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
            en = 6;
        }
        put(e, esc, en);
        i++;
    }
    putc_(e, '"');
}

static void put_integer(struct enc *e, lua_Integer v)
{
    char tmp[24], *p = tmp + sizeof tmp;
    uint64_t u = v < 0 ? 0 - (uint64_t)v : (uint64_t)v;
    do {
        *--p = (char)('0' + u % 10);
        u /= 10;
    } while (u != 0);
    if (v < 0)
        *--p = '-';
    put(e, p, (size_t)(tmp + sizeof tmp - p));
}

/* The shortest digits that read back as d, laid out as JavaScript's Number#toString does — positional for
 * decimal exponents -6..20, else d.ddde+X / e-X — plus ".0" where the text would read as an
 * integer, so that decode(encode(x)) is a float equal to x. */
static void put_float(struct enc *e, double d)
{
    if (!isfinite(d))
        luaL_error(e->L, "callout.json: cannot encode %s", isnan(d) ? "NaN" : "infinity");
    /* 15 significant digits round-trip for any decimal of up to 15 (DBL_DIG), so when one
     * of those reads back as d it is this rounding, zeros trimmed below; else 16, else 17
     * (which always reads back). One snprintf and one strtod for most numbers. */
    char tmp[40];
    if (d != 0 && fabs(d) < DBL_MIN) {
        /* a subnormal has fewer digits of its own (5e-324 has one): bisect, as p digits
         * reading back implies p + 1 do */
        int lo = 1, hi = 17;
        while (lo < hi) {
            int mid = (lo + hi) / 2;
            snprintf(tmp, sizeof tmp, "%.*e", mid - 1, d);
            if (strtod(tmp, NULL) == d)
                hi = mid;
            else
                lo = mid + 1;
        }
        snprintf(tmp, sizeof tmp, "%.*e", lo - 1, d);
    } else {
        for (int prec = 14; prec <= 16; prec++) {
            snprintf(tmp, sizeof tmp, "%.*e", prec, d);
            if (prec == 16 || strtod(tmp, NULL) == d)
                break;
        }
    }
    /* tmp: [-]D[.DDD]e[+-]XX */
    char digits[20];
    int nd = 0;
    const char *p = tmp;
    bool neg = *p == '-';
    if (neg)
        p++;
    for (; *p != 'e'; p++)
        if (*p != '.')
            digits[nd++] = *p;
    int x = atoi(p + 1);
    while (nd > 1 && digits[nd - 1] == '0')    /* 0.7 is "7.00000000000000e-01" */
        nd--;
    char out[48];
    int n = 0;
    if (neg)
        out[n++] = '-';
    if (x >= -6 && x < 21) {
        if (x < 0) {
            out[n++] = '0';
            out[n++] = '.';
            for (int i = 0; i < -x - 1; i++)
                out[n++] = '0';
            memcpy(out + n, digits, (size_t)nd);
            n += nd;
        } else if (x >= nd - 1) {
            memcpy(out + n, digits, (size_t)nd);
            n += nd;
            for (int i = 0; i < x - (nd - 1); i++)
                out[n++] = '0';
            out[n++] = '.';
            out[n++] = '0';
        } else {
            memcpy(out + n, digits, (size_t)x + 1);
            n += x + 1;
            out[n++] = '.';
            memcpy(out + n, digits + x + 1, (size_t)(nd - x - 1));
            n += nd - x - 1;
        }
    } else {
        out[n++] = digits[0];
        if (nd > 1) {
            out[n++] = '.';
            memcpy(out + n, digits + 1, (size_t)nd - 1);
            n += nd - 1;
        }
        n += snprintf(out + n, sizeof out - (size_t)n, "e%c%d", x < 0 ? '-' : '+', x < 0 ? -x : x);
    }
    put(e, out, (size_t)n);
}

static void put_value(struct enc *e, int idx);

/* Enters the table at idx: depth and cycle checks. */
static void enter(struct enc *e, int idx)
{
    const void *p = lua_topointer(e->L, idx);
    for (int i = 0; i < e->depth; i++)
        if (e->path[i] == p)
            luaL_error(e->L, "callout.json: cannot encode a table that contains itself");
    if (e->depth >= LJSON_MAX_DEPTH)
        luaL_error(e->L, "callout.json: nested deeper than %d", LJSON_MAX_DEPTH);
    e->path[e->depth++] = p;
    luaL_checkstack(e->L, 8, "callout.json: nested too deeply");
}

static void put_array(struct enc *e, int t, lua_Integer n)
{
    putc_(e, '[');
    for (lua_Integer i = 1; i <= n; i++) {
        if (i > 1)
            putc_(e, ',');
        lua_rawgeti(e->L, t, i);
        put_value(e, lua_gettop(e->L));
        lua_pop(e->L, 1);
    }
    putc_(e, ']');
}

/* A marked array: its keys must be 1..n, which it writes in order. Anything else raises
 * rather than being dropped: a string key (json.array over an object), a hole (nil is no
 * element: json.null is JSON's null). */
static void put_marked_array(struct enc *e, int t)
{
    lua_State *L = e->L;
    lua_Integer count = 0, max = 0;
    lua_pushnil(L);
    while (lua_next(L, t) != 0) {
        lua_pop(L, 1);
        count++;
        if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 1) {
            if (lua_type(L, -1) == LUA_TSTRING)
                luaL_error(L, "callout.json: cannot encode key \"%s\" in an array",
                           lua_tostring(L, -1));
            else if (lua_type(L, -1) == LUA_TNUMBER)
                luaL_error(L, "callout.json: cannot encode key %s in an array",
                           lua_tostring(L, -1));
            luaL_error(L, "callout.json: cannot encode a %s key in an array",
                       luaL_typename(L, -1));
        }
        if (lua_tointeger(L, -1) > max)
            max = lua_tointeger(L, -1);
    }
    if (count != max) {
        /* count keys in 1..max: one of 1..count+1 is nil, so this loop is short */
        lua_Integer hole = 1;
        while (lua_rawgeti(L, t, hole) != LUA_TNIL) {
            lua_pop(L, 1);
            hole++;
        }
        luaL_error(L, "callout.json: cannot encode an array with a hole: [%I] is nil, [%I] "
                   "is not (json.null is null)", (LUAI_UACINT)hole, (LUAI_UACINT)max);
    }
    put_array(e, t, count);
}

/* The string form of the key at k (a string, or an integer written in decimal), pushed;
 * raises for any other key. */
static void push_key_text(struct enc *e, int k)
{
    lua_State *L = e->L;
    if (lua_type(L, k) == LUA_TSTRING)
        lua_pushvalue(L, k);
    else if (lua_isinteger(L, k))
        lua_pushfstring(L, "%I", (LUAI_UACINT)lua_tointeger(L, k));
    else
        luaL_error(L, "callout.json: cannot encode a %s key in an object", luaL_typename(L, k));
}

struct key {
    const char *s;
    size_t n;
    int slot;           /* index in the keys table of the original key */
};

static int key_cmp(const struct key *x, const struct key *y)
{
    size_t n = x->n < y->n ? x->n : y->n;
    int c = memcmp(x->s, y->s, n);
    return c != 0 ? c : (x->n > y->n) - (x->n < y->n);
}

/* One more step of work outside the values (a key gathered, placed or compared): every
 * LJSON_CHECK_VALUES, the host's budget check, which may raise. */
static void step(lua_State *L, lua_CFunction check, unsigned *count)
{
    if (check != NULL && ++*count % LJSON_CHECK_VALUES == 0)
        check(L);
}

/* Sorts k[0..n) by their text, k[n..2n) its scratch: a bottom-up merge sort of our own, not
 * qsort, because the budget check between comparisons may raise and a longjmp out of qsort
 * is undefined; k is a userdata, so a raise leaks nothing. */
static void sort_keys(lua_State *L, lua_CFunction check, unsigned *count, struct key *k,
                      size_t n)
{
    struct key *src = k, *dst = k + n;
    for (size_t w = 1; w < n; w *= 2) {
        for (size_t lo = 0; lo < n; lo += 2 * w) {
            size_t mid = n - lo > w ? lo + w : n;
            size_t hi = n - mid > w ? mid + w : n;
            size_t a = lo, b = mid, o = lo;
            while (a < mid && b < hi) {
                step(L, check, count);
                dst[o++] = key_cmp(&src[b], &src[a]) < 0 ? src[b++] : src[a++];
            }
            memcpy(dst + o, src + a, (mid - a) * sizeof *src);
            o += mid - a;
            memcpy(dst + o, src + b, (hi - b) * sizeof *src);
        }
        struct key *t = src;
        src = dst;
        dst = t;
    }
    if (src != k)
        memcpy(k, src, n * sizeof *k);
}

/* Whether table t holds no more keys than the `placed` its order wrote: then no key was set
 * around the order, and the sorted pass below has nothing to do. */
static bool placed_all(lua_State *L, int t, lua_Integer placed)
{
    lua_Integer n = 0;
    lua_pushnil(L);
    while (lua_next(L, t) != 0) {
        lua_pop(L, 1);
        if (++n > placed) {
            lua_pop(L, 1);
            return false;
        }
    }
    return true;
}

/* Writes `"key":value` pairs of table t for the keys that order (at o, or 0) does not
 * place: sorted by their text. placed = how many the order wrote; first = whether no
 * member was written yet. */
static void put_sorted_members(struct enc *e, int t, int o, lua_Integer placed, bool *first)
{
    lua_State *L = e->L;
    if (o != 0 && placed_all(L, t, placed))
        return;
    lua_newtable(L);                            /* keys: [2i-1] = key, [2i] = its text */
    int keys = lua_gettop(L);
    int n = 0;
    lua_pushnil(L);
    while (lua_next(L, t) != 0) {
        lua_pop(L, 1);
        tick(e);
        if (o != 0 && lua_type(L, -1) == LUA_TSTRING) {
            lua_pushvalue(L, -1);
            bool placed = lua_rawget(L, o) == LUA_TNUMBER;
            lua_pop(L, 1);
            if (placed)
                continue;
        }
        if (n >= INT32_MAX / 2 - 1)
            luaL_error(L, "callout.json: too many keys");
        lua_pushvalue(L, -1);
        lua_rawseti(L, keys, 2 * n + 1);
        push_key_text(e, lua_gettop(L));
        if (lua_type(L, -2) == LUA_TNUMBER) {
            /* 1 and "1" are two Lua keys but one JSON name: writing both makes a document
             * that parsers read differently (first wins, last wins, refused) */
            lua_pushvalue(L, -1);
            if (lua_rawget(L, t) != LUA_TNIL) {
                const char *k = lua_tostring(L, -2);
                luaL_error(L, "callout.json: key %s and key \"%s\" both encode as \"%s\"", k, k, k);
            }
            lua_pop(L, 1);
        }
        lua_rawseti(L, keys, 2 * n + 2);
        n++;
    }
    if (n == 0) {
        lua_pop(L, 1);
        return;
    }
    struct key *k = lua_newuserdatauv(L, sizeof *k * 2 * (size_t)n, 0);   /* + scratch */
    for (int i = 0; i < n; i++) {
        lua_rawgeti(L, keys, 2 * i + 2);        /* anchored by keys */
        k[i].s = lua_tolstring(L, -1, &k[i].n);
        k[i].slot = 2 * i + 1;
        lua_pop(L, 1);
    }
    sort_keys(L, e->check, &e->values, k, (size_t)n);
    for (int i = 0; i < n; i++) {
        if (!*first)
            putc_(e, ',');
        *first = false;
        put_string(e, k[i].s, k[i].n);
        putc_(e, ':');
        lua_rawgeti(L, keys, k[i].slot);
        lua_rawget(L, t);
        put_value(e, lua_gettop(L));
        lua_pop(L, 1);
    }
    lua_pop(L, 2);
}

/* A marked object: the keys of its order first, in order, then any other (sorted). */
static void put_object(struct enc *e, int t)
{
    lua_State *L = e->L;
    int top = lua_gettop(L);
    putc_(e, '{');
    bool first = true;
    lua_Integer placed = 0;
    lua_pushvalue(L, t);
    int o = 0;
    if (lua_rawget(L, e->order) == LUA_TTABLE) {
        o = lua_gettop(L);
        lua_Integer n = (lua_Integer)lua_rawlen(L, o);
        for (lua_Integer i = 1; i <= n; i++) {
            tick(e);                            /* removed keys' places too */
            lua_rawgeti(L, o, i);               /* key */
            int k = lua_gettop(L);
            if (order_live(L, o, k, i)) {
                lua_pushvalue(L, k);
                if (lua_rawget(L, t) != LUA_TNIL) {
                    if (!first)
                        putc_(e, ',');
                    first = false;
                    size_t klen;
                    const char *ks = lua_tolstring(L, k, &klen);
                    put_string(e, ks, klen);
                    putc_(e, ':');
                    put_value(e, lua_gettop(L));
                    placed++;
                }
                lua_pop(L, 1);
            }
            lua_pop(L, 1);
        }
    }
    put_sorted_members(e, t, o, placed, &first);
    lua_settop(L, top);
    putc_(e, '}');
}

/* A plain table: an array when its keys are exactly 1..n (n >= 1), else an object. */
static void put_plain(struct enc *e, int t)
{
    lua_State *L = e->L;
    lua_Integer count = 0, max = 0;
    bool seq = true;
    lua_pushnil(L);
    while (lua_next(L, t) != 0) {
        lua_pop(L, 1);
        count++;
        if (seq) {
            if (lua_isinteger(L, -1) && lua_tointeger(L, -1) >= 1) {
                lua_Integer k = lua_tointeger(L, -1);
                if (k > max)
                    max = k;
            } else {
                seq = false;
            }
        }
    }
    if (seq && count > 0 && max == count) {
        put_array(e, t, count);
        return;
    }
    putc_(e, '{');
    bool first = true;
    put_sorted_members(e, t, 0, 0, &first);
    putc_(e, '}');
}

static void put_value(struct enc *e, int idx)
{
    lua_State *L = e->L;
    tick(e);
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
        put(e, "null", 4);
        return;
    case LUA_TBOOLEAN:
        if (lua_toboolean(L, idx))
            put(e, "true", 4);
        else
            put(e, "false", 5);
        return;
    case LUA_TNUMBER:
        if (lua_isinteger(L, idx))
            put_integer(e, lua_tointeger(L, idx));
        else
            put_float(e, (double)lua_tonumber(L, idx));
        return;
    case LUA_TSTRING: {
        size_t n;
        const char *s = lua_tolstring(L, idx, &n);
        put_string(e, s, n);
        return;
    }
    case LUA_TTABLE:
        break;
    default:
        if (pbstruct_is_null(L, idx)) {
            put(e, "null", 4);
            return;
        }
        luaL_error(L, "callout.json: cannot encode a %s", luaL_typename(L, idx));
        return;
    }
    enter(e, idx);
    int kind = LJSON_PLAIN;
    if (lua_getmetatable(L, idx)) {
        if (lua_rawequal(L, -1, e->object_mt))
            kind = LJSON_OBJECT;
        else if (lua_rawequal(L, -1, e->array_mt))
            kind = LJSON_ARRAY;
        lua_pop(L, 1);
    }
    if (kind == LJSON_OBJECT)
        put_object(e, idx);
    else if (kind == LJSON_ARRAY)
        put_marked_array(e, idx);
    else
        put_plain(e, idx);
    e->depth--;
}

/* ------------------------------------------------------------------------------------ */
/* The module                                                                           */
/* ------------------------------------------------------------------------------------ */

/* decode(text) -> value; raises "callout.json: <what> at line L, column C". */
static int l_decode(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    char err[200];
    if (ljson_decode(L, s, n, 0, err, sizeof err) != 0)
        return luaL_error(L, "callout.json: %s", err);
    return 1;
}

/* encode(value) -> compact text. */
static int l_encode(lua_State *L)
{
    luaL_checkany(L, 1);
    lua_settop(L, 1);
    push_env(L);                                /* 2 order, 3 object_mt, 4 array_mt */
    struct buf *b = lua_newuserdatauv(L, sizeof *b, 0);
    memset(b, 0, sizeof *b);
    b->alloc = lua_getallocf(L, &b->ud);
    set_closer(L, BUF_MT, buf_close);
    lua_toclose(L, 5);
    /* the path is 2 KiB: in a userdata rather than on the C stack */
    struct enc *e = lua_newuserdatauv(L, sizeof *e, 0);
    e->L = L;
    e->b = b;
    e->order = 2;
    e->object_mt = 3;
    e->array_mt = 4;
    e->depth = 0;
    e->check = budget_of(L);
    e->values = 0;
    put_value(e, 1);
    if (e->check != NULL)
        e->check(L);        /* once more before the copy, which costs as much again */
    lua_pushlstring(L, b->p, b->n);
    lua_replace(L, 1);
    lua_settop(L, 1);                           /* closes the buffer */
    return 1;
}

/* Marks t (at 1, or a new table) with mt; an object's present keys get an order (sorted:
 * a table constructor has none to keep). */
static int mark(lua_State *L, enum ljson_kind kind)
{
    if (lua_isnoneornil(L, 1)) {
        lua_settop(L, 0);
        lua_newtable(L);
    }
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    push_env(L);                                /* 2 order, 3 object_mt, 4 array_mt */
    enum ljson_kind now = ljson_kind(L, 1);
    if (now == kind)
        return lua_settop(L, 1), 1;
    if (now == LJSON_PLAIN && lua_getmetatable(L, 1))
        return luaL_argerror(L, 1, "a table with a metatable of its own");
    lua_pushvalue(L, 1);
    lua_pushnil(L);
    lua_rawset(L, 2);                           /* forget an old order */
    if (kind == LJSON_OBJECT) {
        lua_CFunction check = budget_of(L);     /* a table can have millions of keys */
        unsigned steps = 0;
        lua_newtable(L);                        /* 5: the string keys (anchored) */
        int n = 0;
        lua_pushnil(L);
        while (lua_next(L, 1) != 0) {
            lua_pop(L, 1);
            step(L, check, &steps);
            if (lua_type(L, -1) == LUA_TSTRING && n < INT32_MAX / 2 - 1) {
                lua_pushvalue(L, -1);
                lua_rawseti(L, 5, ++n);
            }
        }
        struct key *k = lua_newuserdatauv(L, sizeof *k * 2 * (size_t)(n ? n : 1), 0);
        for (int i = 0; i < n; i++) {
            lua_rawgeti(L, 5, i + 1);
            k[i].s = lua_tolstring(L, -1, &k[i].n);
            k[i].slot = i + 1;
            lua_pop(L, 1);
        }
        sort_keys(L, check, &steps, k, (size_t)n);
        for (int i = 0; i < n; i++) {
            step(L, check, &steps);
            lua_rawgeti(L, 5, k[i].slot);
            order_append(L, 2, 1, lua_gettop(L));
            lua_pop(L, 1);
        }
        lua_settop(L, 4);
        lua_pushvalue(L, 3);
    } else {
        lua_pushvalue(L, 4);
    }
    lua_setmetatable(L, 1);
    lua_settop(L, 1);
    return 1;
}

static int l_object(lua_State *L) { return mark(L, LJSON_OBJECT); }
static int l_array(lua_State *L) { return mark(L, LJSON_ARRAY); }

static int l_kind(lua_State *L)
{
    luaL_checkany(L, 1);
    switch (ljson_kind(L, 1)) {
    case LJSON_OBJECT: lua_pushliteral(L, "object"); break;
    case LJSON_ARRAY: lua_pushliteral(L, "array"); break;
    default: lua_pushnil(L);
    }
    return 1;
}

int ljson_open(lua_State *L)
{
    push_env(L);
    lua_pop(L, 3);
    static const luaL_Reg fns[] = {
        {"decode", l_decode},
        {"encode", l_encode},
        {"object", l_object},
        {"array", l_array},
        {"kind", l_kind},
        {NULL, NULL},
    };
    luaL_newlib(L, fns);
    pbstruct_push_null(L);
    lua_setfield(L, -2, "null");
    return 1;
}
