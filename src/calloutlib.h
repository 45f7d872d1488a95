/* calloutlib.h — the native part of the `callout` Lua module (lua/callout.lua is the rest,
 * embedded at build time and registered in package.preload). */
#ifndef LUACALLOUT_CALLOUTLIB_H
#define LUACALLOUT_CALLOUTLIB_H

#include <stddef.h>
#include <stdint.h>

#include <lua.h>

/* Registers package.preload["callout"] (and the native helpers it uses) and sets the
 * global `callout` to the loaded module. `current_stream` points at the id of the stream
 * whose handler is running (0 outside handlers), `current_phase` at its phase name
 * ("request_headers" ..., NULL outside handlers); callout.log lines carry both. May raise;
 * call under a protected call. */
void calloutlib_open(lua_State *L, const uint64_t *current_stream,
                     const char *const *current_phase);

/* Whether the error object at idx was raised by callout.deny_callout(msg); if so, *msg and
 * *len give the message ("Callout DENIED." by default). Does not call Lua code. */
int calloutlib_is_deny(lua_State *L, int idx, const char **msg, size_t *len);

#endif
