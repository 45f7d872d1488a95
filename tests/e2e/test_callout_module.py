"""The `callout` module (docs/lua-api.md, "The `callout` module") through the real server:
each helper used in a handler gives the response the Google Python SDK's callout_tools
helper would have built (harness.add_header_mutation & co. build those)."""

import re
import time

import grpc
import pytest

import harness as h
from harness import base_pb2, pb, struct_pb2

OK = grpc.StatusCode.OK
INTERNAL = grpc.StatusCode.INTERNAL
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED

DF_NAMESPACE = "com.google.envoy.dynamic_forwarding.selected_endpoints"

# One script, the case picked from the 'x-case' header or from a leading 'case=NAME' body.
MODULE_LUA = r'''-- callout_module.lua
callout.log.info("module script loaded, null is %s", tostring(callout.null))

local C = {}

C.hm = function()
  return callout.add_header_mutation{ add = { {"x-a", "1"}, {"x-b", "2"} }, remove = { "x-gone" },
                                      clear_route_cache = true }
end
C.hm_action = function()
  return callout.add_header_mutation{ add = { {"x-a", "1"} }, append_action = "OVERWRITE_IF_EXISTS_OR_ADD" }
end
C.hm_remove = function() return callout.add_header_mutation{ remove = { "x-a", "x-b" } } end
C.body = function() return callout.add_body_mutation{ body = "replaced" } end
C.body_crc = function() return callout.add_body_mutation{ body = "r2", clear_route_cache = true } end
C.clear = function() return callout.add_body_mutation{ clear_body = true } end
C.body_and_clear = function() return callout.add_body_mutation{ body = "body wins", clear_body = true } end
C.immediate = function() return callout.header_immediate_response(403, { {"x-why", "nope"}, {"x-two", "2"} }) end
C.immediate_action = function()
  return callout.header_immediate_response(302, { {"location", "https://example.com/"} }, "ADD_IF_ABSENT")
end
C.immediate_bare = function() return callout.header_immediate_response(404) end
C.deny = function() callout.deny_callout() end
C.deny_msg = function() callout.deny_callout("no entry for you") end
C.deny_nested = function()
  local function check_token(t) if t ~= "ok" then callout.deny_callout("bad token") end end
  check_token("nope")
end
C.deny_rethrown = function()
  local ok, err = pcall(callout.deny_callout, "caught and rethrown")
  assert(not ok)
  error(err)
end
C.forward = function()
  return { dynamic_metadata = callout.build_dynamic_forwarding_metadata("10.1.2.3", 8443) }
end
C.forward_add = function(msg)
  return { add = { {"x-routed", "1"} },
           dynamic_metadata = callout.build_dynamic_forwarding_metadata("192.168.0.9", 80) }
end
C.null = function()
  return { dynamic_metadata = { ["test.ns"] = { none = callout.null,
                                              same = require("callout") == callout } } }
end
C.log = function(msg, ctx)
  callout.log.info("hello from %s, stream %d", ctx.phase, ctx.stream_id)
  callout.log.warn("100% lone message")
  return callout.add_header_mutation{ add = { {"x-stream-id", tostring(ctx.stream_id)} } }
end
C.bad_option = function()
  return callout.add_header_mutation{ remvoe = { "x-a" } }
end
C.bad_port = function()
  local md = callout.build_dynamic_forwarding_metadata("10.0.0.1", "80")
  return { dynamic_metadata = md }
end
C.contain = function(hh)
  return callout.add_header_mutation{ add = {
    {"has-token", tostring(callout.headers_contain(hh, "X-Token"))},
    {"has-token-secret", tostring(callout.headers_contain(hh, "x-token", "secret"))},
    {"has-token-other", tostring(callout.headers_contain(hh, "x-token", "other"))},
    {"has-missing", tostring(callout.headers_contain(hh, "x-missing"))},
  } }
end
C.body_has = function(b)
  return callout.add_header_mutation{ add = {
    {"has-needle", tostring(callout.body_contains(b, "needle.x"))},
    {"has-pattern", tostring(callout.body_contains(b, "needle%.x"))},
    {"has-string", tostring(callout.body_contains(b.body, "hay"))},
  } }
end

local function hcase(hh)
  for _, kv in ipairs(hh) do if kv[1] == "x-case" then return kv[2] end end
end
local function bcase(b) return b.body:match("^case=([%w_]+)") end
local function run(name, msg, ctx)
  local f = name and C[name]
  if f then return f(msg, ctx) end
end

function on_request_headers(hh, ctx) return run(hcase(hh), hh, ctx) end
function on_response_headers(hh, ctx) return run(hcase(hh), hh, ctx) end
function on_request_trailers(t, ctx) return run(hcase(t), t, ctx) end
function on_request_body(b, ctx) return run(bcase(b), b, ctx) end
function on_response_body(b, ctx) return run(bcase(b), b, ctx) end
'''


