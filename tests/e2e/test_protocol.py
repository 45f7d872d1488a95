"""The whole ext_proc protocol in the Lua contract (docs/lua-api.md, docs/streaming.md),
through the real server: trailers, append actions, dynamic metadata, ctx inputs,
mode_override, override_message_timeout, immediate responses in every phase, streamed and
full-duplex bodies, observability mode, process(), callout.deny_callout, strict errors."""

import re

import grpc
import pytest

import harness as h
from harness import base_pb2, pb, struct_pb2

OK = grpc.StatusCode.OK
INTERNAL = grpc.StatusCode.INTERNAL
HVO = base_pb2.HeaderValueOption
ACTIONS = ["APPEND_IF_EXISTS_OR_ADD", "ADD_IF_ABSENT", "OVERWRITE_IF_EXISTS_OR_ADD",
           "OVERWRITE_IF_EXISTS"]
PM = h.processing_mode_pb2.ProcessingMode


def opt(key, value, action=None):
    """A HeaderValueOption as the server sends it: append_action by name, and the deprecated
    append = true exactly for APPEND_IF_EXISTS_OR_ADD."""
    o = h.hvo(key, value)
    if action is not None:
        o.append_action = HVO.HeaderAppendAction.Value(action)
        if action == "APPEND_IF_EXISTS_OR_ADD":
            o.append.value = True
    return o


def struct(d):
    s = struct_pb2.Struct()
    s.update(d)
    return s


def one(stub, req):
    responses, code, details = h.process(stub, [req])
    assert code == OK, details
    assert len(responses) == 1, responses
    return responses[0]


def failure(stub, req):
    responses, code, details = h.process(stub, [req])
    assert responses == []
    return code, details


def names(details, where, detail):
    """details is "<script path as Lua shortens it>/<where>: <detail>"."""
    assert details.endswith(f"/{where}: {detail}"), details


def fds_config(req_mode="FULL_DUPLEX_STREAMED", resp_mode="NONE"):
    return pb.ProtocolConfiguration(request_body_mode=PM.BodySendMode.Value(req_mode),
                                    response_body_mode=PM.BodySendMode.Value(resp_mode))


def streamed(phase, body, eos):
    r = pb.BodyResponse()
    r.response.body_mutation.streamed_response.body = body if isinstance(body, bytes) else body.encode()
    r.response.body_mutation.streamed_response.end_of_stream = eos
    return h.wrap(phase, r)


