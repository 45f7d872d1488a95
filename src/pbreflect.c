/* pbreflect.c — any protobuf-c message <-> a Lua table with the proto's field names.
 *
 * Everything is driven by the descriptors protoc-c generates: a field's label, type, offset
 * and quantifier_offset say where its value lives and how it is counted (n_X for repeated
 * fields, the case member for a oneof, has_X for proto2/proto3-optional scalars).
 * protobuf-c has no flag for map fields: a map is a repeated message whose type is the
 * nested `<Field>Entry` message with exactly key = 1 and value = 2 (is_map_entry).
 *
 * Out (Lua -> message) never raises and never calls Lua code (lua_next/lua_rawgeti only,
 * key types checked before lua_tolstring), so it runs fine outside a protected call; the
 * messages live in the arena and their strings point into the Lua strings. */
#include "pbreflect.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>

#include "checks.h"
#include "google/protobuf/duration.pb-c.h"
#include "pbstruct.h"

/* google.protobuf.Duration's range, 10000 years. */
#define DURATION_MAX_SECONDS 315576000000.0

/* ---- well-known types ------------------------------------------------------------------- */

enum wkt { WKT_NONE, WKT_STRUCT, WKT_VALUE, WKT_LIST, WKT_DURATION, WKT_WRAPPER };

/* Wrappers (BoolValue, StringValue, UInt32Value, ...) are the plain value of their only
 * field; Any is left to the generic path ({type_url=, value=}). */
static enum wkt wkt_of(const ProtobufCMessageDescriptor *d)
{
    static const char pfx[] = "google.protobuf.";
    if (strncmp(d->name, pfx, sizeof pfx - 1) != 0)
        return WKT_NONE;
    const char *n = d->name + sizeof pfx - 1;
    if (!strcmp(n, "Struct"))
        return WKT_STRUCT;
    if (!strcmp(n, "Value"))
        return WKT_VALUE;
    if (!strcmp(n, "ListValue"))
        return WKT_LIST;
    if (!strcmp(n, "Duration"))
        return WKT_DURATION;
    size_t len = strlen(n);
    if (len > 5 && !strcmp(n + len - 5, "Value") && d->n_fields == 1 &&
        !strcmp(d->fields[0].name, "value") && d->fields[0].label != PROTOBUF_C_LABEL_REPEATED &&
        d->fields[0].type != PROTOBUF_C_TYPE_MESSAGE)
        return WKT_WRAPPER;
    return WKT_NONE;
}

/* Whether `f` (a field of `parent`) is a map<k, v>: a repeated `<Field>Entry` message
 * nested in parent with exactly key = 1 and value = 2. */
static bool is_map(const ProtobufCMessageDescriptor *parent, const ProtobufCFieldDescriptor *f)
{
    if (f->label != PROTOBUF_C_LABEL_REPEATED || f->type != PROTOBUF_C_TYPE_MESSAGE)
        return false;
    const ProtobufCMessageDescriptor *e = f->descriptor;
    size_t plen = strlen(parent->name), slen = strlen(e->short_name);
    return e->n_fields == 2 && e->fields[0].id == 1 && !strcmp(e->fields[0].name, "key") &&
           e->fields[1].id == 2 && !strcmp(e->fields[1].name, "value") &&
           e->fields[0].label != PROTOBUF_C_LABEL_REPEATED &&
           e->fields[1].label != PROTOBUF_C_LABEL_REPEATED && slen > 5 &&
           !strcmp(e->short_name + slen - 5, "Entry") && !strncmp(e->name, parent->name, plen) &&
           e->name[plen] == '.' && !strcmp(e->name + plen + 1, e->short_name);
}

