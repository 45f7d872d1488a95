/* test_pbreflect.c — pbstruct (Struct <-> plain Lua values) and pbreflect (any message <->
 * a table with the proto's field names): round trips through packed bytes, values checked
 * with Lua snippets, and every error path with its message. */
#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lualib.h>

#include "arena.h"
#include "envoy/service/ext_proc/v3/external_processor.pb-c.h"
#include "google/protobuf/any.pb-c.h"
#include "google/protobuf/duration.pb-c.h"
#include "google/protobuf/wrappers.pb-c.h"
#include "pbreflect.h"
#include "pbstruct.h"

#include "check.h"
#define CHECK_STR(a, b)                                                                \
    do {                                                                               \
        const char *a_ = (a), *b_ = (b);                                               \
        if (a_ == NULL || strcmp(a_, b_) != 0)                                         \
            fprintf(stderr, "%s:%d: got \"%s\"\n     expected \"%s\"\n", __FILE__,     \
                    __LINE__, a_ ? a_ : "(null)", b_);                                 \
        CHECK(a_ != NULL && strcmp(a_, b_) == 0);                                      \
    } while (0)

typedef Google__Protobuf__Struct Struct;
typedef Google__Protobuf__Value Value;
typedef Envoy__Service__ExtProc__V3__ProcessingRequest Req;
typedef Envoy__Service__ExtProc__V3__ProcessingResponse Resp;

#define KIND(x) GOOGLE__PROTOBUF__VALUE__KIND_##x

static struct arena arena;
static char err[1024];

/* A fresh state with the standard libraries and `null` = the sentinel. */
static lua_State *fresh(void)
{
    lua_State *L = luaL_newstate();
    CHECK(L != NULL);
    luaL_openlibs(L);
    pbstruct_push_null(L);
    lua_setglobal(L, "null");
    return L;
}

/* Runs `chunk` (which must return true); prints it when it does not. */
#define CHECK_LUA(L, chunk) CHECK(lua_ok((L), (chunk), __LINE__))
static bool lua_ok(lua_State *L, const char *chunk, int line)
{
    int top = lua_gettop(L);
    bool ok = luaL_dostring(L, chunk) == LUA_OK && lua_toboolean(L, -1);
    if (!ok)
        fprintf(stderr, "line %d: chunk failed: %s\n  -> %s\n", line, chunk,
                lua_isstring(L, -1) ? lua_tostring(L, -1) : luaL_typename(L, -1));
    lua_settop(L, top);
    return ok;
}

/* Evaluates `return <expr>` and leaves the value on the stack. */
static void eval(lua_State *L, const char *expr)
{
    char buf[4096];
    snprintf(buf, sizeof buf, "return %s", expr);
    if (luaL_dostring(L, buf) != LUA_OK) {
        fprintf(stderr, "eval failed: %s: %s\n", expr, lua_tostring(L, -1));
        CHECK(0);
    }
}

/* Packs and unpacks msg (a wire round trip); the copy lives in the arena. */
static ProtobufCMessage *roundtrip(const ProtobufCMessage *msg)
{
    size_t n = protobuf_c_message_get_packed_size(msg);
    uint8_t *buf = malloc(n + 1);
    CHECK(buf != NULL);
    CHECK(protobuf_c_message_pack(msg, buf) == n);
    ProtobufCAllocator al = arena_pb_allocator(&arena);
    ProtobufCMessage *copy = protobuf_c_message_unpack(msg->descriptor, &al, n, buf);
    free(buf);
    CHECK(copy != NULL);
    return copy;
}

/* ---- pbstruct ----------------------------------------------------------------------------- */

/* Converts `expr` to a Struct with path prefix "dm"; 0 or -1 (message in err). */
static int struct_of(lua_State *L, const char *expr, Struct **out)
{
    eval(L, expr);
    int top = lua_gettop(L);
    int rc = pbstruct_from_lua(L, -1, "dm", &arena, out, err, sizeof err);
    CHECK(lua_gettop(L) == top);
    return rc;
}

