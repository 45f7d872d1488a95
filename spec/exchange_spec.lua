-- callout.exchange: the JSON form of ext_proc messages that send, --check --request, --record
-- and replay share. Bytes are checked with the server's own decoder (callout.native).
local testing = require "callout.testing"
local exchange = require "callout.exchange"
local native = require "callout.native"
local json = require "callout.json"

local function headers_of(bytes, phase)
  local out = {}
  for i, hv in ipairs(native.decode_request(bytes)[phase].headers.headers) do
    out[i] = { hv.key, hv.raw_value }
  end
  return out
end

describe("callout.exchange requests", function()
  it("reads headers as a map (sorted, a list value once per entry), pairs and HeaderValues", function()
    local map = exchange.encode_request { request_headers = { headers = { b = "2", a = { "1", "3" } } } }
    assert.same({ { "a", "1" }, { "a", "3" }, { "b", "2" } }, headers_of(map, "request_headers"))
    local pairs_ = exchange.encode_request { response_headers = { headers = { { "z", "1" }, { "a", "2" }, { "z", "3" } } } }
    assert.same({ { "z", "1" }, { "a", "2" }, { "z", "3" } }, headers_of(pairs_, "response_headers"))
    local objects = exchange.encode_request { request_trailers = { trailers = {
      headers = { { key = "t", raw_value_base64 = native.base64_encode("\255") } } } } }
    assert.equal("\255", native.decode_request(objects).request_trailers.trailers.headers[1].raw_value)
    -- the same message as the testing kit builds it
    assert.equal(native.encode_request(testing.request_headers({ a = { "1", "3" }, b = "2" })), map)
  end)

  it("reads bodies as text or base64, and the fields that ride along", function()
    local b = exchange.encode_request(json.decode [[
      {"request_body": {"body_base64": "AP8=", "end_of_stream": true},
       "protocol_config": {"request_body_mode": "STREAMED"},
       "attributes": {"envoy.filters.http.ext_proc": {"request.path": "/x", "n": 2}}}]])
    local t = native.decode_request(b)
    assert.equal("\0\255", t.request_body.body)
    assert.is_true(t.request_body.end_of_stream)
    assert.equal("STREAMED", t.protocol_config.request_body_mode)
    assert.equal("/x", t.attributes["envoy.filters.http.ext_proc"]["request.path"])
  end)

  it("sends raw_base64 bytes as they are", function()
    assert.equal("\10\255", exchange.encode_request { raw_base64 = "Cv8=" })
    assert.has_error(function() exchange.encode_request { raw_base64 = "Cv8=", request_body = {} } end,
                     "request: 'raw_base64' stands alone: it is the whole message")
  end)

  it("refuses what it cannot send, naming where", function()
    local cases = {
      { { request_headers = {}, request_body = {} }, "two phases in one message" },
      { { attributes = {} }, "no phase" },
      { { request_body = { body = "a", body_base64 = "YQ==" } }, "both 'body' and 'body_base64'" },
      { { request_body = { body_base64 = "YQ=" } }, "r.request_body.body_base64: base64 of 3 characters" },
      { { request_body = { body_base64 = "YR==" } }, "invalid base64 padding" },
      { { request_headers = { headers = { { "a", {} } } } }, "the value of header 'a' must be a string" },
      { { request_headers = { headers = 5 } }, "headers must be an object or a list" },
      { { request_body = { body = 5 } }, "request.request_body.body" },
    }
    for _, c in ipairs(cases) do
      local ok, err = pcall(exchange.encode_request, c[1], "r")
      assert.is_false(ok)
      assert.truthy(err:find(c[2], 1, true), err)
    end
  end)

  it("writes a request back as pairs, binary bytes as base64, secrets redacted", function()
    local bytes = exchange.encode_request { request_headers = {
      headers = { { ":path", "/" }, { "Authorization", "Bearer x" }, { "bin", "\1\2" } },
      end_of_stream = true } }
    local v = exchange.request_json(bytes, { authorization = true })
    assert.equal([[{"request_headers":{"headers":[[":path","/"],["Authorization","[redacted]"],]] ..
                 [[{"key":"bin","raw_value_base64":"AQI="}],"end_of_stream":true}}]], json.encode(v))
    -- and what it wrote reads back to the same message (redaction aside)
    local again = exchange.encode_request(json.decode(json.encode(exchange.request_json(bytes))))
    assert.same(native.decode_request(bytes), native.decode_request(again))
  end)

  it("writes bytes that do not decode as raw_base64", function()
    assert.same({ raw_base64 = "/w==" }, exchange.request_json("\255"))
  end)
end)

