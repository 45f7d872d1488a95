-- cloud_log.lua — the Python SDK's "cloud_log" example, ported: gate requests on a header
-- and a body marker, and log every phase as a structured Google Cloud Logging entry.
--
-- Run the server with --log_format json: every record is then one JSON object per line on
-- stderr, which Cloud Logging's agents (GKE, Cloud Run, the Ops Agent) read as a structured
-- entry. The server writes `severity` and `message`; the fields given to callout.log here
-- become members of the same object, and the ones Cloud Logging knows are moved into the
-- LogEntry (docs/examples.md, cloud_log):
--   logging.googleapis.com/trace   "projects/P/traces/T" — links the entry to its trace
--   logging.googleapis.com/spanId  the span of that trace
--   logging.googleapis.com/labels  string labels, searchable and shown with the entry
--   httpRequest                    LogEntry.httpRequest (method, URL, user agent, status)
-- The rest (decision, the counts, and the server's stream_id and phase) stays in
-- jsonPayload. The trace comes from the request's x-cloud-trace-context header (Google's
-- load balancers add it) or a W3C traceparent; the project from GOOGLE_CLOUD_PROJECT (no
-- project, no trace field: Cloud Logging wants the full resource name).

local PROJECT = os.getenv("GOOGLE_CLOUD_PROJECT")

-- "TRACE/SPAN;o=1" or "00-TRACE-SPAN-01" -> trace id, span id (nil when neither)
local function parse_trace(headers)
  local v = headers:get("x-cloud-trace-context")
  if v then
    local trace, span = v:match("^(%x+)/?(%d*)")
    -- the header's span id is decimal; Cloud Logging wants 16 hex digits
    local n = span ~= "" and math.tointeger(tonumber(span)) or nil
    return trace, n and string.format("%016x", n) or nil
  end
  v = headers:get("traceparent")
  if v then return v:match("^%x%x%-(%x+)%-(%x+)%-%x%x$") end
end

-- The fields every entry of a stream carries; remembered in ctx.state by the first phase.
local function base_fields(ctx)
  local s = ctx.state
  local f = { ["logging.googleapis.com/labels"] = { example = "cloud_log" } }
  if s.trace and PROJECT then
    f["logging.googleapis.com/trace"] = "projects/" .. PROJECT .. "/traces/" .. s.trace
    f["logging.googleapis.com/spanId"] = s.span
  end
  f.httpRequest = s.http
  return f
end

local function log_entry(ctx, level, decision, message, extra)
  local f = base_fields(ctx)
  f.decision = decision
  f["logging.googleapis.com/labels"].decision = decision
  for k, v in pairs(extra or {}) do f[k] = v end
  callout.log[level](f, message)   -- a table first: fields; the message is not a format
end

local function deny(ctx, message)
  log_entry(ctx, "warn", "deny", message)
  callout.deny_callout(message)
end

function on_request_headers(headers, ctx)
  local s = ctx.state
  s.trace, s.span = parse_trace(headers)
  s.http = {
    requestMethod = headers:get(":method"),
    requestUrl = headers:get(":path") and
      (headers:get(":scheme") or "https") .. "://" .. (headers:get(":authority") or "") ..
      headers:get(":path"),
    userAgent = headers:get("user-agent"),
  }
  if not callout.headers_contain(headers, "header-check") then
    deny(ctx, '"header-check" not found within the request headers')
  end
  log_entry(ctx, "info", "allow", '"header-check" found', { headers = #headers })
  return { add = { { "header-request", "request" } }, clear_route_cache = true }
end

function on_request_body(body, ctx)
  if not callout.body_contains(body, "body-check") then
    deny(ctx, '"body-check" not found within the request body')
  end
  log_entry(ctx, "info", "allow", '"body-check" found', { bytes = #body.body })
  return { body = "replaced-body" }
end

-- The response phases are only logged; they go through unchanged.
function on_response_headers(headers, ctx)
  local status = math.tointeger(tonumber(headers:get(":status") or ""))
  if ctx.state.http and status then ctx.state.http.status = status end
  log_entry(ctx, "info", "continue", "response headers", { headers = #headers })
end

function on_response_body(body, ctx)
  log_entry(ctx, "info", "continue", "response body", { bytes = #body.body })
end
