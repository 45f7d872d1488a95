"""Failures: Lua errors, bad return tables, malformed requests, scripts that do not load,
clients that go away. A failure ends only its own stream; the server keeps serving."""

import re
import time

import grpc
import pytest

import harness as h
from harness import pb

OK = grpc.StatusCode.OK
INTERNAL = grpc.StatusCode.INTERNAL

RT_LUA = r'''-- rt_error.lua: runtime errors on demand (line numbers are looked up by the tests)
function on_request_headers(h, ctx)
  local v = h:get("x-fail")
  if v == "index" then
    local t = nil
    return t.field
  elseif v == "error" then
    error("custom failure: " .. v)
  elseif v == "error_table" then
    error({ code = 1 })
  elseif v == "call_nil" then
    undefined_function_xyz()
  end
  return { add = { {"x-ok", "1"} } }
end

function on_request_body(b, ctx)
  if b.body == "boom" then error("body boom") end
  return { body = "ok:" .. b.body }
end

function on_response_headers(h, ctx)
  return { add = { {"x-resp", "1"} } }
end
'''


def line_of(src, needle):
    for i, l in enumerate(src.splitlines(), 1):
        if needle in l:
            return i
    raise AssertionError(needle)


BAD_LUA = r'''-- bad_return.lua: handlers that return what the contract forbids
local R = {
  unknown_key = function() return { ad = { {"a", "b"} } } end,
  add_number = function() return { add = 5 } end,
  add_bad_pair = function() return { add = { {"only-name"} } } end,
  add_value_table = function() return { add = { {"a", {}} } } end,
  add_map_bool = function() return { add = { a = true } } end,
  remove_string = function() return { remove = "foo" } end,
  crc_string = function() return { clear_route_cache = "yes" } end,
  imm_status_42 = function() return { immediate = { status = 42 } } end,
  imm_status_600 = function() return { immediate = { status = 600 } } end,
  imm_unknown = function() return { immediate = { stauts = 403 } } end,
  imm_and_add = function() return { immediate = { status = 403 }, add = { {"a", "b"} } } end,
  deny_and_add = function() return { deny = "x", add = { {"a", "b"} } } end,
  deny_number = function() return { deny = 5 } end,
  status_bogus = function() return { status = "BOGUS" } end,
  body_without_replace = function() return { body = "x" } end,
  clear_body_in_headers = function() return { clear_body = true } end,
  string = function() return "hello" end,
  number = function() return 42 end,
  boolean = function() return true end,
  trailer_body = function() return { body = "x" } end,
  trailer_crc = function() return { clear_route_cache = true } end,
  body_status_bogus = function() return { status = "REPLACE_PLEASE" } end,
  body_number = function() return { body = 12 } end,
  array = function() return { 1, 2 } end,
  add_name_not_utf8 = function() return { add = { {"x-bad\xff", "v"} } } end,
  add_map_name_not_utf8 = function() return { add = { ["x-\xc3\x28"] = "v" } } end,
  remove_not_utf8 = function() return { remove = { "ok", "\xed\xa0\x80" } } end,
  imm_header_not_utf8 = function() return { immediate = { headers = { {"\xff", "v"} } } } end,
  imm_details_not_utf8 = function() return { immediate = { details = "x\xff" } } end,
  add_name_space = function() return { add = { {"a b", "v"} } } end,
}

local function hcase(h)
  for _, kv in ipairs(h) do if kv[1] == "x-case" then return kv[2] end end
end

function on_request_headers(h, ctx)
  local f = R[hcase(h) or ""]
  if f then return f() end
  return { add = { {"x-fine", "1"} } }
end
function on_request_trailers(t, ctx)
  local f = R[hcase(t) or ""]
  if f then return f() end
end
function on_request_body(b, ctx)
  local f = R[b.body]
  if f then return f() end
end
'''


@pytest.fixture(scope="module")
def rt_server(module_servers):
    return module_servers.start(module_servers.script(RT_LUA, "rt_error.lua"))


@pytest.fixture(scope="module")
def rt(rt_server):
    return rt_server.stub()


@pytest.fixture(scope="module")
def bad_server(module_servers):
    return module_servers.start(module_servers.script(BAD_LUA, "bad_return.lua"))


@pytest.fixture(scope="module")
def bad(bad_server):
    return bad_server.stub()


def fail_req(kind):
    return h.headers_req("request_headers", [(":path", "/"), ("x-fail", kind)])


GOOD = h.wrap("request_headers", h.add_header_mutation(add=[("x-ok", "1")]))


