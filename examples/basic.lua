-- basic.lua — the Python SDK's "basic" example, ported: touch each phase once.
--
-- The answers never change, so they are built once, when the script loads: a handler may
-- return the same table every time (the server only reads it). This is the idiomatic Lua
-- way to keep a handler free of allocation.

-- Rewrite the authority and path, tag the request, drop "foo". The route depends on
-- :authority and :path, so ask Envoy to pick it again.
local REQUEST_HEADERS = {
  add = { { ":authority", "service-extensions.com" }, { ":path", "/" },
          { "header-request", "request" } },
  remove = { "foo" },
  clear_route_cache = true,
}
local RESPONSE_HEADERS = { add = { { "hello", "service-extensions" } } }
local REQUEST_BODY = { body = "replaced-body" }
local RESPONSE_BODY = { clear_body = true }

function on_request_headers(headers, ctx)
  return REQUEST_HEADERS
end

function on_response_headers(headers, ctx)
  return RESPONSE_HEADERS
end

function on_request_body(body, ctx)
  return REQUEST_BODY
end

function on_response_body(body, ctx)
  return RESPONSE_BODY
end
