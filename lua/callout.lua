-- callout.lua: the Lua half of the `callout` module (docs/lua-api.md, "The `callout`
-- module"). Lua counterparts of the Google Python SDK's callout_tools helpers; they build
-- the plain return tables of docs/lua-api.md ("Return values") rather than protobuf
-- messages, so a script can also write those tables by hand.
--
-- Embedded at build time and loaded by src/calloutlib.c, which passes the native helpers:
--   native.log(level, msg, fields)  one server log record tagged with the current stream
--                            id and phase; fields (a table or nil) are extra members
--   native.enabled(level)    whether that level is logged at all
--   native.api(f)            f behind a C function, see the end of this file
--   native.null              JSON null of Struct values (pbstruct_push_null)
--   native.deny_mt           the metatable calloutlib_is_deny() recognises

local native = ...

local format, find, lower = string.format, string.find, string.lower
local type, select, setmetatable, pcall, error = type, select, setmetatable, pcall, error
local ipairs, pairs, tostring = ipairs, pairs, tostring

-- math.tointeger, but for numbers only (not "80") and without needing the math library.
local function tointeger(v)
  if type(v) == "number" and v % 1 == 0 and v >= -2^63 and v < 2^63 then  -- nan, inf fail
    return v | 0
  end
end

local M = { null = native.null }

-- Argument errors blame the script line that called the callout.* function. The checkers
-- below are only ever called straight from those functions, so the levels are: 1 fail,
-- 2 the checker, 3 the callout.* function, 4 its native.api wrapper, 5 the script.
local SCRIPT_LEVEL = 5

local function fail(fname, fmt, ...)
  error(format("callout.%s: " .. fmt, fname, ...), SCRIPT_LEVEL)
end

local function check(ok, fname, fmt, ...)
  if not ok then fail(fname, fmt, ...) end
end

local function check_type(v, want, fname, what, optional)
  if type(v) ~= want and not (optional and v == nil) then
    fail(fname, "%s must be a %s%s, got %s", what, want, optional and " or nil" or "", type(v))
  end
end

-- A misspelt option (`remvoe = {...}`) would otherwise be ignored silently.
local function check_options(opts, allowed, fname)
  if opts == nil then return {} end
  if type(opts) ~= "table" then
    fail(fname, "expects a table of options, got %s", type(opts))
  end
  for k in pairs(opts) do
    if not allowed[k] then
      fail(fname, "unknown option %s", type(k) == "string" and "'" .. k .. "'" or tostring(k))
    end
  end
  return opts
end

local header_opts = { add = true, remove = true, clear_route_cache = true, append_action = true }

-- add: a list of {name, value} pairs or a {name = value} map; remove: a list of names;
-- append_action: one of the HeaderAppendAction names, applied to every added header.
function M.add_header_mutation(opts)
  local o = check_options(opts, header_opts, "add_header_mutation")
  check_type(o.add, "table", "add_header_mutation", "add", true)
  check_type(o.remove, "table", "add_header_mutation", "remove", true)
  check_type(o.clear_route_cache, "boolean", "add_header_mutation", "clear_route_cache", true)
  check_type(o.append_action, "string", "add_header_mutation", "append_action", true)
  return {
    add = o.add,
    remove = o.remove,
    clear_route_cache = o.clear_route_cache or nil,
    append_action = o.append_action,
  }
end

local body_opts = { body = true, clear_body = true, clear_route_cache = true }

-- body replaces the body (chunk); clear_body empties it. As in the Python SDK, body wins
-- when both are given; neither leaves the body unchanged.
function M.add_body_mutation(opts)
  local o = check_options(opts, body_opts, "add_body_mutation")
  check_type(o.body, "string", "add_body_mutation", "body", true)
  check_type(o.clear_body, "boolean", "add_body_mutation", "clear_body", true)
  check_type(o.clear_route_cache, "boolean", "add_body_mutation", "clear_route_cache", true)
  local r = { clear_route_cache = o.clear_route_cache or nil }
  if o.body ~= nil then
    r.body = o.body
    if o.clear_body then
      native.log("warn", "add_body_mutation: body and clear_body are mutually exclusive; using body")
    end
  elseif o.clear_body then
    r.clear_body = true
  end
  return r
end

-- status: an HTTP status code (range checked with the return table); headers: the forms
-- `add` takes; append_action: applied to every header.
function M.header_immediate_response(status, headers, append_action)
  check(tointeger(status) ~= nil, "header_immediate_response",
        "status must be an integer HTTP status, got %s", tostring(status))
  check_type(headers, "table", "header_immediate_response", "headers", true)
  check_type(append_action, "string", "header_immediate_response", "append_action", true)
  return { immediate = { status = tointeger(status), headers = headers, append_action = append_action } }
end

local DENIED = "Callout DENIED."

-- Raises, rather than returns, so a helper deep in the script can end the stream. The error
-- object is a table, not a string, so that no location is prepended to the message and the
-- server can tell a deny from a failure (calloutlib_is_deny reads [1]). A script that
-- catches it with pcall should re-raise it. The server logs the warning the SDK logs, when
-- the deny actually ends the stream (not when a pcall swallows it).
function M.deny_callout(msg)
  check_type(msg, "string", "deny_callout", "the message", true)
  if msg == nil or msg == "" then msg = DENIED end  -- the SDK's `msg or 'Callout DENIED.'`
  error(setmetatable({ msg, message = msg }, native.deny_mt), 0)
end

-- headers: a headers object or any list of {name, value} pairs. Same rule as headers:has:
-- name compared case-insensitively, value (when given) exactly.
function M.headers_contain(headers, name, value)
  check_type(name, "string", "headers_contain", "the name", false)
  check_type(value, "string", "headers_contain", "the value", true)
  -- a headers object answers from its C copy, without building a pair per header
  if getmetatable(headers) == "read-only" and type(headers) == "userdata" then
    return headers:has(name, value)
  end
  check_type(headers, "table", "headers_contain", "headers", false)
  name = lower(name)
  for _, kv in ipairs(headers) do
    if type(kv) == "table" and type(kv[1]) == "string" and lower(kv[1]) == name
        and (value == nil or kv[2] == value) then
      return true
    end
  end
  return false
end

-- body: a body object or a string. A plain byte substring search (no patterns, no UTF-8
-- decoding: bodies are binary).
function M.body_contains(body, text)
  if type(body) == "table" then body = body.body end
  check_type(body, "string", "body_contains", "body (a body object or a string)", false)
  check_type(text, "string", "body_contains", "the text", false)
  return find(body, text, 1, true) ~= nil
end

local DYNAMIC_FORWARDING = "com.google.envoy.dynamic_forwarding.selected_endpoints"

-- The dynamic_metadata value Google Cloud's dynamic forwarding reads:
--   return { dynamic_metadata = callout.build_dynamic_forwarding_metadata("10.0.0.1", 80) }
-- Like the SDK, "ip:port" as is (no brackets around an IPv6 address).
function M.build_dynamic_forwarding_metadata(ip, port)
  check_type(ip, "string", "build_dynamic_forwarding_metadata", "the ip address", false)
  local p = tointeger(port)
  check(p ~= nil and p >= 0 and p <= 65535, "build_dynamic_forwarding_metadata",
        "the port must be an integer from 0 to 65535, got %s", tostring(port))
  return { [DYNAMIC_FORWARDING] = { primary = format("%s:%d", ip, p) } }
end

-- callout.log.info(fmt, ...): string.format, as Python's logging does with %-args; a lone
-- argument is logged as is (tostring), so "100%" needs no escaping. A table first is a set
-- of fields for the record: callout.log.info({ user = id }, "denied %s", path) — members
-- of the JSON object with --log_format json, {...} after the message in text.
local function logger(level)
  local function emit(fields, fmt, ...)
    local msg
    if select("#", ...) == 0 then
      msg = fmt == nil and fields and "" or tostring(fmt)
    else
      local ok, s = pcall(format, fmt, ...)
      if not ok then error("callout.log." .. level .. ": " .. tostring(s), SCRIPT_LEVEL - 2) end
      msg = s
    end
    local err = native.log(level, msg, fields)
    if err then error("callout.log." .. level .. ": " .. err, SCRIPT_LEVEL - 2) end
  end
  return function(first, ...)
    if not native.enabled(level) then return end  -- skip the formatting too
    if type(first) == "table" then return emit(first, ...) end
    return emit(nil, first, ...)
  end
end

M.log = { debug = logger("debug"), info = logger("info"), warn = logger("warn"), error = logger("error") }

-- `return callout.add_header_mutation{...}` is a tail call, which would drop the script's
-- frame and leave an argument error without a line; behind a C function it keeps it.
for _, t in ipairs { M, M.log } do
  for k, v in pairs(t) do
    if type(v) == "function" then t[k] = native.api(v) end
  end
end

return M
