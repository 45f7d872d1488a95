/* pbstruct.c — google.protobuf.Struct / Value / ListValue <-> plain Lua values.
 *
 * Out (Lua -> Struct) never raises and never calls Lua code: tables are walked with
 * lua_next/lua_rawgeti only, keys are type-checked before lua_tolstring, and every error
 * is a message naming the path of the offending entry. Strings point into the Lua strings
 * (no copies), so the source value must stay reachable until the message is packed. */
#include "pbstruct.h"

#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>

#include "checks.h"

typedef Google__Protobuf__Struct Struct;
typedef Google__Protobuf__Struct__FieldsEntry FieldsEntry;
typedef Google__Protobuf__Value Value;
typedef Google__Protobuf__ListValue ListValue;

#define KIND(x) GOOGLE__PROTOBUF__VALUE__KIND_##x

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
        if (depth > CHECKS_MAX_DEPTH)
            luaL_error(L, "protobuf Struct nested more than %d levels deep", CHECKS_MAX_DEPTH);
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
    if (depth > CHECKS_MAX_DEPTH)
        luaL_error(L, "protobuf Struct nested more than %d levels deep", CHECKS_MAX_DEPTH);
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
    struct checks_err e;   /* the message, and where in the value being converted */
};

#define fail(c, ...) checks_fail(&(c)->e, __VA_ARGS__)

/* A protobuf string: NUL-terminated (Lua strings are), no NUL inside, valid UTF-8
 * (Envoy's parser rejects a message with anything else). */
static int check_string(struct conv *c, const char *s, size_t len, const char *what)
{
    const char *why = checks_proto_string(s, len);
    return why != NULL ? fail(c, "%s %s", what, why) : 0;
}

static int conv_value(struct conv *c, int idx, Value *out, int depth);

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
            char key[80];
            checks_describe_key(L, -2, "", key, sizeof key);
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
        size_t old = checks_path_push_key(&c->e.path, k, klen);
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
        checks_path_restore(&c->e.path, old);
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
        size_t old = checks_path_push(&c->e.path, "[%zu]", i + 1);
        lua_rawgeti(L, idx, (lua_Integer)i + 1);
        int rc = conv_value(c, lua_gettop(L), &values[i], depth + 1);
        lua_pop(L, 1);
        if (rc < 0)
            return -1;
        checks_path_restore(&c->e.path, old);
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
        if (depth > CHECKS_MAX_DEPTH)
            return fail(c, "nested more than %d levels deep (a table containing itself?)",
                        CHECKS_MAX_DEPTH);
        if (!lua_checkstack(L, 4))
            return fail(c, "out of Lua stack space");
        struct checks_shape sh;
        checks_table_shape(L, idx, &sh);
        if (sh.seq && sh.n >= 1) {   /* {} is an empty Struct */
            out->kind_case = KIND(LIST_VALUE);
            return conv_list(c, idx, sh.n, &out->list_value, depth);
        }
        out->kind_case = KIND(STRUCT_VALUE);
        return conv_struct(c, idx, sh.n, &out->struct_value, depth);
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
    checks_err_init(&c->e, err, errlen, path);
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
    struct checks_shape sh;
    checks_table_shape(L, idx, &sh);
    return conv_struct(&c, idx, sh.n, out, 1);
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
