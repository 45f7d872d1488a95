-- examples/stream_state.lua: x-request-id copied from the request to the response.

local testing = require "callout.testing"

describe("examples/stream_state.lua", function()
  local script = testing.load("examples/stream_state.lua")

  it("copies x-request-id into the response of the same stream", function()
    local stream <close> = testing.stream(script)
    assert.unchanged(stream:run(testing.request_headers { [":path"] = "/", ["x-request-id"] = "abc-1" }))
    local resp = stream:run(testing.response_headers { [":status"] = "200" })
    assert.header_set(resp, "x-request-id", "abc-1")
  end)

  it("adds nothing when the request had none", function()
    local stream <close> = testing.stream(script)
    stream:run(testing.request_headers { [":path"] = "/" })
    assert.unchanged(stream:run(testing.response_headers { [":status"] = "200" }))
  end)

  it("keeps streams apart", function()
    local a <close> = testing.stream(script)
    local b <close> = testing.stream(script)
    a:run(testing.request_headers { ["x-request-id"] = "a" })
    b:run(testing.request_headers { ["x-request-id"] = "b" })
    assert.header_set(b:run(testing.response_headers {}), "x-request-id", "b")
    assert.header_set(a:run(testing.response_headers {}), "x-request-id", "a")
  end)
end)
