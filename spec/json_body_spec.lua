-- examples/json_body.lua: JSON request bodies rewritten with callout.json, byte for byte
-- but for the change.

local testing = require "callout.testing"
local json = require "callout.json"

local JSON = { [":method"] = "POST", ["content-type"] = "application/json", ["content-length"] = "9" }

describe("examples/json_body.lua", function()
  local script = testing.load("examples/json_body.lua")

  -- request headers, then the whole body: the two responses
  local function post(headers, body)
    local stream <close> = testing.stream(script)
    local h = stream:run(testing.request_headers(headers))
    return h, stream:run(testing.request_body(body, { end_of_stream = true }))
  end

  it("drops content-length of JSON requests", function()
    local h = post(JSON, "{}")
    assert.header_removed(h, "content-length")
    h = post({ ["content-type"] = "application/vnd.api+json" }, "{}")
    assert.header_removed(h, "content-length")
  end)

  it("adds processed_by and removes password", function()
    local _, b = post(JSON, '{"user":"ann","password":"x","tags":["a"],"n":null}')
    assert.equal('{"user":"ann","tags":["a"],"n":null,"processed_by":"luacallout"}',
                 b.request_body.response.body_mutation.body)
  end)

  it("keeps the rest of the document as the client sent it", function()
    local _, b = post(JSON, '{"model":"m","tools":[],"metadata":{},"seed":12345678901234567,' ..
                            '"temperature":0.70,"stop":["\\n"],"x":1.0}')
    assert.equal('{"model":"m","tools":[],"metadata":{},"seed":12345678901234567,' ..
                 '"temperature":0.7,"stop":["\\n"],"x":1.0,"processed_by":"luacallout"}',
                 b.request_body.response.body_mutation.body)
  end)

  it("refuses a body that is not JSON with 400", function()
    local _, b = post(JSON, '{"user":')
    assert.immediate(b, 400)
    assert.header_set(b, "content-type", "application/json")
    assert.same({ error = "request body is not valid JSON" },
                json.decode(b.immediate_response.body))
  end)

  it("leaves arrays and scalars alone", function()
    local _, b = post(JSON, "[1,2]")
    assert.unchanged(b)
    _, b = post(JSON, '"text"')
    assert.unchanged(b)
  end)

  it("leaves other content types alone", function()
    local h, b = post({ ["content-type"] = "text/plain", ["content-length"] = "7" }, '{"a":1}')
    assert.unchanged(h)
    assert.unchanged(b)
    h, b = post({}, "not json")
    assert.unchanged(h)
    assert.unchanged(b)
  end)
end)