def assert_still_serving(stub):
    responses, code, details = h.process(stub, [h.headers_req("request_headers", [(":path", "/")])])
    assert (code, responses) == (OK, [GOOD]), details


# --------------------------------------------------------------------------------------------
# Lua runtime errors
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,needle,message", [
    ("index", "return t.field", "attempt to index a nil value"),
    ("error", 'error("custom failure', "custom failure: error"),
    ("call_nil", "undefined_function_xyz()", "attempt to call a nil value"),
])
def test_runtime_error_is_internal_with_location(rt, kind, needle, message):
    responses, code, details = h.process(rt, [fail_req(kind)])
    assert responses == [] and code == INTERNAL, (code, details)
    loc = f"rt_error.lua:{line_of(RT_LUA, needle)}:"
    assert loc in details, f"{loc!r} not in {details!r}"
    assert message in details, f"{message!r} not in {details!r}"
    assert_still_serving(rt)


def test_runtime_error_non_string_error_object(rt):
    responses, code, details = h.process(rt, [fail_req("error_table")])
    assert responses == [] and code == INTERNAL, (code, details)
    assert details, "an error object that is not a string still needs a message"
    assert_still_serving(rt)


def test_runtime_error_in_body_phase_after_responses(rt):
    reqs = [h.headers_req("request_headers", [(":path", "/")]),
            h.body_req("request_body", b"boom"), h.headers_req("response_headers", [])]
    responses, code, details = h.process(rt, reqs)
    assert responses == [GOOD] and code == INTERNAL, (responses, code, details)
    assert f"rt_error.lua:{line_of(RT_LUA, 'body boom')}: body boom" in details, details


def test_error_fails_only_its_own_stream(rt):
    with h.BidiStream(rt) as other:
        assert other.exchange(h.headers_req("request_headers", [])) == GOOD
        for _ in range(3):
            _, code, _ = h.process(rt, [fail_req("index")])
            assert code == INTERNAL
        assert other.exchange(h.body_req("request_body", b"abc", end_of_stream=True)) == \
            h.wrap("request_body", h.add_body_mutation(body="ok:abc"))
        assert other.exchange(h.headers_req("response_headers", [])) == \
            h.wrap("response_headers", h.add_header_mutation(add=[("x-resp", "1")]))
        rest, code, details = other.finish()
    assert (rest, code) == ([], OK), details


def test_runtime_error_logged_with_stream_id(rt_server, rt):
    _, code, _ = h.process(rt, [fail_req("error")])
    assert code == INTERNAL
    time.sleep(0.2)
    lines = [l for l in rt_server.log().splitlines() if "custom failure: error" in l]
    assert lines, f"the error is not in the server log:\n{rt_server.log()}"


# --------------------------------------------------------------------------------------------
# Bad return tables
# --------------------------------------------------------------------------------------------

def key_named(details, key):
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(key)}(?![A-Za-z0-9_])", details) is not None


LOC_RE = re.compile(r"bad_return\.lua:\d+:")


@pytest.mark.parametrize("case,key", [
    ("unknown_key", "ad"),
    ("add_number", "add"),
    ("add_bad_pair", "add"),
    ("add_value_table", "add"),
    ("add_map_bool", "add"),
    ("remove_string", "remove"),
    ("crc_string", "clear_route_cache"),
    ("imm_status_42", "status"),
    ("imm_status_600", "status"),
    ("imm_unknown", "stauts"),
    ("deny_number", "deny"),
    ("status_bogus", "status"),
    ("body_without_replace", "body"),
    ("clear_body_in_headers", "clear_body"),
])
def test_bad_return_table_headers(bad, case, key):
    responses, code, details = h.process(bad, [h.headers_req("request_headers", [("x-case", case)])])
    assert responses == [] and code == INTERNAL, (responses, code, details)
    assert key_named(details, key), f"key {key!r} not named in {details!r}"
    assert LOC_RE.search(details), f"no bad_return.lua:LINE: in {details!r}"


@pytest.mark.parametrize("case", ["imm_and_add", "deny_and_add"])
def test_exclusive_keys_combined(bad, case):
    responses, code, details = h.process(bad, [h.headers_req("request_headers", [("x-case", case)])])
    assert responses == [] and code == INTERNAL, (responses, code, details)
    assert key_named(details, "add") or key_named(details, case.split("_")[0]) or \
        key_named(details, "immediate"), details


