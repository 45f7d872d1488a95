/* test_checks.c — the leaf checks of checks.h on their own: UTF-8, header names, numbers,
 * table shapes, key descriptions, suggestions, misspelled handlers and the bad-table
 * message. (Their use in the converters is tested in test_pbconv.c and test_pbreflect.c.) */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lualib.h>

#include "checks.h"

#include "check.h"
#define CHECK_STR(a, b)                                                                \
    do {                                                                               \
        const char *a_ = (a), *b_ = (b);                                               \
        if (a_ == NULL || b_ == NULL || strcmp(a_, b_) != 0)                           \
            fprintf(stderr, "got %s\nwant %s\n", a_ ? a_ : "(null)", b_ ? b_ : "(null)"); \
        CHECK(a_ != NULL && b_ != NULL && strcmp(a_, b_) == 0);                        \
    } while (0)
#define UTF8(lit) checks_utf8_valid(lit, sizeof lit - 1)

static void test_utf8(void)
{
    CHECK(UTF8(""));
    CHECK(UTF8("plain ascii"));
    CHECK(UTF8("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"));   /* é € 😀 */
    CHECK(UTF8("\xf4\x8f\xbf\xbf"));                             /* U+10FFFF */
    CHECK(!UTF8("\xff"));
    CHECK(!UTF8("x-bad\xff"));
    CHECK(!UTF8("\xc3"));                 /* cut short */
    CHECK(!UTF8("\xc3\x28"));             /* bad continuation */
    CHECK(!UTF8("\xc0\xaf"));             /* overlong '/' */
    CHECK(!UTF8("\xe0\x80\xaf"));         /* overlong, 3 bytes */
    CHECK(!UTF8("\xed\xa0\x80"));         /* surrogate U+D800 */
    CHECK(!UTF8("\xf4\x90\x80\x80"));     /* past U+10FFFF */
    CHECK(checks_proto_string("a\0b", 3) != NULL);
    CHECK_STR(checks_proto_string("a\0b", 3), "contains a NUL byte");
    CHECK_STR(checks_proto_string("\xff", 1), "is not valid UTF-8");
    CHECK(checks_proto_string("ok", 2) == NULL);
}

static void test_header_names(void)
{
    size_t at;
    CHECK(checks_header_name("x-ok", 4, &at) == CHECKS_NAME_OK);
    CHECK(checks_header_name("X-Up_Case.1", 11, &at) == CHECKS_NAME_OK);  /* Envoy allows case */
    CHECK(checks_header_name(":authority", 10, &at) == CHECKS_NAME_OK);
    CHECK(checks_header_name("", 0, &at) == CHECKS_NAME_EMPTY);
    CHECK(checks_header_name("a\0b", 3, &at) == CHECKS_NAME_NUL);
    CHECK(checks_header_name("x-bad\xff", 6, &at) == CHECKS_NAME_UTF8);
    CHECK(checks_header_name("a b", 3, &at) == CHECKS_NAME_CHAR && at == 1);
    CHECK(checks_header_name("a:b", 3, &at) == CHECKS_NAME_CHAR && at == 1);
    CHECK(checks_header_name("x\r\n", 3, &at) == CHECKS_NAME_CHAR && at == 1);
    CHECK(checks_header_name("caf\xc3\xa9", 5, &at) == CHECKS_NAME_CHAR && at == 3);
    CHECK(checks_header_name(":Path", 5, &at) == CHECKS_NAME_CHAR && at == 1);
    CHECK(checks_header_name(":", 1, &at) == CHECKS_NAME_CHAR);
    CHECK(checks_header_name("(x)", 3, &at) == CHECKS_NAME_CHAR && at == 0);

    char buf[128];
    checks_quote("a'b\\\x01\xff", 6, buf, sizeof buf);
    CHECK_STR(buf, "'a'b\\x5c\\x01\\xff'");
    char longs[100];
    memset(longs, 'z', sizeof longs);
    checks_quote(longs, sizeof longs, buf, sizeof buf);
    CHECK(strlen(buf) == 64 + 5 && strcmp(buf + 65, "...'") == 0);
    checks_quote("abcdef", 6, buf, 6);   /* a small buffer is cut, never overrun */
    CHECK(strlen(buf) < 6);
}