# --------------------------------------------------------------------------------------------
# A script of cases: header and trailer phases pick the case from 'x-case', body phases from
# a leading 'case=NAME' in the body.
# --------------------------------------------------------------------------------------------
CASES_LUA = r'''
local C = {}

C.trailers = function(t, ctx)
  return { add = { {"x-t", ctx.phase}, {"x-n", #t} }, remove = { "x-gone" } }
end
C.trailers_action = function()
  return { add = { {"x-a", "1", append_action = "APPEND_IF_EXISTS_OR_ADD"}, {"x-b", "2"} },
           append_action = "ADD_IF_ABSENT" }
end
for _, a in ipairs({ "APPEND_IF_EXISTS_OR_ADD", "ADD_IF_ABSENT", "OVERWRITE_IF_EXISTS_OR_ADD",
                     "OVERWRITE_IF_EXISTS" }) do
  C["entry_" .. a] = function() return { add = { {"x-own", "v", append_action = a}, {"x-none", "w"} } } end
  C["list_" .. a] = function() return { append_action = a, add = { {"x-1", "1"}, {"x-2", "2"} } } end
  C["imm_" .. a] = function()
    return { immediate = { status = 403, append_action = a, headers = { {"x-i", "1"} } } }
  end
end
C.dm = function()
  return { add = { {"x-dm", "1"} }, dynamic_metadata = { ["my.ns"] = { s = "v", n = 1.5, i = 42,
    t = true, f = false, none = callout.null, list = { 1, "two", false, { k = "v" } },
    nested = { deep = { deeper = "x" } } }, other = {} } }
end
C.dm_imm = function()
  return { immediate = { status = 451 }, dynamic_metadata = { ns = { why = "legal" } } }
end
C.mode = function()
  return { mode_override = { request_header_mode = "SEND", response_header_mode = "SKIP",
    request_body_mode = "STREAMED", response_body_mode = "FULL_DUPLEX_STREAMED",
    request_trailer_mode = "DEFAULT", response_trailer_mode = "SEND" },
    override_message_timeout = 2.25 }
end
C.timeout_ms = function() return { override_message_timeout = 0.001 } end
C.crc = function() return { clear_route_cache = true } end
C.replace = function() return { status = "CONTINUE_AND_REPLACE", body = "replaced", clear_route_cache = true } end
C.imm_full = function(_, ctx)
  return { immediate = { status = 503, headers = { {"x-phase", ctx.phase}, {"x-two", 2} },
    append_action = "OVERWRITE_IF_EXISTS_OR_ADD", body = "body of " .. ctx.phase,
    details = "details_" .. ctx.phase, grpc_status = 14 } }
end
C.imm_199 = function() return { immediate = { status = 199 } } end
C.imm_600 = function() return { immediate = { status = 600 } } end
C.grpc_17 = function() return { immediate = { grpc_status = 17 } } end
C.bad_action = function() return { add = { {"a", "b", append_action = "APPEND"} } } end
C.bad_mode = function() return { mode_override = { request_body_mode = "STREAMING" } } end
C.bad_mode_field = function() return { mode_override = { body_mode = "STREAMED" } } end
C.bad_timeout = function() return { override_message_timeout = 0 } end
C.bad_dm = function() return { dynamic_metadata = { ns = { f = print } } } end
C.deny_callout = function() callout.deny_callout("no entry") end

local function hcase(h)
  for _, kv in ipairs(h) do if kv[1] == "x-case" then return kv[2] end end
end
local function bcase(b) return b.body:match("^case=([%w_]+)") end
local function run(name, msg, ctx)
  local f = name and C[name]
  if f then return f(msg, ctx) end
end

function on_request_headers(h, ctx) return run(hcase(h), h, ctx) end
function on_response_headers(h, ctx) return run(hcase(h), h, ctx) end
function on_request_trailers(t, ctx) return run(hcase(t), t, ctx) end
function on_response_trailers(t, ctx) return run(hcase(t), t, ctx) end
function on_request_body(b, ctx) return run(bcase(b), b, ctx) end
function on_response_body(b, ctx) return run(bcase(b), b, ctx) end
'''

# Line of `function on_request_headers` in CASES_LUA: errors name it.
HEADERS_LINE = CASES_LUA.lstrip("\n").split("\n").index(
    "function on_request_headers(h, ctx) return run(hcase(h), h, ctx) end") + 1


@pytest.fixture(scope="module")
def cases(module_servers):
    return module_servers.start(module_servers.script(CASES_LUA.lstrip("\n"), "cases.lua")).stub()


def case_req(phase, case, **extra):
    if phase in h.BODY_PHASES:
        return h.body_req(phase, f"case={case}", end_of_stream=True, **extra)
    if phase in h.HEADER_PHASES:
        return h.headers_req(phase, [("x-case", case)], **extra)
    return h.trailers_req(phase, [("x-case", case), ("x-other", "o")], **extra)


# ---- 1. trailers ---------------------------------------------------------------------------

@pytest.mark.parametrize("phase", h.TRAILER_PHASES)
def test_trailers_add_remove(cases, phase):
    got = one(cases, case_req(phase, "trailers"))
    want = pb.TrailersResponse()
    want.header_mutation.set_headers.extend([h.hvo("x-t", phase), h.hvo("x-n", "2")])
    want.header_mutation.remove_headers.append("x-gone")
    assert got == h.wrap(phase, want)


@pytest.mark.parametrize("phase", h.TRAILER_PHASES)
def test_trailers_append_actions(cases, phase):
    got = one(cases, case_req(phase, "trailers_action"))
    want = pb.TrailersResponse()
    want.header_mutation.set_headers.extend([opt("x-a", "1", "APPEND_IF_EXISTS_OR_ADD"),
                                             opt("x-b", "2", "ADD_IF_ABSENT")])
    assert got == h.wrap(phase, want)


