/* pbstruct.c — google.protobuf.Struct / Value / ListValue <-> plain Lua values.
 *
 * Out (Lua -> Struct) never raises and never calls Lua code: tables are walked with
 * lua_next/lua_rawgeti only, keys are type-checked before lua_tolstring, and every error
 * is a message naming the path of the offending entry. Strings point into the Lua strings
 * (no copies), so the source value must stay reachable until the message is packed. */
#include "errpath.h"
#include "pbstruct.h"

#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>

typedef Google__Protobuf__Struct Struct;
typedef Google__Protobuf__Struct__FieldsEntry FieldsEntry;
typedef Google__Protobuf__Value Value;
typedef Google__Protobuf__ListValue ListValue;

#define KIND(x) GOOGLE__PROTOBUF__VALUE__KIND_##x

/* Deeper nesting is refused both ways; it also stops cycles in Lua tables. */
#define MAX_DEPTH 100
/* Numbers whose magnitude is at most 2^53 are exact in a double. */
#define EXACT_INT_MAX 9007199254740992.0

/* The JSON null: its address is the light userdata, unique to this process. */
static const char null_sentinel = 0;

void pbstruct_push_null(lua_State *L) { lua_pushlightuserdata(L, (void *)&null_sentinel); }

int pbstruct_is_null(lua_State *L, int idx)
{
    return lua_type(L, idx) == LUA_TLIGHTUSERDATA && lua_touserdata(L, idx) == &null_sentinel;
}

/* ---- push: Struct -> Lua ---------------------------------------------------------------- */

static void push_struct(lua_State *L, const Struct *s, int depth);