/* Bytes a single value of the field's type takes (in a struct, or a repeated array). */
static size_t type_size(ProtobufCType t)
{
    switch (t) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
    case PROTOBUF_C_TYPE_ENUM: return sizeof(int32_t);
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32: return sizeof(uint32_t);
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64: return sizeof(int64_t);
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64: return sizeof(uint64_t);
    case PROTOBUF_C_TYPE_FLOAT: return sizeof(float);
    case PROTOBUF_C_TYPE_DOUBLE: return sizeof(double);
    case PROTOBUF_C_TYPE_BOOL: return sizeof(protobuf_c_boolean);
    case PROTOBUF_C_TYPE_STRING: return sizeof(char *);
    case PROTOBUF_C_TYPE_BYTES: return sizeof(ProtobufCBinaryData);
    case PROTOBUF_C_TYPE_MESSAGE: return sizeof(ProtobufCMessage *);
    }
    return 0;
}

#define AT(msg, off, type) ((type *)((char *)(msg) + (off)))
#define CAT(msg, off, type) ((const type *)((const char *)(msg) + (off)))

/* ---- push: message -> Lua --------------------------------------------------------------- */

static void push_message(lua_State *L, const ProtobufCMessageDescriptor *d,
                         const ProtobufCMessage *m, int depth, bool sparse);

/* Whether the single value of type f->type at p is proto3's default (0, false, "", empty). */
static bool is_default(const ProtobufCFieldDescriptor *f, const void *p)
{
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
    case PROTOBUF_C_TYPE_ENUM: return *(const uint32_t *)p == 0;
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64: return *(const uint64_t *)p == 0;
    case PROTOBUF_C_TYPE_FLOAT: return *(const float *)p == 0;
    case PROTOBUF_C_TYPE_DOUBLE: return *(const double *)p == 0;
    case PROTOBUF_C_TYPE_BOOL: return !*(const protobuf_c_boolean *)p;
    case PROTOBUF_C_TYPE_STRING: return !*(char *const *)p || !**(char *const *)p;
    case PROTOBUF_C_TYPE_BYTES: return ((const ProtobufCBinaryData *)p)->len == 0;
    case PROTOBUF_C_TYPE_MESSAGE: return !*(const ProtobufCMessage *const *)p;
    }
    return false;
}

/* Pushes the single value of type f->type stored at p. */
static void push_scalar(lua_State *L, const ProtobufCFieldDescriptor *f, const void *p, int depth,
                        bool sparse)
{
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32: lua_pushinteger(L, *(const int32_t *)p); break;
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32: lua_pushinteger(L, (lua_Integer) * (const uint32_t *)p); break;
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64: lua_pushinteger(L, (lua_Integer) * (const int64_t *)p); break;
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64: {
        uint64_t v = *(const uint64_t *)p;
        if (v <= (uint64_t)LUA_MAXINTEGER)
            lua_pushinteger(L, (lua_Integer)v);
        else
            lua_pushnumber(L, (lua_Number)v);
        break;
    }
    case PROTOBUF_C_TYPE_FLOAT: lua_pushnumber(L, *(const float *)p); break;
    case PROTOBUF_C_TYPE_DOUBLE: lua_pushnumber(L, *(const double *)p); break;
    case PROTOBUF_C_TYPE_BOOL: lua_pushboolean(L, *(const protobuf_c_boolean *)p); break;
    case PROTOBUF_C_TYPE_ENUM: {
        int v = *(const int32_t *)p;
        const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(f->descriptor, v);
        if (ev)
            lua_pushstring(L, ev->name);
        else
            lua_pushinteger(L, v);
        break;
    }
    case PROTOBUF_C_TYPE_STRING: {
        const char *s = *(char *const *)p;
        if (!s)
            s = "";
        lua_pushlstring(L, s, strlen(s));
        break;
    }
    case PROTOBUF_C_TYPE_BYTES: {
        const ProtobufCBinaryData *b = p;
        lua_pushlstring(L, b->len ? (const char *)b->data : "", b->len);
        break;
    }
    case PROTOBUF_C_TYPE_MESSAGE:
        push_message(L, f->descriptor, *(const ProtobufCMessage *const *)p, depth + 1, sparse);
        break;
    }
}

