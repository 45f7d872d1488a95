-- Envoy's newest ext_proc protocol through callout.testing (the server's own C code): GRPC
-- body mode and its two flags, request_drain, streamed immediate responses
-- (docs/streaming.md, docs/lua-api.md).

local testing = require "callout.testing"

local GRPC = { request_body_mode = "GRPC", response_body_mode = "GRPC" }

local SCRIPT = [[
function on_request_headers(h, ctx)
  if h:get("x-local") then
    return { immediate = { status = 200, headers = { ["content-type"] = "text/plain" },
                           chunks = { "a", "b" }, trailers = { ["x-done"] = "1" } } }
  end
end

function on_request_body(b, ctx)
  if b.body == "split" then
    return { chunks = { "one", { body = "two", grpc_message_compressed = true } } }
  elseif b.body == "drain" then
    return { request_drain = true }
  end
  ctx.state.flags = tostring(b.grpc_message_compressed) .. " " ..
                    tostring(b.end_of_stream_without_message)
end
]]

describe("the newest ext_proc protocol", function()
  local script = testing.load_string(SCRIPT)

  local function grpc_stream()
    local stream = testing.stream(script)
    stream:run(testing.request_headers({ [":path"] = "/svc/Method" }, { protocol_config = GRPC }))
    return stream
  end

  local function streamed(r, i)
    local resp = r.responses[i]
    return resp.request_body.response.body_mutation.streamed_response, resp
  end

  it("forwards a gRPC message unchanged, flags included", function()
    local stream = grpc_stream()
    local r = stream:send(testing.request_body("\0\0\0\0\1x", { grpc_message_compressed = true }))
    local s = streamed(r, 1)
    assert.are.equal("\0\0\0\0\1x", s.body)
    assert.is_true(s.grpc_message_compressed)
    r = stream:send(testing.request_body("", { end_of_stream = true,
                                               end_of_stream_without_message = true }))
    s = streamed(r, 1)
    assert.is_true(s.end_of_stream)
    assert.is_true(s.end_of_stream_without_message)
  end)

  it("sends chunk tables with their flags", function()
    local r = grpc_stream():send(testing.request_body("split"))
    assert.are.same({ "one", "two" }, (testing.chunks(r)))
    assert.is_falsy(streamed(r, 1).grpc_message_compressed)
    assert.is_true(streamed(r, 2).grpc_message_compressed)
  end)

  it("echoes every chunk after request_drain without the handler", function()
    local stream = grpc_stream()
    local r = stream:send(testing.request_body("drain"))
    local _, resp = streamed(r, 1)
    assert.is_true(resp.request_drain)
    r = stream:send(testing.request_body("split"))   -- would be two messages via the handler
    assert.are.same({ "split" }, (testing.chunks(r)))
  end)

  it("streams a local response from on_request_headers", function()
    local r = testing.call(script, testing.request_headers { ["x-local"] = "1" })
    assert.are.equal(4, #r.responses)
    local hr = r.responses[1].streamed_immediate_response.headers_response
    assert.are.equal(":status", hr.headers.headers[1].key)
    assert.are.equal("200", hr.headers.headers[1].raw_value)
    assert.is_falsy(hr.end_of_stream)
    assert.are.equal("a", r.responses[2].streamed_immediate_response.body_response.body)
    assert.are.equal("b", r.responses[3].streamed_immediate_response.body_response.body)
    assert.are.equal("x-done",
                     r.responses[4].streamed_immediate_response.trailers_response.headers[1].key)
  end)

  it("refuses a streamed local response in BUFFERED request body mode", function()
    local r = testing.call(script, testing.request_headers({ ["x-local"] = "1" },
      { protocol_config = { request_body_mode = "BUFFERED" } }))
    assert.is_false(r.ok)
    assert.matches("needs request_body_mode NONE or FULL_DUPLEX_STREAMED", r.message, 1, true)
  end)
end)