static void test_struct_out(void)
{
    lua_State *L = fresh();
    Struct *s;

    /* empty table -> empty Struct */
    CHECK(struct_of(L, "{}", &s) == 0);
    CHECK(s != NULL && s->n_fields == 0);
    CHECK(protobuf_c_message_get_packed_size(&s->base) == 0);

    /* every kind, checked on the protobuf side */
    CHECK(struct_of(L, "{ s = 'v', i = 3, f = 1.5, t = true, n = null, e = {}, "
                       "l = {1, 'two', {x = 1}}, o = {k = false} }",
                    &s) == 0);
    CHECK(s->n_fields == 8);
    int seen = 0;
    for (size_t i = 0; i < s->n_fields; i++) {
        const char *k = s->fields[i]->key;
        const Value *v = s->fields[i]->value;
        if (!strcmp(k, "s")) {
            CHECK(v->kind_case == KIND(STRING_VALUE) && !strcmp(v->string_value, "v"));
            seen |= 1;
        } else if (!strcmp(k, "i")) {
            CHECK(v->kind_case == KIND(NUMBER_VALUE) && v->number_value == 3.0);
            seen |= 2;
        } else if (!strcmp(k, "f")) {
            CHECK(v->kind_case == KIND(NUMBER_VALUE) && v->number_value == 1.5);
            seen |= 4;
        } else if (!strcmp(k, "t")) {
            CHECK(v->kind_case == KIND(BOOL_VALUE) && v->bool_value);
            seen |= 8;
        } else if (!strcmp(k, "n")) {
            CHECK(v->kind_case == KIND(NULL_VALUE));
            seen |= 16;
        } else if (!strcmp(k, "e")) {
            CHECK(v->kind_case == KIND(STRUCT_VALUE) && v->struct_value->n_fields == 0);
            seen |= 32;
        } else if (!strcmp(k, "l")) {
            CHECK(v->kind_case == KIND(LIST_VALUE) && v->list_value->n_values == 3);
            const Value *const *lv = (const Value *const *)v->list_value->values;
            CHECK(lv[0]->kind_case == KIND(NUMBER_VALUE) && lv[0]->number_value == 1.0);
            CHECK(lv[1]->kind_case == KIND(STRING_VALUE) && !strcmp(lv[1]->string_value, "two"));
            CHECK(lv[2]->kind_case == KIND(STRUCT_VALUE) && lv[2]->struct_value->n_fields == 1);
            seen |= 64;
        } else if (!strcmp(k, "o")) {
            CHECK(v->kind_case == KIND(STRUCT_VALUE) && v->struct_value->n_fields == 1);
            CHECK(v->struct_value->fields[0]->value->kind_case == KIND(BOOL_VALUE));
            CHECK(!v->struct_value->fields[0]->value->bool_value);
            seen |= 128;
        }
    }
    CHECK(seen == 255);
    lua_settop(L, 0);

    /* round trip through the wire and back to Lua */
    CHECK(struct_of(L, "{ ['my.ns'] = { key = 'v', n = 1, big = 2^60, f = -2.25, "
                       "list = {1, 2, null, {}}, none = null, yes = true, e = {} } }",
                    &s) == 0);
    Struct *back = (Struct *)roundtrip(&s->base);
    pbstruct_push(L, back);
    lua_setglobal(L, "t");
    CHECK_LUA(L, "local m = t['my.ns'] return m.key == 'v' and math.type(m.n) == 'integer' "
                 "and m.n == 1");
    CHECK_LUA(L, "local m = t['my.ns'] return math.type(m.big) == 'float' and m.big == 2^60");
    CHECK_LUA(L, "local m = t['my.ns'] return math.type(m.f) == 'float' and m.f == -2.25");
    CHECK_LUA(L, "local l = t['my.ns'].list return #l == 4 and l[1] == 1 and l[2] == 2 and "
                 "l[3] == null and type(l[4]) == 'table' and next(l[4]) == nil");
    CHECK_LUA(L, "local m = t['my.ns'] return m.none == null and m.yes == true and "
                 "type(m.e) == 'table' and next(m.e) == nil");
    CHECK_LUA(L, "local n = 0 for _ in pairs(t['my.ns']) do n = n + 1 end return n == 8");
    lua_settop(L, 0);

    /* 2^53 is still an integer coming back, 2^53 + 2 (exact in a double) is a float */
    CHECK(struct_of(L, "{ a = 2^53, b = -2^53, c = 2^53 + 2, d = -0.0, i = math.maxinteger }",
                    &s) == 0);
    pbstruct_push(L, s);
    lua_setglobal(L, "t");
    CHECK_LUA(L, "return math.type(t.a) == 'integer' and t.a == 9007199254740992");
    CHECK_LUA(L, "return math.type(t.b) == 'integer' and t.b == -9007199254740992");
    CHECK_LUA(L, "return math.type(t.c) == 'float'");
    CHECK_LUA(L, "return math.type(t.d) == 'integer' and t.d == 0");
    CHECK_LUA(L, "return math.type(t.i) == 'float'"); /* precision lost: documented */
    lua_settop(L, 0);

    /* binary-safe push of strings; NULL struct and NULL value */
    pbstruct_push(L, NULL);
    CHECK(lua_type(L, -1) == LUA_TTABLE && lua_rawlen(L, -1) == 0);
    lua_pushnil(L);
    CHECK(lua_next(L, -2) == 0);
    pbstruct_push_value(L, NULL);
    CHECK(pbstruct_is_null(L, -1));
    Value unset = GOOGLE__PROTOBUF__VALUE__INIT;
    pbstruct_push_value(L, &unset);
    CHECK(pbstruct_is_null(L, -1));
    lua_pushlightuserdata(L, &unset);
    CHECK(!pbstruct_is_null(L, -1));
    lua_pushboolean(L, 0);
    CHECK(!pbstruct_is_null(L, -1));
    lua_settop(L, 0);

    /* a value at the top level */
    Value *v;
    eval(L, "{ 'a', 'b' }");
    CHECK(pbstruct_value_from_lua(L, -1, "x", &arena, &v, err, sizeof err) == 0);
    CHECK(v->kind_case == KIND(LIST_VALUE) && v->list_value->n_values == 2);
    eval(L, "null");
    CHECK(pbstruct_value_from_lua(L, -1, "x", &arena, &v, err, sizeof err) == 0);
    CHECK(v->kind_case == KIND(NULL_VALUE));
    eval(L, "7");
    CHECK(pbstruct_value_from_lua(L, -1, "x", &arena, &v, err, sizeof err) == 0);
    CHECK(v->kind_case == KIND(NUMBER_VALUE) && v->number_value == 7.0);
    eval(L, "'s'");
    CHECK(pbstruct_value_from_lua(L, -1, "x", &arena, &v, err, sizeof err) == 0);
    CHECK(v->kind_case == KIND(STRING_VALUE) && !strcmp(v->string_value, "s"));
    lua_settop(L, 0);

    lua_close(L);
}

/* n Structs nested through the key "k"; the innermost one's "k" is an unset Value. */
static Struct *nested(int n)
{
    Struct *deep = NULL;
    for (int i = 0; i < n; i++) {
        Struct *p = arena_alloc(&arena, sizeof *p);
        Google__Protobuf__Struct__FieldsEntry *e = arena_alloc(&arena, sizeof *e);
        Google__Protobuf__Struct__FieldsEntry **fs = arena_alloc(&arena, sizeof *fs);
        Value *val = arena_alloc(&arena, sizeof *val);
        google__protobuf__struct__init(p);
        google__protobuf__struct__fields_entry__init(e);
        google__protobuf__value__init(val);
        e->key = "k";
        e->value = val;
        if (deep) {
            val->kind_case = KIND(STRUCT_VALUE);
            val->struct_value = deep;
        }
        fs[0] = e;
        p->n_fields = 1;
        p->fields = fs;
        deep = p;
    }
    return deep;
}

static int push_struct_ud(lua_State *L)
{
    pbstruct_push(L, lua_touserdata(L, 1));
    return 1;
}