# ---- 2. append actions ---------------------------------------------------------------------

@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("phase", h.HEADER_PHASES + h.BODY_PHASES)
def test_append_action_per_entry(cases, phase, action):
    got = one(cases, case_req(phase, "entry_" + action))
    inner = getattr(got, phase)
    assert list(inner.response.header_mutation.set_headers) == [opt("x-own", "v", action),
                                                                opt("x-none", "w")]
    own = inner.response.header_mutation.set_headers[0]
    # both on the wire: the action (proto3 leaves out 0 = APPEND_IF_EXISTS_OR_ADD) and append
    assert own.HasField("append") == (action == "APPEND_IF_EXISTS_OR_ADD")
    assert HVO.HeaderAppendAction.Name(own.append_action) == action
    assert not inner.response.header_mutation.set_headers[1].HasField("append")


@pytest.mark.parametrize("action", ACTIONS)
def test_append_action_for_the_list(cases, action):
    got = one(cases, case_req("request_headers", "list_" + action))
    assert list(got.request_headers.response.header_mutation.set_headers) == [
        opt("x-1", "1", action), opt("x-2", "2", action)]


@pytest.mark.parametrize("action", ACTIONS)
def test_append_action_in_immediate(cases, action):
    got = one(cases, case_req("response_trailers", "imm_" + action))
    want = h.immediate(403)
    want.immediate_response.headers.set_headers.append(opt("x-i", "1", action))
    assert got == want
    assert got.immediate_response.headers.set_headers[0].append.value == (
        action == "APPEND_IF_EXISTS_OR_ADD")


# ---- 3. CommonResponse ---------------------------------------------------------------------

@pytest.mark.parametrize("phase", h.HEADER_PHASES + h.BODY_PHASES)
def test_clear_route_cache_in_headers_and_body(cases, phase):
    got = one(cases, case_req(phase, "crc"))
    assert getattr(got, phase).response.clear_route_cache


@pytest.mark.parametrize("phase", h.HEADER_PHASES + h.BODY_PHASES)
def test_continue_and_replace(cases, phase):
    got = one(cases, case_req(phase, "replace"))
    cr = getattr(got, phase).response
    assert cr.status == pb.CommonResponse.CONTINUE_AND_REPLACE
    assert cr.body_mutation.body == b"replaced" and cr.clear_route_cache


# ---- 4. dynamic_metadata -------------------------------------------------------------------

@pytest.mark.parametrize("phase", h.PHASES)
def test_dynamic_metadata(cases, phase):
    got = one(cases, case_req(phase, "dm"))
    assert got.WhichOneof("response") == phase
    assert got.dynamic_metadata == struct({
        "my.ns": {"s": "v", "n": 1.5, "i": 42, "t": True, "f": False, "none": None,
                  "list": [1, "two", False, {"k": "v"}], "nested": {"deep": {"deeper": "x"}}},
        "other": {}})


def test_dynamic_metadata_with_immediate(cases):
    got = one(cases, case_req("request_body", "dm_imm"))
    want = h.immediate(451)
    want.dynamic_metadata.CopyFrom(struct({"ns": {"why": "legal"}}))
    assert got == want


# ---- 5. ctx inputs ---------------------------------------------------------------------------

CTX_LUA = r'''
local function snapshot(ctx)
  return { attributes = ctx.attributes, metadata = ctx.metadata,
           protocol_config = ctx.protocol_config or "none",
           observability_mode = ctx.observability_mode }
end
local function echo(_, ctx) return { dynamic_metadata = snapshot(ctx) } end
on_request_headers, on_response_headers, on_request_trailers = echo, echo, echo
'''


@pytest.fixture(scope="module")
def ctx_stub(module_servers):
    return module_servers.start(module_servers.script(CTX_LUA, "ctx.lua")).stub()


