-- redirect.lua — the Python SDK's "redirect" example, ported: answer every request with a
-- permanent redirect, without reaching the backend.

function on_request_headers(headers, ctx)
  return callout.header_immediate_response(301,
    { { "Location", "http://service-extensions.com/redirect" } })
end
