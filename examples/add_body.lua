-- add_body.lua — the Python SDK's "add_body" example, ported: change the bodies.
-- Bodies arrive whole with request_body_mode / response_body_mode BUFFERED.

-- Append a suffix to the request body (bytes as they came: no decoding needed).
function on_request_body(body, ctx)
  return { body = body.body .. "-added-request-body" }
end

-- Replace the response body.
function on_response_body(body, ctx)
  return { body = "new-body" }
end
