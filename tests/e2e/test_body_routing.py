"""Routing on the body (docs/streaming.md, "Routing on the body") through the real server,
in Envoy's message order for each body mode: a headers handler returns wait_for_body = true,
the body handler picks the route (x-model-route, clear_route_cache); and content-length that
follows a replaced buffered body (--content_length_follows_body)."""

import grpc
import pytest

import harness as h
from harness import base_pb2, pb

OK = grpc.StatusCode.OK
INTERNAL = grpc.StatusCode.INTERNAL
PM = h.processing_mode_pb2.ProcessingMode

ROUTING_LUA = r'''
function on_request_headers(headers, ctx)
  return { wait_for_body = true, add = { { "x-seen", "1" } } }
end

function on_request_body(body, ctx)
  if body.body == "hold" then return { chunks = {}, add = { { "x-early", "1" } } } end
  if body.body == "boom" then error("no model in the body") end
  if body.body == "unsee" then
    return { remove = { "X-Seen", "x-early" }, add = { { "x-early", "2" } } }
  end
  local model = body.body:match('"model":"([^"]*)"')
  if model == nil then return nil end
  local out = { add = { { "x-model-route", model } }, clear_route_cache = true,
                dynamic_metadata = { route = { held = ctx.headers_held } } }
  if ctx.protocol_config.request_body_mode ~= "FULL_DUPLEX_STREAMED" then
    out.body = '{"model":"' .. model .. '-v2"}'
  end
  return out
end

function on_request_trailers(trailers, ctx)
  return { add = { { "x-trailer", "1" } } }
end
'''

LENGTH_LUA = r'''
function on_request_headers(headers, ctx)
  local mode = headers:get("x-mode-override")
  if mode then return { mode_override = { request_body_mode = mode } } end
end

function on_request_body(body, ctx)
  if body.body == "clear" then return { clear_body = true } end
  if body.body == "own" then return { body = "abc", add = { { "Content-Length", "99" } } } end
  if body.body == "rm" then return { body = "abc", remove = { "CONTENT-LENGTH" } } end
  return { body = "hello" }
end
'''


@pytest.fixture(scope="module")
def routing(module_servers):
    return module_servers.start(module_servers.script(ROUTING_LUA, "routing.lua")).stub()


@pytest.fixture(scope="module")
def lengths(module_servers):
    return module_servers.start(module_servers.script(LENGTH_LUA, "lengths.lua")).stub()


def config(mode, early=False):
    return pb.ProtocolConfiguration(request_body_mode=PM.BodySendMode.Value(mode),
                                    response_body_mode=PM.NONE,
                                    send_body_without_waiting_for_header_response=early)


def headers(mode=None, early=False, **kw):
    extra = {"protocol_config": config(mode, early)} if mode else {}
    return h.headers_req("request_headers", [(":path", "/v1/chat/completions")], **extra, **kw)


def body(data, eos):
    return h.body_req("request_body", data.encode(), end_of_stream=eos)


def sets(common):
    """[(name, value)] of a CommonResponse's set_headers, in order."""
    return [(o.header.key, o.header.raw_value.decode()) for o in common.header_mutation.set_headers]


def test_buffered_headers_answered_at_once_body_answer_routes(routing):
    stream = h.BidiStream(routing)
    first = stream.exchange(headers("BUFFERED"))
    assert first.WhichOneof("response") == "request_headers"
    assert sets(first.request_headers.response) == [("x-seen", "1")]
    second = stream.exchange(body('{"model":"m1"}', True))
    common = second.request_body.response
    new = '{"model":"m1-v2"}'
    assert sets(common) == [("x-model-route", "m1"), ("content-length", str(len(new)))]
    assert common.clear_route_cache
    assert common.body_mutation.body == new.encode()
    assert second.dynamic_metadata.fields["route"].struct_value.fields["held"].bool_value is False
    rest, code, details = stream.finish()
    assert (rest, code) == ([], OK), details


