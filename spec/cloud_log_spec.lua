-- examples/cloud_log.lua: gate on header-check / body-check, one JSON log entry per phase.

local testing = require "callout.testing"
local cjson = require "cjson"

-- The JSON entries among the last run's log lines, with their level.
local function entries()
  local out = {}
  for _, line in ipairs(testing.logs()) do
    local level, json = line:match("^(%u+)%s+stream %d+: ({.*})$")
    if json then
      local e = cjson.decode(json)
      e.level = level
      out[#out + 1] = e
    end
  end
  return out
end

describe("examples/cloud_log.lua", function()
  local script = testing.load("examples/cloud_log.lua")

  it("lets a request with header-check through, tagged and re-routed, and logs it", function()
    local resp = testing.run(script, testing.request_headers { ["header-check"] = "1", other = "2" })
    assert.header_set(resp, "header-request", "request")
    assert.is_true(resp.request_headers.response.clear_route_cache)
    local e = entries()
    assert.equal(1, #e)
    assert.same({ level = "INFO", severity = "INFO", decision = "allow", phase = "request_headers",
                  message = '"header-check" found', headers = 2, stream = e[1].stream }, e[1])
    assert.equal("number", type(e[1].stream))
  end)

  it("denies a request without header-check, and logs a warning", function()
    local r = testing.call(script, testing.request_headers { other = "1" })
    assert.denied(r, '"header-check" not found within the request headers')
    local e = entries()
    assert.equal(1, #e)
    assert.same({ "WARN", "WARNING", "deny", '"header-check" not found within the request headers' },
                { e[1].level, e[1].severity, e[1].decision, e[1].message })
  end)

  it("replaces a request body containing body-check", function()
    assert.body_replaced(testing.run(script, testing.request_body("xx body-check xx")), "replaced-body")
    local e = entries()
    assert.same({ "allow", "request_body", 16 }, { e[1].decision, e[1].phase, e[1].bytes })
  end)

  it("denies a request body without body-check", function()
    local r = testing.call(script, testing.request_body("nothing"))
    assert.denied(r, '"body-check" not found within the request body')
    assert.equal("deny", entries()[1].decision)
  end)

  it("logs the response phases and lets them through", function()
    assert.unchanged(testing.run(script, testing.response_headers { [":status"] = "200" }))
    assert.same({ "continue", "response_headers", 1 },
                { entries()[1].decision, entries()[1].phase, entries()[1].headers })
    assert.unchanged(testing.run(script, testing.response_body("abc", { end_of_stream = true })))
    assert.same({ "continue", "response_body", 3 },
                { entries()[1].decision, entries()[1].phase, entries()[1].bytes })
  end)
end)
