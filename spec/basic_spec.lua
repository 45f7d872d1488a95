-- examples/basic.lua: each phase once.

local testing = require "callout.testing"

describe("examples/basic.lua", function()
  local script = testing.load("examples/basic.lua")

  it("rewrites :authority and :path, tags the request, drops foo, re-routes", function()
    local resp = testing.run(script, testing.request_headers { [":path"] = "/old", foo = "bar" })
    assert.header_set(resp, ":authority", "service-extensions.com")
    assert.header_set(resp, ":path", "/")
    assert.header_set(resp, "header-request", "request")
    assert.header_removed(resp, "foo")
    assert.is_true(resp.request_headers.response.clear_route_cache)
  end)

  it("sends exactly those mutations, in order", function()
    local resp = testing.run(script, testing.request_headers { [":path"] = "/" })
    local hm = resp.request_headers.response.header_mutation
    local set = {}
    for i, o in ipairs(hm.set_headers) do set[i] = { o.header.key, o.header.raw_value } end
    assert.same({ { ":authority", "service-extensions.com" }, { ":path", "/" },
                  { "header-request", "request" } }, set)
    assert.same({ "foo" }, hm.remove_headers)
  end)

  it("adds hello to the response headers", function()
    local resp = testing.run(script, testing.response_headers { [":status"] = "200" })
    assert.header_set(resp, "hello", "service-extensions")
    assert.is_false(resp.response_headers.response.clear_route_cache)
  end)

  it("replaces the request body", function()
    local resp = testing.run(script, testing.request_body("original", { end_of_stream = true }))
    assert.body_replaced(resp, "replaced-body")
  end)

  it("clears the response body", function()
    assert.body_cleared(testing.run(script, testing.response_body("secret", { end_of_stream = true })))
  end)

  it("lets trailers through unchanged (no handler)", function()
    assert.unchanged(testing.run(script, testing.request_trailers { ["x-t"] = "1" }))
    assert.unchanged(testing.run(script, testing.response_trailers { ["grpc-status"] = "0" }))
  end)

  it("answers a whole request on one stream", function()
    local stream <close> = testing.stream(script)
    assert.header_set(stream:run(testing.request_headers { [":path"] = "/" }), ":path", "/")
    assert.body_replaced(stream:run(testing.request_body("a", { end_of_stream = true })), "replaced-body")
    assert.header_set(stream:run(testing.response_headers { [":status"] = "200" }), "hello")
    assert.body_cleared(stream:run(testing.response_body("b", { end_of_stream = true })))
  end)
end)