/* Pushes a message of type d; m NULL pushes the default instance (map values). */
static void push_message(lua_State *L, const ProtobufCMessageDescriptor *d,
                         const ProtobufCMessage *m, int depth, bool sparse)
{
    luaL_checkstack(L, 6, "protobuf message nested too deeply");
    if (depth > CHECKS_MAX_DEPTH)
        luaL_error(L, "protobuf message nested more than %d levels deep", CHECKS_MAX_DEPTH);
    if (!m) {
        /* a default instance in scratch memory owned by Lua, removed after the push */
        void *scratch = lua_newuserdatauv(L, d->sizeof_message, 0);
        protobuf_c_message_init(d, scratch);
        push_message(L, d, scratch, depth, sparse);
        lua_remove(L, -2);
        return;
    }
    switch (wkt_of(d)) {
    case WKT_STRUCT: pbstruct_push(L, (const Google__Protobuf__Struct *)m); return;
    case WKT_VALUE: pbstruct_push_value(L, (const Google__Protobuf__Value *)m); return;
    case WKT_LIST: {
        Google__Protobuf__Value v = GOOGLE__PROTOBUF__VALUE__INIT;
        v.kind_case = GOOGLE__PROTOBUF__VALUE__KIND_LIST_VALUE;
        v.list_value = (Google__Protobuf__ListValue *)m;
        pbstruct_push_value(L, &v);
        return;
    }
    case WKT_DURATION: {
        const Google__Protobuf__Duration *du = (const Google__Protobuf__Duration *)m;
        lua_pushnumber(L, (lua_Number)du->seconds + (lua_Number)du->nanos / 1e9);
        return;
    }
    case WKT_WRAPPER:
        push_scalar(L, &d->fields[0], CAT(m, d->fields[0].offset, char), depth, sparse);
        return;
    case WKT_NONE: break;
    }

    lua_createtable(L, 0, (int)d->n_fields);
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        const void *p = CAT(m, f->offset, char);
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t n = *CAT(m, f->quantifier_offset, size_t);
            const char *arr = *(const char *const *)p;
            size_t sz = type_size(f->type);
            if (sparse && n == 0)
                continue;
            if (is_map(d, f)) {
                const ProtobufCMessageDescriptor *e = f->descriptor;
                lua_createtable(L, 0, n > INT32_MAX ? 0 : (int)n);
                for (size_t j = 0; j < n; j++) {
                    const ProtobufCMessage *em = ((const ProtobufCMessage *const *)arr)[j];
                    if (!em)
                        continue;
                    push_scalar(L, &e->fields[0], CAT(em, e->fields[0].offset, char), depth,
                                sparse);
                    push_scalar(L, &e->fields[1], CAT(em, e->fields[1].offset, char), depth,
                                sparse);
                    lua_rawset(L, -3);
                }
            } else {
                lua_createtable(L, n > INT32_MAX ? 0 : (int)n, 0);
                for (size_t j = 0; j < n; j++) {
                    push_scalar(L, f, arr + j * sz, depth, sparse);
                    lua_rawseti(L, -2, (lua_Integer)j + 1);
                }
            }
        } else if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
            if (*CAT(m, f->quantifier_offset, uint32_t) != f->id)
                continue;
            if (f->type == PROTOBUF_C_TYPE_MESSAGE && !*(const ProtobufCMessage *const *)p)
                continue;
            push_scalar(L, f, p, depth, sparse);
        } else if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
            if (!*(const ProtobufCMessage *const *)p)
                continue; /* unset sub-message: nil */
            push_scalar(L, f, p, depth, sparse);
        } else {
            /* proto2 / proto3-optional scalars count their presence in has_X */
            if (f->label == PROTOBUF_C_LABEL_OPTIONAL && f->quantifier_offset &&
                !*CAT(m, f->quantifier_offset, protobuf_c_boolean))
                continue;
            if (f->label == PROTOBUF_C_LABEL_OPTIONAL &&
                (f->type == PROTOBUF_C_TYPE_STRING) && !*(char *const *)p)
                continue;
            /* proto3 without presence: sparse leaves defaults out, as proto3 JSON does */
            if (sparse && !(f->label == PROTOBUF_C_LABEL_OPTIONAL && f->quantifier_offset) &&
                is_default(f, p))
                continue;
            push_scalar(L, f, p, depth, sparse);
        }
        lua_setfield(L, -2, f->name);
    }
}

