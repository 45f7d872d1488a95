/* exchange_native.h — the C half of the exchange format (lua/callout/exchange.lua): bytes
 * of ext_proc messages <-> Lua tables (pbreflect.h) and base64. The same functions serve the
 * binary's own tool state (exchange.c) and callout.native under busted (testing_native.c). */
#ifndef LUACALLOUT_EXCHANGE_NATIVE_H
#define LUACALLOUT_EXCHANGE_NATIVE_H

#include <lua.h>

/* Sets on the table at the top of the stack:
 *   encode_request(table)            -> ProcessingRequest bytes (raises naming the field)
 *   decode_request(bytes [, sparse]) -> table | nil, msg
 *   decode_response(bytes [, sparse])-> table | nil, msg
 *       sparse: leave fields at proto3's default out (pbreflect_push_sparse)
 *   base64_encode(s)                 -> standard alphabet, padded
 *   base64_decode(s)                 -> bytes | nil, msg (strict: padded, no whitespace)
 * stack unchanged. */
void exchange_native_register(lua_State *L);

#endif
