/* test_calloutlib.c — the `callout` module (docs/lua-api.md, "The `callout` module") in a
 * bare lua_State: the shape of every helper's return table, argument errors that point at
 * the caller's line, the deny marker as calloutlib_is_deny sees it, and callout.log lines
 * as they reach stderr. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lualib.h>

#include "calloutlib.h"
#include "log.h"
#include "pbstruct.h"

#include "check.h"

static lua_State *L;
static uint64_t stream_id;
static const char *phase;

/* Runs a Lua snippet (chunk name "snippet", so errors read "snippet:LINE: ...") that asserts
 * what it checks; fails with the Lua error, reported at the C line of the call. */
#define LUA_CHECK(src) lua_check(src, __LINE__)
static void lua_check(const char *src, int line)
{
    int top = lua_gettop(L);
    if (luaL_loadbufferx(L, src, strlen(src), "=snippet", "t") != LUA_OK ||
        lua_pcall(L, 0, 0, 0) != LUA_OK) {
        fprintf(stderr, "%s:%d: Lua snippet failed: %s\n", __FILE__, line,
                luaL_tolstring(L, -1, NULL));
        fprintf(stderr, "%d passed, 1 failed\n", passed);
        exit(1);
    }
    passed++;
    CHECK(lua_gettop(L) == top);
}

/* Runs src, which must raise; leaves the error object on the stack. */
static void run_raising(const char *src)
{
    CHECK(luaL_loadbufferx(L, src, strlen(src), "=snippet", "t") == LUA_OK);
    CHECK(lua_pcall(L, 0, 0, 0) == LUA_ERRRUN);
}

/* Runs fn with stderr redirected into a temporary file; returns what was written (static). */
static const char *capture_stderr(void (*fn)(void))
{
    static char buf[8192];
    FILE *tmp = tmpfile();
    CHECK(tmp != NULL);
    fflush(stderr);
    int saved = dup(STDERR_FILENO);
    CHECK(saved >= 0 && dup2(fileno(tmp), STDERR_FILENO) >= 0);
    fn();
    fflush(stderr);
    CHECK(dup2(saved, STDERR_FILENO) >= 0);
    close(saved);
    rewind(tmp);
    size_t n = fread(buf, 1, sizeof buf - 1, tmp);
    buf[n] = '\0';
    fclose(tmp);
    return buf;
}

static int open_callout(lua_State *L1)
{
    calloutlib_open(L1, &stream_id, &phase);
    return 0;
}

static int math_type(lua_State *L1)
{
    lua_pushstring(L1, lua_isinteger(L1, 1) ? "integer" : lua_type(L1, 1) == LUA_TNUMBER ? "float" : "none");
    return 1;
}

static void open_state(void)
{
    L = luaL_newstate();
    CHECK(L != NULL);
    static const luaL_Reg libs[] = {{LUA_GNAME, luaopen_base}, {LUA_LOADLIBNAME, luaopen_package},
                                    {LUA_STRLIBNAME, luaopen_string},
                                    {LUA_TABLIBNAME, luaopen_table}, {NULL, NULL}};
    for (const luaL_Reg *lib = libs; lib->func; lib++) {
        luaL_requiref(L, lib->name, lib->func, 1);
        lua_pop(L, 1);
    }
    /* math is not opened (callout.lua must not need it); tests want math.type */
    lua_pushcfunction(L, math_type);
    lua_setglobal(L, "math_type");
    /* setup runs protected too */
    lua_pushcfunction(L, open_callout);
    if (lua_pcall(L, 0, 0, 0) != LUA_OK) {
        fprintf(stderr, "calloutlib_open failed: %s\n", lua_tostring(L, -1));
        exit(1);
    }
}

/* ---- the module itself ------------------------------------------------------------------ */

static void test_module(void)
{
    LUA_CHECK("assert(type(callout) == 'table')\n"
              "assert(require 'callout' == callout)\n"
              "assert(package.loaded.callout == callout)\n"
              "for _, f in ipairs{'add_header_mutation', 'add_body_mutation',\n"
              "    'header_immediate_response', 'deny_callout', 'headers_contain',\n"
              "    'body_contains', 'build_dynamic_forwarding_metadata'} do\n"
              "  assert(type(callout[f]) == 'function', f)\n"
              "end\n"
              "for _, l in ipairs{'debug', 'info', 'warn', 'error'} do\n"
              "  assert(type(callout.log[l]) == 'function', l)\n"
              "end\n");

    lua_getglobal(L, "callout");
    lua_getfield(L, -1, "null");
    CHECK(pbstruct_is_null(L, -1));
    pbstruct_push_null(L);
    CHECK(lua_rawequal(L, -1, -2));
    lua_pop(L, 3);

    /* a second open reuses the loaded module */
    lua_getglobal(L, "callout");
    lua_pushcfunction(L, open_callout);
    CHECK(lua_pcall(L, 0, 0, 0) == LUA_OK);
    lua_getglobal(L, "callout");
    CHECK(lua_rawequal(L, -1, -2));
    lua_pop(L, 2);
}

