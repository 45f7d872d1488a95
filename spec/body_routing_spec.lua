-- Routing on the body (docs/streaming.md): a headers handler returns wait_for_body = true,
-- the body handler decides the route; and content-length that follows a replaced buffered
-- body (docs/lua-api.md). Driven through callout.testing, i.e. the server's dispatch code.

local testing = require "callout.testing"

local script = testing.load_string [[
function on_request_headers(headers, ctx)
  ctx.state.held_at_headers = ctx.headers_held
  return { wait_for_body = true, add = { { "x-seen", "1" } } }
end

function on_request_body(body, ctx)
  ctx.state.held_in_body = ctx.headers_held
  local model = body.body:match('"model":"([^"]*)"')
  if body.body == "hold" then return { chunks = {}, add = { { "x-early", "1" } } } end
  if body.body == "boom" then error("no model") end
  if body.body == "deny" then return { immediate = { status = 403 } } end
  if model == nil then return nil end
  local out = { add = { { "x-model-route", model } }, clear_route_cache = true }
  if ctx.protocol_config.request_body_mode ~= "FULL_DUPLEX_STREAMED" then
    out.body = '{"model":"' .. model .. '-v2"}'
  end
  return out
end

function on_request_trailers(trailers, ctx)
  return { add = { { "x-trailer", "1" } } }
end
]]

local function mode(m, early)
  return { protocol_config = { request_body_mode = m, response_body_mode = "NONE",
                               send_body_without_waiting_for_header_response = early or false } }
end

local function headers_response(resp)
  assert.is_table(resp.request_headers, "expected a request_headers response first")
  return resp
end

