"""examples/basic.lua (the Lua port of the Python SDK's basic example) answers every phase
exactly as the SDK's callout_tools would, over plaintext and over TLS."""

import grpc
import pytest

import harness as h

BASIC = h.SRC / "examples" / "basic.lua"

# What the SDK's basic example returns, built with the same helper shapes.
EXPECTED = {
    "request_headers": h.wrap("request_headers", h.add_header_mutation(
        add=[(":authority", "service-extensions.com"), (":path", "/"),
             ("header-request", "request")],
        remove=["foo"], clear_route_cache=True)),
    "response_headers": h.wrap("response_headers", h.add_header_mutation(
        add=[("hello", "service-extensions")])),
    "request_body": h.wrap("request_body", h.add_body_mutation(body="replaced-body")),
    "response_body": h.wrap("response_body", h.add_body_mutation(clear_body=True)),
}

REQUESTS = {
    "request_headers": h.headers_req("request_headers", [
        (":method", "GET"), (":path", "/original"), (":authority", "example.com"), ("foo", "bar")]),
    "response_headers": h.headers_req("response_headers", [(":status", "200"), ("server", "x")]),
    "request_body": h.body_req("request_body", b"original request body", end_of_stream=True),
    "response_body": h.body_req("response_body", b"original response body", end_of_stream=True),
}


@pytest.fixture(scope="module")
def server(module_servers):
    assert BASIC.is_file(), f"{BASIC} is missing"
    return module_servers.start(BASIC)


@pytest.fixture(scope="module")
def plain_stub(server):
    return server.stub("plaintext")


@pytest.fixture(scope="module")
def tls_stub(server):
    return server.stub("tls")


def test_expected_messages_match_sdk_shape():
    # Guards the expectations themselves (a typo here would make every test below moot).
    rh = EXPECTED["request_headers"].request_headers.response
    assert [(o.header.key, o.header.raw_value) for o in rh.header_mutation.set_headers] == [
        (":authority", b"service-extensions.com"), (":path", b"/"), ("header-request", b"request")]
    assert list(rh.header_mutation.remove_headers) == ["foo"] and rh.clear_route_cache
    assert EXPECTED["request_body"].request_body.response.body_mutation.body == b"replaced-body"
    assert EXPECTED["response_body"].response_body.response.body_mutation.clear_body is True


@pytest.mark.parametrize("transport", ["plaintext", "tls"])
@pytest.mark.parametrize("phase", list(EXPECTED))
def test_phase_response_equals_sdk(request, transport, phase):
    stub = request.getfixturevalue("plain_stub" if transport == "plaintext" else "tls_stub")
    responses, code, details = h.process(stub, [REQUESTS[phase]])
    assert code == grpc.StatusCode.OK, details
    assert len(responses) == 1, responses
    assert responses[0] == EXPECTED[phase], f"got:\n{responses[0]}\nexpected:\n{EXPECTED[phase]}"


@pytest.mark.parametrize("transport", ["plaintext", "tls"])
def test_four_phase_stream_in_order(request, transport):
    stub = request.getfixturevalue("plain_stub" if transport == "plaintext" else "tls_stub")
    order = ["request_headers", "request_body", "response_headers", "response_body"]
    responses, code, details = h.process(stub, [REQUESTS[p] for p in order])
    assert code == grpc.StatusCode.OK, details
    assert [r.WhichOneof("response") for r in responses] == order
    assert responses == [EXPECTED[p] for p in order]


def test_lockstep_stream(plain_stub):
    # Envoy waits for each response before sending the next message.
    order = ["request_headers", "request_body", "response_headers", "response_body"]
    with h.BidiStream(plain_stub) as s:
        for p in order:
            assert s.exchange(REQUESTS[p]) == EXPECTED[p]
        rest, code, details = s.finish()
    assert rest == [] and code == grpc.StatusCode.OK, (rest, code, details)


def test_ephemeral_cert_fingerprint_logged(server):
    pem = h.ephemeral_cert_of(server)
    fp = h.fingerprint(pem)
    warn_lines = [l for l in server.log().splitlines() if "WARN" in l]
    logged = [m for l in warn_lines for m in h.FINGERPRINT_RE.findall(l)]
    assert logged, f"no WARN line with a SHA-256 fingerprint in:\n{server.log()}"
    assert fp in logged, f"served certificate has fingerprint {fp}, log says {logged}"


def test_ephemeral_cert_names(server):
    # SAN localhost, 127.0.0.1, ::1: a client that checks the IP SAN (no name override)
    # and one that checks the DNS name both get through.
    pem = h.ephemeral_cert_of(server).encode()
    for override in (None, "localhost"):
        stub = h.pb_grpc.ExternalProcessorStub(server.channel("tls", root_pem=pem, override=override))
        responses, code, details = h.process(stub, [REQUESTS["response_headers"]])
        assert code == grpc.StatusCode.OK, (override, details)
        assert responses == [EXPECTED["response_headers"]]


def test_tls_rejects_untrusted_client_root(server):
    # The TLS port really is TLS with that certificate: a client trusting only the system
    # roots (not the ephemeral self-signed cert) fails the handshake.
    with grpc.secure_channel(server.target("secure"), grpc.ssl_channel_credentials(),
                             options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        _, code, _ = h.process(h.pb_grpc.ExternalProcessorStub(ch), [REQUESTS["response_headers"]],
                               timeout=5)
    assert code == grpc.StatusCode.UNAVAILABLE


def test_plaintext_port_is_not_tls(server):
    # And the plaintext port speaks h2c, not TLS.
    creds = grpc.ssl_channel_credentials(root_certificates=h.ephemeral_cert_of(server).encode())
    with grpc.secure_channel(server.target("plaintext"), creds,
                             options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        _, code, _ = h.process(h.pb_grpc.ExternalProcessorStub(ch), [REQUESTS["response_headers"]],
                               timeout=5)
    assert code == grpc.StatusCode.UNAVAILABLE
