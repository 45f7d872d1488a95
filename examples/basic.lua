-- basic.lua — the Python SDK's "basic" example, ported: touch each phase once.

-- Rewrite the authority and path, tag the request, drop "foo". The route depends on
-- :authority and :path, so ask Envoy to pick it again.
function on_request_headers(headers, ctx)
  return {
    add = { { ":authority", "service-extensions.com" }, { ":path", "/" },
            { "header-request", "request" } },
    remove = { "foo" },
    clear_route_cache = true,
  }
end

function on_response_headers(headers, ctx)
  return { add = { { "hello", "service-extensions" } } }
end

function on_request_body(body, ctx)
  return { body = "replaced-body" }
end

function on_response_body(body, ctx)
  return { clear_body = true }
end
