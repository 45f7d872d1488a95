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
-- testing.replay turns the lines a server wrote with --record into cases that require the
-- same answers again (see "Replaying recorded traffic" below).
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

---------------------------------------------------------------------------------------------
-- Replaying recorded traffic (docs/testing.md, "Replaying recorded traffic"): the lines a
-- server wrote with --record become cases that send each stream's requests again, on one
-- stream, and require the very answers and the very failure the server gave. Conversions
-- are callout.exchange's, the format's one implementation; nothing here needs busted.

local exchange   -- callout.exchange, loaded on the first replay

local function xchg()
  exchange = exchange or require "callout.exchange"
  return exchange
end

local REDACTED = "[redacted]"
local NOT_COMPARED = "[not compared]"

-- Values below these keys are Struct maps whose keys are the user's, never HeaderValues.
local struct_fields = { attributes = true, metadata_context = true, dynamic_metadata = true }

-- A copy of a JSON value in which every HeaderValue whose key (any case) is in `names`
-- carries `NOT_COMPARED` instead of its value: such a header is still compared by its
-- presence, its place, its append action, never by its value.
local function blank_values(v, names)
  if type(v) ~= "table" then return v end
  local out = {}
  for k, e in pairs(v) do out[k] = struct_fields[k] and e or blank_values(e, names) end
  if type(out.key) == "string" and names[lower(out.key)] then
    for _, f in ipairs { "raw_value", "value" } do
      if out[f] ~= nil or out[f .. "_base64"] ~= nil then
        out[f], out[f .. "_base64"] = NOT_COMPARED, nil
      end
    end
  end
  return out
end

-- The header names whose values the record shows as "[redacted]" (--record_redact applies
-- by name to requests and answers alike, so a name redacted anywhere was redacted
-- everywhere in the line), added to `names`.
local function redacted_names(v, names)
  if type(v) ~= "table" then return end
  if type(v[1]) == "string" and v[2] == REDACTED and v[3] == nil then
    names[lower(v[1])] = true
  elseif type(v.key) == "string" and (v.raw_value == REDACTED or v.value == REDACTED) then
    names[lower(v.key)] = true
  end
  for k, e in pairs(v) do
    if not struct_fields[k] then redacted_names(e, names) end
  end
end

-- The phase of a request message, for messages: "request_headers", ..., or "raw".
local function phase_of(msg)
  if type(msg) ~= "table" then return "?" end
  if msg.raw_base64 ~= nil then return "raw" end
  for _, p in ipairs { "request_headers", "request_body", "request_trailers",
                       "response_headers", "response_body", "response_trailers" } do
    if msg[p] ~= nil then return p end
  end
  return "?"
end

-- The value of header `name` in the first request_headers message of a record, whatever
-- shape the headers take (pairs, HeaderValue objects, a map, {headers = [...]}).
local function request_header(rec, name)
  for _, msg in ipairs(type(rec.requests) == "table" and rec.requests or {}) do
    local h = type(msg) == "table" and type(msg.request_headers) == "table" and
              msg.request_headers.headers
    if type(h) == "table" then
      if type(h.headers) == "table" then h = h.headers end
      if type(h[name]) == "string" then return h[name] end
      for _, e in ipairs(h) do
        if type(e) == "table" then
          if e[1] == name and type(e[2]) == "string" then return e[2] end
          if e.key == name and type(e.raw_value or e.value) == "string" then
            return e.raw_value or e.value
          end
        end
      end
      return nil
    end
  end
end

