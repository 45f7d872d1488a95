"""Every part of docs/lua-api.md, through the real server: each return key, the empty
responses, and the inputs a handler sees."""

import grpc
import pytest

import harness as h
from harness import base_pb2, pb, struct_pb2

OK = grpc.StatusCode.OK

# --------------------------------------------------------------------------------------------
# One script with many cases. Header and trailer phases pick the case from the 'x-case'
# header (found with a plain ipairs walk), body phases from a leading 'case=NAME' in the body.
# --------------------------------------------------------------------------------------------
CASES_LUA = r'''
local C = {}

C.add_list = function() return { add = { {"z-last", "1"}, {"a-first", "2"}, {"m-mid", "3"}, {"a-first", "dup"} } } end
C.add_map = function() return { add = { zeta = "1", alpha = "2", ["mid-dle"] = "3", ["b-x"] = "4" } } end
C.add_numbers = function() return { add = { {"x-int", 42}, {"x-neg", -7}, {"x-float", 1.5} } } end
C.add_map_numbers = function() return { add = { ["x-int"] = 42, ["x-float"] = 0.25 } } end
C.add_binary = function() return { add = { {"x-bin", "\xff\xfe\x80ok"} } } end
C.remove = function() return { remove = { "foo", "x-bar", "baz" } } end
C.add_remove = function() return { add = { {"a", "1"} }, remove = { "b" } } end
C.crc = function() return { clear_route_cache = true } end
C.crc_false = function() return { clear_route_cache = false, add = { {"a", "1"} } } end
C.all = function() return { add = { {"a", "1"} }, remove = { "b" }, clear_route_cache = true } end
C.replace = function() return { status = "CONTINUE_AND_REPLACE", body = "replacement body" } end
C.replace_add = function() return { status = "CONTINUE_AND_REPLACE", body = "rb", add = { {"content-type", "text/plain"} } } end
C.continue = function() return { status = "CONTINUE", add = { {"a", "1"} } } end
C.empty_table = function() return {} end
C.replace_only = function() return { status = "CONTINUE_AND_REPLACE" } end
C.empty_body = function() return { body = "" } end
C.immediate_numbers = function() return { immediate = { status = 429, headers = { ["retry-after"] = 5 }, body = "" } } end
C.deny_utf8 = function() return { deny = "refusé ✓ — no" } end
C.body = function() return { body = "new body" } end
C.body_crc = function() return { body = "x", clear_route_cache = true } end
C.clear_body = function() return { clear_body = true } end
C.body_add = function() return { body = "b2", add = { {"x-from-body", "1"} } } end
C.body_replace = function() return { status = "CONTINUE_AND_REPLACE", body = "all new" } end
C.immediate_full = function()
  return { immediate = { status = 403, headers = { {"x-why", "nope"}, {"x-two", "2"} },
                         body = "denied\0body", details = "blocked by lua", grpc_status = 7 } }
end
C.immediate_default = function() return { immediate = {} } end
C.immediate_map = function()
  return { immediate = { status = 302, headers = { location = "https://example.com/", ["cache-control"] = "no-store" } } }
end
C.deny_msg = function() return { deny = "not allowed here" } end
C.deny_true = function() return { deny = true } end

local function hcase(h)
  for _, kv in ipairs(h) do if kv[1] == "x-case" then return kv[2] end end
end
local function bcase(b) return b.body:match("^case=([%w_]+)") end
local function run(name, msg, ctx)
  local f = name and C[name]
  if f then return f(msg, ctx) end
  return nil
end

function on_request_headers(h, ctx) return run(hcase(h), h, ctx) end
function on_response_headers(h, ctx) return run(hcase(h), h, ctx) end
function on_request_trailers(t, ctx) return run(hcase(t), t, ctx) end
function on_response_trailers(t, ctx) return run(hcase(t), t, ctx) end
function on_request_body(b, ctx) return run(bcase(b), b, ctx) end
function on_response_body(b, ctx) return run(bcase(b), b, ctx) end
'''

