-- json_body.lua — rewrite JSON request bodies with lua-cjson (Debian's lua-cjson).
--
-- Needs request_body_mode: BUFFERED, so that the body arrives whole. A JSON object gets a
-- "processed_by" field and loses its "password" field; a body that is not JSON at all is
-- refused with 400 before it reaches the backend. Other content types pass untouched.
--
-- lua-cjson reads every number as a double and writes it with 14 significant digits, and
-- writes an empty array as {}: good for most API payloads, not for every JSON document.

local cjson = require "cjson"

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
  local ok, doc = pcall(cjson.decode, body.body)
  if not ok then
    return { immediate = { status = 400,
                           headers = { { "content-type", "application/json" } },
                           body = cjson.encode({ error = "request body is not valid JSON" }) } }
  end
  if type(doc) ~= "table" or doc[1] ~= nil then
    return nil   -- a scalar or an array: nothing to rewrite
  end
  doc.processed_by = "luacallout"
  doc.password = nil
  return { body = cjson.encode(doc) }
end
