"""examples/*.lua through the real server.

The ports of the Google Python SDK's examples (callouts/python/extproc/example/<name>)
answer the requests of the SDK's own tests for that example (callouts/python/extproc/tests/
<name>_test.py; add_header's and cloud_log's tests are gone from the SDK, so their last
version and the example's README stand in) with the responses the Python example builds:
expected messages are built the way callout_tools builds them and compared whole, with ==.
Each request goes on its own stream, as the SDK tests' make_request does.

One deliberate difference: where a Python handler returns None, the Python server sends an
empty ProcessingResponse (no oneof set), which Envoy rejects as spurious; luacallout sends
the empty response of the phase's type (docs/lua-api.md). The cases concerned say so.

The scripts beyond the Python set (stream_state, json_body, ab_routing, ai_gateway) have
their own tests at the end."""

import base64
import json
import os
import re
import subprocess
import time

import grpc
import pytest

import harness as h
from harness import pb, struct_pb2

OK = grpc.StatusCode.OK
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
EXAMPLES = h.SRC / "examples"
OVERWRITE = h.base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


class Denied:
    """The stream ends with PERMISSION_DENIED and this message (callout_tools.deny_callout)."""

    def __init__(self, message="Callout DENIED."):
        self.message = message

    def __repr__(self):
        return f"Denied({self.message!r})"


# --- requests, as the SDK tests build them --------------------------------------------------

def req_headers(pairs=(), eos=False):
    return h.headers_req("request_headers", pairs, end_of_stream=eos)


def resp_headers(pairs=(), eos=False):
    return h.headers_req("response_headers", pairs, end_of_stream=eos)


def req_body(data=b"", eos=False):
    return h.body_req("request_body", data, end_of_stream=eos)


def resp_body(data=b"", eos=False):
    return h.body_req("response_body", data, end_of_stream=eos)


# --- expected responses, as the Python examples build them ----------------------------------

def on_req_headers(**kw):
    return h.wrap("request_headers", h.add_header_mutation(**kw))


def on_resp_headers(**kw):
    return h.wrap("response_headers", h.add_header_mutation(**kw))


def on_req_body(**kw):
    return h.wrap("request_body", h.add_body_mutation(**kw))


def on_resp_body(**kw):
    return h.wrap("response_body", h.add_body_mutation(**kw))


def empty(phase):
    """What luacallout sends where the Python handler returns None (see the module doc)."""
    inner = {"request_headers": pb.HeadersResponse, "response_headers": pb.HeadersResponse,
             "request_body": pb.BodyResponse, "response_body": pb.BodyResponse}[phase]()
    return h.wrap(phase, inner)


def forwarding(ip):
    """dynamic_forwarding: ProcessingResponse(request_headers=HeadersResponse(),
    dynamic_metadata=build_dynamic_forwarding_metadata(ip, 80))."""
    md = struct_pb2.Struct()
    md.get_or_create_struct("com.google.envoy.dynamic_forwarding.selected_endpoints")[
        "primary"] = f"{ip}:80"
    return pb.ProcessingResponse(request_headers=pb.HeadersResponse(), dynamic_metadata=md)


def redirect_301():
    """header_immediate_response(code=301, headers=[('Location', ...)])."""
    r = h.immediate(301, headers=[("Location", "http://service-extensions.com/redirect")])
    return r


BASIC_REQUEST_HEADERS = on_req_headers(
    add=[(":authority", "service-extensions.com"), (":path", "/"), ("header-request", "request")],
    remove=["foo"], clear_route_cache=True)
COOKIE = "your_cookie_name=cookie_value; Max-Age=3600; Path=/"

