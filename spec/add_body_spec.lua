-- examples/add_body.lua: the request body gets a suffix, the response body is replaced.

local testing = require "callout.testing"

describe("examples/add_body.lua", function()
  local script = testing.load("examples/add_body.lua")

  it("appends to the request body", function()
    assert.body_replaced(testing.run(script, testing.request_body("mock-body", { end_of_stream = true })),
                         "mock-body-added-request-body")
  end)

  it("appends to an empty request body, and keeps binary bytes", function()
    assert.body_replaced(testing.run(script, testing.request_body("")), "-added-request-body")
    assert.body_replaced(testing.run(script, testing.request_body("\0\255")),
                         "\0\255-added-request-body")
  end)

  it("replaces the response body", function()
    assert.body_replaced(testing.run(script, testing.response_body("mock-body", { end_of_stream = true })),
                         "new-body")
  end)

  it("leaves headers alone (no handler)", function()
    assert.unchanged(testing.run(script, testing.request_headers { [":path"] = "/" }))
  end)
end)
