-- examples/normalize_header.lua: client-device-type from :authority.

local testing = require "callout.testing"

describe("examples/normalize_header.lua", function()
  local script = testing.load("examples/normalize_header.lua")

  local function device(host)
    local resp = testing.run(script, testing.request_headers { [":authority"] = host })
    assert.is_true(resp.request_headers.response.clear_route_cache)
    local set = resp.request_headers.response.header_mutation.set_headers
    assert.equal(1, #set)
    assert.equal("client-device-type", set[1].header.key)
    return set[1].header.raw_value
  end

  it("tells mobile, tablet and desktop apart", function()
    assert.equal("mobile", device("m.example.com"))
    assert.equal("tablet", device("t.example.com"))
    assert.equal("desktop", device("www.example.com"))
  end)

  it("matches the names anywhere in the host, mobile first, dots literally", function()
    assert.equal("mobile", device("www.m.example.com:8443"))
    assert.equal("tablet", device("t.example.com.m.example.org"))
    assert.equal("desktop", device("mxexample.com"))
  end)

  it("does nothing without an :authority", function()
    assert.unchanged(testing.run(script, testing.request_headers({}, { end_of_stream = true })))
    assert.unchanged(testing.run(script, testing.request_headers { [":authority"] = "" }))
  end)
end)