/* Evaluates `expr` and leaves its value on top of L. */
static void eval(lua_State *L, const char *expr)
{
    char src[256];
    snprintf(src, sizeof src, "return %s", expr);
    CHECK(luaL_dostring(L, src) == LUA_OK);
}

static void test_numbers(lua_State *L)
{
    static const struct {
        const char *expr, *header, *message;
    } cases[] = {
        {"42", "42", "42"},
        {"10 / 2", "5", "5"},
        {"2.5", "2.5", "2.5"},
        {"0.1", "0.1", "0.1"},
        {"2^70", "1.1805916207174e+21", "1.1805916207174113e+21"},
        {"2^63", "9.2233720368548e+18", "9.2233720368547758e+18"},
        {"1e300", "1e+300", "1e+300"},
        {"-2^63", "-9223372036854775808", "-9223372036854775808"},
        {"math.mininteger", "-9223372036854775808", "-9223372036854775808"},
    };
    char buf[64];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        eval(L, cases[i].expr);
        CHECK(checks_format_number(L, -1, buf, sizeof buf) > 0);
        CHECK_STR(buf, cases[i].header);
        CHECK(checks_describe_number(L, -1, buf, sizeof buf) > 0);
        CHECK_STR(buf, cases[i].message);
        lua_pop(L, 1);
    }
    eval(L, "0/0");
    CHECK(checks_format_number(L, -1, buf, sizeof buf) == -1);
    CHECK_STR(buf, "NaN");
    lua_pop(L, 1);
    eval(L, "-math.huge");
    CHECK(checks_describe_number(L, -1, buf, sizeof buf) == -1);
    CHECK_STR(buf, "-inf");
    lua_pop(L, 1);

    int64_t v;
    uint64_t u;
    eval(L, "7");
    CHECK(checks_integer(L, -1, 0, 16, &v) == CHECKS_INT_OK && v == 7);
    lua_pop(L, 1);
    eval(L, "7.0");
    CHECK(checks_integer(L, -1, 0, 16, &v) == CHECKS_INT_OK && v == 7);
    lua_pop(L, 1);
    eval(L, "'7'");   /* strings are not numbers here */
    CHECK(checks_integer(L, -1, 0, 16, &v) == CHECKS_INT_NOT_NUMBER);
    CHECK(checks_uint64(L, -1, &u) == CHECKS_INT_NOT_NUMBER);
    lua_pop(L, 1);
    eval(L, "1.5");
    CHECK(checks_integer(L, -1, 0, 16, &v) == CHECKS_INT_NOT_INTEGRAL);
    CHECK(checks_uint64(L, -1, &u) == CHECKS_INT_NOT_INTEGRAL);
    lua_pop(L, 1);
    eval(L, "17");
    CHECK(checks_integer(L, -1, 0, 16, &v) == CHECKS_INT_OUT_OF_RANGE);
    lua_pop(L, 1);
    eval(L, "2^64");  /* integral but past every lua_Integer: out of range, not a fraction */
    CHECK(checks_integer(L, -1, INT64_MIN, INT64_MAX, &v) == CHECKS_INT_OUT_OF_RANGE);
    CHECK(checks_uint64(L, -1, &u) == CHECKS_INT_OUT_OF_RANGE);
    lua_pop(L, 1);
    eval(L, "2^63");
    CHECK(checks_uint64(L, -1, &u) == CHECKS_INT_OK && u == UINT64_C(9223372036854775808));
    char msg[160];
    checks_integer_message(L, -1, CHECKS_INT_OUT_OF_RANGE, "int64", "a..b", "x", msg, sizeof msg);
    CHECK_STR(msg, "9.2233720368547758e+18 is out of range for int64 (a..b)");
    lua_pop(L, 1);
    eval(L, "-1");
    CHECK(checks_uint64(L, -1, &u) == CHECKS_INT_OUT_OF_RANGE);
    lua_pop(L, 1);
    eval(L, "0/0");
    CHECK(checks_integer(L, -1, 0, 16, &v) == CHECKS_INT_NOT_INTEGRAL);
    checks_integer_message(L, -1, CHECKS_INT_NOT_INTEGRAL, "uint32", "", "", msg, sizeof msg);
    CHECK_STR(msg, "expected an integer (uint32), got NaN");
    lua_pop(L, 1);
}