# example -> [(case id, request, expected response or Denied)]
CASES = {
    # basic_grpc_test.py: test_basic_server_capabilites, test_custom_server_config
    "basic": [
        ("request_body", req_body(), on_req_body(body="replaced-body")),
        ("response_body", resp_body(), on_resp_body(clear_body=True)),
        ("response_headers", resp_headers(), on_resp_headers(add=[("hello", "service-extensions")])),
        ("response_headers_eos", resp_headers(eos=True),
         on_resp_headers(add=[("hello", "service-extensions")])),
        ("request_headers", req_headers(), BASIC_REQUEST_HEADERS),
        ("request_headers_eos", req_headers(eos=True), BASIC_REQUEST_HEADERS),
    ],
    # add_header_test.py (last version in the SDK)
    "add_header": [
        ("response_headers", resp_headers(),
         on_resp_headers(add=[("header-response", "response")], remove=["foo"])),
        ("request_headers", req_headers(),
         on_req_headers(add=[("header-request", "request")], clear_route_cache=True)),
        ("request_headers_eos", req_headers(eos=True),
         on_req_headers(add=[("header-request", "request")], clear_route_cache=True)),
    ],
    # add_body_test.py
    "add_body": [
        ("request_body", req_body(b"mock-body"), on_req_body(body="mock-body-added-request-body")),
        ("response_body", resp_body(b"mock-body"), on_resp_body(body="new-body")),
        ("empty_request_body", req_body(), on_req_body(body="-added-request-body")),
    ],
    # add_custom_response_test.py, plus the paths without mock or bad input
    "add_custom_response": [
        ("mock_request_headers", req_headers([("mock", "true")], eos=True),
         on_req_headers(add=[("Mock-Response", "Mocked-Value")])),
        ("mock_response_headers", resp_headers([("mock", "true")], eos=True),
         on_resp_headers(add=[("Mock-Response", "Mocked-Value")])),
        ("mock_request_body", req_body(b"body-check-mock"), on_req_body(body="Mocked-Body")),
        ("mock_response_body", resp_body(b"body-check-mock"), on_resp_body(body="Mocked-Body")),
        ("bad_request_headers", req_headers([("bad-header", "")], eos=True), Denied()),
        ("bad_response_headers", resp_headers([("bad-header", "")], eos=True), Denied()),
        ("bad_request_body", req_body(b"bad-body"), Denied()),
        ("bad_response_body", resp_body(b"bad-body"), Denied()),
        ("bad_wins_over_mock", req_headers([("mock", "1"), ("bad-header", "1")]), Denied()),
        ("plain_request_headers", req_headers([("foo", "bar")]),
         on_req_headers(add=[("header-request", "request")], remove=["foo"],
                        clear_route_cache=True)),
        ("plain_response_headers", resp_headers([("server", "x")]),
         on_resp_headers(add=[("header-response", "response")])),
        ("plain_request_body", req_body(b"hello"), on_req_body(body="replaced-body")),
        # Python: add_body_mutation() with no arguments, a body_mutation whose oneof is set to
        # clear_body = False: no change. luacallout sends the empty BodyResponse, the same
        # "no change" for Envoy.
        ("plain_response_body", resp_body(b"hello"), empty("response_body")),
    ],
    # redirect_test.py
    "redirect": [
        ("request_headers", req_headers([("header", "value")], eos=True), redirect_301()),
    ],
    # set_cookie_test.py
    "set_cookie": [
        ("cookie_check", resp_headers([("cookie-check", "value")], eos=True),
         on_resp_headers(add=[("Set-Cookie", COOKIE)])),
        # Python: no response_headers at all (an empty ProcessingResponse, see module doc)
        ("no_cookie_check", resp_headers(), empty("response_headers")),
        ("empty_cookie_check", resp_headers([("cookie-check", "")]), empty("response_headers")),
    ],
    # update_header_test.py
    "update_header": [
        ("response_headers", resp_headers(),
         on_resp_headers(add=[("header-response", "response-new-value")], append_action=OVERWRITE)),
        ("request_headers", req_headers(),
         on_req_headers(add=[("header-request", "request-new-value")], append_action=OVERWRITE,
                        clear_route_cache=True)),
        ("request_headers_eos", req_headers(eos=True),
         on_req_headers(add=[("header-request", "request-new-value")], append_action=OVERWRITE,
                        clear_route_cache=True)),
    ],
    # normalize_header_test.py
    "normalize_header": [
        ("mobile", req_headers([(":authority", "m.example.com")]),
         on_req_headers(add=[("client-device-type", "mobile")], clear_route_cache=True)),
        ("tablet", req_headers([(":authority", "t.example.com")]),
         on_req_headers(add=[("client-device-type", "tablet")], clear_route_cache=True)),
        ("desktop", req_headers([(":authority", "www.example.com")]),
         on_req_headers(add=[("client-device-type", "desktop")], clear_route_cache=True)),
        # Python returns an empty HeadersResponse: the same message
        ("no_authority", req_headers(eos=True), empty("request_headers")),
    ],
    # dynamic_forwarding_test.py
    "dynamic_forwarding": [
        ("first_ip", req_headers([("ip-to-return", "10.1.10.2")]), forwarding("10.1.10.2")),
        ("second_ip", req_headers([("ip-to-return", "10.1.10.3")]), forwarding("10.1.10.3")),
        ("no_header", req_headers(), forwarding("10.1.10.4")),
        ("unknown_ip", req_headers([("ip-to-return", "10.9.9.9")]), forwarding("10.1.10.4")),
        ("end_of_stream", req_headers(eos=True), forwarding("10.1.10.4")),
    ],
    # cloud_log: the example's README (its test is gone from the SDK)
    "cloud_log": [
        ("header_check", req_headers([("header-check", "1")]),
         on_req_headers(add=[("header-request", "request")], clear_route_cache=True)),
        ("no_header_check", req_headers([("other", "1")]),
         Denied('"header-check" not found within the request headers')),
        ("body_check", req_body(b"xx body-check xx"), on_req_body(body="replaced-body")),
        ("no_body_check", req_body(b"nothing here"),
         Denied('"body-check" not found within the request body')),
        ("response_headers", resp_headers([("server", "x")]), empty("response_headers")),
        ("response_body", resp_body(b"data"), empty("response_body")),
    ],
}