static void test_struct_errors(void)
{
    lua_State *L = fresh();
    Struct *s;

    CHECK(struct_of(L, "'x'", &s) == -1);
    CHECK_STR(err, "dm: expected a table with string keys, got a string");
    CHECK(struct_of(L, "{1, 2}", &s) == -1);
    CHECK_STR(err, "dm: key [1] is not a string (a protobuf Struct has string keys; a list must "
                   "be a sequence 1..n)");
    CHECK(struct_of(L, "{ ns = { list = {1, print} } }", &s) == -1);
    CHECK_STR(err, "dm.ns.list[2]: a function cannot be converted to a protobuf Value");
    CHECK(struct_of(L, "{ ['my.ns'] = { x = coroutine.create(print) } }", &s) == -1);
    CHECK_STR(err, "dm[\"my.ns\"].x: a thread cannot be converted to a protobuf Value");
    CHECK(struct_of(L, "{ u = io.stdout }", &s) == -1);
    CHECK_STR(err, "dm.u: a userdata cannot be converted to a protobuf Value");
    CHECK(struct_of(L, "{ ns = { [true] = 1 } }", &s) == -1);
    CHECK_STR(err, "dm.ns: key [true] is not a string (a protobuf Struct has string keys; a list "
                   "must be a sequence 1..n)");
    CHECK(struct_of(L, "{ ns = { [1.5] = 1 } }", &s) == -1);
    CHECK_STR(err, "dm.ns: key [1.5] is not a string (a protobuf Struct has string keys; a list "
                   "must be a sequence 1..n)");
    /* a list with a hole or an extra key is an object with non-string keys */
    CHECK(struct_of(L, "{ l = {1, nil, 3} }", &s) == -1);
    CHECK(strstr(err, "dm.l: key ") == err);
    CHECK(struct_of(L, "{ l = {1, 2, x = 3} }", &s) == -1);
    CHECK(strstr(err, "dm.l: key ") == err);
    CHECK(struct_of(L, "{ l = {[0] = 1} }", &s) == -1);
    CHECK(strstr(err, "dm.l: key [0] is not a string") == err);
    CHECK(struct_of(L, "{ x = 0/0 }", &s) == -1);
    CHECK_STR(err, "dm.x: NaN cannot be converted to a protobuf Value (not a finite number)");
    CHECK(struct_of(L, "{ x = {1, math.huge} }", &s) == -1);
    CHECK_STR(err, "dm.x[2]: inf cannot be converted to a protobuf Value (not a finite number)");
    CHECK(struct_of(L, "{ x = -math.huge }", &s) == -1);
    CHECK_STR(err, "dm.x: -inf cannot be converted to a protobuf Value (not a finite number)");
    CHECK(struct_of(L, "{ x = 'a\\0b' }", &s) == -1);
    CHECK_STR(err, "dm.x: the string contains a NUL byte");
    CHECK(struct_of(L, "{ x = '\\xff' }", &s) == -1);
    CHECK_STR(err, "dm.x: the string is not valid UTF-8");
    CHECK(struct_of(L, "{ ['\\xc0\\x80'] = 1 }", &s) == -1);
    CHECK_STR(err, "dm[\"\xc0\x80\"]: the key is not valid UTF-8");
    CHECK(struct_of(L, "{ x = 'h\\u{e9}llo \\u{1F600}' }", &s) == 0);

    /* cycles and depth */
    CHECK(struct_of(L, "(function() local t = {} t.self = t return {c = t} end)()", &s) == -1);
    CHECK(strstr(err, "dm.c.self.self.self") == err);
    CHECK(strstr(err, ": nested more than 100 levels deep (a table containing itself?)") != NULL);
    /* 100 levels are fine, 101 are not (the top-level Struct counts as one) */
    CHECK(struct_of(L, "(function() local t = {} for i = 1, 98 do t = {t} end "
                       "return {x = t} end)()",
                    &s) == 0);
    CHECK(struct_of(L, "(function() local t = {} for i = 1, 99 do t = {t} end "
                       "return {x = t} end)()",
                    &s) == -1);
    CHECK(strstr(err, "dm.x[1][1]") == err);

    /* no path prefix */
    eval(L, "{ a = { b = print } }");
    CHECK(pbstruct_from_lua(L, -1, "", &arena, &s, err, sizeof err) == -1);
    CHECK_STR(err, "a.b: a function cannot be converted to a protobuf Value");
    CHECK(pbstruct_from_lua(L, -1, NULL, &arena, &s, err, sizeof err) == -1);
    CHECK_STR(err, "a.b: a function cannot be converted to a protobuf Value");
    eval(L, "print");
    Value *v;
    CHECK(pbstruct_value_from_lua(L, -1, NULL, &arena, &v, err, sizeof err) == -1);
    CHECK_STR(err, "a function cannot be converted to a protobuf Value");
    lua_pushlightuserdata(L, &arena);
    CHECK(pbstruct_value_from_lua(L, -1, "v", &arena, &v, err, sizeof err) == -1);
    CHECK_STR(err, "v: a light userdata cannot be converted to a protobuf Value (only "
                   "callout.null can)");
    lua_settop(L, 0);

    /* pushing: 100 levels are fine, 101 raise */
    lua_pushcfunction(L, push_struct_ud);
    lua_pushlightuserdata(L, nested(100));
    CHECK(lua_pcall(L, 1, 1, 0) == LUA_OK);
    lua_setglobal(L, "t");
    CHECK_LUA(L, "local d = 0 while type(t) == 'table' do d = d + 1 t = t.k end "
                 "return d == 100 and t == null");
    lua_pushcfunction(L, push_struct_ud);
    lua_pushlightuserdata(L, nested(101));
    CHECK(lua_pcall(L, 1, 1, 0) != LUA_OK);
    CHECK_STR(lua_tostring(L, -1), "protobuf Struct nested more than 100 levels deep");
    lua_settop(L, 0);
    lua_close(L);
}


/* ---- pbreflect: a rich ProcessingRequest to Lua ------------------------------------------ */

typedef Envoy__Config__Core__V3__HeaderValue HeaderValue;
typedef Envoy__Config__Core__V3__HeaderMap HeaderMap;
typedef Envoy__Config__Core__V3__Metadata Metadata;
typedef Envoy__Service__ExtProc__V3__HttpHeaders HttpHeaders;
typedef Envoy__Service__ExtProc__V3__ProtocolConfiguration ProtocolConfiguration;
#define BODY_MODE(x) ENVOY__EXTENSIONS__FILTERS__HTTP__EXT_PROC__V3__PROCESSING_MODE__BODY_SEND_MODE__##x

/* A Struct from a Lua expression (pbstruct is tested above). */
static Struct *make_struct(lua_State *L, const char *expr)
{
    Struct *s;
    eval(L, expr);
    CHECK(pbstruct_from_lua(L, -1, "t", &arena, &s, err, sizeof err) == 0);
    /* leave the table on the stack: the Struct's strings point into it */
    return s;
}

/* Pushes a deep-equality function as the global `same`. */
static void def_same(lua_State *L)
{
    CHECK(luaL_dostring(L, "function same(a, b)\n"
                           "  if type(a) ~= 'table' or type(b) ~= 'table' then\n"
                           "    return a == b and math.type(a) == math.type(b) end\n"
                           "  for k, v in pairs(a) do if not same(v, b[k]) then return false end end\n"
                           "  for k in pairs(b) do if a[k] == nil then return false end end\n"
                           "  return true\n"
                           "end") == LUA_OK);
}

