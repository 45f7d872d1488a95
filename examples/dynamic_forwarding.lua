-- dynamic_forwarding.lua — the Python SDK's "dynamic_forwarding" example, ported: pick the
-- backend endpoint of each request for a load balancer with dynamic forwarding.
--
-- The "ip-to-return" header may choose one of two known endpoints; anything else gets the
-- third. The choice goes back as dynamic metadata, where dynamic forwarding reads it.

local KNOWN = { ["10.1.10.2"] = true, ["10.1.10.3"] = true }
local FALLBACK = "10.1.10.4"

function on_request_headers(headers, ctx)
  local ip = headers:get("ip-to-return")
  if not KNOWN[ip] then ip = FALLBACK end
  callout.log.debug("Selected ip: %s", ip)
  return { dynamic_metadata = callout.build_dynamic_forwarding_metadata(ip, 80) }
end