def test_ctx_inputs_absent(ctx_stub):
    got = one(ctx_stub, h.headers_req("request_headers"))
    assert got.dynamic_metadata == struct({"attributes": {}, "metadata": {},
                                           "protocol_config": "none", "observability_mode": False})


def test_ctx_attributes_metadata_protocol_config(ctx_stub):
    ns = "envoy.filters.http.ext_proc"
    first = h.headers_req(
        "request_headers",
        attributes={ns: struct({"request.path": "/p", "request.method": "GET"})},
        metadata_context=base_pb2.Metadata(filter_metadata={"ns.a": struct({"k": "v", "n": 1})}),
        protocol_config=pb.ProtocolConfiguration(
            request_body_mode=PM.STREAMED, response_body_mode=PM.FULL_DUPLEX_STREAMED,
            send_body_without_waiting_for_header_response=True))
    second = h.headers_req(
        "response_headers",
        attributes={ns: struct({"response.code": 200})},
        metadata_context=base_pb2.Metadata(filter_metadata={"ns.b": struct({"x": [1, None]})}),
        protocol_config=pb.ProtocolConfiguration(request_body_mode=PM.BUFFERED))
    third = h.trailers_req("request_trailers",
                           metadata_context=base_pb2.Metadata(filter_metadata={"ns.a": struct({"k": "v2"})}))
    responses, code, details = h.process(ctx_stub, [first, second, third])
    assert code == OK, details
    pc = {"request_body_mode": "STREAMED", "response_body_mode": "FULL_DUPLEX_STREAMED",
          "send_body_without_waiting_for_header_response": True}
    assert responses[0].dynamic_metadata == struct({
        "attributes": {ns: {"request.path": "/p", "request.method": "GET"}},
        "metadata": {"ns.a": {"k": "v", "n": 1}}, "protocol_config": pc,
        "observability_mode": False})
    # merged per namespace, key by key; protocol_config is the first message's
    assert responses[1].dynamic_metadata == struct({
        "attributes": {ns: {"request.path": "/p", "request.method": "GET", "response.code": 200}},
        "metadata": {"ns.a": {"k": "v", "n": 1}, "ns.b": {"x": [1, None]}},
        "protocol_config": pc, "observability_mode": False})
    assert responses[2].dynamic_metadata["metadata"]["ns.a"]["k"] == "v2"


# ---- 6. mode_override, override_message_timeout ----------------------------------------------

def test_mode_override_all_fields_and_timeout(cases):
    got = one(cases, case_req("request_headers", "mode"))
    assert got.mode_override == PM(request_header_mode=PM.SEND, response_header_mode=PM.SKIP,
                                   request_body_mode=PM.STREAMED,
                                   response_body_mode=PM.FULL_DUPLEX_STREAMED,
                                   request_trailer_mode=PM.DEFAULT, response_trailer_mode=PM.SEND)
    assert (got.override_message_timeout.seconds, got.override_message_timeout.nanos) == (2, 250000000)


def test_override_message_timeout_millisecond(cases):
    got = one(cases, case_req("response_body", "timeout_ms"))
    assert got.WhichOneof("response") == "response_body"
    assert (got.override_message_timeout.seconds, got.override_message_timeout.nanos) == (0, 1000000)


# ---- 7. immediate ----------------------------------------------------------------------------

@pytest.mark.parametrize("phase", h.PHASES)
def test_immediate_in_every_phase(cases, phase):
    got = one(cases, case_req(phase, "imm_full"))
    want = h.immediate(503, body=f"body of {phase}", details=f"details_{phase}", grpc_status=14)
    want.immediate_response.headers.set_headers.extend([
        opt("x-phase", phase, "OVERWRITE_IF_EXISTS_OR_ADD"),
        opt("x-two", "2", "OVERWRITE_IF_EXISTS_OR_ADD")])
    assert got == want


