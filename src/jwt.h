/* jwt.h — `callout.jwt`: RS256 JSON Web Tokens for scripts (OpenSSL), see docs/lua-api.md. */
#ifndef LUACALLOUT_JWT_H
#define LUACALLOUT_JWT_H

#include <lua.h>

/* The lua_CFunction that opens the module: pushes the `callout.jwt` table
 * (load_key, decode, is_array). Used with luaL_requiref(L, "callout.jwt", ...). */
int jwt_open(lua_State *L);

#endif