/* ---- return-table builders -------------------------------------------------------------- */

static void test_header_mutation(void)
{
    LUA_CHECK("local add, remove = { {'x-a', '1'}, {'x-b', '2'} }, {'x-c'}\n"
              "local r = callout.add_header_mutation{ add = add, remove = remove }\n"
              "assert(r.add == add and r.remove == remove)\n"
              "assert(r.clear_route_cache == nil and r.append_action == nil)\n"
              "assert(next(r, next(r, next(r))) == nil)  -- exactly two keys\n");
    LUA_CHECK("local r = callout.add_header_mutation{ add = { ['x-m'] = 'v' },\n"
              "    clear_route_cache = true, append_action = 'ADD_IF_ABSENT' }\n"
              "assert(r.add['x-m'] == 'v' and r.remove == nil)\n"
              "assert(r.clear_route_cache == true and r.append_action == 'ADD_IF_ABSENT')\n");
    LUA_CHECK("local r = callout.add_header_mutation{ clear_route_cache = false }\n"
              "assert(next(r) == nil)\n"
              "assert(next(callout.add_header_mutation()) == nil)\n"
              "assert(next(callout.add_header_mutation{}) == nil)\n");
}

static void test_body_mutation(void)
{
    LUA_CHECK("local r = callout.add_body_mutation{ body = 'new' }\n"
              "assert(r.body == 'new' and r.clear_body == nil and r.clear_route_cache == nil)\n"
              "r = callout.add_body_mutation{ clear_body = true, clear_route_cache = true }\n"
              "assert(r.body == nil and r.clear_body == true and r.clear_route_cache == true)\n"
              "r = callout.add_body_mutation{ clear_body = false }\n"
              "assert(next(r) == nil)\n"
              "r = callout.add_body_mutation{ body = '' }\n"
              "assert(r.body == '')\n"
              "r = callout.add_body_mutation{ body = 'a\\0b' }\n"
              "assert(r.body == 'a\\0b')\n");
}

static void body_and_clear(void)
{
    LUA_CHECK("local r = callout.add_body_mutation{ body = 'wins', clear_body = true }\n"
              "assert(r.body == 'wins' and r.clear_body == nil)\n");
}

static void test_body_wins_warns(void)
{
    const char *err = capture_stderr(body_and_clear);
    CHECK(strstr(err, "WARN") != NULL);
    CHECK(strstr(err, "mutually exclusive") != NULL);
}

static void test_immediate(void)
{
    LUA_CHECK("local h = { {'x-why', 'nope'} }\n"
              "local r = callout.header_immediate_response(403, h, 'OVERWRITE_IF_EXISTS_OR_ADD')\n"
              "assert(next(r, next(r)) == nil)  -- only `immediate`\n"
              "local i = r.immediate\n"
              "assert(i.status == 403 and math_type(i.status) == 'integer')\n"
              "assert(i.headers == h and i.append_action == 'OVERWRITE_IF_EXISTS_OR_ADD')\n"
              "r = callout.header_immediate_response(404.0)\n"
              "assert(math_type(r.immediate.status) == 'integer' and r.immediate.status == 404)\n"
              "assert(r.immediate.headers == nil and r.immediate.append_action == nil)\n");
}

static void test_predicates(void)
{
    LUA_CHECK("local h = { {'content-type', 'text/plain'}, {'x-a', '1'}, {'x-a', '2'} }\n"
              "assert(callout.headers_contain(h, 'x-a'))\n"
              "assert(callout.headers_contain(h, 'X-A', '2'))\n"
              "assert(not callout.headers_contain(h, 'x-a', '3'))\n"
              "assert(not callout.headers_contain(h, 'x-a', '1 '))\n"
              "assert(not callout.headers_contain(h, 'x-b'))\n"
              "assert(not callout.headers_contain({}, 'x-a'))\n");
    LUA_CHECK("local b = { body = 'hello a.b world\\0tail', end_of_stream = true }\n"
              "assert(callout.body_contains(b, 'a.b'))\n"
              "assert(not callout.body_contains(b, 'a%.b'))  -- plain, not a pattern\n"
              "assert(callout.body_contains(b, '\\0tail'))\n"
              "assert(callout.body_contains('plain string', 'n s'))\n"
              "assert(callout.body_contains('', ''))\n"
              "assert(not callout.body_contains({ body = '' }, 'x'))\n");
}