def test_streamed_without_waiting_headers_response_comes_before_chunk_1(routing):
    """Envoy with send_body_without_waiting_for_header_response sends headers and the first
    chunk back to back; the server answers the headers after the chunk, first."""
    stream = h.BidiStream(routing)
    stream.send(headers("STREAMED", early=True))
    stream.send(body('{"model":"m2"}', False))
    first = stream.recv()
    assert first.WhichOneof("response") == "request_headers"
    hr = first.request_headers.response
    assert sets(hr) == [("x-seen", "1"), ("x-model-route", "m2")]
    assert hr.clear_route_cache
    second = stream.recv()
    assert second.WhichOneof("response") == "request_body"
    br = second.request_body.response
    assert not br.HasField("header_mutation") and not br.clear_route_cache
    assert br.body_mutation.body == b'{"model":"m2-v2"}'
    # the dynamic_metadata of the body handler's answer rides on its own (body) response
    assert second.dynamic_metadata.fields["route"].struct_value.fields["held"].bool_value is True
    third = stream.exchange(body("tail", True))
    assert third.WhichOneof("response") == "request_body"
    assert not third.request_body.response.HasField("header_mutation")
    rest, code, details = stream.finish()
    assert (rest, code) == ([], OK), details


def test_full_duplex_held_over_chunks_released_at_end_of_stream(routing):
    responses, code, details = h.process(routing, [
        headers("FULL_DUPLEX_STREAMED"), body("hold", False), body("hold", False),
        body('{"model":"m3"}', True)])
    assert code == OK, details
    assert [r.WhichOneof("response") for r in responses] == ["request_headers", "request_body"]
    hr = responses[0].request_headers.response
    assert sets(hr) == [("x-seen", "1"), ("x-early", "1"), ("x-early", "1"), ("x-model-route", "m3")]
    assert hr.clear_route_cache
    sr = responses[1].request_body.response.body_mutation.streamed_response
    assert (sr.body, sr.end_of_stream) == (b'{"model":"m3"}', True)


def test_full_duplex_trailers_release_the_held_headers(routing):
    responses, code, details = h.process(routing, [
        headers("FULL_DUPLEX_STREAMED"), body("hold", False),
        h.trailers_req("request_trailers", [("grpc-status", "0")])])
    assert code == OK, details
    assert [r.WhichOneof("response") for r in responses] == ["request_headers", "request_trailers"]
    assert sets(responses[0].request_headers.response) == [("x-seen", "1"), ("x-early", "1")]
    assert [o.header.key for o in responses[1].request_trailers.header_mutation.set_headers] == ["x-trailer"]


def test_headers_with_end_of_stream_answered_at_once(routing):
    responses, code, details = h.process(routing, [headers("FULL_DUPLEX_STREAMED", end_of_stream=True)])
    assert code == OK, details
    assert len(responses) == 1
    assert sets(responses[0].request_headers.response) == [("x-seen", "1")]


def test_body_handler_error_while_held_fails_the_stream(routing):
    responses, code, details = h.process(routing, [
        headers("FULL_DUPLEX_STREAMED"), body("hold", False), body("boom", True)])
    assert responses == []
    assert code == INTERNAL
    assert "no model in the body" in details


@pytest.mark.parametrize("mode, early, why", [
    ("NONE", False, "'wait_for_body' in request_body_mode NONE: Envoy sends no body in this mode; "
                    "configure processing_mode.request_body_mode BUFFERED, FULL_DUPLEX_STREAMED, or "
                    "STREAMED with send_body_without_waiting_for_header_response"),
    ("STREAMED", False, "'wait_for_body' in request_body_mode STREAMED needs "
                        "send_body_without_waiting_for_header_response: true in Envoy's ext_proc config"),
    (None, False, "'wait_for_body': Envoy sent no protocol_config, so the request_body_mode is unknown"),
])
def test_refused_where_envoy_waits_for_the_headers_answer(routing, mode, early, why):
    responses, code, details = h.process(routing, [headers(mode, early)])
    assert responses == []
    assert code == INTERNAL
    assert "on_request_headers (defined here) returned a bad table: " + why in details, details


