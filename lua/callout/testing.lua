-- callout/testing.lua — drive a luacallout script from busted specs (docs/testing.md).
--
-- A script runs through the server's own C code: callout.native (src/testing_native.c) is
-- built from the same sources as the server, loads the script into a VM made exactly as a
-- worker makes it, and answers ProcessingRequest bytes with the bytes the server would send.
-- So a spec that passes here means the server sends exactly that response.
--
--   local testing = require "callout.testing"
--   local script = testing.load("my.lua")
--   local resp = testing.run(script, testing.request_headers { [":path"] = "/", foo = "bar" })
--   assert.header_set(resp, "hello", "service-extensions")
--
-- Not embedded in the server: it lives on busted's --lpath only.

local native = require "callout.native"

local format, lower, concat = string.format, string.lower, table.concat
local type, pairs, ipairs, tostring, error, pcall = type, pairs, ipairs, tostring, error, pcall
local setmetatable, getmetatable = setmetatable, getmetatable

local M = { null = native.null, json = native.json }

-- A spec reads like a script: require "callout.json" gives the server's own callout.json
-- (the same C code, through callout.native) once callout.testing is loaded.
package.loaded["callout.json"] = package.loaded["callout.json"] or native.json

-- The level (for error) of the first caller outside this file, seen from the function
-- that calls outside(): the spec's line.
local THIS = debug.getinfo(1, "S").source
local function outside()
  local level = 3
  while true do
    local info = debug.getinfo(level, "S")
    if not info or info.source ~= THIS then return level - 1 end
    level = level + 1
  end
end

-- Raises a usage error at the spec's line.
local function fail(fmt, ...)
  error(format(fmt, ...), outside())
end

-- gRPC status codes by name, and names by code.
M.grpc = {
  OK = 0, CANCELLED = 1, UNKNOWN = 2, INVALID_ARGUMENT = 3, DEADLINE_EXCEEDED = 4,
  NOT_FOUND = 5, ALREADY_EXISTS = 6, PERMISSION_DENIED = 7, RESOURCE_EXHAUSTED = 8,
  FAILED_PRECONDITION = 9, ABORTED = 10, OUT_OF_RANGE = 11, UNIMPLEMENTED = 12,
  INTERNAL = 13, UNAVAILABLE = 14, DATA_LOSS = 15, UNAUTHENTICATED = 16,
}
local grpc_name = {}
for name, code in pairs(M.grpc) do grpc_name[code] = name end

local last_logs = {}

-- The server's log lines ("WARN stream 1: ...", no timestamp) of the last load, call or
-- send: they are collected rather than printed, so a spec can check them.
function M.logs()
  return last_logs
end

-- Loads the script at `path` in a fresh VM (a fresh sandbox: nothing is shared with
-- another load). When it does not compile or its top level fails, raises what the server's
-- start-up would say ("my.lua:3: msg"), at the spec's line.
function M.load(path)
  if type(path) ~= "string" then
    fail("testing.load: expects a path, got %s", type(path))
  end
  local script, err = native.load(path)
  last_logs = native.logs()
  if not script then error(err, outside()) end
  return script
end

-- Loads a script given as source text (written to a temporary file, so error messages name
-- that file). Handy for short scripts inside a spec.
function M.load_string(source)
  if type(source) ~= "string" then
    fail("testing.load_string: expects the script's source, got %s", type(source))
  end
  local path = os.tmpname()
  local f = assert(io.open(path, "wb"))
  f:write(source)
  f:close()
  local script, err = native.load(path)
  last_logs = native.logs()
  os.remove(path)
  if not script then error(err, outside()) end
  return script
end

---------------------------------------------------------------------------------------------
-- Request constructors: they return a ProcessingRequest as a table with the proto's field
-- names (what process(request, ctx) would see), which run/call/send encode with the C codec.

