-- examples/set_cookie.lua: a cookie on responses with a cookie-check header.

local testing = require "callout.testing"

local COOKIE = "your_cookie_name=cookie_value; Max-Age=3600; Path=/"

describe("examples/set_cookie.lua", function()
  local script = testing.load("examples/set_cookie.lua")

  it("sets the cookie when cookie-check is there", function()
    local resp = testing.run(script, testing.response_headers({ ["cookie-check"] = "value" },
                                                              { end_of_stream = true }))
    local set = resp.response_headers.response.header_mutation.set_headers
    assert.equal(1, #set)
    assert.same({ "Set-Cookie", COOKIE }, { set[1].header.key, set[1].header.raw_value })
  end)

  it("does nothing without cookie-check, or with an empty one", function()
    assert.unchanged(testing.run(script, testing.response_headers {}))
    assert.unchanged(testing.run(script, testing.response_headers { ["cookie-check"] = "" }))
  end)

  it("goes by the first cookie-check header", function()
    assert.unchanged(testing.run(script, testing.response_headers {
      { "cookie-check", "" }, { "cookie-check", "x" } }))
  end)

  it("leaves requests alone (no handler)", function()
    assert.unchanged(testing.run(script, testing.request_headers { ["cookie-check"] = "value" }))
  end)
end)