-- Whether the record says the server failed the stream because of its last request, and
-- with which code. record.c writes the status the client saw: the server's own code and
-- message when it ended the stream, CANCELLED without a message when the client, its
-- deadline or the transport did. A failure the script caused (dispatch: a script error,
-- a budget, a denial, a refused message) leaves its request with no answers and ends the
-- stream right after it. So: a non-OK status other than CANCELLED, with no answers to the
-- last request, is a failure at that request, to be reproduced; except the server's idle
-- timeout (DEADLINE_EXCEEDED "no message for N ms", which the client's silence caused).
-- A non-OK status after answers (the client did not read them: RESOURCE_EXHAUSTED) is the
-- transport's, not the script's: the replay must answer, and the status is not compared.
local function expected_failure(rec)
  local code, message = rec.status.code, rec.status.message or ""
  if code == M.grpc.OK or code == M.grpc.CANCELLED then return nil end
  if code == M.grpc.DEADLINE_EXCEEDED and message:find("^no message for ") then return nil end
  local n = #rec.requests
  if n == 0 or #rec.responses[n] > 0 then return nil end
  return n, code
end

local function status_text(code, message)
  local s = format("gRPC %s (%d)", grpc_name[code] or "?", code)
  if message and message ~= "" then
    if #message > 300 then message = message:sub(1, 297) .. "..." end
    s = s .. ": " .. message
  end
  return s
end

local function plural(n, what)
  return format("%d %s%s", n, what, n == 1 and "" or "s")
end

-- A record line that replay cannot use: raised as "why" (replay adds file:line).
local function check_record(rec)
  local x = xchg()
  if type(rec) ~= "table" then error("a record line is a JSON object", 0) end
  if rec.version ~= 1 then
    error(format("unknown record version %s (this kit reads version 1)",
                 rec.version == nil and "(none)" or tostring(rec.version)), 0)
  end
  local function list(v) return type(v) == "table" and (next(v) == nil or v[1] ~= nil) end
  if not list(rec.requests) then error("the record has no 'requests' list", 0) end
  if #rec.requests == 0 then
    error("the record holds no request: nothing to replay (leave it out with opts.filter)", 0)
  end
  if not list(rec.responses) then error("the record has no 'responses' list", 0) end
  if #rec.responses ~= #rec.requests then
    error(format("the record has %s but %s: every request needs its list of answers",
                 plural(#rec.requests, "request"), plural(#rec.responses, "list") .. " of answers"), 0)
  end
  for i, group in ipairs(rec.responses) do
    if not list(group) then error(format("responses[%d] is not a list of answers", i), 0) end
  end
  if type(rec.status) ~= "table" or math.type(rec.status.code) ~= "integer" then
    error("the record has no status code", 0)
  end
  return x
end

local replay_options = { ignore_headers = true, filter = true, name = true, redact = true }

local function check_options(opts, fname)
  if opts == nil then return {} end
  if type(opts) ~= "table" then fail("testing.%s: options must be a table, got %s", fname, type(opts)) end
  for k, v in pairs(opts) do
    if not replay_options[k] then fail("testing.%s: unknown option '%s'", fname, tostring(k)) end
    if (k == "filter" or k == "name") and type(v) ~= "function" then
      fail("testing.%s: %s must be a function, got %s", fname, k, type(v))
    end
    if (k == "ignore_headers" or k == "redact") and type(v) ~= "table" then
      fail("testing.%s: %s must be a list of header names, got %s", fname, k, type(v))
    end
  end
  return opts
end

local function name_set(list, into)
  for _, n in ipairs(list or {}) do into[lower(tostring(n))] = true end
  return into
end

-- Replays one record (a decoded record line) through `script` on one stream: nil when the
-- script answers as the record says, else what differs first:
--   "request 2 (request_headers): responses[1].request_headers.response...: expected "a", got "b""
-- A record replay cannot use (unknown version, responses missing) raises.
function M.replay_stream(record, script, opts)
  if type(script) == "string" then script = M.load(script) end
  opts = check_options(opts, "replay_stream")
  local x = check_record(record)
  -- a redacted value cannot be compared: the script saw "[redacted]", not the original
  local blank = name_set(opts.redact, {})
  redacted_names(record, blank)
  name_set(opts.ignore_headers, blank)
  local bytes = {}
  for i, msg in ipairs(record.requests) do
    local ok, b = pcall(x.encode_request, msg, format("request %d", i))
    if not ok then error(tostring(b), 0) end
    bytes[i] = b
  end
  local fail_at, fail_code = expected_failure(record)
  local stream <close> = native.stream(script)
  for i, b in ipairs(bytes) do
    local where = format("request %d (%s)", i, phase_of(record.requests[i]))
    local outcome, a, msg = native.handle(stream, b)
    last_logs = native.logs()
    if outcome == "fail" then
      if i == fail_at and a == fail_code then return nil end
      if i == fail_at then
        return format("%s: expected the stream to fail with %s, it failed with %s", where,
                      status_text(fail_code, record.status.message), status_text(a, msg))
      end
      return format("%s: the stream failed with %s; recorded: %s", where, status_text(a, msg),
                    #record.responses[i] > 0 and plural(#record.responses[i], "answer") or
                    format("no answer, then %s", status_text(record.status.code, record.status.message)))
    end
    if i == fail_at then break end   -- it answered where the server failed: said below
    local got = {}
    for j, r in ipairs(outcome == "respond" and a or {}) do
      got[j] = blank_values(x.response_json(r), blank)
    end
    local want = blank_values(record.responses[i], blank)
    local d
    for j = 1, math.max(#want, #got) do
      d = d or x.diff(want[j], got[j], format("responses[%d]", j))
    end
    if #want ~= #got then
      return format("%s: expected %s, got %d; %s", where, plural(#want, "answer"), #got, d)
    end
    if d then return format("%s: %s", where, d) end
  end
  if fail_at then
    return format("request %d (%s): expected the stream to fail with %s; the script answered",
                  fail_at, phase_of(record.requests[fail_at]),
                  status_text(fail_code, record.status.message))
  end
  return nil
end

-- The files of `path`: itself, or the *.jsonl files of a folder, sorted by name.
-- nil, why when there is no such file or folder.
local function record_files(path)
  local ok, lfs = pcall(require, "lfs")
  if ok then
    local attr = lfs.attributes(path)
    if not attr then return nil, "no such file or folder" end
    if attr.mode ~= "directory" then return { path } end
    local out = {}
    path = path:gsub("(.)/+$", "%1")   -- "rec/" names "rec/a.jsonl", not "rec//a.jsonl"
    for name in lfs.dir(path) do
      if name:find("%.jsonl$") and lfs.attributes(path .. "/" .. name, "mode") == "file" then
        out[#out + 1] = path .. "/" .. name
      end
    end
    table.sort(out)
    return out
  end
  -- without LuaFileSystem (plain Lua, outside busted): the shell tells
  path = path:gsub("(.)/+$", "%1")
  local quoted = "'" .. path:gsub("'", "'\\''") .. "'"
  if not os.execute("test -e " .. quoted) then return nil, "no such file or folder" end
  if not os.execute("test -d " .. quoted) then return { path } end
  local p = io.popen("ls -1 -- " .. quoted .. " 2>/dev/null")
  local out = {}
  for name in p:lines() do
    if name:find("%.jsonl$") then out[#out + 1] = path .. "/" .. name end
  end
  p:close()
  table.sort(out)
  return out
end

-- The cases of the record files: { name = "...", run = function() -> nil | "file:line: why" }.
-- What cannot be read is a case too, one that fails: a bad line does not hide the others.
local function replay_cases(path, script, opts)
  local cases = {}
  local function broken(name, why, file, line)
    cases[#cases + 1] = { name = name, run = function() return why end, file = file, line = line }
  end
  local files, why = record_files(path)
  if not files then
    broken(path, format("%s: %s", path, why))
    return cases
  end
  local decode = native.json.decode
  local streams = 0
  for _, file in ipairs(files) do
    local f, err = io.open(file, "rb")
    local text = f and f:read("a")
    if f then f:close() end
    if not text then
      broken(file, format("%s: %s", file, err or "cannot read"), file)
    else
      local n = 0
      for line in (text:sub(-1) == "\n" and text or text .. "\n"):gmatch("([^\n]*)\n") do
        n = n + 1
        line = line:gsub("\r$", "")
        local at = format("%s:%d", file, n)
        if line:match("%S") then
          local ok, rec = pcall(decode, line)
          if not ok then
            local what = tostring(rec):gsub("^callout%.json: ", "")
            local w, col = what:match("^(.-) at line 1, column (%d+)$")
            broken(at, format("%s%s: not a JSON line: %s", at, col and ":" .. col or "", w or what),
                   file, n)
          elseif type(rec) ~= "table" or rec.requests == nil then
            broken(at, format("%s: not a record line (no 'requests')", at), file, n)
          elseif opts.filter == nil or opts.filter(rec) then
            streams = streams + 1
            local name
            if opts.name then
              name = tostring(opts.name(rec))
            else
              local method, p = request_header(rec, ":method"), request_header(rec, ":path")
              name = format("%s stream %s%s%s", at, tostring(rec.stream or "?"),
                            method and " " .. method or "", p and " " .. p or "")
            end
            cases[#cases + 1] = { name = name, file = file, line = n, run = function()
              local ok2, d = pcall(M.replay_stream, rec, script, opts)
              if not ok2 then return format("%s: %s", at, tostring(d)) end
              return d and format("%s: %s", at, d)
            end }
          end
        end
      end
    end
  end
  if streams == 0 and #cases == 0 then
    broken(path, format("%s: no streams to replay%s", path,
                        opts.filter and " (none passed opts.filter)" or
                        #files == 0 and " (no *.jsonl file in the folder)" or ""))
  end
  return cases
end

-- busted's `it` and `assert` live in the environment busted gives each spec file, not in
-- _G: find them on the stack — in the _ENV of a spec function that called us, or, since a
-- describe block that names no global has no _ENV at all, in the `api` table of the busted
-- instance whose functions are running the block.
local function busted_api(value)
  local ok, it, describe = pcall(function() return value.it, value.describe end)
  return ok and type(it) == "function" and type(describe) == "function"
end

local function busted_env()
  if type(rawget(_G, "it")) == "function" then return _G end
  for level = 2, 200 do
    local info = debug.getinfo(level, "f")
    if not info then break end
    for i = 1, 255 do
      local name, value = debug.getupvalue(info.func, i)
      if not name then break end
      if name == "_ENV" and type(value) == "table" and value ~= _G and busted_api(value) then
        return value
      end
      if name == "busted" and type(value) == "table" and type(rawget(value, "api")) == "table"
         and busted_api(value.api) then
        return value.api
      end
    end
  end
  -- under busted, running the cases here would make a describe block green with no case
  -- at all: refuse instead
  if package.loaded["busted.core"] then
    fail("testing.replay: cannot find busted's `it` from here; call it at a spec file's top level or in a describe block")
  end
end

-- A failure busted reports as a failure (not an error), its text as it is: busted's
-- assert raises through busted.fail, which adds no position to a message with __tostring.
local message_mt = { __tostring = function(m) return m[1] end }

-- Defines case c with busted's `it`, from a chunk compiled under the name of c.file at
-- c.line, the record's line (or the spec's, for a file that cannot be read): busted then
-- reports "Failure -> recorded.jsonl @ 3", and puts that place before a message that
-- names none.
local function busted_define(env, c)
  local chunk = string.rep("\n", (c.line or 1) - 1) .. "local it, name, run, assert, wrap = ... " ..
    "it(name, function() local why = run() if why then assert(false, wrap(why)) end end)"
  local define = assert(load(chunk, "@" .. c.file, "t"))
  define(env.it, c.name, c.run, env.assert, function(why) return setmetatable({ why }, message_mt) end)
end

-- The cases of a replay, each placed at its record's line (or the caller's).
local function replay_prepare(path, script, opts, fname)
  if type(path) ~= "string" then fail("testing.%s: expects a file or folder path, got %s", fname, type(path)) end
  if type(script) == "string" then
    script = M.load(script)
  elseif getmetatable(script) == nil or not tostring(script):find("^callout script") then
    fail("testing.%s: expects a script (testing.load) or its path, got %s", fname, type(script))
  end
  opts = check_options(opts, fname)
  local info = debug.getinfo(outside(), "Sl")
  local here = { file = info.source:gsub("^[@=]", ""), line = math.max(info.currentline, 1) }
  local cases = replay_cases(path, script, opts)
  for _, c in ipairs(cases) do
    if not c.line then c.file, c.line = here.file, here.line end
  end
  return cases
end

local function run_cases(cases)
  local failures = {}
  for _, c in ipairs(cases) do
    local why = c.run()
    if why then failures[#failures + 1] = why end
  end
  return #failures == 0, failures, #cases
end

-- testing.replay_all(path, script [, opts]): runs the cases here, anywhere, and returns
-- ok, failures ("file:line: why", in order), the number of cases. Never raises for a
-- difference: for specs about the replay itself, and for plain Lua.
function M.replay_all(path, script, opts)
  return run_cases(replay_prepare(path, script, opts, "replay_all"))
end

-- testing.replay(path, script [, opts]): at a spec file's top level or in a describe block,
-- one `it` per record line (and one failing `it` per line that cannot be read), returning
-- how many it defined; inside a running `it`, runs them and fails that case when one
-- differs (a result nobody reads would leave it green); in plain Lua, as replay_all.
function M.replay(path, script, opts)
  local cases = replay_prepare(path, script, opts, "replay")
  local env = busted_env()
  if not env then return run_cases(cases) end
  for i, c in ipairs(cases) do
    local ok, err = pcall(busted_define, env, c)
    if not ok then
      if i == 1 and tostring(err):find("not supported inside current context", 1, true) then
        local green, failures, n = run_cases(cases)
        if not green then
          error(setmetatable({ format("testing.replay: %d of %d streams differ:\n%s",
                                      #failures, n, table.concat(failures, "\n")) }, message_mt), 0)
        end
        return n
      end
      error(err, 0)
    end
  end
  return #cases
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