@pytest.mark.parametrize("case", ["string", "number", "boolean", "array"])
def test_return_not_a_table(bad, case):
    responses, code, details = h.process(bad, [h.headers_req("request_headers", [("x-case", case)])])
    assert responses == [] and code == INTERNAL, (responses, code, details)
    assert LOC_RE.search(details) or "on_request_headers" in details, details


@pytest.mark.parametrize("case,key", [("trailer_body", "body"), ("trailer_crc", "clear_route_cache")])
def test_bad_return_table_trailers(bad, case, key):
    # "In trailers phases only add, remove, immediate and deny apply" — never silently ignored.
    responses, code, details = h.process(bad, [h.trailers_req("request_trailers", [("x-case", case)])])
    assert responses == [] and code == INTERNAL, (responses, code, details)
    assert key_named(details, key), details


@pytest.mark.parametrize("case,key", [("body_status_bogus", "status"), ("body_number", "body"),
                                      ("add_number", "add"), ("unknown_key", "ad")])
def test_bad_return_table_body(bad, case, key):
    responses, code, details = h.process(bad, [h.body_req("request_body", case.encode())])
    assert responses == [] and code == INTERNAL, (responses, code, details)
    assert key_named(details, key), details


@pytest.mark.parametrize("case,detail", [
    ("add_name_not_utf8", "'add' entry 1: header name 'x-bad\\xff' is not valid UTF-8"),
    ("add_map_name_not_utf8", "'add' entry 1: header name 'x-\\xc3(' is not valid UTF-8"),
    ("remove_not_utf8", "'remove' entry 2: header name '\\xed\\xa0\\x80' is not valid UTF-8"),
    ("imm_header_not_utf8", "'immediate.headers' entry 1: header name '\\xff' is not valid UTF-8"),
    ("imm_details_not_utf8", "'immediate.details' is not valid UTF-8"),
    ("add_name_space", "'add' entry 1: header name 'a b' has ' ' at byte 2"),
])
def test_strings_not_valid_for_their_proto_type(bad, case, detail):
    # Bytes protobuf's C++ parser (Envoy) refuses are a bad table, never sent.
    responses, code, details = h.process(bad, [h.headers_req("request_headers", [("x-case", case)])])
    assert responses == [] and code == INTERNAL, (responses, code, details)
    assert LOC_RE.search(details), f"no bad_return.lua:LINE: in {details!r}"
    assert f"on_request_headers (defined here) returned a bad table: {detail}" in details, details
    assert_still_serving_bad(bad)


def assert_still_serving_bad(bad):
    responses, code, details = h.process(bad, [h.headers_req("request_headers", [])])
    assert (code, responses) == (OK, [h.wrap("request_headers", h.add_header_mutation(add=[("x-fine", "1")]))]), details


def test_bad_server_still_serving(bad):
    responses, code, details = h.process(bad, [h.headers_req("request_headers", [])])
    assert (code, responses) == (OK, [h.wrap("request_headers", h.add_header_mutation(add=[("x-fine", "1")]))]), details


# --------------------------------------------------------------------------------------------
# Malformed requests
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"\xff\xff\xff\xff",                 # invalid wire type / truncated varint tag
    b"\x12\x05abc",                      # request_headers with a length past the end
    b"\x12\x02\x0a\x05",                 # headers inside with a length past the end
    b"\x0f",                             # field 1, wire type 7 (invalid)
], ids=["garbage", "truncated", "nested-truncated", "bad-wiretype"])
def test_malformed_request_invalid_argument(rt_server, rt, raw):
    with grpc.insecure_channel(rt_server.target("plaintext")) as ch:
        call = ch.stream_stream(h.METHOD, request_serializer=None, response_deserializer=None)
        out = []
        try:
            for b in call(iter([raw]), timeout=h.RPC_TIMEOUT):
                out.append(b)
            code, details = OK, ""
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
    assert out == [] and code == grpc.StatusCode.INVALID_ARGUMENT, (out, code, details)
    assert rt_server.alive()
    assert_still_serving(rt)


def test_request_without_phase_invalid_argument(rt_server, rt):
    responses, code, details = h.process(rt, [pb.ProcessingRequest()])
    assert (responses, code) == ([], grpc.StatusCode.INVALID_ARGUMENT), details
    responses, code, details = h.process(rt, [pb.ProcessingRequest(observability_mode=True)])
    assert (responses, code) == ([], grpc.StatusCode.INVALID_ARGUMENT), details
    assert_still_serving(rt)


