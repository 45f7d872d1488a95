"""Envoy's newest ext_proc protocol through the real server, on the wire both ways: GRPC body
mode (each chunk a gRPC message, end_of_stream_without_message and grpc_message_compressed
in and out), request_drain (and the server's own echo of later chunks), streamed immediate
responses (headers with ":status", body chunks, trailers) from handlers and from process(),
and where each is refused. The requests and responses are the Python protos generated from
our proto/ (harness.ensure_stubs), so a field missing there fails here."""

import grpc
import pytest

import harness as h
from harness import base_pb2, pb

OK = grpc.StatusCode.OK
INTERNAL = grpc.StatusCode.INTERNAL
PM = h.processing_mode_pb2.ProcessingMode


def config(req_mode="GRPC", resp_mode="NONE"):
    return pb.ProtocolConfiguration(request_body_mode=PM.BodySendMode.Value(req_mode),
                                    response_body_mode=PM.BodySendMode.Value(resp_mode))


def grpc_body(phase, data, eos=False, compressed=False, without_message=False):
    if isinstance(data, str):
        data = data.encode()
    return pb.ProcessingRequest(**{phase: pb.HttpBody(
        body=data, end_of_stream=eos, grpc_message_compressed=compressed,
        end_of_stream_without_message=without_message)})


def streamed(phase, body, eos, compressed=False, without_message=False, drain=False):
    r = pb.BodyResponse()
    s = r.response.body_mutation.streamed_response
    s.body = body if isinstance(body, bytes) else body.encode()
    s.end_of_stream = eos
    s.grpc_message_compressed = compressed
    s.end_of_stream_without_message = without_message
    out = h.wrap(phase, r)
    out.request_drain = drain
    return out


def ok(stub, reqs):
    responses, code, details = h.process(stub, reqs)
    assert code == OK, details
    return responses


def refused(stub, reqs):
    responses, code, details = h.process(stub, reqs)
    assert code == INTERNAL, (code, details)
    return details


# ---- GRPC body mode ------------------------------------------------------------------------

GRPC_LUA = r'''
function on_request_body(b, ctx)
  ctx.state.seen = (ctx.state.seen or "") ..
    string.format("[%s %s %s %s]", b.body, tostring(b.end_of_stream),
                  tostring(b.end_of_stream_without_message), tostring(b.grpc_message_compressed))
  local cmd = b.body:match("^(%a+)")
  if cmd == "split" then
    -- one message in, two out: the second keeps the compressed flag
    return { chunks = { "m1", { body = "m2", grpc_message_compressed = true } } }
  elseif cmd == "close" then
    -- end the stream after this message with no message of our own
    return { chunks = { b.body, { end_of_stream_without_message = true } }, end_of_stream = true }
  elseif cmd == "drain" then
    return { request_drain = true }
  elseif cmd == "bad" then
    return { chunks = { { body = "x", end_of_stream_without_message = true } }, end_of_stream = true }
  elseif cmd == "badkey" then
    return { chunks = { { bdy = "x" } } }
  elseif cmd == "late" then
    return { chunks = { { end_of_stream_without_message = true }, "after" }, end_of_stream = true }
  end
  return nil
end

function on_request_trailers(t, ctx)
  return { add = { { "x-seen", ctx.state.seen or "" }, { "x-mode", ctx.protocol_config.request_body_mode } } }
end

function on_response_body(b, ctx)
  return { request_drain = true }
end
'''


@pytest.fixture(scope="module")
def grpc_stub(module_servers):
    return module_servers.start(module_servers.script(GRPC_LUA, "grpcmode.lua")).stub()


def seen_header(resp):
    hs = {o.header.key: o.header.raw_value.decode()
          for o in resp.request_trailers.header_mutation.set_headers}
    return hs["x-seen"], hs["x-mode"]


def test_grpc_mode_flags_reach_the_script_and_echo_back(grpc_stub):
    reqs = [h.headers_req("request_headers", protocol_config=config()),
            grpc_body("request_body", "plain"),
            grpc_body("request_body", "zipped", compressed=True),
            grpc_body("request_body", b"", eos=True, without_message=True),
            h.trailers_req("request_trailers")]
    responses = ok(grpc_stub, reqs)
    # nil: each message forwarded unchanged, flags included (an end of stream without a
    # message stays one, not an empty message)
    assert responses[1:4] == [streamed("request_body", "plain", False),
                              streamed("request_body", "zipped", False, compressed=True),
                              streamed("request_body", b"", True, without_message=True)]
    seen, mode = seen_header(responses[4])
    assert mode == "GRPC"
    # the flags are true when set and absent (nil) otherwise
    assert seen == ("[plain false nil nil][zipped false nil true]"
                    "[ true true nil]")