void pbreflect_push(lua_State *L, const ProtobufCMessage *msg)
{
    if (!msg) {
        lua_newtable(L);
        return;
    }
    push_message(L, msg->descriptor, msg, 1, false);
}

void pbreflect_push_sparse(lua_State *L, const ProtobufCMessage *msg)
{
    if (!msg) {
        lua_newtable(L);
        return;
    }
    push_message(L, msg->descriptor, msg, 1, true);
}

/* ---- out: Lua -> message ---------------------------------------------------------------- */

struct conv {
    lua_State *L;
    struct arena *a;
    struct checks_err e;   /* the message, and where in the value being converted */
};

#define fail(c, ...) checks_fail(&(c)->e, __VA_ARGS__)

static int oom(struct conv *c) { return fail(c, "out of memory"); }

/* "a string", "a number", "callout.null", ... for messages about the value at idx. */
static const char *what(lua_State *L, int idx)
{
    switch (lua_type(L, idx)) {
    case LUA_TNIL: return "nil";
    case LUA_TBOOLEAN: return "a boolean";
    case LUA_TLIGHTUSERDATA: return pbstruct_is_null(L, idx) ? "callout.null" : "a light userdata";
    case LUA_TNUMBER: return "a number";
    case LUA_TSTRING: return "a string";
    case LUA_TTABLE: return "a table";
    case LUA_TFUNCTION: return "a function";
    case LUA_TUSERDATA: return "a userdata";
    case LUA_TTHREAD: return "a thread";
    default: return "a value";
    }
}

static const char *type_name(ProtobufCType t)
{
    switch (t) {
    case PROTOBUF_C_TYPE_INT32: return "int32";
    case PROTOBUF_C_TYPE_SINT32: return "sint32";
    case PROTOBUF_C_TYPE_SFIXED32: return "sfixed32";
    case PROTOBUF_C_TYPE_INT64: return "int64";
    case PROTOBUF_C_TYPE_SINT64: return "sint64";
    case PROTOBUF_C_TYPE_SFIXED64: return "sfixed64";
    case PROTOBUF_C_TYPE_UINT32: return "uint32";
    case PROTOBUF_C_TYPE_FIXED32: return "fixed32";
    case PROTOBUF_C_TYPE_UINT64: return "uint64";
    case PROTOBUF_C_TYPE_FIXED64: return "fixed64";
    case PROTOBUF_C_TYPE_FLOAT: return "float";
    case PROTOBUF_C_TYPE_DOUBLE: return "double";
    case PROTOBUF_C_TYPE_BOOL: return "bool";
    case PROTOBUF_C_TYPE_ENUM: return "enum";
    case PROTOBUF_C_TYPE_STRING: return "string";
    case PROTOBUF_C_TYPE_BYTES: return "bytes";
    case PROTOBUF_C_TYPE_MESSAGE: return "message";
    }
    return "?";
}

/* A number at idx that is an integer (or a float with an integral value) within
 * [lo, hi]; uint64 fields use get_uint64. */
static int get_int(struct conv *c, int idx, ProtobufCType t, int64_t lo, int64_t hi, int64_t *out)
{
    enum checks_int r = checks_integer(c->L, idx, lo, hi, out);
    if (r == CHECKS_INT_OK)
        return 0;
    char range[48], msg[160];
    snprintf(range, sizeof range, "%lld..%lld", (long long)lo, (long long)hi);
    checks_integer_message(c->L, idx, r, type_name(t), range, what(c->L, idx), msg, sizeof msg);
    return fail(c, "%s", msg);
}

