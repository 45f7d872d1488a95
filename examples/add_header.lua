-- add_header.lua — the Python SDK's "add_header" example, ported: add a header each way.

-- Tag the request. Routes may match on the new header, so ask Envoy to pick the route again.
function on_request_headers(headers, ctx)
  return { add = { { "header-request", "request" } }, clear_route_cache = true }
end

-- Tag the response and drop "foo" from it.
function on_response_headers(headers, ctx)
  return { add = { { "header-response", "response" } }, remove = { "foo" } }
end