# Inputs echoed back as headers to add (a list, so order is kept).
ECHO_LUA = r'''
local function find(h, name)
  for _, kv in ipairs(h) do if kv[1] == name then return kv[2] end end
end

local function echo_headers(h, ctx)
  local out = { {"phase", ctx.phase}, {"n", #h}, {"eos", tostring(h.end_of_stream)} }
  for i, kv in ipairs(h) do out[#out + 1] = { "h" .. i, kv[1] .. "=" .. kv[2] } end
  local q = find(h, "x-q")
  if q then
    local all = h:get_all(q)
    out[#out + 1] = { "get", tostring(h:get(q)) }
    out[#out + 1] = { "all", table.concat(all, ",") }
    out[#out + 1] = { "nall", #all }
    out[#out + 1] = { "has", tostring(h:has(q)) }
    local qv = find(h, "x-qv")
    if qv then out[#out + 1] = { "hasv", tostring(h:has(q, qv)) } end
  end
  return { add = out }
end

local function echo_body(b, ctx)
  if b.body:sub(1, 5) == "?info" then
    return { add = { {"phase", ctx.phase}, {"eos", tostring(b.end_of_stream)}, {"len", #b.body},
                     {"type", type(b.body)} } }
  end
  return { body = b.body .. "!" }
end

on_request_headers = echo_headers
on_response_headers = echo_headers
on_request_trailers = echo_headers
on_response_trailers = echo_headers
on_request_body = echo_body
on_response_body = echo_body
'''

STATE_LUA = r'''
local function count(ctx) ctx.state.n = (ctx.state.n or 0) + 1 end

function on_request_headers(h, ctx)
  count(ctx)
  ctx.state.user = h:get("x-user")
  ctx.state.id = ctx.stream_id
  return { add = { {"x-stream-id", tostring(ctx.stream_id)}, {"x-id-type", math.type(ctx.stream_id) or type(ctx.stream_id)} } }
end

function on_request_body(b, ctx) count(ctx) end

function on_response_headers(h, ctx)
  count(ctx)
  return { add = { {"x-user-echo", ctx.state.user or "none"}, {"x-count", ctx.state.n},
                   {"x-stream-id", tostring(ctx.stream_id)},
                   {"x-same-id", tostring(ctx.state.id == ctx.stream_id)} } }
end
'''

NIL_LUA = r'''
function on_request_headers(h, ctx) return nil end
function on_response_headers(h, ctx) end
function on_request_body(b, ctx) return end
function on_response_body(b, ctx) return nil end
function on_request_trailers(t, ctx) end
function on_response_trailers(t, ctx) return nil end
'''

NO_HANDLERS_LUA = ("-- a handler for one phase only (a script must define one): every other\n"
                   "-- phase has none, and this one returns nil\nfunction on_request_trailers() end\n")


@pytest.fixture(scope="module")
def cases_server(module_servers):
    return module_servers.start(module_servers.script(CASES_LUA, "cases.lua"))


@pytest.fixture(scope="module")
def cases(cases_server):
    return cases_server.stub()


@pytest.fixture(scope="module")
def echo_server(module_servers):
    # above the 4 MiB default message limit, for test_large_body_8mib_echoed
    return module_servers.start(module_servers.script(ECHO_LUA, "echo.lua"),
                                "--max_message_kb", "16384")


@pytest.fixture(scope="module")
def echo(echo_server):
    return echo_server.stub()


@pytest.fixture(scope="module")
def state(module_servers):
    return module_servers.start(module_servers.script(STATE_LUA, "state.lua")).stub()


@pytest.fixture(scope="module")
def nil_stub(module_servers):
    return module_servers.start(module_servers.script(NIL_LUA, "nil.lua")).stub()


@pytest.fixture(scope="module")
def no_handlers_stub(module_servers):
    return module_servers.start(module_servers.script(NO_HANDLERS_LUA, "nohandlers.lua")).stub()