static void test_request_push(void)
{
    lua_State *L = fresh();
    def_same(L);

    HeaderValue h1 = ENVOY__CONFIG__CORE__V3__HEADER_VALUE__INIT;
    h1.key = ":path";
    h1.raw_value.data = (uint8_t *)"/x";
    h1.raw_value.len = 2;
    HeaderValue h2 = ENVOY__CONFIG__CORE__V3__HEADER_VALUE__INIT;
    h2.key = "x-bin";
    h2.raw_value.data = (uint8_t *)"a\0b\xff";
    h2.raw_value.len = 4;
    HeaderValue *hs[] = {&h1, &h2};
    HeaderMap map = ENVOY__CONFIG__CORE__V3__HEADER_MAP__INIT;
    map.n_headers = 2;
    map.headers = hs;
    HttpHeaders hh;   /* __init: the __INIT macro names deprecated fields (clang warns) */
    envoy__service__ext_proc__v3__http_headers__init(&hh);
    hh.headers = &map;
    hh.end_of_stream = 1;

    Envoy__Service__ExtProc__V3__ProcessingRequest__AttributesEntry ae =
        ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__ATTRIBUTES_ENTRY__INIT;
    ae.key = "envoy.filters.http.ext_proc";
    ae.value = make_struct(L, "{ ['request.path'] = '/x', list = {1, null, true, 's', {a = 2.5}},"
                              " n = 3, f = false, e = {} }");
    Envoy__Service__ExtProc__V3__ProcessingRequest__AttributesEntry *aes[] = {&ae};

    Envoy__Config__Core__V3__Metadata__FilterMetadataEntry fe =
        ENVOY__CONFIG__CORE__V3__METADATA__FILTER_METADATA_ENTRY__INIT;
    fe.key = "ns";
    fe.value = make_struct(L, "{ k = 'v' }");
    Envoy__Config__Core__V3__Metadata__FilterMetadataEntry *fes[] = {&fe};
    Google__Protobuf__Any any = GOOGLE__PROTOBUF__ANY__INIT;
    any.type_url = "type.googleapis.com/x.Y";
    any.value.data = (uint8_t *)"\x01\x02";
    any.value.len = 2;
    Envoy__Config__Core__V3__Metadata__TypedFilterMetadataEntry te =
        ENVOY__CONFIG__CORE__V3__METADATA__TYPED_FILTER_METADATA_ENTRY__INIT;
    te.key = "typed";
    te.value = &any;
    Envoy__Config__Core__V3__Metadata__TypedFilterMetadataEntry *tes[] = {&te};
    Metadata md = ENVOY__CONFIG__CORE__V3__METADATA__INIT;
    md.n_filter_metadata = 1;
    md.filter_metadata = fes;
    md.n_typed_filter_metadata = 1;
    md.typed_filter_metadata = tes;

    ProtocolConfiguration pc = ENVOY__SERVICE__EXT_PROC__V3__PROTOCOL_CONFIGURATION__INIT;
    pc.request_body_mode = BODY_MODE(FULL_DUPLEX_STREAMED);
    pc.response_body_mode = BODY_MODE(BUFFERED);
    pc.send_body_without_waiting_for_header_response = 1;

    Req req = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__INIT;
    req.request_case = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_REQUEST_HEADERS;
    req.request_headers = &hh;
    req.n_attributes = 1;
    req.attributes = aes;
    req.metadata_context = &md;
    req.protocol_config = &pc;
    req.observability_mode = 1;

    Req *back = (Req *)roundtrip(&req.base);
    pbreflect_push(L, &back->base);
    lua_setglobal(L, "r");
    CHECK_LUA(L, "return r.request_headers.end_of_stream == true");
    CHECK_LUA(L, "local h = r.request_headers.headers.headers return #h == 2 and "
                 "h[1].key == ':path' and h[1].raw_value == '/x' and h[1].value == '' and "
                 "h[2].key == 'x-bin' and h[2].raw_value == 'a\\0b\\xff'");
    /* the oneof shows only its set member */
    CHECK_LUA(L, "return r.response_headers == nil and r.request_body == nil and "
                 "r.response_trailers == nil");
    /* deprecated map present and empty */
    CHECK_LUA(L, "local a = r.request_headers.attributes return type(a) == 'table' and "
                 "next(a) == nil");
    CHECK_LUA(L, "local a = r.attributes['envoy.filters.http.ext_proc'] return "
                 "a['request.path'] == '/x' and math.type(a.n) == 'integer' and a.n == 3 and "
                 "a.f == false and next(a.e) == nil");
    CHECK_LUA(L, "local l = r.attributes['envoy.filters.http.ext_proc'].list return #l == 5 and "
                 "l[1] == 1 and l[2] == null and l[3] == true and l[4] == 's' and l[5].a == 2.5");
    CHECK_LUA(L, "return r.metadata_context.filter_metadata.ns.k == 'v'");
    CHECK_LUA(L, "local t = r.metadata_context.typed_filter_metadata.typed return "
                 "t.type_url == 'type.googleapis.com/x.Y' and t.value == '\\1\\2'");
    CHECK_LUA(L, "local p = r.protocol_config return p.request_body_mode == "
                 "'FULL_DUPLEX_STREAMED' and p.response_body_mode == 'BUFFERED' and "
                 "p.send_body_without_waiting_for_header_response == true");
    CHECK_LUA(L, "return r.observability_mode == true");
    CHECK_LUA(L, "local n = 0 for _ in pairs(r) do n = n + 1 end return n == 5");

    /* and back: the pushed table rebuilds the same request */
    lua_getglobal(L, "r");
    ProtobufCMessage *m;
    CHECK(pbreflect_from_lua(L, -1, &envoy__service__ext_proc__v3__processing_request__descriptor,
                             "request", &arena, &m, err, sizeof err) == 0);
    Req *rebuilt = (Req *)roundtrip(m);
    CHECK(rebuilt->request_case == req.request_case);
    CHECK(rebuilt->request_headers->headers->n_headers == 2);
    CHECK(rebuilt->request_headers->headers->headers[1]->raw_value.len == 4);
    CHECK(memcmp(rebuilt->request_headers->headers->headers[1]->raw_value.data, "a\0b\xff", 4) ==
          0);
    CHECK(rebuilt->protocol_config->request_body_mode == BODY_MODE(FULL_DUPLEX_STREAMED));
    pbreflect_push(L, &rebuilt->base);
    lua_setglobal(L, "r2");
    CHECK_LUA(L, "return same(r, r2)");
    CHECK_LUA(L, "return not same(r, {})");
    lua_settop(L, 0);

    /* a body request: bytes, unset sub-messages nil, unknown enum numbers as numbers */
    Envoy__Service__ExtProc__V3__HttpBody body = ENVOY__SERVICE__EXT_PROC__V3__HTTP_BODY__INIT;
    body.body.data = (uint8_t *)"\0\1\2";
    body.body.len = 3;
    ProtocolConfiguration pc2 = ENVOY__SERVICE__EXT_PROC__V3__PROTOCOL_CONFIGURATION__INIT;
    pc2.request_body_mode = 42;
    Req req2 = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__INIT;
    req2.request_case = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_RESPONSE_BODY;
    req2.response_body = &body;
    req2.protocol_config = &pc2;
    pbreflect_push(L, roundtrip(&req2.base));
    lua_setglobal(L, "r");
    CHECK_LUA(L, "return r.response_body.body == '\\0\\1\\2' and "
                 "r.response_body.end_of_stream == false");
    CHECK_LUA(L, "return r.metadata_context == nil and r.request_headers == nil and "
                 "r.observability_mode == false and next(r.attributes) == nil");
    CHECK_LUA(L, "return r.protocol_config.request_body_mode == 42 and "
                 "r.protocol_config.response_body_mode == 'NONE'");
    /* 42 goes back as a number */
    lua_getglobal(L, "r");
    CHECK(pbreflect_from_lua(L, -1, &envoy__service__ext_proc__v3__processing_request__descriptor,
                             "request", &arena, &m, err, sizeof err) == 0);
    CHECK(((Req *)m)->protocol_config->request_body_mode == 42);
    lua_settop(L, 0);

    /* a map entry without its value shows the default: an empty table */
    Envoy__Service__ExtProc__V3__ProcessingRequest__AttributesEntry bare =
        ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__ATTRIBUTES_ENTRY__INIT;
    bare.key = "bare";
    Envoy__Service__ExtProc__V3__ProcessingRequest__AttributesEntry *bares[] = {&bare};
    Req req3 = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__INIT;
    req3.n_attributes = 1;
    req3.attributes = bares;
    pbreflect_push(L, roundtrip(&req3.base));
    lua_setglobal(L, "r");
    CHECK_LUA(L, "return type(r.attributes.bare) == 'table' and next(r.attributes.bare) == nil");
    CHECK(lua_gettop(L) == 0);

    /* NULL pushes an empty table */
    pbreflect_push(L, NULL);
    CHECK(lua_type(L, -1) == LUA_TTABLE);
    lua_close(L);
}