static int get_uint64(struct conv *c, int idx, ProtobufCType t, uint64_t *out)
{
    enum checks_int r = checks_uint64(c->L, idx, out);
    if (r == CHECKS_INT_OK)
        return 0;
    char msg[160];
    checks_integer_message(c->L, idx, r, type_name(t), "0..18446744073709551615",
                           what(c->L, idx), msg, sizeof msg);
    return fail(c, "%s", msg);
}

/* The string at idx, or NULL (the message written) when it is not one. Returning the
 * pointer, rather than a status beside an out-parameter, lets the compiler see that a caller
 * never reads an unset string: checks_fail's -1 is in another file, out of its sight. */
static const char *get_string(struct conv *c, int idx, size_t *len, const char *what_)
{
    lua_State *L = c->L;
    if (lua_type(L, idx) != LUA_TSTRING) {
        fail(c, "expected %s, got %s", what_, what(L, idx));
        return NULL;
    }
    return lua_tolstring(L, idx, len);   /* never NULL for a string */
}

static int conv_message(struct conv *c, int idx, const ProtobufCMessageDescriptor *d,
                        ProtobufCMessage **out, int depth);

/* Stores the Lua value at idx (absolute) as one value of f's type at p. */
static int conv_scalar(struct conv *c, int idx, const ProtobufCFieldDescriptor *f, void *p,
                       int depth)
{
    lua_State *L = c->L;
    int64_t i;
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
        if (get_int(c, idx, f->type, INT32_MIN, INT32_MAX, &i) < 0)
            return -1;
        *(int32_t *)p = (int32_t)i;
        return 0;
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
        if (get_int(c, idx, f->type, 0, UINT32_MAX, &i) < 0)
            return -1;
        *(uint32_t *)p = (uint32_t)i;
        return 0;
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
        if (get_int(c, idx, f->type, INT64_MIN, INT64_MAX, &i) < 0)
            return -1;
        *(int64_t *)p = i;
        return 0;
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64: return get_uint64(c, idx, f->type, (uint64_t *)p);
    case PROTOBUF_C_TYPE_FLOAT:
    case PROTOBUF_C_TYPE_DOUBLE: {
        if (lua_type(L, idx) != LUA_TNUMBER)
            return fail(c, "expected a number (%s), got %s", type_name(f->type), what(L, idx));
        double d = lua_tonumber(L, idx);
        if (!isfinite(d))
            return fail(c, "expected a finite number (%s), got %s", type_name(f->type),
                        isnan(d) ? "NaN" : d > 0 ? "inf" : "-inf");
        if (f->type == PROTOBUF_C_TYPE_FLOAT) {
            if (fabs(d) > FLT_MAX)
                return fail(c, "%g is out of range for float", d);
            *(float *)p = (float)d;
        } else {
            *(double *)p = d;
        }
        return 0;
    }
    case PROTOBUF_C_TYPE_BOOL:
        if (lua_type(L, idx) != LUA_TBOOLEAN)
            return fail(c, "expected a boolean, got %s", what(L, idx));
        *(protobuf_c_boolean *)p = lua_toboolean(L, idx);
        return 0;
    case PROTOBUF_C_TYPE_ENUM: {
        const ProtobufCEnumDescriptor *ed = f->descriptor;
        if (lua_type(L, idx) == LUA_TSTRING) {
            size_t len;
            const char *s = lua_tolstring(L, idx, &len);
            const ProtobufCEnumValue *ev = checks_enum_by_name(ed, s, len);
            if (!ev) {
                /* a short list of names is the best hint; a long one (StatusCode) is noise */
                char q[300], hint[400];
                checks_quote(s, len, q, sizeof q);
                if (ed->n_values <= 8) {
                    char names[300];
                    checks_enum_names(ed, names, sizeof names);
                    snprintf(hint, sizeof hint, " (expected %s, or a number)", names);
                } else {
                    struct checks_near near;
                    checks_near_init(&near, s, len);
                    for (unsigned i = 0; i < ed->n_values; i++)
                        checks_near_offer(&near, ed->values[i].name);
                    checks_did_you_mean(checks_near_best(&near), "", hint, sizeof hint);
                }
                return fail(c, "unknown %s value %s%s", ed->name, q, hint);
            }
            *(int32_t *)p = ev->value;
            return 0;
        }
        if (lua_type(L, idx) != LUA_TNUMBER)
            return fail(c, "expected an enum name or number (%s), got %s", ed->name,
                        what(L, idx));
        /* proto3 enums are open: any int32 number goes (unknown ones come back as numbers) */
        if (get_int(c, idx, f->type, INT32_MIN, INT32_MAX, &i) < 0)
            return -1;
        *(int32_t *)p = (int32_t)i;
        return 0;
    }
    case PROTOBUF_C_TYPE_STRING: {
        size_t len;
        const char *s = get_string(c, idx, &len, "a string");
        if (s == NULL)
            return -1;
        /* Envoy's parser rejects a string field that is not UTF-8; NUL would truncate */
        const char *why = checks_proto_string(s, len);
        if (why != NULL)
            return fail(c, "the string %s (use a bytes field)", why);
        *(const char **)p = s;
        return 0;
    }
    case PROTOBUF_C_TYPE_BYTES: {
        size_t len;
        const char *s = get_string(c, idx, &len, "a string (bytes)");
        if (s == NULL)
            return -1;
        ProtobufCBinaryData *b = p;
        b->data = (uint8_t *)s;
        b->len = len;
        return 0;
    }
    case PROTOBUF_C_TYPE_MESSAGE:
        return conv_message(c, idx, f->descriptor, (ProtobufCMessage **)p, depth + 1);
    }
    return fail(c, "unsupported field type %d", (int)f->type);
}

