-- ab_routing.lua — A/B routing from a cookie: the same visitor always gets the same
-- variant, and Envoy routes on it.
--
-- The "ab_session" cookie is hashed (32-bit FNV-1a) into one of 100 buckets; the first
-- PERCENT_B buckets get variant "b", the rest "a", and so do visitors without the cookie.
-- The choice goes in "x-ab-variant" (overwriting one the client sent) and the route cache
-- is cleared, so a route matching on that header picks the backend:
--
--   routes:
--   - match: { prefix: "/", headers: [{ name: x-ab-variant, string_match: { exact: b } }] }
--     route: { cluster: backend_b }
--   - match: { prefix: "/" }
--     route: { cluster: backend_a }

local COOKIE = "ab_session"
local HEADER = "x-ab-variant"
local PERCENT_B = 50

local function fnv1a32(s)
  local h = 2166136261
  for i = 1, #s do
    h = ((h ~ s:byte(i)) * 16777619) & 0xffffffff
  end
  return h
end

-- The value of cookie `name` in the request's Cookie header(s), or nil.
local function cookie(headers, name)
  for _, line in ipairs(headers:get_all("cookie")) do
    for pair in line:gmatch("[^;]+") do
      local k, v = pair:match("^%s*(.-)%s*=%s*(.-)%s*$")
      if k == name then return v end
    end
  end
end

function on_request_headers(headers, ctx)
  local session = cookie(headers, COOKIE)
  local variant = "a"
  if session ~= nil and session ~= "" and fnv1a32(session) % 100 < PERCENT_B then
    variant = "b"
  end
  return { add = { { HEADER, variant } }, clear_route_cache = true }
end