static void test_dynamic_forwarding(void)
{
    LUA_CHECK("local m = callout.build_dynamic_forwarding_metadata('10.1.2.3', 8080)\n"
              "local ns = m['com.google.envoy.dynamic_forwarding.selected_endpoints']\n"
              "assert(ns.primary == '10.1.2.3:8080', ns.primary)\n"
              "assert(next(m, next(m)) == nil and next(ns, next(ns)) == nil)\n"
              "m = callout.build_dynamic_forwarding_metadata('::1', 443.0)\n"
              "ns = m['com.google.envoy.dynamic_forwarding.selected_endpoints']\n"
              "assert(ns.primary == '::1:443', ns.primary)  -- no '.0', no brackets (as the SDK)\n");
}

/* ---- argument errors name the helper and the caller's line ------------------------------ */

static void test_arg_errors(void)
{
    /* each line calls one helper badly; the error must carry that very line, also when the
     * call is a tail call (`return callout.f(...)`, the usual form in a handler) */
    LUA_CHECK(
        "local cases = {\n"
        "  { function() return callout.add_header_mutation(5) end, 'add_header_mutation: expects a table' },\n"
        "  { function() return callout.add_header_mutation{ remvoe = {} } end, \"unknown option 'remvoe'\" },\n"
        "  { function() return callout.add_header_mutation{ add = 'x' } end, 'add must be a table or nil, got string' },\n"
        "  { function() return callout.add_header_mutation{ clear_route_cache = 1 } end, 'clear_route_cache must be a boolean' },\n"
        "  { function() return callout.add_header_mutation{ append_action = 1 } end, 'append_action must be a string' },\n"
        "  { function() return callout.add_body_mutation{ body = 5 } end, 'add_body_mutation: body must be a string' },\n"
        "  { function() return callout.add_body_mutation{ bdy = 'x' } end, \"unknown option 'bdy'\" },\n"
        "  { function() return callout.add_body_mutation{ [1] = 'x' } end, 'unknown option 1' },\n"
        "  { function() return callout.header_immediate_response('403') end, 'status must be an integer' },\n"
        "  { function() return callout.header_immediate_response(403.5) end, 'status must be an integer' },\n"
        "  { function() return callout.header_immediate_response(403, 'x') end, 'headers must be a table' },\n"
        "  { function() return callout.deny_callout(42) end, 'deny_callout: the message must be a string' },\n"
        "  { function() return callout.headers_contain(nil, 'x') end, 'headers must be a table, got nil' },\n"
        "  { function() return callout.headers_contain({}, 1) end, 'the name must be a string' },\n"
        "  { function() return callout.body_contains({}, 'x') end, 'body_contains: body' },\n"
        "  { function() return callout.body_contains('x', nil) end, 'the text must be a string' },\n"
        "  { function() return callout.build_dynamic_forwarding_metadata(1, 2) end, 'the ip address must be a string' },\n"
        "  { function() return callout.build_dynamic_forwarding_metadata('h', '80') end, 'the port must be an integer' },\n"
        "  { function() return callout.build_dynamic_forwarding_metadata('h', 1.5) end, 'the port must be an integer' },\n"
        "  { function() return callout.build_dynamic_forwarding_metadata('h', 70000) end, 'from 0 to 65535, got 70000' },\n"
        "  { function() return callout.log.info('%d', 'x') end, 'callout.log.info: bad argument #2' },\n"
        "  { function() local r = callout.add_header_mutation(5); return r end, 'expects a table' },\n"
        "  { function() local r = callout.log.warn('%s %s', 1); return r end, 'bad argument #3' },\n"
        "  { function() callout.body_contains(1, 'x') end, 'body (a body object or a string)' },\n"
        "}\n"
        "for i, c in ipairs(cases) do\n"
        "  local ok, err = pcall(c[1])\n"
        "  assert(not ok, 'case ' .. i .. ' did not raise')\n"
        "  local want = 'snippet:' .. (i + 1) .. ': callout.'\n"
        "  assert(err:sub(1, #want) == want, 'case ' .. i .. ': ' .. err)\n"
        "  assert(err:find(c[2], 1, true), 'case ' .. i .. ': ' .. err)\n"
        "end\n");
}