def case_req(phase, case, **extra):
    if phase in h.HEADER_PHASES:
        return h.headers_req(phase, [(":path", "/"), ("x-case", case)], **extra)
    if phase in h.BODY_PHASES:
        return h.body_req(phase, f"case={case}".encode(), end_of_stream=True, **extra)
    return h.trailers_req(phase, [("x-case", case)], **extra)


def one(stub, req):
    responses, code, details = h.process(stub, [req])
    assert code == OK, f"{code}: {details}"
    assert len(responses) == 1, responses
    return responses[0]


def check(got, expected):
    assert got == expected, f"got:\n{got}\nexpected:\n{expected}"


def common(phase, **kw):
    """A HeadersResponse/BodyResponse wrapped for phase, with CommonResponse fields kw."""
    inner = pb.HeadersResponse() if phase in h.HEADER_PHASES else pb.BodyResponse()
    inner.response.CopyFrom(pb.CommonResponse(**kw))
    return h.wrap(phase, inner)


def mutation(add=(), remove=()):
    return pb.HeaderMutation(set_headers=[h.hvo(k, v) for k, v in add], remove_headers=list(remove))


# --------------------------------------------------------------------------------------------
# add / remove / clear_route_cache
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("phase", h.HEADER_PHASES + h.BODY_PHASES)
def test_add_list_keeps_order(cases, phase):
    exp = common(phase, header_mutation=mutation(
        add=[("z-last", "1"), ("a-first", "2"), ("m-mid", "3"), ("a-first", "dup")]))
    check(one(cases, case_req(phase, "add_list")), exp)


def test_add_list_matches_sdk_helper(cases):
    check(one(cases, case_req("request_headers", "add_list")),
          h.wrap("request_headers", h.add_header_mutation(
              add=[("z-last", "1"), ("a-first", "2"), ("m-mid", "3"), ("a-first", "dup")])))


@pytest.mark.parametrize("phase", h.HEADER_PHASES)
def test_add_map_sorted_by_name(cases, phase):
    check(one(cases, case_req(phase, "add_map")), h.wrap(phase, h.add_header_mutation(
        add=[("alpha", "2"), ("b-x", "4"), ("mid-dle", "3"), ("zeta", "1")])))


def test_add_numbers_converted(cases):
    check(one(cases, case_req("request_headers", "add_numbers")), h.wrap(
        "request_headers", h.add_header_mutation(add=[("x-int", "42"), ("x-neg", "-7"), ("x-float", "1.5")])))


def test_add_map_numbers_converted(cases):
    check(one(cases, case_req("response_headers", "add_map_numbers")), h.wrap(
        "response_headers", h.add_header_mutation(add=[("x-float", "0.25"), ("x-int", "42")])))


def test_add_binary_value_is_raw_bytes(cases):
    check(one(cases, case_req("request_headers", "add_binary")), h.wrap(
        "request_headers", h.add_header_mutation(add=[("x-bin", b"\xff\xfe\x80ok")])))


@pytest.mark.parametrize("phase", h.HEADER_PHASES + h.BODY_PHASES)
def test_remove(cases, phase):
    check(one(cases, case_req(phase, "remove")),
          common(phase, header_mutation=mutation(remove=["foo", "x-bar", "baz"])))


def test_add_and_remove(cases):
    check(one(cases, case_req("request_headers", "add_remove")),
          h.wrap("request_headers", h.add_header_mutation(add=[("a", "1")], remove=["b"])))


@pytest.mark.parametrize("phase", h.HEADER_PHASES + h.BODY_PHASES)
def test_clear_route_cache(cases, phase):
    check(one(cases, case_req(phase, "crc")), common(phase, clear_route_cache=True))


def test_clear_route_cache_false(cases):
    check(one(cases, case_req("request_headers", "crc_false")),
          h.wrap("request_headers", h.add_header_mutation(add=[("a", "1")])))


def test_add_remove_clear_route_cache_together(cases):
    check(one(cases, case_req("request_headers", "all")), h.wrap("request_headers", h.add_header_mutation(
        add=[("a", "1")], remove=["b"], clear_route_cache=True)))


