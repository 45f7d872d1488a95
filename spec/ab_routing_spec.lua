-- examples/ab_routing.lua: x-ab-variant from a hash of the ab_session cookie.

local testing = require "callout.testing"

describe("examples/ab_routing.lua", function()
  local script = testing.load("examples/ab_routing.lua")

  local function variant(headers)
    local resp = testing.run(script, testing.request_headers(headers))
    assert.is_true(resp.request_headers.response.clear_route_cache)
    local set = resp.request_headers.response.header_mutation.set_headers
    assert.equal(1, #set)
    assert.equal("x-ab-variant", set[1].header.key)
    return set[1].header.raw_value
  end

  -- FNV-1a 32 of the session, mod 100, below 50 -> "b" (values computed independently)
  local KNOWN = { ["user-1"] = "b", ["user-2"] = "a", ["user-3"] = "b", alice = "a", bob = "b",
                  carol = "a" }

  it("picks the variant from the cookie's hash", function()
    for session, want in pairs(KNOWN) do
      assert.equal(want, variant { cookie = "ab_session=" .. session }, session)
    end
  end)

  it("finds the cookie among others, with blanks, in any Cookie header", function()
    assert.equal("b", variant { cookie = "theme=dark;  ab_session = bob ; x=1" })
    assert.equal("b", variant { { "cookie", "a=1" }, { "cookie", "ab_session=user-1" } })
  end)

  it("gives variant a without the cookie, or with an empty one", function()
    assert.equal("a", variant {})
    assert.equal("a", variant { cookie = "ab_session=" })
    assert.equal("a", variant { cookie = "xab_session=user-1; ab_sessionx=bob" })
  end)

  it("overwrites the header a client sent", function()
    assert.equal("a", variant { ["x-ab-variant"] = "b" })
  end)
end)