PARAMS = [pytest.param(name, case, id=f"{name}-{case[0]}")
          for name, cases in CASES.items() for case in cases]


def run_one(stub, request):
    responses, code, details = h.process(stub, [request])
    return responses, code, details


def check(result, expected):
    responses, code, details = result
    if isinstance(expected, Denied):
        assert (code, details) == (PERMISSION_DENIED, expected.message), (code, details, responses)
        assert responses == []
    else:
        assert code == OK, details
        assert responses == [expected], f"got:\n{responses}\nexpected:\n{expected}"


# --- servers: one per example, shared by the module ------------------------------------------

def openssl(*args, data=None):
    p = subprocess.run(["openssl", *map(str, args)], input=data, capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    return p.stdout


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("jwt_keys")
    for name in ("signer", "other"):
        openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                "-out", d / f"{name}.key")
        openssl("pkey", "-in", d / f"{name}.key", "-pubout", "-out", d / f"{name}.pub")
    return d


@pytest.fixture(scope="module")
def example_server(module_servers, keys):
    started = {}

    def get(name):
        if name not in started:
            script = EXAMPLES / f"{name}.lua"
            assert script.is_file(), f"{script} is missing"
            # The environment is copied when the server starts: set it for that moment only.
            saved = os.environ.get("JWT_PUBLIC_KEY_PATH")
            os.environ["JWT_PUBLIC_KEY_PATH"] = str(keys / "signer.pub")
            try:
                started[name] = module_servers.start(script, "--disable_tls", "--log_level",
                                                     "debug")
            finally:
                if saved is None:
                    del os.environ["JWT_PUBLIC_KEY_PATH"]
                else:
                    os.environ["JWT_PUBLIC_KEY_PATH"] = saved
        return started[name]
    return get


@pytest.mark.parametrize("name,case", PARAMS)
def test_example_answers_like_python(example_server, name, case):
    _, request, expected = case
    check(run_one(example_server(name).stub(), request), expected)


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_whole_stream(example_server, name):
    # The same requests on one stream, in order: the answers do not depend on the stream
    # (a denial ends it, so the stream stops at the first one).
    requests, expected = [], []
    for _, request, exp in CASES[name]:
        requests.append(request)
        expected.append(exp)
        if isinstance(exp, Denied):
            break
    responses, code, details = h.process(example_server(name).stub(), requests)
    if isinstance(expected[-1], Denied):
        assert (code, details) == (PERMISSION_DENIED, expected[-1].message)
        assert responses == expected[:-1]
    else:
        assert code == OK, details
        assert responses == expected


def test_cloud_log_entries_are_structured(module_servers):
    """With --log_format json every line is one object, and the example's entries carry what
    Cloud Logging moves into the LogEntry: severity, message, the trace (with the project
    from GOOGLE_CLOUD_PROJECT), spanId, labels, httpRequest."""
    saved = os.environ.get("GOOGLE_CLOUD_PROJECT")
    os.environ["GOOGLE_CLOUD_PROJECT"] = "my-project"
    try:
        srv = module_servers.start(EXAMPLES / "cloud_log.lua", "--disable_tls", "--log_format",
                                   "json")
    finally:
        if saved is None:
            del os.environ["GOOGLE_CLOUD_PROJECT"]
        else:
            os.environ["GOOGLE_CLOUD_PROJECT"] = saved
    stub = srv.stub()
    trace = "105445aa7843bc8bf206b12000100000"
    responses, code, details = h.process(stub, [
        req_headers([(":method", "GET"), (":scheme", "https"), (":authority", "example.com"),
                     (":path", "/a?b=1"), ("user-agent", "curl/8"), ("header-check", "1"),
                     ("x-cloud-trace-context", f"{trace}/255;o=1")]),
        resp_headers([(":status", "404")])])
    assert code == OK, details
    check(run_one(stub, req_body(b"no marker")),
          Denied('"body-check" not found within the request body'))

    def entries():
        return [json.loads(line) for line in srv.log().splitlines()]   # every line is JSON
    h.wait_for(lambda: any(e.get("decision") == "deny" for e in entries()), 5, "the deny entry")
    es = [e for e in entries() if "decision" in e]
    allow = [e for e in es if e["decision"] == "allow"]
    assert len(allow) == 1
    a = allow[0]
    assert (a["severity"], a["message"], a["phase"]) == ("INFO", '"header-check" found',
                                                         "request_headers")
    assert a["logging.googleapis.com/trace"] == f"projects/my-project/traces/{trace}"
    assert a["logging.googleapis.com/spanId"] == "00000000000000ff"
    assert a["logging.googleapis.com/labels"] == {"example": "cloud_log", "decision": "allow"}
    assert a["httpRequest"] == {"requestMethod": "GET", "requestUrl": "https://example.com/a?b=1",
                                "userAgent": "curl/8"}
    [r] = [e for e in es if e["phase"] == "response_headers"]
    assert r["stream_id"] == a["stream_id"] and r["httpRequest"]["status"] == 404
    assert r["logging.googleapis.com/trace"] == a["logging.googleapis.com/trace"]
    [d] = [e for e in es if e["decision"] == "deny"]
    assert (d["severity"], d["message"]) == ("WARNING", '"body-check" not found within the request body')
    assert d["stream_id"] != a["stream_id"] and "logging.googleapis.com/trace" not in d