@pytest.mark.parametrize("phase", h.TRAILER_PHASES)
def test_trailers_add_remove(cases, phase):
    check(one(cases, case_req(phase, "add_list")), h.wrap(phase, h.trailers_mutation(
        add=[("z-last", "1"), ("a-first", "2"), ("m-mid", "3"), ("a-first", "dup")])))
    check(one(cases, case_req(phase, "remove")),
          h.wrap(phase, h.trailers_mutation(remove=["foo", "x-bar", "baz"])))


def test_empty_table_is_empty_response(cases):
    h.assert_empty_response(one(cases, case_req("request_headers", "empty_table")), "request_headers")


# --------------------------------------------------------------------------------------------
# body / clear_body / status
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("phase", h.BODY_PHASES)
def test_body_replace(cases, phase):
    check(one(cases, case_req(phase, "body")), h.wrap(phase, h.add_body_mutation(body="new body")))


@pytest.mark.parametrize("phase", h.BODY_PHASES)
def test_clear_body(cases, phase):
    check(one(cases, case_req(phase, "clear_body")), h.wrap(phase, h.add_body_mutation(clear_body=True)))


def test_body_with_clear_route_cache(cases):
    check(one(cases, case_req("request_body", "body_crc")),
          h.wrap("request_body", h.add_body_mutation(body="x", clear_route_cache=True)))


def test_body_with_add(cases):
    check(one(cases, case_req("response_body", "body_add")), common(
        "response_body", header_mutation=mutation(add=[("x-from-body", "1")]),
        body_mutation=pb.BodyMutation(body=b"b2")))


def test_body_phase_continue_and_replace(cases):
    check(one(cases, case_req("request_body", "body_replace")), common(
        "request_body", status=pb.CommonResponse.CONTINUE_AND_REPLACE,
        body_mutation=pb.BodyMutation(body=b"all new")))


@pytest.mark.parametrize("phase", h.HEADER_PHASES)
def test_headers_continue_and_replace_with_body(cases, phase):
    check(one(cases, case_req(phase, "replace")), common(
        phase, status=pb.CommonResponse.CONTINUE_AND_REPLACE,
        body_mutation=pb.BodyMutation(body=b"replacement body")))


def test_headers_continue_and_replace_with_add(cases):
    check(one(cases, case_req("request_headers", "replace_add")), common(
        "request_headers", status=pb.CommonResponse.CONTINUE_AND_REPLACE,
        header_mutation=mutation(add=[("content-type", "text/plain")]),
        body_mutation=pb.BodyMutation(body=b"rb")))


def test_continue_and_replace_alone(cases):
    check(one(cases, case_req("response_headers", "replace_only")),
          common("response_headers", status=pb.CommonResponse.CONTINUE_AND_REPLACE))


@pytest.mark.parametrize("phase", h.BODY_PHASES)
def test_body_replace_with_empty_string(cases, phase):
    # Replacing with "" empties the chunk: the body oneof must be present (with zero bytes),
    # which is not the same as sending no body mutation at all.
    resp = one(cases, case_req(phase, "empty_body"))
    mut = getattr(resp, phase).response.body_mutation
    assert resp.WhichOneof("response") == phase
    assert (mut.WhichOneof("mutation"), mut.body) == ("body", b""), str(resp)


def test_status_continue_explicit(cases):
    check(one(cases, case_req("request_headers", "continue")),
          h.wrap("request_headers", h.add_header_mutation(add=[("a", "1")])))


# --------------------------------------------------------------------------------------------
# immediate / deny
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("phase", h.PHASES)
def test_immediate_full(cases, phase):
    check(one(cases, case_req(phase, "immediate_full")), h.immediate(
        403, headers=[("x-why", "nope"), ("x-two", "2")], body=b"denied\0body",
        details="blocked by lua", grpc_status=7))