static void test_shapes(lua_State *L)
{
    static const struct {
        const char *expr;
        size_t n, strings, integers;
        int other;
        int seq;
    } cases[] = {
        {"{}", 0, 0, 0, LUA_TNONE, 1},
        {"{1, 2, 3}", 3, 0, 3, LUA_TNONE, 1},
        {"{[1] = 1, [3] = 3}", 2, 0, 2, LUA_TNONE, 0},
        {"{[0] = 0, [1] = 1}", 2, 0, 2, LUA_TNONE, 0},
        {"{[2] = 2, [1] = 1}", 2, 0, 2, LUA_TNONE, 1},
        {"{1, a = 2}", 2, 1, 1, LUA_TNONE, 0},
        {"{[1.5] = 1}", 1, 0, 0, LUA_TNUMBER, 0},
        {"{[true] = 1, x = 1}", 2, 1, 0, LUA_TBOOLEAN, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        eval(L, cases[i].expr);
        lua_pushinteger(L, 99);   /* the index need not be the top */
        struct checks_shape sh;
        checks_table_shape(L, -2, &sh);
        CHECK(lua_gettop(L) == 2 && lua_tointeger(L, -1) == 99);
        CHECK(sh.n == cases[i].n && sh.strings == cases[i].strings &&
              sh.integers == cases[i].integers && sh.other == cases[i].other &&
              sh.seq == (cases[i].seq != 0));
        lua_settop(L, 0);
    }

    static const struct {
        const char *key, *prefix, *want;
    } keys[] = {
        {"'ad'", "", "'ad'"},
        {"'stauts'", "immediate.", "'immediate.stauts'"},
        {"'a\\0b'", "", "'a\\x00b'"},
        {"1", "", "[1]"},
        {"1.5", "mode_override.", "[1.5] in mode_override"},
        {"true", "", "[true]"},
        {"print", "immediate.", "of type function in immediate"},
    };
    char buf[128];
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        eval(L, keys[i].key);
        checks_describe_key(L, -1, keys[i].prefix, buf, sizeof buf);
        CHECK_STR(buf, keys[i].want);
        CHECK(lua_type(L, -1) != LUA_TSTRING || lua_isstring(L, -1));  /* not converted */
        lua_pop(L, 1);
    }
    eval(L, "2");
    checks_describe_key(L, -1, "", buf, sizeof buf);
    CHECK(lua_type(L, -1) == LUA_TNUMBER);   /* a number key stays a number (lua_next safe) */
    lua_pop(L, 1);
}

static void test_path_and_fail(lua_State *L)
{
    char err[128];
    struct checks_err e;
    checks_err_init(&e, err, sizeof err, "response");
    size_t old = checks_path_push(&e.path, ".%s", "immediate_response");
    checks_path_push_key(&e.path, "my.ns", 5);
    lua_pushinteger(L, 3);
    checks_path_push_lua_key(&e.path, L, -1);
    lua_pop(L, 1);
    CHECK(checks_fail(&e, "bad %d", 1) == -1);
    CHECK_STR(err, "response.immediate_response[\"my.ns\"][3]: bad 1");
    checks_path_restore(&e.path, old);
    e.lead_name = "on_request_headers";
    e.lead_text = " returned a bad table: ";
    checks_fail(&e, "x");
    CHECK_STR(err, "on_request_headers returned a bad table: response: x");
    checks_err_init(&e, err, sizeof err, NULL);
    checks_fail(&e, "plain");
    CHECK_STR(err, "plain");
    char tiny[8];
    checks_err_init(&e, tiny, sizeof tiny, "a.very.long.path");
    checks_fail(&e, "message");
    CHECK(strlen(tiny) == 7);
}

static const char *nearest(const char *key, const char *const *names)
{
    struct checks_near s;
    checks_near_init(&s, key, strlen(key));
    for (; *names; names++)
        checks_near_offer(&s, *names);
    return checks_near_best(&s);
}