/* ---- pbreflect: ProcessingResponses from Lua -------------------------------------------- */

/* Builds a ProcessingResponse from `expr`, packs and unpacks it; NULL on error (in err). */
static Resp *response_of(lua_State *L, const char *expr)
{
    eval(L, expr);
    int top = lua_gettop(L);
    ProtobufCMessage *m = NULL;
    int rc = pbreflect_from_lua(L, -1, &envoy__service__ext_proc__v3__processing_response__descriptor,
                                "response", &arena, &m, err, sizeof err);
    CHECK(lua_gettop(L) == top);
    lua_pop(L, 1);
    if (rc < 0) {
        CHECK(err[0] != '\0');
        return NULL;
    }
    CHECK(m != NULL && m->descriptor == &envoy__service__ext_proc__v3__processing_response__descriptor);
    return (Resp *)roundtrip(m);
}

#define APPEND(x) ENVOY__CONFIG__CORE__V3__HEADER_VALUE_OPTION__HEADER_APPEND_ACTION__##x
#define HEADER_MODE(x) ENVOY__EXTENSIONS__FILTERS__HTTP__EXT_PROC__V3__PROCESSING_MODE__HEADER_SEND_MODE__##x

static void test_response_build(void)
{
    lua_State *L = fresh();
    Resp *r = response_of(L,
        "{ request_headers = { response = { status = 'CONTINUE_AND_REPLACE',"
        "    header_mutation = {"
        "      set_headers = { { header = { key = 'x-raw', raw_value = '1' },"
        "                        append_action = 'ADD_IF_ABSENT' },"
        "                      { header = { key = 'x-n', raw_value = '\\0bin' }, append_action = 2,"
        "                        append = true, keep_empty_value = true } },"
        "      remove_headers = { 'x-gone', 'x-also' } },"
        "    body_mutation = { body = 'new' }, clear_route_cache = true } },"
        "  dynamic_metadata = { ns = { k = 'v', list = {1, 2} } },"
        "  mode_override = { request_body_mode = 'STREAMED', response_header_mode = 'SKIP' },"
        "  override_message_timeout = 1.5 }");
    CHECK(r != NULL);
    CHECK(r->response_case == ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_REQUEST_HEADERS);
    Envoy__Service__ExtProc__V3__CommonResponse *cr = r->request_headers->response;
    CHECK(cr->status == ENVOY__SERVICE__EXT_PROC__V3__COMMON_RESPONSE__RESPONSE_STATUS__CONTINUE_AND_REPLACE);
    CHECK(cr->clear_route_cache);
    CHECK(cr->header_mutation->n_set_headers == 2);
    Envoy__Config__Core__V3__HeaderValueOption *o1 = cr->header_mutation->set_headers[0];
    Envoy__Config__Core__V3__HeaderValueOption *o2 = cr->header_mutation->set_headers[1];
    CHECK_STR(o1->header->key, "x-raw");
    CHECK(o1->header->raw_value.len == 1 && o1->header->raw_value.data[0] == '1');
    CHECK(o1->append_action == APPEND(ADD_IF_ABSENT));
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    CHECK(o1->append == NULL && !o1->keep_empty_value);
    CHECK_STR(o2->header->key, "x-n");
    CHECK(o2->header->raw_value.len == 4 && memcmp(o2->header->raw_value.data, "\0bin", 4) == 0);
    CHECK(o2->append_action == APPEND(OVERWRITE_IF_EXISTS_OR_ADD));
    CHECK(o2->append != NULL && o2->append->value);
#pragma GCC diagnostic pop
    CHECK(o2->keep_empty_value);
    CHECK(cr->header_mutation->n_remove_headers == 2);
    CHECK_STR(cr->header_mutation->remove_headers[0], "x-gone");
    CHECK_STR(cr->header_mutation->remove_headers[1], "x-also");
    CHECK(cr->body_mutation->mutation_case ==
          ENVOY__SERVICE__EXT_PROC__V3__BODY_MUTATION__MUTATION_BODY);
    CHECK(cr->body_mutation->body.len == 3 && !memcmp(cr->body_mutation->body.data, "new", 3));
    CHECK(cr->trailers == NULL);
    CHECK(r->dynamic_metadata->n_fields == 1);
    CHECK_STR(r->dynamic_metadata->fields[0]->key, "ns");
    CHECK(r->dynamic_metadata->fields[0]->value->struct_value->n_fields == 2);
    CHECK(r->mode_override->request_body_mode == BODY_MODE(STREAMED));
    CHECK(r->mode_override->response_header_mode == HEADER_MODE(SKIP));
    CHECK(r->mode_override->request_header_mode == HEADER_MODE(DEFAULT));
    CHECK(r->override_message_timeout->seconds == 1);
    CHECK(r->override_message_timeout->nanos == 500000000);

    /* the same through push: the Duration a float, the BoolValue a boolean */
    pbreflect_push(L, &r->base);
    lua_setglobal(L, "r");
    CHECK_LUA(L, "return r.override_message_timeout == 1.5 and "
                 "r.request_headers.response.header_mutation.set_headers[2].append == true and "
                 "r.request_headers.response.header_mutation.set_headers[1].append == nil and "
                 "r.request_headers.response.header_mutation.set_headers[2].append_action == "
                 "'OVERWRITE_IF_EXISTS_OR_ADD' and r.dynamic_metadata.ns.list[2] == 2 and "
                 "r.request_headers.response.body_mutation.body == 'new' and "
                 "r.request_headers.response.body_mutation.clear_body == nil");

    /* immediate_response: status code by number and by name */
    r = response_of(L, "{ immediate_response = { status = { code = 403 }, body = 'no',"
                       "  details = 'd', grpc_status = { status = 7 },"
                       "  headers = { set_headers = { { header = { key = 'a', value = 'b' } } } } } }");
    CHECK(r != NULL);
    CHECK(r->response_case == ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_IMMEDIATE_RESPONSE);
    CHECK(r->immediate_response->status->code == ENVOY__TYPE__V3__STATUS_CODE__Forbidden);
    CHECK(r->immediate_response->body.len == 2);
    CHECK_STR(r->immediate_response->details, "d");
    CHECK(r->immediate_response->grpc_status->status == 7);
    CHECK_STR(r->immediate_response->headers->set_headers[0]->header->value, "b");
    CHECK(r->dynamic_metadata == NULL && r->mode_override == NULL);
    r = response_of(L, "{ immediate_response = { status = { code = 'Forbidden' } } }");
    CHECK(r != NULL && r->immediate_response->status->code == 403);
    /* integral floats are integers; the Duration's rounding */
    r = response_of(L, "{ immediate_response = { grpc_status = { status = 4294967295.0 } },"
                       "  override_message_timeout = 0.001 }");
    CHECK(r != NULL && r->immediate_response->grpc_status->status == 4294967295u);
    CHECK(r->override_message_timeout->seconds == 0 &&
          r->override_message_timeout->nanos == 1000000);
    r = response_of(L, "{ override_message_timeout = 2.9999999999 }");
    CHECK(r != NULL && r->override_message_timeout->seconds == 3 &&
          r->override_message_timeout->nanos == 0);
    r = response_of(L, "{ override_message_timeout = 7 }");
    CHECK(r != NULL && r->override_message_timeout->seconds == 7 &&
          r->override_message_timeout->nanos == 0);

    /* empty table: the empty response; empty sub-tables are set-but-empty messages */
    r = response_of(L, "{}");
    CHECK(r != NULL && r->response_case == 0 && r->dynamic_metadata == NULL);
    r = response_of(L, "{ response_body = {}, dynamic_metadata = {} }");
    CHECK(r != NULL && r->response_body != NULL && r->response_body->response == NULL);
    CHECK(r->dynamic_metadata != NULL && r->dynamic_metadata->n_fields == 0);
    r = response_of(L, "{ response_body = { response = { body_mutation = { clear_body = true } } } }");
    CHECK(r != NULL && r->response_body->response->body_mutation->clear_body);

    /* maps from Lua: attributes of a request */
    eval(L, "{ attributes = { ['a.b'] = { x = 1 }, c = {} }, observability_mode = true }");
    ProtobufCMessage *m;
    CHECK(pbreflect_from_lua(L, -1, &envoy__service__ext_proc__v3__processing_request__descriptor,
                             "request", &arena, &m, err, sizeof err) == 0);
    Req *q = (Req *)roundtrip(m);
    CHECK(q->n_attributes == 2 && q->observability_mode);
    for (size_t i = 0; i < 2; i++) {
        if (!strcmp(q->attributes[i]->key, "a.b"))
            CHECK(q->attributes[i]->value->n_fields == 1);
        else
            CHECK(!strcmp(q->attributes[i]->key, "c") && q->attributes[i]->value != NULL &&
                  q->attributes[i]->value->n_fields == 0);
    }
    lua_settop(L, 0);
    lua_close(L);
}