def test_immediate_default_status_200(cases):
    check(one(cases, case_req("request_headers", "immediate_default")), h.immediate(200))


def test_immediate_headers_map_sorted(cases):
    check(one(cases, case_req("request_headers", "immediate_map")), h.immediate(
        302, headers=[("cache-control", "no-store"), ("location", "https://example.com/")]))


def test_immediate_numbers_and_empty_body(cases):
    check(one(cases, case_req("request_headers", "immediate_numbers")),
          h.immediate(429, headers=[("retry-after", "5")], body=b""))


def test_deny_utf8_message(cases):
    responses, code, details = h.process(cases, [case_req("request_headers", "deny_utf8")])
    assert (responses, code, details) == ([], grpc.StatusCode.PERMISSION_DENIED, "refusé ✓ — no")


@pytest.mark.parametrize("phase", h.PHASES)
def test_deny_message(cases, phase):
    responses, code, details = h.process(cases, [case_req(phase, "deny_msg")])
    assert (responses, code, details) == ([], grpc.StatusCode.PERMISSION_DENIED, "not allowed here")


def test_deny_true_default_message(cases):
    responses, code, details = h.process(cases, [case_req("request_headers", "deny_true")])
    assert (responses, code, details) == ([], grpc.StatusCode.PERMISSION_DENIED, "Callout DENIED.")


def test_deny_mid_stream_after_responses(cases):
    reqs = [case_req("request_headers", "add_list"), case_req("request_body", "body"),
            case_req("response_headers", "deny_msg"), case_req("response_body", "body")]
    responses, code, details = h.process(cases, reqs)
    assert [r.WhichOneof("response") for r in responses] == ["request_headers", "request_body"]
    assert (code, details) == (grpc.StatusCode.PERMISSION_DENIED, "not allowed here")


# --------------------------------------------------------------------------------------------
# nil / no handler → the empty response of the phase's own type
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("phase", h.PHASES)
@pytest.mark.parametrize("which", ["nil_return", "no_handler"])
def test_empty_response_of_matching_type(request, which, phase):
    stub = request.getfixturevalue("nil_stub" if which == "nil_return" else "no_handlers_stub")
    h.assert_empty_response(one(stub, h.any_req(phase)), phase)


def test_unknown_case_in_cases_script_is_empty(cases):
    # The dispatcher returns nil for an unknown case: all six phases in one stream.
    reqs = [case_req(p, "no_such_case") for p in h.PHASES]
    responses, code, details = h.process(cases, reqs)
    assert code == OK, details
    assert len(responses) == 6
    for p, r in zip(h.PHASES, responses):
        h.assert_empty_response(r, p)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

def added(resp):
    """The (key, value-bytes) pairs of the header mutation in any response type."""
    kind = resp.WhichOneof("response")
    inner = getattr(resp, kind)
    if kind in h.TRAILER_PHASES:
        return h.header_map(inner.header_mutation)
    return h.header_map(inner.response.header_mutation)


def as_dict(pairs):
    d = {}
    for k, v in pairs:
        d.setdefault(k, v)
    return d


@pytest.mark.parametrize("phase", h.HEADER_PHASES + h.TRAILER_PHASES)
def test_headers_wire_order_and_duplicates(echo, phase):
    hdrs = [(":method", "GET"), ("x-dup", "1"), ("b", "2"), ("x-dup", "3"), ("a", "")]
    req = h.headers_req(phase, hdrs) if phase in h.HEADER_PHASES else h.trailers_req(phase, hdrs)
    got = added(one(echo, req))
    d = as_dict(got)
    assert d["phase"] == phase.encode()
    assert d["n"] == b"5"
    assert [v for k, v in got if k.startswith("h") and k[1:].isdigit()] == [
        b":method=GET", b"x-dup=1", b"b=2", b"x-dup=3", b"a="]
    assert [k for k, _ in got if k.startswith("h") and k[1:].isdigit()] == ["h1", "h2", "h3", "h4", "h5"]


