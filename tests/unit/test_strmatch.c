/* test_strmatch.c — src/strmatch.c against the stock string library of the same lua_State:
 * a table of (subject, pattern, init) cases (strmatch_cases.lua) through find, match, gmatch
 * and gsub must give the same results and the same errors; and hostile patterns that keep
 * the stock matcher busy for minutes must stop within the host's budget. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lauxlib.h>
#include <lualib.h>

#include "strmatch.h"
#include "strmatch_diff.h"

#include "check.h"

static double clock_ms(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static double now_ms(void)
{
    return clock_ms(CLOCK_MONOTONIC);
}

/* CPU time of this thread: what the matcher spent, whatever else the machine runs */
static double cpu_ms(void)
{
    return clock_ms(CLOCK_THREAD_CPUTIME_ID);
}

/* The host side of the budget: a deadline in ms (0: none), how often it was asked, and the
 * longest CPU time between two questions. */
static double deadline_ms;
static long expired_calls;
static double last_call_cpu_ms, max_gap_ms;

static int expired(lua_State *L)
{
    expired_calls++;
    double cpu = cpu_ms();
    if (cpu - last_call_cpu_ms > max_gap_ms)
        max_gap_ms = cpu - last_call_cpu_ms;
    last_call_cpu_ms = cpu;
    if (deadline_ms == 0 || now_ms() < deadline_ms)
        return 0;
    lua_pushliteral(L, "script exceeded its time budget");
    return 1;
}

/* Replacement strings for OP_GSUB_STRING, taken in turn: captures, escapes, malformed. */
static const char *const reps[] = {
    "<%0>", "%1", "%2-%1", "%%", "x%", "%a", "", "%0%0", "[%1]", "%3%2%1", "%9", "%%1%",
};

static void test_differential(void)
{
    const char *src = getenv("LUACALLOUT_SRC");
    char path[4096];
    snprintf(path, sizeof path, "%s/tests/unit/strmatch_cases.lua", src ? src : ".");

    lua_State *L = diff_open(expired);
    CHECK(L != NULL);
    /* ours are installed, for function calls and method calls alike */
    CHECK(luaL_dostring(L, "return string.find ~= STOCK.find and ('x').gsub == OURS.gsub "
                           "and string.gmatch == OURS.gmatch") == LUA_OK);
    CHECK(lua_toboolean(L, -1));
    lua_pop(L, 1);

    if (luaL_dofile(L, path) != LUA_OK) {
        fprintf(stderr, "%s\n", lua_tostring(L, -1));
        CHECK(0);
    }
    int cases = lua_gettop(L);
    lua_Integer n = luaL_len(L, cases);
    CHECK(n > 1000);
    long compared = 0, errors = 0;
    for (lua_Integer i = 1; i <= n; i++) {
        lua_geti(L, cases, i);
        lua_geti(L, -1, 1);
        lua_geti(L, -2, 2);
        int has_init = lua_geti(L, -3, 3) != LUA_TNIL;
        size_t ls, lp;
        const char *s = lua_tolstring(L, -3, &ls);
        const char *p = lua_tolstring(L, -2, &lp);
        lua_Integer init = has_init ? lua_tointeger(L, -1) : 0;
        const char *rep = reps[i % (sizeof reps / sizeof reps[0])];
        for (int op = 0; op < OP_COUNT; op++) {
            diff_run(L, "STOCK", op, s, ls, p, lp, has_init, init, rep, strlen(rep));
            diff_run(L, "OURS", op, s, ls, p, lp, has_init, init, rep, strlen(rep));
            size_t la, lb;
            const char *a = lua_tolstring(L, -2, &la), *b = lua_tolstring(L, -1, &lb);
            if (la != lb || memcmp(a, b, la) != 0 || strncmp(a, "driver failed", 13) == 0) {
                fprintf(stderr, "case %lld op %d pattern %s init %lld%s:\n stock: %s\n ours:  %s\n",
                        (long long)i, op, luaL_tolstring(L, -4, NULL), (long long)init,
                        has_init ? "" : " (none)", a, b);
                CHECK(0);
            }
            compared++;
            errors += strncmp(a, "E:", 2) == 0 || strstr(a, "\nE:") != NULL;
            lua_pop(L, 2);
        }
        lua_pop(L, 4);
    }
    /* the table does exercise errors, and mostly successes */
    CHECK(errors > 1000 && errors < compared / 2);
    printf("strmatch: %ld comparisons, %ld of them errors, all equal\n", compared, errors);
    lua_close(L);
}

/* Runs src (which must raise) with a budget of budget_ms; checks that the error is the
 * host's, that it came within budget_ms + margin_ms of CPU time (wall time would fail on a
 * busy machine), and that the host was asked at least twice within the budget: no gap
 * between two questions is longer than half of it. Sanitizer builds on this 2-core VM
 * measure gaps of 6-8 ms; CI's machines have shown 22 ms, and the stock functions hide
 * seconds in one call. */