# --- jwt_auth --------------------------------------------------------------------------------

def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(keys, payload, header=None, key="signer", pad=False):
    """An RS256 token; payload and header are dicts (compact JSON) or JSON text. pad: keep
    the base64 '=' padding (PyJWT accepts it)."""
    header = {"alg": "RS256", "typ": "JWT"} if header is None else header
    enc = [b64url((x if isinstance(x, str) else json.dumps(x, separators=(",", ":"))).encode())
           for x in (header, payload)]
    if pad:
        enc = [s + "=" * (-len(s) % 4) for s in enc]
    signing_input = ".".join(enc)
    sig = openssl("dgst", "-sha256", "-sign", keys / f"{key}.key", data=signing_input.encode())
    sig64 = base64.urlsafe_b64encode(sig).decode() if pad else b64url(sig)
    return f"{signing_input}.{sig64}"


def decoded_headers(payload_json):
    """What the Python example adds: ('decoded-' + key, str(value)) for each claim of the
    decoded payload, in order, and clear_route_cache."""
    claims = json.loads(payload_json)
    return on_req_headers(add=[(f"decoded-{k}", str(v)) for k, v in claims.items()],
                          clear_route_cache=True)


def auth(value):
    return req_headers([(":path", "/"), ("Authorization", value)], eos=True)


INVALID = Denied("Authorization token is invalid.")


def test_jwt_auth_rs256_failure(example_server):
    # jwt_auth_test.py: an empty Authorization header
    check(run_one(example_server("jwt_auth").stub(), auth("")), INVALID)


def test_jwt_auth_rs256_success(example_server, keys):
    # jwt_auth_test.py: sub, name, admin, iat, exp -> decoded-* headers in that order
    now = int(time.time())
    payload = json.dumps({"sub": "1234567890", "name": "John Doe", "admin": True,
                          "iat": now, "exp": now + 3600})
    result = run_one(example_server("jwt_auth").stub(), auth(f"Bearer {sign(keys, payload)}"))
    check(result, decoded_headers(payload))
    got = h.header_map(result[0][0].request_headers.response.header_mutation)
    assert got[2] == ("decoded-admin", b"True") and got[3] == ("decoded-iat", str(now).encode())


CLAIM_PAYLOADS = {
    "types": '{"s":"x","i":-7,"f":2.5,"t":true,"n":null,"big":1e16,"small":0.00001,'
             '"whole":3.0,"neg0":-0.0,"e":"","exp9":1e300}',
    "nested": '{"list":[1,"two",[3,{"four":4}],null,false,1.5],"obj":{"b":1,"a":[],"c":{}},'
              '"quotes":["it\'s","say \\"hi\\"","both \' \\"","back\\\\slash"],"empty":{}}',
    "unicode": '{"name":"Jos\\u00e9 \\u00e1\\u00f1","emoji":"\\ud83d\\ude00","raw":"caf\u00e9",'
               '"in_list":["\\u00e9\\u00a0\\u200b\\t\\n\\u0001\\u007f\\u00ad"]}',
    "order_and_dups": '{"z":1,"a":2,"m":3,"a":4}',
    "no_claims": "{}",
    "time_claims_as_text": '{"iat":"12","nbf":" 1_000 ","exp":99999999999.5}',
    "aud_empty": '{"aud":""}',
}