def test_header_names_are_lower_case(echo):
    got = as_dict(added(one(echo, h.headers_req("request_headers", [("X-Mixed-Case", "v")]))))
    assert got["h1"] == b"x-mixed-case=v"


@pytest.mark.parametrize("query,expect", [
    ("X-DUP", {"get": b"1", "all": b"1,3", "nall": b"2", "has": b"true"}),
    ("x-Dup", {"get": b"1", "all": b"1,3", "nall": b"2", "has": b"true"}),
    ("other", {"get": b"o", "all": b"o", "nall": b"1", "has": b"true"}),
    ("missing", {"get": b"nil", "all": b"", "nall": b"0", "has": b"false"}),
])
def test_get_get_all_has_case_insensitive(echo, query, expect):
    req = h.headers_req("request_headers", [("x-dup", "1"), ("other", "o"), ("x-dup", "3"), ("x-q", query)])
    got = as_dict(added(one(echo, req)))
    assert {k: got.get(k) for k in expect} == expect


@pytest.mark.parametrize("value,expect", [("3", b"true"), ("1", b"true"), ("2", b"false"), ("X", b"false")])
def test_has_with_value(echo, value, expect):
    req = h.headers_req("request_headers", [("x-dup", "1"), ("X-Dup", "3"), ("x-q", "X-DUP"), ("x-qv", value)])
    assert as_dict(added(one(echo, req)))["hasv"] == expect


def test_get_on_trailers(echo):
    req = h.trailers_req("response_trailers", [("grpc-status", "0"), ("x-q", "GRPC-STATUS")])
    got = as_dict(added(one(echo, req)))
    assert (got["get"], got["has"]) == (b"0", b"true")


def test_raw_value_preferred_value_fallback(echo):
    hv = base_pb2.HeaderValue
    req = h.headers_req("request_headers", [
        hv(key="a", raw_value=b"raw-only"),
        hv(key="b", value="value-only"),
        hv(key="c", value="old", raw_value=b"new"),
        hv(key="d", raw_value=b"\xff\x00\x80bin"),
    ])
    got = [v for k, v in added(one(echo, req)) if k.startswith("h") and k[1:].isdigit()]
    assert got == [b"a=raw-only", b"b=value-only", b"c=new", b"d=\xff\x00\x80bin"]


@pytest.mark.parametrize("eos", [True, False])
@pytest.mark.parametrize("phase", h.HEADER_PHASES)
def test_headers_end_of_stream(echo, phase, eos):
    got = as_dict(added(one(echo, h.headers_req(phase, [("a", "b")], end_of_stream=eos))))
    assert got["eos"] == (b"true" if eos else b"false")


@pytest.mark.parametrize("eos", [True, False])
@pytest.mark.parametrize("phase", h.BODY_PHASES)
def test_body_end_of_stream_and_phase(echo, phase, eos):
    got = as_dict(added(one(echo, h.body_req(phase, b"?info-12345", end_of_stream=eos))))
    assert got == {"phase": phase.encode(), "eos": b"true" if eos else b"false", "len": b"11",
                   "type": b"string"}


@pytest.mark.parametrize("phase", h.BODY_PHASES)
def test_binary_body_echoed_intact(echo, phase):
    data = bytes(range(256)) + b"\x00\x00tail\x00" + bytes(range(255, -1, -1))
    check(one(echo, h.body_req(phase, data, end_of_stream=True)),
          h.wrap(phase, h.add_body_mutation(body=data + b"!")))


def test_large_body_echoed(echo):
    data = bytes((i * 7 + 3) % 256 for i in range(1 << 20))   # 1 MiB
    check(one(echo, h.body_req("request_body", data, end_of_stream=True)),
          h.wrap("request_body", h.add_body_mutation(body=data + b"!")))


def test_large_body_8mib_echoed(echo_server):
    stub = echo_server.stub(options=[("grpc.max_receive_message_length", 64 << 20)])
    data = bytes((i * 13) % 251 for i in range(8 << 20))
    check(one(stub, h.body_req("response_body", data, end_of_stream=True)),
          h.wrap("response_body", h.add_body_mutation(body=data + b"!")))