def line_of(needle):
    for i, l in enumerate(MODULE_LUA.splitlines(), 1):
        if needle in l:
            return i
    raise AssertionError(needle)


@pytest.fixture(scope="module")
def server(module_servers):
    return module_servers.start(module_servers.script(MODULE_LUA, "callout_module.lua"))


@pytest.fixture(scope="module")
def stub(server):
    return server.stub()


def case_req(phase, case, extra_headers=(), body=""):
    if phase in h.HEADER_PHASES:
        return h.headers_req(phase, [(":path", "/"), ("x-case", case), *extra_headers])
    if phase in h.BODY_PHASES:
        return h.body_req(phase, f"case={case}{body}".encode(), end_of_stream=True)
    return h.trailers_req(phase, [("x-case", case), *extra_headers])


def one(stub, req):
    responses, code, details = h.process(stub, [req])
    assert code == OK, f"{code}: {details}"
    assert len(responses) == 1, responses
    return responses[0]


def check(got, expected):
    assert got == expected, f"got:\n{got}\nexpected:\n{expected}"


def wait_log(server, pattern, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, server.log(), re.M)
        if m:
            return m
        time.sleep(0.05)
    pytest.fail(f"server log never matched {pattern!r}:\n{server.log()}")


# --------------------------------------------------------------------------------------------
# The SDK's helpers, where harness has no equivalent yet
# --------------------------------------------------------------------------------------------

def sdk_header_immediate_response(code, headers=None, append_action=None):
    """callout_tools.header_immediate_response, wrapped in a ProcessingResponse."""
    imm = pb.ImmediateResponse()
    imm.status.code = code
    if headers:
        mutation = pb.HeaderMutation()
        for k, v in headers:
            mutation.set_headers.append(h.hvo(k, v, append_action))
        imm.headers.CopyFrom(mutation)
    return pb.ProcessingResponse(immediate_response=imm)


def body_with_headers(add):
    """A BodyResponse that adds headers (what `add` in a body phase gives)."""
    resp = pb.BodyResponse()
    resp.response.header_mutation.CopyFrom(h.add_header_mutation(add=add).response.header_mutation)
    return resp


def sdk_build_dynamic_forwarding_metadata(ip_address, port_number):
    """callout_tools.build_dynamic_forwarding_metadata."""
    s = struct_pb2.Struct()
    s.get_or_create_struct(DF_NAMESPACE)["primary"] = "%s:%d" % (ip_address, port_number)
    return s


# --------------------------------------------------------------------------------------------
# add_header_mutation / add_body_mutation
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("phase", h.HEADER_PHASES)
def test_add_header_mutation(stub, phase):
    got = one(stub, case_req(phase, "hm"))
    check(got, h.wrap(phase, h.add_header_mutation(add=[("x-a", "1"), ("x-b", "2")],
                                                   remove=["x-gone"], clear_route_cache=True)))


def test_add_header_mutation_append_action(stub):
    got = one(stub, case_req("request_headers", "hm_action"))
    check(got, h.wrap("request_headers", h.add_header_mutation(
        add=[("x-a", "1")], append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)))


def test_add_header_mutation_remove_only(stub):
    got = one(stub, case_req("request_headers", "hm_remove"))
    check(got, h.wrap("request_headers", h.add_header_mutation(remove=["x-a", "x-b"])))


def test_add_header_mutation_in_trailers(stub):
    got = one(stub, case_req("request_trailers", "hm_remove"))
    check(got, h.wrap("request_trailers", h.trailers_mutation(remove=["x-a", "x-b"])))


@pytest.mark.parametrize("phase", h.BODY_PHASES)
@pytest.mark.parametrize("case,kw", [
    ("body", dict(body="replaced")),
    ("body_crc", dict(body="r2", clear_route_cache=True)),
    ("clear", dict(clear_body=True)),
])
def test_add_body_mutation(stub, phase, case, kw):
    got = one(stub, case_req(phase, case))
    check(got, h.wrap(phase, h.add_body_mutation(**kw)))


def test_add_body_mutation_body_wins_with_warning(server, stub):
    got = one(stub, case_req("request_body", "body_and_clear"))
    check(got, h.wrap("request_body", h.add_body_mutation(body="body wins", clear_body=True)))
    wait_log(server, r"WARN +stream \d+: add_body_mutation: body and clear_body are mutually exclusive")


# --------------------------------------------------------------------------------------------
# header_immediate_response
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("phase", ["request_headers", "response_headers", "request_body"])
def test_header_immediate_response(stub, phase):
    got = one(stub, case_req(phase, "immediate"))
    check(got, sdk_header_immediate_response(403, [("x-why", "nope"), ("x-two", "2")]))
    check(got, h.immediate(403, [("x-why", "nope"), ("x-two", "2")]))


def test_header_immediate_response_append_action(stub):
    got = one(stub, case_req("request_headers", "immediate_action"))
    check(got, sdk_header_immediate_response(302, [("location", "https://example.com/")],
                                             base_pb2.HeaderValueOption.ADD_IF_ABSENT))


