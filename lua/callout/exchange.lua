-- callout.exchange — the JSON form of ext_proc messages (docs/testing.md, "The exchange
-- format"): what `luacallout send` and `--check --request` read and print, what `--record`
-- writes and what callout.testing.replay reads back. One module for all four, so a recorded
-- line, a hand-written request and a replayed stream mean the same bytes.
--
-- Requests are written the way callout.testing builds them (headers as a map or as
-- [name, value] pairs, bodies as text); responses are the ProcessingResponse itself in the
-- proto's field names without the fields at their default. A bytes field whose bytes are not
-- UTF-8 text is written as <field>_base64.
--
-- Runs in the binary's own tool state (src/exchange.c) and under busted, where
-- callout.native is the test module; both give the same encode/decode/base64 functions.
local json = require "callout.json"
local native = require "callout.native"

local format = string.format

local M = {}

-- The phase fields of a ProcessingRequest and the field of the message that holds headers.
local phases = {
  request_headers = "headers", response_headers = "headers",
  request_trailers = "trailers", response_trailers = "trailers",
  request_body = false, response_body = false,
}

-- The other ProcessingRequest fields a message may carry.
local request_fields = {
  attributes = true, metadata_context = true, protocol_config = true,
  observability_mode = true,
}

-- The order they are written in (pairs' order changes from one process to the next).
local phase_order = { "request_headers", "request_body", "request_trailers",
                      "response_headers", "response_body", "response_trailers" }
local field_order = { "attributes", "metadata_context", "protocol_config", "observability_mode" }

-- The proto's bytes fields (HttpBody.body, HeaderValue.raw_value, Any.value): the only keys
-- that take the _base64 form.
local bytes_fields = { body = true, raw_value = true, value = true }

-- Values below these keys are google.protobuf.Struct maps whose keys are the user's: copied
-- as they are, never read for _base64.
local struct_fields = { attributes = true, metadata_context = true, dynamic_metadata = true }

M.status_names = {
  [0] = "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
  "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
  "UNAUTHENTICATED",
}

M.redacted = "[redacted]"

local function fail(where, fmt, ...)
  error(format("%s: " .. fmt, where, ...), 0)
end

-- Text is UTF-8 without control characters other than tab, CR and LF: anything else reads
-- better (and as exactly) as base64.
local function is_text(s)
  return utf8.len(s) ~= nil and not s:find("[%z\1-\8\11\12\14-\31\127]")
end

local function is_array(v)
  if json.kind(v) == "array" then return true end
  if json.kind(v) == "object" then return false end
  return type(v) == "table" and (next(v) == nil or v[1] ~= nil)
end

---------------------------------------------------------------------------------------------
-- JSON value -> the table pbreflect reads (plain tables, bytes decoded).

local function from_json(v, where)
  if type(v) ~= "table" then return v end
  local out = {}
  if is_array(v) then
    for i, e in ipairs(v) do out[i] = from_json(e, format("%s[%d]", where, i)) end
    return out
  end
  for k, e in pairs(v) do
    if e == json.null then
      -- JSON null: the field is absent
    elseif struct_fields[k] then
      out[k] = e
    elseif type(k) == "string" and k:sub(-7) == "_base64" and bytes_fields[k:sub(1, -8)] then
      local name = k:sub(1, -8)
      if v[name] ~= nil then fail(where, "both '%s' and '%s'", name, k) end
      if type(e) ~= "string" then fail(where, "'%s' must be a string of base64", k) end
      local bytes, why = native.base64_decode(e)
      if not bytes then fail(where .. "." .. k, "%s", why) end
      out[name] = bytes
    else
      out[k] = from_json(e, where .. "." .. tostring(k))
    end
  end
  return out
end

local function header_value(v, where, name)
  if type(v) == "string" then return v end
  if math.type(v) == "integer" then return tostring(v) end
  fail(where, "the value of header '%s' must be a string, got %s", tostring(name),
       v == json.null and "null" or type(v))
end

-- headers as a map, as [name, value] pairs, as HeaderValue objects, or the proto's own
-- {headers = [...]} -> {headers = {HeaderValue...}}
local function header_map(h, where)
  if type(h) ~= "table" then fail(where, "headers must be an object or a list, got %s", type(h)) end
  if not is_array(h) and is_array(h.headers) and next(h, next(h)) == nil and
     type(h.headers[1]) ~= "string" then
    h = h.headers
  end
  local list = {}
  if is_array(h) then
    for i, e in ipairs(h) do
      local at = format("%s[%d]", where, i)
      if is_array(e) then
        if #e ~= 2 or type(e[1]) ~= "string" then fail(at, "a header is a [name, value] pair") end
        list[i] = { key = e[1], raw_value = header_value(e[2], at, e[1]) }
      elseif type(e) == "table" then
        local hv = from_json(e, at)
        if type(hv.key) ~= "string" then fail(at, "a header object needs a string 'key'") end
        list[i] = hv
      else
        fail(at, "a header is a [name, value] pair or a {key, raw_value} object")
      end
    end
    return { headers = list }
  end
  local names = {}
  for k in pairs(h) do names[#names + 1] = k end
  table.sort(names)
  for _, k in ipairs(names) do
    local v = h[k]
    if is_array(v) then
      for _, each in ipairs(v) do
        list[#list + 1] = { key = k, raw_value = header_value(each, where, k) }
      end
    else
      list[#list + 1] = { key = k, raw_value = header_value(v, where, k) }
    end
  end
  return { headers = list }
end

-- One request message of the exchange format -> the ProcessingRequest table pbreflect
-- encodes, or the bytes of a {raw_base64 = ...} message.
function M.request(msg, where)
  where = where or "request"
  if type(msg) ~= "table" or is_array(msg) then
    fail(where, "a request message is a JSON object, got %s", is_array(msg) and "an array" or type(msg))
  end
  if msg.raw_base64 ~= nil then
    if next(msg, next(msg)) ~= nil or next(msg) ~= "raw_base64" then
      fail(where, "'raw_base64' stands alone: it is the whole message")
    end
    local bytes, why = native.base64_decode(tostring(msg.raw_base64))
    if not bytes then fail(where .. ".raw_base64", "%s", why) end
    return bytes
  end
  local out, phase = {}, nil
  for k, v in pairs(msg) do
    if phases[k] ~= nil then
      if phase then fail(where, "two phases in one message: '%s' and '%s'", phase, k) end
      phase = k
    elseif not request_fields[k] then
      fail(where, "unknown field '%s' (a phase: request_headers, request_body, " ..
           "request_trailers, response_headers, response_body, response_trailers; or " ..
           "attributes, metadata_context, protocol_config, observability_mode)", tostring(k))
    elseif v ~= json.null then
      out[k] = struct_fields[k] and v or from_json(v, where .. "." .. k)
    end
  end
  if not phase then fail(where, "no phase (request_headers, request_body, ...)") end
  local body = msg[phase]
  if body == json.null then body = {} end
  if type(body) ~= "table" or is_array(body) and next(body) ~= nil then
    fail(where .. "." .. phase, "must be an object")
  end
  local field, rest = phases[phase], {}
  for k, v in pairs(body) do
    if k ~= field then rest[k] = v end
  end
  local m = from_json(rest, where .. "." .. phase)
  if field and body[field] ~= nil and body[field] ~= json.null then
    m[field] = header_map(body[field], format("%s.%s.%s", where, phase, field))
  end
  out[phase] = m
  return out
end

function M.encode_request(msg, where)
  local r = M.request(msg, where)
  if type(r) == "string" then return r end
  local ok, bytes = pcall(native.encode_request, r)
  if not ok then fail(where or "request", "%s", tostring(bytes)) end
  return bytes
end

---------------------------------------------------------------------------------------------
-- Decoded messages -> JSON values.

-- Replaces the value of every HeaderValue whose key is in `redact` (a set of lower-case
-- names), wherever it is in t.
local function redact_headers(t, redact)
  if type(t) ~= "table" then return end
  if type(t.key) == "string" and redact[t.key:lower()] then
    if t.raw_value ~= nil then t.raw_value = M.redacted end
    if t.value ~= nil then t.value = M.redacted end
  end
  for k, v in pairs(t) do
    if not struct_fields[k] then redact_headers(v, redact) end
  end
end

-- A decoded (sparse) message -> a JSON value: bytes that are not text become <field>_base64.
local function to_json(v)
  if type(v) ~= "table" then return v end
  local out = {}
  for k, e in pairs(v) do
    if struct_fields[k] then
      out[k] = e
    elseif type(e) == "string" and bytes_fields[k] and not is_text(e) then
      out[k .. "_base64"] = native.base64_encode(e)
    else
      out[k] = to_json(e)
    end
  end
  if next(out) == nil then return json.object() end
  return out
end

-- A ProcessingResponse's bytes -> its JSON value (sparse, _base64 for binary bytes).
function M.response_json(bytes, redact)
  local t, why = native.decode_response(bytes, true)
  if not t then error(why, 0) end
  if redact and next(redact) then redact_headers(t, redact) end
  return to_json(t)
end

local function friendly_headers(map, redact)
  local list = json.array()
  for i, hv in ipairs(map and map.headers or {}) do
    local key, raw, value = hv.key or "", hv.raw_value, hv.value
    if redact and redact[key:lower()] then
      raw = raw and M.redacted
      value = value and M.redacted
    end
    if value == nil and (raw == nil or is_text(raw)) then
      list[i] = json.array { key, raw or "" }
    else
      local o = json.object()
      o.key = key
      if value ~= nil then o.value = value end
      if raw ~= nil then
        if is_text(raw) then o.raw_value = raw else o.raw_value_base64 = native.base64_encode(raw) end
      end
      list[i] = o
    end
  end
  return list
end

local function raw(bytes)
  local o = json.object()
  o.raw_base64 = native.base64_encode(bytes)
  return o
end

-- A ProcessingRequest's bytes -> its message in the exchange format, headers as pairs;
-- bytes that do not decode, that set no phase, or whose string fields are not UTF-8 (which
-- JSON cannot carry and the server refuses) -> {raw_base64 = ...}: sent again, they are the
-- same bytes. Fields the protos in proto/ do not know are not kept.
function M.request_json(bytes, redact)
  local t = native.decode_request(bytes, true)
  local phase
  for p in pairs(phases) do phase = phase or t and t[p] end
  if not phase then return raw(bytes) end    -- no phase: not a message the format can write
  local v = M.request_value(t, redact)
  if not pcall(json.encode, v) then return raw(bytes) end
  return v
end

-- The friendly value of a decoded (sparse) ProcessingRequest table.
function M.request_value(t, redact)
  local out = json.object()
  for _, phase in ipairs(phase_order) do
    local field, m = phases[phase], t[phase]
    if m then
      local o = json.object()
      if field then o[field] = friendly_headers(m[field], redact) end
      local rest, keys = to_json(m), {}
      for k in pairs(rest) do
        if k ~= field then keys[#keys + 1] = k end
      end
      table.sort(keys)
      for _, k in ipairs(keys) do o[k] = rest[k] end
      out[phase] = o
    end
  end
  for _, k in ipairs(field_order) do
    if t[k] ~= nil then out[k] = to_json(t[k]) end
  end
  return out
end

function M.status(code, message)
  local s = json.object()
  s.code = code
  s.name = M.status_names[code] or "UNKNOWN"
  -- a status message is bytes on the wire (grpc-message): one that is not UTF-8 (a script's
  -- error quoting a client's header, a hostile server) is kept, as base64, not dropped
  message = message or ""
  if utf8.len(message) then s.message = message else s.message_base64 = native.base64_encode(message) end
  return s
end

-- A finished stream (bytes as received and sent) -> the value of its record line.
--   r = { requests = {bytes...}, responses = {{bytes...}...}, status = code, message =,
--         time =, script =, generation =, sha256 =, stream = }
function M.record(r, redact)
  local rec = json.object()
  rec.version = 1
  rec.time = r.time
  rec.script = r.script
  rec.generation = r.generation
  rec.sha256 = r.sha256
  rec.stream = r.stream
  rec.requests = json.array()
  rec.responses = json.array()
  for i, bytes in ipairs(r.requests) do
    rec.requests[i] = M.request_json(bytes, redact)
    local group = json.array()
    for j, resp in ipairs(r.responses[i] or {}) do group[j] = M.response_json(resp, redact) end
    rec.responses[i] = group
  end
  rec.status = M.status(r.status, r.message)
  return rec
end

---------------------------------------------------------------------------------------------
-- Files.

-- The streams in a file's text: a JSON array of request messages (one stream), JSON lines
-- of request messages (one stream), or record lines (one stream each).
--   -> { {line = n, requests = {msg...}, record = the line's object or nil}, ... }
function M.streams(text, name)
  name = name or "input"
  local first = text:match("^%s*(%S)")
  if not first then fail(name, "no request in the file") end
  if first == "[" then
    local ok, v = pcall(json.decode, text)
    if not ok then fail(name, "%s", (tostring(v):gsub("^callout%.json: ", ""))) end
    if not is_array(v) then fail(name, "expected a JSON array of request messages") end
    return { { line = 1, requests = v } }
  end
  local streams, lone = {}, nil
  local n = 0
  for line in (text:sub(-1) == "\n" and text or text .. "\n"):gmatch("([^\n]*)\n") do
    n = n + 1
    if line:match("%S") then
      local ok, v = pcall(json.decode, line)
      if not ok then
        -- "file:3:27: what": the line is the file's, the column the decoder's
        local why = tostring(v):gsub("^callout%.json: ", "")
        local what, col = why:match("^(.-) at line 1, column (%d+)$")
        fail(format("%s:%d%s", name, n, col and ":" .. col or ""), "%s", what or why)
      end
      if type(v) ~= "table" or is_array(v) then
        fail(format("%s:%d", name, n), "expected a JSON object on each line")
      end
      if v.requests ~= nil then
        if not is_array(v.requests) then
          fail(format("%s:%d", name, n), "'requests' must be a list of request messages")
        end
        streams[#streams + 1] = { line = n, requests = v.requests, record = v }
      else
        if not lone then
          lone = { line = n, requests = {} }
          streams[#streams + 1] = lone
        end
        lone.requests[#lone.requests + 1] = v
      end
    end
  end
  if lone and #streams > 1 then
    fail(name, "record lines and lone request messages mixed in one file")
  end
  return streams
end

-- The bytes of every request of a stream from M.streams; errors name file:line.
function M.stream_bytes(stream, name)
  local out = {}
  for i, msg in ipairs(stream.requests) do
    out[i] = M.encode_request(msg, format("%s:%d: request %d", name or "input", stream.line, i))
  end
  return out
end

---------------------------------------------------------------------------------------------
-- Comparing.

local function show(v)
  if v == nil then return "nothing" end
  local ok, s = pcall(json.encode, v)
  s = ok and s or tostring(v)
  if #s > 200 then s = s:sub(1, 197) .. "..." end
  return s
end

-- nil when the two JSON values are equal, else "path: expected X, got Y" for the first
-- difference (arrays by index, objects by key, the expected value's keys first).
function M.diff(expected, got, path)
  path = path or "value"
  if type(expected) ~= "table" or type(got) ~= "table" then
    if expected == got then return nil end
    return format("%s: expected %s, got %s", path, show(expected), show(got))
  end
  local ea, ga = is_array(expected), is_array(got)
  if ea ~= ga and next(expected) ~= nil and next(got) ~= nil then
    return format("%s: expected %s, got %s", path, show(expected), show(got))
  end
  if (ea and next(expected) ~= nil) or (ga and next(got) ~= nil) or (ea and ga) then
    for i = 1, math.max(#expected, #got) do
      local d = M.diff(expected[i], got[i], format("%s[%d]", path, i))
      if d then return d end
    end
    return nil
  end
  -- objects: keys in a stable order, so that one difference reads the same on every run
  local keys, seen = {}, {}
  for _, t in ipairs({ expected, got }) do
    for k in pairs(t) do
      if not seen[k] then seen[k] = true; keys[#keys + 1] = k end
    end
  end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  for _, k in ipairs(keys) do
    if expected[k] == nil then
      return format("%s.%s: expected nothing, got %s", path, tostring(k), show(got[k]))
    end
    local d = M.diff(expected[k], got[k], path .. "." .. tostring(k))
    if d then return d end
  end
  return nil
end

return M
