/* pbstruct.h — google.protobuf.Struct / Value / ListValue <-> plain Lua values.
 *
 * Lua side: a Struct is a table with string keys; a ListValue is a sequence (keys 1..n,
 * n >= 1); strings, numbers and booleans map to themselves; JSON null is the sentinel
 * `callout.null` (a light userdata, pushed by pbstruct_push_null). An empty table becomes
 * an empty Struct. Used for dynamic_metadata (out), attributes and metadata_context (in),
 * and by the whole-message converter of process(). */
#ifndef LUACALLOUT_PBSTRUCT_H
#define LUACALLOUT_PBSTRUCT_H

#include <stdbool.h>
#include <stddef.h>

#include <lua.h>

#include "arena.h"
#include "google/protobuf/struct.pb-c.h"

/* Push a Struct as a table (NULL -> empty table). Recursive; may raise (memory, depth
 * over 100). stack: ... -> ... table */
void pbstruct_push(lua_State *L, const Google__Protobuf__Struct *s);
/* Push one Value (NULL or no kind -> callout.null). stack: ... -> ... value */
void pbstruct_push_value(lua_State *L, const Google__Protobuf__Value *v);

/* The JSON null sentinel, and whether the value at idx is it. */
void pbstruct_push_null(lua_State *L);
int pbstruct_is_null(lua_State *L, int idx);

/* Convert the Lua value at idx into a Struct (idx must be a table with string keys) or a
 * Value, allocated in the arena; strings point into Lua strings reachable from idx (keep
 * it on the stack until packed). 0 on success; -1 with a message in err naming the path
 * of the offending entry, e.g. "dynamic_metadata.ns.list[2]: a function cannot be
 * converted to a protobuf Value" (`path` is the prefix to use; NULL or "" for none).
 * Rejects non-string keys, functions/userdata/threads, NaN/inf, cycles (depth over 100),
 * strings and keys that are not valid UTF-8 or contain NUL (Envoy's parser would reject
 * the whole message). Does not call Lua code; stack unchanged. */
int pbstruct_from_lua(lua_State *L, int idx, const char *path, struct arena *a,
                      Google__Protobuf__Struct **out, char *err, size_t errlen);
int pbstruct_value_from_lua(lua_State *L, int idx, const char *path, struct arena *a,
                            Google__Protobuf__Value **out, char *err, size_t errlen);

#endif
