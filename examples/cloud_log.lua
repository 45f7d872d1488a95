-- cloud_log.lua — the Python SDK's "cloud_log" example, ported: gate requests on a header
-- and a body marker, and log every phase as one JSON object.
--
-- The Python example sends its logs to Google Cloud Logging. Here each log line carries a
-- JSON object with "severity" and "message", the fields Cloud Logging's agents read from
-- structured logs, plus the phase, the stream and the decision; ship the server's stderr
-- with any log agent.

local cjson = require "cjson"

local function log_entry(ctx, severity, decision, message, extra)
  local entry = extra or {}
  entry.severity, entry.message = severity, message
  entry.phase, entry.stream, entry.decision = ctx.phase, ctx.stream_id, decision
  -- one argument: logged as is, no format string to escape
  if severity == "WARNING" then
    callout.log.warn(cjson.encode(entry))
  else
    callout.log.info(cjson.encode(entry))
  end
end

local function deny(ctx, message)
  log_entry(ctx, "WARNING", "deny", message)
  callout.deny_callout(message)
end

function on_request_headers(headers, ctx)
  if not callout.headers_contain(headers, "header-check") then
    deny(ctx, '"header-check" not found within the request headers')
  end
  log_entry(ctx, "INFO", "allow", '"header-check" found', { headers = #headers })
  return { add = { { "header-request", "request" } }, clear_route_cache = true }
end

function on_request_body(body, ctx)
  if not callout.body_contains(body, "body-check") then
    deny(ctx, '"body-check" not found within the request body')
  end
  log_entry(ctx, "INFO", "allow", '"body-check" found', { bytes = #body.body })
  return { body = "replaced-body" }
end

-- The response phases are only logged; they go through unchanged.
function on_response_headers(headers, ctx)
  log_entry(ctx, "INFO", "continue", "response headers", { headers = #headers })
end

function on_response_body(body, ctx)
  log_entry(ctx, "INFO", "continue", "response body", { bytes = #body.body })
end
