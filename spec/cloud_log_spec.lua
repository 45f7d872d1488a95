-- examples/cloud_log.lua: gate on header-check / body-check, one structured log entry per
-- phase. callout.testing sees the text form of the records ("LEVEL stream N: message
-- {fields}"); the JSON form the server writes with --log_format json is checked end to end
-- (tests/e2e/test_examples.py, test_cloud_log_entries_are_structured).

local testing = require "callout.testing"
local cjson = require "cjson"

local LABELS = "logging.googleapis.com/labels"

-- The last run's records: level, message and the fields.
local function entries()
  local out = {}
  for _, line in ipairs(testing.logs()) do
    local level, message, json = line:match("^(%u+)%s+stream %d+: (.-) ({.*})$")
    if json then
      local e = cjson.decode(json)
      e.level, e.message = level, message
      out[#out + 1] = e
    end
  end
  return out
end

describe("examples/cloud_log.lua", function()
  local script = testing.load("examples/cloud_log.lua")

  it("lets a request with header-check through, tagged and re-routed, and logs it", function()
    local resp = testing.run(script, testing.request_headers {
      [":method"] = "GET", [":path"] = "/a?b", [":authority"] = "example.com",
      ["user-agent"] = "curl/8", ["header-check"] = "1" })
    assert.header_set(resp, "header-request", "request")
    assert.is_true(resp.request_headers.response.clear_route_cache)
    local e = entries()
    assert.equal(1, #e)
    assert.same({
      level = "INFO", message = '"header-check" found', decision = "allow", headers = 5,
      [LABELS] = { example = "cloud_log", decision = "allow" },
      httpRequest = { requestMethod = "GET", requestUrl = "https://example.com/a?b",
                      userAgent = "curl/8" },
    }, e[1])
  end)

  it("has no trace field without GOOGLE_CLOUD_PROJECT, even with a trace header", function()
    testing.run(script, testing.request_headers {
      ["header-check"] = "1", ["x-cloud-trace-context"] = "105445aa7843bc8bf206b120001000/1;o=1" })
    assert.is_nil(entries()[1]["logging.googleapis.com/trace"])
  end)

  it("denies a request without header-check, and logs a warning", function()
    local r = testing.call(script, testing.request_headers { other = "1" })
    assert.denied(r, '"header-check" not found within the request headers')
    local e = entries()
    assert.equal(1, #e)
    assert.same({ "WARN", "deny", '"header-check" not found within the request headers', "deny" },
                { e[1].level, e[1].decision, e[1].message, e[1][LABELS].decision })
  end)

  it("replaces a request body containing body-check", function()
    assert.body_replaced(testing.run(script, testing.request_body("xx body-check xx")), "replaced-body")
    local e = entries()
    assert.same({ "allow", 16 }, { e[1].decision, e[1].bytes })
  end)

  it("denies a request body without body-check", function()
    local r = testing.call(script, testing.request_body("nothing"))
    assert.denied(r, '"body-check" not found within the request body')
    assert.equal("deny", entries()[1].decision)
  end)

  it("logs the response phases and lets them through, with the status on the stream's request", function()
    local stream <close> = testing.stream(script)
    stream:run(testing.request_headers { [":method"] = "POST", [":path"] = "/", ["header-check"] = "1" })
    assert.unchanged(stream:run(testing.response_headers { [":status"] = "503" }))
    local e = entries()[1]
    assert.same({ "continue", 1, 503, "POST" },
                { e.decision, e.headers, e.httpRequest.status, e.httpRequest.requestMethod })
    assert.unchanged(stream:run(testing.response_body("abc", { end_of_stream = true })))
    assert.same({ "continue", 3 }, { entries()[1].decision, entries()[1].bytes })
  end)
end)
