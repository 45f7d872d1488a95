/* json.h — `callout.json`: JSON text <-> Lua values that round-trip (yajl parses), see
 * docs/lua-api.md. Also the decoder callout.jwt reads its tokens with. */
#ifndef LUACALLOUT_JSON_H
#define LUACALLOUT_JSON_H

#include <stddef.h>

#include <lua.h>

#define LJSON_MAX_BYTES (4u << 20)      /* decode refuses longer documents */
#define LJSON_MAX_DEPTH 256             /* containers nested deeper are refused both ways */

/* The lua_CFunction that opens the module: pushes the `callout.json` table (decode, encode,
 * object, array, kind, null). Used with luaL_requiref(L, "callout.json", ...). */
int ljson_open(lua_State *L);

/* ljson_decode flags */
#define LJSON_DUPLICATES 1u     /* a repeated key keeps its first place, takes the last value
                                   (what Python's json does; callout.json refuses it) */
#define LJSON_SKIP_BOM 2u       /* skip a leading UTF-8 byte order mark */

/* Decodes s[0..n) as one JSON document and pushes it (objects and arrays marked, as
 * json.decode gives them); returns 0. On invalid input pushes nothing, writes
 * "<what> at line L, column C" to err and returns -1. Raises only Lua memory errors (the
 * parse tree is freed then too). stack: ... -> ... value | ... */
int ljson_decode(lua_State *L, const char *s, size_t n, unsigned flags, char *err,
                 size_t errlen);

/* The host's time budget. decode and encode are one C call each, which the VM's count hook
 * never interrupts: a document of millions of tiny values, or a table shared many times over,
 * would hold the worker for as long as it takes. `check` is called every
 * LJSON_CHECK_VALUES values (and key comparisons, where keys are sorted) and every
 * LJSON_CHECK_BYTES bytes of a long string, directly (a plain C call, not lua_call: it runs
 * as part of the json function the script called, so the script's frame is level 1 of the
 * stack); it
 * returns to let the work go on, or raises (the budget error). Kept in L's registry, looked
 * up once per call; a state without it (the fuzzer's) is never checked. */
#define LJSON_CHECK_VALUES 1024
#define LJSON_CHECK_BYTES (64u << 10)
void ljson_set_budget(lua_State *L, lua_CFunction check);

/* What json.kind says of the value at idx. */
enum ljson_kind { LJSON_PLAIN, LJSON_OBJECT, LJSON_ARRAY };
enum ljson_kind ljson_kind(lua_State *L, int idx);

#endif