def test_grpc_mode_chunk_tables(grpc_stub):
    responses = ok(grpc_stub, [h.headers_req("request_headers", protocol_config=config()),
                               grpc_body("request_body", "split"),
                               grpc_body("request_body", "close")])
    assert responses[1:] == [streamed("request_body", "m1", False),
                             streamed("request_body", "m2", False, compressed=True),
                             streamed("request_body", "close", False),
                             streamed("request_body", b"", True, without_message=True)]


def test_grpc_mode_empty_closing_chunk_has_no_message(module_servers):
    stub = module_servers.start(module_servers.script(
        "function on_request_body() return { chunks = {} } end\n", "hold.lua")).stub()
    responses = ok(stub, [h.headers_req("request_headers", protocol_config=config()),
                          grpc_body("request_body", "held", eos=True)])
    assert responses[1:] == [streamed("request_body", b"", True, without_message=True)]
    # in FULL_DUPLEX_STREAMED the same answer is an empty chunk, no GRPC flag
    responses = ok(stub, [h.headers_req("request_headers", protocol_config=config("FULL_DUPLEX_STREAMED")),
                          h.body_req("request_body", "held", end_of_stream=True)])
    assert responses[1:] == [streamed("request_body", b"", True)]


@pytest.mark.parametrize("cmd,detail", [
    ("bad", "'chunks[1].end_of_stream_without_message' needs an empty body (it ends the "
            "stream with no message at all)"),
    ("badkey", "unknown key 'chunks[1].bdy' (did you mean 'chunks[1].body'?)"),
    ("late", "'chunks[1].end_of_stream_without_message' is allowed only on the last chunk of "
             "an answer that ends the body"),
])
def test_grpc_mode_chunk_tables_refused(grpc_stub, cmd, detail):
    details = refused(grpc_stub, [h.headers_req("request_headers", protocol_config=config()),
                                  grpc_body("request_body", cmd)])
    assert details.endswith("on_request_body (defined here) returned a bad table: " + detail), details


def test_grpc_flags_refused_in_full_duplex(module_servers):
    stub = module_servers.start(module_servers.script(
        "function on_request_body() return { chunks = { { body = 'x', grpc_message_compressed = true } } } end\n",
        "fdflag.lua")).stub()
    details = refused(stub, [h.headers_req("request_headers", protocol_config=config("FULL_DUPLEX_STREAMED")),
                             h.body_req("request_body", "x")])
    assert details.endswith("'chunks[1].grpc_message_compressed' is for GRPC body mode only (this "
                            "body is in FULL_DUPLEX_STREAMED mode)"), details


# ---- request_drain -------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["GRPC", "FULL_DUPLEX_STREAMED"])
def test_request_drain_then_server_echoes(grpc_stub, mode):
    body = grpc_body if mode == "GRPC" else (lambda p, d, eos=False, compressed=False:
                                                 h.body_req(p, d, end_of_stream=eos))
    reqs = [h.headers_req("request_headers", protocol_config=config(mode)),
            body("request_body", "first"),
            body("request_body", "drain"),
            # after the drain the handler is not called: "split" would answer two messages
            body("request_body", "split"),
            body("request_body", "close", eos=True),
            h.trailers_req("request_trailers")]
    responses = ok(grpc_stub, reqs)
    assert responses[1:5] == [streamed("request_body", "first", False),
                              streamed("request_body", "drain", False, drain=True),
                              streamed("request_body", "split", False),
                              streamed("request_body", "close", True)]
    # trailers still go to the handler, which saw only the chunks before the drain
    seen, _ = seen_header(responses[5])
    assert seen == "[first false nil nil][drain false nil nil]"


def test_request_drain_on_response_body(grpc_stub):
    responses = ok(grpc_stub, [h.headers_req("request_headers", protocol_config=config("NONE", "GRPC")),
                               grpc_body("response_body", "r1"),
                               grpc_body("response_body", "r2", compressed=True)])
    assert responses[1:] == [streamed("response_body", "r1", False, drain=True),
                             streamed("response_body", "r2", False, compressed=True)]