/* A repeated field from the sequence at idx. */
static int conv_repeated(struct conv *c, int idx, const ProtobufCFieldDescriptor *f, void *msg,
                         int depth)
{
    lua_State *L = c->L;
    if (lua_type(L, idx) != LUA_TTABLE)
        return fail(c, "expected a list (repeated %s), got %s", type_name(f->type), what(L, idx));
    struct checks_shape sh;
    checks_table_shape(L, idx, &sh);
    size_t n = sh.n;
    if (!sh.seq)
        return fail(c, "expected a list (repeated %s): keys must be 1..n", type_name(f->type));
    size_t sz = type_size(f->type);
    char *arr = NULL;
    if (n > 0 && !(arr = arena_calloc(c->a, n, sz)))
        return oom(c);
    for (size_t j = 0; j < n; j++) {
        size_t old = checks_path_push(&c->e.path, "[%zu]", j + 1);
        lua_rawgeti(L, idx, (lua_Integer)j + 1);
        int rc = conv_scalar(c, lua_gettop(L), f, arr + j * sz, depth);
        lua_pop(L, 1);
        if (rc < 0)
            return -1;
        checks_path_restore(&c->e.path, old);
    }
    *AT(msg, f->quantifier_offset, size_t) = n;
    *AT(msg, f->offset, char *) = arr;
    return 0;
}

/* A map field from the table at idx: each entry becomes a <Field>Entry message. */
static int conv_map(struct conv *c, int idx, const ProtobufCFieldDescriptor *f, void *msg,
                    int depth)
{
    lua_State *L = c->L;
    if (lua_type(L, idx) != LUA_TTABLE)
        return fail(c, "expected a table (map), got %s", what(L, idx));
    const ProtobufCMessageDescriptor *e = f->descriptor;
    const ProtobufCFieldDescriptor *kf = &e->fields[0], *vf = &e->fields[1];
    struct checks_shape sh;
    checks_table_shape(L, idx, &sh);
    size_t n = sh.n;
    ProtobufCMessage **arr = NULL;
    if (n > 0 && !(arr = arena_alloc(c->a, n * sizeof *arr)))
        return oom(c);
    size_t count = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        int kidx = lua_gettop(L) - 1, vidx = lua_gettop(L);
        size_t old = checks_path_push_lua_key(&c->e.path, L, kidx);
        ProtobufCMessage *em = count < n ? arena_alloc(c->a, e->sizeof_message) : NULL;
        if (!em) {
            lua_pop(L, 2);
            return count < n ? oom(c) : fail(c, "table changed during conversion");
        }
        protobuf_c_message_init(e, em);
        if (conv_scalar(c, kidx, kf, AT(em, kf->offset, char), depth) < 0 ||
            conv_scalar(c, vidx, vf, AT(em, vf->offset, char), depth) < 0) {
            lua_pop(L, 2);
            return -1;
        }
        checks_path_restore(&c->e.path, old);
        arr[count++] = em;
        lua_pop(L, 1);
    }
    *AT(msg, f->quantifier_offset, size_t) = count;
    *AT(msg, f->offset, ProtobufCMessage **) = arr;
    return 0;
}