#define SH "response.request_headers.response.header_mutation.set_headers[1]"
#define CHECK_ERR(L, expr, msg)                                                          \
    do {                                                                                \
        CHECK(response_of((L), (expr)) == NULL);                                        \
        CHECK_STR(err, (msg));                                                          \
    } while (0)
#define MUT(x) "{ request_headers = { response = { header_mutation = { set_headers = { " x " } } } } }"

static void test_response_errors(void)
{
    lua_State *L = fresh();
    CHECK_ERR(L, MUT("{ header = { kye = 'x' } }"), SH ".header: unknown field 'kye' (did you mean 'key'?)");
    CHECK_ERR(L, "{ request_headers = { response = { header_mutaton = {} } } }",
              "response.request_headers.response: unknown field 'header_mutaton' "
              "(did you mean 'header_mutation'?)");
    CHECK_ERR(L, "{ [1] = {} }", "response: key [1] is not a field name");
    CHECK_ERR(L, "{ [true] = {} }", "response: key [true] is not a field name");
    CHECK_ERR(L, "{ ['request_headers\\0x'] = {} }", "response: unknown field 'request_headers\\x00x' "
              "(did you mean 'request_headers'?)");
    CHECK_ERR(L, "'x'", "response: expected a table (envoy.service.ext_proc.v3.ProcessingResponse), "
                        "got a string");
    /* wrong types */
    CHECK_ERR(L, "{ immediate_response = { details = 5 } }",
              "response.immediate_response.details: expected a string, got a number");
    CHECK_ERR(L, "{ immediate_response = { details = 'a\\0b' } }",
              "response.immediate_response.details: the string contains a NUL byte (use a "
              "bytes field)");
    CHECK_ERR(L, "{ immediate_response = { details = '\\xff' } }",
              "response.immediate_response.details: the string is not valid UTF-8 (use a "
              "bytes field)");
    CHECK_ERR(L, "{ immediate_response = { body = 5 } }",
              "response.immediate_response.body: expected a string (bytes), got a number");
    CHECK_ERR(L, "{ immediate_response = { body = {} } }",
              "response.immediate_response.body: expected a string (bytes), got a table");
    CHECK_ERR(L, "{ request_body = { response = { clear_route_cache = 'yes' } } }",
              "response.request_body.response.clear_route_cache: expected a boolean, got a string");
    CHECK_ERR(L, "{ request_body = { response = { clear_route_cache = 1 } } }",
              "response.request_body.response.clear_route_cache: expected a boolean, got a number");
    CHECK_ERR(L, MUT("{ header = 'x' }"),
              SH ".header: expected a table (envoy.config.core.v3.HeaderValue), got a string");
    CHECK_ERR(L, MUT("{ append = 'yes' }"), SH ".append: expected a boolean, got a string");
    CHECK_ERR(L, "{ immediate_response = null }",
              "response.immediate_response: expected a table "
              "(envoy.service.ext_proc.v3.ImmediateResponse), got callout.null");
    /* enums */
    CHECK_ERR(L, MUT("{ append_action = 'ADD' }"),
              SH ".append_action: unknown envoy.config.core.v3.HeaderValueOption.HeaderAppendAction "
              "value 'ADD' (expected APPEND_IF_EXISTS_OR_ADD, ADD_IF_ABSENT, OVERWRITE_IF_EXISTS_OR_ADD or "
              "OVERWRITE_IF_EXISTS, or a number)");
    CHECK_ERR(L, MUT("{ append_action = true }"),
              SH ".append_action: expected an enum name or number "
              "(envoy.config.core.v3.HeaderValueOption.HeaderAppendAction), got a boolean");
    CHECK_ERR(L, "{ immediate_response = { status = { code = 'Forbiden' } } }",
              "response.immediate_response.status.code: unknown envoy.type.v3.StatusCode value "
              "'Forbiden' (did you mean 'Forbidden'?)");
    CHECK_ERR(L, "{ immediate_response = { status = { code = 2^31 } } }",
              "response.immediate_response.status.code: 2147483648 is out of range for enum "
              "(-2147483648..2147483647)");
    CHECK_ERR(L, "{ immediate_response = { status = { code = 403.5 } } }",
              "response.immediate_response.status.code: expected an integer (enum), got 403.5");
    /* integers */
    CHECK_ERR(L, "{ immediate_response = { grpc_status = { status = 2^32 } } }",
              "response.immediate_response.grpc_status.status: 4294967296 is out of range for "
              "uint32 (0..4294967295)");
    CHECK_ERR(L, "{ immediate_response = { grpc_status = { status = 4294967296 } } }",
              "response.immediate_response.grpc_status.status: 4294967296 is out of range for "
              "uint32 (0..4294967295)");
    CHECK_ERR(L, "{ immediate_response = { grpc_status = { status = -1 } } }",
              "response.immediate_response.grpc_status.status: -1 is out of range for "
              "uint32 (0..4294967295)");
    CHECK_ERR(L, "{ immediate_response = { grpc_status = { status = 1.5 } } }",
              "response.immediate_response.grpc_status.status: expected an integer (uint32), "
              "got 1.5");
    CHECK_ERR(L, "{ immediate_response = { grpc_status = { status = '7' } } }",
              "response.immediate_response.grpc_status.status: expected an integer (uint32), "
              "got a string");
    CHECK_ERR(L, "{ immediate_response = { grpc_status = { status = 0/0 } } }",
              "response.immediate_response.grpc_status.status: expected an integer (uint32), "
              "got NaN");
    CHECK_ERR(L, "{ immediate_response = { grpc_status = { status = 1e300 } } }",
              "response.immediate_response.grpc_status.status: 1e+300 is out of range for "
              "uint32 (0..4294967295)");
    /* oneofs */
    CHECK_ERR(L, "{ request_headers = {}, immediate_response = {} }",
              "response: 'immediate_response' and 'request_headers' are members of one oneof: "
              "set only one");
    CHECK_ERR(L, "{ request_body = { response = { body_mutation = { body = 'x', clear_body = true } } } }",
              "response.request_body.response.body_mutation: 'body' and 'clear_body' are members "
              "of one oneof: set only one");
    /* repeated */
    CHECK_ERR(L, "{ request_headers = { response = { header_mutation = { remove_headers = 'x' } } } }",
              "response.request_headers.response.header_mutation.remove_headers: expected a list "
              "(repeated string), got a string");
    CHECK_ERR(L, "{ request_headers = { response = { header_mutation = { remove_headers = {a = 'x'} } } } }",
              "response.request_headers.response.header_mutation.remove_headers: expected a list "
              "(repeated string): keys must be 1..n");
    CHECK_ERR(L, "{ request_headers = { response = { header_mutation = { remove_headers = {'a', 5} } } } }",
              "response.request_headers.response.header_mutation.remove_headers[2]: expected a "
              "string, got a number");
    CHECK_ERR(L, MUT("{}, { header = { key = 1 } }"),
              "response.request_headers.response.header_mutation.set_headers[2].header.key: "
              "expected a string, got a number");
    /* Duration */
    CHECK_ERR(L, "{ override_message_timeout = 0/0 }",
              "response.override_message_timeout: expected a number of seconds from 0 to "
              "315576000000 (Duration), got NaN");
    CHECK_ERR(L, "{ override_message_timeout = -1 }",
              "response.override_message_timeout: expected a number of seconds from 0 to "
              "315576000000 (Duration), got -1");
    CHECK_ERR(L, "{ override_message_timeout = math.huge }",
              "response.override_message_timeout: expected a number of seconds from 0 to "
              "315576000000 (Duration), got inf");
    CHECK_ERR(L, "{ override_message_timeout = '1' }",
              "response.override_message_timeout: expected a number of seconds (Duration), got "
              "a string");
    /* Struct inside a message: pbstruct's path continues ours */
    CHECK_ERR(L, "{ dynamic_metadata = { ns = { list = {1, print} } } }",
              "response.dynamic_metadata.ns.list[2]: a function cannot be converted to a "
              "protobuf Value");
    CHECK_ERR(L, "{ dynamic_metadata = { 1 } }",
              "response.dynamic_metadata: key [1] is not a string (a protobuf Struct has string "
              "keys; a list must be a sequence 1..n)");
    CHECK_ERR(L, "{ dynamic_metadata = 'x' }",
              "response.dynamic_metadata: expected a table with string keys, got a string");
    CHECK_ERR(L, "{ mode_override = { request_body_mode = 'STREAMING' } }",
              "response.mode_override.request_body_mode: unknown "
              "envoy.extensions.filters.http.ext_proc.v3.ProcessingMode.BodySendMode value "
              "'STREAMING' (expected NONE, STREAMED, "
              "BUFFERED, BUFFERED_PARTIAL, FULL_DUPLEX_STREAMED or GRPC, or a number)");

    /* maps */
    ProtobufCMessage *m;
    const ProtobufCMessageDescriptor *rq = &envoy__service__ext_proc__v3__processing_request__descriptor;
    eval(L, "{ attributes = { [1] = {} } }");
    CHECK(pbreflect_from_lua(L, -1, rq, "request", &arena, &m, err, sizeof err) == -1);
    CHECK_STR(err, "request.attributes[1]: expected a string, got a number");
    eval(L, "{ attributes = { ns = 5 } }");
    CHECK(pbreflect_from_lua(L, -1, rq, "request", &arena, &m, err, sizeof err) == -1);
    CHECK_STR(err, "request.attributes.ns: expected a table with string keys, got a number");
    eval(L, "{ attributes = { ['a.b'] = { x = 0/0 } } }");
    CHECK(pbreflect_from_lua(L, -1, rq, "request", &arena, &m, err, sizeof err) == -1);
    CHECK_STR(err, "request.attributes[\"a.b\"].x: NaN cannot be converted to a protobuf Value "
                   "(not a finite number)");
    eval(L, "{ attributes = 'x' }");
    CHECK(pbreflect_from_lua(L, -1, rq, "request", &arena, &m, err, sizeof err) == -1);
    CHECK_STR(err, "request.attributes: expected a table (map), got a string");
    eval(L, "{ metadata_context = { typed_filter_metadata = { t = { type_url = 'u', value = 1 } } } }");
    CHECK(pbreflect_from_lua(L, -1, rq, "request", &arena, &m, err, sizeof err) == -1);
    CHECK_STR(err, "request.metadata_context.typed_filter_metadata.t.value: expected a string "
                   "(bytes), got a number");
    /* no prefix */
    eval(L, "{ kye = 1 }");
    CHECK(pbreflect_from_lua(L, -1, rq, NULL, &arena, &m, err, sizeof err) == -1);
    CHECK_STR(err, "unknown field 'kye'");
    CHECK(pbreflect_from_lua(L, -1, rq, "", &arena, &m, err, sizeof err) == -1);
    CHECK_STR(err, "unknown field 'kye'");
    lua_settop(L, 0);
    lua_close(L);
}