/* ---- deny_callout ------------------------------------------------------------------------ */

/* want is a string literal (it may hold NUL bytes) */
#define expect_deny(src, want) expect_deny_(src, want, sizeof(want) - 1)
static void expect_deny_(const char *src, const char *want, size_t wantlen)
{
    int top = lua_gettop(L);
    run_raising(src);
    const char *msg = NULL;
    size_t len = 0;
    CHECK(calloutlib_is_deny(L, -1, &msg, &len));
    CHECK(lua_gettop(L) == top + 1);   /* is_deny leaves the stack as it was */
    CHECK(msg != NULL && len == wantlen && memcmp(msg, want, len) == 0);
    /* relative and absolute indexes both work */
    lua_pushnil(L);
    CHECK(calloutlib_is_deny(L, -2, &msg, &len));
    CHECK(calloutlib_is_deny(L, top + 1, &msg, &len));
    lua_pop(L, 2);
}

static void expect_not_deny(const char *src)
{
    run_raising(src);
    const char *msg = "untouched";
    size_t len = 99;
    CHECK(!calloutlib_is_deny(L, -1, &msg, &len));
    CHECK(strcmp(msg, "untouched") == 0 && len == 99);
    lua_pop(L, 1);
}

static void test_deny(void)
{
    expect_deny("callout.deny_callout()", "Callout DENIED.");
    expect_deny("callout.deny_callout(nil)", "Callout DENIED.");
    expect_deny("callout.deny_callout('')", "Callout DENIED.");      /* the SDK's `msg or` */
    expect_deny("callout.deny_callout('no token')", "no token");
    expect_deny("callout.deny_callout('a\\0b')", "a\0b");
    /* raised from a nested function, and through a pcall that re-raises */
    expect_deny("local function check() callout.deny_callout('deep') end\n"
                "local ok, e = pcall(check)\n"
                "assert(not ok and e.message == 'deep' and e[1] == 'deep')\n"
                "error(e)", "deep");

    expect_not_deny("error('Callout DENIED.')");
    expect_not_deny("error({ 'Callout DENIED.' })");
    expect_not_deny("error(setmetatable({ 'x' }, { __name = 'callout.deny' }))");
    expect_not_deny("error(setmetatable({ 'x' }, getmetatable(setmetatable({}, {}))))");
    expect_not_deny("error(42)");
    expect_not_deny("error(callout.null)");

    /* a table carrying the real marker but no string at [1] reads as the default */
    run_raising("local ok, e = pcall(callout.deny_callout, 'x')\n"
                "e[1] = nil\n"
                "error(e)");
    const char *msg;
    size_t len;
    CHECK(calloutlib_is_deny(L, -1, &msg, &len));
    CHECK(len == 15 && memcmp(msg, "Callout DENIED.", 15) == 0);
    /* tostring() of a deny object, as error handlers print it */
    CHECK(strcmp(luaL_tolstring(L, -1, NULL), "callout.deny_callout: Callout DENIED.") == 0);
    lua_pop(L, 2);
}

/* ---- callout.log ------------------------------------------------------------------------- */

static void logs(void)
{
    stream_id = 42;
    LUA_CHECK("callout.log.info('hello %d %s', 7, 'x')\n"
              "callout.log.warn('100%')   -- a lone message is not a format\n"
              "callout.log.error({}) -- fields, no message\n"
              "callout.log.debug('hidden at info')\n"
              "callout.log.info({ user = 'ann', n = 3 }, 'fields %s', 'then format')\n"
              "callout.log.info({ list = { 1, 'two', true } }, 'a list')\n");
    stream_id = 0;
    LUA_CHECK("callout.log.info('at load time')\n");
    log_set_level(LOG_DEBUG);
    LUA_CHECK("callout.log.debug('shown %s', 'now')\n");
    log_set_level(LOG_ERROR);
    LUA_CHECK("callout.log.warn('%d', 'not even formatted')\n");   /* below the level */
    log_set_level(LOG_INFO);
}

/* The same calls with --log_format json: one object per line, the stream and phase of
 * the handler, the fields as members. */
