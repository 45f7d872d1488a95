/* strmatch.h — string.find, string.match, string.gmatch and string.gsub that a time budget
 * can stop.
 *
 * Lua's own pattern functions are one C call each: the VM's count hook never runs while
 * they backtrack, so `("a"):rep(1000):find(".-.-.-b")` or a cookie parser fed 60 KB of '='
 * holds a worker for as long as the matcher likes. These are our own implementation of the
 * patterns of the Lua 5.4 manual (§6.4.1) with the same results and the same error messages,
 * plus a step counter: every STRMATCH_CHECK_STEPS steps of matching (a step is one attempt
 * of a pattern item, or one subject byte scanned by a repetition, %b or a back-reference)
 * the matcher asks the host whether the budget has run out.
 *
 * Host protocol: `expired(L)` returns 0 to let the matcher go on. To stop it, it pushes one
 * value (the error object, usually a message string) and returns non-zero; the matcher then
 * raises that value with lua_error, exactly as if the script had called error() with it (no
 * position is prepended). It is called from inside a string function, so it must not yield
 * and should be cheap (a clock read); it may raise an error itself instead of returning.
 * The recursion of the matcher is bounded as Lua bounds its own (200 levels, then
 * "pattern too complex"), so no pattern can exhaust the C stack. */
#ifndef LUACALLOUT_STRMATCH_H
#define LUACALLOUT_STRMATCH_H

#include <lua.h>

/* Matcher steps between two calls of the host's expired(). */
#define STRMATCH_CHECK_STEPS 4096

typedef int (*strmatch_expired_fn)(lua_State *L);

/* Replaces find, match, gmatch and gsub in the string library's table (package.loaded.string,
 * which luaopen_string also makes the string metatable's __index, so `s:find()` is covered)
 * and in the string metatable's __index if that is another table. Call it after the string
 * library is opened and before anything copies that table (a sandbox's proxy, say), from
 * protected code: it allocates, and raises if the string library is not open. `expired` may
 * be NULL: then the functions are plain replacements that never stop. */
void strmatch_open(lua_State *L, strmatch_expired_fn expired);

#endif