@pytest.mark.parametrize("case,detail", [
    ("imm_199", "bad value for 'immediate.status': 199 (expected an HTTP status 200-599)"),
    ("imm_600", "bad value for 'immediate.status': 600 (expected an HTTP status 200-599)"),
    ("grpc_17", "bad value for 'immediate.grpc_status': 17 (expected a gRPC status code 0-16)"),
    ("bad_action", "bad value for 'add[1].append_action': 'APPEND' (expected "
                   "APPEND_IF_EXISTS_OR_ADD, ADD_IF_ABSENT, OVERWRITE_IF_EXISTS_OR_ADD or "
                   "OVERWRITE_IF_EXISTS)"),
    ("bad_mode", "bad value for 'mode_override.request_body_mode': 'STREAMING' (expected NONE, "
                 "STREAMED, BUFFERED, BUFFERED_PARTIAL, FULL_DUPLEX_STREAMED or GRPC)"),
    ("bad_mode_field", "unknown key 'mode_override.body_mode'"),
    ("bad_timeout", "bad value for 'override_message_timeout': 0 (expected a number of seconds "
                    "from 0.001 to 315576000000)"),
    ("bad_dm", "dynamic_metadata.ns.f: a function cannot be converted to a protobuf Value"),
])
def test_strict_values_refused(cases, case, detail):
    code, details = failure(cases, case_req("request_headers", case))
    assert code == INTERNAL
    names(details, f"cases.lua:{HEADERS_LINE}", f"on_request_headers (defined here) returned a bad table: {detail}")


def test_deny_callout_is_permission_denied(cases):
    code, details = failure(cases, case_req("request_headers", "deny_callout"))
    assert (code, details) == (grpc.StatusCode.PERMISSION_DENIED, "no entry")


# ---- 8. streamed bodies ----------------------------------------------------------------------

STREAM_LUA = r'''
function on_request_body(b, ctx)
  ctx.state.n = (ctx.state.n or 0) + 1
  if ctx.protocol_config.request_body_mode ~= "FULL_DUPLEX_STREAMED" then
    return { body = b.body:upper() .. ctx.state.n }
  end
  local cmd = b.body:match("^(%a+)")
  if cmd == "hold" then
    ctx.state.held = (ctx.state.held or "") .. b.body
    return { chunks = {} }
  elseif cmd == "split" then
    return { chunks = { b.body .. "-1", b.body .. "-2", b.body .. "-3" } }
  elseif cmd == "flush" then
    local held = ctx.state.held or ""
    ctx.state.held = nil
    return { chunks = { held, b.body } }
  elseif cmd == "finish" then
    return { end_of_stream = true }
  end
  return nil
end
'''


@pytest.fixture(scope="module")
def stream_stub(module_servers):
    return module_servers.start(module_servers.script(STREAM_LUA, "stream.lua")).stub()


@pytest.fixture(scope="module")
def nohandler_stub(module_servers):
    return module_servers.start(module_servers.script("-- no body handler\nfunction on_request_headers() end\n", "nothing.lua")).stub()


def test_streamed_mode_each_chunk_answered(stream_stub):
    reqs = [h.headers_req("request_headers", protocol_config=fds_config("STREAMED"))]
    reqs += [h.body_req("request_body", c, end_of_stream=(i == 2)) for i, c in enumerate(["a", "b", "c"])]
    responses, code, details = h.process(stream_stub, reqs)
    assert code == OK, details
    assert [r.WhichOneof("response") for r in responses] == ["request_headers"] + ["request_body"] * 3
    assert [r.request_body.response.body_mutation.body for r in responses[1:]] == [b"A1", b"B2", b"C3"]


def test_full_duplex_forward_unchanged_without_handler(nohandler_stub):
    reqs = [h.headers_req("request_headers", protocol_config=fds_config("NONE", "FULL_DUPLEX_STREAMED")),
            h.body_req("response_body", b"one", end_of_stream=False),
            h.body_req("response_body", b"\x00two\xff", end_of_stream=True)]
    responses, code, details = h.process(nohandler_stub, reqs)
    assert code == OK, details
    assert responses[1:] == [streamed("response_body", b"one", False),
                             streamed("response_body", b"\x00two\xff", True)]