def test_message_over_size_limit_rejected(rt_server, rt):
    # 65 MiB: over the server's receive limit. The stream fails; the server does not.
    _, code, _ = h.process(rt, [h.body_req("request_body", b"z" * (65 << 20))], timeout=30)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rt_server.alive()
    assert_still_serving(rt)


def test_malformed_after_valid_message(rt_server, rt):
    good = h.headers_req("request_headers", []).SerializeToString()
    with grpc.insecure_channel(rt_server.target("plaintext")) as ch:
        call = ch.stream_stream(h.METHOD, request_serializer=None, response_deserializer=None)
        out = []
        try:
            for b in call(iter([good, b"\xff\xff\xff"]), timeout=h.RPC_TIMEOUT):
                out.append(b)
            code = OK
        except grpc.RpcError as e:
            code = e.code()
    assert [pb.ProcessingResponse.FromString(b) for b in out] == [GOOD]
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert_still_serving(rt)


def test_unknown_method_unimplemented(rt_server, rt):
    with grpc.insecure_channel(rt_server.target("plaintext")) as ch:
        call = ch.stream_stream("/envoy.service.ext_proc.v3.ExternalProcessor/Nope",
                                request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as ei:
            list(call(iter([b""]), timeout=h.RPC_TIMEOUT))
    assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert_still_serving(rt)


# --------------------------------------------------------------------------------------------
# Scripts that do not load
# --------------------------------------------------------------------------------------------

def start_failure(servers, script_text, name, *extra):
    path = servers.script(script_text, name)
    argv, _, _ = servers.argv(path, *extra)
    t0 = time.monotonic()
    rc, out, err = servers.run_to_exit(argv[1:])
    return rc, out, err, time.monotonic() - t0


def test_syntax_error_exits_with_location(servers):
    src = "function on_request_headers(h)\n  return {\nend\n"
    rc, out, err, _ = start_failure(servers, src, "syntax_err.lua")
    assert rc != 0, err
    assert "syntax_err.lua:3:" in err, err


def test_top_level_runtime_error_exits_with_location(servers):
    src = "local x = 1\n\nerror(\"top-level boom\")\n"
    rc, out, err, _ = start_failure(servers, src, "top_err.lua")
    assert rc != 0, err
    assert "top_err.lua:3: top-level boom" in err, err


def test_missing_script_file(servers):
    missing = servers.tmpdir / "does_not_exist.lua"
    argv, _, _ = servers.argv(missing)
    rc, out, err = servers.run_to_exit(argv[1:])
    assert rc != 0
    assert "does_not_exist.lua" in err, err


def test_no_script_argument(servers):
    argv, _, _ = servers.argv("placeholder.lua")
    rc, out, err = servers.run_to_exit(argv[1:-1])
    assert rc != 0
    assert err.strip(), "no error message on stderr"


# --------------------------------------------------------------------------------------------
# Clients that go away
# --------------------------------------------------------------------------------------------

def test_client_cancel_mid_stream(rt_server, rt):
    for _ in range(5):
        s = h.BidiStream(rt)
        assert s.exchange(h.headers_req("request_headers", [])) == GOOD
        s.cancel()
        with pytest.raises(grpc.RpcError) as ei:
            s.recv()
        assert ei.value.code() == grpc.StatusCode.CANCELLED
    # Cancel with a request in flight (no wait for its response).
    s = h.BidiStream(rt)
    s.send(h.headers_req("request_headers", []))
    s.send(h.body_req("request_body", b"x"))
    s.cancel()
    assert rt_server.alive()
    assert_still_serving(rt)


def test_client_connection_dropped_with_open_streams(rt_server, rt):
    ch = grpc.insecure_channel(rt_server.target("plaintext"))
    stub = h.pb_grpc.ExternalProcessorStub(ch)
    streams = [h.BidiStream(stub) for _ in range(8)]
    for s in streams:
        assert s.exchange(h.headers_req("request_headers", [])) == GOOD
    ch.close()
    for s in streams:
        s.cancel()
    time.sleep(0.1)
    assert rt_server.alive()
    assert_still_serving(rt)


def test_deadline_exceeded_client_side_then_serving(rt_server, rt):
    # A stream left idle past its deadline is torn down by the client; the server survives.
    s = h.BidiStream(rt, timeout=0.3)
    assert s.exchange(h.headers_req("request_headers", [])) == GOOD
    with pytest.raises(grpc.RpcError) as ei:
        s.recv()
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    s.cancel()
    assert_still_serving(rt)