static void expect_budget_error(lua_State *L, const char *src, double budget_ms)
{
    const double margin_ms = 30, max_gap = budget_ms / 2;
    double start = now_ms();
    double start_cpu = last_call_cpu_ms = cpu_ms();
    max_gap_ms = 0;
    deadline_ms = start + budget_ms;
    int rc = luaL_loadstring(L, src);
    if (rc == LUA_OK)
        rc = lua_pcall(L, 0, LUA_MULTRET, 0);
    double took = now_ms() - start, took_cpu = cpu_ms() - start_cpu;
    deadline_ms = 0;
    if (rc != LUA_ERRRUN || strcmp(lua_tostring(L, -1), "script exceeded its time budget") != 0)
        fprintf(stderr, "%s: rc %d, %s\n", src, rc, lua_tostring(L, -1));
    CHECK(rc == LUA_ERRRUN);
    CHECK(strcmp(lua_tostring(L, -1), "script exceeded its time budget") == 0);
    if (took_cpu > budget_ms + margin_ms || max_gap_ms > max_gap)
        fprintf(stderr, "%s: took %.1f ms of CPU (%.1f ms) for a %.0f ms budget, "
                "%.1f ms between checks\n", src, took_cpu, took, budget_ms, max_gap_ms);
    printf("budget %.0f ms: stopped after %.1f ms (%.1f ms CPU), checks <= %.3f ms apart: %s\n",
           budget_ms, took, took_cpu, max_gap_ms, src);
    CHECK(took >= budget_ms);
    CHECK(took_cpu <= budget_ms + margin_ms);
    CHECK(max_gap_ms <= max_gap);
    lua_pop(L, 1);
}

static void test_budget(void)
{
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    strmatch_open(L, expired);
    CHECK(luaL_dostring(L, "cookie = ('='):rep(60000) "
                           "pat = '^%s*(.-)%s*=%s*(.-)%s*;%s*(.-)%s*=%s*(.-)%s*$' "
                           "as = ('a'):rep(1000)") == LUA_OK);
    /* the two of the issue: > 20 s and minutes with the stock functions */
    expect_budget_error(L, "return as:find('.-.-.-b')", 100);
    expect_budget_error(L, "return cookie:match(pat)", 100);
    expect_budget_error(L, "return string.match(cookie, pat)", 100);
    /* every function, and a matcher that is busy without backtracking: a long pattern
     * tried at every position of a long subject */
    expect_budget_error(L, "return as:gsub('.-.-.-b', 'x')", 100);
    expect_budget_error(L, "for a in as:gmatch('.-.-.-b') do end", 100);
    expect_budget_error(L, "local s = ('a'):rep(200000) "
                           "return s:match(('a'):rep(100000) .. 'b')", 100);
    expect_budget_error(L, "local s = ('a'):rep(20000) return s:find('(a*)%1b')", 100);
    expect_budget_error(L, "local s = ('('):rep(100000) return s:find('%b()')", 100);
    /* costs that hide inside one step: a long set, a long replacement of empty matches */
    expect_budget_error(L, "local s = ('x'):rep(100000) "
                           "return s:find('[' .. ('a'):rep(100000) .. ']')", 100);
    expect_budget_error(L, "local s = ('x'):rep(100000) "
                           "return s:find('[' .. ('a'):rep(100000) .. 'x]*y')", 100);
    expect_budget_error(L, "local s = ('x'):rep(100000) "
                           "return s:gsub('', ('%0'):rep(100000))", 100);

    /* plain find is linear (stock: 10^10 byte compares), so it needs no budget */
    double start = now_ms();
    CHECK(luaL_dostring(L, "local s = ('a'):rep(200000) "
                           "return s:find(('a'):rep(100000) .. 'b', 1, true)") == LUA_OK);
    CHECK(lua_isnil(L, -1));
    CHECK(now_ms() - start < 100);
    lua_pop(L, 1);

    /* the host is asked every STRMATCH_CHECK_STEPS steps, and ordinary matches are cheap */
    expired_calls = 0;
    CHECK(luaL_dostring(L, "return ('k = v'):match('^%s*(.-)%s*=%s*(.-)%s*$')") == LUA_OK);
    CHECK(strcmp(lua_tostring(L, -2), "k") == 0);
    CHECK(expired_calls == 0);
    lua_pop(L, 2);
    CHECK(luaL_dostring(L, "return #as:rep(20):gsub('a', 'b')") == LUA_OK);
    CHECK(lua_tointeger(L, -1) == 20000);
    CHECK(expired_calls >= 20000 / (STRMATCH_CHECK_STEPS + 1));
    lua_pop(L, 1);

    /* after a budget error the same functions work again */
    CHECK(luaL_dostring(L, "return ('a=1'):gsub('(%w)=(%w)', '%2=%1')") == LUA_OK);
    CHECK(strcmp(lua_tostring(L, -2), "1=a") == 0);
    lua_close(L);
}

static int open_without_host(lua_State *L)
{
    strmatch_open(L, NULL);
    return 0;
}

/* Without a host function the replacements never stop, and need no upvalue of ours. */
static void test_no_host(void)
{
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    strmatch_open(L, NULL);
    CHECK(luaL_dostring(L, "return (('a'):rep(100)):find('.-.-b')") == LUA_OK);
    CHECK(lua_isnil(L, -1));
    lua_close(L);

    /* no string library: an error, not a crash */
    L = luaL_newstate();
    lua_pushcfunction(L, open_without_host);
    CHECK(lua_pcall(L, 0, 0, 0) == LUA_ERRRUN);
    CHECK(strstr(lua_tostring(L, -1), "string library is not open") != NULL);
    lua_close(L);
}

int main(void)
{
    test_differential();
    test_budget();
    test_no_host();
    printf("%d passed\n", passed);
    return 0;
}
