-- normalize_header.lua — the Python SDK's "normalize_header" example, ported: tell the
-- backend which kind of device asked, from the host name, in "client-device-type".

local function device_type(host)
  -- plain substring search (find's 4th argument): the dots are not patterns
  if host:find("m.example.com", 1, true) then return "mobile" end
  if host:find("t.example.com", 1, true) then return "tablet" end
  return "desktop"
end

function on_request_headers(headers, ctx)
  local host = headers:get(":authority")
  if host == nil or host == "" then
    return nil   -- nothing to go by: unchanged
  end
  -- routes can shard on the new header, so have Envoy pick the route again
  return { add = { { "client-device-type", device_type(host) } }, clear_route_cache = true }
end
