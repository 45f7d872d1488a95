-- update_header.lua — the Python SDK's "update_header" example, ported: set headers with
-- an explicit append action, OVERWRITE_IF_EXISTS_OR_ADD (replace the value when the header
-- is there, add it otherwise). See docs/lua-api.md on what each data plane honours.

function on_request_headers(headers, ctx)
  return { add = { { "header-request", "request-new-value" } },
           append_action = "OVERWRITE_IF_EXISTS_OR_ADD",
           clear_route_cache = true }   -- routes may match on the header
end

function on_response_headers(headers, ctx)
  return { add = { { "header-response", "response-new-value" } },
           append_action = "OVERWRITE_IF_EXISTS_OR_ADD" }
end