@pytest.mark.parametrize("mode", ["BUFFERED", "STREAMED"])
def test_request_drain_refused_outside_streamed_modes(module_servers, mode):
    stub = module_servers.start(module_servers.script(
        "function on_request_body() return { request_drain = true } end\n", "drainbad.lua")).stub()
    details = refused(stub, [h.headers_req("request_headers", protocol_config=config(mode)),
                             h.body_req("request_body", "x", end_of_stream=True)])
    assert details.endswith("returned a bad table: 'request_drain' is allowed only in body phases "
                            "in FULL_DUPLEX_STREAMED or GRPC mode (where Envoy defines it), not in "
                            "request_body"), details


# ---- streamed immediate responses ----------------------------------------------------------

IMM_LUA = r'''
function on_request_headers(hs, ctx)
  local case = hs:get("x-case")
  if case == "full" then
    return { immediate = { status = 201, headers = { { "x-a", "1" }, { "x-b", "2" } },
                           chunks = { "a", "b" }, trailers = { { "x-t", "done" } } } }
  elseif case == "body" then
    return { immediate = { stream = true, body = "whole" } }
  elseif case == "headers" then
    return { immediate = { stream = true, status = 204, headers = { ["x-m"] = "v" } } }
  elseif case == "trailers" then
    return { immediate = { trailers = { ["x-t"] = "1" } } }
  elseif case == "status" then
    return { immediate = { stream = true, headers = { { ":status", "500" } } } }
  elseif case == "details" then
    return { immediate = { stream = true, details = "no" } }
  elseif case == "pseudo_trailer" then
    return { immediate = { trailers = { { ":status", "500" } } } }
  end
end

function on_response_headers()
  return { immediate = { stream = true } }
end
'''


@pytest.fixture(scope="module")
def imm_stub(module_servers):
    return module_servers.start(module_servers.script(IMM_LUA, "imm.lua")).stub()


def local_headers(status, pairs=(), eos=False):
    r = pb.ProcessingResponse()
    hr = r.streamed_immediate_response.headers_response
    hr.headers.headers.extend(h.header_values([(":status", str(status))] + list(pairs)))
    hr.end_of_stream = eos
    return r


def local_body(data, eos):
    r = pb.ProcessingResponse()
    r.streamed_immediate_response.body_response.body = data.encode()
    r.streamed_immediate_response.body_response.end_of_stream = eos
    return r


def local_trailers(pairs):
    r = pb.ProcessingResponse()
    r.streamed_immediate_response.trailers_response.headers.extend(h.header_values(pairs))
    return r


@pytest.mark.parametrize("mode", [None, "NONE", "FULL_DUPLEX_STREAMED"])
def test_streamed_immediate_full_sequence(imm_stub, mode):
    extra = {"protocol_config": config(mode)} if mode else {}
    responses = ok(imm_stub, [h.headers_req("request_headers", [("x-case", "full")], **extra)])
    assert responses == [local_headers(201, [("x-a", "1"), ("x-b", "2")]),
                         local_body("a", False), local_body("b", False),
                         local_trailers([("x-t", "done")])]


def test_streamed_immediate_shapes(imm_stub):
    assert ok(imm_stub, [h.headers_req("request_headers", [("x-case", "body")])]) == [
        local_headers(200), local_body("whole", True)]
    assert ok(imm_stub, [h.headers_req("request_headers", [("x-case", "headers")])]) == [
        local_headers(204, [("x-m", "v")], eos=True)]
    assert ok(imm_stub, [h.headers_req("request_headers", [("x-case", "trailers")])]) == [
        local_headers(200), local_trailers([("x-t", "1")])]


@pytest.mark.parametrize("case,detail", [
    ("status", "'immediate.headers' names ':status'; set it with immediate.status"),
    ("details", "'immediate.details' cannot be combined with a streamed 'immediate' (stream, "
                "chunks or trailers)"),
    ("pseudo_trailer", "'immediate.trailers' names the pseudo-header ':status' (trailers "
                       "cannot carry one)"),
])
def test_streamed_immediate_refused_values(imm_stub, case, detail):
    details = refused(imm_stub, [h.headers_req("request_headers", [("x-case", case)])])
    assert details.endswith("returned a bad table: " + detail), details