/* ---- pbreflect: every scalar type, with a hand-written descriptor ------------------------ */

/* What protoc-c would generate for
 *   message AllTypes { int32 i32 = 1; sint32 s32 = 2; sfixed32 sf32 = 3; int64 i64 = 4;
 *     sint64 s64 = 5; sfixed64 sf64 = 6; uint32 u32 = 7; fixed32 f32 = 8; uint64 u64 = 9;
 *     fixed64 f64 = 10; float fl = 11; double db = 12; bool b = 13; repeated uint64 ru64 = 14;
 *     optional int32 opt = 15; } (proto2 optional: has_opt) */
typedef struct {
    ProtobufCMessage base;
    int32_t i32, s32, sf32;
    int64_t i64, s64, sf64;
    uint32_t u32, f32;
    uint64_t u64, f64;
    float fl;
    double db;
    protobuf_c_boolean b;
    size_t n_ru64;
    uint64_t *ru64;
    protobuf_c_boolean has_opt;
    int32_t opt;
} AllTypes;

static void all_types_init(ProtobufCMessage *m);

#define F(name, id, label, type, q)                                                           \
    {#name, id, PROTOBUF_C_LABEL_##label, PROTOBUF_C_TYPE_##type, q, offsetof(AllTypes, name), \
     NULL, NULL, 0, 0, NULL, NULL}
