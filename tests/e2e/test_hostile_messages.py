"""Hostile messages: bytes no decoder may recurse into without bound, and messages over the
limits on what one message or one stream may carry. Each is refused with the right status,
quickly, and the server goes on serving everyone else."""

import time

import grpc
import pytest

import harness as h

OK = grpc.StatusCode.OK

# An all-handlers script (ctx.attributes/metadata are read, so conversion happens) and a
# process() script, which converts the whole message.
HANDLERS = r"""
function on_request_headers(headers, ctx)
  local n = 0
  for _ in pairs(ctx.attributes) do n = n + 1 end
  for _ in pairs(ctx.metadata) do n = n + 1 end
  return { add = { {"x-seen", tostring(#headers) .. "/" .. n} } }
end
"""
PROCESS = r"""
function process(req, ctx)
  return { request_headers = { response = {} } }
end
"""


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(number, payload):
    """A length-delimited field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def nested_struct(depth):
    """A google.protobuf.Struct nested `depth` deep: {"a": {"a": {...}}}, built from the inside
    out with no recursion (python's protobuf would refuse to build it)."""
    struct = b""
    for _ in range(depth):
        value = field(5, struct)                       # Value.struct_value
        entry = field(1, b"a") + field(2, value)       # FieldsEntry{key, value}
        struct = field(1, entry)                       # Struct.fields
    return struct


def nested_list(depth):
    """A ListValue nested `depth` deep, inside a Struct: {"l": [[[...]]]}."""
    lst = b""
    for _ in range(depth):
        lst = field(1, field(6, lst))                  # ListValue.values = Value{list_value}
    return field(1, field(1, b"l") + field(2, field(6, lst)))


def headers_bytes(pairs=()):
    return h.headers_req("request_headers", list(pairs)).SerializeToString()


def with_attributes(struct):
    # ProcessingRequest.attributes (9): map entry {key "ns", value Struct}
    return headers_bytes([(":path", "/")]) + field(9, field(1, b"ns") + field(2, struct))


def with_metadata(struct):
    # ProcessingRequest.metadata_context (8): Metadata.filter_metadata (1) entry
    return headers_bytes([(":path", "/")]) + field(8, field(1, field(1, b"ns") + field(2, struct)))


def raw_call(server, payloads, timeout=10):
    with grpc.insecure_channel(server.target("plaintext"),
                               options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        call = ch.stream_stream(h.METHOD, request_serializer=None, response_deserializer=None)
        out = []
        try:
            for b in call(iter(payloads), timeout=timeout):
                out.append(b)
            return out, OK, ""
        except grpc.RpcError as e:
            return out, e.code(), e.details()


@pytest.fixture(scope="module", params=["handlers", "process"])
def srv(module_servers, request):
    src = HANDLERS if request.param == "handlers" else PROCESS
    return module_servers.start(module_servers.script(src, f"{request.param}.lua"),
                                "--threads", "1", "--max_headers", "100", "--max_ctx_kb", "64")


def still_serving(server):
    out, code, details = raw_call(server, [headers_bytes([(":path", "/"), ("a", "b")])])
    assert code == OK and len(out) == 1, details
    assert server.alive()


@pytest.mark.parametrize("make,depth", [(with_attributes, 3000), (with_metadata, 3000)])
def test_deep_struct_refused_with_path(srv, make, depth):
    msg = make(nested_struct(depth))
    t0 = time.monotonic()
    out, code, details = raw_call(srv, [msg])
    took = time.monotonic() - t0
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "nested more than 100 deep" in details
    assert details.startswith("ProcessingRequest.") and "struct_value" in details
    assert took < 2.0, f"refusing a {len(msg)}-byte message took {took:.2f}s"
    still_serving(srv)


def test_deep_list_refused(srv):
    out, code, details = raw_call(srv, [with_metadata(nested_list(6000))])
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "list_value" in details and "nested more than 100 deep" in details
    still_serving(srv)


def test_moderate_nesting_is_accepted(srv):
    # 20 Struct levels (about 60 nested messages): well within the limit of 100
    out, code, details = raw_call(srv, [with_attributes(nested_struct(20))])
    assert code == OK, details


def test_too_many_headers(srv):
    pairs = [(":path", "/")] + [(f"x-h{i}", "v") for i in range(150)]
    t0 = time.monotonic()
    out, code, details = raw_call(srv, [headers_bytes(pairs)])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "151 headers, more than 100 (--max_headers)" in details
    assert time.monotonic() - t0 < 2.0
    still_serving(srv)


def test_many_headers_to_process_bounded(srv):
    # the attack: a huge header list for a process() script (whose conversion of the
    # whole message ran outside every budget): refused before any conversion
    pairs = [(f"x-{i}", "v") for i in range(100000)]
    t0 = time.monotonic()
    out, code, details = raw_call(srv, [headers_bytes(pairs)])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert time.monotonic() - t0 < 3.0
    still_serving(srv)


def test_ctx_bytes_bounded_per_stream(srv):
    # 40 KiB of attributes per message: the second message of the stream crosses 64 KiB
    big = field(1, field(1, b"k") + field(2, field(3, b"x" * 40000)))   # {"k": "xxx..."}
    msg = with_attributes(big)
    out, code, details = raw_call(srv, [msg, msg, msg])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "--max_ctx_kb" in details
    assert len(out) == 1          # the first message was answered
    # a new stream starts from zero
    out, code, details = raw_call(srv, [msg])
    assert code == OK, details
    still_serving(srv)
