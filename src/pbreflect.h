/* pbreflect.h — any protobuf-c message <-> a Lua table with the proto's field names, driven
 * by protobuf-c descriptors. It serves `process(request, ctx)`: the script sees the whole
 * ProcessingRequest and returns a whole ProcessingResponse.
 *
 * Mapping: scalar fields -> numbers/booleans; string and bytes -> Lua strings (binary-safe);
 * enums -> their value name (out: a name or a number); repeated -> sequence; map<k,v> ->
 * table keyed by k; sub-messages -> tables; a oneof shows only its set member; unset
 * sub-messages are absent (nil); proto3 scalars at their default are present with the
 * default value. Well-known types are plain values: google.protobuf.Struct/Value/ListValue
 * via pbstruct.h, BoolValue -> boolean, Duration -> number of seconds (float), Any ->
 * {type_url=, value=}. */
#ifndef LUACALLOUT_PBREFLECT_H
#define LUACALLOUT_PBREFLECT_H

#include <stddef.h>

#include <lua.h>
#include <protobuf-c/protobuf-c.h>

#include "arena.h"

/* Push msg as a table. May raise (memory, depth). stack: ... -> ... table */
void pbreflect_push(lua_State *L, const ProtobufCMessage *msg);
/* The same without the fields at proto3's default (0, false, "", empty lists and maps),
 * as proto3's JSON mapping leaves them out: the exchange format (lua/callout/exchange.lua).
 * A oneof's set member and a message field that is set are always there. */
void pbreflect_push_sparse(lua_State *L, const ProtobufCMessage *msg);

/* Build a message of type `desc` from the table at idx, in the arena; strings point into
 * Lua strings reachable from idx. Strict: an unknown field name, a wrong type, an unknown
 * enum name, an out-of-range integer, two members of one oneof -> -1 with err naming the
 * path, e.g. "response.request_headers.response.header_mutation.set_headers[1].header:
 * unknown field 'kye'". `path` is the prefix for messages ("response"). string fields
 * must be valid UTF-8 without NUL (bytes fields take anything); enums take any int32
 * number (proto3 enums are open). Does not call Lua code; stack unchanged. */
int pbreflect_from_lua(lua_State *L, int idx, const ProtobufCMessageDescriptor *desc,
                       const char *path, struct arena *a, ProtobufCMessage **out, char *err,
                       size_t errlen);

#endif