static void test_suggestions(void)
{
    static const char *const top[] = {"add", "remove", "append_action", "clear_route_cache",
                                      "body", "clear_body", "status", "immediate", "deny",
                                      "dynamic_metadata", "mode_override", NULL};
    CHECK_STR(nearest("ad", top), "add");
    CHECK_STR(nearest("remvoe", top), "remove");            /* a swap is one edit */
    CHECK_STR(nearest("stauts", top), "status");
    CHECK_STR(nearest("Body", top), "body");                /* case only */
    CHECK_STR(nearest("dynamic", top), "dynamic_metadata"); /* prefix */
    CHECK_STR(nearest("remove_headers", top), "remove");    /* the proto's name */
    CHECK_STR(nearest("immedaite", top), "immediate");
    CHECK(nearest("clear", top) == NULL);                   /* two prefixes: no guess */
    CHECK(nearest("xyz", top) == NULL);
    CHECK(nearest("id", top) == NULL);                      /* 2 edits of a 2-byte key */
    CHECK(nearest("add", top) == NULL);                     /* known: nothing to suggest */
    CHECK(nearest("", top) == NULL);

    char buf[96];
    checks_did_you_mean("status", "immediate.", buf, sizeof buf);
    CHECK_STR(buf, " (did you mean 'immediate.status'?)");
    checks_did_you_mean(NULL, "immediate.", buf, sizeof buf);
    CHECK_STR(buf, "");
}

static void test_misspelled_handlers(void)
{
    CHECK_STR(checks_misspelled_handler("on_response_header"), "on_response_headers");
    CHECK_STR(checks_misspelled_handler("on_request_headres"), "on_request_headers");
    CHECK_STR(checks_misspelled_handler("on_request_header"), "on_request_headers");
    CHECK_STR(checks_misspelled_handler("On_Request_Headers"), "on_request_headers");
    CHECK_STR(checks_misspelled_handler("on_requst_body"), "on_request_body");
    CHECK_STR(checks_misspelled_handler("on_response_trailer"), "on_response_trailers");
    CHECK_STR(checks_misspelled_handler("Process"), "process");
    CHECK_STR(checks_misspelled_handler("proces"), "process");
    /* the handlers themselves, and helpers that only resemble one */
    CHECK(checks_misspelled_handler("on_request_headers") == NULL);
    CHECK(checks_misspelled_handler("process") == NULL);
    CHECK(checks_misspelled_handler("progress") == NULL);
    CHECK(checks_misspelled_handler("on_request") == NULL);
    CHECK(checks_misspelled_handler("process_body") == NULL);
    CHECK(checks_misspelled_handler("helper") == NULL);
    CHECK(checks_misspelled_handler("") == NULL);
}

static void test_bad_table_message(void)
{
    char buf[256];
    checks_bad_table_message(buf, sizeof buf, "script.lua", 12, "on_request_headers",
                             "on_request_headers returned a bad table: unknown key 'ad' "
                             "(did you mean 'add'?)");
    CHECK_STR(buf, "script.lua:12: on_request_headers (defined here) returned a bad table: "
                   "unknown key 'ad' (did you mean 'add'?)");
    checks_bad_table_message(buf, sizeof buf, "raw.lua", 1, "process",
                             "process returned a bad response: response: unknown field 'x'");
    CHECK_STR(buf, "raw.lua:1: process (defined here) returned a bad response: response: "
                   "unknown field 'x'");
    checks_bad_table_message(buf, sizeof buf, "s.lua", 3, "on_request_body", "out of memory");
    CHECK_STR(buf, "s.lua:3: on_request_body (defined here): out of memory");
    /* a name that is only a prefix of another is not taken for the handler */
    checks_bad_table_message(buf, sizeof buf, "s.lua", 3, "on_request", "on_request_body x");
    CHECK_STR(buf, "s.lua:3: on_request (defined here): on_request_body x");
}

int main(void)
{
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    test_utf8();
    test_header_names();
    test_numbers(L);
    test_shapes(L);
    test_path_and_fail(L);
    test_suggestions();
    test_misspelled_handlers();
    test_bad_table_message();
    lua_close(L);
    printf("%d passed, 0 failed\n", passed);
    return 0;
}
