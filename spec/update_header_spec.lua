-- examples/update_header.lua: headers set with OVERWRITE_IF_EXISTS_OR_ADD.

local testing = require "callout.testing"

local function only_set(resp, phase)
  local set = resp[phase].response.header_mutation.set_headers
  assert.equal(1, #set)
  return set[1]
end

describe("examples/update_header.lua", function()
  local script = testing.load("examples/update_header.lua")

  it("overwrites header-request and re-routes", function()
    local resp = testing.run(script, testing.request_headers { ["header-request"] = "old" })
    local o = only_set(resp, "request_headers")
    assert.same({ "header-request", "request-new-value", "OVERWRITE_IF_EXISTS_OR_ADD" },
                { o.header.key, o.header.raw_value, o.append_action })
    assert.is_nil(o.append)     -- the deprecated flag is left unset, as the SDK leaves it
    assert.is_true(resp.request_headers.response.clear_route_cache)
  end)

  it("overwrites header-response", function()
    local resp = testing.run(script, testing.response_headers {})
    local o = only_set(resp, "response_headers")
    assert.same({ "header-response", "response-new-value", "OVERWRITE_IF_EXISTS_OR_ADD" },
                { o.header.key, o.header.raw_value, o.append_action })
    assert.is_false(resp.response_headers.response.clear_route_cache)
  end)
end)