def test_many_body_chunks_pipelined_in_order(echo):
    n = 300
    reqs = [h.headers_req("request_headers", [("a", "1")])]
    reqs += [h.body_req("request_body", f"chunk-{i}".encode(), end_of_stream=(i == n - 1)) for i in range(n)]
    responses, code, details = h.process(echo, reqs)
    assert code == OK, details
    assert len(responses) == n + 1
    assert responses[0].WhichOneof("response") == "request_headers"
    assert [r.request_body.response.body_mutation.body for r in responses[1:]] == \
        [f"chunk-{i}!".encode() for i in range(n)]


def test_many_headers_in_order(echo):
    hdrs = [(f"x-h-{i:03d}", f"v{i}") for i in range(500)]
    got = added(one(echo, h.headers_req("request_headers", hdrs)))
    assert as_dict(got)["n"] == b"500"
    assert [v for k, v in got if k.startswith("h") and k[1:].isdigit()] == \
        [f"x-h-{i:03d}=v{i}".encode() for i in range(500)]


def test_stream_without_messages(echo):
    responses, code, details = h.process(echo, [])
    assert (responses, code) == ([], OK), details


def test_empty_body_chunk(echo):
    check(one(echo, h.body_req("response_body", b"", end_of_stream=True)),
          h.wrap("response_body", h.add_body_mutation(body=b"!")))


def test_ctx_phase_all_phases_one_stream(echo):
    reqs = [h.headers_req("request_headers", [("a", "1")]),
            h.body_req("request_body", b"?info"),
            h.trailers_req("request_trailers", [("t", "1")]),
            h.headers_req("response_headers", [("a", "1")]),
            h.body_req("response_body", b"?info", end_of_stream=True),
            h.trailers_req("response_trailers", [("t", "1")])]
    responses, code, details = h.process(echo, reqs)
    assert code == OK, details
    assert [r.WhichOneof("response") for r in responses] == [
        "request_headers", "request_body", "request_trailers",
        "response_headers", "response_body", "response_trailers"]
    assert [as_dict(added(r))["phase"] for r in responses] == [
        b"request_headers", b"request_body", b"request_trailers",
        b"response_headers", b"response_body", b"response_trailers"]


# --------------------------------------------------------------------------------------------
# ctx.state and ctx.stream_id
# --------------------------------------------------------------------------------------------

def test_state_carries_request_header_to_response(state):
    with h.BidiStream(state) as s:
        r1 = as_dict(added(s.exchange(h.headers_req("request_headers", [("x-user", "alice")]))))
        s.exchange(h.body_req("request_body", b"x", end_of_stream=True))
        r2 = as_dict(added(s.exchange(h.headers_req("response_headers", [(":status", "200")]))))
        rest, code, details = s.finish()
    assert code == OK and rest == [], details
    assert r2["x-user-echo"] == b"alice"
    assert r2["x-count"] == b"3"
    assert r2["x-same-id"] == b"true"
    assert r1["x-stream-id"] == r2["x-stream-id"]
    assert r1["x-id-type"] == b"integer"


def test_state_does_not_leak_between_streams(state):
    # A stream that sets state, then a fresh stream that never sent request headers.
    responses, code, _ = h.process(state, [h.headers_req("request_headers", [("x-user", "mallory")]),
                                           h.headers_req("response_headers", [])])
    assert code == OK and as_dict(added(responses[1]))["x-user-echo"] == b"mallory"
    for _ in range(4):   # several times, so a multi-worker server is likely to reuse a VM
        responses, code, details = h.process(state, [h.headers_req("response_headers", [])])
        assert code == OK, details
        got = as_dict(added(responses[0]))
        assert (got["x-user-echo"], got["x-count"]) == (b"none", b"1")