def length_of(stub, data, mode="BUFFERED", eos=True):
    responses, code, details = h.process(stub, [headers(mode), body(data, eos)])
    assert code == OK, details
    return responses[-1].request_body.response


def test_content_length_follows_a_replaced_or_cleared_body(lengths):
    replaced = length_of(lengths, "x")
    assert sets(replaced) == [("content-length", "5")]
    # an overwrite, never a second content-length: `append` unset, and the action said for an
    # Envoy that reads it (its default, APPEND_IF_EXISTS_OR_ADD, would add one)
    entry = replaced.header_mutation.set_headers[0]
    assert entry.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    assert not entry.HasField("append")
    cleared = length_of(lengths, "clear")
    assert sets(cleared) == [("content-length", "0")]
    assert cleared.body_mutation.clear_body
    assert sets(length_of(lengths, "x", "BUFFERED_PARTIAL")) == [("content-length", "5")]


def test_content_length_left_alone(lengths):
    assert sets(length_of(lengths, "own")) == [("Content-Length", "99")]
    rm = length_of(lengths, "rm")
    assert list(rm.header_mutation.set_headers) == []
    assert list(rm.header_mutation.remove_headers) == ["CONTENT-LENGTH"]
    # Envoy fixes lengths itself in STREAMED and an unfinished BUFFERED_PARTIAL body
    assert not length_of(lengths, "x", "STREAMED").HasField("header_mutation")
    assert not length_of(lengths, "x", "BUFFERED_PARTIAL", eos=False).HasField("header_mutation")


def test_content_length_switch_off(servers):
    stub = servers.start(servers.script(LENGTH_LUA, "lengths.lua"),
                         "--content_length_follows_body=false").stub()
    common = length_of(stub, "x")
    assert not common.HasField("header_mutation")
    assert common.body_mutation.body == b"hello"


def test_stream_ending_while_held_sends_nothing(routing):
    """Envoy gave up (or the client went away) before the body: nothing to answer, the held
    response is freed (the servers fixture fails on a sanitizer's leak report)."""
    responses, code, details = h.process(routing, [headers("FULL_DUPLEX_STREAMED"), body("hold", False)])
    assert (responses, code) == ([], OK), details


BOTH_WAYS_LUA = r'''
function on_request_headers(headers, ctx)
  if headers:get("x-hold") then return { wait_for_body = true, add = { { "x-req-h", "1" } } } end
end

function on_response_headers(headers, ctx)
  return { wait_for_body = true, add = { { "x-resp-h", "1" } } }
end

-- each chunk comes back with what the handler saw in ctx.headers_held
local function body(b, ctx)
  return { chunks = { b.body .. ":" .. tostring(ctx.headers_held) } }
end
on_request_body = body
on_response_body = body
'''


@pytest.fixture(scope="module")
def both_ways(module_servers):
    return module_servers.start(module_servers.script(BOTH_WAYS_LUA, "both_ways.lua")).stub()


def full_duplex_both_ways(hold_request=False):
    cfg = pb.ProtocolConfiguration(request_body_mode=PM.FULL_DUPLEX_STREAMED,
                                   response_body_mode=PM.FULL_DUPLEX_STREAMED)
    pairs = [(":path", "/")] + ([("x-hold", "1")] if hold_request else [])
    return h.headers_req("request_headers", pairs, protocol_config=cfg)


def shape(responses):
    """[(response type, streamed body or the headers response's set names)]"""
    out = []
    for r in responses:
        kind = r.WhichOneof("response")
        msg = getattr(r, kind)
        if kind.endswith("_body"):
            out.append((kind, msg.response.body_mutation.streamed_response.body.decode()))
        elif kind.endswith("_headers"):
            out.append((kind, [k for k, _ in sets(msg.response)]))
        else:
            out.append((kind, None))
    return out