@pytest.mark.parametrize("which", sorted(CLAIM_PAYLOADS))
def test_jwt_auth_claims_as_python_prints_them(example_server, keys, which):
    payload = CLAIM_PAYLOADS[which]
    check(run_one(example_server("jwt_auth").stub(), auth(f"Bearer {sign(keys, payload)}")),
          decoded_headers(payload))


def test_jwt_auth_token_forms(example_server, keys):
    # The token is the last space-separated word of the header, after stripping it
    # (value.strip().split(' ')[-1]); padded base64 is accepted as PyJWT accepts it.
    payload = '{"sub":"a"}'
    tok = sign(keys, payload)
    padded = sign(keys, payload, pad=True)
    assert "=" in padded
    stub = example_server("jwt_auth").stub()
    for value in (tok, f"bearer {tok}", f"  Bearer   {tok} \t", f"Token x {tok}", padded):
        check(run_one(stub, auth(value)), decoded_headers(payload))


def test_jwt_auth_no_authorization_header(example_server):
    check(run_one(example_server("jwt_auth").stub(), req_headers([(":path", "/")])),
          Denied("No Authorization token found."))


def bad_tokens(keys):
    now = int(time.time())
    good = sign(keys, {"sub": "a"})
    h64, p64, s64 = good.split(".")
    other_payload = b64url(b'{"sub":"b"}')
    return {
        "not_bearer_word": "Bearer",
        "garbage": "Bearer not-a-token",
        "two_segments": f"Bearer {h64}.{p64}",
        "other_key": "Bearer " + sign(keys, {"sub": "a"}, key="other"),
        "tampered_payload": f"Bearer {h64}.{other_payload}.{s64}",
        "no_signature": f"Bearer {h64}.{p64}.",
        "expired": "Bearer " + sign(keys, {"exp": now - 10}),
        "expires_now": "Bearer " + sign(keys, {"exp": now - 1}),
        "not_before": "Bearer " + sign(keys, {"nbf": now + 600}),
        "issued_later": "Bearer " + sign(keys, {"iat": now + 600}),
        "exp_not_int": "Bearer " + sign(keys, {"exp": "soon"}),
        "audience": "Bearer " + sign(keys, {"aud": "someone"}),
        "sub_not_string": "Bearer " + sign(keys, {"sub": 42}),
        "jti_not_string": "Bearer " + sign(keys, {"jti": 1}),
        "alg_hs256": "Bearer " + sign(keys, {"sub": "a"}, header={"alg": "HS256"}),
        "alg_none": "Bearer " + sign(keys, {"sub": "a"}, header={"alg": "none"}),
        "no_alg": "Bearer " + sign(keys, {"sub": "a"}, header={"typ": "JWT"}),
        "kid_not_string": "Bearer " + sign(keys, {"sub": "a"}, header={"alg": "RS256", "kid": 7}),
        "crit_unknown": "Bearer " + sign(keys, {"sub": "a"},
                                         header={"alg": "RS256", "crit": ["exp"], "exp": 1}),
        "payload_array": "Bearer " + sign(keys, "[1,2]"),
        "payload_not_json": "Bearer " + sign(keys, "{'sub': 'a'}"),
        "header_not_json": "Bearer " + sign(keys, {"sub": "a"}, header="alg=RS256"),
    }


def test_jwt_auth_invalid_tokens(example_server, keys):
    stub = example_server("jwt_auth").stub()
    for name, value in bad_tokens(keys).items():
        responses, code, details = run_one(stub, auth(value))
        assert (code, details, responses) == (PERMISSION_DENIED, INVALID.message, []), name


def test_jwt_auth_needs_its_key(servers, tmp_path):
    # No JWT_PUBLIC_KEY_PATH, or a file without an RSA key: the server does not start.
    env_saved = os.environ.pop("JWT_PUBLIC_KEY_PATH", None)
    try:
        code, _, err = servers.run_to_exit([EXAMPLES / "jwt_auth.lua", "--disable_tls",
                                            "--plaintext_address", f"127.0.0.1:{h.free_port()}",
                                            "--health_check_address",
                                            f"127.0.0.1:{h.free_port()}"])
        assert code != 0 and "JWT_PUBLIC_KEY_PATH" in err, err
        bad = tmp_path / "bad.pem"
        bad.write_text("not a key\n")
        os.environ["JWT_PUBLIC_KEY_PATH"] = str(bad)
        code, _, err = servers.run_to_exit([EXAMPLES / "jwt_auth.lua", "--disable_tls",
                                            "--plaintext_address", f"127.0.0.1:{h.free_port()}",
                                            "--health_check_address",
                                            f"127.0.0.1:{h.free_port()}"])
        assert code != 0 and "no RSA key" in err and str(bad) in err, err
    finally:
        os.environ.pop("JWT_PUBLIC_KEY_PATH", None)
        if env_saved is not None:
            os.environ["JWT_PUBLIC_KEY_PATH"] = env_saved


