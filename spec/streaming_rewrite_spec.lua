-- examples/streaming_rewrite.lua: "secret" becomes "[redacted]" in bodies streamed in
-- FULL_DUPLEX_STREAMED mode, also when the word is split across chunks (docs/streaming.md).

local testing = require "callout.testing"

local FULL_DUPLEX = {
  request_body_mode = "FULL_DUPLEX_STREAMED",
  response_body_mode = "FULL_DUPLEX_STREAMED",
}

describe("examples/streaming_rewrite.lua", function()
  local script = testing.load("examples/streaming_rewrite.lua")

  -- A stream whose first message, the request headers, carries the protocol_config Envoy
  -- sends in full duplex mode.
  local function full_duplex_stream()
    local stream = testing.stream(script)
    local resp = stream:run(testing.request_headers(
      { [":path"] = "/upload", ["content-length"] = "42" }, { protocol_config = FULL_DUPLEX }))
    assert.header_removed(resp, "content-length")
    return stream
  end

  -- Sends the chunks in order as `phase` and returns, per chunk, the chunks sent back and
  -- the end_of_stream of the last one sent (nil when nothing was sent).
  local function feed(stream, phase, chunks)
    local out = {}
    for i, data in ipairs(chunks) do
      local r = stream:send(testing[phase](data, { end_of_stream = i == #chunks }))
      assert.is_true(r.ok, tostring(r.message))
      local sent, eos = testing.chunks(r)
      out[i] = { sent = sent, eos = eos }
    end
    return out
  end

  it("drops content-length in both header phases", function()
    assert.header_removed(testing.run(script, testing.request_headers { ["content-length"] = "3" }),
                          "content-length")
    assert.header_removed(testing.run(script, testing.response_headers { ["content-length"] = "3" }),
                          "content-length")
  end)

  it("rewrites the word split across chunks (docs/streaming.md)", function()
    local stream <close> = full_duplex_stream()
    local out = feed(stream, "request_body", { "my sec", "ret is se", "cretsecret and sec" })
    assert.same({
      { sent = { "my " }, eos = false },
      { sent = { "[redacted] is " }, eos = false },
      { sent = { "[redacted][redacted] and sec" }, eos = true },
    }, out)
  end)

  it("rewrites a word inside one chunk and forwards the rest at once", function()
    local stream <close> = full_duplex_stream()
    local r = stream:send(testing.request_body("a secret here", { end_of_stream = false }))
    assert.same({ "a [redacted] here" }, (testing.chunks(r)))
    assert.body_replaced(r, "a [redacted] here")
  end)

  it("holds a chunk that could be the start of the word: nothing is sent", function()
    local stream <close> = full_duplex_stream()
    local r = stream:send(testing.request_body("sec", { end_of_stream = false }))
    assert.equal("none", r.outcome)
    assert.same({}, r.responses)
    -- not the word after all: what was held goes out with the next chunk
    r = stream:send(testing.request_body("ond", { end_of_stream = true }))
    assert.same({ "second" }, (testing.chunks(r)))
  end)

  it("flushes a held tail at end of stream", function()
    local stream <close> = full_duplex_stream()
    local r = stream:send(testing.request_body("x se", { end_of_stream = false }))
    assert.same({ "x " }, (testing.chunks(r)))
    r = stream:send(testing.request_body("", { end_of_stream = true }))
    local sent, eos = testing.chunks(r)
    assert.same({ "se" }, sent)
    assert.is_true(eos)
  end)

  it("ends the body with an empty chunk when there is nothing to send", function()
    local stream <close> = full_duplex_stream()
    local sent, eos = testing.chunks(stream:send(testing.request_body("", { end_of_stream = true })))
    assert.same({ "" }, sent)
    assert.is_true(eos)
  end)

  it("finds the word fed one byte at a time", function()
    local stream <close> = full_duplex_stream()
    local bytes = {}
    for c in ("a secret!"):gmatch(".") do bytes[#bytes + 1] = c end
    local all = {}
    for _, step in ipairs(feed(stream, "request_body", bytes)) do
      for _, s in ipairs(step.sent) do all[#all + 1] = s end
    end
    assert.equal("a [redacted]!", table.concat(all))
  end)

  it("keeps one tail per direction", function()
    local stream <close> = full_duplex_stream()
    assert.equal("none", stream:send(testing.request_body("se", { end_of_stream = false })).outcome)
    -- "cret" in the response body does not complete the request's "se"
    local r = stream:send(testing.response_body("cret", { end_of_stream = true }))
    assert.same({ "cret" }, (testing.chunks(r)))
    r = stream:send(testing.request_body("cret", { end_of_stream = true }))
    assert.same({ "[redacted]" }, (testing.chunks(r)))
  end)

  it("rewrites response bodies too", function()
    local stream <close> = full_duplex_stream()
    local out = feed(stream, "response_body", { "top secr", "et" })
    assert.same({ { sent = { "top " }, eos = false }, { sent = { "[redacted]" }, eos = true } }, out)
  end)

  it("needs FULL_DUPLEX_STREAMED: in another body mode the server refuses chunks", function()
    local r = testing.call(script, testing.request_body("secret", { end_of_stream = true }))
    assert.grpc_error(r, "INTERNAL", "chunks")
  end)
end)