static const ProtobufCFieldDescriptor all_fields[] = {
    F(i32, 1, NONE, INT32, 0),     F(s32, 2, NONE, SINT32, 0),   F(sf32, 3, NONE, SFIXED32, 0),
    F(i64, 4, NONE, INT64, 0),     F(s64, 5, NONE, SINT64, 0),   F(sf64, 6, NONE, SFIXED64, 0),
    F(u32, 7, NONE, UINT32, 0),    F(f32, 8, NONE, FIXED32, 0),  F(u64, 9, NONE, UINT64, 0),
    F(f64, 10, NONE, FIXED64, 0),  F(fl, 11, NONE, FLOAT, 0),    F(db, 12, NONE, DOUBLE, 0),
    F(b, 13, NONE, BOOL, 0),
    F(ru64, 14, REPEATED, UINT64, offsetof(AllTypes, n_ru64)),
    F(opt, 15, OPTIONAL, INT32, offsetof(AllTypes, has_opt)),
};
static const unsigned all_by_name[] = {12, 11, 7, 9, 10, 0, 3, 14, 13, 1, 4, 2, 5, 6, 8};
static const ProtobufCIntRange all_ranges[] = {{1, 0}, {0, 15}};
static const ProtobufCMessageDescriptor all_desc = {
    PROTOBUF_C__MESSAGE_DESCRIPTOR_MAGIC, "test.AllTypes", "AllTypes", "AllTypes", "test",
    sizeof(AllTypes), 15, all_fields, all_by_name, 1, all_ranges,
    (ProtobufCMessageInit)all_types_init, NULL, NULL, NULL};

static void all_types_init(ProtobufCMessage *m)
{
    memset(m, 0, sizeof(AllTypes));
    m->descriptor = &all_desc;
}

static AllTypes *all_of(lua_State *L, const char *expr)
{
    eval(L, expr);
    ProtobufCMessage *m;
    int rc = pbreflect_from_lua(L, -1, &all_desc, "t", &arena, &m, err, sizeof err);
    lua_pop(L, 1);
    return rc < 0 ? NULL : (AllTypes *)roundtrip(m);
}

#define CHECK_ALL_ERR(L, expr, msg)                                                        \
    do {                                                                                  \
        CHECK(all_of((L), (expr)) == NULL);                                               \
        CHECK_STR(err, (msg));                                                            \
    } while (0)

static void test_all_types(void)
{
    lua_State *L = fresh();
    AllTypes *t = all_of(L, "{ i32 = -5, s32 = -2^31, sf32 = 2^31 - 1, i64 = math.mininteger,"
                            "  s64 = -3, sf64 = math.maxinteger, u32 = 4294967295, f32 = 7,"
                            "  u64 = 2^63, f64 = math.maxinteger, fl = 1.5, db = -0.25, b = true,"
                            "  ru64 = {1, 2, 3}, opt = 0 }");
    CHECK(t != NULL);
    CHECK(t->i32 == -5 && t->s32 == INT32_MIN && t->sf32 == INT32_MAX);
    CHECK(t->i64 == INT64_MIN && t->s64 == -3 && t->sf64 == INT64_MAX);
    CHECK(t->u32 == UINT32_MAX && t->f32 == 7);
    CHECK(t->u64 == (uint64_t)1 << 63 && t->f64 == (uint64_t)INT64_MAX);
    CHECK(t->fl == 1.5f && t->db == -0.25 && t->b);
    CHECK(t->n_ru64 == 3 && t->ru64[0] == 1 && t->ru64[2] == 3);
    CHECK(t->has_opt && t->opt == 0);
    pbreflect_push(L, &t->base);
    lua_setglobal(L, "t");
    CHECK_LUA(L, "return t.i32 == -5 and t.s32 == -2^31 and t.sf32 == 2^31 - 1 and "
                 "t.i64 == math.mininteger and t.s64 == -3 and t.sf64 == math.maxinteger");
    CHECK_LUA(L, "return math.type(t.u32) == 'integer' and t.u32 == 4294967295 and t.f32 == 7");
    CHECK_LUA(L, "return math.type(t.u64) == 'float' and t.u64 == 2^63 and "
                 "t.f64 == math.maxinteger and math.type(t.f64) == 'integer'");
    CHECK_LUA(L, "return t.fl == 1.5 and t.db == -0.25 and t.b == true and #t.ru64 == 3 and "
                 "t.ru64[3] == 3 and t.opt == 0");
    t = all_of(L, "{}");
    CHECK(t != NULL && !t->has_opt && t->n_ru64 == 0);
    pbreflect_push(L, &t->base);
    lua_setglobal(L, "t");
    CHECK_LUA(L, "return t.opt == nil and t.i32 == 0 and t.b == false and t.db == 0 and "
                 "type(t.ru64) == 'table' and #t.ru64 == 0");

    CHECK_ALL_ERR(L, "{ i32 = 2^31 }", "t.i32: 2147483648 is out of range for int32 "
                                       "(-2147483648..2147483647)");
    CHECK_ALL_ERR(L, "{ s32 = -2^31 - 1 }", "t.s32: -2147483649 is out of range for sint32 "
                                            "(-2147483648..2147483647)");
    CHECK_ALL_ERR(L, "{ i64 = 2^63 }", "t.i64: 9.2233720368547758e+18 is out of range for int64 "
                                       "(-9223372036854775808..9223372036854775807)");
    CHECK_ALL_ERR(L, "{ u64 = -1 }", "t.u64: -1 is out of range for uint64 "
                                     "(0..18446744073709551615)");
    CHECK_ALL_ERR(L, "{ f64 = 2^64 }", "t.f64: 1.8446744073709552e+19 is out of range for "
                                       "fixed64 (0..18446744073709551615)");
    CHECK_ALL_ERR(L, "{ u64 = 0.5 }", "t.u64: expected an integer (uint64), got 0.5");
    CHECK_ALL_ERR(L, "{ fl = 1e39 }", "t.fl: 1e+39 is out of range for float");
    CHECK_ALL_ERR(L, "{ db = 0/0 }", "t.db: expected a finite number (double), got NaN");
    CHECK_ALL_ERR(L, "{ fl = -math.huge }", "t.fl: expected a finite number (float), got -inf");
    CHECK_ALL_ERR(L, "{ db = '1' }", "t.db: expected a number (double), got a string");
    CHECK_ALL_ERR(L, "{ b = 0 }", "t.b: expected a boolean, got a number");
    CHECK_ALL_ERR(L, "{ f32 = 1.5 }", "t.f32: expected an integer (fixed32), got 1.5");
    CHECK_ALL_ERR(L, "{ ru64 = {1, -2} }", "t.ru64[2]: -2 is out of range for uint64 "
                                           "(0..18446744073709551615)");
    CHECK_ALL_ERR(L, "{ ru64 = {[2] = 1} }", "t.ru64: expected a list (repeated uint64): keys "
                                             "must be 1..n");
    lua_close(L);
}

int main(void)
{
    arena_init(&arena, 0);
    test_struct_out();
    arena_reset(&arena);
    test_struct_errors();
    arena_reset(&arena);
    test_request_push();
    arena_reset(&arena);
    test_response_build();
    arena_reset(&arena);
    test_response_errors();
    arena_reset(&arena);
    test_all_types();
    arena_reset(&arena);
    arena_destroy(&arena);
    printf("%d passed, 0 failed\n", passed);
    return 0;
}