# --- beyond the Python set -------------------------------------------------------------------

def test_stream_state_copies_request_id(example_server):
    stub = example_server("stream_state").stub()
    responses, code, details = h.process(stub, [
        req_headers([(":path", "/"), ("x-request-id", "abc-123")]),
        resp_headers([(":status", "200")])])
    assert code == OK, details
    assert responses == [empty("request_headers"),
                         on_resp_headers(add=[("x-request-id", "abc-123")])]
    # another stream, without the header: nothing leaks from the first one
    responses, code, details = h.process(stub, [req_headers([(":path", "/")]),
                                                resp_headers([(":status", "200")])])
    assert code == OK, details
    assert responses == [empty("request_headers"), empty("response_headers")]


JSON_CT = [(":method", "POST"), ("content-type", "application/json; charset=utf-8"),
           ("content-length", "42")]


def json_body_stream(stub, headers, body):
    return h.process(stub, [req_headers(headers), req_body(body, eos=True)])


def test_json_body_rewrites_objects(example_server):
    stub = example_server("json_body").stub()
    responses, code, details = json_body_stream(
        stub, JSON_CT, b'{"user":"ann","password":"hunter2","n":[1,2,{"x":null}]}')
    assert code == OK, details
    assert responses[0] == on_req_headers(remove=["content-length"])
    rewritten = responses[1].request_body.response.body_mutation.body
    assert json.loads(rewritten) == {"user": "ann", "n": [1, 2, {"x": None}],
                                     "processed_by": "luacallout"}


def test_json_body_refuses_bad_json(example_server):
    stub = example_server("json_body").stub()
    responses, code, details = json_body_stream(stub, JSON_CT, b'{"user": ')
    assert code == OK, details
    assert responses[1] == h.immediate(
        400, headers=[("content-type", "application/json")],
        body=json.dumps({"error": "request body is not valid JSON"}, separators=(",", ":")))


def test_json_body_leaves_others_alone(example_server):
    stub = example_server("json_body").stub()
    # not JSON by content type: untouched, even when the body would parse
    responses, code, _ = json_body_stream(stub, [("content-type", "text/plain")], b'{"a":1}')
    assert code == OK and responses == [empty("request_headers"), empty("request_body")]
    # JSON, but not an object
    responses, code, _ = json_body_stream(stub, JSON_CT, b"[1,2,3]")
    assert code == OK and responses[1] == empty("request_body")


def fnv1a32(data):
    h32 = 2166136261
    for b in data:
        h32 = ((h32 ^ b) * 16777619) & 0xFFFFFFFF
    return h32


def variant(session):
    return "b" if fnv1a32(session.encode()) % 100 < 50 else "a"


def test_ab_routing_by_cookie_hash(example_server):
    stub = example_server("ab_routing").stub()
    sessions = [f"user-{i}" for i in range(40)]
    assert {variant(s) for s in sessions} == {"a", "b"}   # both variants are exercised
    for s in sessions:
        cookie = f"theme=dark; ab_session={s}; other=1"
        for _ in range(2):       # sticky: same cookie, same variant
            check(run_one(stub, req_headers([(":path", "/"), ("cookie", cookie)])),
                  on_req_headers(add=[("x-ab-variant", variant(s))], clear_route_cache=True))


def test_ab_routing_without_cookie_and_spoofing(example_server):
    stub = example_server("ab_routing").stub()
    control = on_req_headers(add=[("x-ab-variant", "a")], clear_route_cache=True)
    check(run_one(stub, req_headers([(":path", "/")])), control)
    # a client-sent x-ab-variant is overwritten, a look-alike cookie name does not count
    check(run_one(stub, req_headers([("x-ab-variant", "b"), ("cookie", "xab_session=user-1")])),
          control)
    # the cookie may be in a second Cookie header
    s = next(s for s in (f"u{i}" for i in range(100)) if variant(s) == "b")
    check(run_one(stub, req_headers([("cookie", "a=1"), ("cookie", f"ab_session={s}")])),
          on_req_headers(add=[("x-ab-variant", "b")], clear_route_cache=True))


# --- ai_gateway: Envoy's message order for its filter config (BUFFERED both ways, the
# response body switched to STREAMED by mode_override for an SSE answer) ---------------------

PM = h.processing_mode_pb2.ProcessingMode
GATEWAY_CONFIG = pb.ProtocolConfiguration(request_body_mode=PM.BUFFERED,
                                          response_body_mode=PM.BUFFERED)