static void push_value(lua_State *L, const Value *v, int depth)
{
    if (!v) {
        pbstruct_push_null(L);
        return;
    }
    switch (v->kind_case) {
    case KIND(NUMBER_VALUE): {
        double d = v->number_value;
        /* 1 comes back as 1, not 1.0 */
        if (d == floor(d) && fabs(d) <= EXACT_INT_MAX)
            lua_pushinteger(L, (lua_Integer)d);
        else
            lua_pushnumber(L, d);
        break;
    }
    case KIND(STRING_VALUE): {
        const char *s = v->string_value ? v->string_value : "";
        lua_pushlstring(L, s, strlen(s));
        break;
    }
    case KIND(BOOL_VALUE): lua_pushboolean(L, v->bool_value); break;
    case KIND(STRUCT_VALUE): push_struct(L, v->struct_value, depth); break;
    case KIND(LIST_VALUE): {
        luaL_checkstack(L, 4, "protobuf Struct nested too deeply");
        if (depth > MAX_DEPTH)
            luaL_error(L, "protobuf Struct nested more than %d levels deep", MAX_DEPTH);
        const ListValue *l = v->list_value;
        size_t n = l ? l->n_values : 0;
        lua_createtable(L, n > INT32_MAX ? 0 : (int)n, 0);
        for (size_t i = 0; i < n; i++) {
            push_value(L, l->values[i], depth + 1);
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
        break;
    }
    case KIND(NULL_VALUE):
    default: pbstruct_push_null(L); break;
    }
}

/* stack: ... -> ... table */
static void push_struct(lua_State *L, const Struct *s, int depth)
{
    luaL_checkstack(L, 4, "protobuf Struct nested too deeply");
    if (depth > MAX_DEPTH)
        luaL_error(L, "protobuf Struct nested more than %d levels deep", MAX_DEPTH);
    size_t n = s ? s->n_fields : 0;
    lua_createtable(L, 0, n > INT32_MAX ? 0 : (int)n);
    for (size_t i = 0; i < n; i++) {
        const FieldsEntry *e = s->fields[i];
        if (!e || !e->key)
            continue;
        lua_pushlstring(L, e->key, strlen(e->key));
        push_value(L, e->value, depth + 1);
        lua_rawset(L, -3);
    }
}

void pbstruct_push(lua_State *L, const Struct *s) { push_struct(L, s, 1); }

void pbstruct_push_value(lua_State *L, const Value *v) { push_value(L, v, 1); }

/* ---- out: Lua -> Struct ----------------------------------------------------------------- */

struct conv {
    lua_State *L;
    struct arena *a;
    char *err;
    size_t errlen;
    struct errpath path;   /* where in the value being converted */
};

static int fail(struct conv *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    errpath_vfail(&c->path, c->err, c->errlen, fmt, ap);
    va_end(ap);
    return -1;
}

bool pbstruct_utf8_valid(const char *str, size_t len)
{
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    while (i < len) {
        unsigned char b = s[i];
        if (b < 0x80) {
            i++;
            continue;
        }
        size_t n;
        uint32_t cp, min;
        if ((b & 0xe0) == 0xc0) {
            n = 2, cp = b & 0x1f, min = 0x80;
        } else if ((b & 0xf0) == 0xe0) {
            n = 3, cp = b & 0x0f, min = 0x800;
        } else if ((b & 0xf8) == 0xf0) {
            n = 4, cp = b & 0x07, min = 0x10000;
        } else {
            return false;
        }
        if (len - i < n)
            return false;
        for (size_t j = 1; j < n; j++) {
            if ((s[i + j] & 0xc0) != 0x80)
                return false;
            cp = (cp << 6) | (s[i + j] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        i += n;
    }
    return true;
}

/* A protobuf string: NUL-terminated (Lua strings are), no NUL inside, valid UTF-8
 * (Envoy's parser rejects a message with anything else). */
static int check_string(struct conv *c, const char *s, size_t len, const char *what)
{
    if (memchr(s, '\0', len))
        return fail(c, "%s contains a NUL byte", what);
    if (!pbstruct_utf8_valid(s, len))
        return fail(c, "%s is not valid UTF-8", what);
    return 0;
}

static void describe_key(lua_State *L, int idx, char *buf, size_t size)
{
    switch (lua_type(L, idx)) {
    case LUA_TNUMBER:
        if (lua_isinteger(L, idx))
            snprintf(buf, size, "%lld", (long long)lua_tointeger(L, idx));
        else
            snprintf(buf, size, "%.14g", lua_tonumber(L, idx));
        break;
    case LUA_TBOOLEAN: snprintf(buf, size, "%s", lua_toboolean(L, idx) ? "true" : "false"); break;
    default: snprintf(buf, size, "of type %s", luaL_typename(L, idx)); break;
    }
}

static int conv_value(struct conv *c, int idx, Value *out, int depth);

/* Counts the entries of the table at idx and whether they form a sequence 1..n (n >= 1).
 * stack unchanged. */
static size_t table_shape(lua_State *L, int idx, bool *is_list)
{
    size_t n = 0;
    bool ints = true;
    lua_Integer max = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        n++;
        if (ints && lua_type(L, -2) == LUA_TNUMBER && lua_isinteger(L, -2)) {
            lua_Integer k = lua_tointeger(L, -2);
            if (k < 1)
                ints = false;
            else if (k > max)
                max = k;
        } else {
            ints = false;
        }
        lua_pop(L, 1);
    }
    /* n distinct integer keys in 1..n are exactly 1..n */
    *is_list = ints && n >= 1 && (lua_Unsigned)max == n;
    return n;
}

/* The table at idx (absolute) as a Struct; it must have only string keys. */
static int conv_struct(struct conv *c, int idx, size_t n, Struct **out, int depth)
{
    lua_State *L = c->L;
    Struct *s = arena_alloc(c->a, sizeof *s);
    if (!s)
        return fail(c, "out of memory");
    google__protobuf__struct__init(s);
    *out = s;
    if (n == 0)
        return 0;
    s->fields = arena_alloc(c->a, n * sizeof *s->fields);
    FieldsEntry *entries = arena_calloc(c->a, n, sizeof *entries);
    Value *values = arena_calloc(c->a, n, sizeof *values);
    if (!s->fields || !entries || !values)
        return fail(c, "out of memory");
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        if (lua_type(L, -2) != LUA_TSTRING) {
            char key[64];
            describe_key(L, -2, key, sizeof key);
            lua_pop(L, 2);
            return fail(c, "key %s is not a string (a protobuf Struct has string keys; a list "
                           "must be a sequence 1..n)",
                        key);
        }
        if (s->n_fields == n) { /* cannot happen: the table did not change */
            lua_pop(L, 2);
            return fail(c, "table changed during conversion");
        }
        size_t klen;
        const char *k = lua_tolstring(L, -2, &klen);
        size_t old = errpath_push_key(&c->path, k, klen);
        if (check_string(c, k, klen, "the key") < 0) {
            lua_pop(L, 2);
            return -1;
        }
        FieldsEntry *e = &entries[s->n_fields];
        google__protobuf__struct__fields_entry__init(e);
        e->key = (char *)k;
        e->value = &values[s->n_fields];
        if (conv_value(c, lua_gettop(L), e->value, depth + 1) < 0) {
            lua_pop(L, 2);
            return -1;
        }
        errpath_restore(&c->path, old);
        s->fields[s->n_fields++] = e;
        lua_pop(L, 1);
    }
    return 0;
}

/* The sequence 1..n at idx (absolute) as a ListValue. */
static int conv_list(struct conv *c, int idx, size_t n, ListValue **out, int depth)
{
    lua_State *L = c->L;
    ListValue *l = arena_alloc(c->a, sizeof *l);
    Value **ptrs = arena_alloc(c->a, n * sizeof *ptrs);
    Value *values = arena_calloc(c->a, n, sizeof *values);
    if (!l || !ptrs || !values)
        return fail(c, "out of memory");
    google__protobuf__list_value__init(l);
    l->values = ptrs;
    *out = l;
    for (size_t i = 0; i < n; i++) {
        size_t old = errpath_push(&c->path, "[%zu]", i + 1);
        lua_rawgeti(L, idx, (lua_Integer)i + 1);
        int rc = conv_value(c, lua_gettop(L), &values[i], depth + 1);
        lua_pop(L, 1);
        if (rc < 0)
            return -1;
        errpath_restore(&c->path, old);
        ptrs[l->n_values++] = &values[i];
    }
    return 0;
}

/* Fills *out (zeroed or not) from the Lua value at idx (absolute). stack unchanged. */
static int conv_value(struct conv *c, int idx, Value *out, int depth)
{
    lua_State *L = c->L;
    google__protobuf__value__init(out);
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
        /* only reachable for an explicit top-level nil: tables hold no nils */
        out->kind_case = KIND(NULL_VALUE);
        out->null_value = GOOGLE__PROTOBUF__NULL_VALUE__NULL_VALUE;
        return 0;
    case LUA_TBOOLEAN:
        out->kind_case = KIND(BOOL_VALUE);
        out->bool_value = lua_toboolean(L, idx);
        return 0;
    case LUA_TNUMBER: {
        double d = lua_isinteger(L, idx) ? (double)lua_tointeger(L, idx) : lua_tonumber(L, idx);
        if (!isfinite(d))
            return fail(c, "%s cannot be converted to a protobuf Value (not a finite number)",
                        isnan(d) ? "NaN" : d > 0 ? "inf" : "-inf");
        out->kind_case = KIND(NUMBER_VALUE);
        out->number_value = d;
        return 0;
    }
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        if (check_string(c, s, len, "the string") < 0)
            return -1;
        out->kind_case = KIND(STRING_VALUE);
        out->string_value = (char *)s;
        return 0;
    }
    case LUA_TTABLE: {
        /* depth is this table's nesting level; the top-level Struct is 1 */
        if (depth > MAX_DEPTH)
            return fail(c, "nested more than %d levels deep (a table containing itself?)",
                        MAX_DEPTH);
        if (!lua_checkstack(L, 4))
            return fail(c, "out of Lua stack space");
        bool is_list;
        size_t n = table_shape(L, idx, &is_list);
        if (is_list) {
            out->kind_case = KIND(LIST_VALUE);
            return conv_list(c, idx, n, &out->list_value, depth);
        }
        out->kind_case = KIND(STRUCT_VALUE);
        return conv_struct(c, idx, n, &out->struct_value, depth);
    }
    case LUA_TLIGHTUSERDATA:
        if (pbstruct_is_null(L, idx)) {
            out->kind_case = KIND(NULL_VALUE);
            out->null_value = GOOGLE__PROTOBUF__NULL_VALUE__NULL_VALUE;
            return 0;
        }
        return fail(c, "a light userdata cannot be converted to a protobuf Value (only "
                       "callout.null can)");
    default:
        return fail(c, "a %s cannot be converted to a protobuf Value", luaL_typename(L, idx));
    }
}