static void logs_json(void)
{
    log_set_format(LOG_FORMAT_JSON);
    stream_id = 7;
    phase = "request_headers";
    LUA_CHECK("callout.log.warn({ ['logging.googleapis.com/trace'] = 'projects/p/traces/t',\n"
              "                   labels = { a = 'b' } }, 'line\\none')\n");
    /* values of every kind; a cycle stops at the depth limit; too many values: dropped */
    LUA_CHECK("local t = { n = 0/0, f = print, z = callout.null, mixed = { 1, x = 2 }, [7] = 'seven' }\n"
              "t.self = t\n"
              "callout.log.info(t, 'kinds')\n"
              "local big = {}\n"
              "for i = 1, 1000 do big['k' .. i] = i end\n"
              "callout.log.info(big, 'big')\n");
    stream_id = 0;
    phase = NULL;
    LUA_CHECK("callout.log.info('loading')\n");
    log_set_format(LOG_FORMAT_TEXT);
}

static void test_log_json(void)
{
    const char *err = capture_stderr(logs_json);
    CHECK(strstr(err, "\"level\":\"warn\",\"severity\":\"WARNING\",\"stream_id\":7,"
                      "\"phase\":\"request_headers\",\"msg\":\"line\\none\","
                      "\"message\":\"line\\none\",") != NULL);
    CHECK(strstr(err, "\"logging.googleapis.com/trace\":\"projects/p/traces/t\"") != NULL);
    CHECK(strstr(err, "\"labels\":{\"a\":\"b\"}") != NULL);
    CHECK(strstr(err, "\"msg\":\"script: loading\"") != NULL);
    /* two records, two lines */
    const char *nl = strchr(err, '\n');
    int lines = 0;
    for (const char *c = err; *c; c++)
        lines += *c == '\n';
    CHECK(nl != NULL && lines == 4);   /* four records, four lines */
    /* the load-time record has no stream and no phase */
    const char *load = strstr(err, "\"msg\":\"script: loading\"");
    while (load > err && load[-1] != '\n')
        load--;
    CHECK(strstr(load, "\"phase\"") == NULL && strstr(load, "\"stream_id\"") == NULL);
    CHECK(strstr(err, "\"n\":null") != NULL && strstr(err, "\"f\":\"function\"") != NULL);
    CHECK(strstr(err, "\"z\":null") != NULL && strstr(err, "\"7\":\"seven\"") != NULL);
    CHECK(strstr(err, "\"1\":1") != NULL && strstr(err, "\"x\":2") != NULL);   /* not an array */
    CHECK(strstr(err, "(nested too deep)") != NULL);
    CHECK(strstr(err, "\"msg\":\"big\",\"message\":\"big\",\"fields_dropped\":true}") != NULL);
}

/* Fields the server writes itself are refused, with the script line; so are keys that are
 * not strings. */
static void test_log_field_errors(void)
{
    stream_id = 1;
    LUA_CHECK("local ok, e = pcall(callout.log.info, { msg = 'x' }, 'hi')\n"
              "assert(not ok and e:find('callout.log.info: a field may not be called', 1, true), e)\n"
              "local ok2, e2 = pcall(function() callout.log.info({ [true] = 1 }, 'hi') end)\n"
              "assert(not ok2 and e2:find('^snippet:3: callout.log.info: field names must be strings'), e2)\n");
    stream_id = 0;
}

static void test_log(void)
{
    const char *err = capture_stderr(logs);
    CHECK(strstr(err, "INFO  stream 42: hello 7 x\n") != NULL);
    CHECK(strstr(err, "WARN  stream 42: 100%\n") != NULL);
    CHECK(strstr(err, "ERROR stream 42: \n") != NULL);
    CHECK(strstr(err, "INFO  stream 42: fields then format {") != NULL);
    CHECK(strstr(err, "\"user\":\"ann\"") != NULL && strstr(err, "\"n\":3") != NULL);
    CHECK(strstr(err, "INFO  stream 42: a list {\"list\":[1,\"two\",true]}\n") != NULL);
    CHECK(strstr(err, "hidden at info") == NULL);
    CHECK(strstr(err, "INFO  script: at load time\n") != NULL);
    CHECK(strstr(err, "DEBUG script: shown now\n") != NULL);
    CHECK(strstr(err, "not even formatted") == NULL);
}

int main(void)
{
    open_state();
    test_module();
    test_header_mutation();
    test_body_mutation();
    test_body_wins_warns();
    test_immediate();
    test_predicates();
    test_dynamic_forwarding();
    test_arg_errors();
    test_deny();
    test_log();
    test_log_json();
    test_log_field_errors();
    lua_close(L);
    printf("%d passed, 0 failed\n", passed);
    return 0;
}