def test_full_duplex_nil_forwards_and_hold_then_emit(stream_stub):
    reqs = [h.headers_req("request_headers", protocol_config=fds_config()),
            h.body_req("request_body", "pass"),          # nil: forwarded
            h.body_req("request_body", "hold-a"),        # nothing now
            h.body_req("request_body", "hold-b"),        # nothing now
            h.body_req("request_body", "split"),         # three out
            h.body_req("request_body", "flush", end_of_stream=True)]  # held + this one
    responses, code, details = h.process(stream_stub, reqs)
    assert code == OK, details
    assert responses[0].WhichOneof("response") == "request_headers"
    assert responses[1:] == [
        streamed("request_body", "pass", False),
        streamed("request_body", "split-1", False),
        streamed("request_body", "split-2", False),
        streamed("request_body", "split-3", False),
        streamed("request_body", "hold-ahold-b", False),
        streamed("request_body", "flush", True)]


def test_full_duplex_end_of_stream_flush(stream_stub):
    # held data and an ending chunk with nothing to say: one empty end-of-stream chunk
    reqs = [h.headers_req("request_headers", protocol_config=fds_config()),
            h.body_req("request_body", "hold-x"),
            h.body_req("request_body", "hold-y", end_of_stream=True)]
    responses, code, details = h.process(stream_stub, reqs)
    assert code == OK, details
    assert responses[1:] == [streamed("request_body", b"", True)]
    # end_of_stream = true ends the body early
    reqs = [h.headers_req("request_headers", protocol_config=fds_config()),
            h.body_req("request_body", "finish")]
    responses, code, details = h.process(stream_stub, reqs)
    assert code == OK, details
    assert responses[1:] == [streamed("request_body", "finish", True)]


@pytest.mark.parametrize("mode", ["FULL_DUPLEX_STREAMED", "STREAMED"])
def test_second_end_of_stream_chunk_answered(stream_stub, mode):
    reqs = [h.headers_req("request_headers", protocol_config=fds_config(mode)),
            h.body_req("request_body", "last", end_of_stream=True),
            h.body_req("request_body", b"", end_of_stream=True)]
    responses, code, details = h.process(stream_stub, reqs)
    assert code == OK, details
    assert len(responses) == 3
    if mode == "FULL_DUPLEX_STREAMED":
        assert responses[1:] == [streamed("request_body", "last", True),
                                 streamed("request_body", b"", True)]
    else:
        assert [r.request_body.response.body_mutation.body for r in responses[1:]] == [b"LAST1", b"2"]


def test_full_duplex_refuses_non_streamed_keys(module_servers):
    stub = module_servers.start(module_servers.script(
        "function on_request_body() return { clear_body = true } end\n", "fdbad.lua")).stub()
    responses, code, details = h.process(stub, [
        h.headers_req("request_headers", protocol_config=fds_config()),
        h.body_req("request_body", "x")])
    assert code == INTERNAL
    names(details, "fdbad.lua:1", "on_request_body (defined here) returned a bad table: 'clear_body' is not "
          "allowed in request_body in FULL_DUPLEX_STREAMED mode (see docs/streaming.md)")


def test_streaming_rewrite_example(module_servers):
    stub = module_servers.start(h.SRC / "examples" / "streaming_rewrite.lua").stub()
    cfg = fds_config("FULL_DUPLEX_STREAMED", "FULL_DUPLEX_STREAMED")
    for phase in h.BODY_PHASES:
        chunks = ["my sec", "ret is se", "cre", "tsecret and sec"]
        reqs = [h.headers_req("request_headers", [("content-length", "31")], protocol_config=cfg)]
        reqs += [h.body_req(phase, c, end_of_stream=(i == len(chunks) - 1)) for i, c in enumerate(chunks)]
        responses, code, details = h.process(stub, reqs)
        assert code == OK, details
        assert list(responses[0].request_headers.response.header_mutation.remove_headers) == ["content-length"]
        body = responses[1:]
        assert all(r.WhichOneof("response") == phase for r in body)
        sr = [getattr(r, phase).response.body_mutation.streamed_response for r in body]
        assert b"".join(s.body for s in sr) == b"my [redacted] is [redacted][redacted] and sec"
        assert [s.end_of_stream for s in sr] == [False] * (len(sr) - 1) + [True]
        # the word split across chunks was held back, not sent in halves
        assert all(b"sec" not in s.body or b"secret" in s.body or s.end_of_stream for s in sr)