@pytest.mark.parametrize("mode", ["BUFFERED", "STREAMED", "BUFFERED_PARTIAL", "GRPC"])
def test_streamed_immediate_refused_in_other_body_modes(imm_stub, mode):
    details = refused(imm_stub, [h.headers_req("request_headers", [("x-case", "full")],
                                               protocol_config=config(mode))])
    assert details.endswith("a streamed 'immediate' needs request_body_mode NONE or "
                            f"FULL_DUPLEX_STREAMED (Envoy supports no other), and this stream's is {mode}"), details


def test_streamed_immediate_only_from_request_headers(imm_stub):
    details = refused(imm_stub, [h.headers_req("response_headers")])
    assert details.endswith("a streamed 'immediate' (stream, chunks or trailers) is allowed only "
                            "in on_request_headers (Envoy starts a streamed local response only "
                            "in answer to request headers)"), details


def test_streamed_immediate_counts_as_immediate(module_servers):
    srv = module_servers.start(module_servers.script(IMM_LUA, "immmetrics.lua"))
    ok(srv.stub(), [h.headers_req("request_headers", [("x-case", "full")])])
    lines = [l for l in h.metrics_text(srv).splitlines()
             if l.startswith("luacallout_outcomes_total") or l.startswith("luacallout_messages")]
    hit = [l for l in lines if 'outcome="immediate"' in l and 'phase="request_headers"' in l]
    assert hit and float(hit[0].split()[-1]) == 1, lines


OPEN_LUA = r'''
function on_request_headers(hs, ctx)
  -- a local response whose body follows the request's body, chunk by chunk
  return { immediate = { status = 200, headers = { ["content-type"] = "text/plain" },
                         chunks = { "hello " }, end_of_stream = false } }
end

function on_request_body(b, ctx)
  local cmd = b.body:match("^(%a+)")
  if cmd == "quiet" then return nil end                   -- nothing now
  if cmd == "body" then return { body = "x" } end
  if cmd == "stop" then return { immediate = { body = "bye", end_of_stream = true } } end
  if cmd == "status" then return { immediate = { status = 500 } } end
  if cmd == "open" then return { immediate = { chunks = { "o" }, end_of_stream = false } } end
  return { immediate = { chunks = { b.body:upper() } } }  -- ends when the request ends
end

function on_request_trailers(t, ctx)
  return { immediate = { trailers = { { "x-end", "1" } } } }
end
'''


@pytest.fixture(scope="module")
def open_stub(module_servers):
    return module_servers.start(module_servers.script(OPEN_LUA, "openimm.lua")).stub()


def test_open_local_response_follows_the_request_body(open_stub):
    fd = config("FULL_DUPLEX_STREAMED")
    responses = ok(open_stub, [h.headers_req("request_headers", protocol_config=fd),
                               h.body_req("request_body", "abc"),
                               h.body_req("request_body", "quiet"),
                               h.body_req("request_body", "def", end_of_stream=True)])
    assert responses == [local_headers(200, [("content-type", "text/plain")]),
                         local_body("hello ", False), local_body("ABC", False),
                         local_body("DEF", True)]
    # nil at the request's end ends the local response with an empty piece; trailers end it
    responses = ok(open_stub, [h.headers_req("request_headers", protocol_config=fd),
                               h.body_req("request_body", "quiet", end_of_stream=True)])
    assert responses[2:] == [local_body("", True)]
    responses = ok(open_stub, [h.headers_req("request_headers", protocol_config=fd),
                               h.body_req("request_body", "abc"),
                               h.trailers_req("request_trailers")])
    assert responses[2:] == [local_body("ABC", False), local_trailers([("x-end", "1")])]
    responses = ok(open_stub, [h.headers_req("request_headers", protocol_config=fd),
                               h.body_req("request_body", "stop")])
    assert responses[2:] == [local_body("bye", True)]


@pytest.mark.parametrize("cmd,eos,detail", [
    ("body", False, "'body': a streamed local response is open on this stream; continue it with "
                   "immediate = { body, chunks, trailers, end_of_stream } or return nil"),
    ("status", False, "'immediate.status': the streamed local response's headers went out "
                      "already (continue it with body, chunks, trailers, end_of_stream)"),
    ("open", True, "'immediate.end_of_stream' is false, but the request ends here and Envoy "
                   "sends nothing more to answer: the local response must end"),
])
def test_open_local_response_refusals(open_stub, cmd, eos, detail):
    details = refused(open_stub, [h.headers_req("request_headers", protocol_config=config("FULL_DUPLEX_STREAMED")),
                                  h.body_req("request_body", cmd, end_of_stream=eos)])
    assert details.endswith("returned a bad table: " + detail), details


