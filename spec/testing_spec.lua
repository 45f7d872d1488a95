-- callout.testing itself (docs/testing.md): loading, the request constructors, run / call /
-- streams, and the assertions.

local testing = require "callout.testing"

-- A script that answers every headers phase with what it received, as dynamic_metadata:
-- the header list, end_of_stream, and the ctx fields.
local ECHO = [[
local function echo(h, ctx)
  local list = {}
  for i, kv in ipairs(h) do list[i] = { kv[1], kv[2] } end
  return { dynamic_metadata = { echo = {
    headers = list, end_of_stream = h.end_of_stream == true, phase = ctx.phase,
    stream_id = ctx.stream_id, attributes = ctx.attributes, metadata = ctx.metadata,
    protocol_config = ctx.protocol_config or false, observability_mode = ctx.observability_mode,
    count = (function() ctx.state.n = (ctx.state.n or 0) + 1 return ctx.state.n end)(),
  } } }
end
on_request_headers, on_response_headers = echo, echo
on_request_trailers, on_response_trailers = echo, echo
function on_request_body(b, ctx)
  -- Struct strings cannot hold NUL bytes: show them as \0
  return { dynamic_metadata = { echo = { body = (b.body:gsub("%z", "\\0")),
                                         end_of_stream = b.end_of_stream,
                                         phase = ctx.phase } } }
end
on_response_body = on_request_body
]]

-- The message whose error() call raised `fn`'s error, without the location busted adds.
local function error_of(fn)
  local ok, err = pcall(fn)
  assert.is_false(ok)
  return tostring(err)
end