CHAT_HEADERS = [(":method", "POST"), (":path", "/v1/chat/completions"),
                ("content-type", "application/json"), ("content-length", "111"),
                ("authorization", "Bearer sk-ant-e2e")]


def gateway_headers(pairs):
    """The stream's first message: request headers with the filter config's body modes."""
    return h.headers_req("request_headers", pairs, protocol_config=GATEWAY_CONFIG)


def gateway_mode(**changes):
    """The mode_override the example sends: the filter config's modes with some changed."""
    modes = dict(request_header_mode=PM.SEND, response_header_mode=PM.SEND,
                 request_body_mode=PM.BUFFERED, response_body_mode=PM.BUFFERED,
                 request_trailer_mode=PM.SKIP, response_trailer_mode=PM.SKIP)
    modes.update(changes)
    return PM(**modes)


def zero_created(data):
    text = data.decode()
    for t in re.findall(r'"created":(\d+)', text):
        assert abs(int(t) - time.time()) < 60, text
    return re.sub(r'"created":\d+', '"created":0', text)


def test_ai_gateway_streamed_answer(example_server):
    """request headers, the whole request body, response headers, the SSE answer in three
    chunks (an event split between the first two): each message answered in order."""
    ask = (b'{"model":"claude-sonnet-4-5","stream":true,"messages":[{"role":"system",'
           b'"content":"Be brief."},{"role":"user","content":"Hi"}],"temperature":0.5}')
    events = (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_e2e",'
        b'"type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5",'
        b'"usage":{"input_tokens":9,"output_tokens":1}}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"Hello"}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
        b'"end_turn"},"usage":{"output_tokens":2}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    cut = events.index(b'"Hello"')
    chunks = [events[:cut], events[cut:-20], events[-20:]]
    requests = [gateway_headers(CHAT_HEADERS),
                req_body(ask, eos=True),
                resp_headers([(":status", "200"), ("content-type", "text/event-stream"),
                              ("content-length", "500")])]
    requests += [resp_body(c, eos=i == len(chunks) - 1) for i, c in enumerate(chunks)]
    responses, code, details = h.process(example_server("ai_gateway").stub(), requests)
    assert code == OK, details
    assert len(responses) == len(requests), responses

    # BUFFERED: headers go now, with only the client's route header removed
    rq = responses[0].request_headers.response
    assert list(rq.header_mutation.remove_headers) == ["x-model-route"], responses[0]
    assert not rq.header_mutation.set_headers and not rq.HasField("body_mutation")

    body = responses[1].request_body.response
    want = (b'{"model":"claude-sonnet-4-5","max_tokens":4096,"system":"Be brief.",'
            b'"messages":[{"role":"user","content":"Hi"}],"stream":true,"temperature":0.5}')
    assert body.body_mutation.body == want
    assert body.clear_route_cache
    assert h.header_map(body.header_mutation) == [
        (":path", b"/v1/messages"), ("x-model-route", b"anthropic"),
        ("anthropic-version", b"2023-06-01"), ("accept-encoding", b"identity"),
        ("x-api-key", b"sk-ant-e2e"), ("content-length", str(len(want)).encode())]
    assert list(body.header_mutation.remove_headers) == ["authorization"]

    rh = responses[2]
    assert rh.mode_override == gateway_mode(response_body_mode=PM.STREAMED)
    assert list(rh.response_headers.response.header_mutation.remove_headers) == ["content-length"]

    def chunk(delta, finish="null"):
        return ('data: {"id":"msg_e2e","object":"chat.completion.chunk","created":0,'
                '"model":"claude-sonnet-4-5","choices":[{"index":0,"delta":%s,'
                '"logprobs":null,"finish_reason":%s}]}\n\n' % (delta, finish))
    sent = [zero_created(r.response_body.response.body_mutation.body) for r in responses[3:]]
    assert sent == [chunk('{"role":"assistant","content":""}'),
                    chunk('{"content":"Hello"}') + chunk("{}", '"stop"'),
                    "data: [DONE]\n\n"]


def test_ai_gateway_buffered_answer_and_refusals(example_server):
    stub = example_server("ai_gateway").stub()
    ask = b'{"model":"claude-haiku-4-5","messages":[{"role":"user","content":"Hi"}]}'
    answer = (b'{"id":"msg_b","type":"message","role":"assistant","model":"claude-haiku-4-5",'
              b'"content":[{"type":"text","text":"Hi there"}],"stop_reason":"end_turn",'
              b'"usage":{"input_tokens":3,"output_tokens":2}}')
    responses, code, details = h.process(stub, [
        gateway_headers(CHAT_HEADERS), req_body(ask, eos=True),
        resp_headers([(":status", "200"), ("content-type", "application/json")]),
        resp_body(answer, eos=True)])
    assert code == OK, details
    assert responses[2].mode_override == gateway_mode(response_body_mode=PM.BUFFERED)
    out = responses[3].response_body.response
    assert zero_created(out.body_mutation.body) == (
        '{"id":"msg_b","object":"chat.completion","created":0,"model":"claude-haiku-4-5",'
        '"choices":[{"index":0,"message":{"role":"assistant","content":"Hi there"},'
        '"logprobs":null,"finish_reason":"stop"}],'
        '"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}')
    assert h.header_map(out.header_mutation) == [
        ("content-length", str(len(out.body_mutation.body)).encode())]

    # the provider's error, to a streaming request: buffered and translated
    responses, code, details = h.process(stub, [
        gateway_headers(CHAT_HEADERS),
        req_body(ask.replace(b'"messages"', b'"stream":true,"messages"'), eos=True),
        resp_headers([(":status", "401"), ("content-type", "application/json")]),
        resp_body(b'{"type":"error","error":{"type":"authentication_error",'
                  b'"message":"invalid x-api-key"}}', eos=True)])
    assert code == OK, details
    assert responses[2].mode_override == gateway_mode(response_body_mode=PM.BUFFERED)
    assert responses[3].response_body.response.body_mutation.body == (
        b'{"error":{"message":"invalid x-api-key","type":"authentication_error",'
        b'"param":null,"code":null}}')

    # an unknown model: OpenAI's error at once
    responses, code, details = h.process(stub, [
        gateway_headers(CHAT_HEADERS),
        req_body(b'{"model":"mistral-large","messages":[]}', eos=True)])
    assert code == OK, details
    assert responses[1] == h.immediate(
        400, headers=[("content-type", "application/json")],
        body='{"error":{"message":"the model \'mistral-large\' is not served here",'
             '"type":"invalid_request_error","param":"model","code":"model_not_found"}}')

    # not a chat completion: let go, and a client's x-model-route with it, so the route
    # table (which trusts that header) cannot send it to a provider
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/messages"),
                         ("POST", "/v1/chat/completions/"), ("POST", "//v1/chat/completions"),
                         ("PUT", "/v1/chat/completions")]:
        responses, code, details = h.process(stub, [
            gateway_headers([(":method", method), (":path", path),
                             ("content-type", "application/json"),
                             ("x-model-route", "anthropic")])])
        assert code == OK, details
        assert responses[0].mode_override == gateway_mode(
            request_body_mode=PM.NONE, response_header_mode=PM.SKIP, response_body_mode=PM.NONE)
        hm = responses[0].request_headers.response.header_mutation
        assert list(hm.remove_headers) == ["x-model-route"], (method, path, responses[0])
        assert not hm.set_headers