-- {[":path"] = "/", foo = "bar"} (sent sorted by name; a list value sends the header once
-- per entry) or { {":path", "/"}, {"foo", "bar"} } (order and duplicates kept).
-- Values are strings or numbers; they go out as raw_value, as Envoy sends them.
local function header_map(h, fname)
  local list = {}
  if h == nil then return { headers = list } end
  if type(h) ~= "table" then
    fail("testing.%s: headers must be a table, got %s", fname, type(h))
  end
  local function value(v, name)
    if type(v) ~= "string" and type(v) ~= "number" then
      fail("testing.%s: the value of header '%s' must be a string or a number, got %s",
           fname, tostring(name), type(v))
    end
    return tostring(v)
  end
  local n = 0
  for _ in pairs(h) do n = n + 1 end
  if n == #h then
    for i, kv in ipairs(h) do
      if type(kv) ~= "table" or type(kv[1]) ~= "string" then
        fail("testing.%s: header %d must be a {name, value} pair", fname, i)
      end
      list[i] = { key = kv[1], raw_value = value(kv[2], kv[1]) }
    end
    return { headers = list }
  end
  local names = {}
  for k in pairs(h) do
    if type(k) ~= "string" then
      fail("testing.%s: headers are a list of {name, value} pairs or a map {name = value}, " ..
           "not both", fname)
    end
    names[#names + 1] = k
  end
  table.sort(names)
  for _, k in ipairs(names) do
    local v = h[k]
    if type(v) == "table" then
      for _, each in ipairs(v) do list[#list + 1] = { key = k, raw_value = value(each, k) } end
    else
      list[#list + 1] = { key = k, raw_value = value(v, k) }
    end
  end
  return { headers = list }
end

-- opts: end_of_stream (headers and bodies; default false) and the ProcessingRequest fields
-- that ride along with a phase, as the proto spells them: attributes, metadata_context,
-- protocol_config, observability_mode.
local request_fields = {
  attributes = true, metadata_context = true, protocol_config = true, observability_mode = true,
}

-- Bodies also take GRPC body mode's two HttpBody flags.
local body_flags = { grpc_message_compressed = true, end_of_stream_without_message = true }

local function request(phase, msg, opts, has_eos)
  local r = { [phase] = msg }
  if opts == nil then return r end
  if type(opts) ~= "table" then
    fail("testing.%s: options must be a table, got %s", phase, type(opts))
  end
  for k, v in pairs(opts) do
    if (k == "end_of_stream" and has_eos) or (body_flags[k] and msg.body ~= nil) then
      if type(v) ~= "boolean" then
        fail("testing.%s: %s must be a boolean", phase, k)
      end
      msg[k] = v
    elseif request_fields[k] then
      r[k] = v
    else
      fail("testing.%s: unknown option '%s'", phase, tostring(k))
    end
  end
  return r
end

function M.request_headers(h, opts)
  return request("request_headers", { headers = header_map(h, "request_headers") }, opts, true)
end

function M.response_headers(h, opts)
  return request("response_headers", { headers = header_map(h, "response_headers") }, opts, true)
end

local function body(phase, data, opts)
  if data ~= nil and type(data) ~= "string" then
    fail("testing.%s: the body must be a string, got %s", phase, type(data))
  end
  return request(phase, { body = data or "" }, opts, true)
end

function M.request_body(data, opts) return body("request_body", data, opts) end
function M.response_body(data, opts) return body("response_body", data, opts) end

function M.request_trailers(h, opts)
  return request("request_trailers", { trailers = header_map(h, "request_trailers") }, opts, false)
end

function M.response_trailers(h, opts)
  return request("response_trailers", { trailers = header_map(h, "response_trailers") }, opts, false)
end

---------------------------------------------------------------------------------------------
-- Running phases.

-- A failed stream, as testing.run raises it: the call result itself, printable.
local failure_mt = {
  __tostring = function(r)
    return format("%sthe stream failed with gRPC %s (%d): %s", r.where or "",
                  r.status_name or "?", r.status, r.message)
  end,
}

-- One message on a native stream -> a result:
--   ok         false when the stream failed (the server would end it with a gRPC status)
--   outcome    "respond", "none" (nothing sent: observability mode, a held chunk) or "fail"
--   responses  the decoded ProcessingResponse tables, in order (usually exactly one)
--   raw        their bytes, as the server would send them
--   status, status_name, message   the gRPC status when the stream failed
--   logs       the server's log lines of this call
local function handle(stream, req)
  local bytes = req
  if type(req) == "table" then
    local ok, b = pcall(native.encode_request, req)
    if not ok then fail("testing: cannot encode the request: %s", tostring(b)) end
    bytes = b
  elseif type(req) ~= "string" then
    fail("testing: expects a request table (testing.request_headers{...}) or its bytes, got %s",
         type(req))
  end
  local outcome, a, b = native.handle(stream, bytes)
  last_logs = native.logs()
  local r = { ok = outcome ~= "fail", outcome = outcome, responses = {}, raw = {}, logs = last_logs }
  if outcome == "respond" then
    for i, raw in ipairs(a) do
      r.raw[i] = raw
      r.responses[i] = assert(native.decode_response(raw))
    end
  elseif outcome == "fail" then
    r.status, r.status_name, r.message = a, grpc_name[a], b
    setmetatable(r, failure_mt)
  end
  return r
end

-- resp, raw from a result, or raise the failure.
local function single(r)
  if not r.ok then
    -- "spec.lua:12: " first, so busted reports the spec's line rather than this file's
    local info = debug.getinfo(outside(), "Sl")
    r.where = info and info.currentline > 0 and format("%s:%d: ", info.short_src, info.currentline)
    error(r)
  end
  if #r.responses > 1 then
    fail("testing.run: the script sent %d responses to one message; use testing.call or " ..
         "a stream's send to see them all", #r.responses)
  end
  return r.responses[1], r.raw[1]
end

-- One message on a new stream; the result (see handle above). Never raises for the
-- script's failures.
function M.call(script, req)
  local stream <close> = native.stream(script)
  return handle(stream, req)
end

-- One message on a new stream -> the decoded ProcessingResponse and its bytes (nil when
-- nothing is sent). A failed stream raises the result (printed as "the stream failed with
-- gRPC INTERNAL (13): my.lua:3: ..."), so assert.denied / assert.grpc_error can take a
-- function that calls run.
function M.run(script, req)
  return single(M.call(script, req))
end

-- A whole stream, message after message: ctx.state persists between sends, as it does
-- between the phases of one HTTP request.
local Stream = {}
Stream.__index = Stream

function M.stream(script)
  return setmetatable({ native = native.stream(script) }, Stream)
end

-- Like testing.call, on this stream. After a failure the server ends the stream: a further
-- send raises.
function Stream:send(req)
  if self.failed then
    fail("testing: this stream already failed (%s)", tostring(self.failed))
  end
  local r = handle(self.native, req)
  if not r.ok then self.failed = r end
  return r
end

-- Like testing.run, on this stream.
function Stream:run(req)
  if self.failed then
    fail("testing: this stream already failed (%s)", tostring(self.failed))
  end
  local r = handle(self.native, req)
  if not r.ok then self.failed = r end
  return single(r)
end

function Stream:close()
  self.native:close()
end
Stream.__close = Stream.close

---------------------------------------------------------------------------------------------
-- Reading responses.

local function is_result(x)
  return type(x) == "table" and x.outcome ~= nil and x.responses ~= nil
end

-- The ProcessingResponse tables of a response or a result.
local function responses_of(x)
  if is_result(x) then return x.responses end
  return { x }
end

-- The header mutation and the CommonResponse of one ProcessingResponse, whatever its type.
local function parts(resp)
  for _, phase in ipairs { "request_headers", "response_headers", "request_body", "response_body" } do
    if resp[phase] then
      local common = resp[phase].response
      return common and common.header_mutation, common
    end
  end
  for _, phase in ipairs { "request_trailers", "response_trailers" } do
    if resp[phase] then return resp[phase].header_mutation end
  end
  if resp.immediate_response then return resp.immediate_response.headers end
end

-- The bodies of the streamed responses (FULL_DUPLEX_STREAMED) in a result or a response,
-- in order, and the end_of_stream of the last one.
function M.chunks(x)
  local out, eos = {}, nil
  for _, resp in ipairs(responses_of(x)) do
    local _, common = parts(resp)
    local s = common and common.body_mutation and common.body_mutation.streamed_response
    if s then
      out[#out + 1] = s.body
      eos = s.end_of_stream
    end
  end
  return out, eos
end

---------------------------------------------------------------------------------------------
-- luassert extensions, registered when luassert is there (always, under busted). Each takes
-- a decoded response (testing.run) or a result (testing.call, stream:send: then every
-- response it holds is searched, and a failed result fails the assertion).

local function header_value(h)
  if h.raw_value ~= nil and h.raw_value ~= "" then return h.raw_value end
  return h.value or ""
end

-- "name: value, ..." of the headers a response sets, for failure messages.
local function describe_set(x)
  local seen = {}
  for _, resp in ipairs(responses_of(x)) do
    local hm = parts(resp)
    for _, o in ipairs(hm and hm.set_headers or {}) do
      seen[#seen + 1] = format("%s: %s", o.header.key, header_value(o.header))
    end
  end
  return #seen > 0 and concat(seen, ", ") or "none"
end

-- nil, or why x cannot be inspected (a failed result).
local function unusable(x)
  if type(x) ~= "table" then return "expected a response or a result, got " .. type(x) end
  if is_result(x) and not x.ok then return tostring(x) end
end

local checks = {}

function checks.header_set(x, name, value)
  local bad = unusable(x)
  if bad then return false, bad end
  local want = format("header '%s%s'", name, value ~= nil and ": " .. tostring(value) or "")
  for _, resp in ipairs(responses_of(x)) do
    local hm = parts(resp)
    for _, o in ipairs(hm and hm.set_headers or {}) do
      if lower(o.header.key) == lower(name)
          and (value == nil or header_value(o.header) == tostring(value)) then
        return true, want .. " is set"
      end
    end
  end
  return false, format("expected %s to be set; the response sets: %s", want, describe_set(x))
end

function checks.header_removed(x, name)
  local bad = unusable(x)
  if bad then return false, bad end
  local removed = {}
  for _, resp in ipairs(responses_of(x)) do
    local hm = parts(resp)
    for _, n in ipairs(hm and hm.remove_headers or {}) do
      if lower(n) == lower(name) then return true, format("header '%s' is removed", name) end
      removed[#removed + 1] = n
    end
  end
  return false, format("expected header '%s' to be removed; the response removes: %s", name,
                       #removed > 0 and concat(removed, ", ") or "none")
end

local function body_mutations(x)
  local list = {}
  for _, resp in ipairs(responses_of(x)) do
    local _, common = parts(resp)
    if common and common.body_mutation then list[#list + 1] = common.body_mutation end
  end
  return list
end

function checks.body_replaced(x, want)
  local bad = unusable(x)
  if bad then return false, bad end
  local chunks = M.chunks(x)
  local got
  if #chunks > 0 then
    got = concat(chunks)
  else
    for _, m in ipairs(body_mutations(x)) do got = got or m.body end
  end
  if got == want then return true, format("the body is replaced with %q", want) end
  return false, format("expected the body to be replaced with %q; got %s", want,
                       got and format("%q", got) or "no body replacement")
end

function checks.body_cleared(x)
  local bad = unusable(x)
  if bad then return false, bad end
  for _, m in ipairs(body_mutations(x)) do
    if m.clear_body then return true, "the body is cleared" end
  end
  return false, "expected the body to be cleared"
end

local function status_number(code)
  if type(code) == "string" then return native.http_status(code) end
  return code
end

function checks.immediate(x, status)
  local bad = unusable(x)
  if bad then return false, bad end
  if status ~= nil and type(status) ~= "number" and not native.http_status(tostring(status)) then
    return false, "the status must be a number or an envoy.type.v3.StatusCode name " ..
      "(\"Forbidden\"); note that testing.run returns the response and its bytes: " ..
      "write assert.immediate((testing.run(...)))"
  end
  for _, resp in ipairs(responses_of(x)) do
    local im = resp.immediate_response
    if im then
      local got = status_number(im.status and im.status.code)
      if status == nil or got == status_number(status) then
        return true, format("an immediate response%s", status and " " .. tostring(status) or "")
      end
      return false, format("expected an immediate response with status %s, got %s",
                           tostring(status), tostring(got))
    end
  end
  return false, "expected an immediate response, got none"
end

-- Whether a response continues unchanged: no mutation, no immediate response, no metadata.
function checks.unchanged(x)
  local bad = unusable(x)
  if bad then return false, bad end
  for _, resp in ipairs(responses_of(x)) do
    if resp.immediate_response or resp.dynamic_metadata or resp.mode_override
        or resp.override_message_timeout then
      return false, "expected the response to continue unchanged, but it has more than that"
    end
    local hm, common = parts(resp)
    if (hm and (#(hm.set_headers or {}) > 0 or #(hm.remove_headers or {}) > 0))
        or (common and (common.body_mutation or common.trailers or common.clear_route_cache
                        or common.status ~= "CONTINUE")) then
      return false, "expected the response to continue unchanged, but it mutates the request"
    end
  end
  return true, "the response continues unchanged"
end

-- The failed result in x: a result, or what a function raised (testing.run raises it).
local function failure_of(x)
  if type(x) == "function" then
    local ok, err = pcall(x)
    if ok then return nil, "the stream did not fail" end
    if getmetatable(err) ~= failure_mt then
      return nil, "the function raised something else: " .. tostring(err)
    end
    return err
  end
  if not is_result(x) then
    return nil, "expected a function or a result of testing.call / stream:send, got " .. type(x)
  end
  if x.ok then return nil, "the stream did not fail (outcome: " .. x.outcome .. ")" end
  return x
end

function checks.grpc_error(x, status_name, pattern)
  local f, why = failure_of(x)
  local want = format("a gRPC %s failure%s", tostring(status_name),
                      pattern and format(" with a message matching %q", pattern) or "")
  if not f then return false, format("expected %s; %s", want, why) end
  local matched = pattern == nil or f.message:find(pattern, 1, true)
  if not matched then
    local ok, found = pcall(string.find, f.message, pattern)
    matched = ok and found
  end
  if f.status_name == status_name and matched then return true, tostring(f) end
  return false, format("expected %s; %s", want, tostring(f))
end

function checks.denied(x, message)
  local f, why = failure_of(x)
  local want = "a denial (gRPC PERMISSION_DENIED)" ..
               (message and format(" with message %q", message) or "")
  if not f then return false, format("expected %s; %s", want, why) end
  if f.status == M.grpc.PERMISSION_DENIED and (message == nil or f.message == message) then
    return true, tostring(f)
  end
  return false, format("expected %s; %s", want, tostring(f))
end

local has_luassert, luassert = pcall(require, "luassert")
if has_luassert then
  local say = require "say"
  say:set("assertion.callout_testing.message", "%s")
  for name, check in pairs(checks) do
    luassert:register("assertion", name, function(state, arguments)
      local ok, text = check(table.unpack(arguments, 1, arguments.n))
      -- the message says what was found; negated, it says what should not have been
      local msg = text
      if ok then msg = "expected not: " .. text end
      for i = 1, arguments.n do arguments[i] = nil end
      arguments[1], arguments.n, arguments.nofmt = msg, 1, { true }
      return ok
    end, "assertion.callout_testing.message", "assertion.callout_testing.message")
  end
end

return M
