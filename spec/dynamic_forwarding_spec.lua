-- examples/dynamic_forwarding.lua: the selected endpoint in dynamic metadata.

local testing = require "callout.testing"

local NS = "com.google.envoy.dynamic_forwarding.selected_endpoints"

describe("examples/dynamic_forwarding.lua", function()
  local script = testing.load("examples/dynamic_forwarding.lua")

  local function selected(headers)
    local resp = testing.run(script, testing.request_headers(headers))
    -- the request headers go through unchanged; only the metadata is set
    assert.same({}, resp.request_headers)
    assert.same({ [NS] = { primary = resp.dynamic_metadata[NS].primary } }, resp.dynamic_metadata)
    return resp.dynamic_metadata[NS].primary
  end

  it("takes one of the two known addresses from ip-to-return", function()
    assert.equal("10.1.10.2:80", selected { ["ip-to-return"] = "10.1.10.2" })
    assert.equal("10.1.10.3:80", selected { ["ip-to-return"] = "10.1.10.3" })
  end)

  it("falls back to the third otherwise", function()
    assert.equal("10.1.10.4:80", selected {})
    assert.equal("10.1.10.4:80", selected { ["ip-to-return"] = "10.9.9.9" })
    assert.equal("10.1.10.4:80", selected { ["ip-to-return"] = "10.1.10.2 " })
  end)

  it("logs the choice at debug level", function()
    selected { ["ip-to-return"] = "10.1.10.3" }
    assert.matches("Selected ip: 10.1.10.3", table.concat(testing.logs(), "\n"), 1, true)
  end)
end)
