-- examples/add_header.lua: a header added each way.

local testing = require "callout.testing"

describe("examples/add_header.lua", function()
  local script = testing.load("examples/add_header.lua")

  it("tags the request and re-routes", function()
    local resp = testing.run(script, testing.request_headers { [":path"] = "/" })
    assert.header_set(resp, "header-request", "request")
    assert.is_true(resp.request_headers.response.clear_route_cache)
    assert.same({}, resp.request_headers.response.header_mutation.remove_headers)
  end)

  it("tags the response and drops foo", function()
    local resp = testing.run(script, testing.response_headers { [":status"] = "200", foo = "x" })
    assert.header_set(resp, "header-response", "response")
    assert.header_removed(resp, "foo")
    assert.is_false(resp.response_headers.response.clear_route_cache)
  end)

  it("leaves bodies alone (no handler)", function()
    assert.unchanged(testing.run(script, testing.request_body("a", { end_of_stream = true })))
    assert.unchanged(testing.run(script, testing.response_body("b", { end_of_stream = true })))
  end)
end)