describe("routing on the body", function()
  it("BUFFERED: headers answered at once, the body answer carries the route", function()
    local stream = testing.stream(script)
    local h = stream:send(testing.request_headers({ [":path"] = "/v1" }, mode("BUFFERED")))
    assert.equal("respond", h.outcome)
    assert.header_set(h, "x-seen", "1")
    local b = stream:send(testing.request_body('{"model":"m1"}', { end_of_stream = true }))
    assert.equal(1, #b.responses)
    local common = b.responses[1].request_body.response
    assert.header_set(b, "x-model-route", "m1")
    assert.header_set(b, "content-length", tostring(#'{"model":"m1-v2"}'))
    assert.is_true(common.clear_route_cache)
    assert.body_replaced(b, '{"model":"m1-v2"}')
  end)

  it("STREAMED with send_body_without_waiting_for_header_response: the first chunk releases", function()
    local stream = testing.stream(script)
    local h = stream:send(testing.request_headers({ [":path"] = "/v1" }, mode("STREAMED", true)))
    assert.equal("none", h.outcome)
    local b = stream:send(testing.request_body('{"model":"m2"}', { end_of_stream = false }))
    assert.equal(2, #b.responses)
    local first = headers_response(b.responses[1]).request_headers.response
    assert.is_true(first.clear_route_cache)
    local set = first.header_mutation.set_headers
    assert.same({ "x-seen", "x-model-route" }, { set[1].header.key, set[2].header.key })
    assert.equal("m2", set[2].header.raw_value)
    local body = b.responses[2].request_body.response
    assert.is_nil(body.header_mutation)         -- in the headers response, where Envoy applies it
    assert.is_false(body.clear_route_cache)
    assert.equal('{"model":"m2-v2"}', body.body_mutation.body)
    -- STREAMED lengths are Envoy's business: no content-length
    assert.has_no.header_set(b, "content-length")
    local c = stream:send(testing.request_body('x', { end_of_stream = true }))
    assert.equal(1, #c.responses)
    assert.is_table(c.responses[1].request_body)
  end)

  it("FULL_DUPLEX_STREAMED: held over chunks, released at end of stream, ctx.headers_held", function()
    local stream = testing.stream(script)
    assert.equal("none", stream:send(testing.request_headers({}, mode("FULL_DUPLEX_STREAMED"))).outcome)
    local b1 = stream:send(testing.request_body("hold", { end_of_stream = false }))
    assert.equal("none", b1.outcome)
    local b2 = stream:send(testing.request_body('{"model":"m3"}', { end_of_stream = true }))
    assert.equal(2, #b2.responses)
    local hr = headers_response(b2.responses[1]).request_headers.response
    local keys = {}
    for i, o in ipairs(hr.header_mutation.set_headers) do keys[i] = o.header.key end
    assert.same({ "x-seen", "x-early", "x-model-route" }, keys)
    assert.is_true(hr.clear_route_cache)
    assert.same({ '{"model":"m3"}' }, (testing.chunks(b2)))
    -- after the release the headers are gone: add is an error that says where they went
    local after = stream:send(testing.request_body("hold", { end_of_stream = false }))
    assert.grpc_error(after, "INTERNAL", "'add': the request headers response (held by "
                      .. "wait_for_body) already went with chunk 2's answer")
  end)

  it("ctx.headers_held is true in the body handler while held", function()
    local s = testing.load_string [[
      function on_request_headers(h, ctx) ctx.state.a = ctx.headers_held; return { wait_for_body = true } end
      function on_request_body(b, ctx)
        return { chunks = { tostring(ctx.state.a) .. "," .. tostring(ctx.headers_held) } }
      end
    ]]
    local stream = testing.stream(s)
    stream:send(testing.request_headers({}, mode("FULL_DUPLEX_STREAMED")))
    local r = stream:send(testing.request_body("x", { end_of_stream = false }))
    assert.same({ "false,true" }, (testing.chunks(r)))
    local r2 = stream:send(testing.request_body("x", { end_of_stream = true }))
    assert.same({ "false,false" }, (testing.chunks(r2)))
  end)

  it("trailers release the held headers first", function()
    local stream = testing.stream(script)
    stream:send(testing.request_headers({}, mode("FULL_DUPLEX_STREAMED")))
    assert.equal("none", stream:send(testing.request_body("hold", { end_of_stream = false })).outcome)
    local t = stream:send(testing.request_trailers { ["x-t"] = "1" })
    assert.equal(2, #t.responses)
    local hr = headers_response(t.responses[1]).request_headers.response
    assert.equal("x-early", hr.header_mutation.set_headers[2].header.key)
    assert.is_table(t.responses[2].request_trailers)
  end)

  it("an immediate response replaces the held one; an error fails the stream", function()
    local stream = testing.stream(script)
    stream:send(testing.request_headers({}, mode("FULL_DUPLEX_STREAMED")))
    local d = stream:send(testing.request_body("deny", { end_of_stream = true }))
    assert.equal(1, #d.responses)
    assert.immediate(d, 403)
    local stream2 = testing.stream(script)
    stream2:send(testing.request_headers({}, mode("FULL_DUPLEX_STREAMED")))
    assert.grpc_error(stream2:send(testing.request_body("boom", { end_of_stream = true })),
                      "INTERNAL", "no model")
  end)

  it("headers with end_of_stream are answered at once", function()
    local r = testing.call(script, testing.request_headers({}, {
      end_of_stream = true, protocol_config = mode("FULL_DUPLEX_STREAMED").protocol_config }))
    assert.equal("respond", r.outcome)
    assert.header_set(r, "x-seen", "1")
  end)

  it("is refused where Envoy would wait for the headers answer", function()
    assert.grpc_error(testing.call(script, testing.request_headers({}, mode("NONE"))), "INTERNAL",
                      "'wait_for_body' in request_body_mode NONE: Envoy sends no body")
    assert.grpc_error(testing.call(script, testing.request_headers({}, mode("STREAMED"))), "INTERNAL",
                      "needs send_body_without_waiting_for_header_response: true")
    assert.grpc_error(testing.call(script, testing.request_headers {}), "INTERNAL",
                      "Envoy sent no protocol_config")
  end)

  it("is ignored in observability mode", function()
    local r = testing.call(script, testing.request_headers({}, {
      observability_mode = true, protocol_config = mode("NONE").protocol_config }))
    assert.equal("none", r.outcome)
    assert.is_true(r.ok)
  end)
end)

describe("content-length follows a replaced buffered body", function()
  local s = testing.load_string [[
    function on_request_body(body, ctx)
      if body.body == "clear" then return { clear_body = true } end
      if body.body == "own" then return { body = "abc", add = { { "Content-Length", "99" } } } end
      if body.body == "rm" then return { body = "abc", remove = { "content-length" } } end
      if body.body == "keep" then return { add = { { "x", "1" } } } end
      return { body = "hello" }
    end
  ]]
  local function body_call(data, m, eos)
    local stream = testing.stream(s)
    stream:send(testing.request_headers({}, mode(m)))
    return stream:send(testing.request_body(data, { end_of_stream = eos ~= false }))
  end

  it("sets the new length, 0 when cleared", function()
    assert.header_set(body_call("x", "BUFFERED"), "content-length", "5")
    assert.header_set(body_call("clear", "BUFFERED"), "content-length", "0")
    assert.header_set(body_call("x", "BUFFERED_PARTIAL"), "content-length", "5")
  end)

  it("leaves the script's own content-length alone", function()
    local own = body_call("own", "BUFFERED")
    local set = own.responses[1].request_body.response.header_mutation.set_headers
    assert.equal(1, #set)
    assert.equal("99", set[1].header.raw_value)
    local rm = body_call("rm", "BUFFERED")
    assert.is_nil(rm.responses[1].request_body.response.header_mutation.set_headers[1])
  end)

  it("does nothing when the body is kept, streamed, partial and unfinished, or mode unknown", function()
    assert.has_no.header_set(body_call("keep", "BUFFERED"), "content-length")
    assert.has_no.header_set(body_call("x", "STREAMED"), "content-length")
    assert.has_no.header_set(body_call("x", "BUFFERED_PARTIAL", false), "content-length")
    local r = testing.call(s, testing.request_body("x", { end_of_stream = true }))
    assert.has_no.header_set(r, "content-length")
  end)

  it("sets the length when protocol_config buffers, whatever mode_override said", function()
    -- Envoy ignores mode_override unless allow_mode_override is set (false by default):
    -- the body stays BUFFERED and needs its content-length
    local s2 = testing.load_string [[
      function on_request_headers() return { mode_override = { request_body_mode = "STREAMED" } } end
      function on_request_body() return { body = "hello" } end
    ]]
    local stream = testing.stream(s2)
    stream:send(testing.request_headers({}, mode("BUFFERED")))
    local r = stream:send(testing.request_body("x", { end_of_stream = true }))
    assert.header_set(r, "content-length", "5")
  end)
end)