describe("callout.exchange responses", function()
  local script = testing.load_string [[
    function on_request_headers(h)
      return { add = { { "set-cookie", "s=1" }, { "x-ok", "yes" } }, remove = { "foo" } }
    end
    function on_request_body(b) return { body = "\0\1" } end
  ]]

  it("leaves fields at their default out and keeps enums by name", function()
    local _, raw = testing.run(script, testing.request_headers { [":path"] = "/" })
    local v = exchange.response_json(raw)
    assert.same({ request_headers = { response = { header_mutation = {
      remove_headers = { "foo" },
      set_headers = { { header = { key = "set-cookie", raw_value = "s=1" } },
                      { header = { key = "x-ok", raw_value = "yes" } } } } } } }, v)
    local red = exchange.response_json(raw, { ["set-cookie"] = true })
    assert.equal("[redacted]", red.request_headers.response.header_mutation.set_headers[1].header.raw_value)
  end)

  it("writes control bytes as base64", function()
    local _, raw = testing.run(script, testing.request_body "x")
    assert.equal("AAE=", exchange.response_json(raw).request_body.response.body_mutation.body_base64)
  end)

  it("refuses bytes that are not a ProcessingResponse", function()
    assert.has_error(function() exchange.response_json("\255") end)
  end)
end)

describe("callout.exchange files", function()
  it("reads an array, JSON lines and record lines", function()
    assert.equal(2, #exchange.streams('[{"request_body":{}}, {"request_body":{}}]', "f")[1].requests)
    local lines = exchange.streams('{"request_body":{}}\n\n{"response_body":{}}\n', "f")
    assert.equal(1, #lines)
    assert.equal(2, #lines[1].requests)
    local recs = exchange.streams('{"requests":[{"request_body":{}}]}\n{"requests":[]}', "f")
    assert.equal(2, #recs)
    assert.equal(2, recs[2].line)
    assert.equal(1, recs[1].record.requests and #recs[1].record.requests)
  end)

  it("names file:line:column of what it cannot read", function()
    local cases = {
      { '{"request_body":{}}\n{"requests": [}\n', "f:2:15: " },
      { '{"requests":[]}\n{"request_body":{}}\n', "f: record lines and lone request messages mixed" },
      { '[1, 2', "f: " },
      { '{"requests": 5}', "f:1: 'requests' must be a list" },
      { '"x"\n', "f:1: expected a JSON object on each line" },
      { '  \n', "f: no request in the file" },
    }
    for _, c in ipairs(cases) do
      local ok, err = pcall(exchange.streams, c[1], "f")
      assert.is_false(ok)
      assert.equal(c[2], err:sub(1, #c[2]))
    end
    local s = exchange.streams('{"request_body":{}}\n{"request_body":{"x":1}}\n', "f")
    local ok, err = pcall(exchange.stream_bytes, s[1], "f")
    assert.is_false(ok)
    assert.truthy(err:find("f:1: request 2", 1, true), err)
  end)
end)

describe("callout.exchange.diff", function()
  it("names the first difference", function()
    local e = json.decode '{"a":[{"k":"x"},{"k":"y"}],"b":1}'
    assert.is_nil(exchange.diff(e, { a = { { k = "x" }, { k = "y" } }, b = 1 }))
    assert.equal('v.a[2].k: expected "y", got "z"', exchange.diff(e, { a = { { k = "x" }, { k = "z" } }, b = 1 }, "v"))
    assert.equal('v.a[3]: expected nothing, got {"k":"w"}',
                 exchange.diff(e, { a = { { k = "x" }, { k = "y" }, { k = "w" } }, b = 1 }, "v"))
    assert.equal('v.c: expected nothing, got true', exchange.diff(e, { a = e.a, b = 1, c = true }, "v"))
    assert.equal('v.b: expected 1, got nothing', exchange.diff(e, { a = e.a }, "v"))
  end)
end)
