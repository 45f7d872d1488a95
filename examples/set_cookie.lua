-- set_cookie.lua — the Python SDK's "set_cookie" example, ported: set a cookie on the
-- responses that carry a non-empty "cookie-check" header.

function on_response_headers(headers, ctx)
  local check = headers:get("cookie-check")
  if check ~= nil and check ~= "" then
    return { add = { { "Set-Cookie", "your_cookie_name=cookie_value; Max-Age=3600; Path=/" } } }
  end
  -- no cookie-check: the response goes through unchanged
end
