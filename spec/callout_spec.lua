-- The `callout` module (docs/lua-api.md, "The `callout` module"): every helper, called from a
-- handler of a script loaded as the server loads it, so it runs in the server's VM and its
-- result goes through the server's encoder.

local testing = require "callout.testing"

-- A script whose on_request_headers (or other handler) body is `src`.
local function handler(phase, src)
  return testing.load_string(("function on_%s(msg, ctx)\n%s\nend"):format(phase, src))
end

local function headers_run(src, h, opts)
  return testing.run(handler("request_headers", src), testing.request_headers(h or {}, opts))
end

local function headers_call(src, h)
  return testing.call(handler("request_headers", src), testing.request_headers(h or {}))
end

describe("callout", function()
  it("is a global, and require 'callout' returns the same table", function()
    local resp = headers_run([[
      return { dynamic_metadata = { t = { same = require("callout") == callout,
                                          kind = type(callout) } } }]])
    assert.same({ t = { same = true, kind = "table" } }, resp.dynamic_metadata)
  end)

  describe("add_header_mutation", function()
    it("adds a list of pairs in order, removes, clears the route cache", function()
      local resp = headers_run([[
        return callout.add_header_mutation{ add = { {"x-b", "2"}, {"x-a", "1"} },
                                            remove = { "x-gone" }, clear_route_cache = true }]])
      assert.header_set(resp, "x-b", "2")
      assert.header_set(resp, "x-a", "1")
      assert.header_removed(resp, "x-gone")
      local common = resp.request_headers.response
      assert.is_true(common.clear_route_cache)
      assert.same({ "x-b", "x-a" }, { common.header_mutation.set_headers[1].header.key,
                                      common.header_mutation.set_headers[2].header.key })
    end)

    it("sends a map sorted by name, numbers as strings", function()
      local resp = headers_run([[ return callout.add_header_mutation{ add = { zz = "z", aa = 7 } } ]])
      local set = resp.request_headers.response.header_mutation.set_headers
      assert.same({ "aa", "7" }, { set[1].header.key, set[1].header.raw_value })
      assert.same({ "zz", "z" }, { set[2].header.key, set[2].header.raw_value })
    end)

    it("applies append_action to every header", function()
      local resp = headers_run([[
        return callout.add_header_mutation{ add = { {"x-a", "1"}, {"x-b", "2"} },
                                            append_action = "OVERWRITE_IF_EXISTS_OR_ADD" }]])
      for _, o in ipairs(resp.request_headers.response.header_mutation.set_headers) do
        assert.equal("OVERWRITE_IF_EXISTS_OR_ADD", o.append_action)
      end
    end)

    it("sends APPEND_IF_EXISTS_OR_ADD with append = true, as stock Envoy reads it", function()
      local resp = headers_run([[
        return callout.add_header_mutation{ add = { {"x-a", "1"} },
                                            append_action = "APPEND_IF_EXISTS_OR_ADD" }]])
      assert.is_true(resp.request_headers.response.header_mutation.set_headers[1].append)
    end)

    it("with no options continues unchanged", function()
      assert.unchanged(headers_run("return callout.add_header_mutation{}"))
      assert.unchanged(headers_run("return callout.add_header_mutation()"))
    end)

    it("works in the trailers phases", function()
      local s = handler("response_trailers", [[
        return callout.add_header_mutation{ add = { {"x-t", "1"} }, remove = { "grpc-message" } }]])
      local resp = testing.run(s, testing.response_trailers { ["grpc-status"] = "0" })
      assert.header_set(resp, "x-t", "1")
      assert.header_removed(resp, "grpc-message")
    end)

    it("refuses a misspelt option, naming it and the script line", function()
      local r = headers_call([[return callout.add_header_mutation{ remvoe = { "x-a" } }]])
      assert.grpc_error(r, "INTERNAL", ":2: callout.add_header_mutation: unknown option 'remvoe'")
    end)

    it("refuses a wrong type", function()
      local r = headers_call([[return callout.add_header_mutation{ remove = "x-a" }]])
      assert.grpc_error(r, "INTERNAL", "remove must be a table or nil, got string")
      r = headers_call([[return callout.add_header_mutation("x-a")]])
      assert.grpc_error(r, "INTERNAL", "expects a table of options, got string")
    end)

    it("refuses an unknown append_action when the table is checked", function()
      local r = headers_call([[
        return callout.add_header_mutation{ add = { {"x", "1"} }, append_action = "SOMETIMES" }]])
      assert.grpc_error(r, "INTERNAL", "SOMETIMES")
    end)
  end)

  describe("add_body_mutation", function()
    local function body_run(src, opts)
      return testing.run(handler("request_body", src), testing.request_body("original", opts))
    end

    it("replaces the body", function()
      assert.body_replaced(body_run([[return callout.add_body_mutation{ body = "replaced" }]]),
                           "replaced")
    end)

    it("clears the body", function()
      assert.body_cleared(body_run([[return callout.add_body_mutation{ clear_body = true }]]))
    end)

    it("prefers body over clear_body and logs a warning, as the Python SDK does", function()
      local resp = body_run([[return callout.add_body_mutation{ body = "wins", clear_body = true }]])
      assert.body_replaced(resp, "wins")
      assert.is_not.body_cleared(resp)
      assert.matches("WARN stream 1: add_body_mutation: body and clear_body are mutually " ..
                     "exclusive; using body", testing.logs()[1], 1, true)
    end)

    it("clears the route cache", function()
      local resp = body_run([[
        return callout.add_body_mutation{ body = "b", clear_route_cache = true }]])
      assert.is_true(resp.request_body.response.clear_route_cache)
      assert.body_replaced(resp, "b")
    end)

    it("with no options continues unchanged", function()
      assert.unchanged(body_run("return callout.add_body_mutation{}"))
    end)

    it("works on response bodies, binary-safe", function()
      local s = handler("response_body", [[return callout.add_body_mutation{ body = msg.body .. "\0!" }]])
      assert.body_replaced(testing.run(s, testing.response_body("a\0b")), "a\0b\0!")
    end)

    it("refuses a wrong type", function()
      local r = testing.call(handler("request_body", "return callout.add_body_mutation{ body = 1 }"),
                             testing.request_body("x"))
      assert.grpc_error(r, "INTERNAL", "callout.add_body_mutation: body must be a string or nil, got number")
    end)
  end)

  describe("header_immediate_response", function()
    it("answers with a status and headers", function()
      local resp = headers_run([[
        return callout.header_immediate_response(403, { {"x-why", "nope"}, {"x-two", "2"} })]])
      assert.immediate(resp, 403)
      assert.immediate(resp, "Forbidden")
      assert.header_set(resp, "x-why", "nope")
      assert.header_set(resp, "x-two", "2")
    end)

    it("applies append_action to the headers", function()
      local resp = headers_run([[
        return callout.header_immediate_response(302, { {"location", "https://example.com/"} },
                                                 "ADD_IF_ABSENT")]])
      assert.immediate(resp, 302)
      assert.equal("ADD_IF_ABSENT", resp.immediate_response.headers.set_headers[1].append_action)
    end)

    it("works without headers", function()
      local resp = headers_run([[return callout.header_immediate_response(404)]])
      assert.immediate(resp, 404)
      assert.is_nil(resp.immediate_response.headers)
    end)

    it("works in a body phase too", function()
      local s = handler("request_body", [[return callout.header_immediate_response(413)]])
      assert.immediate(testing.run(s, testing.request_body("x")), 413)
    end)

    it("refuses a status that is not an integer, or out of range", function()
      assert.grpc_error(headers_call([[return callout.header_immediate_response("403")]]),
                        "INTERNAL", "status must be an integer HTTP status, got 403")
      assert.grpc_error(headers_call([[return callout.header_immediate_response(42)]]), "INTERNAL")
    end)
  end)

  describe("deny_callout", function()
    it("fails the stream with PERMISSION_DENIED and the default message", function()
      assert.denied(headers_call("callout.deny_callout()"), "Callout DENIED.")
    end)

    it("carries the message", function()
      local s = handler("request_headers", [[callout.deny_callout("no entry for you")]])
      assert.denied(function() testing.run(s, testing.request_headers {}) end, "no entry for you")
      assert.matches("WARN stream 1: on_request_headers denied the request: no entry for you",
                     testing.logs()[1], 1, true)
    end)

    it("works from deep inside the script", function()
      local r = headers_call([[
        local function check_token(t) if t ~= "ok" then callout.deny_callout("bad token") end end
        check_token(msg:get("x-token"))]], { ["x-token"] = "nope" })
      assert.denied(r, "bad token")
    end)

    it("survives a pcall that re-raises it", function()
      assert.denied(headers_call([[
        local ok, err = pcall(callout.deny_callout, "caught and rethrown")
        error(err)]]), "caught and rethrown")
    end)

    it("does nothing when the script swallows it", function()
      assert.unchanged(headers_run([[pcall(callout.deny_callout, "never mind")]]))
    end)

    it("works in every phase", function()
      local s = testing.load_string([[
        local function deny(_, ctx) callout.deny_callout("no " .. ctx.phase) end
        on_request_headers, on_response_headers = deny, deny
        on_request_body, on_response_body = deny, deny
        on_request_trailers, on_response_trailers = deny, deny]])
      for _, req in ipairs {
        testing.request_headers {}, testing.response_headers {}, testing.request_body "",
        testing.response_body "", testing.request_trailers {}, testing.response_trailers {},
      } do
        local phase = next(req)
        assert.denied(testing.call(s, req), "no " .. phase)
      end
    end)

    it("refuses a message that is not a string", function()
      assert.grpc_error(headers_call("callout.deny_callout(42)"), "INTERNAL",
                        "callout.deny_callout: the message must be a string or nil, got number")
    end)
  end)

  describe("headers_contain", function()
    local src = [[
      local hc = callout.headers_contain
      return { dynamic_metadata = { r = {
        hc(msg, "X-Token"), hc(msg, "x-token", "secret"), hc(msg, "x-token", "SECRET"),
        hc(msg, "x-missing"), hc({ {"A", "1"} }, "a", "1"), hc({}, "a") } } }]]

    it("compares names case-insensitively and values exactly", function()
      local resp = headers_run(src, { { "x-token", "secret" } })
      assert.same({ true, true, false, false, true, false }, resp.dynamic_metadata.r)
    end)

    it("refuses a non-table", function()
      assert.grpc_error(headers_call([[callout.headers_contain("x", "y")]]), "INTERNAL",
                        "headers must be a table, got string")
    end)
  end)

  describe("body_contains", function()
    it("finds plain text, not patterns, in a body object or a string", function()
      local s = handler("request_body", [[
        local bc = callout.body_contains
        return { dynamic_metadata = { r = {
          bc(msg, "needle.x"), bc(msg, "needle%.x"), bc(msg.body, "hay"), bc(msg, "\0"),
          bc(msg, "absent") } } }]])
      local resp = testing.run(s, testing.request_body("hay needle.x\0"))
      assert.same({ true, false, true, true, false }, resp.dynamic_metadata.r)
    end)

    it("refuses a missing text", function()
      local s = handler("request_body", [[callout.body_contains(msg)]])
      assert.grpc_error(testing.call(s, testing.request_body("x")), "INTERNAL",
                        "callout.body_contains: the text must be a string, got nil")
    end)
  end)

  describe("build_dynamic_forwarding_metadata", function()
    it("builds what Google Cloud's dynamic forwarding reads", function()
      local resp = headers_run([[
        return { dynamic_metadata = callout.build_dynamic_forwarding_metadata("10.1.2.3", 8443),
                 add = { {"x-routed", "1"} } }]])
      assert.same({ ["com.google.envoy.dynamic_forwarding.selected_endpoints"] =
                      { primary = "10.1.2.3:8443" } }, resp.dynamic_metadata)
      assert.header_set(resp, "x-routed", "1")
    end)

    it("refuses a port that is not an integer from 0 to 65535", function()
      assert.grpc_error(headers_call([[callout.build_dynamic_forwarding_metadata("10.0.0.1", "80")]]),
                        "INTERNAL", "the port must be an integer from 0 to 65535, got 80")
      assert.grpc_error(headers_call([[callout.build_dynamic_forwarding_metadata("10.0.0.1", 70000)]]),
                        "INTERNAL", "got 70000")
    end)
  end)

  describe("log", function()
    it("writes lines tagged with the stream id, formatted like string.format", function()
      headers_run([[
        callout.log.debug("debug %d", 1)
        callout.log.info("hello from %s, stream %d", ctx.phase, ctx.stream_id)
        callout.log.warn("100% lone message")
        callout.log.error("err")]])
      assert.same({ "DEBUG stream 1: debug 1", "INFO stream 1: hello from request_headers, stream 1",
                    "WARN stream 1: 100% lone message", "ERROR stream 1: err" }, testing.logs())
    end)

    it("says 'script:' outside handlers", function()
      testing.load_string([[callout.log.info("loaded") function on_request_headers() end]])
      assert.same({ "INFO script: loaded" }, testing.logs())
    end)

    it("refuses a bad format", function()
      assert.grpc_error(headers_call([[callout.log.info("%d", "x")]]), "INTERNAL",
                        ":2: callout.log.info: bad argument #2 to 'string.format'")
    end)
  end)

  describe("null", function()
    it("is JSON null in dynamic_metadata, and callout.null in what Envoy sends", function()
      local resp = headers_run([[
        local a = ctx.attributes.ns
        return { dynamic_metadata = { ns = { none = callout.null,
                                             seen = a.gone == callout.null } } }]],
        {}, { attributes = { ns = { gone = testing.null } } })
      assert.equal(testing.null, resp.dynamic_metadata.ns.none)
      assert.is_true(resp.dynamic_metadata.ns.seen)
    end)
  end)
end)