def test_ai_gateway_buffered_sse_fallback_and_cut_stream(example_server):
    """An Envoy that ignores the override sends the whole SSE answer in one body: it is
    translated whole (what that costs is measured, not asserted, here: few enough events to
    fit the default budget under ASan too). A stream that ends
    before message_stop ends with OpenAI's error event, not [DONE]."""
    stub = example_server("ai_gateway").stub()
    ask = b'{"model":"claude-sonnet-4-5","stream":true,"messages":[{"role":"user","content":"Hi"}]}'
    start = (b'data: {"type":"message_start","message":{"id":"msg_f","model":"claude-sonnet-4-5",'
             b'"usage":{"input_tokens":1}}}\n\n')
    deltas = b"".join(b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                      b'"delta":{"type":"text_delta","text":"tok%d "}}\n\n' % i for i in range(300))
    end = b'data: {"type":"message_stop"}\n\n'
    head = [gateway_headers(CHAT_HEADERS), req_body(ask, eos=True),
            resp_headers([(":status", "200"), ("content-type", "text/event-stream")])]

    responses, code, details = h.process(stub, head + [resp_body(start + deltas + end, eos=True)])
    assert code == OK, details
    out = responses[3].response_body.response.body_mutation.body
    assert out.count(b'"delta":{"content":"tok') == 300
    assert out.endswith(b"data: [DONE]\n\n")

    responses, code, details = h.process(stub, head + [resp_body(start + deltas[:5000], eos=True)])
    assert code == OK, details
    out = responses[3].response_body.response.body_mutation.body
    assert out.endswith(b'data: {"error":{"message":"the provider\'s stream ended early (in the middle '
                        b'of an event)","type":"server_error","param":null,"code":null}}\n\n'), out[-300:]
    assert b"[DONE]" not in out