def test_held_response_headers_stay_held_over_request_body_and_trailers(both_ways):
    """Bidi gRPC in FULL_DUPLEX_STREAMED both ways: the upstream answers while the request
    body still streams. Request chunks and trailers are answered as they come; the held
    response headers go only with the response body's answer, and ctx.headers_held is true
    only in the response direction's handler."""
    responses, code, details = h.process(both_ways, [
        full_duplex_both_ways(),
        h.headers_req("response_headers", [(":status", "200")]),
        h.body_req("request_body", b"r1"),
        h.trailers_req("request_trailers", [("x-t", "1")]),
        h.body_req("response_body", b"s1", end_of_stream=True)])
    assert code == OK, details
    assert shape(responses) == [
        ("request_headers", []),
        ("request_body", "r1:false"),
        ("request_trailers", None),
        ("response_headers", ["x-resp-h"]),
        ("response_body", "s1:true"),
    ]


def test_both_directions_held_at_once_each_released_by_its_own_body(both_ways):
    responses, code, details = h.process(both_ways, [
        full_duplex_both_ways(hold_request=True),
        h.headers_req("response_headers", [(":status", "200")]),
        h.body_req("response_body", b"s1", end_of_stream=True),
        h.body_req("request_body", b"r1", end_of_stream=True)])
    assert code == OK, details
    assert shape(responses) == [
        ("response_headers", ["x-resp-h"]),
        ("response_body", "s1:true"),
        ("request_headers", ["x-req-h"]),
        ("request_body", "r1:true"),
    ]


def test_content_length_when_protocol_config_or_mode_override_buffers(lengths):
    """Whether Envoy follows a mode_override depends on its allow_mode_override, which the
    server cannot see: it sets content-length when either mode buffers the body. A length
    Envoy does not need (the body streams after all) is ignored; a missing one is a 500."""
    for configured, override, want in [
            ("BUFFERED", "STREAMED", [("content-length", "5")]),    # override ignored: needed
            ("NONE", "BUFFERED", [("content-length", "5")]),        # override followed: needed
            ("STREAMED", "BUFFERED", [("content-length", "5")]),    # followed (Envoy stripped it)
            ("STREAMED", "STREAMED", [])]:                          # nothing buffers: none
        responses, code, details = h.process(lengths, [
            h.headers_req("request_headers", [(":path", "/"), ("x-mode-override", override)],
                          protocol_config=config(configured)),
            body("x", True)])
        assert code == OK, details
        assert responses[0].mode_override.request_body_mode == PM.BodySendMode.Value(override)
        assert sets(responses[-1].request_body.response) == want, (configured, override)


def test_content_length_ignores_mode_override_envoy_cannot_follow(lengths):
    """With send_body_without_waiting_for_header_response Envoy never follows a
    mode_override: a configured STREAMED body gets no length."""
    responses, code, details = h.process(lengths, [
        h.headers_req("request_headers", [(":path", "/"), ("x-mode-override", "BUFFERED")],
                      protocol_config=config("STREAMED", early=True)),
        body("x", True)])
    assert code == OK, details
    assert sets(responses[-1].request_body.response) == []


def test_body_handler_remove_drops_the_held_add_of_that_name(routing):
    """Envoy applies all removes of one HeaderMutation before all its sets: the body
    handler's remove of a header the headers handler (or an earlier chunk) added must drop
    that held add, or the header would stay. Its own add of the name stays (remove, then
    add: a replacement)."""
    responses, code, details = h.process(routing, [
        headers("FULL_DUPLEX_STREAMED"), body("hold", False), body("unsee", True)])
    assert code == OK, details
    hm = responses[0].request_headers.response.header_mutation
    assert sets(responses[0].request_headers.response) == [("x-early", "2")]
    assert list(hm.remove_headers) == ["X-Seen", "x-early"]