def test_open_local_response_refused_on_headers_that_end_the_request(open_stub):
    """Headers with end_of_stream: no body comes to continue the local response, which
    would never end."""
    details = refused(open_stub, [h.headers_req("request_headers", end_of_stream=True,
                                                protocol_config=config("FULL_DUPLEX_STREAMED"))])
    assert details.endswith("'immediate.end_of_stream' = false keeps the local response open "
                            "for on_request_body, but these request headers end the request "
                            "(end_of_stream): no body comes to answer, so the local response "
                            "must end here"), details


def test_open_local_response_needs_full_duplex(open_stub):
    details = refused(open_stub, [h.headers_req("request_headers", protocol_config=config("NONE"))])
    assert details.endswith("'immediate.end_of_stream' = false keeps the local response open for "
                            "on_request_body, which needs request_body_mode FULL_DUPLEX_STREAMED "
                            "(Envoy sends no body to answer otherwise)"), details


# ---- process(): raw streamed immediate responses and request_drain ------------------------

RAW_LUA = r'''
function process(req, ctx)
  if req.request_headers then
    local st = req.request_headers.headers.headers[1]
    if not st then return nil end
    if st.key == "nostatus" then
      return { streamed_immediate_response = { headers_response = { headers = { headers = {
        { key = "x", raw_value = "1" } } } } } }
    end
    return { streamed_immediate_response = { headers_response = { headers = { headers = {
      { key = ":status", raw_value = "200" } } } } } }
  elseif req.request_body then
    if req.request_body.body == "spurious" then
      return { request_body = {} }
    end
    return { streamed_immediate_response = { body_response = {
      body = req.request_body.body:upper(), end_of_stream = req.request_body.end_of_stream } } }
  elseif req.response_body then
    return { response_body = { response = { body_mutation = { streamed_response = {
      body = req.response_body.body, grpc_message_compressed = true } } } }, request_drain = true }
  end
end
'''


@pytest.fixture(scope="module")
def raw_stub(module_servers):
    return module_servers.start(module_servers.script(RAW_LUA, "rawimm.lua")).stub()


def test_process_streams_a_local_response(raw_stub):
    responses = ok(raw_stub, [h.headers_req("request_headers", [("local", "1")],
                                            protocol_config=config("FULL_DUPLEX_STREAMED")),
                              h.body_req("request_body", "aa"),
                              h.body_req("request_body", "bb", end_of_stream=True)])
    assert responses == [local_headers(200), local_body("AA", False), local_body("BB", True)]


def test_process_request_drain_and_grpc_flag(raw_stub):
    responses = ok(raw_stub, [h.headers_req("request_headers", protocol_config=config("NONE", "GRPC")),
                              grpc_body("response_body", "one"),
                              grpc_body("response_body", "two")])
    # the first answer drains; the second chunk is echoed by the server, not by process()
    assert responses[1:] == [streamed("response_body", "one", False, compressed=True, drain=True),
                             streamed("response_body", "two", False)]


@pytest.mark.parametrize("reqs,detail", [
    ([h.headers_req("request_headers", [("nostatus", "1")])],
     "response.streamed_immediate_response.headers_response.headers must carry ':status'"),
    ([h.headers_req("request_headers", [("local", "1")], protocol_config=config("BUFFERED"))],
     "response.streamed_immediate_response needs request_body_mode NONE or FULL_DUPLEX_STREAMED "
     "(Envoy supports no other)"),
    ([h.headers_req("request_headers", [("local", "1")], protocol_config=config("FULL_DUPLEX_STREAMED")),
      h.body_req("request_body", "spurious")],
     "a streamed local response is open on this stream: answer request_body with "
     "response.streamed_immediate_response (body_response or trailers_response)"),
    ([h.headers_req("request_headers", protocol_config=config("NONE", "BUFFERED")),
      h.body_req("response_body", "x", end_of_stream=True)],
     "response.request_drain is allowed only in body phases in FULL_DUPLEX_STREAMED or GRPC "
     "mode, not in response_body"),
])
def test_process_refusals(raw_stub, reqs, detail):
    details = refused(raw_stub, reqs)
    assert details.endswith("process (defined here) returned a bad response: " + detail), details
