-- examples/redirect.lua: every request gets a 301.

local testing = require "callout.testing"

describe("examples/redirect.lua", function()
  local script = testing.load("examples/redirect.lua")

  it("answers 301 with the Location header", function()
    local resp = testing.run(script, testing.request_headers({ header = "value" }, { end_of_stream = true }))
    assert.immediate(resp, 301)
    local set = resp.immediate_response.headers.set_headers
    assert.equal(1, #set)
    assert.same({ "Location", "http://service-extensions.com/redirect" },
                { set[1].header.key, set[1].header.raw_value })
    assert.equal("", resp.immediate_response.body)
  end)

  it("leaves responses alone (no handler)", function()
    assert.unchanged(testing.run(script, testing.response_headers { [":status"] = "200" }))
  end)
end)