@pytest.mark.parametrize("mode, early, how", [
    ("FULL_DUPLEX_STREAMED", False, "to hold it longer, return chunks = {}"),
    ("GRPC", False, "to hold it longer, return chunks = {}"),
    ("STREAMED", True, "in STREAMED every chunk is answered, so decide on the first chunk"),
])
def test_header_changes_after_the_held_headers_went_are_an_error(routing, mode, early, how):
    """Chunk 1's nil sends the held headers; chunk 2's add would reach no headers response
    (Envoy ignores a streamed body response's header changes): an error that says so."""
    responses, code, details = h.process(routing, [
        headers(mode, early), body('{"messages":[],', False), body('"model":"m"}', True)])
    assert [r.WhichOneof("response") for r in responses] == ["request_headers", "request_body"]
    assert code == INTERNAL
    assert ("on_request_body (defined here) returned a bad table: 'add': the request headers "
            "response (held by wait_for_body) already went with chunk 1's answer") in details, details
    assert how in details, details


def docs_routing_example():
    """The Lua of docs/streaming.md's "Routing on the body" example."""
    text = (h.SRC / "docs" / "streaming.md").read_text()
    section = text[text.index("## Routing on the body"):]
    return section[section.index("```lua\n") + 7:section.index("\n```", section.index("```lua"))]


@pytest.mark.parametrize("mode", ["FULL_DUPLEX_STREAMED", "GRPC"])
def test_docs_routing_example_routes_json_split_over_chunks(servers, mode):
    stub = servers.start(servers.script(docs_routing_example(), "docs_routing.lua")).stub()
    parts = [b'{"messages":[{"role":"user","content":"hi"}],', b'"model":', b'"gpt-4"}']
    responses, code, details = h.process(stub, [headers(mode)] + [
        body(p.decode(), i == len(parts) - 1) for i, p in enumerate(parts)])
    assert code == OK, details
    assert [r.WhichOneof("response") for r in responses] == ["request_headers"] + ["request_body"] * 3
    hr = responses[0].request_headers.response
    assert sets(hr) == [("x-model-route", "gpt-4")]
    assert hr.clear_route_cache
    sent = [r.request_body.response.body_mutation.streamed_response for r in responses[1:]]
    assert [(s.body, s.end_of_stream) for s in sent] == [(p, i == 2) for i, p in enumerate(parts)]
    # decided before the end: the headers go with the chunk that decided, the rest passes
    responses, code, details = h.process(stub, [
        headers(mode), body('{"model":"m1",', False), body('"x":1}', True)])
    assert code == OK, details
    assert sets(responses[0].request_headers.response) == [("x-model-route", "m1")]
    assert [r.request_body.response.body_mutation.streamed_response.body for r in responses[1:]] == [
        b'{"model":"m1",', b'"x":1}']


SCRIBBLE_LUA = r'''
function on_request_headers(headers, ctx)
  return { wait_for_body = true }
end

function on_request_body(body, ctx)
  local was = ctx.headers_held
  ctx.headers_held = "scribbled"
  if body.body == "hold" then return { chunks = {} } end
  if body.body == "route" then return { add = { { "x-model-route", "m" } } } end
  return { chunks = { tostring(was) } }
end
'''


@pytest.fixture(scope="module")
def scribble(module_servers):
    return module_servers.start(module_servers.script(SCRIBBLE_LUA, "scribble.lua")).stub()


def test_ctx_headers_held_is_the_servers_word_on_every_message(scribble):
    """A script's own write to ctx.headers_held does not last into the next call."""
    responses, code, details = h.process(scribble, [
        headers("FULL_DUPLEX_STREAMED"), body("hold", False), body("x", False), body("y", True)])
    assert code == OK, details
    assert [r.request_body.response.body_mutation.streamed_response.body
            for r in responses[1:]] == [b"true", b"false"]


def test_observability_mode_takes_the_body_handlers_header_changes_quietly(servers):
    """wait_for_body is ignored in observability mode (nothing is sent), and a routing body
    handler's add is no error there either."""
    srv = servers.start(servers.script(SCRIBBLE_LUA, "scribble_obs.lua"))
    responses, code, details = h.process(srv.stub(), [
        headers("FULL_DUPLEX_STREAMED", observability_mode=True),
        h.body_req("request_body", b"route", end_of_stream=True, observability_mode=True)])
    assert (responses, code) == ([], OK), details
    assert "ERROR" not in srv.log() and "bad table" not in srv.log(), srv.log()
