-- json_body.lua — rewrite JSON request bodies with callout.json, leaving the rest as it was.
--
-- Needs request_body_mode: BUFFERED, so that the body arrives whole. A JSON object gets a
-- "processed_by" field (last, after the client's own) and loses its "password" field; a
-- body that is not JSON at all is refused with 400 before it reaches the backend. Other
-- content types pass untouched.
--
-- callout.json round-trips: the client's key order, [] and {}, integers past 2^53 and
-- floats come back as they were sent, so the backend sees the client's document plus the
-- one change. (lua-cjson, still loadable as require "cjson", would have turned
-- {"tools":[],"seed":12345678901234567} into {"seed":1.2345678901235e+16,"tools":{}}.)

local json = require "callout.json"

local function is_json(content_type)
  local ct = (content_type or ""):lower()
  return ct:find("application/json", 1, true) ~= nil or ct:find("+json", 1, true) ~= nil
end

function on_request_headers(headers, ctx)
  if is_json(headers:get("content-type")) then
    ctx.state.json = true
    -- the body will change size: drop the stale length (Envoy then sends the new body
    -- chunked or sets the length itself)
    return { remove = { "content-length" } }
  end
end

function on_request_body(body, ctx)
  if not ctx.state.json then return nil end
  local ok, doc = pcall(json.decode, body.body)
  if not ok then
    return { immediate = { status = 400,
                           headers = { { "content-type", "application/json" } },
                           body = json.encode { error = "request body is not valid JSON" } } }
  end
  if json.kind(doc) ~= "object" then
    return nil   -- a scalar or an array: nothing to rewrite
  end
  doc.processed_by = "luacallout"
  doc.password = nil
  return { body = json.encode(doc) }
end