def test_state_interleaved_streams(state):
    users = ["alice", "bob", "carol", "dave"]
    streams = [h.BidiStream(state) for _ in users]
    try:
        ids = []
        for s, u in zip(streams, users):
            ids.append(as_dict(added(s.exchange(h.headers_req("request_headers", [("x-user", u)]))))["x-stream-id"])
        assert len(set(ids)) == len(ids), f"stream ids not distinct: {ids}"
        for s, u, sid in reversed(list(zip(streams, users, ids))):
            got = as_dict(added(s.exchange(h.headers_req("response_headers", [(":status", "200")]))))
            assert (got["x-user-echo"], got["x-count"], got["x-stream-id"]) == (u.encode(), b"2", sid)
        for s in streams:
            rest, code, details = s.finish()
            assert code == OK and rest == [], details
    finally:
        for s in streams:
            s.cancel()


# --------------------------------------------------------------------------------------------
# Request fields beyond the phase
# --------------------------------------------------------------------------------------------

def _rich_extra():
    st = struct_pb2.Struct()
    st.update({"k": "v", "n": 1.5, "nested": {"list": [1, "two", True, None]}})
    md = base_pb2.Metadata(filter_metadata={"envoy.filters.http.ext_proc": st})
    md.typed_filter_metadata["typed"].Pack(struct_pb2.Value(string_value="x"))
    attrs = {"envoy.filters.http.ext_proc": st}
    pc = pb.ProtocolConfiguration(
        request_body_mode=h.processing_mode_pb2.ProcessingMode.BUFFERED,
        response_body_mode=h.processing_mode_pb2.ProcessingMode.STREAMED,
        send_body_without_waiting_for_header_response=True)
    return dict(metadata_context=md, attributes=attrs, protocol_config=pc)


def test_metadata_attributes_protocol_config_served_normally(cases):
    extra = _rich_extra()
    reqs = [case_req("request_headers", "add_list", **extra),
            case_req("request_body", "body", **extra),
            case_req("response_headers", "remove", **{"attributes": extra["attributes"]}),
            case_req("response_body", "clear_body", metadata_context=extra["metadata_context"])]
    responses, code, details = h.process(cases, reqs)
    assert code == OK, details
    assert responses == [
        common("request_headers", header_mutation=mutation(
            add=[("z-last", "1"), ("a-first", "2"), ("m-mid", "3"), ("a-first", "dup")])),
        # BUFFERED request body: a replaced body brings its content-length along (Envoy keeps
        # the header in that mode and refuses a body of another length); the STREAMED
        # response body is left alone
        common("request_body", header_mutation=pb.HeaderMutation(set_headers=[h.hvo(
            "content-length", "8", base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)]),
               body_mutation=pb.BodyMutation(body=b"new body")),
        common("response_headers", header_mutation=mutation(remove=["foo", "x-bar", "baz"])),
        h.wrap("response_body", h.add_body_mutation(clear_body=True)),
    ]


def test_unknown_request_fields_ignored(cases_server):
    # A newer Envoy may send fields our proto subset lacks: they must be skipped, not fatal.
    srv = cases_server
    req = case_req("request_headers", "crc").SerializeToString()
    req += bytes([0x98, 0x06, 0x2A])                     # field 99, varint 42
    req += bytes([0xA2, 0x06, 0x03]) + b"abc"            # field 100, length-delimited
    with grpc.insecure_channel(srv.target("plaintext")) as ch:
        call = ch.stream_stream(h.METHOD, request_serializer=None, response_deserializer=None)
        out = list(call(iter([req]), timeout=h.RPC_TIMEOUT))
    assert [pb.ProcessingResponse.FromString(b) for b in out] == [common("request_headers", clear_route_cache=True)]


def test_observability_mode_gets_no_response(cases):
    # script.h: in observability mode nothing is sent back; the stream still ends OK.
    reqs = [case_req("request_headers", "add_list", observability_mode=True),
            case_req("request_body", "body", observability_mode=True)]
    responses, code, details = h.process(cases, reqs)
    assert (responses, code) == ([], OK), details