def test_header_immediate_response_status_only(stub):
    got = one(stub, case_req("request_headers", "immediate_bare"))
    check(got, sdk_header_immediate_response(404))


# --------------------------------------------------------------------------------------------
# deny_callout
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case,message", [
    ("deny", "Callout DENIED."),
    ("deny_msg", "no entry for you"),
    ("deny_nested", "bad token"),
    ("deny_rethrown", "caught and rethrown"),
])
@pytest.mark.parametrize("phase", ["request_headers", "response_body"])
def test_deny_callout(server, stub, phase, case, message):
    responses, code, details = h.process(stub, [case_req(phase, case)])
    assert (responses, code, details) == ([], PERMISSION_DENIED, message)
    # the SDK logs a warning; the server does, with the stream id and the handler
    wait_log(server, rf"WARN +stream \d+: .*{re.escape(message)}$")


def test_deny_ends_only_its_stream(stub):
    _, code, _ = h.process(stub, [case_req("request_headers", "deny")])
    assert code == PERMISSION_DENIED
    got = one(stub, case_req("request_headers", "hm_remove"))
    check(got, h.wrap("request_headers", h.add_header_mutation(remove=["x-a", "x-b"])))


# --------------------------------------------------------------------------------------------
# headers_contain / body_contains
# --------------------------------------------------------------------------------------------

def test_headers_contain(stub):
    got = one(stub, case_req("request_headers", "contain", [("x-token", "secret")]))
    check(got, h.wrap("request_headers", h.add_header_mutation(add=[
        ("has-token", "true"), ("has-token-secret", "true"), ("has-token-other", "false"),
        ("has-missing", "false")])))


def test_headers_contain_in_trailers(stub):
    got = one(stub, case_req("request_trailers", "contain", [("x-token", "other")]))
    check(got, h.wrap("request_trailers", h.trailers_mutation(add=[
        ("has-token", "true"), ("has-token-secret", "false"), ("has-token-other", "true"),
        ("has-missing", "false")])))


def test_body_contains(stub):
    got = one(stub, case_req("request_body", "body_has", body=" hay needle.x hay"))
    check(got, h.wrap("request_body", body_with_headers([
        ("has-needle", "true"), ("has-pattern", "false"), ("has-string", "true")])))


# --------------------------------------------------------------------------------------------
# build_dynamic_forwarding_metadata, callout.null, require
# --------------------------------------------------------------------------------------------

def test_dynamic_forwarding_metadata(stub):
    got = one(stub, case_req("request_headers", "forward"))
    assert got.WhichOneof("response") == "request_headers"
    check(got.dynamic_metadata, sdk_build_dynamic_forwarding_metadata("10.1.2.3", 8443))
    expected = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
    expected.dynamic_metadata.CopyFrom(sdk_build_dynamic_forwarding_metadata("10.1.2.3", 8443))
    check(h.strip_empty(got), h.strip_empty(expected))


def test_dynamic_forwarding_metadata_with_mutation(stub):
    got = one(stub, case_req("request_body", "forward_add"))
    expected = h.wrap("request_body", body_with_headers([("x-routed", "1")]))
    expected.dynamic_metadata.CopyFrom(sdk_build_dynamic_forwarding_metadata("192.168.0.9", 80))
    check(got, expected)


def test_null_and_require(stub):
    got = one(stub, case_req("request_headers", "null"))
    expected = struct_pb2.Struct()
    expected.get_or_create_struct("test.ns").update({"none": None, "same": True})
    check(got.dynamic_metadata, expected)


# --------------------------------------------------------------------------------------------
# callout.log, argument errors
# --------------------------------------------------------------------------------------------

def test_log_lines_carry_the_stream_id(server, stub):
    got = one(stub, case_req("request_headers", "log"))
    [sid] = [o.header.raw_value.decode() for o in got.request_headers.response.header_mutation.set_headers
             if o.header.key == "x-stream-id"]
    wait_log(server, rf"INFO +stream {sid}: hello from request_headers, stream {sid}$")
    wait_log(server, rf"WARN +stream {sid}: 100% lone message$")


def test_log_at_load_time(server):
    wait_log(server, r"INFO +script: module script loaded, null is userdata: ")


def test_argument_error_names_the_script_line(stub):
    # `return callout.f{...}` is a tail call: the line must survive it
    responses, code, details = h.process(stub, [case_req("request_headers", "bad_option")])
    assert (responses, code) == ([], INTERNAL), details
    line = line_of("remvoe")
    assert f"callout_module.lua:{line}: callout.add_header_mutation: unknown option 'remvoe'" \
        in details, details


def test_argument_error_port(stub):
    responses, code, details = h.process(stub, [case_req("request_headers", "bad_port")])
    assert (responses, code) == ([], INTERNAL), details
    line = line_of('"10.0.0.1", "80"')
    assert f"callout_module.lua:{line}: callout.build_dynamic_forwarding_metadata: " \
           f"the port must be an integer" in details, details