/* A well-known type from a plain value; 1 when d is not one. */
static int conv_wkt(struct conv *c, int idx, const ProtobufCMessageDescriptor *d,
                    ProtobufCMessage **out, int depth)
{
    lua_State *L = c->L;
    switch (wkt_of(d)) {
    case WKT_NONE: return 1;
    case WKT_STRUCT:
        return pbstruct_from_lua(L, idx, c->e.path.buf, c->a, (Google__Protobuf__Struct **)out, c->e.buf,
                                 c->e.size);
    case WKT_VALUE:
        return pbstruct_value_from_lua(L, idx, c->e.path.buf, c->a, (Google__Protobuf__Value **)out,
                                       c->e.buf, c->e.size);
    case WKT_LIST: {
        Google__Protobuf__Value *v;
        if (lua_type(L, idx) != LUA_TTABLE)
            return fail(c, "expected a list, got %s", what(L, idx));
        if (pbstruct_value_from_lua(L, idx, c->e.path.buf, c->a, &v, c->e.buf, c->e.size) < 0)
            return -1;
        if (v->kind_case == GOOGLE__PROTOBUF__VALUE__KIND_LIST_VALUE) {
            *out = &v->list_value->base;
            return 0;
        }
        if (v->kind_case == GOOGLE__PROTOBUF__VALUE__KIND_STRUCT_VALUE &&
            v->struct_value->n_fields == 0) {
            Google__Protobuf__ListValue *l = arena_alloc(c->a, sizeof *l);
            if (!l)
                return oom(c);
            google__protobuf__list_value__init(l);
            *out = &l->base;
            return 0;
        }
        return fail(c, "expected a list: keys must be 1..n");
    }
    case WKT_DURATION: {
        if (lua_type(L, idx) != LUA_TNUMBER)
            return fail(c, "expected a number of seconds (Duration), got %s", what(L, idx));
        double s = lua_tonumber(L, idx);
        if (!(s >= 0) || !(s <= DURATION_MAX_SECONDS)) { /* NaN fails both */
            char num[40];
            checks_describe_number(L, idx, num, sizeof num);
            return fail(c, "expected a number of seconds from 0 to %.0f (Duration), got %s",
                        DURATION_MAX_SECONDS, num);
        }
        Google__Protobuf__Duration *du = arena_alloc(c->a, sizeof *du);
        if (!du)
            return oom(c);
        google__protobuf__duration__init(du);
        double whole = floor(s);
        double nanos = round((s - whole) * 1e9);
        if (nanos >= 1e9) {
            whole += 1;
            nanos = 0;
        }
        du->seconds = (int64_t)whole;
        du->nanos = (int32_t)nanos;
        *out = &du->base;
        return 0;
    }
    case WKT_WRAPPER: {
        ProtobufCMessage *m = arena_alloc(c->a, d->sizeof_message);
        if (!m)
            return oom(c);
        protobuf_c_message_init(d, m);
        if (conv_scalar(c, idx, &d->fields[0], AT(m, d->fields[0].offset, char), depth) < 0)
            return -1;
        *out = m;
        return 0;
    }
    }
    return 1;
}