static void conv_init(struct conv *c, lua_State *L, const char *path, struct arena *a, char *err,
                      size_t errlen)
{
    c->L = L;
    c->a = a;
    c->err = err;
    c->errlen = errlen;
    c->path.len = 0;
    c->path.buf[0] = '\0';
    if (path)
        errpath_push(&c->path, "%s", path);
    if (errlen > 0)
        err[0] = '\0';
}

int pbstruct_from_lua(lua_State *L, int idx, const char *path, struct arena *a, Struct **out,
                      char *err, size_t errlen)
{
    struct conv c;
    conv_init(&c, L, path, a, err, errlen);
    idx = lua_absindex(L, idx);
    *out = NULL;
    if (lua_type(L, idx) != LUA_TTABLE)
        return fail(&c, "expected a table with string keys, got a %s", luaL_typename(L, idx));
    if (!lua_checkstack(L, 4))
        return fail(&c, "out of Lua stack space");
    bool is_list;
    size_t n = table_shape(L, idx, &is_list);
    return conv_struct(&c, idx, n, out, 1);
}

int pbstruct_value_from_lua(lua_State *L, int idx, const char *path, struct arena *a,
                            Value **out, char *err, size_t errlen)
{
    struct conv c;
    conv_init(&c, L, path, a, err, errlen);
    idx = lua_absindex(L, idx);
    *out = arena_alloc(a, sizeof **out);
    if (!*out)
        return fail(&c, "out of memory");
    return conv_value(&c, idx, *out, 1);
}