describe("callout.testing", function()
  local echo = testing.load_string(ECHO)
  local function echoed(req) return testing.run(echo, req).dynamic_metadata.echo end

  describe("load", function()
    it("raises file:line: msg for a script that does not compile, at the spec's line", function()
      assert.matches("^.-spec/testing_spec%.lua:%d+: cannot open spec/does%-not%-exist%.lua: " ..
                     "No such file or directory$", error_of(function()
        testing.load("spec/does-not-exist.lua")
      end))
      assert.matches("^.-spec/testing_spec%.lua:%d+: /tmp/[^:]+:2: .*'end' expected", error_of(function()
        testing.load_string("function on_request_headers()\n")
      end))
    end)

    it("raises the error of a failing top level", function()
      assert.matches(": /tmp/[^:]+:1: boom$", error_of(function()
        testing.load_string("error('boom')")
      end))
    end)

    it("gives every load a fresh VM", function()
      local src = [[
        seen = seen or 0
        function on_request_headers() seen = seen + 1 return { add = { {"seen", seen} } } end]]
      local a, b = testing.load_string(src), testing.load_string(src)
      assert.header_set(testing.run(a, testing.request_headers {}), "seen", "1")
      assert.header_set(testing.run(a, testing.request_headers {}), "seen", "2")
      assert.header_set(testing.run(b, testing.request_headers {}), "seen", "1")
    end)

    it("refuses a non-string path", function()
      assert.has_error(function() testing.load(42) end, "testing.load: expects a path, got number")
    end)
  end)

  describe("header constructors", function()
    it("send a map sorted by name", function()
      local e = echoed(testing.request_headers { [":path"] = "/", foo = "bar", ["x-n"] = 7 })
      assert.same({ { ":path", "/" }, { "foo", "bar" }, { "x-n", "7" } }, e.headers)
      assert.is_false(e.end_of_stream)
      assert.equal("request_headers", e.phase)
    end)

    it("send a list of pairs in order, duplicates kept", function()
      local e = echoed(testing.response_headers { { "b", "1" }, { "a", "2" }, { "b", "3" } })
      assert.same({ { "b", "1" }, { "a", "2" }, { "b", "3" } }, e.headers)
      assert.equal("response_headers", e.phase)
    end)

    it("send a list value in a map as one header per entry", function()
      local e = echoed(testing.request_headers { cookie = { "a=1", "b=2" } })
      assert.same({ { "cookie", "a=1" }, { "cookie", "b=2" } }, e.headers)
    end)

    it("take end_of_stream", function()
      assert.is_true(echoed(testing.request_headers({}, { end_of_stream = true })).end_of_stream)
    end)

    it("build trailers", function()
      local e = echoed(testing.request_trailers { ["x-checksum"] = "abc" })
      assert.same({ { "x-checksum", "abc" } }, e.headers)
      assert.equal("request_trailers", e.phase)
      assert.equal("response_trailers", echoed(testing.response_trailers {}).phase)
    end)

    it("are plain ProcessingRequest tables", function()
      assert.same({ request_headers = { headers = { headers = { { key = "a", raw_value = "1" } } },
                                        end_of_stream = true } },
                  testing.request_headers({ a = 1 }, { end_of_stream = true }))
      assert.same({ response_trailers = { trailers = { headers = {} } } },
                  testing.response_trailers())
    end)

    it("refuse what they cannot send, at the spec's line", function()
      assert.has_error(function() testing.request_headers("x") end,
                       "testing.request_headers: headers must be a table, got string")
      assert.has_error(function() testing.request_headers { foo = true } end,
                       "testing.request_headers: the value of header 'foo' must be a string or a number, got boolean")
      assert.has_error(function() testing.request_headers { { "a", "1" }, b = "2" } end,
                       "testing.request_headers: headers are a list of {name, value} pairs or a map {name = value}, not both")
      assert.has_error(function() testing.request_headers { "a" } end,
                       "testing.request_headers: header 1 must be a {name, value} pair")
      assert.has_error(function() testing.request_headers({}, { end_of_strem = true }) end,
                       "testing.request_headers: unknown option 'end_of_strem'")
      assert.has_error(function() testing.request_trailers({}, { end_of_stream = true }) end,
                       "testing.request_trailers: unknown option 'end_of_stream'")
      assert.matches("^.-spec/testing_spec%.lua:%d+: testing.request_headers",
                     error_of(function() testing.request_headers("x") end))
    end)
  end)

  describe("body constructors", function()
    it("send the bytes, binary-safe, and end_of_stream", function()
      local e = echoed(testing.request_body("a\0b", { end_of_stream = true }))
      assert.same({ body = "a\\0b", end_of_stream = true, phase = "request_body" }, e)
      e = echoed(testing.response_body())
      assert.same({ body = "", end_of_stream = false, phase = "response_body" }, e)
    end)

    it("refuse a non-string body", function()
      assert.has_error(function() testing.request_body(42) end,
                       "testing.request_body: the body must be a string, got number")
    end)
  end)

  describe("request options", function()
    it("carry attributes, metadata_context and protocol_config into ctx", function()
      local e = echoed(testing.request_headers({}, {
        attributes = { ["envoy.filters.http.ext_proc"] = { ["request.path"] = "/x" } },
        metadata_context = { filter_metadata = { ["my.ns"] = { user = "ann", n = 2 } } },
        protocol_config = { request_body_mode = "FULL_DUPLEX_STREAMED" },
      }))
      assert.same({ ["envoy.filters.http.ext_proc"] = { ["request.path"] = "/x" } }, e.attributes)
      assert.same({ ["my.ns"] = { user = "ann", n = 2 } }, e.metadata)
      assert.same({ request_body_mode = "FULL_DUPLEX_STREAMED", response_body_mode = "NONE",
                    send_body_without_waiting_for_header_response = false }, e.protocol_config)
    end)

    it("send observability_mode: the handler runs, nothing is sent", function()
      local r = testing.call(echo, testing.request_headers({}, { observability_mode = true }))
      assert.is_true(r.ok)
      assert.equal("none", r.outcome)
      assert.same({}, r.responses)
      assert.is_nil(testing.run(echo, testing.request_headers({}, { observability_mode = true })))
    end)

    it("are checked by the encoder, which names the field", function()
      assert.has_error(function()
        testing.run(echo, testing.request_headers({}, { protocol_config = { request_body_mode = "FAST" } }))
      end)
      local msg = error_of(function()
        testing.run(echo, testing.request_headers({}, { protocol_config = { request_body_mode = "FAST" } }))
      end)
      assert.matches("testing: cannot encode the request: request.protocol_config.request_body_mode",
                     msg, 1, true)
    end)
  end)

  describe("run", function()
    it("returns the decoded response and its bytes", function()
      local s = testing.load_string([[function on_request_headers() return { add = { {"a", "1"} } } end]])
      local resp, raw = testing.run(s, testing.request_headers {})
      assert.header_set(resp, "a", "1")
      assert.equal("string", type(raw))
      assert.same(resp, require("callout.native").decode_response(raw))
    end)

    it("takes a raw ProcessingRequest table, for process() scripts", function()
      local s = testing.load_string([[
        function process(request, ctx)
          local h = request.request_headers.headers.headers[1]
          return { request_headers = { response = { header_mutation = {
            set_headers = { { header = { key = "x-raw", raw_value = h.key .. "=" .. h.raw_value } } } } } } }
        end]])
      local resp = testing.run(s, { request_headers = { headers = { headers = {
        { key = "k", raw_value = "v" } } } } })
      assert.header_set(resp, "x-raw", "k=v")
    end)

    it("takes request bytes; undecodable ones fail the stream with INVALID_ARGUMENT", function()
      assert.grpc_error(function() testing.run(echo, "\255\255\255") end, "INVALID_ARGUMENT",
                        "malformed ProcessingRequest")
      assert.grpc_error(function() testing.run(echo, "") end, "INVALID_ARGUMENT")
    end)

    it("raises the failure, printed with the spec's line", function()
      local s = testing.load_string("function on_request_headers() error('broken') end")
      local msg = error_of(function() testing.run(s, testing.request_headers {}) end)
      assert.matches("^.-spec/testing_spec%.lua:%d+: the stream failed with gRPC INTERNAL %(13%): " ..
                     "/tmp/[^:]+:1: broken$", msg)
    end)

    it("refuses a message answered with several responses", function()
      local s = testing.load_string([[function on_request_body() return { chunks = { "a", "b" } } end]])
      local req = testing.request_body("ab", {
        protocol_config = { request_body_mode = "FULL_DUPLEX_STREAMED" } })
      assert.has_error(function() testing.run(s, req) end,
                       "testing.run: the script sent 2 responses to one message; use testing.call or a stream's send to see them all")
      local r = testing.call(s, req)
      assert.equal(2, #r.responses)
      assert.same({ { "a", "b" }, false }, { testing.chunks(r) })
    end)
  end)

  describe("call", function()
    it("returns a result without raising", function()
      local s = testing.load_string("function on_request_headers() error('broken') end")
      local r = testing.call(s, testing.request_headers {})
      assert.is_false(r.ok)
      assert.equal("fail", r.outcome)
      assert.equal(13, r.status)
      assert.equal("INTERNAL", r.status_name)
      assert.matches(":1: broken$", r.message)
      assert.matches("^ERROR stream 1: on_request_headers failed: ", r.logs[1])
      assert.same(r.logs, testing.logs())
    end)

    it("starts a new stream each time", function()
      assert.equal(1, echoed(testing.request_headers {}).count)
      assert.equal(1, echoed(testing.request_headers {}).count)
    end)
  end)

  describe("stream", function()
    it("keeps ctx.state across messages, and a new stream starts afresh", function()
      local s = testing.load_string([[
        function on_request_headers(h, ctx) ctx.state.user = h:get("x-user") end
        function on_response_headers(h, ctx) return { add = { {"x-served-for", ctx.state.user} } } end]])
      local stream <close> = testing.stream(s)
      assert.unchanged(stream:run(testing.request_headers { ["x-user"] = "ann" }))
      assert.header_set(stream:run(testing.response_headers {}), "x-served-for", "ann")
      local other <close> = testing.stream(s)
      assert.grpc_error(other:send(testing.response_headers {}), "INTERNAL",
                        "'add' entry 1 is not a {name, value} pair")
    end)

    it("numbers streams of a script 1, 2, ...", function()
      local s = testing.load_string(ECHO)
      local a <close> = testing.stream(s)
      local b <close> = testing.stream(s)
      assert.equal(2, b:run(testing.request_headers {}).dynamic_metadata.echo.stream_id)
      assert.equal(1, a:run(testing.request_headers {}).dynamic_metadata.echo.stream_id)
      assert.equal(2, a:run(testing.request_headers {}).dynamic_metadata.echo.count)
    end)

    it("merges attributes across messages", function()
      local stream <close> = testing.stream(echo)
      stream:run(testing.request_headers({}, { attributes = { ns = { a = 1 } } }))
      local e = stream:run(testing.response_headers({}, { attributes = { ns = { b = 2 } } }))
        .dynamic_metadata.echo
      assert.same({ ns = { a = 1, b = 2 } }, e.attributes)
    end)

    it("ends at the first failure, as the server ends the call", function()
      local s = testing.load_string([[function on_request_headers() callout.deny_callout() end]])
      local stream <close> = testing.stream(s)
      assert.denied(stream:send(testing.request_headers {}))
      assert.has_error(function() stream:send(testing.response_headers {}) end,
                       "testing: this stream already failed (the stream failed with gRPC PERMISSION_DENIED (7): Callout DENIED.)")
    end)

    it("can be closed early", function()
      local stream = testing.stream(echo)
      stream:close()
      stream:close()
      assert.has_error(function() stream:send(testing.request_headers {}) end)
    end)
  end)

  it("maps gRPC status names to numbers", function()
    assert.equal(7, testing.grpc.PERMISSION_DENIED)
    assert.equal(13, testing.grpc.INTERNAL)
    assert.equal(3, testing.grpc.INVALID_ARGUMENT)
    assert.equal(16, testing.grpc.UNAUTHENTICATED)
  end)

  describe("assertions", function()
    local script = testing.load_string([[
      function on_request_headers(h)
        local case = h:get("x-case")
        if case == "immediate" then
          return { immediate = { status = 403, headers = { {"x-why", "no"} }, body = "denied" } }
        elseif case == "deny" then
          return { deny = "go away" }
        elseif case == "fail" then
          error("oops")
        elseif case == "replace" then
          return { status = "CONTINUE_AND_REPLACE", body = "new" }
        end
        return { add = { {"X-Upper", "1"}, {"hello", "service-extensions"} }, remove = { "foo" } }
      end
      function on_request_body(b)
        if b.body == "clear" then return { clear_body = true } end
        return { body = "replaced" }
      end]])
    local function run(case) return testing.run(script, testing.request_headers { ["x-case"] = case }) end
    local function call(case) return testing.call(script, testing.request_headers { ["x-case"] = case }) end
    local function failure(fn)
      local ok, err = pcall(fn)
      assert.is_false(ok, "the assertion should have failed")
      return tostring(err)
    end

    it("header_set: by name (any case) and value, in a response or a result", function()
      local resp = run("mutate")
      assert.header_set(resp, "hello", "service-extensions")
      assert.header_set(resp, "x-upper", "1")
      assert.header_set(resp, "hello")
      assert.header_set(call("mutate"), "hello")
      assert.is_not.header_set(resp, "hello", "other")
      assert.is_not.header_set(resp, "absent")
      assert.matches("expected header 'hello: other' to be set; the response sets: X-Upper: 1, " ..
                     "hello: service-extensions", failure(function()
                       assert.header_set(resp, "hello", "other") end), 1, true)
    end)

    it("header_set looks into immediate responses", function()
      assert.header_set(run("immediate"), "x-why", "no")
    end)

    it("header_removed", function()
      assert.header_removed(run("mutate"), "FOO")
      assert.is_not.header_removed(run("mutate"), "bar")
      assert.matches("expected header 'bar' to be removed; the response removes: foo",
                     failure(function() assert.header_removed(run("mutate"), "bar") end), 1, true)
    end)

    it("body_replaced and body_cleared, also in headers phases", function()
      assert.body_replaced(testing.run(script, testing.request_body("x")), "replaced")
      assert.body_cleared(testing.run(script, testing.request_body("clear")))
      assert.is_not.body_cleared(testing.run(script, testing.request_body("x")))
      assert.body_replaced(run("replace"), "new")
      assert.matches('expected the body to be replaced with "other"; got "replaced"',
                     failure(function()
                       assert.body_replaced(testing.run(script, testing.request_body("x")), "other")
                     end), 1, true)
    end)

    it("immediate, by number or status name", function()
      -- run returns the response and its bytes: parentheses keep just the response
      assert.immediate((run("immediate")))
      assert.matches("testing.run returns the response and its bytes",
                     failure(function() assert.immediate(run("immediate")) end), 1, true)
      assert.immediate(run("immediate"), 403)
      assert.immediate(run("immediate"), "Forbidden")
      assert.is_not.immediate(run("mutate"))
      assert.matches("expected an immediate response with status 404, got 403",
                     failure(function() assert.immediate(run("immediate"), 404) end), 1, true)
      assert.equal("denied", run("immediate").immediate_response.body)
    end)

    it("unchanged", function()
      assert.unchanged(testing.run(echo, testing.request_trailers {}) and
                       testing.run(testing.load_string("function on_request_headers() end"),
                                   testing.request_headers {}))
      assert.is_not.unchanged(run("mutate"))
      assert.is_not.unchanged(run("immediate"))
    end)

    it("denied, on a function or a result, with or without the message", function()
      assert.denied(function() run("deny") end)
      assert.denied(function() run("deny") end, "go away")
      assert.denied(call("deny"), "go away")
      assert.is_not.denied(call("fail"))
      assert.is_not.denied(function() run("mutate") end)
      assert.matches('expected a denial (gRPC PERMISSION_DENIED) with message "nope"; the stream ' ..
                     'failed with gRPC PERMISSION_DENIED (7): go away',
                     failure(function() assert.denied(call("deny"), "nope") end), 1, true)
      assert.matches("the stream did not fail",
                     failure(function() assert.denied(function() run("mutate") end) end), 1, true)
      assert.matches("the function raised something else: boom",
                     failure(function() assert.denied(function() error("boom", 0) end) end), 1, true)
    end)

    it("grpc_error, with a substring or a Lua pattern", function()
      assert.grpc_error(call("fail"), "INTERNAL")
      assert.grpc_error(call("fail"), "INTERNAL", ":8: oops")
      assert.grpc_error(function() run("fail") end, "INTERNAL", "^/tmp/.-:%d+: oops$")
      assert.is_not.grpc_error(call("fail"), "PERMISSION_DENIED")
      assert.is_not.grpc_error(call("fail"), "INTERNAL", "other")
    end)

    it("fail on a failed result, saying why", function()
      assert.matches("the stream failed with gRPC INTERNAL (13):",
                     failure(function() assert.header_set(call("fail"), "x") end), 1, true)
    end)
  end)
end)