/* The names of oneof member `id` of d, for the two-members error. */
static const char *field_name(const ProtobufCMessageDescriptor *d, unsigned id)
{
    const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field(d, id);
    return f ? f->name : "?";
}

/* A message of type d from the Lua value at idx (absolute): a table of field names, or the
 * plain value of a well-known type. stack unchanged. */
static int conv_message(struct conv *c, int idx, const ProtobufCMessageDescriptor *d,
                        ProtobufCMessage **out, int depth)
{
    lua_State *L = c->L;
    *out = NULL;
    if (depth > CHECKS_MAX_DEPTH)
        return fail(c, "nested more than %d levels deep (a table containing itself?)",
                    CHECKS_MAX_DEPTH);
    if (!lua_checkstack(L, 6))
        return fail(c, "out of Lua stack space");
    int rc = conv_wkt(c, idx, d, out, depth);
    if (rc <= 0)
        return rc;
    if (lua_type(L, idx) != LUA_TTABLE)
        return fail(c, "expected a table (%s), got %s", d->name, what(L, idx));

    ProtobufCMessage *m = arena_alloc(c->a, d->sizeof_message);
    if (!m)
        return oom(c);
    protobuf_c_message_init(d, m);
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        int vidx = lua_gettop(L);
        if (lua_type(L, -2) != LUA_TSTRING) {
            char key[80];
            checks_describe_key(L, -2, "", key, sizeof key);
            lua_pop(L, 2);
            return fail(c, "key %s is not a field name", key);
        }
        size_t klen;
        const char *k = lua_tolstring(L, -2, &klen);
        const ProtobufCFieldDescriptor *f =
            strlen(k) == klen ? protobuf_c_message_descriptor_get_field_by_name(d, k) : NULL;
        if (!f) {
            char q[300], hint[160];
            checks_quote(k, klen, q, sizeof q);
            struct checks_near near;
            checks_near_init(&near, k, klen);
            for (unsigned i = 0; i < d->n_fields; i++)
                checks_near_offer(&near, d->fields[i].name);
            checks_did_you_mean(checks_near_best(&near), "", hint, sizeof hint);
            lua_pop(L, 2);
            return fail(c, "unknown field %s%s", q, hint);
        }
        size_t old = checks_path_push(&c->e.path, "%s%s", c->e.path.len ? "." : "", f->name);
        void *p = AT(m, f->offset, char);
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            rc = is_map(d, f) ? conv_map(c, vidx, f, m, depth) : conv_repeated(c, vidx, f, m, depth);
        } else {
            if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
                uint32_t *which = AT(m, f->quantifier_offset, uint32_t);
                if (*which != 0 && *which != f->id) {
                    const char *a = field_name(d, *which), *b = f->name;
                    if (strcmp(a, b) > 0) {
                        const char *t = a;
                        a = b;
                        b = t;
                    }
                    checks_path_restore(&c->e.path, old);
                    lua_pop(L, 2);
                    return fail(c, "'%s' and '%s' are members of one oneof: set only one", a,
                                b);
                }
                *which = f->id;
            } else if (f->label == PROTOBUF_C_LABEL_OPTIONAL && f->quantifier_offset &&
                       f->type != PROTOBUF_C_TYPE_MESSAGE && f->type != PROTOBUF_C_TYPE_STRING) {
                *AT(m, f->quantifier_offset, protobuf_c_boolean) = 1;
            }
            rc = conv_scalar(c, vidx, f, p, depth);
        }
        if (rc < 0) {
            lua_pop(L, 2);
            return -1;
        }
        checks_path_restore(&c->e.path, old);
        lua_pop(L, 1);
    }
    *out = m;
    return 0;
}

int pbreflect_from_lua(lua_State *L, int idx, const ProtobufCMessageDescriptor *desc,
                       const char *path, struct arena *a, ProtobufCMessage **out, char *err,
                       size_t errlen)
{
    struct conv c = {.L = L, .a = a};
    checks_err_init(&c.e, err, errlen, path);
    return conv_message(&c, lua_absindex(L, idx), desc, out, 1);
}