# ---- 9. observability mode -------------------------------------------------------------------

OBS_LUA = r'''
local function count(_, ctx)
  ctx.state.n = (ctx.state.n or 0) + 1
  ctx.state.obs = (ctx.state.obs or 0) + (ctx.observability_mode and 1 or 0)
  return { add = { {"x-count", ctx.state.n}, {"x-observed", ctx.state.obs} } }
end
on_request_headers, on_request_body, on_request_trailers, on_response_headers = count, count, count, count
'''


def test_observability_mode_runs_handler_without_response(module_servers):
    stub = module_servers.start(module_servers.script(OBS_LUA, "obs.lua")).stub()
    reqs = [h.headers_req("request_headers", observability_mode=True),
            h.body_req("request_body", "b", end_of_stream=True, observability_mode=True),
            h.trailers_req("request_trailers", observability_mode=True),
            h.headers_req("response_headers")]
    responses, code, details = h.process(stub, reqs)
    assert code == OK, details
    assert len(responses) == 1 and responses[0].WhichOneof("response") == "response_headers"
    assert h.header_map(responses[0].response_headers.response.header_mutation) == [
        ("x-count", b"4"), ("x-observed", b"3")]


# ---- 10. process() ---------------------------------------------------------------------------

PROCESS_LUA = r'''
function process(req, ctx)
  if req.request_headers then
    local first = req.request_headers.headers.headers[1]
    local cmd = first and first.key or ""
    if cmd == "nil" then return nil end
    if cmd == "badfield" then
      return { request_headers = { response = { header_mutaton = {} } } }
    end
    if cmd == "wrong" then return { response_headers = {} } end
    if cmd == "imm" then return { immediate_response = { status = { code = 402 }, details = "pay" } } end
    return { request_headers = { response = { header_mutation = { set_headers = {
      { header = { key = "x-raw", raw_value = ctx.phase .. ":" .. (first and first.raw_value or "") },
        append_action = "OVERWRITE_IF_EXISTS" } } } } },
      dynamic_metadata = { ns = { k = "v" } } }
  end
end
'''


@pytest.fixture(scope="module")
def process_stub(module_servers):
    return module_servers.start(module_servers.script(PROCESS_LUA.lstrip("\n"), "raw.lua")).stub()


def test_process_raw_response(process_stub):
    got = one(process_stub, h.headers_req("request_headers", [("go", "val")]))
    want = pb.HeadersResponse()
    want.response.header_mutation.set_headers.append(
        opt("x-raw", "request_headers:val", "OVERWRITE_IF_EXISTS"))
    expected = h.wrap("request_headers", want)
    expected.dynamic_metadata.CopyFrom(struct({"ns": {"k": "v"}}))
    assert got == expected
    got = one(process_stub, h.headers_req("request_headers", [("imm", "1")]))
    assert got == h.immediate(402, details="pay")


@pytest.mark.parametrize("phase", h.PHASES)
def test_process_nil_is_empty_response(process_stub, phase):
    req = h.headers_req(phase, [("nil", "1")]) if phase in h.HEADER_PHASES else h.any_req(phase)
    h.assert_empty_response(one(process_stub, req), phase)


def test_process_bad_field_names_the_path(process_stub):
    code, details = failure(process_stub, h.headers_req("request_headers", [("badfield", "1")]))
    assert code == INTERNAL
    names(details, "raw.lua:1", "process (defined here) returned a bad response: "
          "response.request_headers.response: unknown field 'header_mutaton' "
          "(did you mean 'header_mutation'?)")


def test_process_wrong_phase(process_stub):
    code, details = failure(process_stub, h.headers_req("request_headers", [("wrong", "1")]))
    assert code == INTERNAL
    names(details, "raw.lua:1", "process (defined here) returned a bad response: response.response_headers does "
          "not answer a request_headers message (expected response.request_headers or "
          "response.immediate_response)")
