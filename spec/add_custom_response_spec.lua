-- examples/add_custom_response.lua: deny bad input, mock on request, else the usual change.

local testing = require "callout.testing"

describe("examples/add_custom_response.lua", function()
  local script = testing.load("examples/add_custom_response.lua")

  for _, phase in ipairs { "request_headers", "response_headers" } do
    describe(phase, function()
      it("denies a bad-header", function()
        assert.denied(testing.call(script, testing[phase] { ["bad-header"] = "" }), "Callout DENIED.")
      end)

      it("denies a bad-header even when a mock is asked for", function()
        assert.denied(testing.call(script, testing[phase] { ["bad-header"] = "1", mock = "1" }),
                      "Callout DENIED.")
      end)

      it("mocks when asked", function()
        local resp = testing.run(script, testing[phase]({ mock = "true" }, { end_of_stream = true }))
        local set = resp[phase].response.header_mutation.set_headers
        assert.equal(1, #set)
        assert.same({ "Mock-Response", "Mocked-Value" }, { set[1].header.key, set[1].header.raw_value })
        assert.is_false(resp[phase].response.clear_route_cache)
      end)
    end)
  end

  it("otherwise tags the request, drops foo, re-routes", function()
    local resp = testing.run(script, testing.request_headers { foo = "bar" })
    assert.header_set(resp, "header-request", "request")
    assert.header_removed(resp, "foo")
    assert.is_true(resp.request_headers.response.clear_route_cache)
  end)

  it("otherwise tags the response", function()
    local resp = testing.run(script, testing.response_headers { [":status"] = "200" })
    assert.header_set(resp, "header-response", "response")
    assert.same({}, resp.response_headers.response.header_mutation.remove_headers)
  end)

  for _, phase in ipairs { "request_body", "response_body" } do
    describe(phase, function()
      it("denies a bad-body", function()
        assert.denied(testing.call(script, testing[phase]("xx bad-body xx")), "Callout DENIED.")
        assert.denied(testing.call(script, testing[phase]("mock bad-body")), "Callout DENIED.")
      end)

      it("mocks when the body says mock", function()
        assert.body_replaced(testing.run(script, testing[phase]("body-check-mock")), "Mocked-Body")
      end)
    end)
  end

  it("otherwise replaces the request body", function()
    assert.body_replaced(testing.run(script, testing.request_body("hello")), "replaced-body")
  end)

  it("otherwise lets the response body through", function()
    assert.unchanged(testing.run(script, testing.response_body("hello")))
  end)
end)
