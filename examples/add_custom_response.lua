-- add_custom_response.lua — the Python SDK's "add_custom_response" example, ported: mock
-- responses on request, refuse bad input.
--
-- Each phase first refuses the stream (PERMISSION_DENIED, "Callout DENIED.") when it holds
-- a "bad-header" header or a body containing "bad-body", then answers with a mock when a
-- "mock" header or a body containing "mock" asks for one, and otherwise makes its usual
-- change.

local function mock_headers()
  return { add = { { "Mock-Response", "Mocked-Value" } } }
end

local function mock_body()
  return { body = "Mocked-Body" }
end

local function check_headers(headers)
  if callout.headers_contain(headers, "bad-header") then
    callout.deny_callout()   -- raises: the stream ends here
  end
  return callout.headers_contain(headers, "mock")
end

local function check_body(body)
  if callout.body_contains(body, "bad-body") then
    callout.deny_callout()
  end
  return callout.body_contains(body, "mock")
end

function on_request_headers(headers, ctx)
  if check_headers(headers) then return mock_headers() end
  return { add = { { "header-request", "request" } }, remove = { "foo" },
           clear_route_cache = true }
end

function on_response_headers(headers, ctx)
  if check_headers(headers) then return mock_headers() end
  return { add = { { "header-response", "response" } } }
end

function on_request_body(body, ctx)
  if check_body(body) then return mock_body() end
  return { body = "replaced-body" }
end

function on_response_body(body, ctx)
  if check_body(body) then return mock_body() end
  -- otherwise the response body goes through unchanged
end
